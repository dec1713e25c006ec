"""--use_ema: the average by hand, in every checkpoint, beside the result, for validation, and exact on resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import dreambooth
import dreambooth.training as training
from dreambooth.cli import main
from test_resume import straight_and_resumed
from test_training import same, weights

NO_PRIOR = dict(with_prior_preservation=False, class_prompt=None, class_data_dir=None)


def test_ema_follows_the_warm_up_recurrence_by_hand(base_args, tmp_path):
    """s_1 = p_1 (and s = p while the EMA waits), then s_k = s_{k-1} - (1 - d_k)(s_{k-1} - p_k) with the warm-up decay
    d_k = min(1 - (1 + k - after - 1) ** -power, decay), from the raw weights each step's checkpoint holds."""
    steps, after, power = 5, 1, 0.75
    dreambooth.train(**base_args(**NO_PRIOR, max_train_steps=steps, checkpointing_steps=1, use_ema=True,
                                 ema_update_after_step=after, ema_power=power, ema_decay=0.6))
    out = tmp_path / "out"
    shadow = None
    for k in range(1, steps + 1):
        raw = weights(out / f"checkpoint-{k}", "unet")
        n = max(0, k - after - 1)
        d = 0.0 if n <= 0 else min(1 - (1 + n) ** -power, 0.6)
        shadow = dict(raw) if shadow is None else {key: s - (1 - d) * (s - raw[key]) for key, s in shadow.items()}
        saved = {key.removeprefix("unet/"): v
                 for key, v in load_file(out / f"checkpoint-{k}" / "ema.safetensors").items()}
        assert saved.keys() == shadow.keys()
        # the same operations, but torch's foreach kernels vs one tensor at a time: float rounding
        assert all(torch.allclose(saved[key], shadow[key], rtol=1e-6, atol=1e-7) for key in saved), k
    result = weights(out / "ema", "unet")
    assert same(result, saved) and not same(result, weights(out, "unet"))  # the average, beside the raw weights
    assert same(weights(out, "unet"), weights(out / f"checkpoint-{steps}", "unet"))


def test_validation_uses_the_ema_weights_when_asked_and_training_goes_on_with_its_own(base_args, tmp_path,
                                                                                     monkeypatch):
    seen = []
    real = training.render_validation

    def spy(family, c, denoiser, *args):
        seen.append({k: v.detach().clone() for k, v in denoiser.state_dict().items()})
        return real(family, c, denoiser, *args)

    monkeypatch.setattr(training, "render_validation", spy)
    dreambooth.train(**base_args(**NO_PRIOR, max_train_steps=4, checkpointing_steps=2, use_ema=True,
                                 validate_with_ema=True, validation_prompt="a photo of zwx dog", validation_steps=2,
                                 num_validation_images=1, validation_inference_steps=1))
    out = tmp_path / "out"
    ema = {k.removeprefix("unet/"): v for k, v in load_file(out / "checkpoint-2" / "ema.safetensors").items()}
    assert len(seen) == 2 and same({k: seen[0][k] for k in ema}, ema)
    raw = weights(out / "checkpoint-2", "unet")
    assert not same(raw, ema)
    # after validation the raw weights were back: training from them gives what a run without validation gives
    dreambooth.train(**base_args(**NO_PRIOR, max_train_steps=4, checkpointing_steps=2, use_ema=True,
                                 output_dir=str(tmp_path / "plain")))
    assert same(weights(out, "unet"), weights(tmp_path / "plain", "unet"))


@pytest.mark.parametrize("extra", [{}, {"use_lora": True, "rank": 4, "learning_rate": 1e-2}], ids=["full", "lora"])
def test_resume_with_ema_and_the_base_model_target_is_exact(base_args, tmp_path, monkeypatch, extra):
    straight_and_resumed(base_args, tmp_path, monkeypatch, 2, max_train_steps=4, checkpointing_steps=2,
                         use_ema=True, prior_target="base_model", class_data_dir=None, **extra)
    for name in ("straight", "stopped"):
        assert not (tmp_path / name / "class").exists()
    a = load_file(tmp_path / "straight" / "checkpoint-4" / "ema.safetensors")
    b = load_file(tmp_path / "stopped" / "checkpoint-4" / "ema.safetensors")
    assert same(a, b)
    if extra:
        lora = "pytorch_lora_weights.safetensors"
        assert same(load_file(tmp_path / "straight" / "ema" / lora), load_file(tmp_path / "stopped" / "ema" / lora))
        assert not same(load_file(tmp_path / "stopped" / "ema" / lora), load_file(tmp_path / "stopped" / lora))
    else:
        assert same(weights(tmp_path / "straight" / "ema", "unet"), weights(tmp_path / "stopped" / "ema", "unet"))
        assert same(weights(tmp_path / "straight", "unet"), weights(tmp_path / "stopped", "unet"))


def test_lora_ema_result_loads_in_diffusers(base_args, tmp_path):
    from diffusers import StableDiffusionPipeline

    dreambooth.train(**base_args(**NO_PRIOR, use_lora=True, rank=4, learning_rate=1e-2, use_ema=True))
    pipe = StableDiffusionPipeline.from_pretrained(base_args()["pretrained_model_name_or_path"])
    pipe.load_lora_weights(tmp_path / "out" / "ema")
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_resuming_a_run_without_ema_with_use_ema_is_one_line(base_args, tmp_path, capsys):
    from conftest import to_argv

    dreambooth.train(**base_args(**NO_PRIOR, max_train_steps=2, checkpointing_steps=2))
    code = main(["train", *to_argv(base_args(**NO_PRIOR, max_train_steps=3, use_ema=True,
                                             resume_from_checkpoint="latest"))])
    err = capsys.readouterr().err
    assert code != 0 and "no EMA weights" in err and "Traceback" not in err
