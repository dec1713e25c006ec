import pytest
from PIL import Image

import dreambooth
from dreambooth.cli import main
from dreambooth.errors import ConfigError


def test_generate_writes_images_and_grid_deterministically(tiny_model, tmp_path):
    kw = dict(model=str(tiny_model), prompt=["a dog", "a cat on a beach"], num_images=3, num_inference_steps=2,
              batch_size=2, sampler="euler", negative_prompt="blue")
    first = dreambooth.generate(**kw, output_dir=str(tmp_path / "a"))
    second = dreambooth.generate(**kw, output_dir=str(tmp_path / "b"))
    assert len(first) == 7 and first[-1].name == "grid.png"
    assert Image.open(first[-1]).size == (3 * 64, 2 * 64)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert "a cat on a beach" in Image.open(first[3]).text["parameters"]


def test_generate_cli_and_bad_values(tiny_model, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_model), "--prompt", "a dog", "--num_images", "1",
                 "--num_inference_steps", "1", "--output_dir", str(tmp_path)]) == 0
    assert (tmp_path / "grid.png").is_file()
    with pytest.raises(ConfigError, match="sampler"):
        dreambooth.generate(model=str(tiny_model), prompt=["x"], sampler="plms2")


def test_t5_length_of_a_t5_less_sd3_model_is_the_flag_else_the_trained_one(tmp_path):
    """Without T5, SD3's prompt ends in --max_sequence_length zero tokens, which the model's attention sees: a
    trained output samples with the length it was trained with (train_config.json), a flag overrides it."""
    import json
    import shutil

    from dreambooth.generation import sampling_options
    from tiny import make_tiny_sd3

    model = make_tiny_sd3(tmp_path / "sd3", with_t5=False)
    kw = dict(prompt=["a dog"], num_images=1, num_inference_steps=2, batch_size=1)

    def pixels(**more) -> bytes:
        return Image.open(dreambooth.generate(**kw, **more)[0]).tobytes()

    default = pixels(model=str(model), output_dir=str(tmp_path / "77"))
    short = pixels(model=str(model), max_sequence_length=2, output_dir=str(tmp_path / "2"))
    assert short != default  # the zero tokens' count reaches the pipeline

    trained = tmp_path / "trained"  # a folder as a run's output: the pipeline and the run's config
    shutil.copytree(model, trained)
    (trained / "train_config.json").write_text(json.dumps({"max_sequence_length": 2}))
    assert sampling_options(str(trained), None).max_sequence_length == 2
    assert sampling_options(str(trained), 5).max_sequence_length == 5
    assert sampling_options(str(model), None, fallback=3).max_sequence_length == 3
    again = pixels(model=str(trained), output_dir=str(tmp_path / "t"))
    assert again == short  # same weights, same seed, same length: identical by construction


def lora_error(capsys, model, lora, tmp_path) -> str:
    """`generate --lora` that must fail: exit 2 with one error line, no traceback, nothing logged by the library
    about the failure it raises (diffusers logs it, state dict and all), no output folder left."""
    import logging

    logged: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = logged.append
    peft_log = logging.getLogger("diffusers.loaders.peft")
    peft_log.addHandler(handler)
    capsys.readouterr()
    try:
        code = main(["generate", "--model", str(model), "--lora", str(lora), "--prompt", "a dog", "--device",
                     "cpu", "--output_dir", str(tmp_path / "samples")])
    finally:
        peft_log.removeHandler(handler)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and not logged, (err, logged)
    assert not (tmp_path / "samples").exists()
    return err


def test_a_kohya_lora_whose_layout_does_not_fit_the_model_is_one_line(tiny_model, tmp_path, capsys):
    """diffusers' kohya-Flux converter asserts that a single block's fused linear1 has Flux-dev's width; on
    another model that AssertionError, like any failure to convert or load a LoRA, is the one-line error naming the
    file."""
    import torch
    from safetensors.torch import save_file

    from tiny import make_tiny_flux

    model = make_tiny_flux(tmp_path / "flux")
    lora = tmp_path / "kohya.safetensors"
    name = "lora_unet_single_blocks_0_linear1"  # q, k, v and the MLP input of the tiny model: 3 * 32 + 128 rows
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 32), f"{name}.lora_up.weight": torch.zeros(224, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(lora))
    err = lora_error(capsys, model, lora, tmp_path)
    assert f"error: cannot load the LoRA {lora} onto FluxPipeline (AssertionError while converting its keys" in err
    assert "it must be a LoRA for this base model" in err

    name = "lora_unet_down_blocks_0_attentions_0_proj_in"  # an SD LoRA made for a wider model
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 999), f"{name}.lora_up.weight": torch.zeros(999, 4)},
              str(lora))
    err = lora_error(capsys, tiny_model, lora, tmp_path)
    assert "(Error(s) in loading state_dict for UNet2DConditionModel: size mismatch" in err  # the line after
