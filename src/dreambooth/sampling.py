"""Sampler registry: CLI names mapped to diffusers schedulers, all built the same way from a model's config. Each
kind of model has its own: DDPM-trained families (SD, SDXL) and rectified-flow ones (SD3, Flux)."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from .errors import ConfigError
from .registry import Registry

SAMPLERS: dict[str, Registry[tuple[type, dict[str, Any]]]] = {
    "ddpm": Registry("sampler for DDPM models"), "flow": Registry("sampler for flow-matching models")}
# name -> (scheduler class, overrides applied on top of the model's scheduler config)
for _name, _entry in {
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
}.items():
    SAMPLERS["ddpm"].register(_name)(_entry)
SAMPLERS["flow"].register("euler")((FlowMatchEulerDiscreteScheduler, {}))  # the pipelines' own, with their shift

# The reference script's --validation_scheduler class names, for command-line compatibility.
LEGACY_NAMES: dict[str, str] = {"DPMSolverMultistepScheduler": "dpm++", "DDPMScheduler": "ddpm"}


def sampler_names() -> list[str]:
    """Every sampler name of every kind (the CLI choices; which fit a model is checked once it is known)."""
    return list(dict.fromkeys(name for kind in SAMPLERS.values() for name in kind))


def resolve_sampler(name: str | None, family: Any, field: str = "sampler") -> str:
    """The sampler to use for a family: the one named (refused in one line if it does not fit the family's kind of
    model), or the family's default."""
    if name is None:
        return family.default_sampler
    name = LEGACY_NAMES.get(name, name)
    if name not in SAMPLERS[family.sampler_kind]:
        raise ConfigError(field, name, f"not a sampler for {family.name} models; choose one of "
                          + ", ".join(SAMPLERS[family.sampler_kind].names()))
    return name


def make_scheduler(name: str, base_config: Any, kind: str = "ddpm") -> Any:
    """A sampler `name` configured like the model's own scheduler (betas or shift, prediction type, timesteps)."""
    cls, overrides = SAMPLERS[kind][LEGACY_NAMES.get(name, name)]
    return cls.from_config(base_config, **overrides)
