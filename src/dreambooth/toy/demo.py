"""`dreambooth demo` / `make demo`: DreamBooth one toy subject into the bundled toy model and measure the effect.

Before and after fine-tuning, the same seeds render "a [V] [class]", recontextualizations on backgrounds the
instance images never show, and the bare class prompt; the judges turn the samples into the paper's four numbers:
subject fidelity (DINO/CLIP-I), prompt fidelity (CLIP-T), drift (PRES) and diversity (DIV).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .. import schema
from ..files import write_text_atomic
from ..outputs import OutputFolder
from ..schema import at_least, option, positive
from .judges import read
from .measure import (
    diversity,
    is_subject_rate,
    load_toy,
    sample,
    subject_scores,
    toy_recipe,
)
from .models import TOY_MODELS, family_help
from .subjects import SUBJECTS, Subject
from .world import prompt

log = logging.getLogger("dreambooth")
# the fine-tuning learning rate each toy model's DreamBooth recipe uses
MARKER = "demo.json"  # a folder holding this was written by the demo, which may replace it


@dataclasses.dataclass
class DemoConfig:
    subject: str = option("circle", "Toy subject to DreamBooth", choices=lambda: list(SUBJECTS))
    output_dir: Path = option(Path("dreambooth-demo"), "Where the grids, report, images and model go")
    family: str = option("sd", family_help(), choices=lambda: list(TOY_MODELS))
    model: str | None = option(None, "Base model (default: the bundled toy model of --family)")
    identifier: str | None = option(None, "Identifier [V] (default: the rarest-prior token the model offers)")
    use_lora: bool = option(False, "Train LoRA adapters instead of the full model (the toy's LoRA recipe)")
    max_train_steps: int | None = option(None, "Fine-tuning steps (default: the toy recipe's, 400)",
                                         check=at_least(1))
    learning_rate: float | None = option(None, "Fine-tuning learning rate (default: the toy recipe's, 2e-4; with "
                                         "--use_lora 5e-3)", check=positive)
    train_batch_size: int | None = option(None, "Instance images per step (as many class images join them; "
                                          "default: the toy recipe's, 4)", check=at_least(1))
    num_class_images: int | None = option(None, "Class images for prior preservation (default: the toy recipe's, "
                                          "100)", check=at_least(1))
    rank: int | None = option(None, "LoRA rank (with --use_lora; default: the toy recipe's, 8)", check=at_least(1))
    prior_loss_weight: float = option(1.0, "Lambda of the prior-preservation loss", check=at_least(0))
    with_prior_preservation: bool = option(True, "Use the prior-preservation loss")
    train_text_encoder: bool = option(True, "Also fine-tune the text encoder (binds the untrained identifier)")
    samples: int = option(32, "Samples per prompt in the before/after measurement", check=at_least(2))
    seed: int = option(0, "Seed of training and of the measurement")
    device: str = option("auto", "Where to fine-tune: auto (the GPU when there is one), cpu or cuda; the toy "
                         "measurement samples on the CPU", choices=("auto", "cpu", "cuda"))


@dataclasses.dataclass
class Measurement:
    """The paper's metrics, read by the toy judges from samples of one model."""

    subject_fidelity: float  # mean subject score of "a [V] [class]" samples (toy DINO / CLIP-I)
    recontext_subject_fidelity: float  # the same on "a [V] [class] on a [new] background"
    prompt_fidelity: float  # share of recontext samples that show the asked class and background (toy CLIP-T)
    drift: float  # share of bare class-prompt samples judged to be the subject (toy PRES)
    diversity: float  # mean attribute difference between pairs of class-prompt samples (toy DIV)


def prompts_for(subject: Subject, identifier: str) -> dict[str, list[str]]:
    return {
        "subject": [prompt(subject.cls, identifier=identifier)],
        "recontext": [prompt(subject.cls, background=bg, identifier=identifier) for bg in subject.unseen_backgrounds],
        "class": [prompt(subject.cls)],
    }


def measure(pipe, subject: Subject, prompts: dict[str, list[str]], n: int, seed: int, progress: str | None = None
            ) -> tuple[Measurement, dict[str, list[list[np.ndarray]]]]:
    flat = [p for group in prompts.values() for p in group]
    images = dict(zip(flat, sample(pipe, flat, n, seed, progress=progress)))
    by_group = {g: [images[p] for p in ps] for g, ps in prompts.items()}
    recontext_hits = []
    for bg, imgs in zip(subject.unseen_backgrounds, by_group["recontext"]):  # prompts_for's order
        recontext_hits += [(r.cls == subject.cls and r.background == bg) for r in map(read, imgs)]
    class_imgs = by_group["class"][0]
    m = Measurement(
        subject_fidelity=float(subject_scores(by_group["subject"][0], subject).mean()),
        recontext_subject_fidelity=float(np.mean([subject_scores(i, subject).mean() for i in by_group["recontext"]])),
        prompt_fidelity=float(np.mean(recontext_hits)),
        drift=is_subject_rate(class_imgs, subject),
        diversity=diversity([read(i) for i in class_imgs]),
    )
    return m, by_group


def clear_previous(out: OutputFolder) -> None:
    """Remove what an earlier demo wrote in the folder (class images stay: they are reused when their settings
    match); anything else in it is left alone."""
    removed = [child for child in out.owned_entries() if child.name != "class-images"]
    for child in removed:
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.forget(child.name for child in removed)


def pick_identifier(model: str, class_noun: str) -> str:
    from ..families import ModelSource, get_family
    from ..identifier import rank

    source = ModelSource(model)
    tokenizer, text_encoder = get_family(source).load_text(source)
    return rank(tokenizer, text_encoder.eval(), class_noun, top=1)[0].token


def comparison_grid(rows: list[tuple[str, list[np.ndarray]]], path: Path, scale: int = 3, cols: int = 8) -> None:
    """One labelled row of `cols` samples per (label, images); pixels upscaled so 32 px images are visible."""
    cell = 32 * scale
    label_h = 14
    grid = Image.new("RGB", (cols * cell, len(rows) * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = r * (cell + label_h)
        draw.text((2, y + 1), label, fill=(0, 0, 0))
        for c, img in enumerate(images[:cols]):
            grid.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (c * cell, y + label_h))
    grid.save(path)


def report_lines(before: Measurement, after: Measurement, subject: Subject, identifier: str) -> list[str]:
    names = {
        "subject_fidelity": f'subject fidelity, "{prompt(subject.cls, identifier=identifier)}"',
        "recontext_subject_fidelity": "subject fidelity, on unseen backgrounds",
        "prompt_fidelity": "prompt fidelity (class + background as asked)",
        "drift": f'drift: "{prompt(subject.cls)}" drawn as the subject',
        "diversity": f'diversity of "{prompt(subject.cls)}"',
    }
    lines = [f"{'metric':<52} {'before':>7} {'after':>7}"]
    for key, label in names.items():
        lines.append(f"{label:<52} {getattr(before, key):>7.2f} {getattr(after, key):>7.2f}")
    return lines


def demo(config: DemoConfig | dict | str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the toy DreamBooth demo; returns the report (also written to output_dir/report.json)."""
    from ..quiet import quiet_libraries

    cfg = schema.build(DemoConfig, {**schema.values_of(config, DemoConfig), **overrides})
    quiet_libraries()
    started = time.time()
    model = toy_model(cfg.family, cfg.model)
    with OutputFolder(cfg.output_dir, "demo", models={"--model": model}) as folder:
        return _demo(cfg, model, folder, started)


def toy_model(family: str, model: str | None) -> str:
    """The model a toy command uses: the one given, else the bundled toy model of the family (refused in one line
    if the package lacks it)."""
    return model if model is not None else TOY_MODELS[family].folder_or_error()


def _demo(cfg: DemoConfig, model: str, folder: OutputFolder, started: float) -> dict[str, Any]:
    from ..families import ModelSource, get_family
    from ..training import train

    subject = SUBJECTS[cfg.subject]
    identifier = cfg.identifier or pick_identifier(model, subject.cls)  # the base model loads
    family = get_family(ModelSource(model)).name
    clear_previous(folder)
    folder.claim()
    out = folder.path
    write_text_atomic(folder.entry(MARKER), json.dumps(schema.to_dict(cfg), default=str, indent=2) + "\n")

    # the subject: a few instance images in few contexts
    instance_dir = folder.entry("instance-images")
    instance_dir.mkdir()
    instance = subject.instance_images(5, seed=cfg.seed)
    for i, img in enumerate(instance):
        Image.fromarray(img).save(instance_dir / f"{subject.name}-{i}.png")
    prompts = prompts_for(subject, identifier)
    log.info("subject %r (%s), identifier %r; instance images in %s", subject.name, subject.cls, identifier,
             instance_dir)

    # before
    n_prompts = sum(len(g) for g in prompts.values())
    log.info("before: sampling the base model (%d prompts x %d seeds)", n_prompts, cfg.samples)
    base = load_toy(model)
    before, before_images = measure(base, subject, prompts, cfg.samples, cfg.seed, "before: sampling")
    del base

    # dreambooth
    model_dir = folder.entry("model")
    given = {k: getattr(cfg, k) for k in ("max_train_steps", "learning_rate", "train_batch_size", "num_class_images",
                                          "rank") if getattr(cfg, k) is not None}
    if "learning_rate" in given and cfg.train_text_encoder:
        given["text_encoder_lr"] = given["learning_rate"]
    recipe = {**toy_recipe(family, cfg.use_lora), **given, "seed": cfg.seed}
    if not cfg.train_text_encoder:
        recipe = {k: v for k, v in recipe.items() if k not in ("text_encoder_lr", "adam_weight_decay_text_encoder")}
    prior = dict(class_prompt=prompts["class"][0], class_data_dir=folder.entry("class-images"),
                 prior_loss_weight=cfg.prior_loss_weight) if cfg.with_prior_preservation else {}
    if not cfg.with_prior_preservation:
        recipe.pop("num_class_images", None)
    summary = train(
        pretrained_model_name_or_path=model, instance_data_dir=instance_dir,
        instance_prompt=prompts["subject"][0], identifier=identifier, use_lora=cfg.use_lora,
        with_prior_preservation=cfg.with_prior_preservation, **prior, **{**recipe,
                                                                          "train_text_encoder": cfg.train_text_encoder},
        checkpointing_steps=recipe["max_train_steps"] + 1, output_dir=model_dir, device=cfg.device,
    )

    # after
    log.info("after: sampling the fine-tuned model with the same prompts and seeds")
    tuned = load_toy(str(model_dir))
    after, after_images = measure(tuned, subject, prompts, cfg.samples, cfg.seed, "after: sampling")

    # grids and report
    rows: list[tuple[str, list[np.ndarray]]] = [("instance images", instance)]
    for group in ("subject", "recontext", "class"):
        for p, b, a in zip(prompts[group], before_images[group], after_images[group]):
            rows += [(f"base: {p}", b), (f"dreambooth: {p}", a)]
    comparison_grid(rows, folder.entry("before_after.png"))
    lines = report_lines(before, after, subject, identifier)
    report = {"family": family, "model": model, "subject": subject.name, "identifier": identifier, "prompts": prompts,
              "samples_per_prompt": cfg.samples,
              "before": dataclasses.asdict(before), "after": dataclasses.asdict(after), "training": summary,
              "wall_time_s": round(time.time() - started, 1)}
    write_text_atomic(folder.entry("report.json"), json.dumps(report, indent=2, default=str) + "\n")
    write_text_atomic(folder.entry("report.txt"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"grids: {out / 'before_after.png'}; report: {out / 'report.json'}; "
          f"{report['wall_time_s']:.0f} s in all")
    return report
