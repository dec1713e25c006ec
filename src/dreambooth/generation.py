"""`dreambooth generate`: render prompts from a trained output, a training checkpoint or any SD pipeline folder."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from . import schema
from .data import derive_seed
from .devices import DTYPES
from .errors import ConfigError, DataError, DreamBoothError, first_line, is_out_of_memory
from .families import ModelSource, family_of, get_family
from .families.help import family_help, option_default
from .files import save_image_atomic
from .grid import make_grid
from .lora import LORA_WEIGHTS, attach_lycoris, is_lora_output, lycoris_run_file
from .outputs import OutputFolder
from .quiet import quiet_libraries
from .sampling import family_sampler, resolve_sampler, sampler_names
from .schema import at_least, option

log = logging.getLogger("dreambooth")


@dataclasses.dataclass
class GenerateConfig:
    model: str = option(help="Pipeline folder, hub id, or a checkpoint-N folder of a training run")
    prompt: list[str] = option(help="One or more prompts")
    lora: list[str] | None = option(None, "LoRA files or folders to load on top of --model (diffusers or kohya "
                                    "format)")
    lora_scale: float = option(1.0, "Strength of the LoRA(s)", check=at_least(0))
    negative_prompt: str | None = option(None, "Negative prompt")
    num_images: int = option(4, "Images per prompt", check=at_least(1))
    seed: int = option(0, "Seed; image i of a prompt uses a seed derived from (seed, i)")
    num_inference_steps: int = option(25, "Sampler steps", check=at_least(1))
    guidance_scale: float | None = option(None, family_help(
        "Guidance scale (default: the family's: {})", lambda f: f.default_guidance), check=at_least(0))
    sampler: str | None = option(None, family_help(
        "Sampler (default: the model family's: {})", lambda f: f.default_sampler), choices=sampler_names)
    height: int | None = option(None, "Image height (default: the model's)", check=at_least(8))
    width: int | None = option(None, "Image width (default: the model's)", check=at_least(8))
    max_sequence_length: int | None = option(None, family_help(
        "T5 tokens per prompt, at most 512 (default: as the model was trained (its train_config.json), else the "
        "family's: {})", option_default("max_sequence_length")),
                                             check=at_least(1))
    batch_size: int = option(4, "Images per forward pass", check=at_least(1))
    precision: str = option("auto", "Weights precision: auto = fp16 on GPU, fp32 on CPU",
                            choices=("auto", "fp32", "fp16", "bf16"))
    device: str = option("auto", "Device", choices=("auto", "cpu", "cuda", "mps"))
    output_dir: Path = option(Path("samples"), "Where PNGs and grid.png are written")


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()[:limit] or "prompt"


def trained_config(model: str) -> dict[str, Any]:
    """The train_config.json next to a trained output or inside a checkpoint; {} for any other model."""
    path = Path(model).expanduser() / "train_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path} cannot be read ({first_line(e)}); restore it from the run") from None
    if not isinstance(config, dict):
        raise DataError(f"{path} is not a training config (a JSON object); restore it from the run")
    return config


def run_config(model: str) -> dict[str, Any] | None:
    """The training config of what is loaded on top of a base model (a LoRA run's output, a training checkpoint),
    else None: a pipeline folder or hub id, or a full run's output, which is a whole pipeline."""
    path = Path(model).expanduser()
    checkpoint = (path / "state.json").is_file() and (path / "train_config.json").is_file()
    return trained_config(model) if checkpoint or is_lora_output(path) else None


def inference_source(model: str) -> ModelSource:
    """The pipeline `model` is loaded from: itself, or the base model (and VAE) its run was trained on."""
    base = run_config(model)
    if base is None:
        return ModelSource(model)
    if not isinstance(base.get("pretrained_model_name_or_path"), str):
        raise DataError(f"{Path(model).expanduser() / 'train_config.json'} names no base model "
                        "(pretrained_model_name_or_path); restore it from the run")
    return ModelSource(base["pretrained_model_name_or_path"], base.get("revision"), base.get("variant"),
                       vae=base.get("pretrained_vae_model_name_or_path"))


def model_inputs(model: str | None, flag: str = "--model") -> dict[str, str | None]:
    """Every model folder a command reads through `model`, named for errors: the OutputFolder / check_inputs
    `models` that keep its output out of them (a run is read with the base model its train_config.json names)."""
    if model is None:
        return {flag: None}
    if run_config(model) is None:
        return {flag: model}
    source = inference_source(model)
    return {flag: model, f"{flag}'s base model": source.name_or_path, f"{flag}'s VAE": source.vae}


def check_sequence_length(model: str, length: int | None) -> None:
    """Refuse, before anything loads, a T5 length (the flag's, else the model's train_config.json's) longer than
    the model's T5 reads; families without T5 ignore it."""
    resolved = sampling_options(model, length).max_sequence_length
    if resolved is None:
        return
    family = get_family(inference_source(model))
    limit = getattr(family, "max_sequence_length_limit", None) if getattr(family, "t5_part", None) else None
    if limit is None or resolved <= limit:
        return
    where = "" if length is not None else f" (from {Path(model).expanduser() / 'train_config.json'})"
    raise ConfigError("max_sequence_length", resolved, f"{family.name} models read at most {limit} T5 tokens per "
                      f"prompt{where}; pass --max_sequence_length {limit} or less")


def sampling_options(model: str, max_sequence_length: int | None, fallback: int | None = None) -> SimpleNamespace:
    """The run options a pipeline call reads (`family.pipeline_kwargs`): the T5 length is the flag's, else the one
    the model was trained with (its train_config.json), else `fallback`, else the family's default; the text
    encoder's layers are the ones it was trained with."""
    trained = trained_config(model)
    length = max_sequence_length or trained.get("max_sequence_length") or fallback
    # a Flux.2 model samples with the hidden layers it was trained on
    return SimpleNamespace(max_sequence_length=length, text_encoder_out_layers=trained.get("text_encoder_out_layers"))


def load_for_inference(model: str, dtype: torch.dtype, lora: list[str] | None = None,
                       lora_scale: float = 1.0) -> Any:
    """A pipeline from a model folder/hub id, a training checkpoint (base model + its trained modules) or a LoRA
    run's output (base model + its LoRA file); `lora` adds LoRA files or folders on top."""
    path = Path(model).expanduser()
    lora_run = is_lora_output(path)
    checkpoint = not lora_run and run_config(model) is not None  # its trained modules replace the base's
    source = inference_source(model)
    pipe = get_family(source).load_pipeline(source, dtype)
    if checkpoint:
        for name in (family_of(pipe).denoiser_name, *(n for n in pipe.components if n.startswith("text_encoder"))):
            if (path / name).is_dir():
                module = getattr(pipe, name)
                setattr(pipe, name, type(module).from_pretrained(path / name, dtype=dtype,
                                                                 use_safetensors=True))
    adapters = ([str(path)] if lora_run else []) + list(lora or [])
    for i, adapter in enumerate(adapters):
        load_lora(pipe, adapter, f"lora{i}")
    if adapters:
        pipe.set_adapters([f"lora{i}" for i in range(len(adapters))], [lora_scale] * len(adapters))
    return pipe


def load_lora(pipe: Any, adapter: str, name: str) -> None:
    """One LoRA file, or a folder holding pytorch_lora_weights.safetensors, onto the pipeline; one-line errors."""
    path = Path(adapter).expanduser()
    if path.suffix != ".safetensors" and not (path / LORA_WEIGHTS).is_file():
        raise DataError(f"no LoRA weights at {path}: pass a .safetensors file or a folder that holds {LORA_WEIGHTS}")
    kwargs = {"weight_name": path.name} if path.is_file() else {}
    file = path if path.is_file() else path / LORA_WEIGHTS
    configs = lycoris_run_file(file)
    if configs is not None:  # a LoKr / LoHa run's own file: peft attaches it to every family alike
        attach_lycoris(pipe, file, configs, name)
        return
    try:
        with _unlogged("diffusers.loaders.peft"):  # it logs the failure it raises, state dict and all
            pipe.load_lora_weights(str(path.parent if path.is_file() else path), adapter_name=name, **kwargs)
    except DreamBoothError:
        raise
    except Exception as e:  # diffusers' and peft's conversions fail in any way (asserts, KeyError, shape errors)
        fix = ("free memory or load it at a lower --precision" if is_out_of_memory(e) else
               "it must be a LoRA for this base model, in diffusers or kohya format")
        raise DataError(f"cannot load the LoRA {path} onto {type(pipe).__name__} ({_reason(e)}); {fix}") from None


@contextmanager
def _unlogged(logger: str) -> Iterator[None]:
    """A library logger silenced for a call whose failure becomes our one-line error."""
    log_of = logging.getLogger(logger)
    level = log_of.level
    log_of.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log_of.setLevel(level)


def _reason(error: BaseException, limit: int = 300) -> str:
    """A library's failure to load a LoRA in one line: its first line (with the next where it ends in a colon, as
    torch's "Error(s) in loading state_dict for ...:" does), or its type where it says nothing (diffusers'
    converters assert)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return f"{type(error).__name__} while converting its keys to this model's layout"
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text[:limit]


def resolve_device(name: str) -> torch.device:
    """--device auto: the GPU when there is one."""
    return torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")


def open_pipeline(model: str, sampler: str | None, precision: str = "auto", device: str = "auto",
                  lora: list[str] | None = None, lora_scale: float = 1.0) -> tuple[Any, torch.device]:
    """A pipeline ready to sample: loaded at the precision asked, on the device, with the sampler set (None: the
    family's default)."""
    dev = resolve_device(device)
    dtype = DTYPES.get(precision) or (torch.float16 if dev.type == "cuda" else torch.float32)
    if dtype == torch.float16 and dev.type == "cpu":
        raise ConfigError("precision", "fp16", "fp16 needs a GPU; use fp32 or bf16 on CPU")
    pipe = load_for_inference(model, dtype, lora, lora_scale).to(dev)
    family = family_of(pipe)
    _, pipe.scheduler = family_sampler(family, sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dev


@torch.no_grad()
def render(pipe, prompt: str, seeds: list[int], batch_size: int, device: torch.device, guidance_scale: float,
           negative_prompt: str | None = None, **kwargs: Any) -> list:
    """One image per seed for `prompt`; image i depends only on seeds[i], not on the batch it falls in."""
    family = family_of(pipe)
    images = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        guidance = family.guidance(guidance_scale, len(chunk), negative_prompt)
        images += pipe(prompt=[prompt] * len(chunk), **guidance,
                       generator=[torch.Generator(device).manual_seed(s) for s in chunk], **kwargs).images
    return images


def generate(config: GenerateConfig | dict | str | Path | None = None, **overrides: Any) -> list[Path]:
    """Render each prompt num_images times; write one PNG per image and a grid (a row per prompt).

    Returns:
        The paths of the written images, grid last.
    """
    values = schema.values_of(config, GenerateConfig)
    cfg = schema.build(GenerateConfig, {**values, **overrides})
    quiet_libraries()
    check_sequence_length(cfg.model, cfg.max_sequence_length)
    written: list[Path] = []
    with OutputFolder(cfg.output_dir, "generate", inputs={f"--lora {p}": p for p in cfg.lora or []},
                      models=model_inputs(cfg.model),
                      kept=lambda: f"the {len(written)} image(s) written before are kept") as out:
        pipe, device = open_pipeline(cfg.model, cfg.sampler, cfg.precision, cfg.device, cfg.lora, cfg.lora_scale)
        out.claim()
        family = family_of(pipe)
        if cfg.negative_prompt and "negative_prompt" not in inspect.signature(pipe.__call__).parameters:
            raise ConfigError("negative_prompt", cfg.negative_prompt, f"{type(pipe).__name__} takes no negative "
                              "prompt; remove it")
        guidance = cfg.guidance_scale if cfg.guidance_scale is not None else family.default_guidance
        settings = {"negative_prompt": cfg.negative_prompt, "steps": cfg.num_inference_steps, "model": cfg.model,
                    "sampler": resolve_sampler(cfg.sampler, family), "guidance_scale": guidance}
        extra = family.pipeline_kwargs(sampling_options(cfg.model, cfg.max_sequence_length))  # SD3's T5 length
        # the pipeline's own default size where none is given (not every pipeline takes None: Krea 2)
        size = {k: v for k, v in (("height", cfg.height), ("width", cfg.width)) if v is not None}
        all_images = []
        for p_index, prompt in enumerate(cfg.prompt):
            seeds = [derive_seed(cfg.seed, i) for i in range(cfg.num_images)]
            images = render(pipe, prompt, seeds, cfg.batch_size, device, guidance,
                            negative_prompt=cfg.negative_prompt, num_inference_steps=cfg.num_inference_steps,
                            **size, **extra)
            for i, (seed, img) in enumerate(zip(seeds, images)):
                path = out.entry(f"{p_index:02d}-{slug(prompt)}-{i:03d}.png")
                save_image_atomic(img, path, pnginfo=_pnginfo({"prompt": prompt, "seed": seed, **settings}))
                written.append(path)
                all_images.append(img)
        grid = out.entry("grid.png")
        save_image_atomic(make_grid(all_images, cols=cfg.num_images), grid)
    log.info("wrote %d image(s) and %s", len(written), grid)
    return [*written, grid]


def _pnginfo(parameters: dict[str, Any]):
    """What made the image, as PNG text (`parameters`, JSON)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(parameters))
    return info
