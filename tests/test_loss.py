import torch
from diffusers import DDPMScheduler

from dreambooth.loss import diffusion_target, dreambooth_loss, min_snr_weights, per_example_mse


def test_loss_matches_hand_computation():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    is_prior = torch.tensor([False, False, True])
    parts = dreambooth_loss(per_example_mse(pred, target), is_prior, prior_loss_weight=0.5)
    instance = ((1 + 4) / 2 + (1 + 1) / 2) / 2  # mean over instance examples of per-example MSE
    prior = (4 + 0) / 2
    assert torch.isclose(parts.instance, torch.tensor(instance))
    assert torch.isclose(parts.prior, torch.tensor(prior))
    assert torch.isclose(parts.loss, torch.tensor(instance + 0.5 * prior))


def test_loss_weights_apply_per_example():
    pred, target = torch.ones(2, 3), torch.zeros(2, 3)
    per_example = per_example_mse(pred, target, weights=torch.tensor([2.0, 0.25]))
    parts = dreambooth_loss(per_example, torch.tensor([False, True]), 1.0)
    assert parts.instance.item() == 2.0 and parts.prior.item() == 0.25


def test_without_prior_examples_prior_part_is_zero():
    parts = dreambooth_loss(per_example_mse(torch.ones(2, 4), torch.zeros(2, 4)), torch.tensor([False, False]), 1.0)
    assert parts.prior.item() == 0.0 and parts.loss.item() == 1.0


def test_zero_lambda_gives_prior_examples_no_gradient():
    pred = torch.randn(4, 3, requires_grad=True)
    parts = dreambooth_loss(per_example_mse(pred, torch.zeros(4, 3)), torch.tensor([False, False, True, True]), 0.0)
    parts.loss.backward()
    assert pred.grad[2:].abs().sum() == 0 and pred.grad[:2].abs().sum() > 0


def test_min_snr_weights_match_formula():
    sched = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([1, 500, 999])
    a = sched.alphas_cumprod[t]
    snr = a / (1 - a)
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    assert torch.allclose(min_snr_weights(sched, t, 5.0, "epsilon"), expected, rtol=1e-5)
    assert torch.allclose(min_snr_weights(sched, t, 5.0, "v_prediction"),
                          torch.minimum(snr, torch.tensor(5.0)) / (snr + 1), rtol=1e-5)


def test_targets_epsilon_and_velocity():
    sched = DDPMScheduler(num_train_timesteps=1000)
    latents, noise, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([10, 900])
    assert torch.equal(diffusion_target(sched, latents, noise, t, "epsilon"), noise)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * latents
    assert torch.allclose(diffusion_target(sched, latents, noise, t, "v_prediction"), v, atol=1e-6)


def test_masked_mse_is_the_mask_weighted_mean_and_ignores_what_it_masks_out():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 6, 6, requires_grad=True), torch.randn(2, 4, 6, 6)
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, :, :3] = 1.0  # the top half of example 0
    mask[1] = 0.25  # a uniform mask: the same as no mask at all
    losses = per_example_mse(pred, target, mask=mask)
    err = (pred - target).pow(2)
    assert torch.allclose(losses[0], err[0, :, :3].mean())  # by hand: the mean over the masked region
    assert torch.allclose(losses[1], err[1].mean())
    losses.sum().backward()
    assert pred.grad[0, :, 3:].abs().max() == 0 and pred.grad[0, :, :3].abs().min() > 0  # no gradient outside
    ones = per_example_mse(pred, target, mask=torch.ones(2, 1, 6, 6))
    assert torch.allclose(ones, per_example_mse(pred, target))  # sum/count vs mean: float rounding only
    # a crop that missed the subject: nothing to learn from that example, and no 0/0
    empty = per_example_mse(pred, target, mask=torch.cat([torch.zeros(1, 1, 6, 6), torch.ones(1, 1, 6, 6)]))
    assert empty[0] == 0 and torch.isfinite(empty).all()
