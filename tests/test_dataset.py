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
    assert torch.equal(a[11]["instance"], b[11]["instance"]) and torch.equal(a[11]["class"], b[11]["class"])
    assert a[0]["instance"].shape == (3, 32, 32) and a[0]["instance"].min() >= -1 and a[0]["instance"].max() <= 1
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
