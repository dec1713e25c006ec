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
