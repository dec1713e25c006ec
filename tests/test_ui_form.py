"""The UI's training form, built from the schema (the page itself is not built yet)."""

import dataclasses

import pytest

from dreambooth import schema
from dreambooth.config import TrainConfig
from dreambooth.errors import ConfigError
from dreambooth.ui.form import BASIC, form_fields, validate

GOOD = {"pretrained_model_name_or_path": "some/model", "instance_data_dir": "photos",
        "instance_prompt": "a photo of zwx dog", "output_dir": "run"}


def test_every_option_is_one_field_with_its_help_and_the_basic_ones_are_options():
    fields = form_fields()
    assert [f.name for f in fields] == [f.name for f in dataclasses.fields(TrainConfig)]
    assert all(f.help for f in fields), [f.name for f in fields if not f.help]
    by_name = {f.name: f for f in fields}
    assert set(BASIC) <= set(by_name) and {f.name for f in fields if not f.advanced} == set(BASIC)
    assert by_name["use_lora"].kind == "bool" and by_name["max_train_steps"].kind == "int"
    assert by_name["learning_rate"].kind == "float" and by_name["learning_rate"].default == TrainConfig.learning_rate
    assert by_name["mixed_precision"].kind == "choice" and "bf16" in by_name["mixed_precision"].choices
    assert by_name["instance_data_dir"].required and not by_name["class_prompt"].required


def test_each_bad_value_gets_the_schemas_own_line_beside_its_field():
    config, problems = validate({**GOOD, "learning_rate": "-1", "max_train_steps": "ten", "mixed_precision": "fp8",
                                 "resolution": ""})
    assert config is None and set(problems) == {"learning_rate", "max_train_steps", "mixed_precision"}
    for name, value in (("learning_rate", -1.0), ("max_train_steps", "ten"), ("mixed_precision", "fp8")):
        with pytest.raises(ConfigError) as raised:  # the message the CLI and the API give for the same value
            schema.build(TrainConfig, {**GOOD, name: value})
        assert problems[name] == str(raised.value) and "\n" not in problems[name], name
    _, missing = validate({"instance_prompt": "a zwx dog"})
    assert "instance_data_dir" in missing and "required" in missing["instance_data_dir"]


def test_good_values_build_the_same_config_as_the_api():
    config, problems = validate({**GOOD, "max_train_steps": "20", "use_lora": True, "validation_prompt": " ",
                                 "lora_target_modules": "to_q, to_k"})
    assert problems == {}
    expected = schema.build(TrainConfig, {**GOOD, "max_train_steps": 20, "use_lora": True,
                                          "lora_target_modules": ["to_q", "to_k"]})
    assert schema.to_dict(config) == schema.to_dict(expected)  # a blank box is the option's default
