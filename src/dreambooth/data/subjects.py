"""The subjects of a run: the first (--instance_data_dir, --instance_prompt) and those `subjects` adds, each with its
photos, prompt, identifier and, with prior preservation, its class.

Several subjects train as one stream: their photos are joined in subject order (each photo keeps its subject's
prompt and --repeats), and a class example comes from the class images of its instance example's subject. Classes are
numbered by first appearance, so a one-subject run is class 0 with the prompt ids it always had.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..identifier import infer_identifier
from .images import ImageFolder


@dataclass(frozen=True)
class TrainedSubject:
    folder: Path
    prompt: str
    identifier: str | None  # given, or inferred from the prompts (None: not inferable)
    class_prompt: str | None
    class_data_dir: Path | None
    repeats: int
    flag: str  # how the user names its folder: --instance_data_dir, subjects[0].instance_data_dir, ...

    @property
    def prompt_flag(self) -> str:
        """How the user names its prompt: --instance_prompt, subjects[0].instance_prompt, ..."""
        return self.flag.replace("instance_data_dir", "instance_prompt")


def subjects_of(cfg: Any) -> list[TrainedSubject]:
    """The run's subjects, first to last, their defaults filled in from the first subject's options."""
    first = TrainedSubject(Path(cfg.instance_data_dir), cfg.instance_prompt,
                           cfg.identifier or infer_identifier(cfg.instance_prompt, cfg.class_prompt),
                           cfg.class_prompt, cfg.class_data_dir, cfg.repeats, "--instance_data_dir")
    out = [first]
    for i, s in enumerate(cfg.subjects):
        class_prompt = (s.class_prompt or cfg.class_prompt) if cfg.with_prior_preservation else None
        folder = s.class_data_dir if s.class_data_dir is not None else (
            cfg.class_data_dir if class_prompt == cfg.class_prompt else None)
        out.append(TrainedSubject(Path(s.instance_data_dir), s.instance_prompt,
                                  s.identifier or infer_identifier(s.instance_prompt, class_prompt), class_prompt,
                                  folder if cfg.with_prior_preservation else None, s.repeats or cfg.repeats,
                                  f"subjects[{i}].instance_data_dir"))
    return out


@dataclass(frozen=True)
class ClassOf:
    """The run's classes (one per distinct class prompt, in order of first appearance) and each subject's."""

    prompts: list[str | None]
    folders: list[Path | None]
    of_subject: list[int]


def classes_of(subjects: list[TrainedSubject]) -> ClassOf:
    prompts: list[str | None] = []
    folders: list[Path | None] = []
    of_subject = []
    for s in subjects:
        if s.class_prompt not in prompts:
            prompts.append(s.class_prompt)
            folders.append(s.class_data_dir)
        of_subject.append(prompts.index(s.class_prompt))
    return ClassOf(prompts, folders, of_subject)


@dataclass
class Joined:
    """The photos of every subject as one folder (`images`), and which subject each photo is of."""

    images: ImageFolder
    subject_of: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, folders: list[ImageFolder]) -> Joined:
        if len(folders) == 1:
            return cls(folders[0], [0] * len(folders[0].images))
        joined = ImageFolder(images=[p for f in folders for p in f.images],
                             skipped=[p for f in folders for p in f.skipped],
                             small=[p for f in folders for p in f.small],
                             sizes=[s for f in folders for s in f.sizes])
        if any(f.captions is not None for f in folders):
            joined.captions = [c for f in folders for c in (f.captions or [None] * len(f.images))]
        return cls(joined, [k for k, f in enumerate(folders) for _ in f.images])
