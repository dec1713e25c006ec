"""Where commands write: one rule for every command that writes (train, generate, evaluate, export, demo, ...).

- A command writes into a folder that is new, empty (hidden files aside), or marked by its own record file
  (`.dreambooth.json`) from an earlier run of the same command. Any other folder, or a file where the folder should
  be, is refused in one line, so nothing of the user's is ever replaced.
- Inside such a folder, commands that share it with the user (generate, evaluate, demo, reproduce) replace only the
  entries the record lists as theirs (`OutputFolder.entry`); train and toy pretrain write a pipeline's layout and
  own their whole folder.
- The folder must not be, hold, or sit inside anything the command reads (the user's photos, a config). A model
  folder is stricter only about itself: a new folder inside it is fine (`train --eval` writes `evaluation/` inside
  the trained output), one of its parts is not.
- While the command runs it holds an advisory lock (`.dreambooth.lock`; the OS releases it if the process dies), so
  a second command on the same folder is refused instead of racing it.
- The record is written (the folder is *claimed*) only once the inputs have loaded: a command that fails before that
  leaves no trace, and folders it created are removed again.
- File-system errors (read-only, disk full, a file where a folder should be) become one-line errors that say what
  was kept.

Single output files (`export --output`, `evaluate-summary --output`) follow the same rule with `check_output_file`.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DreamBoothError
from .files import write_text_atomic

RECORD = ".dreambooth.json"
LOCK = ".dreambooth.lock"
PathLike = str | Path | None


@dataclass(frozen=True)
class Legacy:
    """How a command's output looked before records existed: a marker file holding `key`, beside `beside`; the
    entries it wrote (None: the whole folder, for commands that own theirs)."""

    marker: str
    key: str
    beside: tuple[str, ...]
    entries: tuple[str, ...] | None


LEGACY = {
    "train": Legacy("train_config.json", "instance_prompt", ("run_summary.json", "latest"), None),
    "demo": Legacy("demo.json", "subject", ("instance-images",), (
        "demo.json", "instance-images", "model", "class-images", "before_after.png", "report.json", "report.txt")),
    "reproduce": Legacy("reproduce.json", "studies", ("runs",), (
        "reproduce.json", "runs", "class-images", "ablations.md", "ablations.png", "ablations.json")),
}
FS_HINTS = {
    errno.ENOSPC: "free some disk space or choose another folder",
    errno.EDQUOT: "free some of your disk quota or choose another folder",
    errno.EFBIG: "the file system refused a file this large; choose another folder or free space",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "you may not write there; choose a folder you can write to",
    errno.EPERM: "you may not write there; choose a folder you can write to",
    errno.ENOTDIR: "a file stands where a folder should be; move it or choose another path",
    errno.EEXIST: "a file stands where a folder should be; move it or choose another path",
    errno.EISDIR: "a folder stands where a file should be; move it or choose another path",
}
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # how safetensors reports the OSError it wraps


def visible(folder: Path) -> list[Path]:
    """A folder's entries that are not hidden (dot) files."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def read_record(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _legacy_record(folder: Path, command: str) -> dict[str, Any] | None:
    """The record an older output of `command` implies, when the folder really is one (the marker parses and holds
    its key, and what the command writes beside it is there), else None."""
    legacy = LEGACY.get(command)
    if legacy is None:
        return None
    try:
        marker = json.loads((folder / legacy.marker).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(marker, dict) or legacy.key not in marker:
        return None
    if not any((folder / name).exists() for name in legacy.beside) and not any(folder.glob("checkpoint-*")):
        return None
    return {"command": command, "entries": None if legacy.entries is None else list(legacy.entries)}


def filesystem_error(error: BaseException) -> OSError | None:
    """The OSError behind a failed write (also when a library wrapped it, as safetensors does), if it is one of
    the file-system errors a user can fix."""
    if isinstance(error, OSError) and error.errno in FS_HINTS:
        return error
    match = _OS_ERROR_IN_TEXT.search(str(error))
    if match and int(match.group(1)) in FS_HINTS:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return None


@contextmanager
def writing(where: str | Path, kept: str | Callable[[], str] = "nothing was written") -> Iterator[None]:
    """Turn a file-system error while writing `where` into a one-line DreamBoothError that says what was kept."""
    try:
        yield
    except DreamBoothError:
        raise
    except Exception as e:
        fs = filesystem_error(e)
        if fs is None:
            raise
        target = fs.filename or where
        what_was_kept = kept() if callable(kept) else kept
        raise DreamBoothError(f"cannot write {target}: {fs.strerror} ({FS_HINTS[fs.errno]}); {what_was_kept}"
                              ) from None


def check_inputs(out: Path, inputs: Mapping[str, PathLike], models: Mapping[str, PathLike], flag: str) -> None:
    """Refuse an output path that is, holds or sits inside an input. Models (folders or hub ids) may hold a new
    entry, or one a dreambooth command wrote; a model path that does not exist is taken for a hub id."""
    target = _resolved(out)
    for name, given in [*inputs.items(), *models.items()]:
        if given is None:
            continue
        src = _resolved(given)
        if name in models and not src.exists():
            continue
        if _inside(src, target):
            what = "is" if src == target else "holds"
            raise DreamBoothError(f"{flag} {out} {what} the {name} input {given}; write the output to a place of "
                                  "its own")
        if _inside(target, src) and (src.is_dir() or not src.exists()):
            top = src / target.relative_to(src).parts[0]
            if name not in models or (top.exists() and read_record(top) is None):
                raise DreamBoothError(f"{flag} {out} is inside the {name} input {given}; write the output outside "
                                      "it")


def check_class_folder(folder: str | Path, photos: str | Path, models: Mapping[str, PathLike]) -> None:
    """The folder class images are generated into (--class_data_dir) must be a place of their own: not the
    subject's photos (nor inside or around them: the next run would train on generated images as photos), not
    inside a base model's folder, not inside another training run's output."""
    target, subject = _resolved(folder), _resolved(photos)
    fix = "pass a folder of its own for --class_data_dir"
    if _inside(target, subject) or _inside(subject, target):
        how = "is" if target == subject else "is inside" if _inside(target, subject) else "holds"
        raise DreamBoothError(f"class folder {folder} {how} the instance folder {photos}: generated class images "
                              f"would be written among the subject's photos; {fix}")
    for name, given in models.items():
        if given is not None and _resolved(given).is_dir() and _inside(target, _resolved(given)):
            raise DreamBoothError(f"class folder {folder} is inside the {name} {given}; {fix}")
    for parent in [target, *target.parents]:
        record = read_record(parent) if parent.is_dir() else None
        if record is not None and record.get("command") == "train":
            raise DreamBoothError(f"class folder {folder} is inside {parent}, the output of another training run; "
                                  f"{fix}")


class OutputFolder:
    """The folder one command writes, checked, locked and claimed by the rule above. Use as a context manager:

        with OutputFolder(out, "generate", models={"--model": model}) as folder:
            ...load inputs...
            folder.claim()
            path = folder.entry("grid.png")   # refused if grid.png exists and was not written by generate
    """

    def __init__(self, path: str | Path, command: str, inputs: Mapping[str, PathLike] | None = None,
                 models: Mapping[str, PathLike] | None = None, flag: str = "--output_dir",
                 kept: Callable[[], str] | None = None):
        self.path = Path(path).expanduser()
        self.command, self.flag = command, flag
        self.inputs, self.models = dict(inputs or {}), dict(models or {})
        self.kept = kept or self._default_kept
        self.record: dict[str, Any] | None = None  # what an earlier run of this command recorded
        self.opened = self.claimed = False
        self._made: list[Path] = []  # folders this command created, deepest first
        self._entries: list[str] = []
        self._info: dict[str, Any] = {}
        self._lock_fd: int | None = None

    @property
    def ours(self) -> bool:
        """An earlier run of this command wrote the folder."""
        return self.record is not None

    # -- checks (read only) --------------------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse a file, an input's place, or a folder holding what this command did not write."""
        if self.path.exists() and not self.path.is_dir():
            raise DreamBoothError(f"{self.flag} {self.path} is a file; pass a folder")
        check_inputs(self.path, self.inputs, self.models, self.flag)
        self._check_contents()

    def _check_contents(self) -> None:
        if not self.path.is_dir():
            return
        record = read_record(self.path)
        if record is not None and record.get("command") != self.command:
            raise DreamBoothError(f"{self.flag} {self.path} was written by `dreambooth {record.get('command')}`, "
                                  f"not `dreambooth {self.command}`; pass a new folder")
        self.record = record or _legacy_record(self.path, self.command)
        if self.record is None and visible(self.path):
            raise DreamBoothError(f"{self.flag} {self.path} is not empty and was not written by `dreambooth "
                                  f"{self.command}`; pass a new or empty folder (nothing in it is changed)")

    # -- lock, claim, entries ----------------------------------------------------------------------------------

    def open(self) -> OutputFolder:
        """Check, create the folder if needed, take its lock, and check its contents again under the lock (another
        process may have written there since the first check)."""
        self.check()
        try:
            for _ in range(10):  # a holder that failed may remove the folder as we take its lock: make it again
                self._make_folder()
                try:
                    self._lock()
                    break
                except FileNotFoundError:
                    continue
            self._check_contents()
            self.opened = True
        except BaseException as e:
            self.close()
            with writing(self.path):
                raise e
        return self

    def _make_folder(self) -> None:
        missing = [p for p in [self.path, *self.path.parents] if not p.exists()]
        for folder in reversed(missing):
            try:
                folder.mkdir()
                self._made.insert(0, folder)
            except FileExistsError:  # another process made it a moment ago
                if not folder.is_dir():
                    raise

    def attach(self) -> None:
        """Write into a folder that another process of the same run opened, checked and locked (distributed
        training): its decision stands; a look of this process's own could see what that one wrote since."""
        self.opened = True

    def _lock(self) -> None:
        path = self.path / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise DreamBoothError(f"{self.flag} {self.path} is in use by another dreambooth process (pid "
                                      f"{holder}); wait for it to finish or pass another folder")
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder removed the file as we opened it: take the new one
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def claim(self, **info: Any) -> None:
        """Mark the folder as this command's (inputs have loaded; writing starts)."""
        previous = (self.record or {}).get("entries")
        self._entries = list(previous) if isinstance(previous, list) else []
        self._info = info
        self.claimed = True
        self._write_record()

    def entry(self, name: str) -> Path:
        """The path of a top-level entry about to be written; refused if it exists and is not ours."""
        path = self.path / name
        previous = (self.record or {}).get("entries", [])
        if path.exists() and previous is not None and name not in previous and name not in self._entries:
            raise DreamBoothError(f"{path} was not written by `dreambooth {self.command}` and is not replaced; move "
                                  f"it or pass another {self.flag}")
        if name not in self._entries:
            self._entries.append(name)
            if self.claimed:
                self._write_record()
        return path

    def owned_entries(self) -> list[Path]:
        """The existing entries an earlier run recorded (every visible one where it owned the whole folder)."""
        if self.record is None or not self.path.is_dir():
            return []
        names = self.record.get("entries")
        return visible(self.path) if names is None else [self.path / n for n in names if (self.path / n).exists()]

    def forget(self, names: Iterable[str]) -> None:
        """Entries removed by the command: no longer listed as its own."""
        drop = set(names)
        self._entries = [n for n in self._entries if n not in drop]
        if self.record is not None and isinstance(self.record.get("entries"), list):
            self.record["entries"] = [n for n in self.record["entries"] if n not in drop]
        if self.claimed:
            self._write_record()

    def _write_record(self) -> None:
        write_text_atomic(self.path / RECORD, json.dumps(
            {"command": self.command, "entries": self._entries, **self._info}, indent=2) + "\n")

    def close(self) -> None:
        """Release the lock; folders this command created and never claimed are removed again."""
        if self._lock_fd is not None:
            with suppress(OSError):
                os.unlink(self.path / LOCK)  # before unlocking, so no one locks a file that stays
            os.close(self._lock_fd)
            self._lock_fd = None
        if not self.claimed:
            for folder in self._made:
                with suppress(OSError):
                    folder.rmdir()  # only if empty: nothing written is removed
            self._made = []

    def _default_kept(self) -> str:
        return f"what was written before in {self.path} is kept" if self.claimed else "nothing was written"

    def __enter__(self) -> OutputFolder:
        return self if self.opened else self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc is not None:
            with writing(self.path, self.kept):
                raise exc


def check_output_file(path: str | Path, flag: str, inputs: Mapping[str, PathLike] | None = None,
                      models: Mapping[str, PathLike] | None = None, ours: Callable[[Path], bool] | None = None
                      ) -> Path:
    """A single output file: refused if it is a folder, clashes with an input, or exists and `ours` does not
    recognise it as written by this command (without `ours`, any existing file is refused)."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise DreamBoothError(f"{flag} {out} is a folder; pass a file path")
    check_inputs(out, inputs or {}, models or {}, flag)
    if out.exists() and not (ours is not None and ours(out)):
        raise DreamBoothError(f"{out} already exists and was not written by this command; pass a new path "
                              "(nothing is overwritten)")
    return out


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
