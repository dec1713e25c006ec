"""Evaluation backends, registered by name (the `--backend` choices): what to prompt, and how to score images.

A backend turns a subject into prompt cases and scores images as per-unit values (one per image, or for DIV one
per prompt); `evaluate` turns those into the report. `dreambench` scores with the paper's learned metrics
(DINO, CLIP-I, CLIP-T, PRES, DIV); `toy` scores toy-world images with the toy world's analytic judges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from ..errors import DreamBoothError
from ..registry import Registry
from . import metrics, protocol


@dataclass(frozen=True)
class Metric:
    description: str
    better: str  # "higher" or "lower"
    unit: str  # what one bootstrap unit is: "image" or "prompt"
    analogue_of: str | None = None  # the paper metric a toy metric stands in for


@dataclass(frozen=True)
class Case:
    prompt: str  # what the model is asked
    category: str
    text: str  # what prompt fidelity compares with (DreamBench: the prompt without the identifier)
    named: dict[str, str] = field(default_factory=dict)  # toy: the attributes the prompt names


@dataclass(frozen=True)
class Subject:
    name: str | None
    class_noun: str
    identifier: str
    live: bool = False


class Backend:
    """Base: subclasses set the class attributes and implement `cases`, `score` and `score_class`."""

    name: ClassVar[str]
    metrics: ClassVar[dict[str, Metric]]
    images_per_prompt: ClassVar[int]
    class_images: ClassVar[int]
    sampling: ClassVar[dict[str, Any]]  # default sampler, num_inference_steps, guidance_scale
    references: ClassVar[dict[str, dict[str, float]]] = {}

    def sampling_for(self, family: str | None) -> dict[str, Any]:
        """The default sampling settings for a model of this family (None: images read, not sampled)."""
        return dict(self.sampling)

    def cases(self, subject: Subject) -> list[Case]:
        raise NotImplementedError

    def class_prompt(self, subject: Subject) -> str:
        return protocol.class_prompt(subject.class_noun)

    def score(self, case: Case, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def score_class(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def real_reference(self) -> dict[str, float]:
        """What the real images score against themselves, where that means anything."""
        return {}

    def notes(self) -> list[str]:
        return []


BACKENDS: Registry[type[Backend]] = Registry("evaluation backend")
register = BACKENDS.register()


@register
class DreamBench(Backend):
    name = "dreambench"
    metrics = {
        "dino": Metric("subject fidelity: DINO ViT-S/16 CLS cosine similarity, generated vs real", "higher", "image"),
        "clip_i": Metric("subject fidelity: CLIP image-embedding cosine similarity, generated vs real", "higher",
                         "image"),
        "clip_t": Metric("prompt fidelity: CLIP text-image cosine similarity (prompt without the identifier)",
                         "higher", "image"),
        "pres": Metric("prior preservation: DINO similarity of bare class-prompt images to the real subject",
                       "lower", "image"),
        "div": Metric("diversity: mean LPIPS distance between images of the same prompt", "higher", "prompt"),
    }
    images_per_prompt = protocol.IMAGES_PER_PROMPT
    class_images = 16
    sampling = {"sampler": None, "num_inference_steps": 25, "guidance_scale": None}  # None: the family's default
    references = {  # Ruiz et al. 2023, Table 1
        "DreamBooth (Stable Diffusion), paper Table 1": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
        "real images, paper Table 1": {"dino": 0.774, "clip_i": 0.885},
    }

    def __init__(self, real: Sequence[Image.Image], cfg: Any, device: torch.device | str = "cpu"):
        """`cfg`: an EvaluateConfig (its backbone fields are read)."""
        from .backbones import Clip, Dino

        if not real:
            raise DreamBoothError("the dreambench backend needs the subject's real images; pass --real_images DIR")
        self.dino = Dino(cfg.dino_model, device, revision=cfg.dino_revision)
        self.clip = Clip(cfg.clip_model, device, revision=cfg.clip_revision)
        self.lpips = None
        if cfg.lpips_weights is not None:
            from .lpips import load_lpips

            self.lpips = load_lpips(cfg.lpips_weights, device)
        self.real_dino, self.real_clip = self.dino.images(real), self.clip.images(real)

    def cases(self, subject: Subject) -> list[Case]:
        return [Case(c.text(subject.identifier, subject.class_noun), c.category, c.without_identifier(
            subject.class_noun)) for c in protocol.prompt_cases(subject.live)]

    def score(self, case: Case, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        clip_images = self.clip.images(images)
        out = {
            "dino": metrics.similarity_to_set(self.dino.images(images), self.real_dino),
            "clip_i": metrics.similarity_to_set(clip_images, self.real_clip),
            "clip_t": metrics.text_image_similarity(self.clip.texts([case.text])[0], clip_images),
        }
        if self.lpips is not None and len(images) > 1:
            from .lpips import pairwise_distances

            out["div"] = np.array([metrics.mean_pairwise(pairwise_distances(self.lpips, images))])
        return out

    def score_class(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        return {"pres": metrics.similarity_to_set(self.dino.images(images), self.real_dino)}

    def real_reference(self) -> dict[str, float]:
        return {"dino": metrics.within_set_similarity(self.real_dino),
                "clip_i": metrics.within_set_similarity(self.real_clip)}

    def notes(self) -> list[str]:
        notes = [f"CLIP backbone: {self.clip.name} (the paper does not name its CLIP backbone; CLIP-I and CLIP-T "
                 f"move with the backbone). DINO backbone: {self.dino.name}.",
                 "Scores move with preprocessing (resize, crop, interpolation); compare runs scored by the same "
                 "version of this command, and treat the paper's figures as a reference, not a target."]
        if self.lpips is None:
            notes.append("DIV was not computed: pass --lpips_weights with AlexNet LPIPS weights in safetensors.")
        return notes


@register
class Toy(Backend):
    """Toy-world subjects scored by the analytic judges; the same report, offline and in seconds."""

    name = "toy"
    metrics = {
        "subject": Metric("subject fidelity: the judge's subject score of each image", "higher", "image",
                          "DINO / CLIP-I"),
        "prompt": Metric("prompt fidelity: share of images showing the class and every attribute the prompt names",
                         "higher", "image", "CLIP-T"),
        "pres": Metric("prior preservation: subject score of bare class-prompt images", "lower", "image", "PRES"),
        "div": Metric("diversity: mean share of attributes (colour, background, size, position) in which two "
                      "images of one prompt differ", "higher", "prompt", "DIV"),
        "leak": Metric("background leak: share of images of prompts that name no background that show one of the "
                       "backgrounds of the subject's instance images (2 of the 5; 0.4 if the background were free)",
                       "lower", "image"),
    }
    images_per_prompt = 16
    class_images = 32
    sampling: ClassVar[dict[str, Any]] = {}  # per family: sampling_for

    def __init__(self, subject_name: str):
        from ..toy.subjects import SUBJECTS

        self.subject = SUBJECTS[subject_name]

    def sampling_for(self, family: str | None) -> dict[str, Any]:
        """The toy world's own settings for the toy model of that family; a family with no toy model (Flux,
        SDXL) samples with its own sampler and guidance, as `generate` does, at the toy world's step count (the SD
        toy's sampler may not even fit it: dpm++ is no flow sampler)."""
        from ..toy.measure import STEPS, TOY_SAMPLING, toy_options, toy_sampling

        family = family or "sd"  # images read back, not sampled: the settings are only recorded
        if family not in TOY_SAMPLING:
            return {"sampler": None, "num_inference_steps": STEPS, "guidance_scale": None}
        sampler, steps, guidance = toy_sampling(family)
        return {"sampler": sampler, "num_inference_steps": steps, "guidance_scale": guidance,
                **toy_options(family)}

    def cases(self, subject: Subject) -> list[Case]:
        """Prompts name the subject by the noun it was trained with (which may be wrong or empty, as in the class-noun
        ablation); the judges always hold images to the subject's true class."""
        from ..toy.world import BACKGROUNDS, SIZES, prompt

        cls, noun, v = self.subject.cls, subject.class_noun, subject.identifier
        out = [Case(prompt(noun, background=bg, identifier=v), "recontextualization", prompt(cls, background=bg),
                    {"background": bg}) for bg in BACKGROUNDS]
        out += [Case(prompt(noun, size=s, identifier=v), "property modification", prompt(cls, size=s), {"size": s})
                for s in SIZES]
        return out

    def class_prompt(self, subject: Subject) -> str:
        from ..toy.world import prompt

        return prompt(subject.class_noun)

    def score(self, case: Case, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        from ..toy.judges import read
        from ..toy.measure import diversity, subject_scores

        arrays = [np.asarray(img.convert("RGB")) for img in images]
        readings = [read(a) for a in arrays]
        hits = [r.cls == self.subject.cls and all(getattr(r, k) == v for k, v in case.named.items())
                for r in readings]
        scores = {"subject": subject_scores(arrays, self.subject), "prompt": np.array(hits, dtype=np.float64),
                  "div": np.array([diversity(readings)])}
        if "background" not in case.named:
            scores["leak"] = np.array([r.background in self.subject.contexts for r in readings], dtype=np.float64)
        return scores

    def score_class(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        from ..toy.measure import subject_scores

        return {"pres": subject_scores([np.asarray(img.convert("RGB")) for img in images], self.subject)}

    def notes(self) -> list[str]:
        return ["Toy backend: the toy world's analytic judges stand in for the learned metrics (see each metric's "
                "`analogue_of`); figures are comparable between toy runs, not with DreamBench's."]
