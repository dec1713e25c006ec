"""Per-image captions (--caption_extension) and the masked loss (--masked_loss): read, checked, and trained on."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dreambooth
from conftest import to_argv
from dreambooth.cli import main
from dreambooth.data.annotations import read_captions
from dreambooth.errors import DataError
from test_training import relative_update_gap, same, weights

NO_PRIOR = dict(with_prior_preservation=False, class_prompt=None, class_data_dir=None)


def captioned(instance_dir, tmp_path, texts) -> str:
    folder = tmp_path / "captioned"
    shutil.copytree(instance_dir, folder)
    for image, text in zip(sorted(folder.glob("*.png")), texts):
        image.with_suffix(".txt").write_text(text)
    return str(folder)


def test_captions_replace_the_placeholder_and_must_name_the_subject(tmp_path):
    images = [tmp_path / f"{i}.png" for i in range(3)]
    images[0].with_suffix(".txt").write_text("a [V] dog\n on the beach")
    images[1].with_suffix(".txt").write_text("a zwx dog asleep")
    assert read_captions(images, ".txt", "zwx") == ["a zwx dog on the beach", "a zwx dog asleep", None]
    images[2].with_suffix(".txt").write_text("a photo of [V], a dog; zwx's ball")  # punctuation beside it is fine
    assert read_captions(images, ".txt", "zwx")[2] == "a photo of zwx, a dog; zwx's ball"
    assert read_captions(images, ".TXT", "zwx")[2] == "a photo of zwx, a dog; zwx's ball"  # as typed, or lower case
    images[2].with_suffix(".txt").write_text("a zwxy dog")  # another word that starts with it is not it
    with pytest.raises(DataError, match="does not name the subject"):
        read_captions(images, ".txt", "zwx")
    images[2].with_suffix(".txt").write_text("a dog on the beach")
    with pytest.raises(DataError, match="does not name the subject"):
        read_captions(images, ".txt", "zwx")
    images[2].with_suffix(".txt").write_text("  ")
    with pytest.raises(DataError, match="caption is empty"):
        read_captions(images, ".txt", "zwx")


def test_captions_are_what_each_image_trains_on(base_args, instance_dir, tmp_path, caplog):
    """Captions that repeat the instance prompt train exactly as no captions (each example's conditioning is looked
    up by its prompt id: the same values); captions that differ change what is learnt. Caption files are not
    reported as skipped non-images."""
    plain = base_args(**NO_PRIOR, output_dir=str(tmp_path / "plain"), identifier="zwx")  # no class prompt to infer it
    dreambooth.train(**plain)
    with caplog.at_level(logging.WARNING, logger="dreambooth"):
        dreambooth.train(**{**plain, "output_dir": str(tmp_path / "same"), "caption_extension": ".txt",
                            "instance_data_dir": captioned(instance_dir, tmp_path, ["a photo of [V] dog"] * 4)})
    assert "non-image" not in caplog.text
    assert same(weights(tmp_path / "plain", "unet"), weights(tmp_path / "same", "unet"))
    shutil.rmtree(tmp_path / "captioned")
    texts = ["a photo of [V] dog on the beach", "a red zwx dog", "a zwx toy", "a photo of zwx dog in blue"]
    dreambooth.train(**{**plain, "output_dir": str(tmp_path / "other"), "caption_extension": ".txt",
                        "instance_data_dir": captioned(instance_dir, tmp_path, texts)})
    assert not same(weights(tmp_path / "plain", "unet"), weights(tmp_path / "other", "unet"))


def test_caption_problems_are_one_line(base_args, instance_dir, tmp_path, capsys):
    args = base_args(caption_extension=".txt", instance_data_dir=captioned(instance_dir, tmp_path, ["a dog"]))
    assert main(["train", *to_argv(args)]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not name the subject" in err and len(err.splitlines()) == 1
    assert main(["train", *to_argv(base_args(caption_extension="txt"))]) == 2
    assert "with its dot" in capsys.readouterr().err


def masks_beside(instance_dir, tmp_path, value) -> str:
    """A copy of the instance images with a mask file each: `value(h, w)` -> uint8 (h, w)."""
    folder = tmp_path / "masked"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(instance_dir, folder)
    for image in sorted(folder.glob("*.png")):
        w, h = Image.open(image).size
        Image.fromarray(value(h, w)).save(folder / f"{image.stem}-masklabel.png")
    return str(folder)


def test_masked_loss_learns_the_masked_part_only(base_args, instance_dir, tmp_path):
    """A mask of ones is the unmasked loss; a background weight of 1 makes any mask one; a half mask changes what
    is learnt. Mask files are never trained on as instance images."""
    def ones(h, w):
        return np.full((h, w), 255, np.uint8)

    def half(h, w):
        m = np.zeros((h, w), np.uint8)
        m[: h // 2] = 255
        return m

    base = weights(Path(base_args()["pretrained_model_name_or_path"]), "unet")
    plain = base_args(**NO_PRIOR, output_dir=str(tmp_path / "plain"))
    summary = dreambooth.train(**plain)
    runs = {"ones": (ones, {}), "half_bg1": (half, {"mask_background_weight": 1.0}), "half": (half, {})}
    for name, (value, extra) in runs.items():
        s = dreambooth.train(**{**plain, "output_dir": str(tmp_path / name), "masked_loss": True, **extra,
                                "instance_data_dir": masks_beside(instance_dir, tmp_path, value)})
        assert s["num_instance_images"] == summary["num_instance_images"]  # masks are not instance images
    reference = weights(tmp_path / "plain", "unet")
    # the same loss up to sum/count vs mean rounding, which Adam can amplify on near-zero gradients: the relative
    # update gap, as the accumulation test measures it
    assert relative_update_gap(base, reference, weights(tmp_path / "ones", "unet")) < 1e-3
    assert relative_update_gap(base, reference, weights(tmp_path / "half_bg1", "unet")) < 1e-3
    assert relative_update_gap(base, reference, weights(tmp_path / "half", "unet")) > 0.05


def test_an_alpha_channel_is_a_mask_and_mask_problems_are_one_line(base_args, instance_dir, tmp_path, capsys):
    folder = tmp_path / "alpha"
    folder.mkdir()
    for i, image in enumerate(sorted(instance_dir.glob("*.png"))):
        rgb = np.asarray(Image.open(image).convert("RGB"))
        alpha = np.zeros(rgb.shape[:2], np.uint8)
        alpha[:, : rgb.shape[1] // 2] = 255
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / f"{i}.png")
    assert main(["train", *to_argv(base_args(**NO_PRIOR, masked_loss=True, instance_data_dir=str(folder)))]) == 0
    capsys.readouterr()

    cases = [(lambda h, w: np.zeros((h, w), np.uint8), "all black"),
             (lambda h, w: np.full((h + 1, w), 255, np.uint8), "save the mask at the image's size")]
    for value, message in cases:
        args = base_args(**NO_PRIOR, masked_loss=True, output_dir=str(tmp_path / "bad"),
                         instance_data_dir=masks_beside(instance_dir, tmp_path, value))
        assert main(["train", *to_argv(args)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    args = base_args(**NO_PRIOR, masked_loss=True, output_dir=str(tmp_path / "bad"))
    assert main(["train", *to_argv(args)]) == 2
    assert "finds no mask" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_masks_are_found_beside_oddly_named_images_and_never_two(tmp_path):
    from dreambooth.data.annotations import open_mask

    image = tmp_path / "b[1].png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "b[1]-masklabel.png")
    assert np.asarray(open_mask(image)).min() == 255  # the file, not a missing alpha channel
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "b[1]-masklabel.jpg")
    with pytest.raises(DataError, match="2 masks beside it"):
        open_mask(image)
