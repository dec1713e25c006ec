"""One registry for everything chosen by name (model families, objectives, samplers, exporters, evaluation
backends): the names are the CLI choices, a duplicate name is refused, and a class entry must fill every hook
of its abstract base, and give every class attribute its bases declare (`x: ClassVar[...]` with no value), before
it can be registered."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


def undeclared_attributes(cls: type) -> list[str]:
    """The class attributes that `cls` or its bases declare (annotated `ClassVar`) and nothing gives a value."""
    declared = {name for klass in cls.__mro__ for name, annotation in vars(klass).get("__annotations__", {}).items()
                if "ClassVar" in str(annotation)}
    return sorted(name for name in declared if not hasattr(cls, name))


class Registry(Generic[T]):
    """Entries by name, in registration order. A registry with a `plugins` group is extended by plug-ins: the
    modules that installed packages name under that entry-point group (this package's own, e.g. the toy world, are
    declared in pyproject.toml) are imported when the registry is first read, and register their entries then."""

    def __init__(self, kind: str, plugins: str | None = None):
        self.kind = kind
        self.plugins = plugins
        self._entries: dict[str, T] = {}
        self._loaded = plugins is None

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # first: a plug-in that reads this registry while it registers does not loop
        for point in sorted(entry_points(group=self.plugins), key=lambda p: p.name):
            importlib.import_module(point.value.partition(":")[0])

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
            if inspect.isclass(entry) and (undeclared := undeclared_attributes(entry)):
                raise TypeError(f"{self.kind} {key!r} ({entry.__name__}) does not set these class attributes: "
                                + ", ".join(undeclared))
            self._entries[key] = entry
            return entry

        return add

    def unregister(self, name: str) -> T:
        """Remove an entry (a test's own family, registered for the test's length)."""
        return self._entries.pop(name)

    def __getitem__(self, name: str) -> T:
        self._load()
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._entries)

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def get(self, name: str, default: T | None = None) -> T | None:
        self._load()
        return self._entries.get(name, default)

    def items(self):
        self._load()
        return self._entries.items()

    def values(self):
        self._load()
        return self._entries.values()

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)
