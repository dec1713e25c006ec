"""Judges that read a toy image's attributes back from its pixels, analytically (no learned weights).

Segment: the background colour is the median of the border; the object is the largest 4-connected region that
differs from it. Class: the shape template (drawn into the object's bounding box) with the best IoU. Colour and
background: the nearest palette entry to the median of the object's interior and of the border. Blur only moves the
edges, which medians and IoU tolerate; noise is averaged out by the medians.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .subjects import Subject
from .world import BACKGROUNDS, CLASSES, COLOURS, LARGE_FROM, TRIANGLE_CUT, shape_mask

DIFFERS = 60.0  # RGB distance from the background that counts as object
_OBJ = np.array(list(COLOURS.values()), dtype=np.float32)
_BG = np.array(list(BACKGROUNDS.values()), dtype=np.float32)


@dataclass(frozen=True)
class Reading:
    cls: str | None  # None: no object found
    colour: str | None
    background: str
    size: str | None
    cx: float = 0.0
    cy: float = 0.0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        part, queue = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            part.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(part) > len(best):
            best = part
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1)
    return mask & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


@dataclass
class _Object:
    mask: np.ndarray
    inner: np.ndarray
    alpha: np.ndarray  # soft opacity in [0, 1]
    u: np.ndarray  # box coordinates of every pixel, [-1, 1] across the bounding box
    v: np.ndarray
    bbox: tuple[int, int, int, int]


def _segment(img: np.ndarray) -> tuple[np.ndarray, _Object | None]:
    img = img.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    region = _largest_component(dist > DIFFERS)
    if region.sum() < 4:
        return bg, None
    # Opacity: distance from the background relative to the object's own (its most distant quarter of pixels);
    # thresholding it at one half undoes the spread of blurred edges.
    full = np.quantile(dist[region], 0.75)
    alpha = np.clip(dist / max(full, 1.0), 0.0, 1.0) * _grow(region)
    mask = _largest_component(alpha >= 0.5)
    if mask.sum() < 4:
        return bg, None
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]] + 0.5
    u = (xx - (x0 + x1) / 2) / ((x1 - x0) / 2)
    v = (yy - (y0 + y1) / 2) / ((y1 - y0) / 2)
    inner = _erode(mask)
    return bg, _Object(mask, inner if inner.sum() >= 3 else mask, alpha, u, v, (x0, y0, x1, y1))


def _grow(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1)
    return mask | m[:-2, 1:-1] | m[2:, 1:-1] | m[1:-1, :-2] | m[1:-1, 2:]


def _nearest(colour: np.ndarray, palette: np.ndarray, names: list[str]) -> str:
    return names[int(np.argmin(np.linalg.norm(palette - colour, axis=-1)))]


def _template(cls: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The class's shape stretched to fill the box (the inverse of how it is drawn), anti-aliased 4x."""
    s = 4
    du = (u[0, 1] - u[0, 0]) if u.shape[1] > 1 else 1.0
    dv = (v[1, 0] - v[0, 0]) if v.shape[0] > 1 else 1.0
    offsets = (np.arange(s) + 0.5) / s - 0.5
    acc = np.zeros(u.shape, dtype=np.float32)
    for oy in offsets:
        for ox in offsets:
            uu, vv = u + ox * du, v + oy * dv
            if cls == "square":
                acc += shape_mask(cls, uu * 0.85, vv * 0.85)
            elif cls == "triangle":
                acc += shape_mask(cls, uu, (vv + 1.0) * 0.9 - 1.0)
            else:
                acc += shape_mask(cls, uu, vv)
    return acc / (s * s)


@lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """Gaussian blur along one axis as an (n, n) matrix (edges renormalised)."""
    i = np.arange(n, dtype=np.float32)
    k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    return k / k.sum(axis=1, keepdims=True)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return a
    return _blur_matrix(a.shape[0], sigma) @ a @ _blur_matrix(a.shape[1], sigma).T


BLURS = (0.0, 0.5, 0.8, 1.1, 1.5)  # the templates are matched sharp and blurred: generated samples are soft at corners


def _classify(obj: _Object) -> str:
    """The template closest (L1) to the object's opacity, over the box and a 2-pixel margin, at any blur."""
    x0, y0, x1, y1 = obj.bbox
    win = (slice(max(y0 - 2, 0), y1 + 2), slice(max(x0 - 2, 0), x1 + 2))
    errors = []
    for cls in CLASSES:
        t = _template(cls, obj.u, obj.v)
        errors.append(min(np.abs(_blur(t, s)[win] - obj.alpha[win]).mean() for s in BLURS))
    return CLASSES[int(np.argmin(errors))]


def _radius(cls: str, width: float, height: float) -> float:
    """The drawing radius of a shape whose box is width x height (see world.shape_mask)."""
    if cls == "square":
        return max(width, height) / 2 / 0.85
    if cls == "triangle":
        return max(width / 2, height / 1.8)
    return max(width, height) / 2


def read(image: np.ndarray) -> Reading:
    """The attributes of one (H, W, 3) uint8 image."""
    img = np.asarray(image)
    bg, obj = _segment(img)
    background = _nearest(bg, _BG, list(BACKGROUNDS))
    if obj is None:
        return Reading(None, None, background, None)
    colour = _nearest(np.median(img[obj.inner].astype(np.float32), axis=0), _OBJ, list(COLOURS))
    x0, y0, x1, y1 = obj.bbox
    cls = _classify(obj)
    size = "large" if _radius(cls, x1 - x0, y1 - y0) >= LARGE_FROM else "small"
    return Reading(cls, colour, background, size, (x0 + x1) / 2, (y0 + y1) / 2)


def subject_score(image: np.ndarray, subject: Subject) -> float:
    """Subject fidelity in [0, 1]: 0 unless the class matches; then the worse of the two parts' colour matches."""
    img = np.asarray(image)
    _, obj = _segment(img)
    if obj is None or _classify(obj) != subject.cls:
        return 0.0
    coord = obj.u if subject.axis == "x" else obj.v
    cut = ((TRIANGLE_CUT + 1.0) / 1.8 * 2.0 - 1.0) if (subject.cls == "triangle" and subject.axis == "y") else 0.0
    scores = []
    for part, ref in ((coord < cut - 0.2, subject.first), (coord > cut + 0.2, subject.second)):
        pixels = img[obj.inner & part]
        if len(pixels) < 2:
            pixels = img[obj.mask & part]
        if len(pixels) == 0:
            return 0.0
        d = float(np.linalg.norm(np.median(pixels.astype(np.float32), axis=0) - np.array(COLOURS[ref])))
        scores.append(max(0.0, 1.0 - d / 120.0))
    return min(scores)


IS_SUBJECT = 0.5  # a render scoring at least this counts as the subject (drift is measured with it)


def degrade(image: np.ndarray, rng: np.random.Generator, blur: float = 0.8, noise: float = 10.0) -> np.ndarray:
    """Gaussian blur and pixel noise, the flaws of generated samples, for measuring the judges' robustness."""
    x = image.astype(np.float32)
    x = np.stack([_blur(x[..., c], blur) for c in range(3)], axis=-1) + rng.normal(0.0, noise, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def judge_accuracy(n: int = 500, seed: int = 0, blur: float = 0.8, noise: float = 10.0) -> dict[str, float]:
    """Share of n fresh, degraded renders whose attributes `read` gets right, per attribute."""
    from .world import random_scene, render

    rng = np.random.default_rng([seed, 7])
    hits = {"cls": 0, "colour": 0, "background": 0, "size": 0}
    for _ in range(n):
        scene = random_scene(rng)
        reading = read(degrade(render(scene), rng, blur, noise))
        for attr in hits:
            hits[attr] += getattr(reading, attr) == getattr(scene, attr)
    return {k: v / n for k, v in hits.items()}
