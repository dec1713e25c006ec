"""User-facing errors: each one prints as a single line naming the problem and the fix."""

from __future__ import annotations

import os
import sys


class DreamBoothError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class ConfigError(DreamBoothError):
    """A config value is missing, mistyped or out of range."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is not allowed: {allowed}")


class DataError(DreamBoothError):
    """Instance or class images cannot be used as given."""


class ModelError(DreamBoothError):
    """A model folder or hub id cannot be loaded as a supported pipeline."""


class Stopped(DreamBoothError):
    """A run stopped on request (SIGTERM, the UI's stop button) after saving a checkpoint to resume from."""


STOPPED_EXIT = 143  # 128 + SIGTERM: the CLI's exit status for a run stopped on request, its checkpoint saved


class CheckpointError(DreamBoothError):
    """A checkpoint or output folder conflicts with the run being started."""


def is_out_of_memory(error: BaseException) -> bool:
    """A GPU or CPU allocation failure (torch raises RuntimeError subclasses with these messages)."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return "out of memory" in text.lower() or "can't allocate memory" in text


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name if it has none), cut to `limit` characters: what a
    one-line error quotes of a library's failure."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def say(line: str) -> None:
    """Write one line to stderr in one write: the processes of a multi-process run share the launcher's stderr, and
    unbuffered (python -u, PYTHONUNBUFFERED) a print is two writes, so two processes' lines could interleave into
    one. A write below the pipe's atomic size (4 kB) reaches the reader whole."""
    text = line.replace("\n", " ") + "\n"
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a file (captured, redirected in-process)
        sys.stderr.write(text)
        sys.stderr.flush()
        return
    sys.stderr.flush()
    data = text.encode(errors="replace")
    while data:
        data = data[os.write(fd, data):]
