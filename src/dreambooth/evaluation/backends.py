"""Evaluation backends, registered by name (the `--backend` choices): what to prompt, and how to score images.

A backend turns a subject into prompt cases and scores images as per-unit values (one per image, or for DIV one
per prompt); `evaluate` turns those into the report. `dreambench` scores with the paper's learned metrics
(DINO, CLIP-I, CLIP-T, PRES, DIV); plug-ins add more (the toy world's `toy`, in toy/backend.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DreamBoothError
from ..identifier import class_noun_after
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
    reads_real_images: ClassVar[bool] = True  # scores against the subject's photos (--real_images)

    @classmethod
    def create(cls, cfg: Any, real: Sequence[Image.Image]) -> Backend:
        """The backend for an EvaluateConfig and the subject's real images."""
        from ..generation import resolve_device

        return cls(real, cfg, resolve_device(cfg.device))

    @classmethod
    def check_subject(cls, name: str | None) -> None:
        """Refuse (ConfigError) a --subject this backend does not know; None: named by --class_noun instead."""
        if name is not None and name not in protocol.subjects():
            raise ConfigError("subject", name, "a DreamBench subject (e.g. dog, backpack, teapot), or leave it out "
                              "and pass --class_noun")

    @classmethod
    def subject(cls, cfg: Any, identifier: str, prompt: str | None) -> Subject:
        """The subject evaluated: --subject (a DreamBench name) or --class_noun, else the noun after the identifier
        in the prompt the model was trained with."""
        bench = protocol.subjects().get(cfg.subject) if cfg.subject else None
        noun = cfg.class_noun or (bench.class_noun if bench else None) or (
            class_noun_after(prompt, identifier) if prompt else None)
        if not noun:
            raise ConfigError("class_noun", None, "required: pass --class_noun (or --subject with a DreamBench name)")
        live = cfg.live if cfg.live is not None else bool(bench and bench.live)
        return Subject(cfg.subject, noun, identifier, live)

    @classmethod
    def default_real(cls, cfg: Any) -> list[Image.Image]:
        """The real images when --real_images is not given (or a one-line refusal)."""
        raise ConfigError("real_images", None, f"required by the {cls.name} backend: a folder of the subject's "
                          "photos")

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


# plug-ins add theirs (the toy world: `toy`), loaded when first read
BACKENDS: Registry[type[Backend]] = Registry("evaluation backend", plugins="dreambooth.evaluation_backends")
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
