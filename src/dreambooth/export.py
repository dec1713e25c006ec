"""`dreambooth export`: a run's result in the formats other tools load. Exporters are registered by name (the
`--format` choices); where a family has its own layout, the family writes it:

- `kohya`: a LoRA run's adapters in the kohya / AUTOMATIC1111 / ComfyUI key layout: SD and SDXL
  (`lora_unet_*`, `lora_te_*` or `lora_te1_*` / `lora_te2_*`), Flux (Black Forest Labs' fused `double_blocks` /
  `single_blocks` names, CLIP-L as `lora_te1_*`), with `.lora_down`/`.lora_up`/`.alpha`: the single file UIs put in
  their `loras` folder. SD3 has none: its diffusers LoRA file is what ComfyUI loads.
- `comfyui`: the LoRA file ComfyUI loads at the trained strength: the kohya layout where one exists, else (SD3,
  Flux.2, Z-Image, Qwen-Image, Krea 2) the diffusers names ComfyUI maps itself, with the `.alpha` tensors it reads
  the strength from.
- `merged`: a LoRA run's adapters fused into the base weights, saved as a full diffusers pipeline.
- `single-file`: a full fine-tune (or a fused LoRA run, or any supported pipeline) in the original layout: SD/SDXL
  checkpoints (UNet, VAE, text encoders), Stability's SD3 file (MMDiT, VAE, CLIP-L/G, T5), the original transformer
  files of Flux.1, Flux.2, Z-Image, Qwen-Image and Krea 2.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import schema
from .devices import DTYPES
from .errors import DataError, DreamBoothError
from .files import staged
from .lora import LORA_WEIGHTS, is_lora_output
from .outputs import check_inputs, writing
from .registry import Registry
from .schema import at_least, option

EXPORTERS: Registry[Callable[[Any], Path]] = Registry("exporter")
exporter = EXPORTERS.register


@dataclasses.dataclass
class ExportConfig:
    model: str = option(help="A run's output folder (or one of its checkpoint-N folders); single-file also takes "
                        "any SD/SDXL pipeline folder")
    format: str = option(help="What to write", choices=lambda: list(EXPORTERS))
    output: Path = option(help="The file (kohya, comfyui, single-file) or folder (merged) to write; must not exist yet")
    lora_scale: float = option(1.0, "Strength the LoRA is fused at (merged, single-file)", check=at_least(0))
    precision: str = option("fp32", "Precision of the written weights", choices=("fp32", "fp16", "bf16"))




def export(config: ExportConfig | dict | str | Path | None = None, **overrides: Any) -> Path:
    """Write a run's result in another format; returns the written path. Nothing existing is overwritten, and a
    failed export leaves nothing behind."""
    cfg = schema.build(ExportConfig, {**schema.values_of(config, ExportConfig), **overrides})
    out = Path(cfg.output).expanduser()
    if out.exists():
        raise DreamBoothError(f"{out} already exists; pass --output with a new path (nothing is overwritten)")
    from .generation import model_inputs

    check_inputs(out, {}, model_inputs(cfg.model), "--output")  # a run's base model too: fused exports read it
    with writing(out):
        try:
            return EXPORTERS[cfg.format](cfg)
        except FileExistsError:
            if not out.exists():
                raise
            raise DreamBoothError(f"{out} appeared while exporting (another export?); it is kept, and this export "
                                  "was not written") from None  # the other export's file stays whole


def _lora_run(cfg: ExportConfig) -> Path:
    folder = Path(cfg.model).expanduser()
    if not is_lora_output(folder):
        raise DataError(f"{folder} is not the output of a --use_lora run (no {LORA_WEIGHTS} beside "
                        f"train_config.json); --format {cfg.format} exports LoRA runs")
    return folder


def run_family(folder: Path) -> str | None:
    """The family a run (run_summary.json) or one of its checkpoints (state.json) recorded, if any."""
    for name in ("run_summary.json", "state.json"):
        try:
            return json.loads((folder / name).read_text())["family"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


@exporter("kohya")
def export_kohya(cfg: ExportConfig) -> Path:
    return _write_lora(cfg, comfyui=False)


@exporter("comfyui")
def export_comfyui(cfg: ExportConfig) -> Path:
    """The LoRA file ComfyUI loads at the trained strength: the kohya layout where the family has one (SD, SDXL,
    Flux), else the diffusers names ComfyUI maps itself (SD3, Flux.2, Z-Image) with an `.alpha` per module."""
    return _write_lora(cfg, comfyui=True)


def _write_lora(cfg: ExportConfig, comfyui: bool) -> Path:
    from safetensors.torch import load_file, save_file

    from .families import FAMILIES, ModelSource, get_family
    from .families.base import ModelFamily
    from .lora_formats import lycoris, with_alphas

    folder = _lora_run(cfg)
    out = Path(cfg.output)
    if out.suffix != ".safetensors":
        raise DreamBoothError(f"--output {out} must be a .safetensors file for --format {cfg.format}")
    train = json.loads((folder / "train_config.json").read_text())
    if train.get("use_dora"):
        raise DreamBoothError(f"--format {cfg.format} writes plain LoRA, and this run trained DoRA (its magnitudes "
                              "would be lost); use the run's pytorch_lora_weights.safetensors, or --format merged")
    alpha = train.get("lora_alpha") or train.get("rank")
    source = ModelSource(train["pretrained_model_name_or_path"], train.get("revision"), train.get("variant"))
    family = FAMILIES[run_family(folder)]() if run_family(folder) else get_family(source)
    state = load_file(folder / LORA_WEIGHTS)
    kind = train.get("adapter", "lora")
    if kind != "lora":  # LoKr / LoHa: LyCORIS's layout, which both formats mean for them
        state = lycoris(state, alpha, train.get("rank"), family.denoiser_name, family.lycoris_prefix)
    elif comfyui and type(family).kohya_lora is ModelFamily.kohya_lora:
        state = with_alphas(state, alpha)
    else:
        state = family.kohya_lora(state, alpha, train.get("rank"), source)
    metadata = {"ss_network_module": "networks.lora" if kind == "lora" else "lycoris.kohya",
                **({} if kind == "lora" else {"ss_network_args": json.dumps({"algo": kind})}),
                "ss_network_dim": str(train.get("rank")),
                "ss_network_alpha": str(alpha), "ss_base_model": str(train.get("pretrained_model_name_or_path"))}
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out, exclusive=True) as tmp:
        save_file({k: v.to(DTYPES[cfg.precision]).contiguous() for k, v in state.items()}, str(tmp),
                  metadata=metadata)
    return out


def _full_pipeline(cfg: ExportConfig) -> Any:
    """The model as one pipeline in fp32: a pipeline folder, a full run or checkpoint, or a LoRA run with its
    adapters fused in at --lora_scale."""
    from .generation import load_for_inference

    pipe = load_for_inference(cfg.model, torch.float32)
    if is_lora_output(Path(cfg.model).expanduser()):
        # every part with adapters (Flux's fuse_lora would leave its text encoder out by default)
        pipe.fuse_lora(components=list(pipe._lora_loadable_modules), lora_scale=cfg.lora_scale)
        pipe.unload_lora_weights()
    return pipe


@exporter("merged")
def export_merged(cfg: ExportConfig) -> Path:
    _lora_run(cfg)
    pipe = _full_pipeline(cfg).to(DTYPES[cfg.precision])
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out, exclusive=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


@exporter("single-file")
def export_single_file(cfg: ExportConfig) -> Path:
    """One .safetensors in the original SD / SDXL key layout (UNet, VAE, text encoders), as A1111 and ComfyUI
    load checkpoints; a LoRA run is fused first."""
    from safetensors.torch import save_file

    from .families import family_of

    out = Path(cfg.output)
    if out.suffix != ".safetensors":
        raise DreamBoothError(f"--output {out} must be a .safetensors file for --format single-file")
    pipe = _full_pipeline(cfg)
    state = family_of(pipe).single_file_state(pipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged(out, exclusive=True) as tmp:
        save_file({k: v.to(DTYPES[cfg.precision]).contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"format": "pt"})
    return out
