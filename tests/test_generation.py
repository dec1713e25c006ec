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
