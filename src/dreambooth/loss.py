"""The DreamBooth objective as small pure functions: targets, min-SNR weights and the two-part loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers.training_utils import compute_snr


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


def dreambooth_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    is_prior: torch.Tensor,
    prior_loss_weight: float,
    weights: torch.Tensor | None = None,
) -> LossParts:
    """MSE(instance) + lambda * MSE(prior), each the mean over its own examples of a per-example weighted MSE.

    Args:
        pred: model output, shape (N, ...).
        target: regression target, same shape.
        is_prior: bool (N,), True for class (prior-preservation) examples.
        prior_loss_weight: lambda.
        weights: optional per-example weights (N,), e.g. min-SNR.
    """
    per_example = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weights is not None:
        per_example = per_example * weights.float()
    is_prior = is_prior.to(per_example.device)
    instance = per_example[~is_prior].mean()
    prior = per_example[is_prior].mean() if bool(is_prior.any()) else per_example.new_zeros(())
    return LossParts(instance + prior_loss_weight * prior, instance, prior)
