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
