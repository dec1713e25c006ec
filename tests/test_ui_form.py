"""The UI's training form, built from the schema: fields, labels in the page's words, problems beside fields."""

import dataclasses

import pytest

from dreambooth import schema
from dreambooth.config import TrainConfig
from dreambooth.errors import ConfigError
from dreambooth.ui.form import BASIC, form_fields, label_of, page_words, validate

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


def test_each_bad_value_gets_the_schemas_rule_beside_its_field_in_the_pages_words():
    config, problems = validate({**GOOD, "learning_rate": "-1", "max_train_steps": "ten", "mixed_precision": "fp8",
                                 "resolution": ""})
    assert config is None and set(problems) == {"learning_rate", "max_train_steps", "mixed_precision"}
    for name, value in (("learning_rate", -1.0), ("max_train_steps", "ten"), ("mixed_precision", "fp8")):
        with pytest.raises(ConfigError) as raised:  # the rule the CLI and the API give for the same value
            schema.build(TrainConfig, {**GOOD, name: value})
        assert problems[name] == page_words(raised.value.allowed) and "\n" not in problems[name], name
    _, missing = validate({"instance_prompt": "a zwx dog"})
    assert missing["instance_data_dir"] == "required"
    _, crossed = validate({**GOOD, "class_prompt": "a dog"})  # a class prompt without prior preservation
    assert crossed["class_prompt"] == "only used with “Prior preservation”; turn it on"
    for message in (*problems.values(), *crossed.values()):  # no flag, no option name, no CLI verb on the page
        assert "--" not in message and "_" not in message and "flag" not in message, message


def test_every_field_has_a_label_in_words_not_an_option_name():
    labels = {f.name: f.label for f in form_fields()}
    assert labels["pretrained_model_name_or_path"] == "Base model"
    assert labels["adam_weight_decay_text_encoder"] == "Adam weight decay text encoder"
    assert labels["num_class_images"] == "Number of class images" and label_of("lora_alpha") == "LoRA alpha"
    assert all("_" not in label and label[0].isupper() for label in labels.values()), labels


def test_good_values_build_the_same_config_as_the_api():
    config, problems = validate({**GOOD, "max_train_steps": "20", "use_lora": True, "validation_prompt": " ",
                                 "lora_target_modules": "to_q, to_k"})
    assert problems == {}
    expected = schema.build(TrainConfig, {**GOOD, "max_train_steps": 20, "use_lora": True,
                                          "lora_target_modules": ["to_q", "to_k"]})
    assert schema.to_dict(config) == schema.to_dict(expected)  # a blank box is the option's default
