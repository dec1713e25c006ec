"""The DreamBooth loss as small pure functions: DDPM targets, min-SNR weights, per-example MSE and the two-part
loss that prior preservation adds up."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from diffusers.training_utils import compute_snr

from .devices import to_device


class LossParts(NamedTuple):
    loss: torch.Tensor  # what is back-propagated: instance + lambda * prior
    instance: torch.Tensor  # weighted MSE on the instance examples
    prior: torch.Tensor  # weighted MSE on the class (prior-preservation) examples; 0 when there are none


def diffusion_target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the denoiser should predict: the noise (epsilon) or the velocity (v-prediction, SD 2.x 768)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-example weights min(SNR, gamma) / SNR (Hang et al. 2023); v-prediction divides by SNR + 1."""
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def per_example_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of each example (N,), times its weight when given (min-SNR, SD3's sigma weighting).

    A `mask` (N, 1, H, W) of non-negative weights at latent size (--masked_loss) makes it the mask-weighted mean,
    sum(m * err^2) / sum(m) over each example's elements, so a masked example's loss keeps the scale of an unmasked
    one however small its subject is; a mask of ones gives the plain mean; an empty mask (a random crop that missed
    the subject) gives 0, not 0/0."""
    err = (pred.float() - target.float()).pow(2)
    if mask is None:
        per_example = err.flatten(1).mean(dim=1)
    else:
        m = mask.float().expand_as(err)
        per_example = (m * err).flatten(1).sum(dim=1) / m.flatten(1).sum(dim=1).clamp_min(1e-12)
    if weights is not None:
        per_example = per_example * weights.float().flatten()
    return per_example


def dreambooth_loss(per_example: torch.Tensor, is_prior: torch.Tensor, prior_loss_weight: float) -> LossParts:
    """loss(instance) + lambda * loss(prior), each the mean over its own examples of the per-example losses.

    Args:
        per_example: one loss per example (N,), from the family's objective.
        is_prior: bool (N,), True for class (prior-preservation) examples.
        prior_loss_weight: lambda.
    """
    is_prior = to_device(is_prior, per_example.device)
    instance = per_example[~is_prior].mean()
    prior = per_example[is_prior].mean() if bool(is_prior.any()) else per_example.new_zeros(())
    return LossParts(instance + prior_loss_weight * prior, instance, prior)


def loss_mask(batch: dict[str, Any], latents: torch.Tensor, background: float) -> torch.Tensor | None:
    """--masked_loss: each example's mask at latent size (area-averaged), `background` where the mask is 0."""
    if batch["masks"] is None:
        return None
    mask = torch.nn.functional.interpolate(to_device(batch["masks"], latents.device, torch.float32),
                                           size=latents.shape[-2:], mode="area")
    return background + (1 - background) * mask
