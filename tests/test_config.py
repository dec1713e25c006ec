import pytest

from dreambooth import schema
from dreambooth.cli import main, parser
from dreambooth.config import TrainConfig
from dreambooth.errors import ConfigError
from dreambooth.families import FAMILIES

REQUIRED = dict(pretrained_model_name_or_path="m", instance_data_dir="d", instance_prompt="a zwx dog")


def test_defaults_follow_the_reference_script():
    cfg = schema.build(TrainConfig, REQUIRED)
    assert (cfg.train_batch_size, cfg.lr_scheduler, cfg.lr_warmup_steps) == (4, "constant", 500)
    # learning rate: the method's, set once the family is known (5e-6 full; LoRA per family: test_families.py)
    assert cfg.learning_rate is None
    # resolution: the family's, as the reference SD and SDXL scripts default
    assert cfg.resolution is None and (FAMILIES["sd"].default_resolution, FAMILIES["sdxl"].default_resolution) == (
        512, 1024)
    assert (cfg.num_class_images, cfg.prior_loss_weight, cfg.checkpointing_steps, cfg.adam_weight_decay) == (
        100, 1.0, 500, 1e-2)


@pytest.mark.parametrize("field, value, fragment", [
    ("resolution", 100, "multiple of 8"),
    ("learning_rate", -1.0, "> 0"),
    ("lr_scheduler", "cosine_annealing", "choose one of linear"),
    ("train_batch_size", 0, ">= 1"),
    ("mixed_precision", "fp8", "choose one of no, fp16, bf16"),
    ("train_batch_size", "four", "expected an integer"),
    ("center_crop", "maybe", "expected true or false"),
])
def test_bad_values_name_field_value_and_allowed(field, value, fragment):
    with pytest.raises(ConfigError) as e:
        schema.build(TrainConfig, {**REQUIRED, field: value})
    assert e.value.field == field and fragment in str(e.value) and repr(value) in str(e.value)


def test_prior_preservation_flags_must_come_together():
    with pytest.raises(ConfigError, match="class_prompt.*with_prior_preservation"):
        schema.build(TrainConfig, {**REQUIRED, "with_prior_preservation": True, "class_data_dir": "c"})
    with pytest.raises(ConfigError, match="only used with --with_prior_preservation"):
        schema.build(TrainConfig, {**REQUIRED, "class_prompt": "a dog"})
    with pytest.raises(ConfigError, match="class_data_dir"):
        schema.build(TrainConfig, {**REQUIRED, "with_prior_preservation": True, "class_prompt": "a dog"})


def test_missing_required_and_misspelt_keys():
    with pytest.raises(ConfigError, match="instance_prompt.*required"):
        schema.build(TrainConfig, {k: v for k, v in REQUIRED.items() if k != "instance_prompt"})
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        schema.build(TrainConfig, {**REQUIRED, "learning_rat": 1e-5})


@pytest.mark.parametrize("suffix, text", [
    (".toml", 'pretrained_model_name_or_path = "m"\ninstance_data_dir = "d"\ninstance_prompt = "a zwx dog"\n'
              "[optim]\nlearning_rate = 2e-6\ntrain_batch_size = 2\n"),
    (".yaml", "pretrained_model_name_or_path: m\ninstance_data_dir: d\ninstance_prompt: a zwx dog\n"
              "learning_rate: 2.0e-6\ntrain_batch_size: 2\n"),
])
def test_config_file_then_cli_overrides(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    values = schema.load_file(path)
    cfg = schema.build(TrainConfig, values)
    assert cfg.learning_rate == 2e-6 and cfg.train_batch_size == 2
    args = parser().parse_args(["train", "--config", str(path), "--train_batch_size", "8"])
    from dreambooth.cli import values_of as _values
    cfg = schema.build(TrainConfig, _values(args))
    assert cfg.train_batch_size == 8 and cfg.learning_rate == 2e-6  # flag beats file, file beats default


def test_cli_flags_are_the_schema_fields():
    train = parser()._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions}
    assert set(schema.fields(TrainConfig)) <= dests


def test_reference_command_line_parses():
    argv = (
        'train --pretrained_model_name_or_path m --instance_data_dir d --instance_prompt x --class_data_dir c '
        '--class_prompt y --with_prior_preservation --prior_loss_weight 1.0 --num_class_images 10 '
        '--sample_batch_size 2 --prior_generation_precision fp32 --output_dir o --seed 1 --resolution 64 '
        '--center_crop --train_text_encoder --train_batch_size 1 --num_train_epochs 1 --max_train_steps 20 '
        '--gradient_accumulation_steps 1 --gradient_checkpointing --learning_rate 5e-6 --scale_lr '
        '--lr_scheduler constant --lr_warmup_steps 0 --lr_num_cycles 1 --lr_power 1.0 --adam_beta1 0.9 '
        '--adam_beta2 0.999 --adam_weight_decay 0.01 --adam_epsilon 1e-8 --max_grad_norm 1.0 --use_8bit_adam '
        '--mixed_precision no --allow_tf32 --checkpointing_steps 10 --checkpoints_total_limit 2 '
        '--resume_from_checkpoint latest --validation_prompt z --num_validation_images 2 --validation_steps 5 '
        '--offset_noise --snr_gamma 5.0 --report_to tensorboard --logging_dir logs --dataloader_num_workers 0 '
        '--revision main --variant fp16 --enable_xformers_memory_efficient_attention --validation_scheduler '
        'DPMSolverMultistepScheduler'
    ).split()
    from dreambooth.cli import values_of as _values
    values = _values(parser().parse_args(argv))
    values.pop("enable_xformers_memory_efficient_attention")
    values["validation_sampler"] = "dpm++"
    cfg = schema.build(TrainConfig, values)
    assert cfg.with_prior_preservation and cfg.snr_gamma == 5.0 and cfg.max_train_steps == 20


def test_cli_reports_config_errors_in_one_line(capsys):
    code = main(["train", "--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
                 "--instance_prompt", "x", "--resolution", "100"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "resolution=100" in err and "Traceback" not in err


def test_python_api_rejects_unknown_keyword():
    import dreambooth

    with pytest.raises(ConfigError, match="did you mean 'max_train_steps'"):
        dreambooth.train(**REQUIRED, max_train_step=3)


def test_push_to_hub_is_refused_clearly(capsys):
    code = main(["train", *sum(([f"--{k}", v] for k, v in REQUIRED.items()), []), "--push_to_hub"])
    assert code == 2 and "hf upload" in capsys.readouterr().err


@pytest.mark.parametrize("flag, words", [("--image_column image", "local folder"),
                                          ("--dataset_config_name x", "local folder"),
                                          ("--caption_column text", "--caption_extension")])
def test_hub_dataset_flags_of_the_reference_scripts_are_refused_clearly(flag, words, capsys):
    code = main(["train", *sum(([f"--{k}", v] for k, v in REQUIRED.items()), []), *flag.split()])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1


def test_the_newer_reference_scripts_flags_are_accepted_and_said(base_args, caplog):
    """The Flux.2 / Krea 2 scripts' flags that change nothing here run, each with a line saying what happens
    instead; --validation_num_inference_steps is our --validation_inference_steps."""
    import json
    import logging
    from pathlib import Path

    from conftest import to_argv

    args = base_args(max_train_steps=1, validation_prompt="a zwx dog", validation_steps=1, num_validation_images=1)
    extra = ["--offload", "--fsdp_text_encoder", "--skip_final_inference", "--enable_npu_flash_attention",
             "--cache_dir", "/nowhere", "--final_validation_prompt", "a zwx dog", "--validation_num_inference_steps",
             "2"]
    with caplog.at_level(logging.INFO, logger="dreambooth"):
        assert main(["train", *to_argv(args), *extra]) == 0
    said = caplog.text
    assert all(f"--{name}: accepted" in said for name in ("offload", "fsdp_text_encoder", "skip_final_inference",
                                                          "enable_npu_flash_attention", "cache_dir",
                                                          "final_validation_prompt"))
    saved = json.loads((Path(args["output_dir"]) / "train_config.json").read_text())
    assert saved["validation_inference_steps"] == 2


def test_python_api_takes_a_config_file(tmp_path, base_args):
    import json

    import dreambooth

    path = tmp_path / "run.json"
    path.write_text(json.dumps(base_args(max_train_steps=1)))
    assert dreambooth.train(str(path), max_train_steps=2)["steps"] == 2  # keywords override the file


@pytest.mark.parametrize("command", [["train"], ["generate"], ["evaluate"], ["export"], ["identifier"], ["demo"],
                                     ["toy", "pretrain"], ["toy", "quality"]])
def test_every_command_prints_its_help(command, capsys):
    from dreambooth.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "--" in capsys.readouterr().out


@pytest.mark.parametrize("changes, field, fragment", [
    ({"prior_target": "base_model"}, "prior_target", "only used with --with_prior_preservation"),
    ({"with_prior_preservation": True, "class_prompt": "a dog", "class_data_dir": "c", "use_lora": True,
      "prior_target": "base_model", "offload_base_model": True}, "offload_base_model", "full fine-tune"),
    ({"with_prior_preservation": True, "class_prompt": "a dog"}, "class_data_dir", "unless --prior_target"),
    ({"validate_with_ema": True}, "validate_with_ema", "needs --use_ema"),
    ({"use_ema": True, "ema_decay": 0.9, "ema_min_decay": 0.95}, "ema_min_decay", "at most --ema_decay"),
    ({"mask_background_weight": 0.5}, "mask_background_weight", "only used with --masked_loss"),
    ({"caption_extension": "txt"}, "caption_extension", "with its dot"),
    ({"fsdp_cpu_offload": True}, "fsdp_cpu_offload", "only used with --fsdp"),
    ({"fsdp": True, "use_ema": True}, "use_ema", "not with --fsdp"),
    ({"fsdp": True, "mixed_precision": "fp16"}, "mixed_precision", "use bf16"),
    ({"with_prior_preservation": True, "class_prompt": "a dog", "prior_target": "base_model",
      "prediction_type": "v_prediction"}, "prediction_type", "its own parameterization"),
])
def test_prior_target_ema_caption_and_mask_options_are_checked_together(changes, field, fragment):
    with pytest.raises(ConfigError) as e:
        schema.build(TrainConfig, {**REQUIRED, **changes})
    assert e.value.field == field and fragment in str(e.value)


def test_base_model_target_needs_no_class_folder():
    cfg = schema.build(TrainConfig, {**REQUIRED, "with_prior_preservation": True, "class_prompt": "a dog",
                                     "prior_target": "base_model"})
    assert cfg.class_data_dir is None


@pytest.mark.parametrize("spec, expected", [('{"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}', "nf4"),
                                            ('{"load_in_8bit": true}', "int8"),
                                            ('{"load_in_4bit": true}', None), ("not json", None)])
def test_a_reference_bnb_config_file_is_read_as_quantize_base(spec, expected, tmp_path):
    """The reference scripts' --bnb_quantization_config_path (their README's nf4 JSON) is our --quantize_base;
    anything else is refused in one line that names what to pass."""
    from dreambooth.cli import quantization_of
    from dreambooth.errors import DreamBoothError

    path = tmp_path / "bnb.json"
    path.write_text(spec)
    if expected is None:
        with pytest.raises(DreamBoothError, match="--quantize_base"):
            quantization_of(str(path))
    else:
        assert quantization_of(str(path)) == expected
