"""Small file helpers shared by checkpoints, class images and run metadata."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a hidden temporary file and a rename, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def claim_output_dir(out: Path, marker: str, writer: str) -> bool:
    """Make `out` ours: new, empty, or holding `marker` (written there by `writer` earlier). Any other folder, or a
    file, is refused, so nothing of the user's is overwritten. True when an earlier output of ours is there."""
    from .errors import DreamBoothError

    if out.is_file():
        raise DreamBoothError(f"--output_dir {out} is a file; pass a folder")
    ours = (out / marker).is_file()
    if out.exists() and any(out.iterdir()) and not ours:
        raise DreamBoothError(f"{out} is not empty and was not written by {writer}; pass --output_dir with a new "
                              "folder")
    out.mkdir(parents=True, exist_ok=True)
    return ours
