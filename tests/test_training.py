import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

import dreambooth
from conftest import to_argv
from dreambooth.cli import main
from dreambooth.events import read_events
from tiny import make_images


def weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    files = sorted((folder / part).glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def relative_update_gap(base: dict, a: dict, b: dict) -> float:
    """|update_a - update_b| / |update_a| over all tensors. Adam turns float-order noise on near-zero gradients
    into lr-sized steps on a few elements, so an element-wise max is the wrong yardstick for 'the same training'."""
    delta_a = torch.cat([(a[k] - base[k]).flatten() for k in base])
    delta_b = torch.cat([(b[k] - base[k]).flatten() for k in base])
    assert delta_a.norm() > 0
    return ((delta_a - delta_b).norm() / delta_a.norm()).item()


def test_reference_command_line_end_to_end(base_args, tiny_model, tmp_path):
    """The issue's acceptance run: prior preservation, 20 steps, 64 px, via the CLI; then the same again."""
    args = base_args(max_train_steps=20, validation_prompt="a zwx dog", validation_steps=10,
                     num_validation_images=2, validation_inference_steps=2)
    assert main(["train", *to_argv(args)]) == 0
    out = Path(args["output_dir"])
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 20 and summary["class_images"]["generated"] == 4
    assert summary["mean_prior_loss"] > 0 and summary["mean_instance_loss"] > 0

    # only the UNet changed
    assert not same(weights(out, "unet"), weights(tiny_model, "unet"))
    assert same(weights(out, "vae"), weights(tiny_model, "vae"))
    assert same(weights(out, "text_encoder"), weights(tiny_model, "text_encoder"))
    assert json.loads((out / "train_config.json").read_text())["max_train_steps"] == 20
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000010.png", "step-000020.png"]
    assert not any(out.glob("*.bin")) and not any(out.rglob("*.pt"))

    # the event stream (what `dreambooth ui` reads): class images, start, every step, the grids, the end
    events, _ = read_events(out / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["phase", "class_images"] and kinds[-1] == "finish" and kinds.count("start") == 1
    phases = [e["name"] for e in events if e["event"] == "phase"]  # what the page names while nothing else moves
    assert phases[0] == "loading the base model" and phases[-1] == "saving the result"
    assert "rendering validation images" in phases
    assert events[kinds.index("start") - 1] | {"time": 0} == {"event": "class_images", "done": 4, "total": 4,
                                                              "folder": args["class_data_dir"], "time": 0}
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 21)) and steps[-1]["eta_s"] == 0
    assert sum(e["loss"] for e in steps) / 20 == summary["mean_loss"]  # the same floats, added in the same order
    grids = [e for e in events if e["event"] == "validation"]
    assert [e["step"] for e in grids] == [10, 20] and all(Path(e["path"]).is_file() for e in grids)
    assert events[-1]["summary"] == summary
    stream = (out / "events.jsonl").read_bytes()

    # diffusers loads and renders it
    pipe = StableDiffusionPipeline.from_pretrained(out, use_safetensors=True)
    image = pipe("a zwx dog", num_inference_steps=2, output_type="pil",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)

    # the same command into the finished folder is refused and changes nothing; into a new folder it reuses every
    # class image and, with the same seed on the same device, learns the same weights bit for bit
    first = weights(out, "unet")
    assert main(["train", *to_argv(args)]) == 2
    assert same(weights(out, "unet"), first) and (out / "events.jsonl").read_bytes() == stream
    again_dir = tmp_path / "again"
    assert main(["train", *to_argv({**args, "output_dir": str(again_dir)})]) == 0
    again = json.loads((again_dir / "run_summary.json").read_text())
    assert again["class_images"] == {"used": 4, "user": 0, "reused": 4, "generated": 0}
    assert same(weights(again_dir, "unet"), first)


def test_text_encoder_trains_only_when_asked(base_args, tiny_model):
    dreambooth.train(**base_args(with_prior_preservation=False, class_prompt=None, class_data_dir=None,
                                 train_text_encoder=True, max_train_steps=2))
    out = Path(base_args()["output_dir"])
    assert not same(weights(out, "text_encoder"), weights(tiny_model, "text_encoder"))
    assert same(weights(out, "vae"), weights(tiny_model, "vae"))


def _class_dir(folder: Path, color) -> Path:
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (64, 64), color).save(folder / f"user_{i}.png")
    return folder


@pytest.mark.parametrize("lam, expect_same", [(0.0, True), (1.0, False)])
def test_class_half_has_no_effect_when_lambda_is_zero(base_args, tmp_path, lam, expect_same):
    runs = []
    for name, color in (("black", "black"), ("white", "white")):
        args = base_args(prior_loss_weight=lam, class_data_dir=str(_class_dir(tmp_path / name, color)),
                         output_dir=str(tmp_path / f"out-{name}"), max_train_steps=2)
        dreambooth.train(**args)
        runs.append(weights(Path(args["output_dir"]), "unet"))
    assert same(*runs) == expect_same


def test_gradient_accumulation_matches_a_bigger_batch(base_args, tiny_model, tmp_path):
    a = base_args(train_batch_size=2, max_train_steps=2, output_dir=str(tmp_path / "a"))
    b = base_args(train_batch_size=1, gradient_accumulation_steps=2, max_train_steps=2, output_dir=str(tmp_path / "b"))
    dreambooth.train(**a)
    dreambooth.train(**b)
    gap = relative_update_gap(weights(tiny_model, "unet"), weights(tmp_path / "a", "unet"),
                              weights(tmp_path / "b", "unet"))
    assert gap < 1e-3


def test_v_prediction_snr_and_offset_noise_run(base_args, tiny_model_v, tmp_path):
    summary = dreambooth.train(**base_args(pretrained_model_name_or_path=str(tiny_model_v), snr_gamma=5.0,
                                           offset_noise=True, max_train_steps=3, lr_scheduler="cosine",
                                           lr_warmup_steps=1))
    assert summary["steps"] == 3 and torch.isfinite(torch.tensor(summary["mean_loss"]))
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


def test_tensorboard_logs_when_asked(base_args, tmp_path):
    dreambooth.train(**base_args(report_to="tensorboard", max_train_steps=2))
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))


def test_small_and_odd_instance_images_train(base_args, tmp_path):
    folder = make_images(tmp_path / "odd", n=2, size=40)  # smaller than 64: warned and upscaled
    Image.new("LA", (80, 80), (90, 128)).save(folder / "gray_alpha.png")
    summary = dreambooth.train(**base_args(instance_data_dir=str(folder), max_train_steps=2))
    assert summary["num_instance_images"] == 3


def test_bf16_mixed_precision_and_gradient_checkpointing_on_cpu(base_args, tiny_model, tmp_path):
    summary = dreambooth.train(**base_args(mixed_precision="bf16", gradient_checkpointing=True,
                                           train_text_encoder=True, max_train_steps=2))
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["mean_loss"]))
    unet = weights(tmp_path / "out", "unet")
    assert all(v.dtype == torch.float32 for v in unet.values())  # trained weights stay fp32
    assert not same(unet, weights(tiny_model, "unet"))


def test_latent_cache_encodes_each_view_once_and_learns_the_same(base_args, tmp_path):
    """Centre crops without flips: 4 instance + 4 class views, so 16 examples over 4 steps need 8 VAE encodings;
    the run learns what a run that encodes every step learns (the VAE's batch composition differs, so equal up to
    float rounding: losses to 1e-5)."""
    common = dict(center_crop=True, max_train_steps=4)
    cached = dreambooth.train(**base_args(output_dir=str(tmp_path / "cached"), **common))
    plain = dreambooth.train(**base_args(output_dir=str(tmp_path / "plain"), cache_latents=False, **common))
    assert cached["latent_cache"] == {"enabled": True, "views": 8, "encoded": 8, "hits": 8}
    assert plain["latent_cache"]["encoded"] == 16 and plain["latent_cache"]["views"] == 0
    assert abs(cached["mean_loss"] - plain["mean_loss"]) < 1e-5
    assert abs(cached["final_loss"] - plain["final_loss"]) < 1e-5


def test_reading_losses_every_n_steps_changes_nothing_but_when(base_args, tmp_path, monkeypatch):
    """--logging_steps only decides when the losses are read back from the device: the sums, the last loss, the
    logged values (every step still logged) and the weights are those of reading every step."""
    from accelerate import Accelerator

    logged = {}
    log = Accelerator.log

    def record(self, values, step=None, **kw):
        logged.setdefault(self.project_dir, []).append((step, values["loss"]))
        return log(self, values, step=step, **kw)

    monkeypatch.setattr(Accelerator, "log", record)
    common = dict(max_train_steps=7, checkpointing_steps=3)
    every = dreambooth.train(**base_args(output_dir=str(tmp_path / "every"), logging_steps=1, **common))
    fours = dreambooth.train(**base_args(output_dir=str(tmp_path / "fours"), logging_steps=4, **common))
    for key in ("mean_loss", "final_loss", "mean_instance_loss", "mean_prior_loss"):
        assert every[key] == fours[key], key
    a, b = (logged[str(tmp_path / name)] for name in ("every", "fours"))
    assert a == b and [step for step, _ in a] == list(range(1, 8))
    wa, wb = weights(tmp_path / "every", "unet"), weights(tmp_path / "fours", "unet")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ckpt = json.loads((tmp_path / "fours" / "checkpoint-6" / "state.json").read_text())
    assert ckpt["step"] == 6 and ckpt["loss_sum"] > 0  # a checkpoint holds every step before it


def test_save_precision_halves_the_saved_pipeline(base_args, tmp_path):
    dreambooth.train(**base_args(save_precision="fp16", max_train_steps=1, with_prior_preservation=False,
                                 class_prompt=None, class_data_dir=None))
    for part in ("unet", "text_encoder", "vae"):
        saved = load_file(next((tmp_path / "out" / part).glob("*.safetensors")))
        assert {t.dtype for t in saved.values()} == {torch.float16}, part
    assert StableDiffusionPipeline.from_pretrained(tmp_path / "out", torch_dtype=torch.float32) is not None


def test_latent_cache_keys_flips_and_crops_apart(base_args, tmp_path):
    """Random crops and flips: a view is reused only when crop and flip match, so the cache never serves the
    wrong pixels (same losses as uncached) and encodes at least as many views as there are images."""
    common = dict(random_flip=True, max_train_steps=6, with_prior_preservation=False, class_prompt=None,
                  class_data_dir=None)
    cached = dreambooth.train(**base_args(output_dir=str(tmp_path / "cached"), **common))
    plain = dreambooth.train(**base_args(output_dir=str(tmp_path / "plain"), cache_latents=False, **common))
    stats = cached["latent_cache"]
    assert stats["encoded"] + stats["hits"] == 12 and stats["views"] == stats["encoded"] >= 4
    assert abs(cached["mean_loss"] - plain["mean_loss"]) < 1e-5


def test_latent_cache_serves_each_view_its_own_posterior(tiny_model):
    from diffusers import AutoencoderKL

    from dreambooth.latent_cache import LatentCache

    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae").eval()
    torch.manual_seed(0)
    pixels = torch.rand(4, 3, 64, 64) * 2 - 1
    views = ["a", "b", "a", "c"]
    pixels[2] = pixels[0]  # the same view has the same pixels
    cache = LatentCache(vae)
    mean, std = cache.moments(pixels, views)
    with torch.no_grad():
        ref = vae.encode(pixels).latent_dist
    assert torch.allclose(mean, ref.mean, atol=1e-5) and torch.allclose(std, ref.std, atol=1e-5)
    assert cache.stats() == {"enabled": True, "views": 3, "encoded": 3, "hits": 1}
    again, _ = cache.moments(pixels[[3, 1]], ["c", "b"])
    assert torch.equal(again, mean[[3, 1]]) and cache.stats()["encoded"] == 3
    full = LatentCache(vae, max_views=1)
    full.moments(pixels, views)
    assert full.stats()["views"] == 1 and full.moments(pixels[[3]], ["c"])[0].shape == (1, 4, 8, 8)


def test_channels_last_learns_what_the_default_layout_learns(base_args, tmp_path):
    common = dict(max_train_steps=2, with_prior_preservation=False, class_prompt=None, class_data_dir=None)
    a = dreambooth.train(**base_args(output_dir=str(tmp_path / "a"), **common))
    b = dreambooth.train(**base_args(output_dir=str(tmp_path / "b"), channels_last=True, **common))
    assert abs(a["mean_loss"] - b["mean_loss"]) < 1e-4
