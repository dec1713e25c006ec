"""`dreambooth reproduce`: the paper's ablations, re-run on the toy world.

Each study is a set of variants of the demo's recipe. Every variant is trained from the same base model for every
(subject, seed) and scored by `dreambooth evaluate --backend toy`. A (subject, seed) pair is the unit: its variants
share instance images, identifier and evaluation seeds, so differences between variants are paired, and the
intervals in the report are over units (`ablation_report.py`).

A run that finished is not run again: its folder keeps `result.json` with the settings it was made with, so a
killed `reproduce` continues where it stopped and a changed setting re-runs only what it changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from PIL import Image

from .. import schema
from ..data.annotations import MASK_SUFFIX
from ..ema import EMA_FOLDER
from ..errors import ConfigError, DreamBoothError
from ..files import write_text_atomic
from ..schema import at_least, option, positive
from .measure import toy_train_settings
from .models import TOY_MODELS, family_help
from .subjects import SUBJECTS, TWINS, Subject, next_subject
from .world import CLASSES, prompt

log = logging.getLogger("dreambooth")
MARKER = "reproduce.json"  # a folder holding this was written by `reproduce`, whose runs it may reuse
RESULT = "result.json"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of training: the demo's recipe with prior preservation on or off, a class noun (the subject's own,
    none, or a wrong one), the first `images` of the unit's five instance images and, for flow-matching models, a
    sigma weighting scheme (None: the family's default). Beyond the paper: the prior's target (`--prior_target`;
    `class_images=False`: the base model's prediction on the instance images, no class image made), EMA weights
    (trained with --use_ema, scored on output_dir/ema) and the masked loss (the subject's masks beside its images)."""

    prior: bool = True
    noun: str = "correct"  # "correct", "none" or "wrong"
    images: int = 5
    weighting: str | None = None
    prior_target: str = "class_images"
    class_images: bool = True
    ema: bool = False
    masked: bool = False
    mask_background: float = 0.0  # --mask_background_weight of a masked run
    adapter: str | None = None  # lora, lokr or loha (--adapter) at `rank` (alpha = rank) instead of full fine-tuning
    rank: int = 0
    lokr_factor: int = -1
    # subjects trained in the same run beside the unit's ("twin": its class's other subject, "next": the next
    # class's subject), each with its own identifier; the run trains max_train_steps per subject
    companions: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Claim:
    """What the paper reports: `metric` is higher for variant `high` than for `low`."""

    metric: str
    high: str
    low: str
    text: str


@dataclasses.dataclass(frozen=True)
class Study:
    title: str
    variants: dict[str, tuple[str, Variant]]  # key -> (label, variant); the first is the reference
    metrics: tuple[str, ...]  # the toy metrics the table shows
    paper: dict[str, dict[str, float]]  # variant key -> the paper's figures, by toy-metric name
    paper_source: str
    claims: tuple[Claim, ...]
    families: tuple[str, ...] = ("sd", "sd3")  # the toy model families it applies to
    default: bool = True  # run without --studies (the paper's ablations); the others are asked for by name
    timed: bool = False  # the table adds each variant's training time
    sized: bool = False  # the table adds each variant's adapter parameters and file size


WITH_PPL, WITHOUT_PPL = Variant(), Variant(prior=False)
STUDIES = {
    "prior": Study(
        "Prior-preservation loss (paper Table 3)",
        {"ppl": ("with prior preservation", WITH_PPL), "no_ppl": ("without prior preservation", WITHOUT_PPL)},
        ("subject", "prompt", "pres", "div"),
        {"ppl": {"pres": 0.493, "div": 0.391}, "no_ppl": {"pres": 0.664, "div": 0.371}},
        "Ruiz et al. 2023, Table 3 (Imagen): PRES and DIV; subject fidelity is a little lower with the loss",
        (Claim("pres", "no_ppl", "ppl", "the loss lowers PRES (less language drift)"),
         Claim("div", "ppl", "no_ppl", "the loss raises DIV"),
         Claim("subject", "no_ppl", "ppl", "at a small cost in subject fidelity"))),
    "class_noun": Study(
        "Class noun in the instance prompt (paper Table 4)",
        {"correct": ('correct class noun, "a [V] [class]"', WITHOUT_PPL),
         "none": ('no class noun, "a [V]"', Variant(prior=False, noun="none")),
         "wrong": ('wrong class noun, "a [V] [other class]"', Variant(prior=False, noun="wrong")),
         # with the prior-preservation loss the wrong noun's own prior is held in place while the subject is learnt
         "correct_ppl": ("correct class noun, with prior preservation", WITH_PPL),
         "wrong_ppl": ("wrong class noun, with prior preservation", Variant(noun="wrong"))},
        ("subject", "prompt"),
        {"correct": {"subject": 0.744}, "none": {"subject": 0.303}, "wrong": {"subject": 0.454}},
        "Ruiz et al. 2023, Table 4: DINO subject fidelity (the paper does not say whether these runs used the "
        "prior-preservation loss; the toy runs both ways, and \"no class noun\" has no class prompt to preserve)",
        (Claim("subject", "correct", "none", "the correct class noun beats no class noun"),
         Claim("subject", "correct", "wrong", "the correct class noun beats a wrong one"),
         Claim("subject", "wrong", "none", "a wrong class noun still beats none (0.454 vs 0.303)"),
         Claim("subject", "correct_ppl", "wrong_ppl", "the correct class noun beats a wrong one, with prior "
               "preservation"))),
    "num_images": Study(
        "Number of instance images (paper supplement)",
        {f"images_{n}": (f"{n} image{'s' if n > 1 else ''}", Variant(images=n)) for n in range(1, 6)},
        ("subject", "prompt", "div"),
        {},
        "Ruiz et al. 2023, supplementary material: subject fidelity grows with the number of input images up to "
        "about four (direction only; no figures are quoted here)",
        (Claim("subject", "images_2", "images_1", "two images beat one"),
         Claim("subject", "images_4", "images_1", "four images beat one"),
         Claim("subject", "images_4", "images_2", "four images beat two"))),
    "flow_weighting": Study(
        "Sigma density of rectified flow, with and without prior preservation (flow-matching models only)",
        # logit-normal is SD3's default: those runs are the prior study's own
        {"logit_ppl": ("logit-normal sigma, prior preservation", WITH_PPL),
         "uniform_ppl": ("uniform sigma, prior preservation", Variant(weighting="none")),
         "logit_no_ppl": ("logit-normal sigma, no prior preservation", WITHOUT_PPL),
         "uniform_no_ppl": ("uniform sigma, no prior preservation", Variant(prior=False, weighting="none"))},
        ("subject", "prompt", "pres", "div"),
        {},
        "No paper figure: SD3's reference scripts default to logit-normal sigma (Esser et al. 2024), Flux's to "
        "uniform; the question is whether Table 3's prior-preservation effect holds under both",
        (Claim("pres", "logit_no_ppl", "logit_ppl", "the prior loss lowers PRES, logit-normal sigma"),
         Claim("pres", "uniform_no_ppl", "uniform_ppl", "the prior loss lowers PRES, uniform sigma"),
         Claim("subject", "logit_ppl", "uniform_ppl", "logit-normal sigma learns the subject better than uniform"),
         Claim("div", "logit_ppl", "logit_no_ppl", "the prior loss raises DIV, logit-normal sigma")),
        families=("sd3",)),
    # beyond the paper: what today's trainers add, each measured (docs/beyond-the-paper.md)
    "prior_target": Study(
        "The prior's target: generated class images, or the frozen base model's own prediction",
        {"class_images": ("class images (the paper's loss)", WITH_PPL),
         "base_model": ("base model's prediction, class images as inputs", Variant(prior_target="base_model")),
         "base_model_no_images": ("base model's prediction, instance images as inputs (no class images)",
                                  Variant(prior_target="base_model", class_images=False)),
         "none": ("no prior preservation", WITHOUT_PPL)},
        ("subject", "prompt", "pres", "div"),
        {},
        "No paper figure: sd-scripts' Differential Output Preservation, OneTrainer's prior prediction and "
        "ai-toolkit's diff_output_preservation train the class prompt towards the frozen model's own prediction "
        "instead of towards generated class images (`--prior_target base_model`)",
        (Claim("pres", "none", "base_model_no_images", "the base model's prediction, without any class image, "
               "lowers PRES"),
         Claim("subject", "base_model_no_images", "class_images", "it costs less subject fidelity than the "
               "paper's loss"),
         Claim("subject", "base_model", "class_images", "with class images as inputs too"),
         Claim("pres", "base_model_no_images", "class_images", "the paper's loss holds the prior better (its PRES "
               "is lower)")),
        default=False, timed=True),
    "ema": Study(
        "EMA of the trained weights",
        {"ema": ("EMA weights (--use_ema, defaults)", Variant(ema=True)), "raw": ("raw weights", WITH_PPL)},
        ("subject", "prompt", "pres", "div"),
        {},
        "No paper figure: an exponential moving average of the weights (warm-up decay 1 - (1 + step) ** -2/3, "
        "about 0.98 at step 400), scored against the same run's raw weights",
        (Claim("subject", "ema", "raw", "EMA weights render the subject better"),
         Claim("prompt", "ema", "raw", "EMA weights follow the prompt better"),
         Claim("pres", "raw", "ema", "EMA weights drift less")),
        default=False),
    "masked_loss": Study(
        "Masked loss: only the subject's pixels are learnt",
        {"masked": ("masked loss (the subject's masks)", Variant(prior=False, masked=True)),
         "masked_bg": ("masked loss, background weight 0.1", Variant(prior=False, masked=True, mask_background=0.1)),
         "unmasked": ("unmasked loss", WITHOUT_PPL)},
        ("subject", "prompt", "leak"),
        {},
        "No paper figure: each subject's five instance images show only two of the five backgrounds; a masked "
        "loss (`--masked_loss`, no prior preservation in either run) should stop those backgrounds from becoming "
        "part of [V]",
        (Claim("leak", "unmasked", "masked", "the mask stops the instance images' backgrounds leaking into "
               "prompts that name none"),
         Claim("prompt", "masked", "unmasked", "prompts that name a background are followed better"),
         Claim("subject", "masked", "unmasked", "the subject is learnt as well or better"),
         Claim("leak", "unmasked", "masked_bg", "a background weight of 0.1 still stops most of the leak"),
         Claim("prompt", "masked_bg", "masked", "and keeps the background learnt well enough to follow prompts "
               "that name one")),
        default=False),
    "adapters": Study(
        "LoRA, LoKr and LoHa at matched parameter counts",
        # about 25k adapter parameters each on the DDPM toy (UNet attention + text encoder): LoRA rank 2; LoHa rank 1
        # (two rank-1 pairs: LoRA rank 2's count); LoKr with factor 4 and rank 8 (25.7k); and the toy's LoRA recipe
        # (rank 8, 98k) as the reference of what more parameters buy
        {"lora": ("LoRA, rank 2", Variant(adapter="lora", rank=2)),
         "lokr": ("LoKr, factor 4, rank 8", Variant(adapter="lokr", rank=8, lokr_factor=4)),
         "loha": ("LoHa, rank 1", Variant(adapter="loha", rank=1)),
         "lora_recipe": ("LoRA, rank 8 (the toy's LoRA recipe)", Variant(adapter="lora", rank=8))},
        ("subject", "prompt", "pres", "div"),
        {},
        "No paper figure: users report that LoKr learns characters better than LoRA on Z-Image and Flux.2 klein "
        "(OneTrainer#796, kohya_ss#2851). Here every adapter trains at the toy's LoRA rate (5e-3, text-encoder "
        "adapters too) with alpha = rank, with prior preservation, on a parameter budget of about 25k",
        (Claim("subject", "lokr", "lora", "LoKr learns the subject better than LoRA at the same parameter count"),
         Claim("subject", "loha", "lora", "LoHa learns the subject better than LoRA at the same parameter count"),
         Claim("prompt", "lokr", "lora", "LoKr follows prompts better than LoRA"),
         Claim("subject", "lora_recipe", "lora", "four times LoRA's parameters learn the subject better")),
        families=("sd",), default=False, sized=True),
    "subjects": Study(
        "Several subjects in one run: each one's fidelity, and identity bleed between them",
        {"single": ("one subject", WITH_PPL),
         "twin": ("two subjects of one class", Variant(companions=("twin",))),
         "next": ("two subjects of two classes", Variant(companions=("next",))),
         "three": ("three subjects (two of its class, one of another)", Variant(companions=("twin", "next"))),
         "single_no_ppl": ("one subject, no prior preservation", WITHOUT_PPL),
         "twin_no_ppl": ("two subjects of one class, no prior preservation",
                         Variant(prior=False, companions=("twin",))),
         "next_no_ppl": ("two subjects of two classes, no prior preservation",
                         Variant(prior=False, companions=("next",)))},
        ("subject", "prompt", "pres", "bleed", "bleed_next", "class_bleed"),
        {},
        "No paper figure: kohya's concepts and SimpleTuner's datasets train several subjects in one model, and "
        "users report identity bleed between them (OneTrainer#1700). Each unit's subject is scored under its own "
        "identifier; bleed is the judge score of a subject it was not (always the same two per unit: its class's "
        "other subject, its twin, and the next class's subject), so one-subject runs give the floor. A run trains "
        "the single run's steps per subject",
        (Claim("subject", "single", "twin", "a second subject of the same class costs subject fidelity"),
         Claim("subject", "single", "next", "a second subject of another class costs subject fidelity"),
         Claim("subject", "single", "three", "three subjects cost subject fidelity"),
         Claim("bleed", "twin", "single", "the twin trained beside it shows under the subject's identifier"),
         Claim("bleed_next", "next", "single", "a subject of another class shows under its identifier"),
         Claim("bleed", "twin_no_ppl", "twin", "prior preservation lowers the bleed between two subjects of one "
               "class"),
         Claim("class_bleed", "twin_no_ppl", "twin", "prior preservation keeps the twin out of the bare class "
               "prompt"),
         Claim("subject", "twin", "twin_no_ppl", "with prior preservation each of two same-class subjects is "
               "learnt better")),
        families=("sd",), default=False),
}
STUDY_METRICS = {  # metrics the study computes from the evaluation's images (toy judges of other subjects)
    "bleed": ("identity bleed: the twin's (the unit's class's other subject's) judge score of images of the "
              "unit's identifier prompts", "lower"),
    "bleed_next": ("identity bleed: the next class's subject's judge score of images of the unit's identifier "
                   "prompts", "lower"),
    "class_bleed": ("the twin's judge score of images of the bare class prompt", "lower"),
}


@dataclasses.dataclass
class ReproduceConfig:
    output_dir: Path | None = option(None, "Where the runs, tables and plot go (default: reproduce, or "
                                     "reproduce-sd3 for --family sd3)")
    docs_dir: Path | None = option(None, "Also write the tables (ablations.md, or ablations-sd3.md) and plot here")
    docs_name: str | None = option(None, "Name of the tables and plot in --docs_dir, without extension (default: "
                                   "ablations, or ablations-sd3)")
    family: str = option("sd", family_help(), choices=lambda: list(TOY_MODELS))
    studies: list[str] | None = option(None, "Studies to run (default: the paper's studies of the family; "
                                       "prior_target, ema and masked_loss go beyond the paper and run when named)",
                                       choices=lambda: list(STUDIES))
    subjects: list[str] = option(tuple(SUBJECTS), "Toy subjects (units: subjects x seeds)",
                                 choices=lambda: list(SUBJECTS))
    seeds: list[int] = option((0, 1), "Seeds: each draws other instance images, training noise and sampling noise")
    model: str | None = option(None, "Base model (default: the bundled toy model)")
    max_train_steps: int = option(400, "Fine-tuning steps per run", check=at_least(1))
    steps_per_image: int | None = option(None, "Instead of --max_train_steps: this many steps per instance image, so "
                                         "that runs with fewer images see each image as often", check=at_least(1))
    learning_rate: float = option(2e-4, "Fine-tuning learning rate", check=positive)
    train_batch_size: int = option(4, "Instance images per step (as many class images join them)", check=at_least(1))
    prior_loss_weight: float = option(1.0, "Lambda of the prior-preservation loss", check=at_least(0))
    num_class_images: int = option(100, "Class images for prior preservation", check=at_least(1))
    train_text_encoder: bool = option(True, "Also fine-tune the text encoder (as the demo does)")
    images_per_prompt: int = option(16, "Evaluation images per prompt (7 prompts per run)", check=at_least(2))
    class_images: int = option(32, "Evaluation images of the bare class prompt (PRES)", check=at_least(1))
    jobs: int = option(2, "Runs at once, in separate processes; the CPU threads are split between them",
                       check=at_least(1))
    keep_models: bool = option(False, "Keep each run's weights (about 21 MB a run)")
    device: str = option("auto", "Where runs train and sample: auto (the GPU when there is one), cpu or cuda",
                         choices=("auto", "cpu", "cuda"))
    quick: bool = option(False, "A small run for tests and a first look: one subject, one seed, 200 steps, "
                         "fewer class and evaluation images")

    def check(self) -> None:
        for name in self.studies or []:
            if self.family not in STUDIES[name].families:
                raise ConfigError("studies", name, f"a study of {', '.join(STUDIES[name].families)} models; pass "
                                  "--family accordingly")
        if self.quick:
            return
        if len(self.subjects) * len(self.seeds) < 2:
            log.warning("one (subject, seed) unit gives no interval; pass more --subjects or --seeds")


QUICK = {"subjects": ["circle"], "seeds": [0], "max_train_steps": 200, "num_class_images": 50,
         "images_per_prompt": 8, "class_images": 16}


@dataclasses.dataclass(frozen=True)
class Job:
    variant: Variant
    subject: str
    seed: int
    folder: Path
    train: dict[str, Any]
    evaluate: dict[str, Any]
    keep_model: bool

    def settings(self) -> dict[str, Any]:
        return json.loads(json.dumps({"train": self.train, "evaluate": self.evaluate,
                                      "instance_images": self.variant.images}, default=str))


def noun_for(subject: Subject, variant: Variant) -> str:
    if variant.noun == "none":
        return ""
    if variant.noun == "wrong":  # the next class of the world: one the base model draws well, but not this one
        return CLASSES[(CLASSES.index(subject.cls) + 1) % len(CLASSES)]
    return subject.cls


def variant_name(v: Variant) -> str:
    """The run folder's name: the paper's variants keep their names; what goes beyond them adds to the name."""
    extra = [v.weighting] if v.weighting else []
    extra += ["base_model" + ("" if v.class_images else "_no_images")] if v.prior_target == "base_model" else []
    extra += ["ema"] if v.ema else []
    extra += ["masked" + (f"_bg{v.mask_background:g}" if v.mask_background else "")] if v.masked else []
    extra += [f"{v.adapter}{v.rank}" + (f"f{v.lokr_factor}" if v.lokr_factor != -1 else "")] if v.adapter else []
    extra += ["with-" + "-".join(v.companions)] if v.companions else []
    return f"{'ppl' if v.prior else 'no_ppl'}-{v.noun}-{v.images}img" + "".join(f"-{e}" for e in extra)


def studies_of(cfg: ReproduceConfig) -> list[str]:
    return cfg.studies or [name for name, study in STUDIES.items() if cfg.family in study.families and study.default]


def companion(name: str, which: str) -> Subject:
    """A unit subject's companion in a multi-subject run (see `Variant.companions`)."""
    return TWINS[name] if which == "twin" else next_subject(name)


def plan(cfg: ReproduceConfig, model: str, identifiers: dict[str, str], out: Path) -> list[Job]:
    """One job per distinct (variant, subject, seed) over the chosen studies; a variant two studies share runs once.
    `identifiers`: each unit subject's, and each companion's as f"{unit}/{which}" (see `Variant.companions`)."""
    variants = dict.fromkeys(v for study in studies_of(cfg) for _, v in STUDIES[study].variants.values())
    jobs = []
    for variant in variants:
        for name in cfg.subjects:
            subject = SUBJECTS[name]
            noun, v = noun_for(subject, variant), identifiers[name]
            steps = cfg.steps_per_image * variant.images if cfg.steps_per_image else cfg.max_train_steps
            steps *= 1 + len(variant.companions)
            for seed in cfg.seeds:
                folder = out / "runs" / variant_name(variant) / f"{name}-seed{seed}"
                train = {
                    "pretrained_model_name_or_path": model, "instance_data_dir": str(folder / "instance-images"),
                    "instance_prompt": prompt(noun, identifier=v), "identifier": v,
                    "with_prior_preservation": variant.prior,
                    "class_prompt": prompt(noun) if variant.prior else None,
                    "class_data_dir": str(out / "class-images" / noun) if variant.prior and variant.class_images
                    else None,
                    **({"prior_target": variant.prior_target} if variant.prior_target != "class_images" else {}),
                    **({"use_ema": True} if variant.ema else {}),
                    **({"masked_loss": True} if variant.masked else {}),
                    **({"mask_background_weight": variant.mask_background} if variant.mask_background else {}),
                    "num_class_images": cfg.num_class_images, "prior_loss_weight": cfg.prior_loss_weight,
                    **toy_train_settings(cfg.family),
                    "train_text_encoder": cfg.train_text_encoder, "train_batch_size": cfg.train_batch_size,
                    # the text encoder at the study's rate and the usual decay (not the model recipe's or SD3's
                    # reference 5e-6 / 1e-3): what every study so far was measured with
                    "text_encoder_lr": cfg.learning_rate, "adam_weight_decay_text_encoder": 1e-2,
                    "max_train_steps": steps, "learning_rate": cfg.learning_rate,
                    "checkpointing_steps": steps + 1, "seed": seed, "device": cfg.device,
                    "output_dir": str(folder / "model"),
                    **({"weighting_scheme": variant.weighting} if variant.weighting else {}),
                    **(adapter_settings(variant) if variant.adapter else {}),
                    **({"subjects": [companion_settings(variant, name, which, identifiers[f"{name}/{which}"],
                                                        folder, out) for which in variant.companions]}
                       if variant.companions else {}),
                }
                scored = folder / "model" / EMA_FOLDER if variant.ema else folder / "model"
                evaluate = {"backend": "toy", "model": str(scored), "subject": name, "class_noun": noun,
                            "identifier": v, "images_per_prompt": cfg.images_per_prompt,
                            "class_images": cfg.class_images, "seed": seed, "batch_size": 64, "device": cfg.device,
                            "output_dir": str(folder / "evaluation")}
                jobs.append(Job(variant, name, seed, folder, train, evaluate, cfg.keep_models))
    return jobs


def companion_settings(variant: Variant, name: str, which: str, identifier: str, folder: Path, out: Path
                       ) -> dict[str, Any]:
    """A companion's entry in `subjects`: its photos beside the unit's, its identifier, its class's images."""
    other = companion(name, which)
    own_class = other.cls != SUBJECTS[name].cls and variant.prior
    return {"instance_data_dir": str(folder / f"instance-images-{which}"),
            "instance_prompt": prompt(other.cls, identifier=identifier), "identifier": identifier,
            **({"class_prompt": prompt(other.cls), "class_data_dir": str(out / "class-images" / other.cls)}
               if own_class else {})}


def adapter_settings(variant: Variant) -> dict[str, Any]:
    """An adapter variant's training options: the toy's LoRA rate for the adapters of both models, alpha = rank."""
    from .measure import TOY_LORA_LEARNING_RATE

    return {"use_lora": True, "adapter": variant.adapter, "rank": variant.rank, "lora_alpha": variant.rank,
            **({"lokr_factor": variant.lokr_factor} if variant.lokr_factor != -1 else {}),
            "learning_rate": TOY_LORA_LEARNING_RATE, "text_encoder_lr": TOY_LORA_LEARNING_RATE}


def adapter_size(model: Path) -> dict[str, float]:
    """The adapter file's parameters and size (an adapter run's), before the run's weights are dropped."""
    from safetensors import safe_open

    from ..lora import LORA_WEIGHTS

    path = model / LORA_WEIGHTS
    if not path.is_file():
        return {}
    with safe_open(str(path), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (a handle, no dict)
    return {"adapter_params": params, "adapter_kb": round(path.stat().st_size / 1024, 1)}


def write_instance_images(job: Job) -> None:
    """The unit's first `images` instance images (and, for the masked loss, each one's mask beside it)."""
    images = Path(job.train["instance_data_dir"])
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    subject = SUBJECTS[job.subject]
    for i, img in enumerate(subject.instance_images(5, seed=job.seed)[: job.variant.images]):
        Image.fromarray(img).save(images / f"{job.subject}-{i}.png")
    if job.variant.masked:
        for i, mask in enumerate(subject.instance_masks(5, seed=job.seed)[: job.variant.images]):
            Image.fromarray(mask).save(images / f"{job.subject}-{i}{MASK_SUFFIX}.png")
    for which, entry in zip(job.variant.companions, job.train.get("subjects", [])):
        other = companion(job.subject, which)
        shutil.rmtree(entry["instance_data_dir"], ignore_errors=True)
        Path(entry["instance_data_dir"]).mkdir(parents=True)
        for i, img in enumerate(other.instance_images(5, seed=job.seed)[: job.variant.images]):
            Image.fromarray(img).save(Path(entry["instance_data_dir"]) / f"{other.name}-{i}.png")


def bleed(subject: str, images: Path) -> dict[str, float]:
    """The study's bleed metrics (STUDY_METRICS) from an evaluation's images: the unit's twin and next subject
    judged on the identifier prompts' images (folders 00, 01, ...) and the twin on the bare class prompt's."""
    import numpy as np

    from .judges import subject_score

    def score(paths: list[Path], judge: Subject) -> float:
        return float(np.mean([subject_score(np.asarray(Image.open(p).convert("RGB")), judge) for p in paths]))

    prompted = sorted(p for d in images.iterdir() if d.is_dir() and d.name.isdigit() for p in d.glob("*.png"))
    bare = sorted((images / "class").glob("*.png"))
    twin, other = TWINS[subject], next_subject(subject)
    return {"bleed": score(prompted, twin), "bleed_next": score(prompted, other), "class_bleed": score(bare, twin)}


def run_job(job: Job, threads: int | None = None) -> dict[str, Any]:
    """Train and score one run (in a worker process or in this one); its output goes to the run's log.txt."""
    import torch

    from ..evaluation import evaluate
    from ..training import train

    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    job.folder.mkdir(parents=True, exist_ok=True)
    write_instance_images(job)
    shutil.rmtree(job.folder / "model", ignore_errors=True)  # a run killed midway starts over
    with open(job.folder / "log.txt", "w") as logfile, contextlib.redirect_stderr(logfile), \
            contextlib.redirect_stdout(logfile):
        summary = train(**job.train)
        report = evaluate(**job.evaluate)
    sizes = adapter_size(job.folder / "model")
    if not job.keep_model:
        shutil.rmtree(job.folder / "model")
    metrics = {k: m["value"] for k, m in report["metrics"].items()} | bleed(job.subject, Path(report["image_root"]))
    result = {"settings": job.settings(), "metrics": metrics,
              "mean_loss": summary["mean_loss"], "train_time_s": summary["wall_time_s"],
              "wall_time_s": round(time.time() - started, 1), **sizes}
    write_text_atomic(job.folder / RESULT, json.dumps(result, indent=2) + "\n")
    return result


def finished(job: Job) -> dict[str, Any] | None:
    """The run's result when it finished with these very settings."""
    path = job.folder / RESULT
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("settings") == job.settings() else None


def prepare_class_images(jobs: list[Job]) -> None:
    """Generate each class folder's images once, before runs that share the folder start at the same time."""
    from accelerate import Accelerator

    from ..config import TrainConfig
    from ..families import ModelSource, get_family
    from ..prior import ensure_class_images

    seen = set()
    classes = [(job.train, job.train["class_data_dir"]) for job in jobs] + [
        ({**job.train, "class_prompt": s["class_prompt"], "class_data_dir": s["class_data_dir"], "subjects": []},
         s["class_data_dir"]) for job in jobs for s in job.train.get("subjects", []) if s.get("class_data_dir")]
    for train, folder in classes:
        if folder is None or folder in seen:
            continue
        seen.add(folder)
        cfg = schema.build(TrainConfig, train)
        source = ModelSource(cfg.pretrained_model_name_or_path)
        # on the device the runs train on: class images are keyed by the precision they were made in
        made = ensure_class_images(cfg, get_family(source), source, Accelerator(cpu=cfg.device == "cpu"))
        log.info("class images for %r: %d reused, %d generated", cfg.class_prompt, made.reused, made.generated)


def run_all(jobs: list[Job], workers: int) -> tuple[dict[Path, dict[str, Any]], int]:
    """Every job's result by folder, and how many were reused: earlier results are reused, the rest run `workers`
    at a time."""
    results = {job.folder: r for job in jobs if (r := finished(job)) is not None}
    reused = len(results)
    todo = [job for job in jobs if job.folder not in results]
    if reused:
        log.info("%d run(s) already done with these settings are reused", reused)
    if not todo:
        return results, reused
    prepare_class_images(todo)
    workers = min(workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // workers)
    log.info("%d run(s) to train and score, %d at a time, %d CPU thread(s) each", len(todo), workers, threads)

    def report(i: int, job: Job, result: dict[str, Any]) -> None:
        metrics = " ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items())
        log.info("[%d/%d] %s %s seed %d: %s (%.0f s)", i, len(todo), variant_name(job.variant), job.subject,
                 job.seed, metrics, result["wall_time_s"])

    if workers == 1:
        for i, job in enumerate(todo, 1):
            results[job.folder] = run_job(job)
            report(i, job, results[job.folder])
        return results, reused
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_job, job, threads): job for job in todo}
        for i, future in enumerate(as_completed(futures), 1):
            job = futures[future]
            try:
                results[job.folder] = future.result()
            except Exception as e:  # one failed run is named; the finished ones stay on disk for the next try
                raise DreamBoothError(f"run {job.folder} failed ({type(e).__name__}: {e}); see "
                                      f"{job.folder / 'log.txt'}") from None
            report(i, job, results[job.folder])
    return results, reused
