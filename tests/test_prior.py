import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

import dreambooth
from dreambooth.prior import GENERATED_RE, MANIFEST


def generated(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if GENERATED_RE.match(p.name)}


def test_class_images_are_generated_once_and_reused(base_args, tmp_path):
    first = dreambooth.train(**base_args(max_train_steps=1, output_dir=str(tmp_path / "a")))
    assert first["class_images"] == {"used": 4, "user": 0, "reused": 0, "generated": 4}
    files = generated(tmp_path / "class")
    second = dreambooth.train(**base_args(max_train_steps=1, output_dir=str(tmp_path / "b")))
    assert second["class_images"]["generated"] == 0 and generated(tmp_path / "class") == files

    manifest = json.loads((tmp_path / "class" / MANIFEST).read_text())
    (settings,) = manifest["settings"].values()
    assert settings["prompt"] == "a photo of dog" and settings["sampler"] == "dpm++" and settings["steps"] == 2
    assert settings["model"]["unet_digest"]
    assert set(manifest["images"]) == set(files) and all("seed" in v for v in manifest["images"].values())


def test_interrupted_generation_resumes_with_only_the_missing(base_args, tmp_path):
    dreambooth.train(**base_args(max_train_steps=1, output_dir=str(tmp_path / "a")))
    files = generated(tmp_path / "class")
    lost = sorted(files)[1::2]
    for name in lost:
        (tmp_path / "class" / name).unlink()
    summary = dreambooth.train(**base_args(max_train_steps=1, output_dir=str(tmp_path / "b")))
    assert summary["class_images"]["generated"] == len(lost)
    now = generated(tmp_path / "class")
    assert now.keys() == files.keys()
    for name in lost:  # same per-image seed; only batch-size rounding may differ
        a = np.asarray(Image.open(io.BytesIO(files[name])), dtype=int)
        b = np.asarray(Image.open(io.BytesIO(now[name])), dtype=int)
        assert np.abs(a - b).max() <= 2


def test_user_images_count_and_other_settings_are_left_alone(base_args, tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), "gray").save(folder / f"mine_{i}.jpg")
    summary = dreambooth.train(**base_args(max_train_steps=1, output_dir=str(tmp_path / "a")))
    assert summary["class_images"] == {"used": 4, "user": 2, "reused": 0, "generated": 2}
    old = generated(folder)

    changed = dreambooth.train(**base_args(max_train_steps=1, output_dir=str(tmp_path / "b"),
                                           class_prompt="a photo of cat", instance_prompt="a photo of zwx cat"))
    assert changed["class_images"]["generated"] == 2
    now = generated(folder)
    assert all(now[name] == data for name, data in old.items()) and len(now) == 4  # nothing deleted
    assert (folder / "mine_0.jpg").is_file()


def test_model_identity_follows_content_not_location(tiny_model, tmp_path):
    import shutil

    from dreambooth.families import ModelSource, model_identity

    moved = tmp_path / "moved"
    shutil.copytree(tiny_model, moved)
    assert model_identity(ModelSource(str(moved)), "unet") == model_identity(ModelSource(str(tiny_model)), "unet")
    weights = next((moved / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    assert model_identity(ModelSource(str(moved)), "unet") != model_identity(ModelSource(str(tiny_model)), "unet")


def test_out_of_memory_halves_the_class_image_batch(base_args, tmp_path, monkeypatch, caplog):
    """Without --sample_batch_size the batch is chosen (4 on CPU; from free memory on a GPU) and halved when a call
    runs out of memory; the images are those a batch that fits makes. A given size is kept: its OOM stands."""
    from dreambooth.families.common import DiffusersFamily
    from dreambooth.prior import BatchSize

    load = DiffusersFamily.pipeline_around  # how training's one load makes its sampling pipeline
    calls = []

    def fits_two(self, *args, **kwargs):
        pipe = load(self, *args, **kwargs)
        real = type(pipe).__call__

        class Small(type(pipe)):
            def __call__(self, prompt, *a, **kw):
                calls.append(len(prompt))
                if len(prompt) > 2:
                    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
                return real(self, prompt, *a, **kw)

        pipe.__class__ = Small
        return pipe

    monkeypatch.setattr(DiffusersFamily, "pipeline_around", fits_two)
    summary = dreambooth.train(**base_args(sample_batch_size=None, max_train_steps=1))
    assert summary["class_images"]["generated"] == 4 and calls == [4, 2, 2]
    assert "out of memory; 2 per batch now" in caplog.text
    monkeypatch.undo()
    again = tmp_path / "again"
    dreambooth.train(**base_args(sample_batch_size=2, max_train_steps=1, class_data_dir=str(again),
                                 output_dir=str(tmp_path / "b")))
    for name, data in generated(tmp_path / "class").items():  # same seeds, same batch size: the same images
        assert data == (again / name).read_bytes()
    given = BatchSize(8, cuda=False)
    assert given.now == 8 and not given.shrink(RuntimeError("CUDA out of memory"))
    assert not BatchSize(None, cuda=False).shrink(RuntimeError("some other failure"))


def test_another_tokenizer_trains_and_class_images_stay_the_models_own(base_args, tiny_model, tmp_path):
    """--tokenizer_name replaces the tokenizer training reads; class images are the base model's own pipeline's,
    so they are sampled by a pipeline loaded for them (not lent the training's parts): here the same tokenizer in
    another folder gives the very files a run without the option makes."""
    import shutil

    tokenizer = shutil.copytree(tiny_model / "tokenizer", tmp_path / "my-tokenizer")
    plain = dreambooth.train(**base_args(max_train_steps=1, output_dir=str(tmp_path / "a"),
                                         class_data_dir=str(tmp_path / "plain")))
    other = dreambooth.train(**base_args(max_train_steps=1, output_dir=str(tmp_path / "b"),
                                         class_data_dir=str(tmp_path / "other"), tokenizer_name=str(tokenizer)))
    assert plain["class_images"]["generated"] == other["class_images"]["generated"] == 4
    assert generated(tmp_path / "plain") == generated(tmp_path / "other")
