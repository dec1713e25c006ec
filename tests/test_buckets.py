"""Aspect-ratio buckets: a photo trains whole at the bucket nearest its shape, batches never mix buckets, class
images are made at the buckets' sizes in proportion, and every draw stays keyed by (seed, position)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import to_argv
from dreambooth.cli import main
from dreambooth.data import DreamBoothDataset, collate
from dreambooth.data.buckets import Groups, bucket_for, class_size, nearest, parse
from dreambooth.errors import ConfigError, DataError


def portrait(path: Path, width: int = 72, height: int = 96) -> Path:
    """A 3:4 photo: grey, a red band along its top edge and a blue band along its bottom edge."""
    arr = np.full((height, width, 3), 128, dtype=np.uint8)
    arr[:6] = (255, 0, 0)
    arr[-6:] = (0, 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def shapes(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """Photos of these (height, width), as tiny.make_images draws them: a red square on a plain background."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        arr = np.full((h, w, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        y, x = rng.integers(4, h // 2), rng.integers(4, w // 2)
        arr[y: y + h // 3, x: x + w // 3] = (220, 30, 30)
        Image.fromarray(arr).save(folder / f"photo-{i}.png")
    return folder


MIXED = [(96, 72), (72, 96), (96, 72), (64, 64), (100, 70)]  # (height, width): 3:4, 4:3, 3:4, 1:1, 7:10


def test_a_three_by_four_photo_keeps_its_whole_subject(tmp_path):
    photo = portrait(tmp_path / "p" / "a.png")
    (bucket,) = [bucket_for(72, 96, 64, 8, None)]
    assert bucket == (72, 56)  # (height, width): the 3:4 rung of diffusers' ladder at 64 px, in multiples of 8
    bucketed = DreamBoothDataset([photo], None, 64, seed=0, buckets=[bucket])
    square = DreamBoothDataset([photo], None, 64, seed=0, center_crop=True)
    for position in range(4):  # random crops: none has room to move
        view = bucketed[position]["instance"]["pixels"]
        assert view.shape == (3, 72, 56)
        red, blue = view[0, 0].mean(), view[2, -1].mean()  # the top row is red, the bottom row blue: all of it
        assert red > 0.9 and blue > 0.9, (red, blue)
    cropped = square[0]["instance"]["pixels"]
    assert cropped.shape == (3, 64, 64)
    assert cropped[0, 0].mean() < 0.1 and cropped[2, -1].mean() < 0.1  # the centre square loses both edges


def test_the_ladder_the_list_and_the_nearest_bucket():
    assert parse("64,48; 48,64;64,48", 16) == [(64, 48), (48, 64)]  # duplicates once
    with pytest.raises(ConfigError, match="not a multiple of 16"):
        parse("64,40", 16)
    with pytest.raises(ConfigError, match="height,width pairs"):
        parse("64x48", 16)
    assert bucket_for(72, 96, 64, 16, [(64, 64), (64, 48), (48, 64)]) == (64, 48)
    assert bucket_for(96, 72, 64, 16, [(64, 64), (64, 48), (48, 64)]) == (48, 64)
    # a photo smaller than the budget gets a smaller bucket, not an upscale (the reference scripts' rule)
    small = bucket_for(40, 40, 64, 8, None)
    assert small == (40, 40)
    assert nearest(56, 72, [(64, 64), (72, 56)]) == (72, 56)  # a class image made at its bucket's size
    assert nearest(300, 400, [(64, 64), (72, 56)]) == (72, 56)  # a user's 3:4 class photo
    assert nearest(64, 64, [(40, 40), (64, 64)]) == (64, 64)  # same ratio: its own size wins


def test_class_images_follow_the_buckets_in_proportion():
    counts = [((72, 56), 3), ((56, 72), 1), ((64, 64), 1)]
    first = [class_size(i, counts) for i in range(10)]
    assert Counter(first) == {(72, 56): 6, (56, 72): 2, (64, 64): 2}
    assert [class_size(i, counts) for i in range(5)] == first[:5]  # an image's size is not a function of the count


@pytest.mark.parametrize("group", [1, 2, 4])
def test_batches_never_mix_buckets_and_each_epoch_shows_every_photo(group):
    buckets = [(64, 48)] * 5 + [(48, 64)] * 3 + [(64, 64)] * 4
    groups = Groups(buckets, group, seed=3, repeats=2, fill_small=True)
    for epoch in range(3):
        start = epoch * groups.epoch_length
        seen = [groups[p] for p in range(start, start + groups.epoch_length)]
        for g in range(0, len(seen), group):
            assert len({b for _, b in seen[g:g + group]}) == 1
        assert all(buckets[i] == b for i, b in seen)
        counts = Counter(i for i, _ in seen)
        assert set(counts) == set(range(12)) and min(counts.values()) >= 2  # --repeats 2: each photo twice or more
    again = Groups(buckets, group, seed=3, repeats=2, fill_small=True)
    assert [again[p] for p in range(50, 80)] == [groups[p] for p in range(50, 80)]  # keyed: resume sees the same
    other = Groups(buckets, group, seed=4, repeats=2, fill_small=True)
    assert [other[p] for p in range(40)] != [groups[p] for p in range(40)]


def test_a_bucket_smaller_than_a_batch_is_one_line_unless_allowed(tmp_path, base_args, capsys):
    with pytest.raises(DataError, match="holds 1 photo.*--allow_small_buckets"):
        Groups([(64, 48), (48, 64), (48, 64)], 2, seed=0)
    instance = shapes(tmp_path / "mixed", MIXED)
    args = base_args(instance_data_dir=str(instance), use_aspect_ratio_buckets=True, with_prior_preservation=None,
                     class_prompt=None, class_data_dir=None)
    assert main(["train", *to_argv(args)]) == 2
    err = capsys.readouterr().err
    assert "holds 1 photo(s)" in err and "--allow_small_buckets" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert main(["train", *to_argv({**args, "aspect_ratio_buckets": "64,60"})]) == 2
    assert "not a multiple of 8" in capsys.readouterr().err
    assert main(["train", *to_argv({**base_args(), "allow_small_buckets": True})]) == 2
    assert "only used with --use_aspect_ratio_buckets" in capsys.readouterr().err


def test_a_bucketed_batch_stacks_instance_and_class_views_of_one_size(tmp_path):
    instance = shapes(tmp_path / "i", MIXED)
    classes = shapes(tmp_path / "c", [(72, 56), (56, 72), (64, 64), (400, 300)])
    buckets = [bucket_for(w, h, 64, 8, None) for h, w in MIXED]
    class_buckets = [nearest(w, h, sorted(set(buckets))) for h, w in [(72, 56), (56, 72), (64, 64), (400, 300)]]
    ds = DreamBoothDataset(sorted(instance.iterdir()), sorted(classes.iterdir()), 64, seed=1, buckets=buckets,
                           class_buckets=class_buckets, group=2, fill_small_buckets=True)
    assert len(set(buckets)) == 4 and len(set(class_buckets)) == 3  # 100x70 is 2:3: a bucket of no class image
    seen = set()
    for step in range(12):
        batch = collate([ds[2 * step], ds[2 * step + 1]])
        h, w = batch["pixel_values"].shape[-2:]
        assert batch["target_sizes"].tolist() == [[h, w]] * 4  # SDXL's target size is the bucket's
        assert (h, w) in set(buckets)
        for view in batch["views"][2:]:  # a class view of its own bucket's images, or of any, cut to the bucket
            assert class_buckets[view[1]] == (h, w) or (h, w) not in class_buckets
            seen.add((h, w) in class_buckets)
    assert seen == {True, False}


def test_a_mixed_ratio_run_resumes_bit_for_bit(base_args, tmp_path, monkeypatch, caplog):
    from test_resume import straight_and_resumed
    from test_training import same, weights

    caplog.set_level(logging.INFO, logger="dreambooth")
    instance = shapes(tmp_path / "mixed", MIXED)
    masks = instance / "photo-0-masklabel.png"
    Image.fromarray(np.full((96, 72), 255, dtype=np.uint8)).save(masks)  # one photo's mask: the whole photo
    summary = straight_and_resumed(base_args, tmp_path, monkeypatch, 2, max_train_steps=4, checkpointing_steps=2,
                                   instance_data_dir=str(instance), use_aspect_ratio_buckets=True,
                                   allow_small_buckets=True, random_flip=True, num_class_images=5)
    assert summary["steps"] == 4
    assert same(weights(tmp_path / "straight", "unet"), weights(tmp_path / "stopped", "unet"))
    sizes = sorted(Image.open(p).size for p in (tmp_path / "class").glob("class-*.png"))
    # (width, height): two 3:4 portraits, one 2:3, a square, a landscape; the 3:4 bucket twice
    assert sizes == [(56, 72), (56, 72), (56, 80), (64, 64), (72, 56)]
    config = json.loads((tmp_path / "straight" / "train_config.json").read_text())
    assert config["use_aspect_ratio_buckets"] is True
    # the buckets and their photo counts, logged at the start (width x height; the most photos first, then by size)
    assert "aspect-ratio buckets (width x height: photos): 56x72: 2, 72x56: 1, 64x64: 1, 56x80: 1" in caplog.text
