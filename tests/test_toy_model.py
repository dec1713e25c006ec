"""The bundled toy model, `dreambooth toy pretrain`, and the demo's DreamBooth effect."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from dreambooth.cli import main
from dreambooth.toy.demo import BUNDLED, demo
from dreambooth.toy.measure import load_toy, quality
from dreambooth.toy.pretrain import pretrain


def test_bundled_model_is_a_small_safetensors_sd_pipeline():
    weights = sorted(BUNDLED.glob("*/*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder"}
    assert sum(w.stat().st_size for w in weights) <= 25 * 2**20
    assert not list(BUNDLED.glob("**/*.bin")) and not list(BUNDLED.glob("**/*.pt"))
    pipe = StableDiffusionPipeline.from_pretrained(BUNDLED)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    assert pipe.tokenizer.model_max_length == 16


def test_bundled_model_meets_a_reduced_quality_bar():
    q = quality(load_toy(str(BUNDLED)), per_prompt=4, triples=10, seed=1)
    assert q.samples == 40
    assert min(q.named.values()) >= 0.7, q.lines()
    assert q.open_variety["position"] >= 0.5, q.lines()


def test_pretrain_is_reproducible_and_loads(tmp_path):
    kwargs = dict(vae_steps=2, vae_batch_size=4, images=64, unet_steps=2, batch_size=4, warmup_steps=1)
    a = pretrain(output_dir=tmp_path / "a", **kwargs)
    b = pretrain(output_dir=tmp_path / "b", **kwargs)
    pipe = StableDiffusionPipeline.from_pretrained(a)
    assert pipe.vae.config.scaling_factor > 0
    for part in ("unet", "vae", "text_encoder"):
        wa = load_file(next((a / part).glob("*.safetensors")))
        wb = load_file(next((b / part).glob("*.safetensors")))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), part
    assert json.loads((a / "pretrain.json").read_text())["config"]["unet_steps"] == 2


def test_short_dreambooth_run_raises_subject_fidelity(tmp_path):
    report = demo(output_dir=tmp_path / "demo", max_train_steps=200, num_class_images=24, samples=8,
                  device="cpu")  # the thresholds below were set on the CPU
    before, after = report["before"], report["after"]
    assert after["subject_fidelity"] > before["subject_fidelity"] + 0.25, (before, after)
    out = tmp_path / "demo"
    for name in ("before_after.png", "report.json", "report.txt", "model/model_index.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "instance-images").glob("*.png"))) == 5
    assert json.loads((out / "report.json").read_text())["identifier"] == report["identifier"]


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["demo", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not written by `dreambooth demo`" in err
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("argv", [["demo", "--subject", "dog"], ["demo", "--max_train_steps", "0"]])
def test_demo_rejects_bad_options(argv, capsys):
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err
