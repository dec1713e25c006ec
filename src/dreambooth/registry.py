"""One registry for everything chosen by name (model families, objectives, samplers, exporters, evaluation
backends): the names are the CLI choices, a duplicate name is refused, and a class entry must fill every hook
of its abstract base before it can be registered."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: add an entry under `name` (default: its `name` attribute)."""
        def add(entry: T) -> T:
            key = name if name is not None else getattr(entry, "name", None)
            if not isinstance(key, str) or not key:
                raise TypeError(f"a {self.kind} needs a name to be registered: {entry!r}")
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice ({self._entries[key]!r} and {entry!r})")
            if inspect.isclass(entry) and inspect.isabstract(entry):
                missing = ", ".join(sorted(entry.__abstractmethods__))
                raise TypeError(f"{self.kind} {key!r} ({entry.__name__}) does not fill these hooks: {missing}")
            self._entries[key] = entry
            return entry

        return add

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, default: T | None = None) -> T | None:
        return self._entries.get(name, default)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def names(self) -> list[str]:
        return list(self._entries)
