"""The bundled toy models, one record each: where the pipeline folder is, how it samples, what it was pretrained
with and by what, and how it is named in the page and the docs. Every toy command, the demo, `reproduce`, the
evaluation's toy backend and the page read these records; a new toy model is one more record (and its pretraining
function). Importing this module also offers the toy models to the page (the core's bundled-model registry)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bundled import BUNDLED, BundledModel
from ..errors import DreamBoothError
from ..registry import Registry

HERE = Path(__file__).parent


@dataclass(frozen=True)
class ToyModel:
    """A bundled toy model of one model family (`name`, the family's registry name)."""

    name: str
    folder: str  # beside this module
    label: str  # what the page's model list shows
    description: str  # what a command's --family help says of it
    sampling: tuple[str, int, float]  # (sampler, steps, guidance) its class images, the demo and the judges use
    learning_rate: float  # full fine-tuning in its DreamBooth recipe
    pretrain_steps: int  # the shipped model's denoiser steps (the 45-minute budget on the 2-core CPU)
    pretrain: str  # "module:function" that trains it: (PretrainConfig, output folder) -> info dict
    # the training options it was pretrained with, which every DreamBooth run on it and every pipeline call uses too
    options: dict[str, Any] = field(default_factory=dict)
    docs_intro: tuple[str, ...] = ()  # the lines its `reproduce` tables start with (markdown)

    @property
    def path(self) -> Path:
        return HERE / self.folder

    @property
    def stem_suffix(self) -> str:
        """What names its outputs apart from the first toy model's (reproduce-sd3, ablations-sd3.md)."""
        return "" if self.name == next(iter(TOY_MODELS)) else f"-{self.name}"

    def pretrain_function(self) -> Callable[..., dict[str, Any]]:
        module, _, function = self.pretrain.partition(":")
        return getattr(importlib.import_module(module, __package__), function)

    def folder_or_error(self) -> str:
        """The pipeline folder (refused in one line if the package lacks it)."""
        if not (self.path / "model_index.json").is_file():
            raise DreamBoothError(f"the bundled {self.name} toy model is missing from {self.path}; reinstall the "
                                  f"package or run `dreambooth toy pretrain --family {self.name} --output_dir DIR` "
                                  "and pass --model DIR")
        return str(self.path)


TOY_MODELS: Registry[ToyModel] = Registry("toy model")
register = TOY_MODELS.register()

# the DDPM one (SD architecture) and the flow-matching one (SD3 architecture). The SD3 toy has no T5: its prompt is
# the CLIP tokens and one zero token in place of T5's (not SD3's 77, which would be 93 of its 157 tokens per joint
# block and 1.6x the step time, for no signal)
register(ToyModel("sd", "model", "toy model (DDPM, UNet)", "the DDPM toy model (UNet)", ("dpm++", 20, 2.0),
                  learning_rate=2e-4, pretrain_steps=4500, pretrain=".pretrain:pretrain_sd"))
register(ToyModel("sd3", "model-sd3", "toy model (rectified flow, SD3)", "the rectified-flow toy model (SD3 "
                  "transformer)", ("euler_a", 20, 2.5), learning_rate=2e-4, pretrain_steps=4000,
                  pretrain=".pretrain_flow:pretrain_on_toy_vae", options={"max_sequence_length": 1},
                  docs_intro=("On the bundled SD3-architecture toy model (`SD3Transformer2DModel`, rectified flow; "
                              "[ablations.md](ablations.md) holds the DDPM toy model's tables).", "")))


def family_help(what: str = "Which bundled toy model") -> Callable[[], str]:
    """--family help text from the records."""
    return lambda: f"{what}: " + "; ".join(f"{m.name}: {m.description}" for m in TOY_MODELS.values())


def _offer(model: ToyModel) -> None:
    from .subjects import SUBJECTS

    sampler, steps, guidance = model.sampling
    BUNDLED.register()(BundledModel(
        f"toy-{model.name}", model.label, model.path, model.name, evaluation="toy",
        sampling={"sampler": sampler, "num_inference_steps": steps, "guidance_scale": guidance},
        subjects=tuple((name, s.cls) for name, s in SUBJECTS.items())))


for _model in TOY_MODELS.values():
    _offer(_model)
