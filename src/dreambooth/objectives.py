"""Training objectives: how a family's denoiser is taught, behind one call.

The loop hands an objective the clean latents, the example keys and `denoise(noisy, t) -> prediction` (the family's
call of its denoiser, conditioning bound); the objective draws the noise and time values (keyed by example, so a
resumed or multi-process run draws the same), noises, predicts, and returns one loss per example. Targets, time
sampling and loss weights live here, never in the loop. With `base` (--prior_target base_model) the class examples'
target is the frozen base model's prediction for the same noisy latents and time values, read as the trained
model's output is read; with `mask` (--masked_loss) each example's error is mask-weighted (`loss.per_example_mse`).

- `ddpm`: epsilon or v-prediction on a DDPM noise schedule, min-SNR weighting and offset noise (SD 1.x/2.x, SDXL).
- `rectified_flow`: x_t = (1 - sigma) x_0 + sigma eps, target eps - x_0 (or x_0 with SD3's preconditioned
  outputs), sigma drawn by a weighting scheme onto the scheduler's own sigmas, loss weights as in SD3 (SD3, Flux).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from .devices import to_device
from .loss import diffusion_target, min_snr_weights, per_example_mse
from .noising import example_generators, keyed_normal, noise_batch
from .registry import Registry

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noisy latents, time values) -> prediction
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")


@dataclass(frozen=True)
class Keys:
    """Whose draws these are: every random value of an example comes from its own (seed, kind, position) stream."""

    seed: int
    positions: torch.Tensor
    is_prior: torch.Tensor

    def generators(self, what: str) -> list[torch.Generator]:
        return example_generators(self.seed, what, self.positions, self.is_prior)


class Objective(ABC):
    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]]  # the TrainConfig fields it reads (others of its kind are refused)
    sampler_kind: ClassVar[str]  # the samplers that invert it (sampling.SAMPLERS): "ddpm" or "flow"

    @classmethod
    @abstractmethod
    def from_config(cls, scheduler: Any, cfg: Any, defaults: dict[str, Any]) -> Objective:
        """Built from the model's training noise scheduler, the run's config and the family's defaults (for
        options the user left unset)."""

    @abstractmethod
    def losses(self, denoise: Denoise, latents: torch.Tensor, keys: Keys, base: Denoise | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """One loss per example, shape (N,), for clean `latents` (N, C, H, W); `base` is called on the class
        examples only (their rows of the noisy latents and time values), `mask` is (N, 1, H, W) or None."""


def base_targets(target: torch.Tensor, base: Denoise | None, noisy: torch.Tensor, timesteps: torch.Tensor,
                 is_prior: torch.Tensor, read: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`target` with the class rows replaced by the frozen base model's prediction on those rows' noisy latents,
    passed through `read(output, rows)` as the trained model's output is (SD3's preconditioning)."""
    if base is None or not bool(is_prior.any()):
        return target
    rows = to_device(is_prior, target.device)
    with torch.no_grad():
        teacher = read(base(noisy[rows], timesteps[rows]), rows)
    target = target.clone()
    target[rows] = teacher.to(target.dtype)
    return target


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


@OBJECTIVES.register()
class DDPM(Objective):
    name = "ddpm"
    sampler_kind = "ddpm"
    options = ("prediction_type", "snr_gamma", "offset_noise", "offset_noise_strength")

    def __init__(self, scheduler: Any, snr_gamma: float | None = None, offset_noise: float = 0.0):
        self.scheduler, self.snr_gamma, self.offset_noise = scheduler, snr_gamma, offset_noise

    @classmethod
    def from_config(cls, scheduler: Any, cfg: Any, defaults: dict[str, Any]) -> DDPM:
        return cls(scheduler, cfg.snr_gamma, cfg.offset_noise_strength if cfg.offset_noise else 0.0)

    def losses(self, denoise: Denoise, latents: torch.Tensor, keys: Keys, base: Denoise | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        sched = self.scheduler
        noise, timesteps = noise_batch(latents, keys.seed, keys.positions, keys.is_prior,
                                       sched.config.num_train_timesteps, self.offset_noise)
        noisy = sched.add_noise(latents, noise, timesteps)
        pred = denoise(noisy, timesteps)
        prediction_type = sched.config.prediction_type
        target = diffusion_target(sched, latents, noise, timesteps, prediction_type)
        target = base_targets(target, base, noisy, timesteps, keys.is_prior, lambda out, rows: out)
        weights = min_snr_weights(sched, timesteps, self.snr_gamma, prediction_type) if self.snr_gamma else None
        return per_example_mse(pred, target, weights, mask)


@OBJECTIVES.register()
class RectifiedFlow(Objective):
    name = "rectified_flow"
    sampler_kind = "flow"
    options = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs")

    def __init__(self, scheduler: Any, weighting_scheme: str = "none", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, precondition_outputs: bool = False):
        # the training schedule: the scheduler's own timesteps and sigmas (SD3's are shifted, Flux's are not)
        self.timesteps = scheduler.timesteps.float().cpu()
        self.sigmas = scheduler.sigmas.float().cpu()
        self.weighting_scheme, self.precondition_outputs = weighting_scheme, precondition_outputs
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale

    @classmethod
    def from_config(cls, scheduler: Any, cfg: Any, defaults: dict[str, Any]) -> RectifiedFlow:
        def pick(name: str) -> Any:
            value = getattr(cfg, name)
            return defaults.get(name) if value is None else value

        return cls(scheduler, pick("weighting_scheme") or "none", cfg.logit_mean, cfg.logit_std, cfg.mode_scale,
                   bool(pick("precondition_outputs")))

    def sample_sigmas(self, keys: Keys) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas) per example: u from the weighting scheme's density (diffusers' own sampler, fed
        each example's keyed generator), mapped onto the schedule as the reference scripts do."""
        u = torch.cat([compute_density_for_timestep_sampling(self.weighting_scheme, 1, self.logit_mean,
                                                             self.logit_std, self.mode_scale, generator=g)
                       for g in keys.generators("sigma")])
        n = len(self.timesteps)
        indices = (u * n).long().clamp(0, n - 1)  # `mode` can give u = 1 exactly
        return self.timesteps[indices], self.sigmas[indices]

    def losses(self, denoise: Denoise, latents: torch.Tensor, keys: Keys, base: Denoise | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        noise = keyed_normal(keys.seed, keys.positions, keys.is_prior, tuple(latents.shape[1:]), "noise")
        noise = to_device(noise, latents.device, latents.dtype)
        timesteps, sigmas = self.sample_sigmas(keys)
        timesteps = to_device(timesteps, latents.device)
        sigma = to_device(sigmas, latents.device, latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
        noisy = (1 - sigma) * latents + sigma * noise

        def read(out: torch.Tensor, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
            # SD3: the model's output read as a prediction of x_0
            return out * (-sigma[rows]) + noisy[rows] if self.precondition_outputs else out

        pred = read(denoise(noisy, timesteps))
        target = latents if self.precondition_outputs else noise - latents
        target = base_targets(target, base, noisy, timesteps, keys.is_prior, read)
        weights = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas)
        return per_example_mse(pred, target, to_device(weights, latents.device), mask)
