"""What generate, evaluate and export read is checked before anything loads: no output inside any model they read
(a run's base model and VAE included, named in its train_config.json), and a T5 length the model can read."""

from __future__ import annotations

import json
import shutil

import pytest

import dreambooth
from dreambooth.cli import main
from test_outputs import one_line_error, tree_digest
from tiny import make_tiny_flux, make_tiny_sd3

NO_PRIOR = dict(with_prior_preservation=False, class_prompt=None, class_data_dir=None)


@pytest.fixture(scope="module")
def t5_models(tmp_path_factory):
    """The tiny models of the families whose prompts T5 reads."""
    root = tmp_path_factory.mktemp("t5-models")
    return {"flux": make_tiny_flux(root / "flux"), "sd3": make_tiny_sd3(root / "sd3")}


def test_no_command_writes_inside_the_base_model_or_vae_a_lora_run_reads(base_args, tiny_model, tmp_path,
                                                                          capsys):
    base, vae = tmp_path / "base", tmp_path / "vae"
    shutil.copytree(tiny_model, base)  # a copy: a failure here must not touch the session's tiny model
    shutil.copytree(tiny_model / "vae", vae)
    dreambooth.train(**base_args(pretrained_model_name_or_path=str(base), pretrained_vae_model_name_or_path=str(
        vae), use_lora=True, rank=2, max_train_steps=1, checkpointing_steps=1, **NO_PRIOR))
    run = tmp_path / "out"
    before = {"base": tree_digest(base), "vae": tree_digest(vae)}
    inside_base = f"is inside the --model's base model input {base}; write the output outside it"
    toy_eval = ["evaluate", "--backend", "toy", "--subject", "circle", "--identifier", "zwx"]
    export = ["export", "--model", run, "--format"]
    generate = ["generate", "--model", run, "--prompt", "a dog"]
    for argv, message in [
        ([*export, "merged", "--output", base / "unet" / "merged"], inside_base),
        ([*export, "kohya", "--output", base / "unet" / "k.safetensors"], inside_base),
        ([*export, "single-file", "--output", base / "vae" / "m.safetensors"], inside_base),
        (["export", "--model", run / "checkpoint-1", "--format", "merged", "--output", base / "unet" / "m"],
         inside_base),
        ([*generate, "--output_dir", base / "unet" / "samples"], inside_base),
        ([*toy_eval, "--model", run, "--output_dir", base / "text_encoder" / "eval"], inside_base),
        ([*generate, "--output_dir", vae], f"is the --model's VAE input {vae}"),
    ]:
        assert message in one_line_error(capsys, [str(a) for a in argv])
    assert {"base": tree_digest(base), "vae": tree_digest(vae)} == before
    assert not (base / "unet" / "merged").exists() and not (base / "unet" / "samples").exists()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_t5_length_past_512_is_one_line_before_loading(t5_models, family, tmp_path, capsys, monkeypatch):
    from dreambooth.families import FAMILIES

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the length was checked")

    monkeypatch.setattr(FAMILIES[family], "load_pipeline", no_load)
    model = str(t5_models[family])
    for argv in (["generate", "--model", model, "--prompt", "a dog"],
                 ["evaluate", "--backend", "toy", "--subject", "circle", "--identifier", "zwx", "--model", model]):
        line = one_line_error(capsys, [*argv, "--max_sequence_length", "100000", "--output_dir",
                                       str(tmp_path / argv[0])])
        assert f"max_sequence_length=100000 is not allowed: {family} models read at most 512 T5 tokens" in line
        assert "pass --max_sequence_length 512 or less" in line and not (tmp_path / argv[0]).exists()

    trained = tmp_path / "trained"  # a run's output whose train_config.json holds the length it samples with
    shutil.copytree(t5_models[family], trained)
    (trained / "train_config.json").write_text(json.dumps({"max_sequence_length": 4096}))
    line = one_line_error(capsys, ["generate", "--model", str(trained), "--prompt", "a dog", "--output_dir",
                                   str(tmp_path / "t")])
    assert f"(from {trained / 'train_config.json'})" in line


def test_a_t5_length_of_512_is_sampled(t5_models, tmp_path):
    assert main(["generate", "--model", str(t5_models["flux"]), "--prompt", "a dog", "--num_images", "1",
                 "--num_inference_steps", "1", "--height", "32", "--width", "32", "--max_sequence_length", "512",
                 "--device", "cpu", "--output_dir", str(tmp_path / "s")]) == 0
