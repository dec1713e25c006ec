"""The UI's training form, built from the schema: fields, labels in the page's words, problems beside fields."""

import dataclasses

import pytest

from dreambooth import schema
from dreambooth.config import TrainConfig
from dreambooth.errors import ConfigError
from dreambooth.ui.form import (
    BASIC,
    command_line,
    form_fields,
    label_of,
    page_problem,
    page_words,
    validate,
    values_from_form,
)

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


def test_a_further_subjects_problems_are_keyed_by_its_place_in_the_pages_words():
    """Each problem of a further subject lands beside its block's box (`subjects[i].field`), said in words."""
    two = {**GOOD, "with_prior_preservation": True, "class_prompt": "a dog", "class_data_dir": "dogs"}
    cases = {"subjects[0].instance_prompt": {"instance_data_dir": "cats"},
             "subjects[0].repeats": {"instance_data_dir": "cats", "instance_prompt": "a qek cat", "repeats": "0"},
             "subjects[0].class_data_dir": {"instance_data_dir": "cats", "instance_prompt": "a qek cat",
                                            "class_prompt": "a cat"},
             "subjects[1].identifier": {"instance_data_dir": "cats", "instance_prompt": "a qek cat",
                                        "identifier": "zwx"}}
    for name, subject in cases.items():
        subjects = [subject] if name.startswith("subjects[0]") else [
            {"instance_data_dir": "birds", "instance_prompt": "a vyb dog"}, subject]
        config, problems = validate({**two, "identifier": "zwx", "subjects": subjects})
        assert config is None and list(problems) == [name], (name, problems)
        message = problems[name]
        assert "--" not in message and "subjects[" not in message and "_" not in message, message
    _, problems = validate({**two, "subjects": [{"instance_data_dir": "cats", "instance_prompt": "a qek cat",
                                                 "identifier": "qek", "class_prompt": "a cat"}]})
    assert problems["subjects[0].class_data_dir"].startswith("required: its class")
    _, problems = validate({**GOOD, "subjects": [{"instance_data_dir": "cats", "instance_prompt": "a qek cat",
                                                  "identifier": "zwx"}]})
    assert problems == {"subjects[0].identifier": "a word of subject 2's prompt"}
    assert page_problem("subjects[0].identifier", "subjects[0].identifier='x' is not allowed: required in each "
                                                  "entry") == "required"  # the name is no pattern ([0], .)


def test_subjects_are_their_own_kind_and_the_command_line_gives_them_back():
    """A list of subjects is no comma-separated box: the page sends dicts that pass unchanged, and "Show the
    command" prints one --subjects followed by each as JSON, which the CLI reads back as the same subjects."""
    import shlex

    from dreambooth.cli import parser

    assert {f.name: f.kind for f in form_fields()}["subjects"] == "subjects"
    subjects = [{"instance_data_dir": "cats, and more", "instance_prompt": "a qek cat", "class_prompt": "a cat",
                 "class_data_dir": "cat images", "identifier": ""},
                {"instance_data_dir": "birds", "instance_prompt": "a vyb bird", "repeats": "2"}]
    values = values_from_form(TrainConfig, {**GOOD, "with_prior_preservation": True, "class_prompt": "a dog",
                                            "class_data_dir": "dogs", "subjects": subjects})
    assert values["subjects"] == [{k: v for k, v in s.items() if v} for s in subjects]  # empty boxes: defaults
    argv = shlex.split(command_line(values))
    assert argv.count("--subjects") == 1 and all(a.startswith("{") for a in argv[argv.index("--subjects") + 1:][:2])
    parsed = {k: v for k, v in vars(parser(argv[1:]).parse_args(argv[1:])).items() if k not in ("command", "handler")}
    from_line, from_page = schema.build(TrainConfig, parsed), schema.build(TrainConfig, values)
    assert schema.to_dict(from_line)["subjects"] == schema.to_dict(from_page)["subjects"]
    assert [s["repeats"] for s in schema.to_dict(from_line)["subjects"]] == [None, 2]
    # the run's own config (every key, defaults included) prints only what differs
    line = command_line(schema.to_dict(from_page))
    assert '"repeats": null' not in line and '"identifier"' not in line and line.count("--subjects") == 1
