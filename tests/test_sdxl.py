"""The SDXL family on a tiny random SDXL pipeline: conditioning as the pipeline computes it, full and LoRA
DreamBooth with and without prior preservation (both text encoders trained), resume, the separate VAE, exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

import dreambooth
from dreambooth.cli import main
from dreambooth.families import ModelSource, get_family
from test_lora import LORA
from test_training import same, weights

NO_PRIOR = dict(with_prior_preservation=False, class_prompt=None, class_data_dir=None)


def render(pipe, prompt: str = "a photo of zwx dog") -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]


@pytest.fixture
def xl_args(base_args, tiny_sdxl):
    return lambda **changes: base_args(**{"pretrained_model_name_or_path": str(tiny_sdxl), **changes})


def test_size_conditioning_is_each_examples_own(tiny_sdxl):
    """add_time_ids per example: its original size, the top-left of its crop, the training size (the encoding
    itself is checked against the pipeline's for every family in test_families.py)."""
    from types import SimpleNamespace

    family = get_family(ModelSource(str(tiny_sdxl)))
    assert family.name == "sdxl"
    cond = {"encoder_hidden_states": torch.zeros(2, 16, 80), "text_embeds": torch.zeros(2, 32)}
    batch = {"original_sizes": torch.tensor([[72, 96], [64, 64]]), "crop_top_lefts": torch.tensor([[0, 5], [0, 0]]),
             "target_sizes": torch.tensor([[64, 64], [48, 80]])}  # a square and an aspect-ratio bucket
    kwargs = family.unet_kwargs(cond, batch, SimpleNamespace(resolution=64))
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[72, 96, 0, 5, 64, 64], [64, 64, 0, 0, 48, 80]]
    assert set(kwargs) == {"encoder_hidden_states", "added_cond_kwargs"}


def test_resolution_defaults_to_1024_and_the_fp16_vae_stays_fp32(xl_args, tiny_model):
    from dreambooth import schema
    from dreambooth.config import TrainConfig
    from dreambooth.run import setup

    run = setup(schema.build(TrainConfig, {**xl_args(), "resolution": None}))
    assert run.cfg.resolution == 1024 and run.family.name == "sdxl"
    run = setup(schema.build(TrainConfig, {**xl_args(pretrained_model_name_or_path=str(tiny_model),
                                                     output_dir=str(Path(xl_args()["output_dir"]) / "sd")),
                                           "resolution": None}))
    assert run.cfg.resolution == 512

    xl = get_family(ModelSource(xl_args()["pretrained_model_name_or_path"]))
    c = xl.load(ModelSource(xl_args()["pretrained_model_name_or_path"]))
    assert xl.vae_dtype(c, torch.float16) == torch.float32  # SDXL's VAE overflows in fp16
    assert xl.vae_dtype(c, torch.bfloat16) == torch.bfloat16
    c.source.vae = "some/fp16-fix-vae"
    assert xl.vae_dtype(c, torch.float16) == torch.float16  # the user brought an fp16-safe VAE


def test_separate_vae_is_used_for_training_and_saved(xl_args, tmp_path):
    torch.manual_seed(1)
    other = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=64, force_upcast=False)
    other.save_pretrained(tmp_path / "fp16-fix-vae")
    dreambooth.train(**xl_args(pretrained_vae_model_name_or_path=str(tmp_path / "fp16-fix-vae"), max_train_steps=1))
    assert same(weights(tmp_path / "out", "vae"), {k: v for k, v in other.state_dict().items()})
    manifest = json.loads((tmp_path / "class" / "dreambooth_manifest.json").read_text())
    (settings,) = manifest["settings"].values()
    assert settings["model"]["vae"] == str(tmp_path / "fp16-fix-vae")  # class images are keyed by the VAE too


def test_lora_run_with_prior_preservation(xl_args, tmp_path):
    summary = dreambooth.train(**xl_args(**LORA, max_train_steps=2))
    assert summary["class_images"]["used"] == 4 and np.isfinite(summary["mean_prior_loss"])
    assert {k.split(".")[0] for k in load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")} == {"unet"}


def test_export_kohya_names_the_two_text_encoders(xl_args, tmp_path):
    dreambooth.train(**xl_args(**LORA, train_text_encoder=True, **NO_PRIOR))
    out = tmp_path / "zwx-xl.safetensors"
    assert main(["export", "--model", str(tmp_path / "out"), "--format", "kohya", "--output", str(out)]) == 0
    keys = set(load_file(out))
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
