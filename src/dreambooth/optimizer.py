"""The optimizer of a run: AdamW (fused on GPUs, 8-bit from bitsandbytes) or Prodigy, over parameter groups that each
carry their own learning rate (denoiser, text encoders)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from .errors import DreamBoothError

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger("dreambooth")


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def make_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW over parameter groups that each carry their own lr (denoiser, text encoders); the fused kernel when
    every parameter is on a GPU in fp32 (one launch per step instead of one per tensor). Or Prodigy."""
    kw = {"betas": (cfg.adam_beta1, cfg.adam_beta2), "weight_decay": cfg.adam_weight_decay,
          "eps": cfg.adam_epsilon}
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise DreamBoothError("--optimizer prodigy needs prodigyopt; pip install prodigyopt") from None
        if cfg.learning_rate < 0.1:
            log.warning("Prodigy sets its own step size and is meant to run at --learning_rate 1.0 (given %g)",
                        cfg.learning_rate)
        return Prodigy(groups, **kw, beta3=cfg.prodigy_beta3, decouple=cfg.prodigy_decouple,
                       use_bias_correction=cfg.prodigy_use_bias_correction,
                       safeguard_warmup=cfg.prodigy_safeguard_warmup)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise DreamBoothError("--use_8bit_adam needs bitsandbytes; pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, **kw)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_cuda and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(groups, **kw, fused=fused or None)
