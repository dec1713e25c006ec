"""A base model's own recipe (dreambooth_recipe.json): the options `train` starts from when they are not given."""

from __future__ import annotations

import json
import shutil

import pytest

import dreambooth
from dreambooth.errors import DreamBoothError
from dreambooth.recipes import RECIPE_FILE, read_recipe, recommended_method, with_recipe
from dreambooth.toy.measure import TOY_METHOD, toy_recipe
from dreambooth.toy.models import TOY_MODELS


@pytest.mark.parametrize("family", list(TOY_MODELS))
def test_each_bundled_toy_model_carries_the_toy_recipe_of_its_family(family):
    """The file the bundled model ships is what `toy pretrain` writes today (the two cannot drift apart), and each
    method's recipe is a full DreamBooth run at the toy's own 32 px with its step count."""
    recipe = read_recipe(TOY_MODELS[family].path)
    assert recipe == {"full": toy_recipe(family), "lora": toy_recipe(family, lora=True)}
    assert recommended_method(TOY_MODELS[family].path) == TOY_METHOD == "full"
    for method in ("full", "lora"):
        assert recipe[method]["resolution"] == 32 and recipe[method]["max_train_steps"] >= 1
        assert recipe[method]["train_text_encoder"] is True


@pytest.fixture
def model_with_recipe(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    recipe = {"full": {"max_train_steps": 2, "learning_rate": 3e-4, "resolution": 32, "lr_scheduler": "constant"},
              "lora": {"max_train_steps": 3, "learning_rate": 2e-3, "rank": 2, "resolution": 32}}
    (model / RECIPE_FILE).write_text(json.dumps(recipe))
    return model


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_train_starts_from_the_models_recipe_and_what_is_given_wins(model_with_recipe, instance_dir, tmp_path, lora):
    common = dict(pretrained_model_name_or_path=str(model_with_recipe), instance_data_dir=str(instance_dir),
                  instance_prompt="a zwx dog", use_lora=lora, seed=0)
    summary = dreambooth.train(**common, output_dir=str(tmp_path / "out"))
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    expected = read_recipe(model_with_recipe)["lora" if lora else "full"]
    assert summary["steps"] == expected["max_train_steps"] and summary["learning_rate"] == expected["learning_rate"]
    assert {k: saved[k] for k in expected} == expected
    given = dreambooth.train(**common, output_dir=str(tmp_path / "given"), max_train_steps=1, learning_rate=1e-5)
    assert given["steps"] == 1 and given["learning_rate"] == 1e-5


def test_a_model_without_a_recipe_takes_nothing_and_a_built_config_is_left_alone(tiny_model, model_with_recipe):
    values = {"pretrained_model_name_or_path": str(tiny_model)}
    assert with_recipe(values) == (values, {})
    merged, taken = with_recipe({"pretrained_model_name_or_path": str(model_with_recipe), "learning_rate": 1.0})
    assert taken == {"max_train_steps": 2, "resolution": 32, "lr_scheduler": "constant"}
    assert merged["learning_rate"] == 1.0


@pytest.mark.parametrize(("text", "says"), [
    ("{not json", "not a readable recipe"),
    ('{"full": [1]}', "a recipe is"),
    ('{"full": {"max_train_step": 3}}', "'max_train_step' in its full recipe is not a training option"),
    ('{"lora": {"learning_rate": -1}}', "learning_rate="),
])
def test_a_bad_recipe_is_one_line_naming_its_file(model_with_recipe, text, says):
    (model_with_recipe / RECIPE_FILE).write_text(text)
    with pytest.raises(DreamBoothError) as raised:
        read_recipe(model_with_recipe)
    message = str(raised.value)
    assert says in message and str(model_with_recipe / RECIPE_FILE) in message and "\n" not in message
