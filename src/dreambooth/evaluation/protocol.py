"""The DreamBench protocol (Ruiz et al. 2023, sec. 4.1), parsed from the dataset's own `prompts_and_classes.txt`.

30 subjects (21 objects, 9 live subjects) with their class nouns; 25 prompts per subject, whose categories follow
the order of the published lists: objects get 20 recontextualizations then 5 property modifications, live subjects
10 recontextualizations, 10 accessorizations, then 5 property modifications. 4 images per prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DATA = Path(__file__).parent / "dreambench" / "prompts_and_classes.txt"
IMAGES_PER_PROMPT = 4
LIVE_SUBJECTS = frozenset({"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"})
# (category, how many) in list order
OBJECT_CATEGORIES = (("recontextualization", 20), ("property modification", 5))
LIVE_CATEGORIES = (("recontextualization", 10), ("accessorization", 10), ("property modification", 5))


@dataclass(frozen=True)
class BenchSubject:
    name: str
    class_noun: str
    live: bool


@dataclass(frozen=True)
class PromptCase:
    """One prompt of the protocol; `template` holds {identifier} and {class_noun}."""

    template: str
    category: str

    def text(self, identifier: str, class_noun: str) -> str:
        return self.template.format(identifier=identifier, class_noun=class_noun)

    def without_identifier(self, class_noun: str) -> str:
        """The prompt as a text encoder that never saw [V] should read it (used for CLIP-T)."""
        return " ".join(self.template.replace("{identifier}", "").format(class_noun=class_noun).split())


@cache
def _parsed() -> tuple[dict[str, BenchSubject], list[str], list[str]]:
    text = DATA.read_text(encoding="utf-8")
    classes, _, prompts = text.partition("Prompts")
    subjects = {}
    for line in classes.splitlines():
        name, sep, noun = line.strip().partition(",")
        if sep and name != "subject_name":
            subjects[name] = BenchSubject(name, noun, name in LIVE_SUBJECTS)
    objects, _, live = prompts.partition("Live Subject Prompts")

    def templates(block: str) -> list[str]:
        return [t.replace("{0}", "{identifier}").replace("{1}", "{class_noun}")
                for t in re.findall(r"'([^']*)'\.format\(unique_token, class_token\)", block)]

    return subjects, templates(objects), templates(live)


def subjects() -> dict[str, BenchSubject]:
    return dict(_parsed()[0])


def prompt_cases(live: bool) -> list[PromptCase]:
    """The 25 prompts for a live subject or an object, with their categories."""
    _, objects, live_templates = _parsed()
    templates, categories = (live_templates, LIVE_CATEGORIES) if live else (objects, OBJECT_CATEGORIES)
    labels = [name for name, count in categories for _ in range(count)]
    if len(labels) != len(templates):
        raise RuntimeError(f"{DATA} holds {len(templates)} prompts where {len(labels)} were expected")
    return [PromptCase(t, c) for t, c in zip(templates, labels)]


def class_prompt(class_noun: str) -> str:
    """The bare class prompt whose samples PRES compares with the subject."""
    return f"a {class_noun}"
