"""What may sit beside an instance image: its caption (--caption_extension) and a mask of the subject
(--masked_loss). Both are read and checked before any model loads; every problem is one error naming the file."""

from __future__ import annotations

import glob
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import DataError

MASK_SUFFIX = "-masklabel"  # <image stem>-masklabel.png: OneTrainer's naming; never an instance image itself
IDENTIFIER_PLACEHOLDER = "[V]"


def is_mask(path: Path) -> bool:
    return path.stem.endswith(MASK_SUFFIX)


def read_captions(images: Sequence[Path], extension: str, identifier: str | None) -> list[str | None]:
    """Each image's caption (None where it has no caption file), [V] replaced by the identifier. A caption must name
    the subject: without the identifier it would teach the class noun, not [V], what the subject looks like."""
    captions: list[str | None] = []
    for image in images:
        found = [p for p in (image.with_suffix(e) for e in dict.fromkeys((extension, extension.lower(),
                                                                           extension.upper()))) if p.is_file()]
        if not found:
            captions.append(None)
            continue
        path = found[0]
        try:
            text = " ".join(path.read_text(encoding="utf-8").split())
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: caption cannot be read ({e}); save it as UTF-8 text") from None
        if not text:
            raise DataError(f"{path}: caption is empty; write the prompt for {image.name} or delete the file")
        if IDENTIFIER_PLACEHOLDER in text:
            if identifier is None:
                raise DataError(f"{path}: uses {IDENTIFIER_PLACEHOLDER} but the identifier is unknown; pass "
                                "--identifier")
            text = text.replace(IDENTIFIER_PLACEHOLDER, identifier)
        if identifier is not None and not re.search(rf"(?<!\w){re.escape(identifier)}(?!\w)", text):
            raise DataError(f"{path}: caption {text!r} does not name the subject; write {IDENTIFIER_PLACEHOLDER} "
                            f"(or {identifier!r}) where it is named")
        captions.append(text)
    return captions


def open_mask(image: Path) -> Image.Image:
    """The subject's mask for an instance image as an 8-bit gray image of the same size (255: subject): the
    `-masklabel` file beside it, or else its alpha channel."""
    beside = [p for p in image.parent.glob(f"{glob.escape(image.stem)}{MASK_SUFFIX}.*") if p.is_file()]
    if len(beside) > 1:
        raise DataError(f"{image}: {len(beside)} masks beside it ({', '.join(p.name for p in beside)}); keep one")
    source = beside[0] if beside else image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{source}: mask cannot be read ({e}); replace it") from None
    if beside:
        mask = img.convert("L")
    elif "A" in img.getbands() or (img.mode == "P" and "transparency" in img.info):
        mask = img.convert("RGBA").getchannel("A")
    else:
        raise DataError(f"{image}: --masked_loss finds no mask for it; save one as {image.stem}{MASK_SUFFIX}.png "
                        "beside it (white: the subject) or give the image an alpha channel")
    with Image.open(image) as original:
        size = ImageOps.exif_transpose(original).size
    if mask.size != size:
        raise DataError(f"{source}: mask is {mask.size[0]}x{mask.size[1]}, its image {size[0]}x{size[1]}; save the "
                        "mask at the image's size")
    if not np.asarray(mask).any():
        raise DataError(f"{source}: mask is all black (nothing to learn); mark the subject in white")
    return mask


def check_mask_crops(images: Sequence[Path], masks: Sequence[Image.Image], targets: Sequence[int | tuple[int, int]],
                     center: bool) -> None:
    """A mask whose subject the training crop cuts away trains its image on nothing (its loss is 0): an error with
    --center_crop (the one crop always misses it); with random crops, a warning when part of them miss it.
    `targets`: each image's training size (the resolution's square, or its bucket's (height, width))."""
    import logging
    import random

    from .dataset import crop_plan

    for image, mask, target in zip(images, masks, targets):
        th, tw = (target, target) if isinstance(target, int) else target
        (w, h), (top, left), _ = crop_plan(*mask.size, target, True, False, random.Random(0))
        white = np.asarray(mask.resize((w, h), Image.Resampling.BILINEAR)) > 0
        if not white.any():
            raise DataError(f"{image}: its mask's subject is too small to survive resizing to {tw}x{th} px, so "
                            "this image would train on nothing; mark more of the subject in white")
        if w == tw and h == th:  # the crop is the whole image: every view holds the subject
            continue
        if center:
            if not white[top:top + th, left:left + tw].any():
                raise DataError(f"{image}: its mask's subject lies outside the centre crop, so this image would "
                                "train on nothing; drop --center_crop, or crop the photo around the subject")
            continue
        axis = 0 if h - th > w - tw else 1  # the resize covers the crop: only the side with room moves
        lines = np.flatnonzero(white.any(axis=1 - axis))
        length = th if axis == 0 else tw
        positions = white.shape[axis] - length + 1
        first, last = lines[0], lines[-1]  # a crop [p, p + length) sees the subject unless it ends before
        seen = sum(1 for p in range(positions) if p <= last and p + length > first)  # or starts after it
        if seen < positions:
            logging.getLogger("dreambooth").warning(
                "%s: %d%% of its random crops hold none of the mask's subject (those steps learn nothing from "
                "it); crop the photo around the subject or use --center_crop", image,
                round(100 * (positions - seen) / positions))
