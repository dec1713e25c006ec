"""The toy world: 32x32 images of one flat-coloured shape on a plain background, with captions.

Attributes: class (circle, square, triangle, cross), colour, background, size (small, large) and position. Captions
name the class and, each independently, the colour, background and size; position is never named, so it is an
open attribute of every prompt. Objects are one colour in pretraining; the subjects (`subjects.py`) are two-tone,
which no caption describes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

SIZE = 32
SUPERSAMPLE = 4  # render at 4x and box-filter down: anti-aliased edges like a real photo's

CLASSES = ("circle", "square", "triangle", "cross")
COLOURS = {  # object colours, saturated
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 40),
    "purple": (140, 50, 210),
}
BACKGROUNDS = {  # background colours, kept far from every object colour so a judge can always segment
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (135, 135, 135),
    "brown": (125, 80, 45),
    "pink": (245, 170, 200),
}
SIZES = {"small": (5.0, 6.5), "large": (9.0, 11.5)}  # half-extent in pixels
LARGE_FROM = 7.75  # half-extent threshold between the two size words (judges use it)
TRIANGLE_CUT = 0.2  # a two-tone triangle splits here (shape coordinates), nearly halving its area
PREFIXES = ("a", "a photo of a", "a picture of a", "an image of a")
CAPTION_WORDS = sorted({w for p in PREFIXES for w in p.split()} | {"on", "background"} | set(CLASSES)
                       | set(COLOURS) | set(BACKGROUNDS) | set(SIZES))


@dataclass(frozen=True)
class Scene:
    """One image's attributes. `pattern` = ((axis, colour_a, colour_b)) makes a two-tone object (subjects only)."""

    cls: str
    colour: str
    background: str
    size: str
    radius: float
    cx: float
    cy: float
    pattern: tuple[str, str, str] | None = None


def shape_mask(cls: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The shape in its own box coordinates u, v in [-1, 1] (v grows downwards)."""
    if cls == "circle":
        return u * u + v * v <= 1.0
    if cls == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if cls == "triangle":
        return (v <= 0.8) & (v >= -1.0) & (np.abs(u) <= (v + 1.0) / 1.8)
    if cls == "cross":
        inside = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
        return inside & ((np.abs(u) <= 0.34) | (np.abs(v) <= 0.34))
    raise ValueError(f"unknown class {cls!r}")


def _grid(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    step = 1.0 / SUPERSAMPLE
    coords = (np.arange(SIZE * SUPERSAMPLE) + 0.5) * step
    y, x = np.meshgrid(coords, coords, indexing="ij")
    return (x - scene.cx) / scene.radius, (y - scene.cy) / scene.radius


def render(scene: Scene) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8."""
    u, v = _grid(scene)
    mask = shape_mask(scene.cls, u, v)
    big = np.empty(u.shape + (3,), dtype=np.float32)
    big[:] = BACKGROUNDS[scene.background]
    if scene.pattern is None:
        big[mask] = COLOURS[scene.colour]
    else:
        axis, first, second = scene.pattern
        split = (u < 0) if axis == "x" else (v < TRIANGLE_CUT if scene.cls == "triangle" else v < 0)
        big[mask & split] = COLOURS[first]
        big[mask & ~split] = COLOURS[second]
    s = SUPERSAMPLE
    small = big.reshape(SIZE, s, SIZE, s, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def render_mask(scene: Scene) -> np.ndarray:
    """(SIZE, SIZE) uint8: how much of each pixel the object covers (255: all of it), anti-aliased as `render` is."""
    u, v = _grid(scene)
    s = SUPERSAMPLE
    cover = shape_mask(scene.cls, u, v).astype(np.float32).reshape(SIZE, s, SIZE, s).mean(axis=(1, 3))
    return np.rint(cover * 255).astype(np.uint8)


def random_scene(rng: np.random.Generator, cls: str | None = None, colour: str | None = None,
                 background: str | None = None, size: str | None = None) -> Scene:
    """A scene with the given attributes and the rest drawn uniformly; the position always random."""
    cls = cls or CLASSES[rng.integers(len(CLASSES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    background = background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    size = size or list(SIZES)[rng.integers(len(SIZES))]
    radius = float(rng.uniform(*SIZES[size]))
    lo, hi = radius + 1.0, SIZE - radius - 1.0
    cx, cy = (float(c) for c in rng.uniform(lo, hi, 2))
    return Scene(cls, colour, background, size, radius, cx, cy)


def prompt(cls: str, colour: str | None = None, background: str | None = None, size: str | None = None,
           prefix: str = "a", identifier: str | None = None) -> str:
    """"a [size] [colour] [identifier] cls [on a bg background]" with the omitted parts left out."""
    words = [prefix, size, colour, identifier, cls]
    text = " ".join(w for w in words if w)
    return f"{text} on a {background} background" if background else text


# Held-out prompts: a fixed fifth of the (colour, class, background) triples is never captioned with all three
# named, so the quality bar measures composition, not recall of seen captions.
ALL_TRIPLES = list(itertools.product(COLOURS, CLASSES, BACKGROUNDS))


def held_out_triples(seed: int = 0) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ALL_TRIPLES))[: len(ALL_TRIPLES) // 5]
    return sorted(ALL_TRIPLES[i] for i in order)


def caption(scene: Scene, rng: np.random.Generator, held_out: set[tuple[str, str, str]],
            p_colour: float = 0.6, p_background: float = 0.6, p_size: float = 0.4) -> str:
    """A caption that names the class and a random subset of the other attributes, never a held-out triple."""
    colour = scene.colour if rng.random() < p_colour else None
    background = scene.background if rng.random() < p_background else None
    size = scene.size if rng.random() < p_size else None
    if colour and background and (scene.colour, scene.cls, scene.background) in held_out:
        if rng.random() < 0.5:
            colour = None
        else:
            background = None
    prefix = PREFIXES[rng.integers(len(PREFIXES))]
    return prompt(scene.cls, colour, background, size, prefix)


def with_pattern(scene: Scene, axis: str, first: str, second: str) -> Scene:
    return replace(scene, pattern=(axis, first, second), colour=first)
