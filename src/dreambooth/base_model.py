"""The frozen base model, whose own prediction is the class examples' target under --prior_target base_model.

For LoRA it is the trained denoiser itself with its adapters switched off for the call: no second copy. For a full
fine-tune it is a copy made before training starts (and before a checkpoint is restored, so a resumed run's base is
still the base), in the compute dtype, on the device or offloaded layer by layer to CPU memory. Either way it is
conditioned on the class example's class prompt as the untouched text encoders encode it (once, before training), so
a trained text encoder cannot drift the target along with the prediction.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from .families import Components, ModelFamily
from .objectives import Denoise


class BaseModel:
    def __init__(self, copy_: torch.nn.Module | None, prompts: dict[str, torch.Tensor]):
        """`prompts`: the run's prompts as the untouched encoders encode them, a row per prompt id (a class
        example's prompt id is its class prompt's)."""
        self.copy, self.prompts = copy_, prompts  # copy None: LoRA, the adapters are switched off instead

    @classmethod
    def frozen_copy(cls, denoiser: torch.nn.Module, device: torch.device, dtype: torch.dtype, offload: bool,
                    prompts: dict[str, torch.Tensor]) -> BaseModel:
        """For a full fine-tune: a copy of the denoiser as loaded, frozen in the compute dtype."""
        frozen = copy.deepcopy(denoiser).requires_grad_(False).eval().to(dtype=dtype)
        if offload:
            from accelerate import cpu_offload

            cpu_offload(frozen.to("cpu"), execution_device=device)
        else:
            frozen.to(device)
        return cls(frozen, prompts)

    @classmethod
    def adapters_off(cls, prompts: dict[str, torch.Tensor]) -> BaseModel:
        return cls(None, prompts)

    def denoise(self, family: ModelFamily, c: Components, trained: torch.nn.Module, batch: dict[str, Any],
                rows: torch.Tensor, cfg: Any, autocast: Any = nullcontext) -> Denoise:
        """The base model's call on the class examples (`rows` of `batch`), class-prompt conditioning bound.
        `trained` is the denoiser being trained, unwrapped (LoRA's base); `autocast` the run's autocast context."""
        model = self.copy if self.copy is not None else trained
        ids = batch["prompt_ids"][rows]
        cond = {k: v[ids.to(v.device)] for k, v in self.prompts.items()}
        size = len(rows)
        sliced = {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == size else v
                  for k, v in batch.items()}
        call = family.denoiser_call(c, model, cond, sliced, cfg)

        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            with self.base_weights(model), autocast():
                return call(noisy, timesteps)

        return denoise

    @contextmanager
    def base_weights(self, model: torch.nn.Module) -> Iterator[None]:
        if self.copy is not None:
            yield
            return
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()
