"""Reading user images safely: every mode, orientation and bit depth becomes an upright 8-bit RGB image, and every
unreadable file becomes one clear error that names it."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError
from .annotations import is_mask

log = logging.getLogger("dreambooth")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Pillow's own limit (~89 MP): larger images are treated as decompression bombs, not just warned about.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


@dataclass
class ImageFolder:
    """The usable images of a folder, and what was passed over."""

    images: list[Path]
    skipped: list[Path] = field(default_factory=list)  # files that are not images
    small: list[Path] = field(default_factory=list)  # images smaller than the training resolution
    captions: list[str | None] | None = None  # per image, with --caption_extension (None: no caption file)
    masks: list[Image.Image] | None = None  # per image, with --masked_loss
    sizes: list[tuple[int, int]] = field(default_factory=list)  # per image: (width, height), upright
    buckets: list[tuple[int, int]] | None = None  # per image, with aspect-ratio buckets: (height, width)


def open_rgb(path: Path) -> Image.Image:
    """Open an image as upright 8-bit RGB, or raise DataError saying why it cannot be used."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise Image.DecompressionBombError("too many pixels")
                img.load()
                img = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{path}: image is too large (decompression bomb guard, > {MAX_PIXELS} pixels)") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: corrupt or truncated image ({e})") from None
    return to_rgb(img)


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as `open_rgb` gives it (EXIF rotation applied), from its header alone."""
    with Image.open(path) as img:
        swapped = img.getexif().get(0x0112) in (5, 6, 7, 8)  # orientations that turn the image on its side
        return (img.height, img.width) if swapped else img.size


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max() > 255):
            arr = arr / 257.0
        elif img.mode == "F" and arr.max() <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def scan_folder(folder: Path, what: str, resolution: int | None = None, ignore: set[str] | None = None,
                companions: tuple[str, ...] = ()) -> ImageFolder:
    """List a folder's images, checking that each one opens; bad images fail together in one error. Masks
    (`<image>-masklabel.png`) are never images to train on, nor files with a `companions` suffix (captions)."""
    if not folder.exists():
        raise DataError(f"{what} folder {folder} does not exist; check the path")
    if not folder.is_dir():
        raise DataError(f"{what} folder {folder} is a file, not a folder; pass the folder that holds the images")
    result = ImageFolder(images=[])
    companion_suffixes = {c.lower() for c in companions}
    problems: list[str] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir() or path.name in (ignore or set()) or is_mask(path):
            continue
        if path.suffix.lower() in companion_suffixes:
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            result.skipped.append(path)
            continue
        try:
            img = open_rgb(path)
        except DataError as e:
            problems.append(str(e).removeprefix(f"{path}: ").join([f"{path.name} (", ")"]))
            continue
        if resolution is not None and min(img.size) < resolution:
            result.small.append(path)
        result.images.append(path)
        result.sizes.append(img.size)
    if problems:
        raise DataError(
            f"{len(problems)} {what} image(s) in {folder} cannot be used: {'; '.join(problems)}; "
            "remove or replace them"
        )
    if result.skipped:
        log.warning(
            "skipping %d non-image file(s) in %s: %s", len(result.skipped), folder,
            ", ".join(p.name for p in result.skipped),
        )
    if result.small:
        log.warning(
            "%d %s image(s) are smaller than --resolution %s and will be upscaled (softer results): %s",
            len(result.small), what, resolution, ", ".join(p.name for p in result.small),
        )
    return result
