"""Forward diffusion for a training batch, with every draw keyed by (seed, example position, kind).

Keying the draws (instead of using a global RNG) makes a run exactly reproducible across resumes and across
process counts; see data/dataset.py.
"""

from __future__ import annotations

import torch

from .data import keyed_generator
from .devices import to_device


def example_generators(seed: int, what: str, positions: torch.Tensor, is_prior: torch.Tensor
                       ) -> list[torch.Generator]:
    """One generator per example of a batch, keyed by (seed, what is drawn, instance or class, the example's
    position in its stream): the only way the training draws anything at random."""
    return [keyed_generator(seed, what, "class" if prior else "instance", int(pos))
            for pos, prior in zip(positions.tolist(), is_prior.tolist())]


def keyed_normal(seed: int, positions: torch.Tensor, is_prior: torch.Tensor, shape: tuple[int, ...], what: str
                 ) -> torch.Tensor:
    """One standard-normal tensor of `shape` per example, drawn from that example's own generator."""
    return torch.stack([torch.randn(shape, generator=g)
                        for g in example_generators(seed, what, positions, is_prior)])


def keyed_timesteps(seed: int, positions: torch.Tensor, is_prior: torch.Tensor, num_train_timesteps: int
                    ) -> torch.Tensor:
    return torch.tensor([int(torch.randint(0, num_train_timesteps, (), generator=g))
                         for g in example_generators(seed, "timestep", positions, is_prior)])


def sample_latents(mean: torch.Tensor, std: torch.Tensor, seed: int, positions: torch.Tensor, is_prior: torch.Tensor
                   ) -> torch.Tensor:
    """A keyed sample of the VAE posterior: mean + std * eps."""
    eps = to_device(keyed_normal(seed, positions, is_prior, tuple(mean.shape[1:]), "vae"), mean.device, mean.dtype)
    return mean + std * eps


def noise_batch(
    latents: torch.Tensor,
    seed: int,
    positions: torch.Tensor,
    is_prior: torch.Tensor,
    num_train_timesteps: int,
    offset_noise: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and timesteps for each example; offset noise adds a per-channel constant (Guttenberg 2023)."""
    noise = keyed_normal(seed, positions, is_prior, tuple(latents.shape[1:]), "noise")
    if offset_noise > 0:
        channels = (latents.shape[1], 1, 1)
        noise = noise + offset_noise * keyed_normal(seed, positions, is_prior, channels, "offset")
    timesteps = keyed_timesteps(seed, positions, is_prior, num_train_timesteps)
    return to_device(noise, latents.device, latents.dtype), to_device(timesteps, latents.device)
