"""Base models that come with the package or a plug-in (the toy world's): the page offers them in its model list,
and each says how it is best evaluated and sampled. The core reads these records; it never names a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .registry import Registry


@dataclass(frozen=True)
class BundledModel:
    name: str
    label: str  # what the page's model list shows
    path: Path  # the pipeline folder
    family: str  # its model family (FAMILIES name)
    evaluation: str | None = None  # the evaluation backend that fits it (None: the default, DreamBench)
    sampling: dict[str, Any] = field(default_factory=dict)  # generate options its runs render with
    subjects: tuple[tuple[str, str], ...] = ()  # (name, class noun) of the subjects its evaluation backend knows


# loaded from the "dreambooth.models" plug-ins when first read
BUNDLED: Registry[BundledModel] = Registry("bundled model", plugins="dreambooth.models")


def bundled_at(model: str | None) -> BundledModel | None:
    """The bundled model whose folder `model` names (any spelling of the path); None for any other model."""
    if not model:
        return None
    where = Path(model).expanduser().resolve()
    return next((m for m in BUNDLED.values() if m.path.resolve() == where), None)
