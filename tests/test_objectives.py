"""The training objectives against diffusers' own training utilities and hand-written formulas."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from dreambooth.noising import keyed_normal, noise_batch
from dreambooth.objectives import DDPM, Keys, RectifiedFlow

KEYS = Keys(seed=7, positions=torch.tensor([0, 1, 2, 0]), is_prior=torch.tensor([False, False, False, True]))


def linear_denoiser(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in network: any fixed function of its inputs shows how the objective uses them."""
    return 0.5 * noisy + t.view(-1, 1, 1, 1).float() / 1000


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"])
@pytest.mark.parametrize("precondition", [False, True])
def test_rectified_flow_loss_matches_diffusers_and_the_formula(scheme, precondition):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's training schedule (shifted sigmas)
    objective = RectifiedFlow(scheduler, scheme, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                              precondition_outputs=precondition)
    torch.manual_seed(0)
    latents = torch.randn(4, 4, 8, 8)
    losses = objective.losses(linear_denoiser, latents, KEYS)

    # sigma: diffusers' density, fed each example's own keyed generator, onto the scheduler's schedule
    u = torch.cat([compute_density_for_timestep_sampling(scheme, 1, 0.0, 1.0, 1.29, generator=g)
                   for g in KEYS.generators("sigma")])
    indices = (u * 1000).long().clamp(0, 999)
    t, sigma = scheduler.timesteps[indices], scheduler.sigmas[indices]
    noise = keyed_normal(KEYS.seed, KEYS.positions, KEYS.is_prior, (4, 8, 8), "noise")
    s = sigma.view(-1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise  # x_t = (1 - sigma) x_0 + sigma eps
    pred = linear_denoiser(noisy, t)
    pred, target = (pred * (-s) + noisy, latents) if precondition else (pred, noise - latents)
    by_hand = {"sigma_sqrt": sigma ** -2.0, "cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))}
    weights = by_hand.get(scheme, torch.ones_like(sigma))
    assert torch.allclose(weights, compute_loss_weighting_for_sd3(scheme, sigma).float())
    expected = ((pred - target) ** 2).flatten(1).mean(1) * weights
    # the same operations up to where the weight multiplies (per element or per example): float rounding apart
    assert torch.allclose(losses, expected, rtol=1e-5, atol=1e-7)


def test_rectified_flow_draws_are_keyed_by_example():
    objective = RectifiedFlow(FlowMatchEulerDiscreteScheduler(shift=3.0), "logit_normal")
    t1, s1 = objective.sample_sigmas(KEYS)
    t2, s2 = objective.sample_sigmas(Keys(7, KEYS.positions[[2, 1]], KEYS.is_prior[[2, 1]]))
    assert torch.equal(t1[[2, 1]], t2) and torch.equal(s1[[2, 1]], s2)  # a draw depends on its example only
    assert s1[0] != s1[3]  # the same position as instance and as class example: separate streams
    many = Keys(0, torch.arange(2000), torch.zeros(2000, dtype=torch.bool))
    _, sigmas = RectifiedFlow(FlowMatchEulerDiscreteScheduler(), "logit_normal").sample_sigmas(many)
    # logit-normal(0, 1) on unshifted sigmas: median 0.5, mass away from the ends (about 3.8% outside 0.05..0.95)
    assert abs(sigmas.median().item() - 0.5) < 0.03 and ((sigmas < 0.05) | (sigmas > 0.95)).float().mean() < 0.06


@pytest.mark.parametrize("prediction_type, gamma", [("epsilon", None), ("v_prediction", 5.0)])
def test_ddpm_objective_is_the_usual_denoising_loss(prediction_type, gamma):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    torch.manual_seed(0)
    latents = torch.randn(4, 4, 8, 8)
    losses = DDPM(scheduler, snr_gamma=gamma).losses(linear_denoiser, latents, KEYS)
    noise, t = noise_batch(latents, KEYS.seed, KEYS.positions, KEYS.is_prior, 1000)
    pred = linear_denoiser(scheduler.add_noise(latents, noise, t), t)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    expected = ((pred - target) ** 2).flatten(1).mean(1)
    if gamma:
        alphas = scheduler.alphas_cumprod[t]
        snr = alphas / (1 - alphas)
        expected = expected * torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
    assert torch.allclose(losses, expected, rtol=1e-5)


def frozen_denoiser(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in for the frozen base model: another fixed function, so its target differs from the prediction."""
    return 0.25 * noisy - t.view(-1, 1, 1, 1).float() / 2000


@pytest.mark.parametrize("precondition", [False, True])
def test_base_model_target_replaces_the_class_rows_only_rectified_flow(precondition):
    """--prior_target base_model: the class row's target is the base model's output on that row's own noisy latents
    and time value, read as the trained model's output is read (x_0 under SD3's preconditioning); instance rows keep
    the flow target. Computed by hand from the same keyed draws."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    objective = RectifiedFlow(scheduler, "logit_normal", precondition_outputs=precondition)
    torch.manual_seed(0)
    latents = torch.randn(4, 4, 8, 8)
    seen = []

    def base(noisy, t):
        seen.append(len(noisy))
        return frozen_denoiser(noisy, t)

    losses = objective.losses(linear_denoiser, latents, KEYS, base=base)
    assert seen == [1]  # called on the class example alone
    t, sigma = objective.sample_sigmas(KEYS)
    s = sigma.view(-1, 1, 1, 1)
    noise = keyed_normal(KEYS.seed, KEYS.positions, KEYS.is_prior, (4, 8, 8), "noise")
    noisy = (1 - s) * latents + s * noise

    def read(out):
        return out * (-s) + noisy if precondition else out

    pred, teacher = read(linear_denoiser(noisy, t)), read(frozen_denoiser(noisy, t))
    target = latents if precondition else noise - latents
    target = torch.cat([target[:3], teacher[3:]])
    expected = ((pred - target) ** 2).flatten(1).mean(1) * compute_loss_weighting_for_sd3("logit_normal", sigma)
    assert torch.allclose(losses, expected, rtol=1e-5, atol=1e-7)  # float rounding of the same formula
    assert torch.equal(losses[:3], objective.losses(linear_denoiser, latents, KEYS)[:3])  # instance rows untouched


def test_base_model_target_ddpm_and_the_model_as_its_own_base():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    objective = DDPM(scheduler)
    torch.manual_seed(0)
    latents = torch.randn(4, 4, 8, 8)
    losses = objective.losses(linear_denoiser, latents, KEYS, base=frozen_denoiser)
    noise, t = noise_batch(latents, KEYS.seed, KEYS.positions, KEYS.is_prior, 1000)
    noisy = scheduler.add_noise(latents, noise, t)
    target = torch.cat([noise[:3], frozen_denoiser(noisy, t)[3:]])
    expected = ((linear_denoiser(noisy, t) - target) ** 2).flatten(1).mean(1)
    assert torch.allclose(losses, expected, rtol=1e-5, atol=1e-7)
    # a model that is still its own base has nothing to learn on the class row (the start of every such run)
    assert objective.losses(linear_denoiser, latents, KEYS, base=linear_denoiser)[3] == 0
    # no class rows: the base is never called
    instance_only = Keys(7, KEYS.positions[:3], KEYS.is_prior[:3])
    objective.losses(linear_denoiser, latents[:3], instance_only, base=lambda *a: pytest.fail("called"))
