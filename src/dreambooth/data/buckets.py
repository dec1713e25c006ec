"""Aspect-ratio buckets: each photo trains at the bucket nearest its shape instead of a centre square, and a batch
never mixes buckets.

A bucket is a (height, width) in pixels, a multiple of the family's resolution multiple. The list is the user's
(`--aspect_ratio_buckets "h,w;h,w"`, the reference scripts' spelling) or computed from the pixel budget
`--resolution`² (`--use_aspect_ratio_buckets` alone), capped at each photo's own size so a small photo goes to a smaller
bucket rather than being upscaled, as the reference scripts do. The bucket list parsing, ladder and nearest-bucket
rule are diffusers' own (`diffusers.training_utils`).

Batches: a training position p belongs to group p // G, G being the examples of one micro-step over all processes
(batch x processes), so N processes of batch b see the groups one process of batch N*b sees. Per epoch, each bucket's
images (repeated --repeats times) are shuffled and cut into groups of G (the last one filled from the bucket's
start), and the epoch's groups are shuffled: every draw is keyed by (seed, epoch), never a global RNG, so a resumed
run continues the same sequence.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError, DataError

Size = tuple[int, int]  # (height, width) in pixels


def parse(text: str, multiple: int, option: str = "aspect_ratio_buckets") -> list[Size]:
    """"h,w;h,w" -> [(h, w), ...]; every side a positive multiple of `multiple` (one error naming the pair)."""
    import warnings

    from diffusers.training_utils import parse_buckets_string

    try:
        with warnings.catch_warnings():  # its "not divisible by 8" warning: the check below is an error
            warnings.simplefilter("ignore", UserWarning)
            buckets = parse_buckets_string(text)
    except ValueError as e:
        raise ConfigError(option, text, f"{str(e).rstrip('.')}; write height,width pairs separated by ';' (e.g. "
                                        "\"512,512;576,448\")") from None
    for h, w in buckets:
        if h % multiple or w % multiple:
            raise ConfigError(option, text, f"bucket {h},{w} is not a multiple of {multiple} on both sides, as "
                                            "this model needs (e.g. "
                                            f"{_round(h, multiple)},{_round(w, multiple)})")
    return list(dict.fromkeys(buckets))


def _round(value: int, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def bucket_for(width: int, height: int, resolution: int, multiple: int, explicit: Sequence[Size] | None) -> Size:
    """The bucket of a width x height photo: the nearest ratio of the explicit list, or of the ladder for
    min(resolution, the photo's own size) (a photo is not upscaled to a larger bucket)."""
    from diffusers.training_utils import find_nearest_bucket, generate_aspect_ratio_buckets

    if explicit:
        return tuple(explicit[find_nearest_bucket(height, width, explicit)])
    budget = min(resolution, round(math.sqrt(height * width)))
    ladder = generate_aspect_ratio_buckets(budget, divisibility=multiple)
    return tuple(ladder[find_nearest_bucket(height, width, ladder)])


def nearest(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket a class image belongs to: its own size if that is a bucket, else the nearest ratio (then area)."""
    if (height, width) in buckets:
        return height, width
    return min(buckets, key=lambda b: (abs(math.log(height / width) - math.log(b[0] / b[1])),
                                       abs(height * width - b[0] * b[1])))


def class_size(index: int, counts: Sequence[tuple[Size, int]]) -> Size:
    """The size of class image `index` when the instance photos fill `counts` buckets: buckets take turns in
    proportion to their photo counts (smooth weighted round-robin), so any first n class images are in proportion
    and image `index`'s size does not depend on how many are made."""
    total = sum(c for _, c in counts)
    current = [0] * len(counts)
    chosen = 0
    for _ in range(index % total + 1):
        for i, (_, c) in enumerate(counts):
            current[i] += c
        chosen = max(range(len(counts)), key=lambda i: current[i])
        current[chosen] -= total
    return counts[chosen][0]


def bucket_counts(buckets: Sequence[Size]) -> list[tuple[Size, int]]:
    """[(bucket, photos)], largest first (ties by size): the log line and the class images' proportions."""
    return sorted(Counter(buckets).items(), key=lambda kv: (-kv[1], kv[0]))


@dataclass
class Groups:
    """Position -> (instance image, bucket), batches never mixing buckets (see the module's docstring)."""

    buckets: list[Size]  # per instance image
    group: int  # examples per micro-step over all processes
    seed: int
    repeats: int | list[int] = 1  # for all images, or per image
    fill_small: bool = False  # a bucket with fewer examples than a group repeats them; else an error

    def __post_init__(self) -> None:
        members: dict[Size, list[int]] = {}
        repeats = [self.repeats] * len(self.buckets) if isinstance(self.repeats, int) else self.repeats
        for i, (b, r) in enumerate(zip(self.buckets, repeats)):
            members.setdefault(b, []).extend([i] * r)
        self.members = members
        small = [(b, len(m)) for b, m in members.items() if len(m) < self.group]
        if small and not self.fill_small:
            (h, w), n = small[0]
            raise DataError(f"aspect-ratio bucket {w}x{h} holds {n} photo(s) (with --repeats), fewer than one batch "
                            f"of {self.group} (batch size x processes), and a batch never mixes buckets; pass "
                            "--allow_small_buckets to repeat its photos, lower --train_batch_size, or give fewer "
                            "buckets")
        self.order = sorted(members)  # a stable order to key draws by
        self.per_epoch = sum(math.ceil(len(members[b]) / self.group) for b in self.order)
        self._epochs: dict[int, list[tuple[Size, list[int]]]] = {}

    @property
    def epoch_length(self) -> int:
        return self.per_epoch * self.group

    def _epoch(self, epoch: int) -> list[tuple[Size, list[int]]]:
        if epoch not in self._epochs:
            if len(self._epochs) > 4:
                self._epochs.clear()
            from .dataset import keyed_generator

            groups = []
            for k, b in enumerate(self.order):
                items = self.members[b]
                perm = torch.randperm(len(items), generator=keyed_generator(self.seed, "bucket", k, epoch)).tolist()
                shuffled = [items[i] for i in perm]
                n = math.ceil(len(shuffled) / self.group) * self.group
                filled = [shuffled[i % len(shuffled)] for i in range(n)]
                groups += [(b, filled[i:i + self.group]) for i in range(0, n, self.group)]
            order = torch.randperm(len(groups), generator=keyed_generator(self.seed, "bucket-groups", epoch)).tolist()
            self._epochs[epoch] = [groups[i] for i in order]
        return self._epochs[epoch]

    def __getitem__(self, position: int) -> tuple[int, Size]:
        group, offset = divmod(position, self.group)
        epoch, index = divmod(group, self.per_epoch)
        bucket, items = self._epoch(epoch)[index]
        return items[offset], bucket
