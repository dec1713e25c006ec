"""The toy world: renders, captions, tokenizer, and the judges' accuracy on fresh degraded renders."""

from __future__ import annotations

import numpy as np
import pytest

from dreambooth.identifier import candidates, known_words
from dreambooth.toy.judges import IS_SUBJECT, degrade, judge_accuracy, read, subject_score
from dreambooth.toy.subjects import SUBJECTS
from dreambooth.toy.tokenizer import RARE, write_toy_tokenizer
from dreambooth.toy.world import (
    CAPTION_WORDS,
    CLASSES,
    SIZE,
    caption,
    held_out_triples,
    random_scene,
    render,
    with_pattern,
)


def test_render_is_deterministic_and_shaped():
    a = [render(random_scene(np.random.default_rng(3))) for _ in range(2)]
    assert a[0].shape == (SIZE, SIZE, 3) and a[0].dtype == np.uint8
    assert np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], render(random_scene(np.random.default_rng(4))))


def test_judges_read_fresh_degraded_renders():
    accuracy = judge_accuracy(n=400, seed=11)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_judges_read_clean_renders_exactly():
    rng = np.random.default_rng(5)
    for _ in range(100):
        scene = random_scene(rng)
        r = read(render(scene))
        assert (r.colour, r.background, r.size) == (scene.colour, scene.background, scene.size)
        assert abs(r.cx - scene.cx) < 1.5 and abs(r.cy - scene.cy) < 2.5


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_subject_judge_separates_subject_from_its_class(name):
    subject = SUBJECTS[name]
    rng = np.random.default_rng([1, len(name)])
    own = [subject_score(degrade(render(subject.scene(rng)), rng), subject) for _ in range(100)]
    others = []
    for _ in range(100):  # other members of the class: one-colour, or two-tone in other colours or the other way
        scene = random_scene(rng, cls=subject.cls)
        kind = rng.integers(3)
        if kind == 1:
            scene = with_pattern(scene, subject.axis, subject.second, subject.first)
        elif kind == 2:
            scene = with_pattern(scene, subject.axis, subject.first, subject.first if rng.random() < 0.5 else "blue")
        others.append(subject_score(degrade(render(scene), rng), subject))
    assert all(0.0 <= s <= 1.0 for s in own + others)
    assert np.mean(np.array(own) >= IS_SUBJECT) >= 0.95
    assert np.mean(np.array(others) >= IS_SUBJECT) <= 0.02
    assert np.mean(own) - np.mean(others) > 0.5


def test_subject_images_vary_but_keep_few_contexts():
    subject = SUBJECTS["circle"]
    images = subject.instance_images(5)
    readings = [read(i) for i in images]
    assert {r.background for r in readings} <= set(subject.contexts)
    assert len({(round(r.cx), round(r.cy)) for r in readings}) == 5
    assert {r.size for r in readings} == {"small", "large"}
    assert all(subject_score(i, subject) > 0.8 for i in images)


def test_captions_name_the_class_and_never_a_held_out_triple():
    held = set(held_out_triples())
    assert len(held) >= 10
    rng = np.random.default_rng(0)
    for _ in range(2000):
        scene = random_scene(rng)
        text = caption(scene, rng, held)
        words = text.split()
        assert scene.cls in words
        named = (scene.colour in words) and (f"{scene.background} background" in text)
        assert not (named and (scene.colour, scene.cls, scene.background) in held)


def test_tokenizer_has_rare_identifiers_outside_the_captions(tmp_path):
    tok = write_toy_tokenizer(tmp_path / "tok")
    for word in CAPTION_WORDS + list(RARE):
        assert len(tok.tokenize(word)) == 1, word
    found = {c.token for c in candidates(tok)}
    assert set(RARE) - known_words() == found  # all of them, but those English uses (kp, vx)
    assert len(found) >= 12
    assert not found & set(CAPTION_WORDS)
    assert not set(RARE) & set(CAPTION_WORDS)
    assert set(CLASSES) <= set(CAPTION_WORDS)
