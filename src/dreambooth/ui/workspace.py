"""The UI's workspace folder: uploaded photos, runs, and the jobs (train, generate, evaluate, export) that write them.

Every job is the command-line tool in its own process, given a config file: the page drives exactly what a user
could type, the schema checks every value the same way, and a crash of a run leaves the page (and every other run)
standing. Layout, all under the workspace root:

    uploads/<id>/           photos as uploaded (a run's instance_data_dir; nothing else writes there)
    uploads/<id>.preview/   each photo as the trainer crops it at the chosen resolution
    class-images/<slug>/    class images, shared by the runs that use the same class prompt (a cache)
    runs/<name>/            a training run's output folder (events.jsonl is its progress)
    jobs/<id>.json|.log     each job's config and its console output
    galleries/, evaluations/, exports/   what the jobs after training write, one new entry each
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..data import scan_folder
from ..data.dataset import resize_crop
from ..data.images import IMAGE_SUFFIXES, open_rgb
from ..errors import STOPPED_EXIT, DataError
from ..events import EVENTS_FILE, read_events
from ..files import write_text_atomic
from ..outputs import LOCK
from ..run import CONFIG_FILE, SUMMARY_FILE

MAX_UPLOAD = 64 * 1024 * 1024  # bytes per photo


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "x"


@dataclass
class Job:
    id: str
    command: str  # train, generate, evaluate, export
    config: dict[str, Any]
    output: Path  # the folder or file the job writes
    run: str | None  # the run it belongs to
    proc: subprocess.Popen | None = None
    started: float = field(default_factory=time.time)

    def status(self) -> str:
        if self.proc is None:
            return "unknown"
        rc = self.proc.poll()
        return ("running" if rc is None else "done" if rc == 0 else "stopped" if rc == STOPPED_EXIT
                else "failed")


class Workspace:
    def __init__(self, root: Path):
        self.root = root.resolve()
        for sub in ("uploads", "runs", "jobs", "class-images", "galleries", "evaluations", "exports"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, Job] = {}
        self.reserved: set[Path] = set()
        self.lock = threading.RLock()

    # -- photos -------------------------------------------------------------------------------------------------
    def upload(self, files: list[dict[str, str]], resolution: int) -> dict[str, Any]:
        """Save uploaded photos (name, base64 data) into a new folder; check them as training will and render each
        as the trainer sees it at `resolution` (short side resized, the centre square; --center_crop off takes
        random squares around it). Returns the folder, per-photo previews and warnings; an unusable photo fails
        the upload in one line, as it would fail the run."""
        if not files:
            raise DataError("no photos were uploaded; choose 3-5 photos of the subject")
        with self.lock:
            folder = self._new(self.root / "uploads", time.strftime("%Y%m%d-%H%M%S"))
        preview = folder.with_name(folder.name + ".preview")
        preview.mkdir()
        names: set[str] = set()
        for item in files:
            if not isinstance(item, dict):
                raise DataError("an upload holds something that is not a file; choose the photos again")
            name = Path(str(item.get("name", ""))).name or "photo"
            stem, suffix = slug(Path(name).stem, 60), Path(name).suffix.lower()
            name, n = f"{stem}{suffix}", 1
            while name in names:
                n += 1
                name = f"{stem}-{n}{suffix}"
            names.add(name)
            try:
                data = base64.b64decode(item.get("data", ""), validate=True)
            except (binascii.Error, ValueError):
                raise DataError(f"{name}: the upload is not base64 data; upload the file again") from None
            if len(data) > MAX_UPLOAD:
                raise DataError(f"{name}: larger than {MAX_UPLOAD >> 20} MB; upload a smaller photo")
            (folder / name).write_bytes(data)
        found = scan_folder(folder, "instance", resolution)  # the CLI's checks: unreadable files fail together
        photos = []
        for path in found.images:
            view, _, _ = resize_crop(open_rgb(path), resolution, True, False, None)  # (random crops: around it)
            view.save(preview / f"{path.name}.png")
            with Image.open(path) as img:
                size = img.size
            photos.append({"name": path.name, "size": list(size), "small": path in found.small,
                           "preview": self.url(preview / f"{path.name}.png")})
        warnings = []
        if found.skipped:
            warnings.append(f"not images, skipped: {', '.join(p.name for p in found.skipped)}")
        if found.small:
            warnings.append(f"{len(found.small)} photo(s) smaller than {resolution} px are upscaled (softer "
                            f"results): {', '.join(p.name for p in found.small)}")
        if not 3 <= len(found.images) <= 5:
            warnings.append(f"{len(found.images)} photo(s); DreamBooth works best with 3-5 of the subject")
        return {"folder": str(folder), "photos": photos, "warnings": warnings,
                "accepted": sorted(IMAGE_SUFFIXES)}

    # -- jobs ---------------------------------------------------------------------------------------------------
    def start(self, command: str, config: dict[str, Any], output: Path, run: str | None = None) -> Job:
        """Run `dreambooth <command> --config <file>` in its own process (its own session: a signal meant for the
        page does not reach it)."""
        with self.lock:
            job_id = self._new(self.root / "jobs", f"{command}-{time.strftime('%Y%m%d-%H%M%S')}").name
            cfg_file = self.root / "jobs" / f"{job_id}.json"
            write_text_atomic(cfg_file, json.dumps(config, indent=2, default=str))
            log = open(self.root / "jobs" / f"{job_id}.log", "wb")  # noqa: SIM115 (the child holds it)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen([sys.executable, "-m", "dreambooth", command, "--config", str(cfg_file)],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)  # relative paths mean what they meant here
            log.close()
            job = self.jobs[job_id] = Job(job_id, command, config, output, run, proc)
            return job

    def job(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise KeyError(job_id)
        return self.jobs[job_id]

    def job_view(self, job: Job) -> dict[str, Any]:
        status = job.status()
        view: dict[str, Any] = {"id": job.id, "command": job.command, "status": status, "run": job.run,
                                "output": str(job.output)}
        if status in ("failed", "stopped"):
            view["message"] = self.last_line(job)
        if status == "done":
            view["files"] = [self.url(p) for p in self.outputs(job.output)]
        return view

    def last_line(self, job: Job) -> str:
        """The job's one-line error (the CLI prints it last)."""
        log = self.root / "jobs" / f"{job.id}.log"
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() \
            else []
        return lines[-1][-500:] if lines else "the process ended without output"

    def outputs(self, path: Path) -> list[Path]:
        if path.is_file():
            return [path]
        if not path.is_dir():
            return []
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".png", ".safetensors",
                                                                                          ".md", ".json"))

    def running_job_of(self, run: str) -> Job | None:
        return next((j for j in self._jobs() if j.run == run and j.command == "train" and j.status() == "running"),
                    None)

    def _jobs(self) -> list[Job]:
        with self.lock:
            return list(self.jobs.values())

    # -- runs ---------------------------------------------------------------------------------------------------
    def new_run_folder(self, hint: str) -> Path:
        with self.lock:
            return self._new(self.root / "runs", f"{slug(hint, 30)}-{time.strftime('%Y%m%d-%H%M%S')}", make=False)

    def run_folder(self, name: str) -> Path:
        """A run's folder; a run started here whose process has not created it yet counts too."""
        folder = (self.root / "runs" / name).resolve()
        if folder.parent != self.root / "runs" or not (folder.is_dir() or self._last_job(name)):
            raise KeyError(name)
        return folder

    def run_view(self, name: str, offset: int = 0) -> dict[str, Any]:
        """A run's state from its own files (so a page reloaded, or a UI restarted, sees it the same way): the
        events since `offset`, its status, its config and summary."""
        folder = self.run_folder(name)
        events, next_offset = read_events(folder / EVENTS_FILE, offset)
        for e in events:
            if e.get("event") == "validation" and e.get("path"):
                with contextlib.suppress(ValueError):  # a grid outside the workspace (a moved run) has no URL
                    e["url"] = self.url(Path(e["path"]))
        job = self.running_job_of(name)
        summary = _json(folder / SUMMARY_FILE)
        status, message = ("running", None) if job or _locked(folder) else ("finished", None) if summary else \
            self._ended(name, events if offset == 0 else read_events(folder / EVENTS_FILE)[0])
        view = {"name": name, "status": status, "events": events, "offset": next_offset,
                "config": _json(folder / CONFIG_FILE) or (job.config if job else None), "summary": summary,
                "message": message}
        if job is not None and not (folder / EVENTS_FILE).exists() and job.config.get("class_data_dir"):
            # class images are made before the run's folder (and its event file) is its own: count them meanwhile
            made = Path(job.config["class_data_dir"])
            view["class_images_on_disk"] = len(list(made.glob("*.png"))) if made.is_dir() else 0
        return view

    def _ended(self, name: str, history: list[dict[str, Any]]) -> tuple[str, str | None]:
        """How a run that is not training and has no summary ended, from its whole event stream: stopped
        (resumable), failed (with the one line that says why: its process's last words, else its error event),
        or interrupted (its process gone without a word: killed, or the machine went down)."""
        ends = [e for e in history if e.get("event") in ("stopped", "error", "start")]
        last = ends[-1] if ends else {}
        job = self._last_job(name)
        if last.get("event") == "stopped":
            return "stopped", None
        if job is not None and job.status() == "failed":
            return "failed", self.last_line(job)
        if last.get("event") == "error":
            return "failed", f"{last.get('message')} ({last.get('kept')})"
        return "interrupted", None

    def _last_job(self, run: str) -> Job | None:
        mine = [j for j in self._jobs() if j.run == run and j.command == "train"]
        return mine[-1] if mine else None

    def runs(self) -> list[dict[str, Any]]:
        """Every run in the workspace, newest first, with what its summary says."""
        out = []
        for folder in sorted((self.root / "runs").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
            if not folder.is_dir():
                continue
            cfg, summary = _json(folder / CONFIG_FILE) or {}, _json(folder / SUMMARY_FILE)
            view = self.run_view(folder.name, offset=0) if not summary else None
            out.append({"name": folder.name, "status": view["status"] if view else "finished",
                        "instance_prompt": cfg.get("instance_prompt"), "use_lora": cfg.get("use_lora"),
                        "model": cfg.get("pretrained_model_name_or_path"),
                        "steps": (summary or {}).get("steps"), "mean_loss": (summary or {}).get("mean_loss"),
                        "evaluation": (summary or {}).get("evaluation")})
        return out

    # -- files --------------------------------------------------------------------------------------------------
    def url(self, path: Path) -> str:
        return "/files/" + path.resolve().relative_to(self.root).as_posix()

    def file(self, relative: str) -> Path:
        """A file under the workspace (nothing outside it is served)."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            raise KeyError(relative)
        return path

    def new_output(self, kind: str, hint: str, suffix: str = "") -> Path:
        """A fresh path under galleries/, evaluations/ or exports/ (never one that exists or was handed out)."""
        with self.lock:
            return self._new(self.root / kind, f"{slug(hint, 50)}-{time.strftime('%H%M%S')}", suffix=suffix,
                             make=False)

    def _new(self, parent: Path, stem: str, suffix: str = "", make: bool = True) -> Path:
        """A path that does not exist and was not handed out before (its command creates it seconds later)."""
        for n in range(1000):
            path = parent / f"{stem}{'' if n == 0 else f'-{n}'}{suffix}"
            if not path.exists() and path not in self.reserved:
                self.reserved.add(path)
                if make:
                    path.mkdir()
                return path
        raise DataError(f"{parent} holds too many entries named {stem}; clear some out")


def stop(job: Job) -> None:
    """Ask a training process to save a checkpoint and stop (SIGTERM; see run.StopRequests)."""
    if job.proc is not None and job.proc.poll() is None:
        job.proc.send_signal(signal.SIGTERM)


def _locked(folder: Path) -> bool:
    """Whether a live process holds the run folder (a run still training after the page was restarted): its lock
    file names the holder's pid and is removed before the lock is let go. Read, never locked: a probe that took
    the lock could make a starting run find its folder in use."""
    try:
        pid = int((folder / LOCK).read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    if pid <= 0 or os.name == "nt":  # Windows' os.kill(pid, 0) would end the process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, someone else's
        return True
    return True


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
