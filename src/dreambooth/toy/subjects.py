"""Subjects the base model cannot draw by name: two-tone objects (pretraining objects are always one colour)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .world import BACKGROUNDS, Scene, random_scene, render, render_mask, with_pattern


@dataclass(frozen=True)
class Subject:
    name: str
    cls: str
    axis: str  # "x": left | right halves; "y": top | bottom
    first: str  # colour of the left / top part
    second: str
    contexts: tuple[str, ...]  # the only backgrounds its instance images show

    def scene(self, rng: np.random.Generator, background: str | None = None, size: str | None = None) -> Scene:
        base = random_scene(rng, cls=self.cls, background=background or self.contexts[rng.integers(2)], size=size)
        return with_pattern(base, self.axis, self.first, self.second)

    @property
    def unseen_backgrounds(self) -> tuple[str, ...]:
        return tuple(b for b in BACKGROUNDS if b not in self.contexts)

    def instance_scenes(self, n: int = 5, seed: int = 0) -> list[Scene]:
        """n scenes in varied positions and sizes on its few backgrounds (3 large, then small, alternating)."""
        rng = np.random.default_rng([seed, sum(map(ord, self.name))])
        sizes = ["large", "small", "large", "large", "small"]
        return [self.scene(rng, background=self.contexts[i % len(self.contexts)], size=sizes[i % 5])
                for i in range(n)]

    def instance_images(self, n: int = 5, seed: int = 0) -> list[np.ndarray]:
        return [render(scene) for scene in self.instance_scenes(n, seed)]

    def instance_masks(self, n: int = 5, seed: int = 0) -> list[np.ndarray]:
        """The subject's own pixels in each instance image (`--masked_loss`'s masks)."""
        return [render_mask(scene) for scene in self.instance_scenes(n, seed)]


SUBJECTS = {
    s.name: s for s in (
        Subject("circle", "circle", "y", "red", "yellow", ("white", "gray")),
        Subject("square", "square", "x", "blue", "yellow", ("white", "black")),
        Subject("triangle", "triangle", "y", "green", "red", ("black", "pink")),
    )
}

# A second subject of each class, in other colours and split the other way: what the multi-subject study trains beside
# a subject of the same class (`reproduce --studies subjects`); never a unit of the studies itself
TWINS = {
    "circle": Subject("circle-twin", "circle", "x", "blue", "green", ("black", "pink")),
    "square": Subject("square-twin", "square", "y", "green", "purple", ("white", "brown")),
    "triangle": Subject("triangle-twin", "triangle", "x", "yellow", "blue", ("white", "brown")),
}


def next_subject(name: str) -> Subject:
    """The subject of another class that the multi-subject study trains beside `name` (the next in SUBJECTS)."""
    names = list(SUBJECTS)
    return SUBJECTS[names[(names.index(name) + 1) % len(names)]]
