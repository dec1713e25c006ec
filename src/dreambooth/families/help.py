"""Help text made from the family registry: each option's per-family default, as `--help` and the page show it,
so that a new family's defaults appear there with no other file changed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..objectives import OBJECTIVES


def shown(v: Any) -> str:
    """A default as help shows it: 5e-6, not 5e-06 or 0.000005; on/off for a switch."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return (f"{v:.0e}" if 0 < abs(v) < 1e-2 else f"{v:g}").replace("e-0", "e-")
    return str(v)


def per_family(value: Callable[[Any], Any]) -> str:
    """Each registered family's value of something, grouped: e.g. "512 for sd, sd3 and flux; 1024 for sdxl"
    (families whose value is None are left out)."""
    from . import FAMILIES

    groups: dict[str, list[str]] = {}
    for name, cls in FAMILIES.items():
        if (v := value(cls)) is not None:
            groups.setdefault(shown(v), []).append(name)
    return "; ".join(f"{v} for {', '.join(names[:-1]) + ' and ' if len(names) > 1 else ''}{names[-1]}"
                     for v, names in groups.items())


def family_help(text: str, value: Callable[[Any], Any]) -> Callable[[], str]:
    """Help text whose `{}` is each family's value (`per_family`), made from the registry when help is shown."""
    return lambda: text.format(per_family(value))


def option_default(name: str) -> Callable[[Any], Any]:
    """A family's default of an option it or its objective reads (None where the option is not its)."""
    def value(cls: Any) -> Any:
        reads = name in cls.options or name in OBJECTIVES[cls.objective].options
        return cls.option_defaults.get(name) if reads else None

    return value
