"""--torch_compile: the trained models compiled block by block, in place (regional compilation).

Every list of repeated blocks (a `ModuleList` whose children share one class: UNet attention and resnet blocks,
SD3/Flux transformer blocks, CLIP encoder layers) has each block compiled in place with `Module.compile`; blocks of
one class share their compiled code (PyTorch inlines module calls and guards on shapes, not on which block it
is), so compiling costs one block per class and shape instead of the whole model. The glue between blocks (time
embedding, conv in/out) stays eager. In place, rather than accelerate's `compile_regions`: that wraps every other
child in an `OptimizedModule`, which breaks diffusers' UNet (`if self.conv_norm_out:` calls the wrapper's
`__len__`, which raises) and renames nothing but changes the module tree the rest of the run walks.

Shapes are static (`dynamic=False`): a training step's shapes do not change, and symbolic shapes made inductor
fail on the UNet's attention (seen on CPU, torch 2.13); a block class met at several shapes (an SD UNet's resnet
blocks: a dozen channel and resolution variants; class-image sampling adds its own dtype and batch) compiles once
per variant. PyTorch keeps 8 variants per function by default and runs every further one eagerly, without a word:
the limits are raised so that every variant compiles (`RECOMPILE_LIMIT`).
"""

from __future__ import annotations

import torch


def repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost blocks that repeat: children of a ModuleList whose children all share one class."""
    found: list[torch.nn.Module] = []

    def visit(m: torch.nn.Module) -> None:
        children = list(m.children())
        if isinstance(m, torch.nn.ModuleList) and children and all(type(c) is type(children[0]) for c in children):
            found.extend(children)
            return
        for child in children:
            visit(child)

    visit(module)
    return found


RECOMPILE_LIMIT = 64  # variants per block class (train and sample, each shape and dtype); the default is 8


def compile_blocks(module: torch.nn.Module, mode: str) -> int:
    """Compile each repeated block of `module` in place (inductor, `mode`); returns how many."""
    import torch._dynamo.config as dynamo

    # (named cache_size_limit before torch 2.7; both names are accepted after)
    old = not hasattr(dynamo, "recompile_limit")
    for name, least in (("recompile_limit", RECOMPILE_LIMIT), ("accumulated_recompile_limit", 8 * RECOMPILE_LIMIT)):
        name = name.replace("recompile", "cache_size") if old else name
        setattr(dynamo, name, max(getattr(dynamo, name), least))
    blocks = repeated_blocks(module)
    for block in blocks:
        block.compile(backend="inductor", mode=None if mode == "default" else mode, dynamic=False)
    return len(blocks)

