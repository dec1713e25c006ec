"""Evaluation: metric known answers, the bootstrap's coverage, LPIPS, the DreamBench protocol's counts, and
`dreambooth evaluate` end to end on tiny random backbones (dreambench backend) and the bundled toy model (toy)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth.cli import main
from dreambooth.errors import DreamBoothError
from dreambooth.evaluation import evaluate, metrics, protocol
from dreambooth.evaluation.backbones import Clip, Dino
from dreambooth.evaluation.lpips import load_lpips, pairwise_distances
from dreambooth.toy.measure import toy_options, toy_sampling
from dreambooth.toy.models import TOY_MODELS
from tiny import make_tiny_clip, make_tiny_dino, make_tiny_lpips

METRICS = {"dino", "clip_i", "clip_t", "pres", "div"}


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {"dino_model": str(make_tiny_dino(root / "dino")), "clip_model": str(make_tiny_clip(root / "clip")),
            "lpips_weights": str(make_tiny_lpips(root / "lpips" / "alex.safetensors"))}


def noise_images(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# metrics: known answers


def test_similarity_of_a_set_with_itself_is_one_and_of_orthogonal_sets_zero():
    e = torch.tensor([[3.0, 0.0, 0.0]])
    assert metrics.similarity_to_set(e.repeat(4, 1), e.repeat(2, 1)) == pytest.approx(np.ones(4))
    assert metrics.similarity_to_set(torch.eye(4)[:2], torch.eye(4)[2:]) == pytest.approx(np.zeros(2))
    # per generated image: the mean over the real images
    assert metrics.similarity_to_set(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == (
        pytest.approx([0.5]))


def test_clip_t_by_hand():
    text = torch.tensor([2.0, 0.0, 0.0])
    images = torch.tensor([[1.0, 0.0, 0.0], [0.0, 5.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    assert metrics.text_image_similarity(text, images) == pytest.approx([1.0, 0.0, 1 / math.sqrt(2), -1.0])


def test_within_set_and_pairwise_means_skip_the_diagonal():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert metrics.within_set_similarity(e) == pytest.approx(2 / 6)  # pairs: (0,2) twice similar, rest 0
    d = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0]], dtype=float)
    assert metrics.mean_pairwise(d) == pytest.approx(2.0)
    assert math.isnan(metrics.mean_pairwise(np.zeros((1, 1))))


def test_dino_and_clip_i_of_an_image_set_against_itself_are_one(backbones):
    image = noise_images(1)[0]
    for net in (Dino(backbones["dino_model"]), Clip(backbones["clip_model"])):
        same = metrics.similarity_to_set(net.images([image] * 3), net.images([image.copy()] * 2))
        assert same == pytest.approx(np.ones(3), abs=1e-5)
        other = metrics.similarity_to_set(net.images([image]), net.images(noise_images(2, seed=1)))
        assert other[0] < 0.9999


def test_dino_preprocessing_is_resize_256_then_centre_crop_224(backbones):
    dino = Dino(backbones["dino_model"])
    pixels = dino.processor(images=[Image.new("RGB", (512, 300), (255, 255, 255))],
                            return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 224, 224)
    assert pixels[0, :, 0, 0].tolist() == pytest.approx([(1 - m) / s for m, s in zip((0.485, 0.456, 0.406),
                                                                                      (0.229, 0.224, 0.225))],
                                                         abs=1e-4)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = 0
    trials = 300
    for t in range(trials):
        low, high = metrics.bootstrap_ci(rng.normal(0.5, 0.2, size=40), resamples=1000, seed=t)
        hits += low <= 0.5 <= high
    assert 0.89 <= hits / trials <= 0.99
    assert metrics.bootstrap_ci([0.3]) == (0.3, 0.3)


# LPIPS


def test_lpips_is_zero_on_identical_images_symmetric_and_grows_with_the_change(tmp_path):
    net = load_lpips(make_tiny_lpips(tmp_path / "alex.safetensors"))
    base = np.random.default_rng(0).integers(60, 190, (64, 64, 3)).astype(np.float64)
    noise = np.random.default_rng(1).normal(0, 1, base.shape)
    images = [Image.fromarray(np.clip(base + a * noise, 0, 255).astype(np.uint8)) for a in (0, 0, 8, 40)]
    d = pairwise_distances(net, images)
    assert d[0, 1] == pytest.approx(0.0, abs=1e-7)
    assert np.allclose(d, d.T)
    assert 0 < d[0, 2] < d[0, 3]


def test_lpips_loads_both_key_layouts_to_the_same_network(tmp_path):
    images = noise_images(3)
    a = pairwise_distances(load_lpips(make_tiny_lpips(tmp_path / "a.safetensors", "torchvision")), images)
    b = pairwise_distances(load_lpips(make_tiny_lpips(tmp_path / "b" / "x.safetensors", "lpips")), images)
    assert np.allclose(a, b)  # same seed, the keys only spelt differently (and a folder for b)


def test_lpips_refuses_missing_weights_and_other_formats(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(DreamBoothError, match="no LPIPS weights"):
        load_lpips(tmp_path / "nothing.safetensors")
    (tmp_path / "alex.pth").write_bytes(b"\x80\x04pickle")
    with pytest.raises(DreamBoothError, match="no LPIPS weights"):
        load_lpips(tmp_path / "alex.pth")
    save_file({"lin0.model.1.weight": torch.ones(1, 64, 1, 1)}, str(tmp_path / "part.safetensors"))
    with pytest.raises(DreamBoothError, match="lack"):
        load_lpips(tmp_path / "part.safetensors")


# the protocol


def test_dreambench_protocol_counts():
    subjects = protocol.subjects()
    assert len(subjects) == 30
    assert sum(s.live for s in subjects.values()) == 9
    assert {"backpack", "backpack_dog", "bear_plushie", "wolf_plushie", "dog8", "teapot"} <= set(subjects)
    assert subjects["bear_plushie"].class_noun == "stuffed animal"
    assert subjects["dog5"].live and not subjects["backpack_dog"].live
    for live, expected in ((False, {"recontextualization": 20, "property modification": 5}),
                           (True, {"recontextualization": 10, "accessorization": 10, "property modification": 5})):
        cases = protocol.prompt_cases(live)
        assert len(cases) == 25
        assert {c: sum(x.category == c for x in cases) for c in expected} == expected
        assert all(c.text("zwx", "dog").count("zwx dog") == 1 for c in cases)
        assert all("zwx" not in c.without_identifier("dog") and "dog" in c.without_identifier("dog") for c in cases)
    assert protocol.prompt_cases(True)[10].text("zwx", "dog") == "a zwx dog wearing a red hat"
    assert protocol.prompt_cases(False)[-1].text("zwx", "can") == "a cube shaped zwx can"
    assert protocol.IMAGES_PER_PROMPT == 4


# dreambooth evaluate, end to end


def test_evaluate_dreambench_writes_the_full_report_and_rescoring_the_images_agrees(tiny_model, instance_dir,
                                                                                     backbones, tmp_path):
    common = dict(real_images=str(instance_dir), subject="dog", identifier="zwx", bootstrap_resamples=200,
                  **backbones)
    report = evaluate(model=str(tiny_model), images_per_prompt=2, class_images=3, num_inference_steps=2,
                      batch_size=4, output_dir=str(tmp_path / "eval"), **common)
    out = tmp_path / "eval"
    assert set(report["metrics"]) == METRICS
    for m in report["metrics"].values():
        assert m["ci95"][0] <= m["value"] <= m["ci95"][1]
    assert report["metrics"]["dino"]["units"] == 50 and report["metrics"]["pres"]["units"] == 3
    assert report["metrics"]["div"]["units"] == 25 and report["metrics"]["div"]["unit"] == "prompt"
    assert report["subject"] == {"name": "dog", "class_noun": "dog", "identifier": "zwx", "live": True}
    assert set(report["per_category"]) == {"recontextualization", "accessorization", "property modification"}
    assert set(report["per_category"]["accessorization"]) == METRICS - {"pres"}
    assert len(report["per_prompt"]) == 25
    assert report["per_prompt"][0]["prompt"] == "a zwx dog in the jungle"
    assert report["per_prompt"][0]["scored_text"] == "a dog in the jungle"
    assert set(report["reference"]) == {"real images of this subject (mean over distinct pairs)",
                                        "DreamBooth (Stable Diffusion), paper Table 1", "real images, paper Table 1"}
    assert any("CLIP backbone" in n for n in report["notes"])
    # the files
    assert json.loads((out / "report.json").read_text())["metrics"] == report["metrics"]
    md = (out / "report.md").read_text()
    assert "| dino |" in md and "0.668" in md and "accessorization" in md
    assert sorted(p.name for p in (out / "images").iterdir()) == [*(f"{i:02d}" for i in range(25)), "class",
                                                                  "prompts.json"]
    assert len(list((out / "images" / "07").glob("*.png"))) == 2
    assert len(list((out / "images" / "class").glob("*.png"))) == 3
    assert len(list((out / "grids").glob("*.png"))) == 25
    # the same images read back from disk score the same
    again = evaluate(images_dir=str(out / "images"), output_dir=str(tmp_path / "again"), **common)
    for name, m in report["metrics"].items():
        assert again["metrics"][name]["value"] == pytest.approx(m["value"], abs=1e-4)
    # images made for other prompts are refused, not scored against the wrong text
    with pytest.raises(DreamBoothError, match="was sampled for 'a zwx dog in the jungle'"):
        evaluate(images_dir=str(out / "images"), output_dir=str(tmp_path / "other"),
                 **{**common, "identifier": "qek"})


def test_evaluate_an_object_subject_without_lpips_skips_div_and_says_so(tiny_model, instance_dir, backbones,
                                                                        tmp_path):
    report = evaluate(model=str(tiny_model), real_images=str(instance_dir), class_noun="toy", identifier="zwx",
                      images_per_prompt=2, class_images=2, num_inference_steps=1, output_dir=str(tmp_path / "e"),
                      dino_model=backbones["dino_model"], clip_model=backbones["clip_model"],
                      bootstrap_resamples=100)
    assert set(report["metrics"]) == METRICS - {"div"}
    assert set(report["per_category"]) == {"recontextualization", "property modification"}
    assert any("DIV was not computed" in n for n in report["notes"])


@pytest.mark.parametrize("family", list(TOY_MODELS))
def test_evaluate_toy_backend_offline_on_the_bundled_model(tmp_path, capsys, family):
    code = main(["evaluate", "--backend", "toy", "--subject", "circle", "--model", str(TOY_MODELS[family].path),
                 "--identifier",
                 "zq", "--images_per_prompt", "3", "--class_images", "4", "--num_inference_steps", "8",
                 "--output_dir", str(tmp_path / "toy")])
    assert code == 0
    report = json.loads((tmp_path / "toy" / "report.json").read_text())
    assert set(report["metrics"]) == {"subject", "prompt", "pres", "div", "leak"}
    assert report["metrics"]["subject"]["analogue_of"] == "DINO / CLIP-I"
    assert report["metrics"]["subject"]["value"] < 0.2  # the base model has never seen the two-tone subject
    assert report["metrics"]["prompt"]["value"] > 0.5  # but draws the class and the named attributes
    assert len(report["per_prompt"]) == 7 and report["per_prompt"][0]["prompt"] == "a zq circle on a white background"
    assert (report["sampling"]["sampler"], report["sampling"]["guidance_scale"]) == toy_sampling(family)[::2]
    assert report["sampling"].get("max_sequence_length") == toy_options(family).get("max_sequence_length")
    assert len(list((tmp_path / "toy" / "grids").glob("*.png"))) == 7
    assert "subject" in capsys.readouterr().out


def test_train_with_eval_scores_the_trained_model(base_args, backbones, tmp_path):
    from dreambooth.training import train

    (tmp_path / "eval.toml").write_text("\n".join([
        f'dino_model = "{backbones["dino_model"]}"', f'clip_model = "{backbones["clip_model"]}"',
        "images_per_prompt = 2", "class_images = 2", "num_inference_steps = 1", "bootstrap_resamples = 100"]))
    summary = train(base_args(max_train_steps=2, eval=True, eval_config=str(tmp_path / "eval.toml")))
    report = json.loads((tmp_path / "out" / "evaluation" / "report.json").read_text())
    assert report["subject"]["identifier"] == "zwx" and report["subject"]["class_noun"] == "dog"
    assert report["source"]["model"] == str(tmp_path / "out")
    assert summary["evaluation"]["dino"]["value"] == report["metrics"]["dino"]["value"]
    assert "evaluation" in json.loads((tmp_path / "out" / "run_summary.json").read_text())


@pytest.mark.parametrize("args, message", [
    (["--model", "M", "--images_dir", "I"], "exactly one of --model"),
    (["--model", "M", "--subject", "dragon"], "a DreamBench subject"),
    (["--model", "M", "--backend", "toy", "--subject", "dog"], "needs a toy subject"),
    (["--images_dir", "IMAGES", "--class_noun", "dog", "--identifier", "zwx"], "real_images"),
])
def test_evaluate_bad_input_is_one_line(args, message, tmp_path, capsys):
    (tmp_path / "IMAGES").mkdir()
    args = [str(tmp_path / a) if a in ("IMAGES",) else a for a in args]
    code = main(["evaluate", *args, "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err


def test_evaluate_keeps_a_folder_it_did_not_write(tmp_path, instance_dir, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code = main(["evaluate", "--backend", "toy", "--subject", "circle", "--model", str(TOY_MODELS["sd"].path),
                 "--identifier", "zq", "--output_dir", str(tmp_path / "mine")])
    assert code == 2 and "not written by `dreambooth evaluate`" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_evaluate_names_a_missing_backbone_and_a_short_images_folder(tmp_path, instance_dir, backbones, capsys):
    images = tmp_path / "images"
    images.mkdir()
    code = main(["evaluate", "--images_dir", str(images), "--real_images", str(instance_dir), "--class_noun",
                 "dog", "--identifier", "zwx", "--dino_model", str(tmp_path / "no-dino"), "--output_dir",
                 str(tmp_path / "o1")])
    err = capsys.readouterr().err
    assert code == 2 and "--dino_model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o1").exists()  # failed before its inputs loaded: the folder it made is gone again
    code = main(["evaluate", "--images_dir", str(images), "--real_images", str(instance_dir),
                 "--class_noun", "dog", "--identifier", "zwx", "--dino_model", backbones["dino_model"],
                 "--clip_model", backbones["clip_model"], "--output_dir", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 2 and "00" in err and "needs 2 or more" in err


def test_evaluate_summary_pools_the_unit_scores_of_several_reports(tmp_path, capsys):
    def report(backend: str, values: list[float]) -> dict:
        return {"backend": backend, "metrics": {"subject": {"value": float(np.mean(values))}},
                "per_prompt": [{"unit_scores": {"subject": values[:1]}}, {"unit_scores": {"subject": values[1:]}}],
                "class_prompt": {"unit_scores": {"pres": [0.25]}}}

    paths = []
    for i, (backend, values) in enumerate([("toy", [0.0, 1.0]), ("toy", [1.0, 1.0, 1.0, 1.0]),
                                           ("dreambench", [0.5, 0.5])]):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "report.json").write_text(json.dumps(report(backend, values)))
        paths.append(str(tmp_path / f"r{i}"))
    assert main(["evaluate-summary", *paths[:2], "--output", str(tmp_path / "all.json")]) == 0
    summary = json.loads((tmp_path / "all.json").read_text())
    assert summary["metrics"]["subject"]["value"] == pytest.approx(5 / 6)  # pooled over 6 images, not 2 means
    assert summary["metrics"]["subject"]["units"] == 6 and summary["metrics"]["pres"]["value"] == 0.25
    assert len(summary["per_report"]) == 2
    capsys.readouterr()
    assert main(["evaluate-summary", *paths]) == 2
    assert "different backends" in capsys.readouterr().err


def test_toy_backend_on_a_family_without_a_toy_model_samples_with_the_familys_defaults(tmp_path):
    """The SD toy's dpm++ is no sampler for Flux: a family with no toy model samples as `generate` does."""
    from dreambooth.families import FAMILIES
    from tiny import make_tiny_flux

    model = make_tiny_flux(tmp_path / "flux")
    assert main(["evaluate", "--backend", "toy", "--subject", "circle", "--model", str(model), "--identifier", "zq",
                 "--images_per_prompt", "2", "--class_images", "1", "--num_inference_steps", "1", "--resolution",
                 "32", "--max_sequence_length", "8", "--device", "cpu", "--output_dir", str(tmp_path / "e")]) == 0
    sampling = json.loads((tmp_path / "e" / "report.json").read_text())["sampling"]
    flux = FAMILIES["flux"]
    assert (sampling["sampler"], sampling["guidance_scale"]) == (flux.default_sampler, flux.default_guidance)
