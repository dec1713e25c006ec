import torch

from dreambooth.data import DreamBoothDataset, StepBatchSampler, collate
from tiny import make_images


def test_two_processes_cover_the_same_positions_as_one():
    one = list(StepBatchSampler(4, 0, 1, 0, 3))
    r0, r1 = list(StepBatchSampler(2, 0, 2, 0, 3)), list(StepBatchSampler(2, 1, 2, 0, 3))
    for step in range(3):
        assert sorted(r0[step] + r1[step]) == one[step]


def test_resume_starts_where_the_stream_left_off():
    full = list(StepBatchSampler(3, 0, 1, 0, 6))
    assert list(StepBatchSampler(3, 0, 1, 4, 6)) == full[4:]


def test_examples_are_a_function_of_position(tmp_path):
    inst = make_images(tmp_path / "i", n=3)
    cls = make_images(tmp_path / "c", n=5, seed=1)
    paths = sorted(inst.iterdir()), sorted(cls.iterdir())
    a = DreamBoothDataset(*paths, resolution=32, seed=7, random_flip=True)
    b = DreamBoothDataset(*paths, resolution=32, seed=7, random_flip=True)
    assert torch.equal(a[11]["instance"]["pixels"], b[11]["instance"]["pixels"])
    assert torch.equal(a[11]["class"]["pixels"], b[11]["class"]["pixels"])
    first = a[0]["instance"]["pixels"]
    assert first.shape == (3, 32, 32) and first.min() >= -1 and first.max() <= 1
    assert a.epoch_length == 5


def test_each_epoch_visits_every_instance_once(tmp_path):
    inst = make_images(tmp_path / "i", n=4)
    ds = DreamBoothDataset(sorted(inst.iterdir()), None, resolution=32, seed=0, center_crop=True)
    for epoch in range(3):
        assert sorted(ds.instance_order[epoch * 4 + k] for k in range(4)) == [0, 1, 2, 3]


def test_collate_puts_instance_first_then_class(tmp_path):
    inst = make_images(tmp_path / "i", n=2)
    cls = make_images(tmp_path / "c", n=2, seed=1)
    ds = DreamBoothDataset(sorted(inst.iterdir()), sorted(cls.iterdir()), resolution=32, seed=0)
    batch = collate([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["is_prior"].tolist() == [False, False, True, True]
    assert batch["positions"].tolist() == [0, 1, 0, 1]
    assert batch["original_sizes"].shape == batch["crop_top_lefts"].shape == (4, 2)


def test_crop_coordinates_locate_the_crop_in_the_resized_image(tmp_path):
    """SDXL conditions on (original size, crop top-left); they must describe the pixels actually used, flips
    included (a flipped crop's left is measured from the mirrored image's edge)."""
    import numpy as np
    from PIL import Image

    from dreambooth.data.dataset import to_tensor

    inst = make_images(tmp_path / "i", n=4)
    paths = sorted(inst.iterdir())
    ds = DreamBoothDataset(paths, None, resolution=32, seed=3, random_flip=True)
    flipped = 0
    for position in range(12):
        ex = ds[position]["instance"]
        img = Image.open(paths[ds.instance_order[position]]).convert("RGB")
        assert ex["original_size"] == (img.height, img.width)
        scale = 32 / min(img.size)
        w, h = max(32, round(img.width * scale)), max(32, round(img.height * scale))
        resized = img.resize((w, h), Image.Resampling.BILINEAR)
        top, left = ex["crop_top_left"]
        plain = to_tensor(resized.crop((left, top, left + 32, top + 32)))
        mirror = to_tensor(resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((left, top, left + 32, top + 32)))
        assert torch.equal(ex["pixels"], plain) or torch.equal(ex["pixels"], mirror)
        flipped += int(not torch.equal(ex["pixels"], plain))
        assert np.isfinite(ex["pixels"].numpy()).all()
    assert 0 < flipped < 12  # both branches were exercised


def test_a_cached_view_comes_without_pixels_and_the_same_crop(tmp_path):
    """The loop hands the dataset its latent cache: an example whose view is cached is neither decoded nor
    resized, and its view, size and crop are the ones the decoded example had (crop_plan reads only the size)."""
    inst = make_images(tmp_path / "i", n=2, size=80)
    cls = make_images(tmp_path / "c", n=3, size=72, seed=1)
    paths = sorted(inst.iterdir()), sorted(cls.iterdir())
    plain = DreamBoothDataset(*paths, resolution=32, seed=5, random_flip=True)
    cached = DreamBoothDataset(*paths, resolution=32, seed=5, random_flip=True)
    cached.cached = seen = set()
    skipped = 0
    for position in range(60):
        want, got = plain[position], cached[position]
        for kind in ("instance", "class"):
            w, g = want[kind], got[kind]
            assert (g["view"], g["original_size"], g["crop_top_left"]) == (
                w["view"], w["original_size"], w["crop_top_left"])
            if g["pixels"] is None:
                assert g["view"] in seen
                skipped += 1
            else:
                assert g["view"] not in seen and torch.equal(g["pixels"], w["pixels"])
            seen.add(g["view"])
    assert skipped > 20  # random crops of slightly larger images repeat often
    centred = DreamBoothDataset(*paths, resolution=32, seed=5, center_crop=True)
    centred.cached = {centred[p][kind]["view"] for p in range(3) for kind in ("instance", "class")}
    assert all(centred[p]["class"]["pixels"] is None for p in range(3, 9))  # one view per image: none decoded
    batch = collate([centred[3], plain[4]])
    assert isinstance(batch["pixel_values"], list) and batch["pixel_values"][0] is None


def test_a_mask_gets_the_same_crop_and_flip_as_its_image_and_captions_their_prompt_ids(tmp_path):
    """The mask is cut exactly as its image: a mask file that copies its image's red channel yields a mask equal to
    the red channel of the training view, for random crops and flips."""
    import numpy as np
    from PIL import Image

    from dreambooth.data.annotations import open_mask
    from dreambooth.data.dataset import CLASS_PROMPT

    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(96, 64), (64, 80)]):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rgb).save(paths[-1])
        Image.fromarray(rgb[..., 0]).save(tmp_path / f"{i}-masklabel.png")
    masks = [open_mask(p) for p in paths]
    ds = DreamBoothDataset(paths, paths, 48, seed=3, random_flip=True, instance_prompt_ids=[0, 2],
                           instance_masks=masks)
    flips = set()
    for position in range(12):
        example = ds[position]["instance"]
        red = (example["pixels"][0] + 1) * 127.5 / 255  # the red channel back in [0, 1]
        assert example["mask"].shape == (1, 48, 48)
        assert torch.allclose(example["mask"][0], red, atol=1e-5)  # to_tensor's float rounding
        assert example["prompt"] == [0, 2][example["view"][1]]
        assert ds[position]["class"]["prompt"] == CLASS_PROMPT and ds[position]["class"]["mask"] is None
        flips.add(example["view"][-1])
    assert flips == {True, False}
    batch = collate([ds[0], ds[1]])
    assert batch["masks"].shape == (4, 1, 48, 48) and bool((batch["masks"][2:] == 1).all())  # class rows: ones
    assert batch["prompt_ids"][2:].tolist() == [CLASS_PROMPT] * 2
    assert collate([DreamBoothDataset(paths, None, 48, seed=3)[0]])["masks"] is None


def test_caption_dropout_swaps_instance_prompts_for_the_empty_one_by_position(tmp_path):
    """--caption_dropout p: about p of the instance examples carry the empty prompt's id, the same ones for the same
    seed and position (a resumed run draws them again); class examples keep the class prompt."""
    inst, cls = make_images(tmp_path / "i", n=3), make_images(tmp_path / "c", n=3, seed=1)
    paths = (sorted(inst.iterdir()), sorted(cls.iterdir()))
    ds = DreamBoothDataset(*paths, resolution=32, seed=3, caption_dropout=0.5, empty_prompt_id=9)
    again = DreamBoothDataset(*paths, resolution=32, seed=3, caption_dropout=0.5, empty_prompt_id=9)
    prompts = [ds[p]["instance"]["prompt"] for p in range(200)]
    assert prompts == [again[p]["instance"]["prompt"] for p in range(200)]
    assert set(prompts) == {0, 9} and 70 <= prompts.count(9) <= 130  # 200 keyed draws at 0.5 (fixed by the seed)
    assert {ds[p]["class"]["prompt"] for p in range(50)} == {1}
    plain = DreamBoothDataset(*paths, resolution=32, seed=3)
    assert {plain[p]["instance"]["prompt"] for p in range(200)} == {0}


def test_repeats_show_each_instance_image_that_many_times_per_epoch(tmp_path):
    inst = make_images(tmp_path / "i", n=3)
    ds = DreamBoothDataset(sorted(inst.iterdir()), None, resolution=32, seed=0, repeats=4)
    assert len(ds) == ds.epoch_length == 12
    seen = [ds.instance_order[p] % 3 for p in range(12)]
    assert sorted(seen) == [0] * 4 + [1] * 4 + [2] * 4
    once = DreamBoothDataset(sorted(inst.iterdir()), None, resolution=32, seed=0)
    assert len(once) == 3 and sorted(once.instance_order[p] for p in range(3)) == [0, 1, 2]
