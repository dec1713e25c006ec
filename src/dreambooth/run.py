"""Everything decided before any model loads: input checks, the output folder's owner, resume, the Accelerator."""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed

from . import schema
from .checkpoint import checkpoint_config, find_checkpoint, list_checkpoints
from .config import TrainConfig
from .data import ImageFolder, scan_folder
from .errors import CheckpointError, DataError, DreamBoothError
from .families import ModelFamily, ModelSource, get_family
from .files import write_text_atomic

log = logging.getLogger("dreambooth")

CONFIG_FILE = "train_config.json"
# Settings that define what a run learns; an output folder belongs to one combination of them.
IDENTITY = (
    "pretrained_model_name_or_path", "revision", "variant", "instance_data_dir", "instance_prompt", "class_prompt",
    "with_prior_preservation", "train_text_encoder", "resolution", "use_lora", "pretrained_vae_model_name_or_path",
)


@dataclass
class Run:
    cfg: TrainConfig
    accelerator: Accelerator
    source: ModelSource
    family: ModelFamily
    instance: ImageFolder
    resume_from: Path | None


def identity(values: dict) -> dict:
    out = {k: values.get(k) for k in IDENTITY}
    out["instance_data_dir"] = str(Path(out["instance_data_dir"]).expanduser().resolve())
    return out


def _differences(a: dict, b: dict, keys) -> list[str]:
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """Which checkpoint to resume from; refuse to mix two runs in one output folder."""
    out = Path(cfg.output_dir)
    mine = identity(schema.to_dict(cfg))
    owner_file = out / CONFIG_FILE
    if owner_file.is_file():
        owner = identity(json.loads(owner_file.read_text()))
        diff = _differences(owner, mine, IDENTITY)
        if diff:
            raise CheckpointError(f"output dir {out} belongs to another run ({'; '.join(diff)}); "
                                  "choose a new --output_dir")
    checkpoints = list_checkpoints(out)
    if cfg.resume_from_checkpoint is None:
        if checkpoints:
            raise CheckpointError(f"output dir {out} already holds checkpoints ({checkpoints[-1].name} is the "
                                  "latest); pass --resume_from_checkpoint latest to continue that run, or choose a "
                                  "new --output_dir")
        return None
    ckpt = find_checkpoint(out, cfg.resume_from_checkpoint)
    if ckpt is None:
        log.info("no checkpoint in %s yet: starting a new run", out)
        return None
    previous = checkpoint_config(ckpt)
    diff = _differences(identity(previous), mine, IDENTITY)
    if diff:
        raise CheckpointError(f"checkpoint {ckpt} is from another run ({'; '.join(diff)}); resume with the same "
                              "settings or choose a new --output_dir")
    if cfg.seed is None:
        cfg.seed = previous["seed"]
    now = json.loads(json.dumps(schema.to_dict(cfg)))  # as train_config.json holds it (tuples become lists)
    changed = _differences(previous, now, [k for k in previous if k not in IDENTITY and k != "resume_from_checkpoint"])
    if changed:
        log.warning("resuming %s with changed settings: %s", ckpt.name, "; ".join(changed))
    return ckpt


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise DreamBoothError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
    if cfg.use_8bit_adam and not torch.cuda.is_available():
        raise DreamBoothError("--use_8bit_adam needs a CUDA GPU (bitsandbytes); drop the flag on CPU")
    trackers = None if cfg.report_to == "none" else cfg.report_to
    project = ProjectConfiguration(project_dir=str(cfg.output_dir),
                                   logging_dir=str(Path(cfg.output_dir) / cfg.logging_dir))
    # accelerate keeps one AcceleratorState per Python process; a second train() call may want other settings
    AcceleratorState._reset_state()
    # accelerate only starts CPU (gloo) process groups when told to run on CPU
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                  mixed_precision=cfg.mixed_precision, log_with=trackers, project_config=project,
                                  cpu=cpu_processes, dynamo_backend="inductor" if cfg.torch_compile else None)
    except (ValueError, ImportError) as e:
        raise DreamBoothError(f"cannot set up the run: {str(e).splitlines()[0]}") from None
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def setup(cfg: TrainConfig) -> Run:
    """All checks that need no model weights, then the Accelerator and the seed."""
    source = ModelSource(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant, cfg.tokenizer_name,
                         cfg.pretrained_vae_model_name_or_path)
    family = get_family(source, cfg.family)
    if cfg.resolution is None:
        cfg.resolution = family.default_resolution
    instance = scan_folder(Path(cfg.instance_data_dir), "instance", cfg.resolution)
    if not instance.images:
        raise DataError(f"instance folder {cfg.instance_data_dir} holds no images; add 3-5 photos of the subject "
                        "(.jpg, .png, .webp, ...)")
    if cfg.class_data_dir is not None and Path(cfg.class_data_dir).is_file():
        raise DataError(f"class folder {cfg.class_data_dir} is a file; pass a folder (it is created if missing)")
    resume_from = resolve_resume(cfg)
    accelerator = make_accelerator(cfg)
    if cfg.seed is None:
        drawn = [random.SystemRandom().randrange(2**31)]
        cfg.seed = broadcast_object_list(drawn)[0] if accelerator.num_processes > 1 else drawn[0]
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(cfg.output_dir) / CONFIG_FILE, json.dumps(schema.to_dict(cfg), indent=2))
    return Run(cfg, accelerator, source, family, instance, resume_from)
