"""The training stream: an endless, seeded sequence of (instance, class) examples indexed by position.

Every random choice (which image, crop, flip, noise, timestep) is a function of (seed, position), never of a
global RNG. That is what makes resume exact and makes N processes x batch b see the same examples as one process x
batch N*b: a step always consumes the same positions, however they are split.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Container, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .buckets import Groups, Size
from .images import open_rgb


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and Python runs, unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def keyed_generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


class Shuffled:
    """Position p -> item index: one seeded permutation per pass over n items."""

    def __init__(self, n: int, seed: int, salt: str):
        self.n, self.seed, self.salt = n, seed, salt
        self._perms: dict[int, list[int]] = {}

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = torch.randperm(self.n, generator=keyed_generator(self.seed, self.salt, epoch)).tolist()
        return self._perms[epoch][offset]


def to_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 image -> CHW float in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def crop_plan(width: int, height: int, size: int | tuple[int, int], center: bool, flip: bool, rng: random.Random
              ) -> tuple[tuple[int, int], tuple[int, int], bool]:
    """Where a view of a width x height image comes from: the resized size (just covering `size`: a square side, or
    an aspect-ratio bucket's (height, width)), the crop's (top, left), mirrored when flipped (what SDXL's crop
    conditioning means), and whether it flips. The image's size is all it needs, so a view whose latents are cached
    is known without decoding a pixel."""
    th, tw = (size, size) if isinstance(size, int) else size
    scale = max(tw / width, th / height)  # a square: size / the short side
    w, h = max(tw, round(width * scale)), max(th, round(height * scale))
    if center:
        left, top = (w - tw) // 2, (h - th) // 2
    else:
        left, top = rng.randint(0, w - tw), rng.randint(0, h - th)
    flipped = flip and rng.random() < 0.5
    return (w, h), (top, w - tw - left if flipped else left), flipped


def resize_crop(img: Image.Image, size: int | tuple[int, int], center: bool, flip: bool, rng: random.Random
                ) -> tuple[Image.Image, tuple[int, int], bool]:
    """Resize to just cover `size` (a square's side or a (height, width)), crop it (centred or random) and maybe
    flip; also returns the crop's (top, left) and whether it flipped, as `crop_plan` decides them."""
    plan = crop_plan(img.width, img.height, size, center, flip, rng)
    return apply_crop(img, plan, size), plan[1], plan[2]


Plan = tuple[tuple[int, int], tuple[int, int], bool]  # crop_plan's (resized size, crop top-left, flipped)


def crop_origin(plan: Plan, size: int | tuple[int, int]) -> tuple[int, int]:
    """(left, top) of the crop in the resized image (the top-left that `crop_plan` records is mirrored when the
    view flips)."""
    (w, _), (top, left), flipped = plan
    tw = size if isinstance(size, int) else size[1]
    return (w - tw - left if flipped else left), top


def apply_crop(img: Image.Image, plan: Plan, size: int | tuple[int, int]) -> Image.Image:
    """The view `crop_plan` decided, cut from an image of the planned size."""
    th, tw = (size, size) if isinstance(size, int) else size
    x, top = crop_origin(plan, size)
    img = img.resize(plan[0], Image.Resampling.BILINEAR).crop((x, top, x + tw, top + th))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if plan[2] else img


INSTANCE_PROMPT, CLASS_PROMPT = 0, 1  # prompt ids; per-image captions are 2, 3, ...


class DreamBoothDataset(Dataset):
    """Position p -> the p-th instance example and, with prior preservation, the p-th class example. Each example
    carries the id of its prompt (the instance prompt, the class prompt or its image's caption) and, with
    `instance_masks`, an instance example carries its view of the subject's mask (1, R, R) in [0, 1]."""

    def __init__(
        self,
        instance_images: Sequence[Path],
        class_images: Sequence[Path] | None,
        resolution: int,
        seed: int,
        center_crop: bool = False,
        random_flip: bool = False,
        instance_prompt_ids: Sequence[int] | None = None,
        instance_masks: Sequence[Image.Image] | None = None,
        caption_dropout: float = 0.0,
        empty_prompt_id: int | None = None,
        repeats: int | Sequence[int] = 1,
        buckets: Sequence[Size] | None = None,
        class_buckets: Sequence[Size] | None = None,
        group: int = 1,
        fill_small_buckets: bool = False,
        classes: tuple[Sequence[int], Sequence[int], Sequence[int]] | None = None,
    ):
        """`caption_dropout`: the probability that an instance example trains with the empty prompt (its id:
        `empty_prompt_id`) instead of its own, drawn per position from the seed (a resumed run draws the same).
        `repeats`: each instance image appears that many times per epoch (the reference scripts' --repeats; or one
        count per image: several subjects, each with its own).
        `buckets`: each instance image's aspect-ratio bucket (height, width), or None (a `resolution` square);
        `class_buckets` each class image's, `group` the examples of one micro-step over all processes (a group
        shares one bucket: see `buckets`), `fill_small_buckets` whether a bucket smaller than a group may repeat
        its images. `classes`: with several classes (subjects of different classes), (each instance image's class,
        each class image's class, each class's prompt id): a class example is one of its instance example's class."""
        if caption_dropout > 0 and empty_prompt_id is None:
            raise ValueError("caption_dropout needs the empty prompt's id")
        self.caption_dropout, self.empty_prompt_id = caption_dropout, empty_prompt_id
        self.instance_images = list(instance_images)
        self.instance_prompt_ids = list(instance_prompt_ids or [INSTANCE_PROMPT] * len(self.instance_images))
        # each instance image's training size: its bucket, or the square
        self.targets: list[int | Size] = list(buckets) if buckets is not None else [resolution] * len(
            self.instance_images)
        # (size, mask resized once): the resized size depends on the image's size only; each view is a cut of it
        self.instance_masks = None if instance_masks is None else [
            (m.size, np.asarray(m.resize(crop_plan(*m.size, t, True, False, random.Random(0))[0],
                                         Image.Resampling.BILINEAR), dtype=np.float32) / 255.0)
            for m, t in zip(instance_masks, self.targets)]
        self.class_images = list(class_images or [])
        self.resolution, self.seed = resolution, seed
        self.center_crop, self.random_flip = center_crop, random_flip
        n = len(self.instance_images)
        per_image = [repeats] * n if isinstance(repeats, int) else list(repeats)
        # an epoch's slots: every image once per pass, an image in as many passes as its repeats (one count for
        # all: slot s is image s % n)
        self.slots = [i for r in range(max(per_image, default=0)) for i in range(n) if per_image[i] > r]
        self.instance_order = Shuffled(len(self.slots), seed, "instance")
        self.groups = None if buckets is None else Groups(list(buckets), group, seed, per_image, fill_small_buckets)
        # the classes: each instance image's, each class image's, each class's prompt id (one class: all 0)
        self.instance_classes, class_of, self.class_prompt_ids = classes or (
            [0] * n, [0] * len(self.class_images), [CLASS_PROMPT])
        # a class example comes from its instance's class and, bucketed, from the class images of its instance's
        # bucket (all of its class's where the bucket has none, each cropped to it)
        self.class_pools: dict[tuple[int, Size | None], list[int]] = {}
        for j, k in enumerate(class_of):
            self.class_pools.setdefault((k, None), []).append(j)
        for j, b in enumerate(class_buckets or []):
            self.class_pools.setdefault((class_of[j], tuple(b)), []).append(j)
        self._class_orders: dict[tuple[int, Size | None], Shuffled] = {}
        # Few instance images: decode once. Class images can number hundreds: decode on demand.
        self._instance_cache = [open_rgb(p) for p in self.instance_images]
        self._sizes: dict[tuple[str, int], tuple[int, int]] = {}
        # the views whose latents the trainer holds (its latent cache), or None: those examples come without pixels
        self.cached: Container | None = None

    @property
    def epoch_length(self) -> int:
        """Examples per epoch, as the reference script counts it: max(#instance x repeats, #class) (bucketed: the
        instance examples with each bucket's last batch filled)."""
        instance = len(self.slots) if self.groups is None else self.groups.epoch_length
        return max(instance, len(self.class_images))

    def __len__(self) -> int:  # positions are unbounded; this is one epoch
        return self.epoch_length

    def _example(self, kind: str, index: int, position: int, target: int | Size, klass: int = 0) -> dict:
        """Pixels, the original size and crop that SDXL conditions on, and the view: what makes these pixels (the
        key of the latent cache). A view already in `self.cached` gets no pixels: nothing is decoded or resized."""
        def rng() -> random.Random:
            return random.Random(derive_seed(self.seed, "augment", kind, position))

        labels = {"prompt": self.instance_prompt_ids[index] if kind == "instance" else self.class_prompt_ids[klass],
                  "mask": None}
        if kind == "instance" and self.caption_dropout > 0 and \
                random.Random(derive_seed(self.seed, "caption_dropout", position)).random() < self.caption_dropout:
            labels["prompt"] = self.empty_prompt_id
        if kind == "instance" and self.instance_masks is not None:
            mask_size, mask = self.instance_masks[index]
            plan = crop_plan(*mask_size, target, self.center_crop, self.random_flip, rng())
            x, top = crop_origin(plan, target)
            th, tw = (target, target) if isinstance(target, int) else target
            crop = mask[top: top + th, x: x + tw]
            labels["mask"] = torch.from_numpy(np.ascontiguousarray(crop[:, ::-1] if plan[2] else crop))[None]
        # the view: what makes the pixels (bucketed, a class image may be cut to several buckets)
        bucket = () if self.groups is None else tuple(target)
        labels["target_size"] = (target, target) if isinstance(target, int) else tuple(target)
        size = self._sizes.get((kind, index))  # (width, height), known once the image was decoded
        if size is not None and self.cached is not None:
            _, top_left, flipped = crop_plan(*size, target, self.center_crop, self.random_flip, rng())
            view = (kind, index, *top_left, flipped, *bucket)
            if view in self.cached:
                return {"pixels": None, "original_size": size[::-1], "crop_top_left": top_left, "view": view,
                        **labels}
        img = self._instance_cache[index] if kind == "instance" else open_rgb(self.class_images[index])
        self._sizes[(kind, index)] = img.size
        crop, top_left, flipped = resize_crop(img, target, self.center_crop, self.random_flip, rng())
        return {"pixels": to_tensor(crop), "original_size": (img.height, img.width), "crop_top_left": top_left,
                "view": (kind, index, *top_left, flipped, *bucket), **labels}

    def _class_index(self, position: int, target: int | Size, klass: int) -> int:
        """The class image of the class example at `position` (one of class `klass`, bucketed: of `target`'s)."""
        key = (klass, None if self.groups is None else tuple(target))
        pool = self.class_pools.get(key) or self.class_pools[(klass, None)]
        if key not in self._class_orders:  # class 0's salts are those of one-class runs
            salt = "class" if klass == 0 else f"class{klass}"
            self._class_orders[key] = Shuffled(len(pool), self.seed, salt if key[1] is None else
                                               f"{salt}-{target[0]}x{target[1]}")
        return pool[self._class_orders[key][position]]

    def __getitem__(self, position: int) -> dict:
        if self.groups is None:
            index = self.slots[self.instance_order[position]]  # (repeated images: the same image)
            target: int | Size = self.resolution
        else:
            index, target = self.groups[position]
        item = {"position": position, "instance": self._example("instance", index, position, target)}
        if self.class_images:
            klass = self.instance_classes[index]
            item["class"] = self._example("class", self._class_index(position, target, klass), position, target,
                                          klass)
        return item


def collate(items: list[dict]) -> dict:
    """Instance examples first, then class examples, in one batch (the paper's joint batch)."""
    examples = [it["instance"] for it in items] + [it["class"] for it in items if "class" in it]
    positions = [it["position"] for it in items]
    with_prior = len(examples) > len(items)
    pixels = [e["pixels"] for e in examples]
    return {
        # a tensor; a list when some views are cached and came without pixels (None)
        "pixel_values": torch.stack(pixels) if all(p is not None for p in pixels) else pixels,
        "original_sizes": torch.tensor([e["original_size"] for e in examples]),
        "crop_top_lefts": torch.tensor([e["crop_top_left"] for e in examples]),
        "target_sizes": torch.tensor([e["target_size"] for e in examples]),  # (height, width): the bucket's
        "views": [e["view"] for e in examples],
        "is_prior": torch.tensor([False] * len(items) + [True] * (len(examples) - len(items))),
        "positions": torch.tensor(positions + positions if with_prior else positions),
        "prompt_ids": torch.tensor([e["prompt"] for e in examples]),
        # None without --masked_loss; else one mask per example, ones where an example has none (class images)
        "masks": torch.stack([e["mask"] if e["mask"] is not None else torch.ones_like(masks[0]) for e in examples])
        if (masks := [e["mask"] for e in examples if e["mask"] is not None]) else None,
    }


class StepBatchSampler(Sampler[list[int]]):
    """Yields this process's positions for micro-steps [start, stop): global batch s covers
    positions [s*B*W, (s+1)*B*W) and process r takes the r-th slice of B."""

    def __init__(self, batch_size: int, rank: int, world_size: int, start: int, stop: int):
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[list[int]]:
        b, w = self.batch_size, self.world_size
        for step in range(self.start, self.stop):
            first = step * b * w + self.rank * b
            yield list(range(first, first + b))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)
