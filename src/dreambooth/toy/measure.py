"""Sample a toy pipeline and score the samples with the judges: attribute accuracy, variety, subject fidelity."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import derive_seed
from .judges import IS_SUBJECT, Reading, read, subject_score
from .models import TOY_MODELS
from .subjects import Subject
from .world import SIZES, Scene, held_out_triples, prompt, random_scene

TOY_LORA_LEARNING_RATE = 5e-3  # LoRA's low-rank updates take a larger step, as in the reference scripts
# the DreamBooth recipe of a toy model beyond its fixed settings, by method: measured to reach the demo's subject
# fidelity (>= 0.8 on the toy judge) in its step count, by the command below (figures in the README)
# the method the page pre-selects: full fine-tuning (0.91 on the DDPM toy, 0.96 on the SD3 toy). LoRA at rank 4 and
# 1e-3 reached 0.44 on the DDPM toy in the same 400 steps; at rank 8 and 5e-3 (text encoder adapters at the same
# rate), 0.85 (`dreambooth demo --use_lora`, 2026-12-06)
TOY_METHOD = "full"
TOY_RECIPE_MEASURED = ("dreambooth demo [--family sd3] [--use_lora]: subject fidelity of 'a [V] circle' "
                       "after fine-tuning (toy judge, 32 samples)")
# (with the demo's seed: the page's default run on the toy subject is the run the demo measured; on a drawn seed the
# SD3 toy's 8-image gallery once scored 0.76, where the demo measures 0.98 on seed 1)
TOY_RECIPE: dict[str, dict[str, Any]] = {
    "full": dict(max_train_steps=400, train_batch_size=4, num_class_images=100, train_text_encoder=True, seed=0),
    "lora": dict(max_train_steps=400, train_batch_size=4, num_class_images=100, train_text_encoder=True, seed=0,
                 rank=8),
}


def toy_sampling(family: str) -> tuple[str, int, float]:
    """How a toy model of this family samples (class images, the demo, the judges' measurements); a family with no
    toy model, as the first toy model does."""
    return (TOY_MODELS.get(family) or next(iter(TOY_MODELS.values()))).sampling


def toy_options(family: str) -> dict[str, Any]:
    """The training options a toy model of this family was pretrained with (DreamBooth and sampling use them)."""
    model = TOY_MODELS.get(family)
    return dict(model.options) if model is not None else {}


def toy_train_settings(family: str, lora: bool = False) -> dict[str, Any]:
    """The training options every DreamBooth run on a toy model of this family uses (the demo, the lab, the UI's
    presets): its sampling for class images, its 32 px world, its T5 length, the toy recipe's learning rate."""
    sampler, steps, guidance = toy_sampling(family)
    return dict(class_sampler=sampler, class_inference_steps=steps, class_guidance_scale=guidance,
                sample_batch_size=50, resolution=32, center_crop=True,
                random_flip=False,  # a flip changes a two-tone subject
                learning_rate=TOY_LORA_LEARNING_RATE if lora else TOY_MODELS[family].learning_rate,
                lr_scheduler="constant", lr_warmup_steps=0, mixed_precision="no", **toy_options(family))


def toy_recipe(family: str, lora: bool = False) -> dict[str, Any]:
    """What DreamBooth on a toy model of this family starts from (its `dreambooth_recipe.json`, the demo, the page):
    the fixed settings above and the measured recipe of the method. The text encoder trains at the denoiser's rate
    (SD3's reference default, 5e-6, would leave the toy's identifier unbound)."""
    settings = toy_train_settings(family, lora)
    return {**settings, **TOY_RECIPE["lora" if lora else "full"], "text_encoder_lr": settings["learning_rate"],
            "adam_weight_decay_text_encoder": 1e-2}


@torch.no_grad()
def sample(pipe, prompts: Sequence[str], n: int, seed: int = 0, steps: int | None = None,
           guidance: float | None = None, batch_size: int = 128, sampler: str | None = None,
           progress: str | None = None) -> list[list[np.ndarray]]:
    """n uint8 images per prompt; image i of every prompt uses seed derive_seed(seed, i), so runs compare. Sampler,
    steps and guidance default to the toy world's for the pipeline's family. `progress`: the name of a bar that
    moves with every denoising step of every batch."""
    from ..families import family_of
    from ..sampling import family_sampler

    family = family_of(pipe)
    default_sampler, default_steps, default_guidance = toy_sampling(family.name)
    steps, guidance = steps or default_steps, default_guidance if guidance is None else guidance
    _, pipe.scheduler = family_sampler(family, sampler or default_sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    extra = family.pipeline_kwargs(SimpleNamespace(**toy_options(family.name)))
    jobs = [(p, i) for p in range(len(prompts)) for i in range(n)]
    out: list[list[np.ndarray]] = [[] for _ in prompts]
    batches = range(0, len(jobs), batch_size)
    bar = tqdm(total=len(batches) * steps, desc=progress, unit="step", disable=progress is None, leave=False)

    def moved(pipe, i, t, kwargs):
        bar.update(1)
        return kwargs

    with bar:
        for start in batches:
            chunk = jobs[start : start + batch_size]
            images = pipe(prompt=[prompts[p] for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                          generator=[torch.Generator().manual_seed(derive_seed(seed, i)) for _, i in chunk],
                          output_type="np", callback_on_step_end=moved, **extra).images
            for (p, _), img in zip(chunk, images):
                out[p].append(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8))
    return out


def normalized_entropy(values: Sequence[str | None], support: int) -> float:
    """Entropy of the observed values over log(support): 0 = always the same, 1 = uniform over the support."""
    counts = Counter(values)
    total = sum(counts.values())
    if total == 0:
        return 0.0
    h = -sum(c / total * math.log(c / total) for c in counts.values())
    return h / math.log(support)


@dataclass
class Quality:
    named: dict[str, float]  # attribute -> share of samples matching the prompt where the prompt names it
    open_variety: dict[str, float]  # attribute left open -> its entropy in the samples / in the world's renders
    samples: int

    def passes(self, accuracy: float = 0.9, variety: float = 0.5) -> bool:
        return min(self.named.values()) >= accuracy and min(self.open_variety.values()) >= variety

    def lines(self) -> list[str]:
        named = ", ".join(f"{k} {v:.1%}" for k, v in self.named.items())
        varied = ", ".join(f"{k} {v:.2f}" for k, v in self.open_variety.items())
        return [f"named attributes matched ({self.samples} samples of held-out prompts): {named}",
                f"open attributes' variety (entropy relative to the world's own; 1 = as varied): {varied}"]


def held_out_prompts(k: int | None = None) -> list[tuple[str, dict[str, str]]]:
    """(prompt, named attributes) for the held-out (colour, class, background) triples; every other one names
    a size too, so size is open in half of them."""
    triples = held_out_triples()[:k]
    out = []
    for i, (colour, cls, bg) in enumerate(triples):
        size = list(SIZES)[i // 2 % 2] if i % 2 else None
        named = {"cls": cls, "colour": colour, "background": bg} | ({"size": size} if size else {})
        out.append((prompt(cls, colour, bg, size), named))
    return out


def quality(pipe, per_prompt: int = 12, triples: int | None = None, seed: int = 0, **sampling: Any) -> Quality:
    """Attribute accuracy on held-out prompts; variety of the attributes each prompt leaves open (size where it
    is not named, position always), relative to renders of the world for the same prompts. `sampling`: sampler,
    steps, guidance (default: the toy model's)."""
    cases = held_out_prompts(triples)
    images = sample(pipe, [p for p, _ in cases], per_prompt, seed, **sampling)
    rng = np.random.default_rng(seed)
    hits: dict[str, list[bool]] = {k: [] for k in ("cls", "colour", "background", "size")}
    seen: dict[str, list[str | None]] = {"size": [], "position": []}
    world: dict[str, list[str | None]] = {"size": [], "position": []}
    for (_, named), imgs in zip(cases, images):
        readings = [read(img) for img in imgs]
        for attr, want in named.items():
            hits[attr].extend(getattr(r, attr) == want for r in readings)
        found = [r for r in readings if r.cls is not None]  # a missing object already counts as a miss above
        truth = [random_scene(rng, named["cls"], named["colour"], named["background"], named.get("size"))
                 for _ in imgs]
        if "size" not in named:
            seen["size"] += [r.size for r in found]
            world["size"] += [s.size for s in truth]
        seen["position"] += [_cell(r) for r in found]
        world["position"] += [_cell(s) for s in truth]
    variety_of = {k: normalized_entropy(seen[k], 9) / max(normalized_entropy(world[k], 9), 1e-9) for k in seen}
    return Quality(named={k: float(np.mean(v)) for k, v in hits.items() if v}, open_variety=variety_of,
                   samples=sum(len(i) for i in images))


def _cell(r: Reading | Scene) -> str | None:
    """The object's place on a 3x3 grid (position as a categorical attribute)."""
    if isinstance(r, Reading) and r.cls is None:
        return None
    return f"{min(int(r.cx // 11), 2)}{min(int(r.cy // 11), 2)}"


def diversity(readings: Sequence[Reading]) -> float:
    """Toy DIV: the mean share of attributes (colour, background, size, position cell) in which two samples
    differ, over all pairs; 0 = all alike."""
    keys = [(r.colour, r.background, r.size, _cell(r)) for r in readings]
    pairs = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :]]
    if not pairs:
        return 0.0
    return float(np.mean([sum(x != y for x, y in zip(a, b)) / 4 for a, b in pairs]))


def subject_scores(images: Sequence[np.ndarray], subject: Subject) -> np.ndarray:
    return np.array([subject_score(img, subject) for img in images])


def is_subject_rate(images: Sequence[np.ndarray], subject: Subject) -> float:
    return float(np.mean(subject_scores(images, subject) >= IS_SUBJECT))


def load_toy(model: str):
    """A toy pipeline for measurement (fp32): the same loader as `dreambooth generate`."""
    from ..generation import load_for_inference

    return load_for_inference(model, torch.float32)
