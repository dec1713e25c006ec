"""Resumable checkpoints without pickle: weights, optimizer and RNG tensors in safetensors, the rest in JSON.

Layout of `output_dir/checkpoint-<step>/` (each one loads on its own, without the run that made it):
    unet/, text_encoder/         trained modules in diffusers/transformers format (safetensors), or with LoRA
                                 their adapters' peft state (adapter.safetensors)
    pytorch_lora_weights.safetensors   with LoRA: the adapters as diffusers' LoRA file, for generate
    optimizer.safetensors/.json  optimizer state tensors / param groups and scalar state (with --fsdp:
                                 optimizer-<rank>.*, each process's shard; the weights are gathered as above)
    rng-<rank>.safetensors/.json RNG states of each process
    train_config.json            the resolved config of the run
    state.json                   step, lr-scheduler state, loss totals, wall time
    manifest.json                size and SHA-256 of every file above (written last)
A checkpoint is written to a hidden temporary folder and renamed into place, then `output_dir/latest` is replaced
atomically; a kill at any moment leaves either the previous checkpoint or the new one, never a half one. A save that
fails (disk full) removes its temporary folder. Before resuming, a checkpoint is checked against its manifest, so a
file damaged later (truncated, overwritten) is named instead of failing deep inside a loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, first_line
from .files import write_text_atomic
from .lora import ADAPTER_FILE, is_adapted, load_adapter, save_adapter

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LATEST = "latest"
MANIFEST = "manifest.json"


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints that were completely written (renamed into place), oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT_RE.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def find_checkpoint(output_dir: Path, spec: str) -> Path | None:
    """Resolve --resume_from_checkpoint ("latest", a checkpoint name inside output_dir, or a path) to a checkpoint
    that passes `verify`; a damaged one is named, with the newest intact one offered instead."""
    if spec == LATEST:
        pointer = output_dir / LATEST
        target = output_dir / pointer.read_text().strip() if pointer.is_file() else None
        found = list_checkpoints(output_dir)
        candidate = target if target is not None and (target / "state.json").is_file() else (
            found[-1] if found else None)
    else:
        path = Path(spec).expanduser()
        candidate = path if path.is_absolute() or path.exists() else output_dir / spec
        if not (candidate / "state.json").is_file():
            raise CheckpointError(f"--resume_from_checkpoint {spec}: {candidate} is not a complete checkpoint; use "
                                  f"'latest' or one of: {', '.join(p.name for p in list_checkpoints(output_dir))}")
    if candidate is None:
        return None
    problem = verify(candidate)
    if problem is not None:
        intact = next((p for p in reversed(list_checkpoints(output_dir)) if p != candidate and verify(p) is None),
                      None)
        offer = (f"resume from the newest intact one with --resume_from_checkpoint {intact.name}"
                 if intact is not None else "no intact checkpoint is left: start a new run in a new --output_dir")
        raise CheckpointError(f"checkpoint {candidate} is damaged ({problem}); {offer} (and delete "
                              f"{candidate.name})")
    return candidate


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Size and SHA-256 of every file in a checkpoint folder, as manifest.json."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _digest(p)} for p in files}
    _write_json(folder / MANIFEST, {"files": entries})


def verify(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint's files, or None. Checkpoints from before manifests are checked for readable
    JSON only (their weights are checked when they load)."""
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        for name in ("state.json", "optimizer.json", "train_config.json"):
            try:
                json.loads((checkpoint / name).read_text())
            except (OSError, ValueError):
                return f"{name} is missing or unreadable"
        return None
    try:
        entries = json.loads(manifest_path.read_text())["files"]
        for name, expected in entries.items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != expected["size"]:
                return f"{name} has {size} bytes, {expected['size']} were written"
            if _digest(path) != expected["sha256"]:
                return f"{name} has changed since it was written (SHA-256 differs)"
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    return None


# -- optimizer state as tensors + JSON -------------------------------------------------------------------------

def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# -- RNG states ------------------------------------------------------------------------------------------------

def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py_version, py_internal, py_gauss = random.getstate()
    meta = {"python": [py_version, list(py_internal), py_gauss], "numpy": [np_state[0], *np_state[2:]]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# -- save / load -----------------------------------------------------------------------------------------------

def save_checkpoint(
    output_dir: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    config: dict[str, Any],
    accelerator,
    total_limit: int | None = None,
    extra: Callable[[Path], None] | None = None,
    sharded: bool = False,
) -> Path:
    """Write checkpoint-<step> atomically from all processes (each saves its RNG), then point `latest` at it;
    `extra(folder)` adds files on the main process before the checkpoint counts as complete."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        _write_checkpoint(tmp, step, modules, optimizer, state, config, accelerator, extra, sharded)
    except BaseException:
        if accelerator.is_main_process:  # a failed save (disk full) leaves the previous checkpoints only
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if final.exists():  # a re-run of the same step after resuming from an older checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(output_dir / LATEST, final.name + "\n")
        if total_limit is not None:
            others = [p for p in list_checkpoints(output_dir) if p != final]
            for old in others[: max(0, len(others) - (total_limit - 1))]:  # the new one always survives
                shutil.rmtree(old, ignore_errors=True)
        for stale in output_dir.glob(".checkpoint-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint(tmp: Path, step: int, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                      state: dict[str, Any], config: dict[str, Any], accelerator,
                      extra: Callable[[Path], None] | None, sharded: bool) -> None:
    rank = accelerator.process_index
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, tmp / f"rng-{rank}.safetensors")
    _write_json(tmp / f"rng-{rank}.json", rng_meta)
    if sharded:  # every process its own shard of the optimizer state
        from .sharding import local_optimizer_state

        opt_tensors, opt_meta = _flatten_optimizer(local_optimizer_state(optimizer))
        save_file(opt_tensors, tmp / f"optimizer-{rank}.safetensors")
        _write_json(tmp / f"optimizer-{rank}.json", opt_meta)
    if accelerator.is_main_process:
        for name, module in modules.items():
            if is_adapted(module):
                save_adapter(module, tmp / name)
            else:
                module.save_pretrained(tmp / name, safe_serialization=True)
        if extra is not None:
            extra(tmp)
        if not sharded:
            opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
            save_file(opt_tensors, tmp / "optimizer.safetensors")
            _write_json(tmp / "optimizer.json", opt_meta)
        _write_json(tmp / "train_config.json", config)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / "state.json", {**state, "step": step, "num_processes": accelerator.num_processes,
                                         "sharded": sharded})
        write_manifest(tmp)


def load_checkpoint(
    checkpoint: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None,
    process_index: int, sharded: bool = False,
) -> dict[str, Any]:
    """Restore modules, optimizer (None: not yet; `sharded`: this process's shard of it) and this process's RNG
    in place; return state.json."""
    try:
        return _load_checkpoint(checkpoint, modules, optimizer, process_index, sharded)
    except (SafetensorError, OSError, ValueError) as e:  # a checkpoint from before manifests, damaged
        first = first_line(e)
        raise CheckpointError(f"checkpoint {checkpoint} cannot be read ({first}); resume from an earlier "
                              "checkpoint with --resume_from_checkpoint checkpoint-N") from None


def _load_checkpoint(checkpoint: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None,
                     process_index: int, sharded: bool) -> dict[str, Any]:
    state = json.loads((checkpoint / "state.json").read_text())
    if bool(state.get("sharded")) != sharded and optimizer is not None:
        raise CheckpointError(f"checkpoint {checkpoint} was saved {'with' if state.get('sharded') else 'without'} "
                              "--fsdp; resume with the setting it was trained with")
    for name, module in modules.items():
        if is_adapted(module) != (checkpoint / name / ADAPTER_FILE).is_file():
            saved = "without" if is_adapted(module) else "with"
            raise CheckpointError(f"checkpoint {checkpoint}/{name} was saved {saved} LoRA; resume with the "
                                  "--use_lora setting it was trained with")
        if is_adapted(module):
            unexpected = load_adapter(module, checkpoint / name)
            if unexpected:
                raise CheckpointError(f"checkpoint {checkpoint}/{name} has adapters the model lacks (e.g. "
                                      f"{unexpected[0]}); resume with the same --rank and target modules")
            continue
        weights = sorted((checkpoint / name).glob("*.safetensors"))
        if not weights:
            raise CheckpointError(f"checkpoint {checkpoint} has no {name}/ weights; it was made by a different run "
                                  "setup (e.g. --train_text_encoder); resume with the same settings")
        loaded: dict[str, torch.Tensor] = {}
        for w in weights:
            loaded.update(load_file(w))
        missing, unexpected = module.load_state_dict(loaded, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {checkpoint}/{name} does not match the model "
                                  f"({len(missing)} missing, {len(unexpected)} unexpected keys); resume with the "
                                  "base model it was trained from")
    if optimizer is None:
        return state
    name = f"optimizer-{process_index}" if sharded else "optimizer"
    meta = json.loads((checkpoint / f"{name}.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(load_file(checkpoint / f"{name}.safetensors"), meta))
    if sharded:
        from .sharding import restore_sharding

        restore_sharding(optimizer)
    rng_file = checkpoint / f"rng-{process_index}.safetensors"
    if rng_file.is_file():
        _set_rng_state(load_file(rng_file), json.loads((checkpoint / f"rng-{process_index}.json").read_text()))
    return state


def checkpoint_config(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "train_config.json").read_text())


def checkpoint_identity(checkpoint: Path) -> dict[str, Any] | None:
    """The run identity (local paths resolved) recorded in state.json; None for checkpoints from before it was."""
    return json.loads((checkpoint / "state.json").read_text()).get("identity")
