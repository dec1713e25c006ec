"""The sampler registry's own schedulers: the flow-matching ancestral sampler (euler_a)."""

import numpy as np
import torch
from PIL import Image

import dreambooth
from dreambooth.sampling import SAMPLERS, FlowMatchAncestralScheduler, make_scheduler


def scheduler(steps: int = 8) -> FlowMatchAncestralScheduler:
    s = make_scheduler("euler_a", FlowMatchAncestralScheduler(shift=1.0).config, "flow")
    s.set_timesteps(steps)
    return s


def run(s, x0: torch.Tensor, start: torch.Tensor) -> list[torch.Tensor]:
    """Sample with a perfect model of a single clean latent x0: its velocity at x is (x - x0) / sigma."""
    x, seen = start.clone(), []
    for i, t in enumerate(s.timesteps):
        sigma = float(s.sigmas[i])
        x = s.step((x - x0) / sigma, t, x, return_dict=False)[0]
        seen.append(x)
    return seen


def test_euler_a_is_a_flow_sampler_only_where_noise_is_low():
    assert "euler_a" in SAMPLERS["flow"].names()
    torch.manual_seed(0)
    x0, start = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    s, plain = scheduler(), make_scheduler("euler", FlowMatchAncestralScheduler(shift=1.0).config, "flow")
    plain.set_timesteps(8)
    ours, euler = run(s, x0, start), run(plain, x0, start)
    high = [i for i, sig in enumerate(s.sigmas[:-1].tolist()) if sig >= s.ANCESTRAL_BELOW]
    assert high and len(high) < len(s.timesteps)
    for i in high:  # above the window: the Euler step itself (the same code)
        assert torch.equal(ours[i], euler[i])
    low = len(high)  # the first ancestral step: (1 - s') x0 + s' * fresh noise, not the Euler step
    next_sigma = float(s.sigmas[low + 1])
    fresh = (ours[low] - (1 - next_sigma) * x0) / next_sigma
    assert not torch.allclose(ours[low], euler[low], atol=1e-3)
    assert abs(float(fresh.std()) - 1) < 0.25  # 512 values of unit noise: std within 0.25 of 1 (>10 sigma)
    assert not torch.allclose(fresh[0], fresh[1], atol=0.1)  # each sample its own noise
    # the last step lands on the model's clean latent (sigma' = 0); float32 round-off only
    assert torch.allclose(ours[-1], x0, atol=1e-5)


def test_euler_a_noise_follows_each_sample_not_its_batch():
    torch.manual_seed(0)
    x0, start = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    together = run(scheduler(), x0, start)[-2]  # the last step is noise-free: compare the one before
    alone = run(scheduler(), x0[1:2], start[1:2])[-2]
    assert torch.allclose(together[1:2], alone, atol=1e-6)  # same noise; batched arithmetic round-off only
    assert not torch.allclose(together[0], together[1], atol=1e-2)
    again = run(scheduler(), x0, start)[-2]
    assert torch.equal(again, together)
    reused = scheduler()  # one scheduler for a batch of 1, then (set_timesteps again) for the batch of 3
    run(reused, x0[1:2], start[1:2])
    reused.set_timesteps(8)
    assert torch.equal(run(reused, x0, start)[-2], together)


def test_euler_a_starting_part_way_seeds_from_that_step():
    """img2img pipelines start at set_begin_index(k): the first step taken seeds the noise."""
    torch.manual_seed(0)
    x0, start = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    s = scheduler()
    s.set_begin_index(5)  # sigmas[5] < 0.5: the first step is ancestral
    assert float(s.sigmas[5]) < s.ANCESTRAL_BELOW
    x = s.step((start - x0) / float(s.sigmas[5]), s.timesteps[5], start, return_dict=False)[0]
    assert x.shape == start.shape and not torch.allclose(x[0] - x0[0], x[1] - x0[1], atol=1e-2)


def test_euler_a_on_a_tiny_sd3_pipeline_is_reproducible_per_seed(tmp_path):
    from tiny import make_tiny_sd3

    model = make_tiny_sd3(tmp_path / "sd3", with_t5=False)
    # 8 steps (shift 3): several ancestral steps with sigma' > 0, where each image's own noise enters
    kw = dict(model=str(model), prompt=["a dog"], num_inference_steps=8, sampler="euler_a", max_sequence_length=2)
    one = dreambooth.generate(**kw, num_images=1, seed=3, output_dir=str(tmp_path / "one"))
    two = dreambooth.generate(**kw, num_images=2, seed=3, batch_size=2, output_dir=str(tmp_path / "two"))
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (one[0], two[0]))
    assert np.abs(a - b).max() <= 1  # the same image alone or in a batch (8-bit rounding of batched arithmetic)
