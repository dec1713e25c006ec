"""A training run's progress as structured events, one stream for every consumer.

The loop states each fact once — a step's losses and learning rate, a checkpoint, a validation grid, the end —
as an event (a flat JSON-able dict with "event" and "time"); sinks consume the stream: the progress bar, the
experiment trackers (TensorBoard, W&B, ...) and `events.jsonl` in the output folder, which `dreambooth ui` (or any
script) tails while the run goes on in its own process. Events from before the output folder is the run's own
(class images are made before the models load) are kept and written first once the file opens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("dreambooth")
EVENTS_FILE = "events.jsonl"
Sink = Callable[[dict[str, Any]], None]


class Events:
    """Fan-out of events to sinks; sinks added later first receive what was emitted before them (every event but
    the steps, whose number has no bound: a sink that needs them is added before training starts)."""

    def __init__(self, *sinks: Sink):
        self.sinks = list(sinks)
        self.history: list[dict[str, Any]] = []
        self.latest: dict[str, dict[str, Any]] = {}

    def emit(self, kind: str, **data: Any) -> dict[str, Any]:
        event = {"event": kind, "time": round(time.time(), 3), **data}
        self.latest[kind] = event
        if kind != "step":
            self.history.append(event)
        for sink in self.sinks:
            sink(event)
        return event

    def last(self, kind: str) -> dict[str, Any]:
        """The latest event of a kind (KeyError when none was emitted)."""
        return self.latest[kind]

    def add(self, sink: Sink, replay: bool = True) -> None:
        if replay:
            for event in self.history:
                sink(event)
        self.sinks.append(sink)

    def close(self) -> None:
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()


class EventFile:
    """Writes each event as one JSON line, flushed at once, so a reader in another process sees it. A resumed run
    appends to its file (its "start" event says where it resumed); a new run starts the file afresh. A file that
    cannot be written (a full disk) is given up with a warning: the log never stops the training."""

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        self.file = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def __call__(self, event: dict[str, Any]) -> None:
        if self.file.closed:
            return
        try:
            self.file.write(json.dumps(finite(event), default=str, allow_nan=False) + "\n")
            self.file.flush()
        except OSError as e:
            log.warning("%s is no longer written (%s); training goes on", self.path, e)
            self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # what could not be flushed is already lost; the run goes on
            self.file.close()


def finite(value: Any) -> Any:
    """NaN and infinities as null: a browser's JSON.parse refuses them (a diverged loss is NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def read_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The events appended to `path` since byte `offset`, and the offset to read from next. A last line still being
    written (no newline yet) is left for the next read; a missing file has no events yet."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:end].decode("utf-8").splitlines() if line.strip()]
    return events, offset + end


def eta_seconds(step: int, total: int, first_step: int, first_time: float, now: float) -> float | None:
    """Seconds left at this invocation's pace (steps done since it started); None before a step is done."""
    done = step - first_step
    if done <= 0:
        return None
    return (total - step) * (now - first_time) / done


def progress_bar(bar: Any) -> Sink:
    """The terminal's view of the stream: the bar's postfix shows the reported loss and learning rate (the loop moves
    the bar itself every step; losses arrive a logging window at a time)."""

    def sink(event: dict[str, Any]) -> None:
        if event["event"] == "step":
            bar.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{event['lr']:.2e}")

    return sink


def trackers(acc: Any) -> Sink:
    """The experiment trackers' view (TensorBoard, W&B, ...): each step's losses and learning rate."""

    def sink(event: dict[str, Any]) -> None:
        if event["event"] == "step":
            acc.log({"loss": event["loss"], "loss_instance": event["loss_instance"],
                     "loss_prior": event["loss_prior"], "lr": event["lr"]}, step=event["step"])

    return sink
