"""Typed config schemas: one dataclass drives the CLI flags, config files and the Python API.

A field is declared with `option(default, help, choices=..., check=...)`. From the dataclass we derive the argparse
flags, the accepted config-file keys and the checks; every rejection is a `ConfigError` naming the field, the value
and what is allowed. Whatever the source, numbers must be finite and paths have `~` and `$VAR` expanded, here.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import tomllib
import yaml

from .errors import ConfigError, DreamBoothError, first_line

T = TypeVar("T")
REQUIRED: Any = dataclasses.MISSING
NUMBERS: dict[type, tuple[str, Any]] = {int: ("an integer", int | str), float: ("a number", int | float | str)}


def option(
    default: Any = REQUIRED,
    help: str | Callable[[], str] = "",
    *,
    choices: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    check: Callable[[Any], str | None] | None = None,
    group: str = "options",
    aliases: tuple[str, ...] = (),
    path: bool = False,
) -> Any:
    """Declare a config field; `check(value)` returns an explanation of what is allowed, or None when fine;
    `aliases` are further command-line flags for it (e.g. "--model"); `path`: its text is a path (see
    `holds_path`) though neither its type nor its name says so; `help` may be a function, for text made from a
    registry (e.g. each model family's default) when help is shown."""
    meta = {"help": help, "choices": choices, "check": check, "group": group, "aliases": aliases, "path": path}
    if default is REQUIRED:
        return dataclasses.field(default=None, metadata={**meta, "required": True})
    return dataclasses.field(default=default, metadata={**meta, "required": False})


def at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or v >= low else f"must be >= {low}"


def between(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or low <= v <= high else f"must be from {low} to {high}"


def positive(v: Any) -> str | None:
    return None if v is None or v > 0 else "must be > 0"


def in_unit_interval(v: Any) -> str | None:
    return None if v is None or 0 <= v < 1 else "must be in [0, 1)"


def help_of(f: dataclasses.Field) -> str:
    """A field's help text (made now, if it is made from a registry)."""
    text = f.metadata.get("help", "")
    return text() if callable(text) else text


def fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def choices_of(f: dataclasses.Field) -> list[str] | None:
    choices = f.metadata.get("choices")
    if choices is None:
        return None
    return list(choices() if callable(choices) else choices)


def base_type(tp: Any) -> tuple[type, bool]:
    """(the non-None type, whether None is allowed) of an annotation such as `int | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def holds_path(name: str, f: dataclasses.Field, tp: Any) -> bool:
    """Whether a field's text is a filesystem path: typed `Path`, named `*_dir` or `*_path` (such as
    `pretrained_model_name_or_path`: a hub id holds no `~` or `$`, so expanding it changes nothing), or declared
    with `option(path=True)`."""
    base, _ = base_type(tp)
    if typing.get_origin(base) is list:
        (base,) = typing.get_args(base)
    return base is Path or name.endswith(("_dir", "_path")) or bool(f.metadata.get("path"))


VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand_path(name: str, text: str) -> str:
    """`~` and `$VAR`/`${VAR}` expanded as a shell would, so that a config file or the Python API means what the
    same text means on a command line (not a literal `./$HOME` folder); an unset variable is an error rather than
    left in the path."""

    def value_of(match: re.Match) -> str:
        variable = match.group(1) or match.group(2)
        if variable not in os.environ:
            raise ConfigError(name, text, f"${variable} is not set; set it or write the path out")
        return os.environ[variable]

    return os.path.expanduser(VARIABLE.sub(value_of, text))


def _number(name: str, base: type, value: Any) -> int | float:
    expected, accepted = NUMBERS[base]
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise ConfigError(name, value, f"expected {expected}")
    try:
        number = base(value)
    except (ValueError, OverflowError):  # OverflowError: an int from an infinite float, a float from a huge int
        raise ConfigError(name, value, f"expected {expected}") from None
    # every source can spell inf and nan (the CLI's "inf", JSON's Infinity, YAML's .inf, TOML's inf, Python's
    # float("nan")); they pass range checks such as >= 0 and turn the weights into NaN while the run exits 0
    if not math.isfinite(number):
        raise ConfigError(name, value, "expected a finite number")
    return number


def _coerce(name: str, tp: Any, value: Any, path: bool = False) -> Any:
    """`value` as the annotation `tp` asks; `path`: text is expanded as a path (`holds_path`)."""
    base, optional = base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(name, value, f"a {base.__name__} is required")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(name, value, "expected true or false")
    if base in NUMBERS:
        return _number(name, base, value)
    if base is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(name, value, "expected a path")
        return Path(expand_path(name, str(value)))
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(name, value, "expected a string")
        return expand_path(name, value) if path else value
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        if isinstance(value, str | Mapping):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(name, value, "expected a list")
        if dataclasses.is_dataclass(item):  # a list of tables: each entry named by its place in the list
            return [_coerce(f"{name}[{i}]", item, v, path) for i, v in enumerate(value)]
        return [_coerce(name, item, v, path) for v in value]
    if dataclasses.is_dataclass(base):
        return _table(name, base, value)
    return value


def _table(name: str, cls: type, value: Any) -> Any:
    """A nested config (a config file's table, a dict, or JSON text on the command line), built and checked; its
    errors name the field inside it (`subjects[0].instance_prompt`)."""
    if isinstance(value, cls):
        value = to_dict(value)
    if isinstance(value, str):
        try:
            value = json.loads(value, object_pairs_hook=_unique_pairs)
        except ValueError as e:
            raise ConfigError(name, value, f"expected a JSON object such as '{{\"{next(iter(fields(cls)))}\": "
                              f"...}}' ({first_line(e, 80)})") from None
    if not isinstance(value, Mapping):
        raise ConfigError(name, value, f"expected a table with the keys {', '.join(fields(cls))}")
    try:
        return build(cls, value)
    except ConfigError as e:
        required = e.value is None and e.allowed.startswith("required;")
        raise ConfigError(f"{name}.{e.field}", e.value, "required in each entry" if required else e.allowed) from None


def _unknown(cls: type, key: str) -> ConfigError:
    names = list(fields(cls))
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "see `dreambooth <command> --help` for the accepted keys"
    return ConfigError(key, "...", f"unknown option; {hint}")


def _missing(name: str) -> ConfigError:
    return ConfigError(name, None, f"required; pass --{name} or set `{name}` in the config file")


class Validated:
    """A config class whose instances refuse assignment once `build` (or `derive`) has checked them: what was
    validated is what runs. A value a run works out later (a default that needs the model's family, the seed drawn)
    goes into a new config made by `derive`, which is checked again."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_validated"):
            raise dataclasses.FrozenInstanceError(
                f"{type(self).__name__} was validated and is frozen: make a changed copy with "
                f"schema.derive(config, {name}=...)")
        super().__setattr__(name, value)


def _frozen(config: T) -> T:
    if isinstance(config, Validated):
        object.__setattr__(config, "_validated", True)
    return config


def derive(config: T, **changes: Any) -> T:
    """A checked, frozen copy of a built config with some values changed (those a run works out itself)."""
    changed = dataclasses.replace(config, **changes)
    check(changed)
    return _frozen(changed)


def build(cls: type[T], values: Mapping[str, Any]) -> T:
    """Build and check a config from plain values (config file, CLI or Python keywords); a `Validated` config
    comes back frozen."""
    known = fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise _unknown(cls, key)
        kwargs[key] = _coerce(key, hints[key], value, holds_path(key, known[key], hints[key]))
    for name, f in known.items():
        if f.metadata.get("required") and kwargs.get(name) is None:
            raise _missing(name)
    config = cls(**kwargs)
    check(config)
    return _frozen(config)


def problems(cls: type, values: Mapping[str, Any]) -> dict[str, str]:
    """Every field's problem, by field name: the one-line message `build` would raise for it (a form shows each
    beside its field); {} when `values` build. Cross-field checks run once every field is fine on its own."""
    known, hints = fields(cls), typing.get_type_hints(cls)
    found: dict[str, str] = {}
    for key, value in values.items():
        if key not in known:
            found[key] = str(_unknown(cls, key))
            continue
        try:
            coerced = _coerce(key, hints[key], value, holds_path(key, known[key], hints[key]))
            _check_field(key, known[key], coerced)
        except ConfigError as e:
            found[key] = str(e)
    for name, f in known.items():
        if f.metadata.get("required") and values.get(name) in (None, "") and name not in found:
            found[name] = str(_missing(name))
    if not found:
        try:
            build(cls, values)
        except ConfigError as e:
            found[e.field] = str(e)
        except DreamBoothError as e:  # a cross-field rule that names no one field
            found[""] = str(e)
    return found


def _check_field(name: str, f: dataclasses.Field, value: Any) -> None:
    allowed = choices_of(f)
    if allowed is not None:
        for item in value if isinstance(value, list | tuple) else [value]:  # each item of a list is checked
            if item is not None and item not in allowed:
                raise ConfigError(name, item, "choose one of " + ", ".join(allowed))
    rule = f.metadata.get("check")
    problem = rule(value) if rule else None
    if problem:
        raise ConfigError(name, value, problem)


def check(config: Any) -> None:
    """Run the per-field checks on already-coerced values, then the config's own cross-field `check()`."""
    for name, f in fields(type(config)).items():
        _check_field(name, f, getattr(config, name))
    if callable(getattr(config, "check", None)):  # a field may be called `check` (identifier --check)
        config.check()



def to_dict(config: Any) -> dict[str, Any]:
    """Plain JSON-able values (paths as strings)."""
    out = {}
    for name in fields(type(config)):
        value = getattr(config, name)
        if isinstance(value, list | tuple) and value and dataclasses.is_dataclass(value[0]):
            value = [to_dict(v) for v in value]  # a list of tables
        out[name] = str(value) if isinstance(value, Path) else value
    return out


def values_of(config: Any, cls: type) -> dict[str, Any]:
    """Plain values from a config object, a dict, a config-file path, or None."""
    if isinstance(config, cls):
        return to_dict(config)
    if isinstance(config, str | Path):
        return load_file(config)
    return dict(config or {})


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (json keeps the last of a repeated key without a word)."""
    keys = [key for key, _ in pairs]
    repeated = next((key for key in keys if keys.count(key) > 1), None)
    if repeated is not None:
        raise ValueError(f"key {repeated!r} is repeated")
    return dict(pairs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, refusing a key repeated in one mapping (PyYAML keeps the last without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: list[Any] = []
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is repeated", key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep)


PARSERS: dict[str, Callable[[str], Any]] = {
    ".toml": tomllib.loads,
    ".yaml": lambda text: yaml.load(text, _UniqueKeyLoader) or {},
    ".yml": lambda text: yaml.load(text, _UniqueKeyLoader) or {},
    ".json": lambda text: json.loads(text, object_pairs_hook=_unique_pairs),
}


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON config file into a flat dict; one level of [sections] is flattened."""
    path = Path(path)
    if path.is_dir():
        raise DreamBoothError(f"config file {path} is a folder; pass the path of a .toml, .yaml or .json file")
    if not path.is_file():
        raise DreamBoothError(f"config file {path} does not exist; check the --config path")
    parse = PARSERS.get(path.suffix.lower())  # run.TOML is a TOML file too
    if parse is None:
        raise DreamBoothError(f"config file {path} has an unknown extension; use .toml, .yaml, .yml or .json")
    try:
        data = parse(path.read_text(encoding="utf-8-sig"))  # -sig: a BOM (Windows editors write one) is dropped
    except (ValueError, yaml.YAMLError) as e:  # ValueError: TOML's, JSON's and UTF-8 decoding errors
        first = first_line(e, 300)
        raise DreamBoothError(f"config file {path} cannot be parsed ({first}); fix its syntax") from None
    if not isinstance(data, dict):
        raise DreamBoothError(f"config file {path} must hold key = value pairs at the top level")
    return _flatten(path, data)


def _flatten(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Sections are for readability only: their keys join the top level, so a key set in two places is refused
    rather than one of them silently winning."""
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key, value in data.items():
        place = f"[{key}]" if isinstance(value, dict) else "the top level"
        for name, item in value.items() if isinstance(value, dict) else [(key, value)]:
            if name in where:
                raise DreamBoothError(f"config file {path} sets `{name}` both in {where[name]} and in {place}; "
                                      "keep one (sections are only for readability)")
            flat[name], where[name] = item, place
    return flat


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field; defaults are suppressed so that only flags the user gave override a config file."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in fields(cls).items():
        group_name = f.metadata.get("group", "options")
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        base, _ = base_type(hints[name])
        flags = [f"--{name}", *f.metadata.get("aliases", ())]
        help_text = help_of(f)
        if f.metadata.get("required"):
            help_text += " (required)"
        elif f.default not in (None, False, dataclasses.MISSING, ()):
            shown = " ".join(map(str, f.default)) if isinstance(f.default, list | tuple) else f.default
            help_text += f" (default: {shown})"
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
        if base is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
            continue
        if typing.get_origin(base) is list:
            kw["nargs"] = "+"
        allowed = choices_of(f)
        if allowed is not None:
            kw["metavar"] = "{" + ",".join(allowed) + "}"
        group.add_argument(*flags, **kw)
