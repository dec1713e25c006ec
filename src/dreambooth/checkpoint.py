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

import contextlib
import copy
import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, first_line
from .files import write_text_atomic
from .lora import ADAPTER_FILE, adapter_state, is_adapted, load_adapter, save_adapter

log = logging.getLogger("dreambooth")
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

def _flatten_optimizer(state_dict: dict, copy: Callable[[torch.Tensor], torch.Tensor]
                       ) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = copy(value)
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

class CheckpointWriter:
    """Writes checkpoints, by default on a background thread so that training does not wait for the disk.

    A save copies what it writes into host memory (weights, optimizer and EMA state, RNG states: what the loop
    waits for, a device-to-host copy) and returns; serialising, hashing the manifest, the rename into place,
    `latest` and the rotation follow on the thread while training goes on. One save is in flight at a time: the
    next one (and the end of the run, a stop) first waits for it, and a save that failed raises there. Each
    process writes its own files and marks them done in the temporary folder; the main process completes the
    checkpoint once every process's mark is there, so the thread needs no collective call.

    The copy costs host memory while the files are written: a save whose copy would take more than half of the
    memory available is written while the loop waits (a warning says so), as with `background=False`, which copies
    nothing (the tensors are serialised from where they are, as before background saves existed)."""

    POLL_S = 0.05  # how often the main process looks for the others' marks (for at most `patience_s`)

    def __init__(self, background: bool = True, patience_s: float = 600.0):
        self.patience_s = patience_s  # --ddp_timeout: as long as any collective waits for the other processes
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if background else None
        self.pending: tuple[int, Path, Future] | None = None
        self.done: list[tuple[int, Path]] = []  # completed saves not yet collected
        self.cancelled = threading.Event()  # set on Ctrl-C: the save in flight is dropped, not completed
        self.warned = False

    def save(self, output_dir: Path, step: int, modules: dict[str, torch.nn.Module],
             optimizer: torch.optim.Optimizer, state: dict[str, Any], config: dict[str, Any], accelerator,
             total_limit: int | None = None, extra: Callable[[_Copy], list[Callable[[Path], None]]] | None = None,
             sharded: bool = False, private: frozenset[str] = frozenset(),
             also_copied: tuple[torch.Tensor, ...] = ()) -> Path:
        """Write checkpoint-<step> (every process calls it at the same step), in the background or not; `extra(copy)`
        copies what it adds (through `copy`) and returns the functions that write it into the folder, on the main
        process. `private`: modules whose tensors are already a host copy of their own (the sharded run's gathered
        weights), never copied again; `also_copied`: what `extra` copies (EMA weights), for the memory estimate."""
        self.wait()
        final = output_dir / f"checkpoint-{step}"
        tmp = output_dir / f".checkpoint-{step}.tmp"
        main, rank = accelerator.is_main_process, accelerator.process_index
        if main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        background = self.executor is not None and self._fits(modules, optimizer, private, also_copied)
        if self.executor is not None and accelerator.num_processes > 1:  # all processes alike, or they fall out of
            agreed = torch.tensor([float(background)], device=accelerator.device)  # step (a waited save's barrier)
            background = bool(accelerator.reduce(agreed, reduction="sum").item() == accelerator.num_processes)
        try:
            files = _snapshot(_Copy(background, private), rank, main, modules, optimizer, config,
                              extra if main else None, sharded)
        except BaseException:
            if main:  # a failed copy (out of host memory) leaves the previous checkpoints only
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        meta = {**state, "step": step, "num_processes": accelerator.num_processes, "sharded": sharded}
        job = partial(_write, tmp, final, files, meta, rank, accelerator.num_processes, main, total_limit,
                      self.patience_s, self.POLL_S, self.cancelled)
        if background:
            self.pending = (step, final, self.executor.submit(job))
        else:
            job()
            self.done.append((step, final))
            accelerator.wait_for_everyone()
        return final

    def _fits(self, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
              private: frozenset[str], also_copied: tuple[torch.Tensor, ...]) -> bool:
        """Whether a host copy of this save takes at most half the memory available now (this process's part: a
        sharded optimizer state counts its local shards)."""
        import psutil

        tensors = [t for name, m in modules.items() if name not in private and not is_adapted(m)
                   for t in (*m.parameters(), *m.buffers())]
        tensors += [v.to_local() if hasattr(v, "to_local") else v for per_param in optimizer.state.values()
                    for v in per_param.values() if isinstance(v, torch.Tensor)]
        tensors += also_copied
        size = sum(t.numel() * t.element_size() for t in tensors)
        available = psutil.virtual_memory().available
        if size <= available / 2:
            return True
        if not self.warned:
            log.warning("checkpoints are written while training waits: a copy of one (%.1f GB) would take more than "
                        "half of the host memory available (%.1f GB)", size / 1e9, available / 1e9)
            self.warned = True
        return False

    def wait(self) -> None:
        """Until the save in flight is complete (its error, if it failed, raised here)."""
        if self.pending is None:
            return
        step, final, future = self.pending
        try:
            future.result()
        finally:  # still pending if interrupted while waiting (Ctrl-C): `close` waits again
            if future.done():
                self.pending = None
        if final.is_dir():  # (not when cancelled)
            self.done.append((step, final))

    def collect(self) -> list[tuple[int, Path]]:
        """The (step, folder) of saves completed since the last call; a failed one raises."""
        if self.pending is not None and self.pending[2].done():
            self.wait()
        done, self.done = self.done, []
        return done

    def cancel(self) -> None:
        """Ctrl-C: the save in flight stops at its next file and leaves nothing (the previous checkpoints stay)."""
        self.cancelled.set()

    def close(self) -> list[tuple[int, Path]]:
        """At the end of the run, or on its way out after an error: the save in flight is completed (an error it
        meets is logged, not raised: the run's own error is the one to see), or dropped if cancelled; the thread
        ends before this returns, so nothing is written after the run lets go of its output folder. Returns the
        saves completed since the last `collect`."""
        try:
            self.wait()
        except Exception as e:
            log.warning("the checkpoint being written in the background failed: %s", first_line(e, 200))
        except BaseException:  # interrupted while waiting: drop the save, still wait for the thread to stop
            self.cancel()
            raise
        finally:
            if self.executor is not None:
                self.executor.shutdown(wait=True)
        done, self.done = self.done, []
        return done


class _Copy:
    """What a save reads, taken now. In the background (`copying`): copies in host memory the training cannot
    change under the writer; otherwise the tensors themselves (on the host), written before training goes on."""

    def __init__(self, copying: bool, private: frozenset[str] = frozenset()):
        self.copying, self.private = copying, private

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to("cpu", copy=True).contiguous() if self.copying else t.cpu().contiguous()

    def module(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        """`module` to save: itself when not copying; else a twin (same structure, adapters, config) holding host
        copies of its tensors, or sharing them where they are this save's own already (`private`)."""
        if not self.copying:
            return module
        share = name in self.private
        memo: dict[int, Any] = {}
        for p in module.parameters():
            memo[id(p)] = p if share else torch.nn.Parameter(self(p), requires_grad=p.requires_grad)
        for b in module.buffers():
            memo[id(b)] = b if share else self(b)
        return copy.deepcopy(module, memo)


def _snapshot(host: _Copy, rank: int, main: bool, modules: dict[str, torch.nn.Module],
              optimizer: torch.optim.Optimizer, config: dict[str, Any],
              extra: Callable[[_Copy], list[Callable[[Path], None]]] | None, sharded: bool
              ) -> list[Callable[[Path], None]]:
    """What this process writes, taken now: each entry writes its part into the temporary folder."""
    rng_tensors, rng_meta = _rng_state()
    files: list[Callable[[Path], None]] = [
        lambda tmp: save_file(rng_tensors, tmp / f"rng-{rank}.safetensors"),
        lambda tmp: _write_json(tmp / f"rng-{rank}.json", rng_meta)]
    if sharded:  # every process its own shard of the optimizer state
        from .sharding import local_optimizer_state

        files.append(_optimizer_files(host, local_optimizer_state(optimizer), f"optimizer-{rank}"))
    if not main:
        return files
    for name, module in modules.items():
        if is_adapted(module):  # the adapters' own tensors only; the frozen base is the base model's
            state = adapter_state(module, host)
            files.append(lambda tmp, state=state, name=name: save_adapter(state, tmp / name))
        else:
            twin = host.module(name, module)
            files.append(lambda tmp, twin=twin, name=name: twin.save_pretrained(tmp / name, safe_serialization=True))
    if extra is not None:
        files += extra(host)
    if not sharded:
        files.append(_optimizer_files(host, optimizer.state_dict(), "optimizer"))
    config = json.loads(json.dumps(config))
    files.append(lambda tmp: _write_json(tmp / "train_config.json", config))
    return files


def _optimizer_files(host: _Copy, state_dict: dict, name: str) -> Callable[[Path], None]:
    tensors, meta = _flatten_optimizer(state_dict, host)
    meta = json.loads(json.dumps(meta))  # the learning rates move on while the files are written

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / f"{name}.safetensors")
        _write_json(tmp / f"{name}.json", meta)

    return write


def _write(tmp: Path, final: Path, files: list[Callable[[Path], None]], state: dict[str, Any], rank: int,
           processes: int, main: bool, total_limit: int | None, patience_s: float, poll_s: float,
           cancelled: threading.Event | None = None) -> None:
    """One process's part of a checkpoint; the main process then waits for the others' marks and completes it.
    A kill at any moment leaves the previous checkpoints; a failure, or a cancel, removes the temporary folder."""
    try:
        for write in files:
            if cancelled is not None and cancelled.is_set():
                raise _Cancelled
            write(tmp)
        if not main:
            write_text_atomic(tmp / f".rank-{rank}.done", "")
            return
        _await_others(tmp, processes, patience_s, poll_s, cancelled)
        _write_json(tmp / "state.json", state)
        write_manifest(tmp)
        if cancelled is not None and cancelled.is_set():
            raise _Cancelled
    except _Cancelled:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # a main process not interrupted itself stops waiting for this one
            with contextlib.suppress(OSError):
                write_text_atomic(tmp / f".rank-{rank}.failed", "cancelled (Ctrl-C)")
        return
    except BaseException as e:
        if main:  # a failed save (disk full) leaves the previous checkpoints only
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                write_text_atomic(tmp / f".rank-{rank}.failed", first_line(e, 300))
        raise
    output_dir = final.parent
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


class _Cancelled(Exception):
    """The save was dropped (Ctrl-C)."""


def _await_others(tmp: Path, processes: int, patience_s: float, poll_s: float,
                  cancelled: threading.Event | None = None) -> None:
    waiting = set(range(1, processes))
    deadline = time.monotonic() + patience_s
    while waiting:
        if cancelled is not None and cancelled.is_set():
            raise _Cancelled
        for rank in sorted(waiting):
            failed = tmp / f".rank-{rank}.failed"
            if failed.is_file():
                raise CheckpointError(f"process {rank} could not write its part of {tmp.name}: "
                                      f"{failed.read_text()}")
            if (tmp / f".rank-{rank}.done").is_file():
                waiting.discard(rank)
        if waiting and time.monotonic() > deadline:
            raise CheckpointError(f"process(es) {sorted(waiting)} did not write their part of {tmp.name} within "
                                  f"{patience_s:.0f} s; is the output folder on a file system every process sees?")
        if waiting:
            time.sleep(poll_s)
    for rank in range(1, processes):
        (tmp / f".rank-{rank}.done").unlink()


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
