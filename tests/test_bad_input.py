"""Every bad input: exit status 2, one line on stderr, no traceback, nothing already written lost."""

import json
import os
import shutil
import sysconfig
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_bounded, to_argv
from dreambooth.cli import main


def run_cli(capsys, args: dict) -> str:
    capsys.readouterr()
    code = main(["train", *to_argv(args)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("dreambooth train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_missing_instance_dir(base_args, tmp_path, capsys):
    assert "does not exist" in run_cli(capsys, base_args(instance_data_dir=str(tmp_path / "nope")))


def test_empty_instance_dir(base_args, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    assert "holds no images" in run_cli(capsys, base_args(instance_data_dir=str(tmp_path / "empty")))


def test_corrupt_instance_image(base_args, instance_dir, capsys):
    (instance_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    line = run_cli(capsys, base_args())
    assert "broken.jpg" in line and "remove or replace" in line


@pytest.mark.parametrize("setup, fragment", [
    (lambda p: None, "no model_index.json"),
    (lambda p: (p / "model_index.json").write_text(json.dumps({"_class_name": "WuerstchenCombinedPipeline"})),
     "not supported"),
    (lambda p: (p / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"})),
     "lacks unet/"),
])
def test_model_folder_that_is_not_an_sd_pipeline(base_args, tmp_path, capsys, setup, fragment):
    folder = tmp_path / "model"
    folder.mkdir()
    setup(folder)
    assert fragment in run_cli(capsys, base_args(pretrained_model_name_or_path=str(folder)))


def test_pickle_only_weights_are_refused(base_args, tiny_model, tmp_path, capsys):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))  # only a pickle-format file is left
    assert "safetensors" in run_cli(capsys, base_args(pretrained_model_name_or_path=str(folder)))


def test_prior_flags_without_each_other(base_args, capsys):
    assert "class_prompt" in run_cli(capsys, base_args(with_prior_preservation=False, class_data_dir=None))
    assert "class_prompt" in run_cli(capsys, base_args(class_prompt=None))


def test_compile_mode_without_compile(base_args, capsys):
    assert "only used with --torch_compile" in run_cli(capsys, base_args(torch_compile_mode="reduce-overhead"))


def test_fp16_on_cpu(base_args, capsys):
    assert "needs a CUDA GPU" in run_cli(capsys, base_args(mixed_precision="fp16"))


def test_nothing_written_is_lost_on_error(base_args, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    run_cli(capsys, base_args(resolution=63))
    assert (out / "precious.txt").read_text() == "keep" and sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def console_script() -> Path | None:
    """The `dreambooth` script pip installed for this interpreter (where the package is installed, not run from a
    source tree), found where the installer puts scripts."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("dreambooth")
    except PackageNotFoundError:
        return None
    if not any(ep.name == "dreambooth" and ep.group == "console_scripts" for ep in dist.entry_points):
        return None
    for folder in (sysconfig.get_path("scripts"), sysconfig.get_path("scripts", f"{os.name}_user")):
        for name in ("dreambooth", "dreambooth.exe"):
            if (Path(folder) / name).is_file():
                return Path(folder) / name
    found = shutil.which("dreambooth")
    return Path(found) if found else None


def test_console_script_prints_no_traceback(tiny_model, tmp_path):
    exe = console_script()
    if exe is None:
        pytest.skip("the dreambooth package is not installed with its console script (tests run from a source tree)")
    proc = run_bounded([str(exe), "train", "--pretrained_model_name_or_path", str(tiny_model),
                        "--instance_data_dir", str(tmp_path / "nope"), "--instance_prompt", "a zwx dog"], 120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("dreambooth train: error:") and "does not exist" in proc.stderr


def test_grayscale_cmyk_and_rotated_instances_are_accepted(base_args, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("L", (80, 80), 100).save(folder / "g.png")
    Image.new("CMYK", (80, 80), (0, 200, 200, 0)).save(folder / "c.jpg")
    img, exif = Image.new("RGB", (96, 72), "green"), Image.Exif()
    exif[0x0112] = 8
    img.save(folder / "r.jpg", exif=exif)
    import dreambooth

    assert dreambooth.train(**base_args(instance_data_dir=str(folder), max_train_steps=1))["steps"] == 1


def test_unreachable_hub_id(base_args, capsys):
    line = run_cli(capsys, base_args(pretrained_model_name_or_path="nobody-here/no-such-model"))
    assert "cannot fetch nobody-here/no-such-model" in line and "local folder" in line
