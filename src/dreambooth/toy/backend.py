"""The toy backend of `dreambooth evaluate`: toy-world subjects scored by the toy world's analytic judges, the
same report as DreamBench's, offline and in seconds. It registers itself into the evaluation backends (a plug-in
of the "dreambooth.evaluation_backends" group)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from ..errors import ConfigError
from ..evaluation.backends import BACKENDS, Backend, Case, Metric, Subject
from .judges import read
from .measure import diversity, subject_scores, toy_options, toy_sampling
from .models import TOY_MODELS
from .subjects import SUBJECTS
from .world import BACKGROUNDS, SIZES, prompt


@BACKENDS.register()
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

    reads_real_images = False  # the judges know the subject; its instance images only fill the grids

    def __init__(self, subject_name: str):
        self.subject = SUBJECTS[subject_name]

    @classmethod
    def create(cls, cfg: Any, real: Sequence[Image.Image]) -> Toy:
        return cls(cfg.subject)

    @classmethod
    def check_subject(cls, name: str | None) -> None:
        if name not in SUBJECTS:
            raise ConfigError("subject", name, "the toy backend needs a toy subject: " + ", ".join(SUBJECTS))

    @classmethod
    def subject(cls, cfg: Any, identifier: str, prompt: str | None) -> Subject:
        toy = SUBJECTS[cfg.subject]  # --class_noun names it otherwise ("" for none), as the model was trained
        return Subject(toy.name, toy.cls if cfg.class_noun is None else cfg.class_noun, identifier)

    @classmethod
    def default_real(cls, cfg: Any) -> list[Image.Image]:
        return [Image.fromarray(a) for a in SUBJECTS[cfg.subject].instance_images(5, seed=cfg.seed)]

    def sampling_for(self, family: str | None) -> dict[str, Any]:
        """The toy world's own settings for the toy model of that family; a family with no toy model (Flux,
        SDXL) samples with its own sampler and guidance, as `generate` does, at the toy world's step count (the SD
        toy's sampler may not even fit it: dpm++ is no flow sampler)."""
        sampler, steps, guidance = toy_sampling(family or "")  # None: images read back; settings only recorded
        if family is not None and family not in TOY_MODELS:
            return {"sampler": None, "num_inference_steps": steps, "guidance_scale": None}
        return {"sampler": sampler, "num_inference_steps": steps, "guidance_scale": guidance,
                **toy_options(family)}

    def cases(self, subject: Subject) -> list[Case]:
        """Prompts name the subject by the noun it was trained with (which may be wrong or empty, as in the class-noun
        ablation); the judges always hold images to the subject's true class."""
        cls, noun, v = self.subject.cls, subject.class_noun, subject.identifier
        out = [Case(prompt(noun, background=bg, identifier=v), "recontextualization", prompt(cls, background=bg),
                    {"background": bg}) for bg in BACKGROUNDS]
        out += [Case(prompt(noun, size=s, identifier=v), "property modification", prompt(cls, size=s), {"size": s})
                for s in SIZES]
        return out

    def class_prompt(self, subject: Subject) -> str:
        return prompt(subject.class_noun)

    def score(self, case: Case, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
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
        return {"pres": subject_scores([np.asarray(img.convert("RGB")) for img in images], self.subject)}

    def notes(self) -> list[str]:
        return ["Toy backend: the toy world's analytic judges stand in for the learned metrics (see each metric's "
                "`analogue_of`); figures are comparable between toy runs, not with DreamBench's."]
