"""Where commands write: one rule for every command that writes (train, generate, evaluate, export, demo, ...).

- A command writes into a folder that is new, empty (hidden files aside), or marked by its own record file
  (`.dreambooth.json`) from an earlier run of the same command. Any other folder, or a file where the folder should
  be, is refused in one line, so nothing of the user's is ever replaced.
- Inside such a folder it replaces only the entries the record lists as written by it (`OutputFolder.entry`).
- The folder must not be, hold, or sit inside anything the command reads (a model it loads, the user's photos). A
  new folder inside a model folder is allowed (`train --eval` writes `evaluation/` inside the trained output).
- While the command runs it holds an advisory lock (`.dreambooth.lock`; released by the OS if the process dies), so
  a second command on the same folder is refused instead of racing it.
- The record is written (the folder is *claimed*) only once the inputs have loaded: a command that fails before that
  leaves no trace, and a folder it created is removed again.
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
from pathlib import Path
from typing import Any

from .errors import DreamBoothError
from .files import write_text_atomic

RECORD = ".dreambooth.json"
LOCK = ".dreambooth.lock"
# What a command wrote before records existed (kept so that older outputs stay usable).
LEGACY_MARKERS = {"train": "train_config.json", "demo": "demo.json", "reproduce": "reproduce.json"}
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
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")


def visible(folder: Path) -> list[Path]:
    """A folder's entries that are not hidden (dot) files."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def read_record(folder: Path) -> dict[str, Any] | None:
    path = folder / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


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


def describe_filesystem_error(error: OSError, where: Path, kept: str) -> str:
    target = error.filename or where
    return f"cannot write {target}: {error.strerror} ({FS_HINTS[error.errno]}); {kept}"


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
        raise DreamBoothError(describe_filesystem_error(fs, Path(where), kept() if callable(kept) else kept)
                              ) from None


class OutputFolder:
    """The folder one command writes, checked, locked and claimed by the rule above. Use as a context manager:

        with OutputFolder(out, "generate", inputs={"--model": model}) as folder:
            ...load inputs...
            folder.claim()
            path = folder.entry("grid.png")   # refused if grid.png exists and was not written by generate
    """

    def __init__(self, path: str | Path, command: str, inputs: Mapping[str, str | Path | None] | None = None,
                 flag: str = "--output_dir", kept: Callable[[], str] | None = None, lock: bool = True):
        self.path = Path(path).expanduser()
        self.command, self.flag, self.lock_wanted = command, flag, lock
        self.inputs = {name: p for name, p in (inputs or {}).items() if p is not None}
        self.kept = kept or self._default_kept
        self.record: dict[str, Any] | None = None  # what an earlier run of this command recorded
        self.opened = self.created = self.claimed = False
        self._entries: list[str] = []
        self._info: dict[str, Any] = {}
        self._lock_fd: int | None = None

    # -- checks -------------------------------------------------------------------------------------------------

    @property
    def ours(self) -> bool:
        """An earlier run of this command wrote the folder."""
        return self.record is not None

    def check(self) -> None:
        """Refuse a file, an input's folder, or a folder holding what this command did not write; reads only."""
        if self.path.is_file() or (self.path.exists() and not self.path.is_dir()):
            raise DreamBoothError(f"{self.flag} {self.path} is a file; pass a folder")
        self._check_inputs()
        self._check_contents()

    def _check_contents(self) -> None:
        if not self.path.is_dir():
            return
        record = read_record(self.path)
        legacy = LEGACY_MARKERS.get(self.command)
        if record is not None and record.get("command") == self.command:
            self.record = record
        elif record is None and legacy and (self.path / legacy).is_file():
            self.record = {"command": self.command, "entries": None}  # None: every entry is ours
        elif record is not None:
            raise DreamBoothError(f"{self.flag} {self.path} was written by `dreambooth {record.get('command')}`, "
                                  f"not `dreambooth {self.command}`; pass a new folder")
        elif visible(self.path):
            raise DreamBoothError(f"{self.flag} {self.path} is not empty and was not written by `dreambooth "
                                  f"{self.command}`; pass a new or empty folder (nothing in it is changed)")

    def _check_inputs(self) -> None:
        check_inputs(self.path, self.inputs, self.flag)

    # -- lock, claim, entries ----------------------------------------------------------------------------------

    def open(self) -> OutputFolder:
        """Check, create the folder if needed, take its lock and check again (another process may have written the
        folder between the first check and the lock)."""
        self.check()
        try:
            if not self.path.exists():
                self.path.mkdir(parents=True)
                self.created = True
            if self.lock_wanted:
                self._lock()
            self._check_contents()
            self.opened = True
        except BaseException as e:
            self.close()
            fs = filesystem_error(e)
            if fs is not None:
                raise DreamBoothError(describe_filesystem_error(fs, self.path, "nothing was written")) from None
            raise
        return self

    def attach(self) -> None:
        """Write into a folder that another process of the same command opened and locked (distributed runs)."""
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
        self.claimed = True
        self._info = info
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
        """The existing entries an earlier run recorded (all visible ones for a legacy output)."""
        if self.record is None or not self.path.is_dir():
            return []
        names = self.record.get("entries")
        return visible(self.path) if names is None else [self.path / n for n in names if (self.path / n).exists()]

    def forget(self, names: Iterable[str]) -> None:
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
        """Release the lock; a folder this command created and never claimed is removed again."""
        if self._lock_fd is not None:
            with suppress(OSError):
                os.unlink(self.path / LOCK)  # before unlocking, so a waiter never locks a file that stays
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.created and not self.claimed:
            with suppress(OSError):
                self.path.rmdir()  # only if empty: nothing written is removed

    def _default_kept(self) -> str:
        if not self.claimed:
            return "nothing was written"
        return f"what was written before in {self.path} is kept"

    def __enter__(self) -> OutputFolder:
        return self if self.opened else self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc is not None:
            with writing(self.path, self.kept):
                raise exc


def check_inputs(out: Path, inputs: Mapping[str, str | Path | None], flag: str) -> None:
    """Refuse an output path that is, holds or sits inside an input; a new entry inside a model folder (an input
    whose name says `model`) is fine, as is an entry there that a dreambooth command wrote."""
    target = _resolved(out)
    for name, given in inputs.items():
        if given is None:
            continue
        src = _resolved(given)
        if not src.exists():
            continue  # a hub id, or a missing input that its own check reports
        if _inside(src, target):
            what = "is" if src == target else "holds"
            raise DreamBoothError(f"{flag} {out} {what} the {name} input {given}; write the output to a place of "
                                  "its own")
        if src.is_dir() and _inside(target, src):
            top = src / target.relative_to(src).parts[0]
            if "model" not in name or (top.exists() and read_record(top) is None):
                raise DreamBoothError(f"{flag} {out} is inside the {name} input {given}; write the output outside "
                                      "it")


def check_output_file(path: str | Path, flag: str, inputs: Mapping[str, str | Path | None] | None = None,
                      ours: Callable[[Path], bool] | None = None) -> Path:
    """A single output file: refused if it is a folder, clashes with an input, or exists and `ours` does not
    recognise it as written by this command (without `ours`, any existing file is refused)."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise DreamBoothError(f"{flag} {out} is a folder; pass a file path")
    check_inputs(out, inputs or {}, flag)
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
