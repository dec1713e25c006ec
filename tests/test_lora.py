"""LoRA DreamBooth (SD family; SDXL in test_sdxl.py): what a run writes, that diffusers loads it, exact resume,
fp32 adapters under mixed precision, DoRA, and `dreambooth generate` with base + LoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

import dreambooth
from dreambooth.cli import main
from dreambooth.generation import generate, load_for_inference
from test_resume import straight_and_resumed
from test_training import same

LORA = dict(use_lora=True, rank=4, learning_rate=1e-2)


def render(pipe, prompt: str = "a photo of zwx dog") -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]


@pytest.mark.parametrize("extra", [{}, {"train_text_encoder": True, "with_prior_preservation": False,
                                        "class_prompt": None, "class_data_dir": None}],
                         ids=["unet+prior", "unet+text-encoder"])
def test_lora_run_writes_a_lora_file_that_diffusers_loads(base_args, tiny_model, tmp_path, extra):
    summary = dreambooth.train(**base_args(**LORA, **extra))
    out = tmp_path / "out"
    assert summary["steps"] == 4
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "unet").exists()
    keys = set(load_file(out / "pytorch_lora_weights.safetensors"))
    assert keys and all("lora" in k for k in keys)
    assert any(k.startswith("unet.") for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys) == bool(extra.get("train_text_encoder"))

    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    before = render(base)
    base.load_lora_weights(out)
    after = render(base)
    assert np.abs(after - before).max() > 1e-3  # the trained adapters change the image
    # dreambooth generate on the run's output = base + that LoRA
    paths = generate(model=str(out), prompt=["a photo of zwx dog"], num_images=1, num_inference_steps=2,
                     sampler="ddpm", output_dir=str(tmp_path / "samples"))
    assert len(paths) == 2


def test_generate_takes_base_plus_lora_and_matches_diffusers(base_args, tiny_model, tmp_path):
    dreambooth.train(**base_args(**LORA))
    lora_file = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    ours = load_for_inference(str(tiny_model), torch.float32, lora=[str(lora_file)])
    theirs = StableDiffusionPipeline.from_pretrained(tiny_model)
    theirs.load_lora_weights(lora_file.parent)
    assert np.allclose(render(ours), render(theirs), atol=1e-6)
    # and the run's output folder (or one of its checkpoints) loads the same way
    assert np.allclose(render(load_for_inference(str(tmp_path / "out"), torch.float32)), render(theirs), atol=1e-6)


def test_lora_resume_is_exact(base_args, tmp_path, monkeypatch):
    summary = straight_and_resumed(base_args, tmp_path, monkeypatch, 3, **LORA, max_train_steps=6,
                                   checkpointing_steps=3, train_text_encoder=True, text_encoder_lr=5e-3)
    assert summary["steps"] == 6
    assert (tmp_path / "stopped" / "checkpoint-3" / "unet" / "adapter.safetensors").is_file()
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "stopped" / "pytorch_lora_weights.safetensors")
    assert same(a, b)  # one device, the same computations: bit for bit


def test_lora_adapters_stay_fp32_under_bf16_mixed_precision(base_args, monkeypatch):
    import dreambooth.training as training

    seen = {}
    real_fit = training.fit

    def spy(run, parts):
        unet = run.accelerator.unwrap_model(parts.denoiser)
        seen["trainable"] = {p.dtype for p in unet.parameters() if p.requires_grad}
        seen["frozen"] = {p.dtype for p in unet.parameters() if not p.requires_grad}
        seen["lrs"] = [g["lr"] for g in parts.optimizer.param_groups]
        real_fit(run, parts)

    monkeypatch.setattr(training, "fit", spy)
    summary = dreambooth.train(**base_args(**LORA, mixed_precision="bf16", max_train_steps=2, train_text_encoder=True,
                                           text_encoder_lr=1e-3))
    assert seen["trainable"] == {torch.float32}
    assert seen["frozen"] == {torch.bfloat16}
    assert seen["lrs"] == [1e-2, 1e-3]
    assert np.isfinite(summary["mean_loss"])


def test_lora_flags_are_checked(base_args, tiny_model, tmp_path, capsys):
    from conftest import to_argv

    code = main(["train", *to_argv(base_args(use_dora=True))])
    assert code == 2 and "--use_lora" in capsys.readouterr().err
    code = main(["generate", "--model", str(tiny_model), "--prompt", "x", "--lora", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2 and "no LoRA weights" in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def lora_run(base_args, tmp_path):
    dreambooth.train(**base_args(**LORA, train_text_encoder=True))
    return tmp_path / "out"


def test_export_refuses_to_overwrite_and_non_lora_runs(lora_run, tiny_model, tmp_path, capsys):
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    assert main(["export", "--model", str(lora_run), "--format", "kohya", "--output",
                 str(tmp_path / "taken.safetensors")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "taken.safetensors").read_bytes() == b"mine"
    assert main(["export", "--model", str(tiny_model), "--format", "merged", "--output", str(tmp_path / "m")]) == 2
    assert "--use_lora" in capsys.readouterr().err


def test_dora_run_saves_magnitudes_that_diffusers_loads(base_args, tiny_model, tmp_path):
    dreambooth.train(**base_args(**LORA, use_dora=True, with_prior_preservation=False, class_prompt=None,
                                 class_data_dir=None, max_train_steps=2))
    out = tmp_path / "out"
    state = load_file(out / "pytorch_lora_weights.safetensors")
    assert any("lora_magnitude_vector" in k for k in state)
    plain = StableDiffusionPipeline.from_pretrained(tiny_model)
    before = render(plain)
    plain.load_lora_weights(out)
    assert np.abs(render(plain) - before).max() > 1e-4
    assert np.allclose(render(load_for_inference(str(out), torch.float32)), render(plain), atol=1e-6)
