"""A base model's own DreamBooth recipe: the training options that were measured to work on it.

A local model folder may hold `dreambooth_recipe.json`: {"full": {option: value}, "lora": {option: value}, "method":
"full" or "lora", "measured": "..."}, the options a full fine-tune and a LoRA run on this model start from, and the
method measured to work best on it (the page pre-selects it) (the bundled toy models ship one; `toy
pretrain` writes it). `train` (CLI, config file or Python keywords), the demo and the page's presets read it: every
option the user did not give takes the recipe's value; what the user gives wins. Nothing else in the code knows
which models have one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .errors import DreamBoothError

log = logging.getLogger("dreambooth")
RECIPE_FILE = "dreambooth_recipe.json"
METHODS = ("full", "lora")


def recipe_path(model: str | Path | None) -> Path | None:
    """The recipe file of a local model folder, if it has one."""
    if not model:
        return None
    path = Path(model).expanduser() / RECIPE_FILE
    return path if path.is_file() else None


def _read(model: str | Path | None) -> tuple[Path | None, dict[str, Any]]:
    """(the model's recipe file, its parsed content), or (None, {}) for a model without one."""
    path = recipe_path(model)
    if path is None:
        return None, {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DreamBoothError(f"{path}: not a readable recipe ({e}); fix or delete the file") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(m, {}), dict) for m in METHODS):
        raise DreamBoothError(f'{path}: a recipe is {{"full": {{...}}, "lora": {{...}}}}; fix or delete the file')
    return path, data


def _checked(path: Path, data: dict[str, Any], model: str | Path) -> dict[str, dict[str, Any]]:
    """Each method's options, every one of them refused in one line naming the file if the schema refuses it."""
    from . import schema
    from .config import TrainConfig

    known = schema.fields(TrainConfig)
    recipes = {m: dict(data.get(m, {})) for m in METHODS}
    for method, options in recipes.items():
        for name, value in options.items():
            if name not in known:
                raise DreamBoothError(f"{path}: '{name}' in its {method} recipe is not a training option; fix or "
                                      "delete the file")
            found = schema.problems(TrainConfig, {"pretrained_model_name_or_path": str(model),
                                                  "instance_data_dir": ".", "instance_prompt": "a x", name: value})
            if name in found:
                raise DreamBoothError(f"{path}: {found[name]}; fix or delete the file")
    return recipes


def read_recipe(model: str | Path | None) -> dict[str, dict[str, Any]]:
    """{"full": {...}, "lora": {...}} from the model's recipe file; {} for a model without one. A recipe whose
    options the schema refuses is an error naming the file."""
    path, data = _read(model)
    return {} if path is None else _checked(path, data, model)


def recommended_method(model: str | Path | None) -> str | None:
    """The method the model's recipe recommends ("full" or "lora"), if it names one (the file read once)."""
    path, data = _read(model)
    if path is None:
        return None
    _checked(path, data, model)  # a broken file is refused in one line
    return data["method"] if data.get("method") in METHODS else None


def with_recipe(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the training values with the model's recipe under them, the recipe options that were taken)."""
    method = "lora" if values.get("use_lora") in (True, 1, "true", "True", "1") else "full"
    recipe = read_recipe(values.get("pretrained_model_name_or_path")).get(method, {})
    taken = {k: v for k, v in recipe.items() if k not in values}
    return {**taken, **values}, taken


def under_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """`with_recipe`'s values, saying in the log which options the recipe set."""
    values, taken = with_recipe(values)
    if taken:
        log.info("the base model's recipe (%s) sets %s; options you give override it", RECIPE_FILE,
                 ", ".join(f"{k}={v}" for k, v in taken.items()))
    return values
