"""Small file helpers shared by checkpoints, class images, exports and run metadata: nothing is ever seen
half-written under its final name."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def staged(path: Path, exclusive: bool = False) -> Iterator[Path]:
    """A hidden temporary path beside `path` (a file or a folder is written there), renamed to `path` when the
    block succeeds and removed when it fails (disk full, a kill), so readers never see a half-written result.
    `exclusive`: never replace an existing `path`, even one that appeared meanwhile (FileExistsError)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per process: two writers never share it
    try:
        yield tmp
        readable(tmp)
        if not exclusive:
            os.replace(tmp, path)
        elif tmp.is_dir():
            if path.exists():  # rename() would replace an empty folder that appeared meanwhile
                raise FileExistsError(f"{path} exists")
            os.rename(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists: no check-then-replace race
            os.unlink(tmp)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    with staged(path) as tmp:
        tmp.write_text(text)


def save_image_atomic(image: Any, path: Path, **kwargs: Any) -> None:
    """Save a PIL image as PNG, atomically."""
    with staged(path) as tmp:
        image.save(tmp, format="PNG", **kwargs)


def _umask() -> int:
    """This process's umask, read without changing it (os.umask sets it, a race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def readable(path: Path) -> None:
    """Give a written file (or every file of a written folder) the mode a new file gets here (0644 under the usual
    umask): safetensors writes its files 0600, which other users and a web server cannot read."""
    mode = 0o666 & ~_umask()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()] \
        if path.is_dir() else []
    for file in files:
        if file.stat().st_mode & 0o777 != mode:
            os.chmod(file, mode)
