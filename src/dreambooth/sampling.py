"""Sampler registry: CLI names mapped to diffusers schedulers, all built the same way from a model's config. Each
kind of model has its own: DDPM-trained families (SD, SDXL) and rectified-flow ones (SD3, Flux)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
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
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from .errors import ConfigError
from .registry import Registry


class FlowMatchAncestralScheduler(FlowMatchEulerDiscreteScheduler):
    """The flow-matching Euler sampler with ancestral steps at the low-noise end: while sigma >= ANCESTRAL_BELOW it
    takes plain Euler steps (the composition, where the object sits and how big it is, keeps the variety of the
    ODE); below, each step predicts the clean latent and noises it afresh to the next sigma (x_next =
    (1 - s') x0 + s' eps), which washes out the velocity field's small errors in shape and edges. Stochasticity
    kept to a sigma window, as EDM's S_tmin/S_tmax churn window does; a full-range ancestral sampler pulls every
    sample towards the mean composition.

    The fresh noise of sample b is seeded from sample b's starting latents, so an image still depends only on its
    own generator, not on the batch it shares (the SD3 and Flux pipelines pass no generator to the step)."""

    ANCESTRAL_BELOW = 0.5
    _noise: list[torch.Generator] | None = None

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(*args, **kwargs)
        self._noise = None  # a new call: seeded afresh from its own starting latents

    def set_begin_index(self, begin_index: int = 0) -> None:
        super().set_begin_index(begin_index)
        self._noise = None  # img2img starts part-way: its first step's latents seed the noise

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any,
             return_dict: bool = True, **kwargs: Any) -> Any:
        if self.step_index is None:
            self._init_step_index(timestep)
        if self._noise is None or len(self._noise) != len(sample):
            self._noise = [torch.Generator(sample.device).manual_seed(_digest(x)) for x in sample]
        sigma, sigma_next = float(self.sigmas[self.step_index]), float(self.sigmas[self.step_index + 1])
        if sigma >= self.ANCESTRAL_BELOW:
            return super().step(model_output, timestep, sample, *args, return_dict=return_dict, **kwargs)
        x0 = sample.float() - sigma * model_output.float()
        noise = torch.stack([torch.randn(x.shape, generator=g, device=x.device) for x, g in zip(sample, self._noise)])
        prev = ((1.0 - sigma_next) * x0 + sigma_next * noise).to(model_output.dtype)
        self._step_index += 1
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def _digest(x: torch.Tensor) -> int:
    """A 63-bit seed from a tensor's values (the same values give the same seed on every device)."""
    return int.from_bytes(hashlib.blake2b(x.detach().float().cpu().numpy().tobytes(), digest_size=8).digest(),
                          "little") >> 1

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
SAMPLERS["flow"].register("euler_a")((FlowMatchAncestralScheduler, {}))

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


def family_sampler(family: Any, name: str | None, base_config: Any, field: str = "sampler") -> tuple[str, Any]:
    """(the sampler's name, its scheduler) for a family's model whose own scheduler config is `base_config`: the
    one named (refused in one line if it does not fit the family), else the family's default."""
    name = resolve_sampler(name, family, field)
    return name, make_scheduler(name, base_config, family.sampler_kind)
