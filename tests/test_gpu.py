"""What only a CUDA GPU can show: `--deterministic` resume bit for bit, mixed precision (bf16, fp16 with its grad
scaler) training, and the fused AdamW path. Marked `gpu`: skipped with the reason where there is no CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import dreambooth
import dreambooth.training as training
from test_resume import straight_and_resumed
from test_training import same, weights

pytestmark = pytest.mark.gpu
NO_PRIOR = dict(with_prior_preservation=False, class_prompt=None, class_data_dir=None)


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_deterministic_resume_is_bitwise_on_cuda(base_args, tmp_path, monkeypatch, precision):
    """N steps straight and N/2 + kill + resume + N/2 under --deterministic: the same weights and optimizer
    state bit for bit (same device and kernels by construction; the flag removes the non-deterministic ones)."""
    summary = straight_and_resumed(base_args, tmp_path, monkeypatch, 3, device="cuda", deterministic=True,
                                   mixed_precision=precision, train_text_encoder=True, max_train_steps=6,
                                   checkpointing_steps=3, lr_scheduler="linear", lr_warmup_steps=2)
    assert summary["steps"] == 6
    for part in ("unet", "text_encoder"):
        assert same(weights(tmp_path / "straight", part), weights(tmp_path / "stopped", part)), part
    a, b = (load_file(tmp_path / run / "checkpoint-6" / "optimizer.safetensors") for run in ("straight", "stopped"))
    assert same(a, b)
    if precision == "fp16":  # the grad scaler's state went through the checkpoint too
        state = json.loads((tmp_path / "stopped" / "checkpoint-6" / "state.json").read_text())
        assert state["grad_scaler"]["scale"] > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_mixed_precision_trains_on_cuda(base_args, tiny_model, tmp_path, precision, lora):
    extra = dict(use_lora=True, rank=4, learning_rate=1e-2) if lora else {}
    summary = dreambooth.train(**base_args(device="cuda", mixed_precision=precision, train_text_encoder=True,
                                           max_train_steps=3, **extra))
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["mean_loss"]))
    out = tmp_path / "out"
    if lora:
        adapters = load_file(out / "pytorch_lora_weights.safetensors")
        assert adapters and all(v.dtype == torch.float32 for v in adapters.values())  # adapters trained in fp32
    else:
        unet = weights(out, "unet")
        assert all(v.dtype == torch.float32 for v in unet.values())  # trained weights stay fp32
        assert not same(unet, weights(tiny_model, "unet"))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fused_adamw_on_cuda(base_args, monkeypatch, lora):
    """All trained parameters on the GPU in fp32 (full, or LoRA adapters under bf16): the fused kernel."""
    made = []
    from dreambooth import parts

    real = parts.make_optimizer

    def spy(cfg, groups):
        made.append(real(cfg, groups))
        return made[-1]

    monkeypatch.setattr(parts, "make_optimizer", spy)
    extra = dict(use_lora=True, mixed_precision="bf16", learning_rate=1e-2) if lora else {}
    dreambooth.train(**base_args(device="cuda", max_train_steps=2, **NO_PRIOR, **extra))
    assert made and made[0].defaults["fused"] is True


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_lora_on_a_quantized_base_on_cuda(base_args, tmp_path, quantize):
    pytest.importorskip("bitsandbytes", reason="--quantize_base needs bitsandbytes")
    summary = dreambooth.train(**base_args(device="cuda", use_lora=True, learning_rate=1e-2, mixed_precision="bf16",
                                           quantize_base=quantize, max_train_steps=2, **NO_PRIOR))
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["mean_loss"]))
    adapters = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert adapters and all(v.dtype == torch.float32 for v in adapters.values())


def test_frozen_text_encoders_leave_the_gpu_once_their_embeddings_are_cached(base_args, monkeypatch):
    seen = {}
    real_fit = training.fit

    def spy(run, parts):
        seen["devices"] = {next(m.parameters()).device.type for m in parts.text_encoders.values()}
        seen["denoiser"] = next(parts.denoiser.parameters()).device.type
        real_fit(run, parts)

    monkeypatch.setattr(training, "fit", spy)
    dreambooth.train(**base_args(device="cuda", max_train_steps=1, validation_prompt="a zwx dog",
                                 validation_steps=1, num_validation_images=1, validation_inference_steps=1,
                                 **NO_PRIOR))
    assert seen == {"devices": {"cpu"}, "denoiser": "cuda"}


def test_host_tensors_reach_the_gpu_through_pinned_memory_unchanged():
    from dreambooth.devices import to_device

    x = torch.randn(64, 4, 8, 8)
    y = to_device(x, "cuda", torch.float16)
    assert y.device.type == "cuda" and torch.equal(y.cpu(), x.half())
    assert to_device(x, "cpu") is x or torch.equal(to_device(x, "cpu"), x)


def test_class_image_batch_is_sized_from_free_memory(base_args, tmp_path, caplog):
    """On a GPU without --sample_batch_size the first batch measures what an image costs; the next batches are as
    large as free memory holds (the tiny model needs little: the cap, 64)."""
    summary = dreambooth.train(**base_args(device="cuda", sample_batch_size=None, num_class_images=40,
                                           max_train_steps=1))
    assert summary["class_images"]["generated"] == 40
    assert "class images: 64 per batch" in caplog.text


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_trains_what_eager_trains_on_cuda(base_args, tmp_path, mode, lora):
    """Compiled (inductor, block by block, LoRA adapters inside the blocks' graphs; reduce-overhead replays CUDA
    graphs) against eager on the same run: fused kernels round differently, so the losses agree to 1e-3 relative,
    not bit for bit."""
    extra = dict(use_lora=True, rank=4, learning_rate=1e-2) if lora else {}
    common = dict(device="cuda", max_train_steps=4, **NO_PRIOR, **extra)
    eager = dreambooth.train(**base_args(output_dir=str(tmp_path / "eager"), **common))
    compiled = dreambooth.train(**base_args(output_dir=str(tmp_path / "compiled"), torch_compile=True,
                                            torch_compile_mode=mode, **common))
    assert compiled["mean_loss"] == pytest.approx(eager["mean_loss"], rel=1e-3)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_base_model_target_ema_and_masks_under_bf16_on_cuda(base_args, tmp_path, lora):
    """The frozen base model's call under autocast, the EMA of fp32 adapters or weights and the masked loss, with
    bf16 compute: finite losses, the average beside the result."""
    from PIL import Image

    folder = tmp_path / "masked"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(72, 72, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
        Image.fromarray((torch.rand(72, 72) > 0.5).byte().mul(255).numpy()).save(folder / f"{i}-masklabel.png")
    summary = dreambooth.train(**base_args(device="cuda", mixed_precision="bf16", prior_target="base_model",
                                           class_data_dir=None, use_ema=True, masked_loss=True,
                                           instance_data_dir=str(folder), max_train_steps=3,
                                           **({"use_lora": True} if lora else {})))
    assert torch.isfinite(torch.tensor(summary["mean_loss"])) and (tmp_path / "out" / "ema").is_dir()


def test_one_sharded_process_offloads_to_cpu_on_cuda(base_args, tmp_path):
    """--fsdp --fsdp_cpu_offload in one process with bf16 compute: the shards live in pinned CPU memory, the
    result is the usual pipeline folder."""
    summary = dreambooth.train(**base_args(**NO_PRIOR, device="cuda", mixed_precision="bf16", fsdp=True,
                                           fsdp_cpu_offload=True, max_train_steps=3, checkpointing_steps=2))
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["mean_loss"]))
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoint-2").glob("optimizer-*")) == [
        "optimizer-0.json", "optimizer-0.safetensors"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_background_checkpoints_on_cuda_equal_those_the_loop_waits_for(base_args, tmp_path, lora):
    """Checkpoints copied from the GPU and written on the thread (three saves) hold the same tensors as those the
    loop writes itself (--deterministic: the two runs compute the same steps bit for bit)."""
    extra = dict(use_lora=True, rank=4, learning_rate=1e-2) if lora else {}
    common = dict(device="cuda", deterministic=True, mixed_precision="bf16", max_train_steps=6, checkpointing_steps=2,
                  use_ema=True, **extra)
    for name, background in (("waited", False), ("background", True)):
        dreambooth.train(**base_args(output_dir=str(tmp_path / name), checkpoint_in_background=background, **common))
    for step in (2, 4, 6):
        a, b = (tmp_path / name / f"checkpoint-{step}" for name in ("waited", "background"))
        for file in sorted(p.relative_to(a) for p in a.rglob("*.safetensors")):
            assert same(load_file(a / file), load_file(b / file)), (step, file)
