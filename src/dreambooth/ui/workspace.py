"""The UI's workspace folder: uploaded photos, runs, and the jobs (train, generate, evaluate, export) that write them.

Every job is the command-line tool in its own process, given a config file: the page drives exactly what a user
could type, the schema checks every value the same way, and a crash of a run leaves the page (and every other run)
standing. Layout, all under the workspace root:

    uploads/<id>/           photos as uploaded (a run's instance_data_dir; nothing else writes there)
    uploads/<id>.preview/   each photo as the trainer crops it at the chosen resolution (or its aspect-ratio bucket)
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
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import scan_folder
from ..data.buckets import Size, bucket_for
from ..data.dataset import resize_crop
from ..data.images import IMAGE_SUFFIXES, open_rgb
from ..errors import STOPPED_EXIT, DataError, DreamBoothError
from ..events import EVENTS_FILE, read_events
from ..files import write_text_atomic
from ..outputs import LOCK
from ..run import CONFIG_FILE, SUMMARY_FILE
from ..schema import expand_path

MAX_UPLOAD = 64 * 1024 * 1024  # bytes per photo
RESOLUTIONS = (8, 4096)  # what an upload preview renders: a bigger square would be gigabytes of pixels
# the page's words for the settings its messages name (a flag name means nothing on the page)
WORDS = {"output_dir": "output folder", "class_data_dir": "class images folder", "logging_dir": "log folder",
         "instance_data_dir": "photos folder", "eval_config": "evaluation options file",
         "resume_from_checkpoint": "checkpoint to resume from", "pretrained_model_name_or_path": "base model",
         "pretrained_vae_model_name_or_path": "VAE", "tokenizer_name": "tokenizer"}
# read or written by a run: all of them stay inside the workspace (a model may be any local folder or a hub id)
INSIDE = ("output_dir", "logging_dir", "class_data_dir", "instance_data_dir", "eval_config", "resume_from_checkpoint")
MODELS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "tokenizer_name")
SUBJECT_PATHS = ("instance_data_dir", "class_data_dir")  # each further subject's (TrainConfig.subjects)
PROGRESS_BAR = re.compile(r"\d+%\||\bit/s\b|\bs/it\b")
TRACEBACK_END = re.compile(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b")  # "ValueError: ..."


class InUse(DreamBoothError):
    """A request the run's state refuses (its folder in use, already stopping): HTTP 409."""


def plain(message: str) -> str:
    """A message for the page: flags named in the page's words, one line."""
    message = message.replace("--resume_from_checkpoint latest", "Resume")  # the page's button does that
    text = re.sub(r"--(\w+)", lambda m: f"the {WORDS.get(m[1], m[1].replace('_', ' '))}", message)
    return " ".join(text.split())[:500]


@dataclass(frozen=True)
class Buckets:
    """How training sizes photos in aspect-ratio buckets: each side a multiple of the model's `multiple`; the
    user's bucket list, or None: the ladder for the resolution (data/buckets.py)."""

    multiple: int
    explicit: list[Size] | None = None


def _check_resolution(resolution: int) -> None:
    low, high = RESOLUTIONS
    if not low <= resolution <= high:
        raise DataError(f"the resolution must be from {low} to {high} pixels")


def _whose(name: str) -> str:
    """A path setting as a message's subject: "the photos folder", "subject 2's photos folder"."""
    inner = re.fullmatch(r"subjects\[(\d+)\]\.(\w+)", name)
    return f"subject {int(inner[1]) + 2}'s {WORDS[inner[2]]}" if inner else f"the {WORDS[name]}"


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "x"


@dataclass
class Job:
    id: str
    command: str  # train, generate, evaluate, export
    config: dict[str, Any]
    output: Path  # the folder or file the job writes
    run: str | None  # the run it belongs to
    proc: subprocess.Popen | None = None  # None: a process an earlier page started (found by its pid)
    started: float = field(default_factory=time.time)
    pid: int = 0
    config_file: Path | None = None
    stop_sent: bool = False  # the page sends its stop signal once (a second click only says "already stopping")

    def status(self) -> str:
        """running, done, stopped, failed; "ended" for an earlier page's process (its exit status is not known)."""
        if self.proc is None:
            return "running" if self.config_file and _runs(self.pid, self.config_file) else "ended"
        rc = self.proc.poll()
        if rc is None:
            return "running"
        # stopped on request: at a checkpoint (STOPPED_EXIT), or by the signal itself before training began
        stopped = rc == STOPPED_EXIT or (self.stop_sent and rc == -signal.SIGTERM)
        return "done" if rc == 0 else "stopped" if stopped else "failed"


class Workspace:
    program = [sys.executable, "-m", "dreambooth"]  # a job's command line before its subcommand (tests swap it)

    def __init__(self, root: Path):
        self.root = root.resolve()
        for sub in ("uploads", "runs", "jobs", "class-images", "galleries", "evaluations", "exports"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, Job] = {}
        self.reserved: set[Path] = set()
        self.lock = threading.RLock()
        self._restore()

    def inside(self, path: Path) -> bool:
        """Whether a path is in the workspace, resolved (links followed)."""
        return path.resolve().is_relative_to(self.root)

    # -- photos -------------------------------------------------------------------------------------------------
    def upload(self, files: list[dict[str, str]], resolution: int, buckets: Buckets | None = None) -> dict[str, Any]:
        """Save uploaded photos (name, base64 data) into a new folder; check them as training will and render each
        as the trainer sees it at `resolution` (short side resized, the centre square; --center_crop off takes
        random squares around it), or, with `buckets`, centre-cropped to its aspect-ratio bucket. Returns the
        folder, per-photo previews and warnings; an unusable photo fails the upload in one line, as it would fail
        the run, and leaves nothing on disk."""
        if not files:
            raise DataError("no photos were uploaded; choose 3-5 photos of the subject")
        _check_resolution(resolution)
        with self.lock:
            folder = self._new(self.root / "uploads", time.strftime("%Y%m%d-%H%M%S"))
        preview = folder.with_name(folder.name + ".preview")
        try:
            preview.mkdir()
            self._save_photos(files, folder)
            return self._render(folder, preview, resolution, buckets)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(preview, ignore_errors=True)
            raise

    def previews(self, folder: str, resolution: int, buckets: Buckets | None = None) -> dict[str, Any]:
        """An upload's previews rendered again (the page's resolution or buckets changed): what `upload` returns."""
        _check_resolution(resolution)
        path = Path(folder).resolve()
        preview = path.with_name(path.name + ".preview")
        if path.parent != self.root / "uploads" or path.name.endswith(".preview") or not preview.is_dir():
            raise DataError("that is not a folder of photos uploaded on this page; upload them again")
        return self._render(path, preview, resolution, buckets)

    def _save_photos(self, files: list[dict[str, str]], folder: Path) -> None:
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
            except (binascii.Error, ValueError, TypeError):
                raise DataError(f"{name}: the upload is not base64 data; upload the file again") from None
            if len(data) > MAX_UPLOAD:
                raise DataError(f"{name}: larger than {MAX_UPLOAD >> 20} MB; upload a smaller photo")
            (folder / name).write_bytes(data)

    def _render(self, folder: Path, preview: Path, resolution: int, buckets: Buckets | None) -> dict[str, Any]:
        """Check an upload's photos as training will and render each as the trainer crops it (see `upload`)."""
        found = scan_folder(folder, "instance", resolution)  # the CLI's checks: unreadable files fail together
        photos = []
        version = time.time_ns()  # a preview drawn again is a new URL: the browser shows it, not its old copy
        for path, (width, height) in zip(found.images, found.sizes):  # upright, as training reads them
            size = resolution if buckets is None else bucket_for(width, height, resolution, buckets.multiple,
                                                                 buckets.explicit)
            view, _, _ = resize_crop(open_rgb(path), size, True, False, None)  # (random crops: around it)
            view.save(preview / f"{path.name}.png")
            photo = {"name": path.name, "size": [width, height], "small": path in found.small,
                     "preview": f"{self.url(preview / f'{path.name}.png')}?v={version}"}
            if buckets is not None:
                photo["bucket"] = [view.width, view.height]
            photos.append(photo)
        warnings = []
        if found.skipped:
            warnings.append(f"not images, skipped: {', '.join(p.name for p in found.skipped)}")
        if found.small:  # computed buckets stop at a photo's own size; a square or a listed bucket upscales it
            what = ("train in a smaller bucket (fewer pixels)" if buckets is not None and not buckets.explicit
                    else "are upscaled (softer results)")
            warnings.append(f"{len(found.small)} photo(s) smaller than {resolution} px {what}: "
                            f"{', '.join(p.name for p in found.small)}")
        if not 3 <= len(found.images) <= 5:
            warnings.append(f"{len(found.images)} photo(s); DreamBooth works best with 3-5 of the subject")
        return {"folder": str(folder), "photos": photos, "warnings": warnings,
                "accepted": sorted(IMAGE_SUFFIXES)}

    # -- jobs ---------------------------------------------------------------------------------------------------
    def start(self, command: str, config: dict[str, Any], output: Path, run: str | None = None) -> Job:
        """Run `dreambooth <command> --config <file>` in its own process (its own session: a signal meant for the
        page does not reach it). Its pid is recorded beside its config, so a page started again finds it."""
        with self.lock:
            job_id = self._new(self.root / "jobs", f"{command}-{time.strftime('%Y%m%d-%H%M%S')}").name
            cfg_file = self.root / "jobs" / f"{job_id}.json"
            write_text_atomic(cfg_file, json.dumps(config, indent=2, default=str))
            log = open(self.root / "jobs" / f"{job_id}.log", "wb")  # noqa: SIM115 (the child holds it)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            started = time.time()  # before the process: every event it writes is later
            proc = subprocess.Popen([*self.program, command, "--config", str(cfg_file)],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)  # relative paths mean what they meant here
            log.close()
            job = self.jobs[job_id] = Job(job_id, command, config, output, run, proc, started, proc.pid, cfg_file)
            write_text_atomic(cfg_file.with_suffix(".pid"), json.dumps(
                {"pid": proc.pid, "command": command, "run": run, "output": str(output), "started": started}))
            return job

    def _restore(self) -> None:
        """The jobs an earlier page started that still run, from their pid files (so a restarted page can stop
        them): a pid counts only while its process's command line names the job's config file (a pid reused by
        another process does not)."""
        for record in sorted((self.root / "jobs").glob("*.pid")):
            info, cfg_file = _json(record) or {}, record.with_suffix(".json")
            pid, output = info.get("pid"), Path(str(info.get("output") or ""))
            if not isinstance(pid, int) or not _runs(pid, cfg_file) or not self.inside(output):
                continue
            run = info.get("run") if isinstance(info.get("run"), str) else None
            started = info.get("started") if isinstance(info.get("started"), int | float) else 0.0
            self.jobs[record.stem] = Job(record.stem, str(info.get("command")), _json(cfg_file) or {}, output, run,
                                         None, started, pid, cfg_file, record.with_suffix(".stop").exists())

    def stop(self, job: Job) -> bool:
        """Ask a training process to save a checkpoint and stop (SIGTERM; see run.StopRequests), once per job:
        False when it was asked before (the trainer ignores a second one while it saves; an older trainer would
        end at once, its checkpoint half written)."""
        with self.lock:
            if job.stop_sent:
                return False
            job.stop_sent = True
            (self.root / "jobs" / f"{job.id}.stop").touch()  # a restarted page does not ask again either
            if job.proc is not None:
                job.proc.send_signal(signal.SIGTERM)  # a no-op once the process has ended
            elif job.config_file is not None and _runs(job.pid, job.config_file):
                os.kill(job.pid, signal.SIGTERM)
            return True

    def job(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise KeyError(job_id)
        return self.jobs[job_id]

    def job_view(self, job: Job) -> dict[str, Any]:
        status = job.status()
        view: dict[str, Any] = {"id": job.id, "command": job.command, "status": status, "run": job.run,
                                "output": str(job.output)}
        if status in ("failed", "stopped"):
            view["message"] = plain(self.console_line(job) or self._silent(job))
        if status == "done":
            view["files"] = [self.url(p) for p in self.outputs(job.output)]
            if job.output.exists() and self.inside(job.output):  # the whole output (a folder: zipped)
                view["download"] = self.url(job.output) + "?download"
        return view

    def console_line(self, job: Job) -> str | None:
        """The job's one-line error as the CLI prints it last (`dreambooth <command>: error: ...`), else a
        traceback's last line; never a progress bar's fragment (bars share the log, split by carriage returns)."""
        try:
            with open(self.root / "jobs" / f"{job.id}.log", "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))  # the end says how it ended; a log can be huge
                tail = f.read().decode(errors="replace")
        except OSError:
            return None
        lines = [ln.strip() for ln in re.split(r"[\r\n]+", tail) if ln.strip()]
        prefix = f"dreambooth {job.command}: "
        said = next((ln for ln in reversed(lines) if ln.startswith(prefix)), None)
        if said is not None:
            return said.removeprefix(prefix).removeprefix("error: ")
        raised = [ln for ln in lines if TRACEBACK_END.match(ln) and not PROGRESS_BAR.search(ln)]
        return raised[-1] if raised else None

    def _silent(self, job: Job) -> str:
        rc = job.proc.poll() if job.proc is not None else None
        return (f"the {job.command} process ended (exit status {rc}) without saying why; its console output is "
                f"jobs/{job.id}.log")

    def outputs(self, path: Path) -> list[Path]:
        if path.is_file():
            return [path] if self.inside(path) else []
        if not path.is_dir():
            return []
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (
            ".png", ".safetensors", ".md", ".json") and self.inside(p))  # a link out of the workspace has no URL

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
        """A run's folder; a run started here whose process has not created it yet counts too. A folder that is a
        link out of runs/ (copied in, or made by hand) is refused: the page reads and writes only its workspace."""
        entry = self.root / "runs" / name
        if entry.parent != self.root / "runs" or name == ".." or entry.is_file():
            raise KeyError(name)
        if not (entry.is_dir() or entry.is_symlink() or self._last_job(name)):
            raise KeyError(name)
        if entry.resolve() != entry:
            raise DreamBoothError(f"run {name} is a link to a folder outside the workspace; the page does not use it")
        for file in (EVENTS_FILE, CONFIG_FILE, SUMMARY_FILE, LOCK, "latest"):
            if (entry / file).exists() and not (entry / file).resolve().is_relative_to(entry):
                raise DreamBoothError(f"run {name}'s {file} is a link out of its folder; the page does not read it")
        return entry

    def checked_run(self, name: str, config: dict[str, Any] | None = None) -> Path:
        """A run folder the page may act on (resume, gallery, export, evaluate): nothing in it links out of the
        workspace (a checkpoint or weights elsewhere), and every path its settings name is inside it (its output
        folder its own). A copied-in run that names other places is refused in one line."""
        folder = self.run_folder(name)
        for top, dirs, files in os.walk(folder):
            for entry in (Path(top) / n for n in dirs + files):
                if entry.is_symlink() and not self.inside(entry):
                    raise DreamBoothError(f"run {name} holds {entry.relative_to(folder)}, a link out of the "
                                          "workspace; the page does not use it")
        latest = folder / "latest"  # the checkpoint "latest" resumes from, named in this file
        if latest.is_file() and not self.inside(folder / latest.read_text(errors="replace").strip()):
            raise DreamBoothError(f"run {name}'s latest checkpoint is outside the workspace; the page does not use it")
        problems = self.path_problems(config, folder) if config else {}
        if problems:
            field_name, message = next(iter(problems.items()))
            raise DreamBoothError(f"run {name} cannot be used from the page: {message}")
        return folder

    def path_problems(self, values: dict[str, Any], run: Path | None = None) -> dict[str, str]:
        """Each path setting that leaves the workspace, by field, in the page's words. Everything a run reads or
        writes is inside the workspace (resolved, links followed), but its base model (any local folder or hub
        id): its output folder a folder of runs/ (`run` where given), its class images a folder of their own, not
        the photos, a model or a run."""
        out = Path(expand_path("output_dir", str(values.get("output_dir") or ""))).resolve()
        found: dict[str, str] = {}
        if run is not None and out != run:
            found["output_dir"] = f"its output folder {out} is not the run's own folder"
        elif out.parent != self.root / "runs":
            found["output_dir"] = ("the output folder must be a new folder under the workspace's runs/; leave it "
                                   "empty for one")
        paths = {name: self._path_of(name, str(values.get(name) or "").strip(), out) for name in INSIDE}
        for i, subject in enumerate(values.get("subjects") or []):  # further subjects: their photos and classes
            for name in SUBJECT_PATHS:
                text = str(subject.get(name) or "").strip() if isinstance(subject, dict) else ""
                paths[f"subjects[{i}].{name}"] = self._path_of(name, text, out)
        for name, path in paths.items():
            if path is not None and not path.is_relative_to(self.root) and name not in found:
                found[name] = f"{_whose(name)} must be inside the workspace ({self.root})"
        photos = [p for n, p in paths.items() if n.endswith("instance_data_dir") and p is not None]
        for name, classes in paths.items():
            if name.endswith("class_data_dir") and classes is not None and name not in found:
                problem = self._class_folder_problem(classes, photos, values)
                if problem:
                    found[name] = problem
        return found

    def _path_of(self, name: str, text: str, out: Path) -> Path | None:
        """Where a path setting points, as the run's process reads it (relative: from the page's folder; the log
        folder and a checkpoint name: from the output folder)."""
        if not text or (name == "resume_from_checkpoint" and text == "latest"):
            return None
        path = Path(expand_path(name, text))  # `~` and `$VAR` as the trainer reads them
        if name == "logging_dir" or (name == "resume_from_checkpoint" and not (path.is_absolute() or path.exists())):
            path = out / path
        return path.resolve()

    def _class_folder_problem(self, classes: Path, photos: list[Path], values: dict[str, Any]) -> str | None:
        def overlaps(other: Path) -> bool:
            return classes.is_relative_to(other) or other.is_relative_to(classes)

        hint = "leave it empty for one under class-images/"
        if any(overlaps(p) for p in photos) or overlaps(self.root / "uploads"):
            return f"the class images folder cannot be, hold or be inside the uploaded photos; {hint}"
        models = [Path(expand_path(m, str(values[m]))).resolve() for m in MODELS
                  if values.get(m) and Path(expand_path(m, str(values[m]))).exists()]
        if any(overlaps(m) for m in models):
            return f"the class images folder cannot be, hold or be inside a base model's folder; {hint}"
        if overlaps(self.root / "runs"):
            return f"the class images folder cannot be, hold or be inside a run's folder; {hint}"
        return None

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
        status, message = self._state(name, folder, summary)
        view = {"name": name, "status": status, "events": events, "offset": next_offset,
                "config": _json(folder / CONFIG_FILE) or (job.config if job else None), "summary": summary,
                "message": message}
        if job is not None and not (folder / EVENTS_FILE).exists() and job.config.get("class_data_dir"):
            # class images are made before the run's folder (and its event file) is its own: count them meanwhile
            made = Path(job.config["class_data_dir"])
            view["class_images_on_disk"] = len(list(made.glob("*.png"))) if made.is_dir() else 0
        return view

    def _state(self, name: str, folder: Path, summary: dict | None) -> tuple[str, str | None]:
        """running (its process, or any live process holding the folder), else how the page's last process for
        the run ended (failed with the one line that says why; stopped, also before training began), else what
        the files say (finished; stopped; failed with its error event; interrupted: gone without a word)."""
        job = self._last_job(name)
        state = job.status() if job is not None else "ended"
        if state == "running" or lock_holder(folder):
            return "running", None
        mine = [e for e in read_events(folder / EVENTS_FILE)[0]
                if job is not None and e.get("time", 0) >= job.started] if state in ("failed", "stopped") else []
        if state == "failed":
            said = [e for e in mine if e.get("event") == "error"]
            return "failed", plain(_error_line(said[-1]) if said else self.console_line(job) or self._silent(job))
        if state == "stopped":  # at a checkpoint (a "stopped" event with its step), before training began (a
            # "stopped" event without one, or none: nothing was claimed yet), or while saving the result (killed)
            stops = [e for e in mine if e.get("event") == "stopped"]
            if stops and stops[-1].get("step") is not None:
                return "stopped", None
            began = any(e.get("event") == "start" for e in mine)
            return "stopped", ("stopped while saving its result; Resume finishes it from its last checkpoint" if began
                               else "stopped before training began; Resume starts it again")
        if summary:
            return "finished", None
        ends = [e for e in read_events(folder / EVENTS_FILE)[0] if e.get("event") in ("stopped", "error", "start")]
        last = ends[-1] if ends else {}
        if last.get("event") == "stopped":
            return "stopped", None
        if last.get("event") == "error":
            return "failed", plain(_error_line(last))
        return "interrupted", None

    def _last_job(self, run: str) -> Job | None:
        mine = [j for j in self._jobs() if j.run == run and j.command == "train"]
        return mine[-1] if mine else None

    def runs(self) -> list[dict[str, Any]]:
        """Every run in the workspace, newest first, with what its summary says (a refused one with why)."""
        out = []
        for folder in sorted((self.root / "runs").iterdir(), key=lambda p: p.lstat().st_mtime, reverse=True):
            if not folder.is_dir():
                continue
            try:
                self.run_folder(folder.name)
            except DreamBoothError as e:
                out.append({"name": folder.name, "status": "refused", "message": str(e)})
                continue
            cfg, summary = _json(folder / CONFIG_FILE) or {}, _json(folder / SUMMARY_FILE)
            out.append({"name": folder.name, "status": self._state(folder.name, folder, summary)[0],
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

    def download(self, relative: str) -> Path:
        """A file or a folder under the workspace to download (a folder is zipped); nothing outside it."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root) or path == self.root or not path.exists():
            raise KeyError(relative)
        return path

    def run_log(self, run: str, offset: int = 0) -> dict[str, Any]:
        """The console output of the run's latest training process from byte `offset` (at most 64 kB at a time;
        progress bars' carriage returns become new lines), and where the next read starts."""
        job = self._last_job(run)
        if job is None:
            return {"text": "", "offset": 0}
        path = self.root / "jobs" / f"{job.id}.log"
        try:
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = max(0, min(offset, size), size - (1 << 16) if offset == 0 else 0)
                f.seek(start)
                data = f.read(1 << 16)
        except OSError:
            return {"text": "", "offset": 0}
        return {"text": data.decode(errors="replace").replace("\r", "\n"), "offset": start + len(data)}

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


def _error_line(event: dict[str, Any]) -> str:
    kept = event.get("kept")
    return f"{event.get('message')} ({kept})" if kept else str(event.get("message"))


def _runs(pid: int, config_file: Path) -> bool:
    """Whether `pid` is a live process of the job whose config file this is (its command line names it)."""
    if pid <= 0:
        return False
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")  # empty for a process that has ended
        return os.fsencode(str(config_file)) in args
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return False
    except OSError:
        return False
    try:  # no /proc (macOS): ask ps
        line = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return str(config_file) in line and "<defunct>" not in line


def lock_holder(folder: Path) -> int | None:
    """The pid of a live process holding the run folder (a run still training after the page was restarted, or a
    command started elsewhere): its lock file names the holder's pid and is removed before the lock is let go.
    Read, never locked: a probe that took the lock could make a starting run find its folder in use."""
    try:
        pid = int((folder / LOCK).read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0 or os.name == "nt":  # Windows' os.kill(pid, 0) would end the process
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:  # alive, someone else's
        return pid
    return pid


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None
