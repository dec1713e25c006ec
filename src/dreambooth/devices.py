"""Moving tensors and modules between devices: host tensors to the GPU without making the host wait, loaded
modules lent to the GPU in another dtype and given back untouched."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# the one table of precision names (--mixed_precision, --save_precision, --prior_generation_precision, export and
# generate --precision) to dtypes; "no" and "fp32" both mean full precision
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def reduced_dtype(precision: str | None) -> torch.dtype | None:
    """The half-precision dtype a precision name asks for, None for full precision (or none named)."""
    dtype = DTYPES.get(precision) if precision else None
    return None if dtype is None or dtype == torch.float32 else dtype


def to_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on `device` (and in `dtype`). To a GPU it goes through pinned memory and is not waited for: a
    copy from pageable memory would make the host wait until the GPU finished all the work queued before it,
    every step, leaving the GPU idle while Python queues the next step."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.to(device, dtype)


def kept_in_fp32(module: torch.nn.Module, dtype: torch.dtype) -> tuple[str, ...]:
    """The submodule names a model keeps in fp32 when it is loaded in `dtype`: a diffusers model its
    `_keep_in_fp32_modules` in any dtype; a transformers model those under fp16 only (e.g. T5's `wo` layers) and
    its `_keep_in_fp32_modules_strict` under fp16 and bf16."""
    from diffusers import ModelMixin

    if dtype == torch.float32:
        return ()
    if isinstance(module, ModelMixin):
        return tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    names = list(getattr(module, "_keep_in_fp32_modules_strict", None) or []) if dtype in (
        torch.float16, torch.bfloat16) else []
    if dtype == torch.float16:
        names += list(getattr(module, "_keep_in_fp32_modules", None) or [])
    return tuple(names)


def _place(sub: torch.nn.Module, device: torch.device | str, dtype: torch.dtype, computed_kept: bool = False
           ) -> None:
    """A submodule's own parameters and buffers on `device`, the floating ones in `dtype` (each a new tensor);
    with `computed_kept`, buffers computed at init rather than stored (non-persistent: a Qwen3 rotary embedding's
    fp32 `inv_freq`) keep their dtype, as transformers' `from_pretrained(dtype=...)` leaves them."""
    for p in sub._parameters.values():
        if p is not None:
            p.data = p.data.to(device, dtype if p.is_floating_point() else None)
    computed = sub._non_persistent_buffers_set if computed_kept else ()
    for k, b in sub._buffers.items():
        if b is not None:
            sub._buffers[k] = b.to(device, dtype if b.is_floating_point() and k not in computed else None)


def _computed_buffers_kept(module: torch.nn.Module) -> bool:
    """Whether loading this model in a dtype leaves its computed buffers as they are (transformers models do;
    diffusers casts the whole model)."""
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def _dtype_of(prefix: str, kept: tuple[str, ...], dtype: torch.dtype) -> torch.dtype:
    """The dtype of the submodule at `prefix` when its model is cast to `dtype` (fp32 inside a kept module)."""
    parts = set(prefix.split("."))
    return torch.float32 if any(k in parts for k in kept) else dtype


@contextmanager
def lent(modules: list[torch.nn.Module], device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """The modules on `device` in `dtype` for a while, cast as `from_pretrained(dtype=...)` loads them (integer
    tensors and the parts a model keeps in fp32 are not cast); afterwards each parameter and buffer is its own
    tensor again, untouched. So fp32 weights loaded once for training can sample class images in fp16 on the GPU
    first: no second load from disk, and no round trip of the trained weights through fp16."""
    device = torch.device(device)
    own: list[tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, Any]]] = []
    try:
        for module in modules:
            kept, computed = kept_in_fp32(module, dtype), _computed_buffers_kept(module)
            for prefix, sub in module.named_modules():
                params = {k: p.data for k, p in sub._parameters.items() if p is not None}
                own.append((sub, params, dict(sub._buffers)))
                _place(sub, device, _dtype_of(prefix, kept, dtype), computed)
        yield
    finally:
        for sub, params, buffers in reversed(own):  # a tied parameter gets its first-seen (own) tensor
            for k, data in params.items():
                sub._parameters[k].data = data
            sub._buffers.update(buffers)


# -- parked modules ---------------------------------------------------------------------------------------------
# A module the run promises not to use while it trains (a frozen text encoder whose output is cached) waits in host
# memory. On a GPU, a call to it anyway would return host tensors that meet the GPU's at the next operation: a crash
# no CPU run shows, where host and compute device are one. With DREAMBOOTH_GUARD_PARKED=1 (the test suite sets it)
# a parked module refuses to run at all, so the CPU tests find such calls.
GUARD_ENV = "DREAMBOOTH_GUARD_PARKED"


class ParkedModuleCalled(RuntimeError):
    """A parked module ran (DREAMBOOTH_GUARD_PARKED=1): on a GPU this call would mix devices."""


def _refuse(module: torch.nn.Module, args: Any) -> None:
    raise ParkedModuleCalled(f"{type(module).__name__} is parked in host memory while the run trains (its output "
                             "was cached) and must not run; on a GPU this call would mix host and GPU tensors")


def park(module: torch.nn.Module) -> None:
    """`module` off the compute device, into host memory, until `unparked`."""
    import os

    module.to("cpu")
    if os.environ.get(GUARD_ENV) == "1" and getattr(module, "_dreambooth_guard", None) is None:
        module._dreambooth_guard = module.register_forward_pre_hook(_refuse)


@contextmanager
def unparked(modules, device: torch.device | str) -> Iterator[None]:
    """Parked (or any) modules on `device` for a while, allowed to run (validation renders with every text
    encoder); each goes back where it was afterwards, parked ones guarded again."""
    homes = []
    try:
        for module in modules:
            guard = getattr(module, "_dreambooth_guard", None)
            homes.append((module, next(module.parameters()).device, guard is not None))
            if guard is not None:
                guard.remove()
                module._dreambooth_guard = None
            module.to(device)
        yield
    finally:
        for module, home, guarded in homes:
            module.to(home)
            if guarded:
                module._dreambooth_guard = module.register_forward_pre_hook(_refuse)


def cast_as_loaded(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """`module` on `device` in `dtype` as `from_pretrained(dtype=...)` would load it: the parts the model keeps in
    fp32 (T5's `wo` layers under fp16) stay fp32, integer tensors keep their type."""
    kept, computed = kept_in_fp32(module, dtype), _computed_buffers_kept(module)
    for prefix, sub in module.named_modules():  # tensor by tensor: the fp32 model never wholly on the device
        _place(sub, device, _dtype_of(prefix, kept, dtype), computed)
    return module
