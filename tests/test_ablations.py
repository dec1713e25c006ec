"""`dreambooth reproduce`: planning, statistics, verdicts, the report, and a quick run on the bundled toy model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth import cli, schema
from dreambooth.evaluation.backends import BACKENDS, Subject
from dreambooth.evaluation.metrics import t_interval
from dreambooth.sampling import SAMPLERS
from dreambooth.toy.ablation_report import command_line, docs_targets, verdict
from dreambooth.toy.ablations import QUICK, ReproduceConfig, Variant, noun_for, plan, studies_of, variant_name
from dreambooth.toy.measure import toy_sampling
from dreambooth.toy.subjects import SUBJECTS


def test_t_interval_matches_students_t():
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, df=2) * sd / sqrt(n)
    assert mean == 2.0 and low == pytest.approx(2.0 - half) and high == pytest.approx(2.0 + half)
    one = t_interval([0.5])
    assert one[0] == 0.5 and math.isnan(one[1]) and math.isnan(one[2])
    assert t_interval([0.4] * 6)[1:] == pytest.approx((0.4, 0.4))


@pytest.mark.parametrize(("diff", "expected"), [
    ({"mean": 0.3, "low": 0.1, "high": 0.5}, "reproduces"),
    ({"mean": 0.1, "low": -0.1, "high": 0.3}, "same direction, not significant"),
    ({"mean": -0.1, "low": -0.3, "high": 0.1}, "opposite direction, not significant"),
    ({"mean": -0.3, "low": -0.5, "high": -0.1}, "opposite direction: does not reproduce"),
    ({"mean": 0.2, "low": float("nan"), "high": float("nan")}, "same direction (one unit: no interval)"),
    ({"mean": 0.0, "low": 0.0, "high": 0.0}, "no difference: every unit measured 0"),
    ({"mean": float("nan"), "low": float("nan"), "high": float("nan")}, "not measured (re-run the runs that lack "
     "this metric)"),
])
def test_verdict(diff, expected):
    assert verdict(diff) == expected


def test_plan_runs_a_shared_variant_once_and_shares_class_images(tmp_path):
    cfg = schema.build(ReproduceConfig, {"subjects": ["circle", "square"], "seeds": [0, 3]})
    jobs = plan(cfg, "model-dir", {"circle": "jox", "square": "kp"}, tmp_path)
    variants = {j.variant for j in jobs}
    # prior: 2; class noun: 5, of which "correct" and "correct_ppl" are prior's two; images: 5, of which 5 images is
    # prior's "with" -> 9 distinct variants
    assert len(variants) == 9 and len(jobs) == 9 * 4
    assert len({j.folder for j in jobs}) == len(jobs)
    by = {(variant_name(j.variant), j.subject, j.seed): j for j in jobs}
    wrong = by[("no_ppl-wrong-5img", "circle", 3)].train
    assert wrong["instance_prompt"] == "a jox square" and wrong["with_prior_preservation"] is False
    assert wrong["class_data_dir"] is None and wrong["seed"] == 3
    wrong_ppl = by[("ppl-wrong-5img", "circle", 0)].train
    assert wrong_ppl["class_prompt"] == "a square"  # the wrong noun's own prior is what is preserved
    assert wrong_ppl["class_data_dir"] == by[("ppl-correct-5img", "square", 0)].train["class_data_dir"]
    assert by[("no_ppl-none-5img", "square", 0)].train["instance_prompt"] == "a kp"
    assert by[("no_ppl-none-5img", "square", 0)].evaluate["class_noun"] == ""
    one = by[("ppl-correct-1img", "circle", 0)]
    assert one.variant.images == 1 and one.train["class_prompt"] == "a circle"
    assert one.train["class_data_dir"] == by[("ppl-correct-5img", "circle", 3)].train["class_data_dir"]
    assert one.settings() != by[("ppl-correct-5img", "circle", 0)].settings()
    assert {j.train["max_train_steps"] for j in jobs} == {cfg.max_train_steps}


def test_studies_beyond_the_paper_run_when_named_and_share_the_paper_runs(tmp_path):
    from dreambooth.toy.ablations import write_instance_images

    default = schema.build(ReproduceConfig, {})
    assert set(studies_of(default)) == {"prior", "class_noun", "num_images"}  # docs/ablations.md's command as before
    cfg = schema.build(ReproduceConfig, {"subjects": ["circle"], "seeds": [1],
                                         "studies": ["prior_target", "ema", "masked_loss"]})
    jobs = plan(cfg, "model-dir", {"circle": "jox"}, tmp_path)
    by = {variant_name(j.variant): j for j in jobs}
    # class images, no prior, base model (two ways), EMA, masked (two ways): the paper's two variants are shared
    assert sorted(by) == ["no_ppl-correct-5img", "no_ppl-correct-5img-masked", "no_ppl-correct-5img-masked_bg0.1",
                          "ppl-correct-5img", "ppl-correct-5img-base_model", "ppl-correct-5img-base_model_no_images",
                          "ppl-correct-5img-ema"]
    assert by["no_ppl-correct-5img-masked_bg0.1"].train["mask_background_weight"] == 0.1
    no_images = by["ppl-correct-5img-base_model_no_images"].train
    assert no_images["prior_target"] == "base_model" and no_images["class_data_dir"] is None
    assert no_images["class_prompt"] == "a circle" and no_images["with_prior_preservation"] is True
    assert by["ppl-correct-5img-base_model"].train["class_data_dir"] == by["ppl-correct-5img"].train["class_data_dir"]
    ema = by["ppl-correct-5img-ema"]
    assert ema.train["use_ema"] is True and ema.evaluate["model"].endswith("model/ema")  # the average is scored
    assert "use_ema" not in by["ppl-correct-5img"].train  # the paper's runs keep their settings (and results)
    masked = by["no_ppl-correct-5img-masked"]
    assert masked.train["masked_loss"] is True
    write_instance_images(masked)
    folder = Path(masked.train["instance_data_dir"])
    for i in range(5):
        img = np.asarray(Image.open(folder / f"circle-{i}.png"), dtype=np.float64)
        mask = np.asarray(Image.open(folder / f"circle-{i}-masklabel.png"))
        background = np.median(np.concatenate([img[0], img[-1]]), axis=0)  # the border is background
        differs = np.abs(img - background).sum(axis=2) > 60
        # the mask covers exactly the pixels that differ from the background (edges anti-aliased in both)
        assert (differs == (mask > 127)).mean() > 0.97 and mask.max() == 255 and mask.min() == 0


def test_sd3_plan_adds_the_sigma_weighting_study_and_samples_like_the_toy_model(tmp_path):
    cfg = schema.build(ReproduceConfig, {"family": "sd3", "subjects": ["circle"], "seeds": [0]})
    assert studies_of(cfg) == ["prior", "class_noun", "num_images", "flow_weighting"]
    cfg = schema.build(ReproduceConfig, {"family": "sd3", "studies": ["prior", "flow_weighting"],
                                         "subjects": ["circle"], "seeds": [0]})
    jobs = plan(cfg, "model-dir", {"circle": "jox"}, tmp_path)
    # logit-normal (the SD3 family's default) with and without the prior loss are the prior study's own two runs
    assert sorted(variant_name(j.variant) for j in jobs) == ["no_ppl-correct-5img", "no_ppl-correct-5img-none",
                                                             "ppl-correct-5img", "ppl-correct-5img-none"]
    for j in jobs:  # class images as the SD3 toy model samples: a flow sampler, its steps and guidance
        assert (j.train["class_sampler"], j.train["class_inference_steps"], j.train["class_guidance_scale"]) == \
            toy_sampling("sd3") and j.train["class_sampler"] in SAMPLERS["flow"].names()
        assert j.train["max_sequence_length"] == 1
        assert j.train.get("weighting_scheme") == j.variant.weighting  # unset: the family's default
    assert docs_targets(tmp_path, "sd3") == (tmp_path / "ablations-sd3.md", tmp_path / "ablations-sd3.png")


def test_steps_per_image_scales_each_runs_steps(tmp_path):
    cfg = schema.build(ReproduceConfig, {"studies": ["num_images"], "subjects": ["circle"], "seeds": [0],
                                         "steps_per_image": 80})
    jobs = plan(cfg, "model-dir", {"circle": "jox"}, tmp_path)
    assert sorted((j.variant.images, j.train["max_train_steps"]) for j in jobs) == [(n, 80 * n) for n in range(1, 6)]


def test_wrong_noun_is_another_class_of_the_world():
    for subject in SUBJECTS.values():
        wrong = noun_for(subject, Variant(noun="wrong"))
        assert wrong and wrong != subject.cls
        assert noun_for(subject, Variant(noun="none")) == ""


def test_toy_prompts_use_the_trained_noun_but_judge_the_true_class():
    backend = BACKENDS["toy"]("circle")
    cases = backend.cases(Subject("circle", "", "jox"))
    assert cases[0].prompt == "a jox on a white background" and cases[0].text == "a circle on a white background"
    assert backend.class_prompt(Subject("circle", "square", "jox")) == "a square"
    drawn = SUBJECTS["circle"].instance_images(2)
    scores = backend.score(cases[0], [Image.fromarray(a) for a in drawn])
    assert scores["subject"].min() > 0.5  # the real subject still scores, whatever noun the prompt used


def test_command_line_names_only_what_differs():
    cfg = schema.build(ReproduceConfig, {**QUICK, "quick": True, "studies": ["prior"], "max_train_steps": 100})
    assert command_line(cfg) == "dreambooth reproduce --studies prior --max_train_steps 100 --quick"
    assert command_line(schema.build(ReproduceConfig, {"docs_dir": "docs"})) == "dreambooth reproduce --docs_dir docs"


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert cli.main(["reproduce", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not written by `dreambooth reproduce`" in err and "Traceback" not in err
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert cli.main(["reproduce", "--studies", "prior", "bogus", "--output_dir", str(tmp_path / "a")]) == 2
    assert "choose one of prior, class_noun, num_images, flow_weighting" in capsys.readouterr().err
    assert cli.main(["reproduce", "--studies", "flow_weighting", "--output_dir", str(tmp_path / "c")]) == 2
    assert "a study of sd3 models; pass --family accordingly" in capsys.readouterr().err
    assert cli.main(["reproduce", "--model", str(tmp_path / "none"), "--output_dir", str(tmp_path / "b")]) == 2
    assert "holds no toy pipeline" in capsys.readouterr().err


def test_quick_run_reproduces_the_prior_preservation_direction(tmp_path):
    out = tmp_path / "repro"
    # half of --quick's steps and evaluation images (with all of them the two runs' PRES were 0.87 and 0.10; at
    # 100 steps and half the images, 0.94 and 0.26)
    argv = ["reproduce", "--quick", "--studies", "prior", "--device", "cpu", "--output_dir", str(out),
            "--images_per_prompt", "4", "--class_images", "8", "--max_train_steps", "100"]
    assert cli.main(argv) == 0
    summary = json.loads((out / "ablations.json").read_text())
    prior = summary["studies"]["prior"]
    with_ppl, without = (prior["variants"][k]["metrics"] for k in ("ppl", "no_ppl"))
    # the paper's Table 3 direction: the prior-preservation loss lowers drift (PRES)
    assert with_ppl["pres"]["mean"] < without["pres"]["mean"]
    pres_claim = next(c for c in prior["claims"] if c["metric"] == "pres")
    assert pres_claim["difference"]["mean"] == pytest.approx(without["pres"]["mean"] - with_ppl["pres"]["mean"])
    assert summary["command"] == (f"dreambooth reproduce --output_dir {out} --studies prior --max_train_steps 100 "
                                  "--images_per_prompt 4 --class_images 8 --device cpu --quick")
    md = (out / "ablations.md").read_text()
    assert "| with prior preservation |" in md and "0.493" in md and "![ablations](ablations.png)" in md
    assert (out / "ablations.png").stat().st_size > 10_000
    for run in ("ppl-correct-5img", "no_ppl-correct-5img"):
        result = json.loads((out / "runs" / run / "circle-seed0" / "result.json").read_text())
        # (and the judges of the subjects it was not: the subjects study's bleed)
        assert set(result["metrics"]) == {"subject", "prompt", "pres", "div", "leak", "bleed", "bleed_next",
                                          "class_bleed"}
        assert not (out / "runs" / run / "circle-seed0" / "model").exists()  # weights dropped unless --keep_models

    # a second call reuses the finished runs and gives the same figures
    assert cli.main(argv) == 0
    md = (out / "ablations.md").read_text()
    assert "This call ran 0 of them" in md and "reused 2 from earlier calls" in md
    again = json.loads((out / "ablations.json").read_text())
    assert again["studies"] == summary["studies"]
    assert np.isclose(again["train_time_s"], summary["train_time_s"])


def test_the_adapter_study_trains_each_kind_at_its_rank_and_reports_sizes(tmp_path):
    from dreambooth.config import TrainConfig
    from dreambooth.toy.ablation_report import markdown, summarize
    from dreambooth.toy.ablations import STUDIES

    cfg = schema.build(ReproduceConfig, {"studies": ["adapters"], "subjects": ["circle"], "seeds": [0, 1]})
    jobs = plan(cfg, "model-dir", {"circle": "jox"}, tmp_path)
    by = {(variant_name(j.variant), j.seed): j.train for j in jobs}
    assert sorted({name for name, _ in by}) == ["ppl-correct-5img-loha1", "ppl-correct-5img-lokr8f4",
                                               "ppl-correct-5img-lora2", "ppl-correct-5img-lora8"]
    lokr = by[("ppl-correct-5img-lokr8f4", 0)]
    assert (lokr["adapter"], lokr["rank"], lokr["lora_alpha"], lokr["lokr_factor"]) == ("lokr", 8, 8, 4)
    assert lokr["use_lora"] is True and lokr["learning_rate"] == lokr["text_encoder_lr"] == 5e-3
    assert "lokr_factor" not in by[("ppl-correct-5img-loha1", 1)]
    schema.build(TrainConfig, {k: v for k, v in lokr.items() if v is not None})  # options TrainConfig takes
    sizes = {"lora2": 24576, "lokr8f4": 25664, "loha1": 24576, "lora8": 98304}
    results = {j.folder: {"metrics": {"subject": 0.5, "prompt": 0.9, "pres": 0.1, "div": 0.4}, "wall_time_s": 1.0,
                          "adapter_params": sizes[variant_name(j.variant).rpartition("-")[2]], "adapter_kb": 99.0}
               for j in jobs}
    summary = summarize(cfg, jobs, results, {"circle": "jox"})
    summary.update(reused_runs=0, wall_time_s=1.0)
    md = markdown(summary, None)
    assert "| adapter parameters | file (KB) |" in md and "| LoKr, factor 4, rank 8 |" in md and "25,664 | 99 |" in md
    assert STUDIES["adapters"].families == ("sd",)


def test_the_subjects_study_trains_companions_beside_the_unit_and_judges_their_bleed(tmp_path):
    """A multi-subject run trains the unit's subject with its twin (same class, same class images) and/or the next
    class's subject (its own class images), each with its own identifier and photos, for the single run's steps per
    subject; bleed is each companion's judge on the unit's evaluation images."""
    from dreambooth.config import TrainConfig
    from dreambooth.toy.ablations import bleed, write_instance_images
    from dreambooth.toy.subjects import TWINS

    cfg = schema.build(ReproduceConfig, {"studies": ["subjects"], "subjects": ["circle"], "seeds": [0]})
    ids = {"circle": "jox", "circle/twin": "vyb", "circle/next": "zq"}
    jobs = {variant_name(j.variant): j for j in plan(cfg, "model-dir", ids, tmp_path)}
    assert len(jobs) == 7
    three = jobs["ppl-correct-5img-with-twin-next"]
    twin, other = three.train["subjects"]
    assert three.train["max_train_steps"] == 3 * jobs["ppl-correct-5img"].train["max_train_steps"]
    assert (twin["instance_prompt"], twin["identifier"]) == ("a vyb circle", "vyb") and "class_prompt" not in twin
    assert (other["instance_prompt"], other["class_prompt"]) == ("a zq square", "a square")
    assert other["class_data_dir"] == str(tmp_path / "class-images" / "square")
    assert "class_prompt" not in jobs["no_ppl-correct-5img-with-next"].train["subjects"][0]
    config = schema.build(TrainConfig, {k: v for k, v in three.train.items() if v is not None})
    assert [s.identifier for s in config.subjects] == ["vyb", "zq"]
    write_instance_images(three)
    assert len(list(Path(twin["instance_data_dir"]).glob("circle-twin-*.png"))) == 5

    # the twin's own photos as a unit's evaluation images: all twin, nothing of the next subject
    images = tmp_path / "images"
    for folder, scenes in (("00", TWINS["circle"].instance_images(4)),
                           ("class", SUBJECTS["circle"].instance_images(2))):
        (images / folder).mkdir(parents=True)
        for i, img in enumerate(scenes):
            Image.fromarray(img).save(images / folder / f"{i:02d}.png")
    found = bleed("circle", images)
    assert found["bleed"] > 0.9 and found["bleed_next"] == 0.0 and found["class_bleed"] == 0.0


def test_companions_get_identifiers_that_share_no_piece_with_the_units():
    from transformers import CLIPTokenizer

    from dreambooth.identifier import shared_pieces
    from dreambooth.toy.demo import pick_identifier
    from dreambooth.toy.models import TOY_MODELS
    from dreambooth.toy.reproduce import companion_identifiers

    model = str(TOY_MODELS["sd"].path)
    cfg = schema.build(ReproduceConfig, {"studies": ["subjects"], "subjects": ["circle"], "seeds": [0]})
    own = {"circle": pick_identifier(model, "circle")}
    found = companion_identifiers(cfg, model, own)
    assert sorted(found) == ["circle/next", "circle/twin"]
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    assert shared_pieces({"text_encoder": tokenizer}, [own["circle"], *found.values()]) == []
    assert companion_identifiers(schema.build(ReproduceConfig, {"studies": ["prior"]}), model, own) == {}
