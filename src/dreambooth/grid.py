"""Image grids for validation and generation outputs."""

from __future__ import annotations

import math

from PIL import Image


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images (all the size of the first) into a near-square grid."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid
