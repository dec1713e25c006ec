"""The training form, built from the one config schema: a field per option with its type, default, help text and
choices; the few a first run needs on the page, every other one under "advanced"; and each bad value's one-line
schema message placed beside its field. Nothing here knows a web framework: the page renders `form_fields` and
sends back what was typed."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from .. import schema
from ..config import TrainConfig

# on the page for every run; the rest of TrainConfig is under "advanced"
BASIC = ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt", "class_prompt", "identifier",
         "with_prior_preservation", "class_data_dir", "use_lora", "max_train_steps", "learning_rate", "resolution",
         "output_dir")
KINDS = {bool: "bool", int: "int", float: "float", str: "text", Path: "path"}


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    kind: str  # bool, int, float, text, path, list, or choice (one of `choices`)
    default: Any
    help: str
    choices: tuple[str, ...] | None
    group: str
    required: bool
    advanced: bool


def form_fields(cls: type = TrainConfig, basic: tuple[str, ...] = BASIC) -> list[Field]:
    """Every option of the schema, in its declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for name, f in schema.fields(cls).items():
        base, _ = schema.base_type(hints[name])
        choices = schema.choices_of(f)
        if choices is not None and typing.get_origin(base) is not list:
            kind = "choice"
        else:
            kind = "list" if typing.get_origin(base) is list else KINDS.get(base, "text")
        default = None if f.default is dataclasses.MISSING else f.default
        out.append(Field(name, kind, str(default) if isinstance(default, Path) else default, f.metadata["help"],
                         tuple(choices) if choices is not None else None, f.metadata["group"],
                         f.metadata["required"], name not in basic))
    return out


def values_from_form(cls: type, typed: dict[str, Any]) -> dict[str, Any]:
    """What a page sends, as schema values: an empty box means the option's default, a list is typed with commas."""
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in typed.items():
        if isinstance(value, str):
            value = value.strip()
            if value == "":
                continue
            if name in hints and typing.get_origin(schema.base_type(hints[name])[0]) is list:
                value = [v.strip() for v in value.split(",") if v.strip()]
        values[name] = value
    return values


def validate(typed: dict[str, Any], cls: type = TrainConfig) -> tuple[Any | None, dict[str, str]]:
    """(the config, {}) when the page's values build; else (None, each problem by field name)."""
    values = values_from_form(cls, typed)
    found = schema.problems(cls, values)
    return (None, found) if found else (schema.build(cls, values), {})
