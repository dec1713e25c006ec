"""Sampler registry: CLI names mapped to diffusers schedulers, all built the same way from a model's config."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

# name -> (scheduler class, overrides applied on top of the model's scheduler config)
SAMPLERS: dict[str, tuple[type, dict[str, Any]]] = {
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
}

# The reference script's --validation_scheduler class names, for command-line compatibility.
LEGACY_NAMES: dict[str, str] = {"DPMSolverMultistepScheduler": "dpm++", "DDPMScheduler": "ddpm"}


def make_scheduler(name: str, base_config: Any) -> Any:
    """A sampler `name` configured like the model's own scheduler (betas, prediction type, timesteps)."""
    cls, overrides = SAMPLERS[LEGACY_NAMES.get(name, name)]
    return cls.from_config(base_config, **overrides)
