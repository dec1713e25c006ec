"""Small file helpers shared by checkpoints, class images and run metadata."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a hidden temporary file and a rename, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves the old file, and no half-written one
        raise


def save_image_atomic(image: Any, path: Path, **kwargs: Any) -> None:
    """Save a PIL image (as PNG) the same way."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG", **kwargs)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
