"""--prior_target base_model beyond the family suite (test_families.py): class images as inputs, offloading."""

from __future__ import annotations

import dreambooth
from test_training import same, weights


def test_offloaded_base_model_gives_the_same_run(base_args, tmp_path):
    """Layer-by-layer offloading moves the frozen copy's weights, never changes them: the same training, bit for
    bit (on a CPU the execution device is the CPU, so the same kernels run)."""
    common = dict(prior_target="base_model", class_data_dir=None, max_train_steps=3)
    dreambooth.train(**base_args(**common, output_dir=str(tmp_path / "resident")))
    dreambooth.train(**base_args(**common, offload_base_model=True, output_dir=str(tmp_path / "offloaded")))
    assert same(weights(tmp_path / "resident", "unet"), weights(tmp_path / "offloaded", "unet"))


def test_base_model_target_with_class_images_as_inputs(base_args, tmp_path):
    """With --class_data_dir the generated class images are the inputs (as in the paper) and the target is still
    the base model's prediction: a different run from the paper's own loss, on the same images."""
    paper = dreambooth.train(**base_args(output_dir=str(tmp_path / "paper")))
    ours = dreambooth.train(**base_args(prior_target="base_model", output_dir=str(tmp_path / "base")))
    assert ours["class_images"]["used"] == paper["class_images"]["used"] == 4
    assert ours["class_images"]["reused"] == 4  # the same folder: made once
    assert ours["mean_prior_loss"] < paper["mean_prior_loss"]  # the model starts at its own prediction
    assert not same(weights(tmp_path / "paper", "unet"), weights(tmp_path / "base", "unet"))
