"""Values the schema refuses or reads the same way from every source (flags, config files, the Python API):
non-finite numbers, absurd learning rates, keys set twice, paths with `~` and `$VAR`, caption extensions, and what a
family allows (resolution multiples, T5 length)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreambooth import schema
from dreambooth.cli import main, parser
from dreambooth.cli import values_of as _values
from dreambooth.config import TrainConfig
from dreambooth.errors import ConfigError, DreamBoothError
from dreambooth.families import FAMILIES

REQUIRED = dict(pretrained_model_name_or_path="m", instance_data_dir="d", instance_prompt="a zwx dog")
BASE_MODEL_PRIOR = dict(with_prior_preservation=True, class_prompt="a dog", prior_target="base_model")


def cli_error(capsys, *flags: str) -> str:
    """The one line `dreambooth train` prints for a bad value (exit status 2, no traceback)."""
    capsys.readouterr()
    argv = ["train", *sum(([f"--{k}", v] for k, v in REQUIRED.items()), []), *flags]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def from_file(tmp_path: Path, name: str, text: str | bytes) -> dict:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return schema.load_file(path)


# -- non-finite numbers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity", "NaN", float("inf"), float("nan")])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match="prior_loss_weight=.*finite") as e:
        schema.build(TrainConfig, {**REQUIRED, **BASE_MODEL_PRIOR, "prior_loss_weight": value})
    assert e.value.field == "prior_loss_weight"


@pytest.mark.parametrize("name, text", [
    ("run.json", '{"prior_loss_weight": Infinity}'),
    ("run.json", '{"prior_loss_weight": NaN}'),
    ("run.yaml", "prior_loss_weight: .inf\n"),
    ("run.yaml", "prior_loss_weight: -.inf\n"),
    ("run.toml", "prior_loss_weight = inf\n"),
    ("run.toml", "[data]\nprior_loss_weight = nan\n"),
])
def test_non_finite_numbers_in_config_files_are_refused(tmp_path, name, text):
    values = from_file(tmp_path, name, text)
    with pytest.raises(ConfigError, match="prior_loss_weight=.*finite"):
        schema.build(TrainConfig, {**REQUIRED, **BASE_MODEL_PRIOR, **values})


def test_an_infinite_integer_is_refused_in_one_line(tmp_path):
    values = from_file(tmp_path, "run.json", '{"max_train_steps": Infinity}')  # int(inf) overflows
    with pytest.raises(ConfigError, match="max_train_steps=inf is not allowed: expected an integer"):
        schema.build(TrainConfig, {**REQUIRED, **values})


def test_cli_refuses_an_infinite_prior_weight(capsys):
    err = cli_error(capsys, "--with_prior_preservation", "--class_prompt", "a dog", "--prior_target", "base_model",
                    "--prior_loss_weight", "inf")
    assert "prior_loss_weight='inf'" in err and "finite" in err


def test_the_form_names_a_non_finite_field():
    found = schema.problems(TrainConfig, {**REQUIRED, "adam_weight_decay": "inf"})
    assert list(found) == ["adam_weight_decay"] and "finite" in found["adam_weight_decay"]


# -- learning rates ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["learning_rate", "text_encoder_lr"])
@pytest.mark.parametrize("value", [1e38, 11.0, 0.0, -1e-6])
def test_absurd_learning_rates_are_refused(field, value):
    with pytest.raises(ConfigError, match=rf"{field}=.*must be > 0 and at most 10") as e:
        schema.build(TrainConfig, {**REQUIRED, field: value})
    assert e.value.field == field


def test_prodigy_learning_rate_is_allowed():
    cfg = schema.build(TrainConfig, {**REQUIRED, "optimizer": "prodigy", "learning_rate": 1.0, "text_encoder_lr": 10})
    assert (cfg.learning_rate, cfg.text_encoder_lr) == (1.0, 10.0)


def test_cli_refuses_an_overflowing_learning_rate(capsys):
    assert "learning_rate=1e+38 is not allowed" in cli_error(capsys, "--learning_rate", "1e38")


# -- keys set twice in a config file -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, text, places", [
    ("run.toml", "[prior]\nseed = 1\n[training]\nseed = 2\n", ("[prior]", "[training]")),
    ("run.toml", "seed = 1\n[training]\nseed = 2\n", ("the top level", "[training]")),
    ("run.yaml", "prior:\n  seed: 1\ntraining:\n  seed: 2\n", ("[prior]", "[training]")),
    ("run.json", '{"prior": {"seed": 1}, "training": {"seed": 2}}', ("[prior]", "[training]")),
])
def test_a_key_in_two_sections_is_refused(tmp_path, name, text, places):
    with pytest.raises(DreamBoothError) as e:
        from_file(tmp_path, name, text)
    message = str(e.value)
    assert "`seed`" in message and all(place in message for place in places) and "\n" not in message


@pytest.mark.parametrize("name, text", [
    ("run.yaml", "seed: 1\nseed: 2\n"),
    ("run.yaml", "training:\n  seed: 1\n  seed: 2\n"),
    ("run.json", '{"seed": 1, "seed": 2}'),
])
def test_a_key_repeated_in_one_mapping_is_refused(tmp_path, name, text):
    with pytest.raises(DreamBoothError, match="cannot be parsed.*'seed' is repeated"):
        from_file(tmp_path, name, text)


def test_sections_with_different_keys_still_flatten(tmp_path):
    values = from_file(tmp_path, "run.toml", 'seed = 1\n[training]\nlearning_rate = 1e-5\n[data]\nrank = 2\n')
    assert values == {"seed": 1, "learning_rate": 1e-5, "rank": 2}


# -- config file names and encodings -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, text", [
    ("run.TOML", "seed = 3\n"),
    ("run.Yml", "seed: 3\n"),
    ("run.JSON", '{"seed": 3}'),
])
def test_extension_case_does_not_matter(tmp_path, name, text):
    assert from_file(tmp_path, name, text) == {"seed": 3}


@pytest.mark.parametrize("name, text", [
    ("run.toml", "seed = 3\n"),
    ("run.yaml", "seed: 3\n"),
    ("run.json", '{"seed": 3}'),
])
def test_a_byte_order_mark_is_read_past(tmp_path, name, text):
    assert from_file(tmp_path, name, b"\xef\xbb\xbf" + text.encode()) == {"seed": 3}


# -- paths -------------------------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DB_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("DB_UNSET_VARIABLE", raising=False)
    return tmp_path


def test_paths_expand_home_and_variables_from_every_source(home, capsys):
    values = {"output_dir": "$HOME/x", "instance_data_dir": "~/photos", "class_data_dir": "${DB_RUNS}/class",
              "logging_dir": "$DB_RUNS/logs", "pretrained_model_name_or_path": "$DB_RUNS/model",
              "pretrained_vae_model_name_or_path": "~/vae", "tokenizer_name": "$HOME/tok",
              "resume_from_checkpoint": "$DB_RUNS/checkpoint-5", "with_prior_preservation": True,
              "class_prompt": "a dog", "instance_prompt": "a zwx dog"}
    want = {"output_dir": home / "home/x", "instance_data_dir": home / "home/photos",
            "class_data_dir": home / "runs/class", "logging_dir": home / "runs/logs",
            "pretrained_model_name_or_path": str(home / "runs/model"),
            "pretrained_vae_model_name_or_path": str(home / "home/vae"), "tokenizer_name": str(home / "home/tok"),
            "resume_from_checkpoint": str(home / "runs/checkpoint-5")}
    config = home / "run.json"
    config.write_text(json.dumps(values))
    flags = ["train", *sum(([f"--{k}", v] for k, v in values.items() if v is not True), []),
             "--with_prior_preservation"]
    for source in (values, schema.load_file(config), _values(parser().parse_args(flags))):
        cfg = schema.build(TrainConfig, source)
        assert {name: getattr(cfg, name) for name in want} == want


def test_text_that_is_not_a_path_is_left_alone(home):
    cfg = schema.build(TrainConfig, {**REQUIRED, "pretrained_model_name_or_path": "org/model",
                                     "instance_prompt": "a $HOME zwx dog", "resume_from_checkpoint": "latest"})
    assert (cfg.pretrained_model_name_or_path, cfg.instance_prompt, cfg.resume_from_checkpoint) == (
        "org/model", "a $HOME zwx dog", "latest")


def test_an_unset_variable_is_named_in_one_line(home, capsys):
    with pytest.raises(ConfigError, match=r"output_dir='\$DB_UNSET_VARIABLE/x'.*\$DB_UNSET_VARIABLE is not set"):
        schema.build(TrainConfig, {**REQUIRED, "output_dir": "$DB_UNSET_VARIABLE/x"})
    assert "DB_UNSET_VARIABLE is not set" in cli_error(capsys, "--output_dir", "${DB_UNSET_VARIABLE}/x")
    assert not (Path.cwd() / "$DB_UNSET_VARIABLE").exists()


# -- caption extensions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [".", "..", "./x", ".a/b", ".a\\b", "txt", ""])
def test_caption_extension_must_be_an_extension(value):
    with pytest.raises(ConfigError, match="an extension with its dot") as e:
        schema.build(TrainConfig, {**REQUIRED, "caption_extension": value})
    assert e.value.field == "caption_extension"
    assert "caption_extension" in schema.problems(TrainConfig, {**REQUIRED, "caption_extension": value})


@pytest.mark.parametrize("value", [".txt", ".caption", ".tags.txt"])
def test_caption_extensions_that_name_a_file_are_allowed(value):
    assert schema.build(TrainConfig, {**REQUIRED, "caption_extension": value}).caption_extension == value
    Path("image.png").with_suffix(value)  # what the data loader does with it


def test_cli_refuses_a_folder_as_caption_extension(capsys):
    assert "caption_extension='./x'" in cli_error(capsys, "--caption_extension", "./x")


# -- what a family allows ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, resolution, allowed", [
    ("sd3", 520, "must be a multiple of 16 for sd3 models (e.g. 512 or 528)"),
    ("flux", 72, "must be a multiple of 16 for flux models (e.g. 64 or 80)"),
    ("flux", 8, "must be a multiple of 16 for flux models (e.g. 16)"),
])
def test_patched_transformers_need_resolutions_of_16(family, resolution, allowed):
    cfg = schema.build(TrainConfig, {**REQUIRED, "resolution": resolution})
    with pytest.raises(ConfigError) as e:
        cfg.check_family(FAMILIES[family]())
    assert str(e.value) == f"resolution={resolution} is not allowed: {allowed}"


@pytest.mark.parametrize("family, resolution", [("sd3", 512), ("flux", 528), ("sd", 520), ("sdxl", 1032)])
def test_resolutions_the_family_takes(family, resolution):
    schema.build(TrainConfig, {**REQUIRED, "resolution": resolution}).check_family(FAMILIES[family]())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_t5_length_is_bounded(family):
    schema.build(TrainConfig, {**REQUIRED, "max_sequence_length": 512}).check_family(FAMILIES[family]())
    cfg = schema.build(TrainConfig, {**REQUIRED, "max_sequence_length": 100000})
    with pytest.raises(ConfigError, match=f"max_sequence_length=100000 is not allowed: at most 512 for {family}"):
        cfg.check_family(FAMILIES[family]())
