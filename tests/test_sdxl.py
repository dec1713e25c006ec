"""The SDXL family on a tiny random SDXL pipeline: conditioning as the pipeline computes it, full and LoRA
DreamBooth with and without prior preservation (both text encoders trained), resume, the separate VAE, exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from safetensors.torch import load_file

import dreambooth
from conftest import to_argv
from dreambooth.cli import main
from dreambooth.families import ModelSource, get_family
from dreambooth.generation import load_for_inference
from test_lora import LORA
from test_resume import straight_and_resumed
from test_training import same, weights

NO_PRIOR = dict(with_prior_preservation=False, class_prompt=None, class_data_dir=None)


def render(pipe, prompt: str = "a photo of zwx dog") -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]


@pytest.fixture
def xl_args(base_args, tiny_sdxl):
    return lambda **changes: base_args(**{"pretrained_model_name_or_path": str(tiny_sdxl), **changes})


def test_family_is_detected_and_encodes_as_the_pipeline_does(tiny_sdxl):
    source = ModelSource(str(tiny_sdxl))
    family = get_family(source)
    assert family.name == "sdxl"
    c = family.load(source)
    prompts = ["a photo of zwx dog", "a photo of dog"]
    ids = family.tokenize(c, prompts)
    assert ids.shape[:2] == (2, 2)  # (prompts, tokenizers, length)
    with torch.no_grad():
        ours = family.encode(c, ids)
        pipe = family.pipeline(c, c.unet, c.text_encoders, c.noise_scheduler)
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert torch.allclose(ours["encoder_hidden_states"], embeds, atol=1e-6)
    assert torch.allclose(ours["text_embeds"], pooled, atol=1e-6)

    batch = {"original_sizes": torch.tensor([[72, 96], [64, 64]]), "crop_top_lefts": torch.tensor([[0, 5], [0, 0]])}
    kwargs = family.unet_inputs({k: v for k, v in ours.items()}, batch, resolution=64)
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[72, 96, 0, 5, 64, 64], [64, 64, 0, 0, 64, 64]]
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


def test_full_run_with_prior_trains_both_text_encoders(xl_args, tiny_sdxl, tmp_path):
    args = xl_args(train_text_encoder=True, max_train_steps=3, validation_prompt="a photo of zwx dog",
                   validation_steps=3, num_validation_images=1, validation_inference_steps=2)
    assert main(["train", *to_argv(args)]) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["family"] == "sdxl" and summary["class_images"]["generated"] == 4
    for part in ("unet", "text_encoder", "text_encoder_2"):
        assert not same(weights(out, part), weights(tiny_sdxl, part)), part
    assert same(weights(out, "vae"), weights(tiny_sdxl, "vae"))
    assert (out / "validation" / "step-000003.png").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert np.isfinite(render(pipe)).all()
    assert main(["generate", "--model", str(out), "--prompt", "a photo of zwx dog", "--num_images", "1",
                 "--num_inference_steps", "2", "--output_dir", str(tmp_path / "samples")]) == 0


def test_resume_with_both_text_encoders_is_exact(xl_args, tmp_path, monkeypatch):
    straight_and_resumed(xl_args, tmp_path, monkeypatch, 2, max_train_steps=4, checkpointing_steps=2,
                         train_text_encoder=True, **NO_PRIOR)
    assert (tmp_path / "stopped" / "checkpoint-2" / "text_encoder_2").is_dir()
    for part in ("unet", "text_encoder", "text_encoder_2"):  # one device, the same computations: bit for bit
        assert same(weights(tmp_path / "straight", part), weights(tmp_path / "stopped", part)), part


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


@pytest.fixture
def xl_lora_run(xl_args, tmp_path):
    dreambooth.train(**xl_args(**LORA, train_text_encoder=True, **NO_PRIOR))
    return tmp_path / "out"


def test_lora_run_with_both_text_encoders_loads_in_diffusers(xl_lora_run, tiny_sdxl, tmp_path):
    keys = set(load_file(xl_lora_run / "pytorch_lora_weights.safetensors"))
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    theirs = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    before = render(theirs)
    theirs.load_lora_weights(xl_lora_run)
    after = render(theirs)
    assert np.abs(after - before).max() > 1e-3
    assert np.allclose(render(load_for_inference(str(xl_lora_run), torch.float32)), after, atol=1e-6)


def test_lora_run_with_prior_preservation(xl_args, tmp_path):
    summary = dreambooth.train(**xl_args(**LORA, max_train_steps=2))
    assert summary["class_images"]["used"] == 4 and np.isfinite(summary["mean_prior_loss"])
    assert {k.split(".")[0] for k in load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")} == {"unet"}


def test_export_kohya_names_the_two_text_encoders_and_round_trips(xl_lora_run, tiny_sdxl, tmp_path):
    out = tmp_path / "zwx-xl.safetensors"
    assert main(["export", "--model", str(xl_lora_run), "--format", "kohya", "--output", str(out)]) == 0
    keys = set(load_file(out))
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    ours = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    ours.load_lora_weights(xl_lora_run)
    kohya = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    kohya.load_lora_weights(out.parent, weight_name=out.name)
    assert np.allclose(render(ours), render(kohya), atol=1e-5)


def test_export_merged_sdxl(xl_lora_run, tiny_sdxl, tmp_path):
    out = tmp_path / "merged"
    assert main(["export", "--model", str(xl_lora_run), "--format", "merged", "--output", str(out)]) == 0
    merged = StableDiffusionXLPipeline.from_pretrained(out)
    with_lora = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    with_lora.load_lora_weights(xl_lora_run)
    assert np.allclose(render(merged), render(with_lora), atol=1e-4)
