"""LoRA DreamBooth through peft: adapters on the denoiser (and the text encoders), their state for exact resume,
and the diffusers LoRA file that `pipe.load_lora_weights` reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .errors import ConfigError, DreamBoothError

if TYPE_CHECKING:
    from .families import ModelFamily

ADAPTER_FILE = "adapter.safetensors"  # a checkpoint's exact peft state of one module
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' name: what load_lora_weights looks for


def lora_config(cfg: Any, targets: list[str] | tuple[str, ...]) -> PeftConfig:
    """The adapters' peft config, each starting as a no-op: LoRA with Gaussian A and zero B, as the reference LoRA
    scripts do; LoKr and LoHa (`--adapter`) with peft's LyCORIS initialisation (one factor zero)."""
    kind = getattr(cfg, "adapter", "lora")
    alpha = cfg.lora_alpha or cfg.rank
    if kind == "lokr":
        return LoKrConfig(r=cfg.rank, alpha=alpha, module_dropout=cfg.lora_dropout, target_modules=list(targets),
                          decompose_factor=cfg.lokr_factor, decompose_both=cfg.lokr_decompose_both)
    if kind == "loha":
        return LoHaConfig(r=cfg.rank, alpha=alpha, module_dropout=cfg.lora_dropout, target_modules=list(targets))
    return LoraConfig(r=cfg.rank, lora_alpha=alpha, lora_dropout=cfg.lora_dropout,
                      init_lora_weights="gaussian", target_modules=list(targets), use_dora=cfg.use_dora)


def add_adapters(cfg: Any, denoiser: torch.nn.Module, targets: list[str] | tuple[str, ...],
                 text_encoders: list[torch.nn.Module]) -> None:
    """Freeze the base weights and add trainable adapters (on `targets` of the denoiser, and on the text encoders
    given); they stay fp32 whatever the base weights' dtype, so fp16 mixed precision can unscale their gradients."""
    denoiser.requires_grad_(False)
    denoiser.add_adapter(lora_config(cfg, targets))
    modules = [denoiser]
    for encoder in text_encoders:
        encoder.requires_grad_(False)
        encoder.add_adapter(lora_config(cfg, cfg.text_encoder_lora_target_modules))
        modules.append(encoder)
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                p.data = p.data.float()


def quantization(cfg: Any, compute_dtype: torch.dtype | None) -> dict[str, Any] | None:
    """--quantize_base as from_pretrained keywords: a diffusers BitsAndBytesConfig (int8, or nf4 computing in the
    mixed-precision dtype) and the dtype of the rest of the model."""
    if cfg.quantize_base == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from diffusers import BitsAndBytesConfig
    except ImportError:
        raise DreamBoothError(f"--quantize_base {cfg.quantize_base} needs bitsandbytes; pip install bitsandbytes"
                              ) from None
    compute = compute_dtype or torch.bfloat16
    config = (BitsAndBytesConfig(load_in_8bit=True) if cfg.quantize_base == "int8" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute))
    return {"quantization_config": config, "dtype": compute}


def is_adapted(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "peft_config", None))


def adapter_state(module: torch.nn.Module, copy: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters' tensors, taken through `copy` (to the host; a copy the training cannot change, in the
    background)."""
    return {k: copy(v) for k, v in get_peft_model_state_dict(module, save_embedding_layers=False).items()}


def save_adapter(state: dict[str, torch.Tensor], folder: Path) -> None:
    """A module's `adapter_state` as `folder/adapter.safetensors`."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / ADAPTER_FILE))


def load_adapter(module: torch.nn.Module, folder: Path) -> list[str]:
    """Restore an adapter saved by `save_adapter`; returns the keys the module did not take."""
    result = set_peft_model_state_dict(module, load_file(str(folder / ADAPTER_FILE)))
    return list(getattr(result, "unexpected_keys", []) or [])


LYCORIS_TENSORS = (".lokr_", ".hada_")  # LoKr's and LoHa's tensor names (peft and LyCORIS spell them alike)


def lycoris_run_file(path: Path) -> dict[str, dict[str, Any]] | None:
    """The per-part peft configs of a LoKr / LoHa file a run wrote (peft keys `<part>.<module>.lokr_w1`, each part's
    config in diffusers' `lora_adapter_metadata`), or None for any other file (LoRA: diffusers reads it)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        if not any(marker in key for key in f.keys() for marker in LYCORIS_TENSORS):  # noqa: SIM118 (a safetensors handle, not a dict)
            return None
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    parts: dict[str, dict[str, Any]] = {}
    for key, value in (json.loads(raw) if raw else {}).items():
        part, _, name = key.partition(".")
        parts.setdefault(part, {})[name] = value
    return parts or None


def attach_lycoris(pipe: Any, path: Path, configs: dict[str, dict[str, Any]], name: str) -> None:
    """A run's LoKr / LoHa file onto a pipeline's parts: peft builds the adapters of the recorded configs and takes
    the tensors (diffusers' own loader reads LoKr for Z-Image and Flux.2 only, and LoHa for none)."""
    from peft import inject_adapter_in_model

    state = load_file(str(path))
    for part, fields in configs.items():
        module = getattr(pipe, part, None)
        if module is None:
            raise DreamBoothError(f"{path} adapts a {part} this {type(pipe).__name__} does not have; load it onto "
                                  "the base model it was trained on")
        config = PeftConfig.from_peft_type(**fields)
        inject_adapter_in_model(config, module, adapter_name=name)
        prefix = f"{part}."
        own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(module, own, adapter_name=name)
        missing = [k for k in getattr(result, "missing_keys", []) if name in k and any(
            m.strip(".") in k for m in LYCORIS_TENSORS)]
        if getattr(result, "unexpected_keys", None) or missing:
            raise DreamBoothError(f"{path} does not fit this model's {part} ({len(missing)} adapter tensors "
                                  "missing); load it onto the base model it was trained on")


def is_lora_output(folder: Path) -> bool:
    return (folder / LORA_WEIGHTS).is_file() and (folder / "train_config.json").is_file()


def lora_targets(cfg: Any, family: ModelFamily, config: Any) -> list[str]:
    """The denoiser modules that get adapters: --lora_target_modules (or the family's), in every block or in the
    --lora_blocks given (numbers in the family's `lora_block_list`, e.g. SD3's joint blocks, Flux's double
    blocks)."""
    defaults = family.default_lora_targets if cfg.lora_blocks is not None else family.lora_defaults(config)
    modules = list(cfg.lora_target_modules or defaults)
    if cfg.lora_blocks is None or family.lora_block_list is None:
        return modules
    attribute, count_key = family.lora_block_list
    blocks = config.get(count_key, 0)
    wrong = [b for b in cfg.lora_blocks if not 0 <= b < blocks]
    if wrong:
        raise ConfigError("lora_blocks", cfg.lora_blocks, f"block numbers 0..{blocks - 1} of this model's "
                          f"{attribute}")
    return [f"{attribute}.{b}.{m}" for b in cfg.lora_blocks for m in modules]
