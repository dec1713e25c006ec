"""The training form, built from the one config schema: a field per option with its type, default, help text and
choices; the few a first run needs on the page, every other one under "advanced"; and each bad value's one-line
schema message placed beside its field. Nothing here knows a web framework: the page renders `form_fields` and
sends back what was typed."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import typing
from pathlib import Path
from typing import Any

from .. import schema
from ..config import Subject, TrainConfig

# on the page for every run, in the page's words; the rest of TrainConfig is under "advanced" (use_lora is the
# page's LoRA / full fine-tune choice, not a field of its own)
BASIC = {"pretrained_model_name_or_path": "Base model", "instance_data_dir": "Subject photos folder",
         "instance_prompt": "Subject prompt", "identifier": "Identifier", "class_prompt": "Class prompt",
         "with_prior_preservation": "Prior preservation", "class_data_dir": "Class images folder",
         "use_lora": "LoRA", "train_text_encoder": "Train the text encoder", "max_train_steps": "Training steps",
         "learning_rate": "Learning rate", "resolution": "Resolution (px)", "validation_prompt": "Validation prompt",
         "output_dir": "Output folder"}
# a further subject's boxes (the page's "Other subjects" blocks; TrainConfig.subjects)
SUBJECT_LABELS = {"instance_data_dir": "Photos folder", "instance_prompt": "Prompt", "identifier": "Identifier",
                  "class_prompt": "Class prompt", "class_data_dir": "Class images folder", "repeats": "Repeats"}
KINDS = {bool: "bool", int: "int", float: "float", str: "text", Path: "path"}
# an option name's parts as the page says them
WORDS = {"lr": "learning rate", "lora": "LoRA", "ema": "EMA", "fsdp": "FSDP", "ddp": "DDP", "vae": "VAE",
         "dora": "DoRA", "num": "number of", "dir": "folder", "8bit": "8-bit", "adam": "Adam", "t5": "T5",
         "cpu": "CPU", "gpu": "GPU", "dino": "DINO", "clip": "CLIP", "snr": "SNR", "max": "max.", "prodigy": "Prodigy",
         "eval": "evaluation", "img": "image", "xformers": "xFormers", "tf32": "TF32", "id": "ID"}
# CLI words in a schema message, as the page says them
CLI_HINTS = (("`dreambooth identifier --count N` suggests distinct ones", "“Suggest identifiers” offers others"),
             ("`dreambooth identifier --count N` suggests a set with none", "“Suggest identifiers” offers others"))
PAGE_PHRASES = (("add that flag", "turn it on"), ("add it", "turn it on"), ("remove it", "clear it"),
                ("drop one of them", "clear one of them"), ("pass ", "give "))


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    label: str  # what the page calls it
    kind: str  # bool, int, float, text, path, list, choice (one of `choices`), or subjects (a list of tables)
    default: Any
    help: str
    choices: tuple[str, ...] | None
    group: str
    required: bool
    advanced: bool


def label_of(name: str) -> str:
    """An option's name in the page's words: its basic label, else its parts spelt out (adam_weight_decay ->
    "Adam weight decay")."""
    if name in BASIC:
        return BASIC[name]
    words = " ".join(WORDS.get(part, part) for part in name.split("_"))
    return words[0].upper() + words[1:]


def subject_words(index: str, name: str | None) -> str:
    """A further subject's field as the page says it: subjects[0].class_prompt -> "subject 2's class prompt" (the
    first subject is the page's subject 1)."""
    who = f"subject {int(index) + 2}"
    return f"{who}'s {SUBJECT_LABELS.get(name, name.replace('_', ' ')).lower()}" if name else who


def page_words(message: str) -> str:
    """A schema message as the page says it: each --flag by its label, a subject's field by its block, CLI verbs by
    the page's."""
    for cli, page in CLI_HINTS:
        message = message.replace(cli, page)
    message = re.sub(r"subjects\[(\d+)\](?:\.([a-z_]+))?", lambda m: subject_words(m[1], m[2]), message)
    message = re.sub(r"--([a-z0-9_]+)", lambda m: f"“{label_of(m.group(1))}”", message)
    message = re.sub(r"`([a-z0-9_]+)`", lambda m: f"“{label_of(m.group(1))}”", message)
    for cli, page in PAGE_PHRASES:
        message = message.replace(cli, page)
    return message


def form_fields(cls: type = TrainConfig, basic: dict[str, str] | tuple[str, ...] = tuple(BASIC)) -> list[Field]:
    """Every option of the schema, in its declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for name, f in schema.fields(cls).items():
        base, _ = schema.base_type(hints[name])
        choices = schema.choices_of(f)
        if choices is not None and typing.get_origin(base) is not list:
            kind = "choice"
        elif _tables(base):  # the page's own blocks, never a comma-separated box
            kind = "subjects"
        else:
            kind = "list" if typing.get_origin(base) is list else KINDS.get(base, "text")
        default = None if f.default is dataclasses.MISSING else f.default
        out.append(Field(name, label_of(name), kind, str(default) if isinstance(default, Path) else default,
                         schema.help_of(f), tuple(choices) if choices is not None else None, f.metadata["group"],
                         f.metadata["required"], name not in basic))
    return out


def subject_fields() -> list[Field]:
    """A further subject's boxes: its options, labelled and explained in the page's words."""
    return [dataclasses.replace(f, label=SUBJECT_LABELS.get(f.name, f.label), help=page_words(f.help))
            for f in form_fields(Subject, tuple(SUBJECT_LABELS))]


def _tables(base: Any) -> bool:
    """Whether an annotation is a list of tables (nested configs, e.g. `subjects`)."""
    args = typing.get_args(base)
    return typing.get_origin(base) is list and bool(args) and dataclasses.is_dataclass(args[0])


def values_from_form(cls: type, typed: dict[str, Any]) -> dict[str, Any]:
    """What a page sends, as schema values: an empty box means the option's default, a list is typed with commas; a
    list of tables (each subject's boxes) passes as it is, each table's empty boxes left out."""
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in typed.items():
        base = schema.base_type(hints[name])[0] if name in hints else None
        if isinstance(value, str):
            value = value.strip()
            if value == "":
                continue
            if typing.get_origin(base) is list and not _tables(base):
                value = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, list) and _tables(base):
            value = [values_from_form(typing.get_args(base)[0], v) if isinstance(v, dict) else v for v in value]
        values[name] = value
    return values


def validate(typed: dict[str, Any], cls: type = TrainConfig) -> tuple[Any | None, dict[str, str]]:
    """(the config, {}) when the page's values build; else (None, each problem by field name)."""
    values = values_from_form(cls, typed)
    found = {_entry(name, message): message for name, message in schema.problems(cls, values).items()}
    return (None, {name: page_problem(name, message) for name, message in found.items()}) if found else (
        schema.build(cls, values), {})


def _entry(name: str, message: str) -> str:
    """The field a problem belongs beside: a list of tables' entry's own field (`subjects[0].instance_prompt`,
    which the schema files under `subjects`), else `name`."""
    inner = re.match(rf"({re.escape(name)}\[\d+\](?:\.[a-z_]+)?)=", message)
    return inner.group(1) if inner else name


def page_problem(name: str, message: str) -> str:
    """A field's problem as the page shows it beside the field: what is allowed, in the page's words (the field
    and its value are on screen); a cross-field rule keeps its field's label."""
    allowed = re.match(rf"{re.escape(name)}=.* is not allowed: (.*)$", message, re.S)
    if allowed:
        text = allowed.group(1)
        if text.startswith("required;") or text == "required in each entry":
            return "required"
        return page_words(text)
    return page_words(message)


def command_line(values: dict[str, Any], cls: type = TrainConfig) -> str:
    """The `dreambooth train` command that runs these values (those that differ from the defaults); a list of tables
    (subjects) is one flag followed by each entry as JSON text of its keys that differ from their defaults."""
    hints = typing.get_type_hints(cls)
    args = ["dreambooth", "train"]
    for name, f in schema.fields(cls).items():
        if name not in values:
            continue
        value, default = values[name], None if f.default is dataclasses.MISSING else f.default
        base = schema.base_type(hints[name])[0]
        if _tables(base) and isinstance(value, list | tuple) and value:
            args += [f"--{name}", *(_table_text(typing.get_args(base)[0], v) for v in value)]
            continue
        if isinstance(value, str) and typing.get_origin(base) is list and not _tables(base):
            value = value.split()
        if isinstance(value, list | tuple) and isinstance(default, list | tuple):
            value, default = list(value), list(default)
        if value is None or value == default or (isinstance(default, Path) and str(value) == str(default)):
            continue
        if isinstance(value, bool) or str(value).lower() in ("true", "false"):
            truthy = value is True or str(value).lower() == "true"
            if truthy != bool(default):
                args.append(f"--{name}" if truthy else f"--no-{name}")
            continue
        args += [f"--{name}", *(str(v) for v in value)] if isinstance(value, list | tuple) else [f"--{name}",
                                                                                                 str(value)]
    return shlex.join(args)


def _table_text(cls: type, value: Any) -> str:
    """One entry of a list of tables as the command line takes it: JSON of its keys that differ from the defaults."""
    if isinstance(value, str):
        return value
    if dataclasses.is_dataclass(value):
        value = schema.to_dict(value)
    defaults = {n: None if f.default is dataclasses.MISSING else f.default for n, f in schema.fields(cls).items()}
    kept = {k: str(v) if isinstance(v, Path) else v for k, v in dict(value).items()
            if v is not None and v != "" and (k not in defaults or v != defaults[k])}
    return json.dumps(kept)
