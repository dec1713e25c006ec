"""--torch_compile: repeated blocks compiled in place (compilation.py). On the CPU the compiler backend is
`aot_eager` (dynamo's tracing and AOT autograd, as inductor gets them, without inductor's C++ build, which takes
minutes here); tests/test_gpu.py runs inductor itself, with CUDA graphs too."""

from __future__ import annotations

import copy

import pytest
import torch

import dreambooth
from dreambooth.compilation import compile_blocks, repeated_blocks
from test_training import max_diff, weights


@pytest.fixture
def traced(monkeypatch):
    """Module.compile with the aot_eager backend; the classes of the blocks it was called on. Each test starts from
    an empty compile cache, and a block that would fall back to eager (its class's variants past the recompile
    limit) fails the test instead."""
    import torch._dynamo

    torch._dynamo.reset()
    real, calls = torch.nn.Module.compile, []

    def compile(self, *args, **kwargs):
        calls.append(type(self).__name__)
        kwargs.update(backend="aot_eager", mode=None)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", compile)
    config = torch._dynamo.config
    # (config.patch, not monkeypatch: the limits compile_blocks raises come back to the process's own afterwards)
    with config.patch(fail_on_recompile_limit_hit=True, recompile_limit=config.recompile_limit,
                      accumulated_recompile_limit=config.accumulated_recompile_limit):
        yield calls
    torch._dynamo.reset()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_compiled_blocks_train_what_eager_trains(base_args, tmp_path, traced, lora):
    """Every repeated block of the UNet (attention, resnet, up/down samplers; LoRA adapters inside them) runs
    compiled, the UNet itself stays a plain module (diffusers' `if self.conv_norm_out:` works), checkpoints and the
    result save as without compiling. aot_eager's decompositions reorder some float operations: losses agree to
    1e-5 relative and weights to 1e-5 (seen: 3e-8 relative)."""
    extra = dict(use_lora=True, rank=4, learning_rate=1e-2) if lora else {}
    # (no class images: compiled ones are other images, so the two runs would train on different data)
    common = dict(max_train_steps=3, checkpointing_steps=2, with_prior_preservation=False, class_prompt=None,
                  class_data_dir=None, **extra)
    eager = dreambooth.train(**base_args(output_dir=str(tmp_path / "eager"), **common))
    assert traced == []
    compiled = dreambooth.train(**base_args(output_dir=str(tmp_path / "compiled"), torch_compile=True, **common))
    assert {"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"} <= set(traced)
    assert "UNet2DConditionModel" not in traced
    assert compiled["mean_loss"] == pytest.approx(eager["mean_loss"], rel=1e-5)
    if not lora:
        for part in ("unet", "checkpoint-2/unet"):
            a, b = weights(tmp_path / "eager", part), weights(tmp_path / "compiled", part)
            assert a.keys() == b.keys() and max_diff(a, b) < 1e-5, part


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(self.linear(x)) + x


def test_every_variant_of_a_block_class_compiles(traced):
    """An SD UNet's resnet blocks come in about a dozen shape variants (more with sampling's dtype and batch), past
    PyTorch's default of 8 compiled variants per function, beyond which blocks run eagerly without a word (here:
    fail). Twelve widths of one block class, trained and sampled: every variant compiles."""
    blocks = torch.nn.ModuleList([Block(w) for w in range(2, 14)])
    assert compile_blocks(torch.nn.Sequential(blocks), "default") == 12
    for block in blocks:
        x = torch.randn(2, block.linear.in_features)
        block(x).sum().backward()
        with torch.no_grad():
            block(x[:1])


def test_repeated_blocks_are_the_outermost_lists_of_one_class():
    inner = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    mixed = torch.nn.ModuleList([torch.nn.Sequential(inner), torch.nn.ReLU()])
    outer = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(2, 2)) for _ in range(3)])
    model = torch.nn.ModuleDict({"mixed": mixed, "outer": outer})
    assert repeated_blocks(model) == [*inner, *outer]  # inside the mixed list; not inside the repeated ones


def test_a_copy_of_a_compiled_block_is_eager_and_runs_its_own_weights():
    """The checkpoint's host copy and the sharded run's twin are deep copies of compiled blocks: each computes with
    its own weights, never the original's, and eagerly (the twin renders rarely: compiling it would be all cost)."""
    model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(3, 3) for _ in range(2)]))
    assert compile_blocks(model, "default") == 2
    block = model[0][0]
    block.compile(backend="eager")  # no compiler build: what matters here is which weights the call uses
    twin = copy.deepcopy(block)
    with torch.no_grad():
        twin.weight.zero_()
        twin.bias.zero_()
    x = torch.ones(1, 3)
    assert torch.equal(twin(x), torch.zeros(1, 3)) and not torch.equal(block(x), torch.zeros(1, 3))
    assert twin._compiled_call_impl is None and block._compiled_call_impl is not None


def test_class_images_sample_with_compiled_blocks_under_names_of_their_own(base_args, tmp_path, traced,
                                                                           monkeypatch):
    """With --torch_compile the class images sample through the compiled blocks too (the one load's denoiser,
    compiled in place before it is lent). Compiled kernels round differently, so these are other images than
    eager ones of the same settings: their names (and so their seeds) differ. From the same seeds (the seed's key
    pinned here) they differ only by rounding: within 2 of 255."""
    import numpy as np
    from accelerate import Accelerator
    from PIL import Image

    import dreambooth.prior as prior
    from dreambooth import schema
    from dreambooth.config import TrainConfig
    from dreambooth.families import ModelSource, get_family
    from dreambooth.prior import ensure_class_images

    monkeypatch.setattr(prior, "image_seed", lambda digest, index: 1000 + index)

    made = {}
    for compiled in (False, True):
        cfg = schema.build(TrainConfig, base_args(class_data_dir=str(tmp_path / str(compiled)), num_class_images=2,
                                                  torch_compile=compiled))
        source = ModelSource(cfg.pretrained_model_name_or_path)
        family = get_family(source)
        ensure_class_images(cfg, family, source, Accelerator(cpu=True), loaded=family.load(source))
        made[compiled] = sorted((tmp_path / str(compiled)).glob("class-*.png"))
    assert "Transformer2DModel" in traced and len(made[True]) == len(made[False]) == 2
    assert {p.name for p in made[True]}.isdisjoint(p.name for p in made[False])
    for a, b in zip(made[False], made[True]):
        diff = np.abs(np.asarray(Image.open(a), dtype=int) - np.asarray(Image.open(b), dtype=int))
        assert diff.max() <= 2
