"""`dreambooth evaluate`: sample the protocol's prompts with fixed seeds (or read images already sampled), score them,
and write report.json, report.md and a grid per prompt.

Image layout, written here and read back by --images_dir: `images/NN/II.png` for prompt NN of the protocol (image
II), and `images/class/II.png` for the bare class prompt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from PIL import Image

from .. import schema
from ..data import derive_seed, open_rgb, scan_folder
from ..errors import ConfigError, DataError
from ..families.help import family_help, option_default
from ..files import save_image_atomic, write_text_atomic
from ..identifier import class_noun_after, infer_identifier
from ..outputs import OutputFolder
from ..sampling import sampler_names
from ..schema import at_least, option
from .backbones import CLIP_DEFAULT, DINO_DEFAULT
from .backends import BACKENDS, Backend, Case, Subject
from .report import build_report, write_report

log = logging.getLogger("dreambooth")
CLASS_FOLDER = "class"


@dataclasses.dataclass
class EvaluateConfig:
    backend: str = option("dreambench", "dreambench: the paper's metrics; toy: the toy world's judges (offline)",
                          choices=lambda: list(BACKENDS))
    model: str | None = option(None, "Trained output folder, checkpoint-N folder or pipeline to sample", group="input")
    images_dir: Path | None = option(None, "Images already sampled, in the layout this command writes "
                                     "(NN/*.png per prompt, class/*.png); instead of --model", group="input")
    real_images: Path | None = option(None, "The subject's real images (dreambench: required)", group="input")
    subject: str | None = option(None, "A DreamBench subject name (sets class noun and prompt list), or the toy "
                                 "subject (toy backend)", group="subject")
    class_noun: str | None = option(None, "Class noun (default: from --subject or the model's training config); "
                                    "toy: the noun the model was trained with, \"\" for none", group="subject")
    identifier: str | None = option(None, "Identifier [V] (default: from the model's training config)",
                                    group="subject")
    live: bool | None = option(None, "Use the live-subject prompts (default: from --subject, else objects)",
                               group="subject")
    images_per_prompt: int | None = option(None, "Images per prompt (default: dreambench 4, toy 16)",
                                           check=at_least(2), group="sampling")
    class_images: int | None = option(None, "Images of the bare class prompt for PRES (default: dreambench 16, toy "
                                      "32)", check=at_least(1), group="sampling")
    seed: int = option(0, "Image i of every prompt uses a seed derived from (seed, i)", group="sampling")
    sampler: str | None = option(None, "Sampler (default: the backend's, else the model family's)",
                                 choices=sampler_names,
                                 group="sampling")
    num_inference_steps: int | None = option(None, "Sampler steps (default: the backend's)", check=at_least(1),
                                             group="sampling")
    guidance_scale: float | None = option(None, "Guidance scale (default: the backend's)", check=at_least(0),
                                          group="sampling")
    negative_prompt: str | None = option(None, "Negative prompt", group="sampling")
    resolution: int | None = option(None, "Image size to sample (default: the pipeline's; `train --eval`: the "
                                    "training resolution)", check=at_least(8), group="sampling")
    max_sequence_length: int | None = option(None, family_help(
        "T5 tokens per prompt, at most 512 (default: as the model was trained, else the backend's, else the "
        "family's: {})", option_default("max_sequence_length")), check=at_least(1), group="sampling")
    batch_size: int = option(8, "Images per forward pass", check=at_least(1), group="sampling")
    precision: str = option("auto", "Sampling precision: auto = fp16 on GPU, fp32 on CPU",
                            choices=("auto", "fp32", "fp16", "bf16"), group="sampling")
    device: str = option("auto", "Device for sampling and the metric backbones", choices=("auto", "cpu", "cuda", "mps"),
                         group="sampling")
    clip_model: str = option(CLIP_DEFAULT, "CLIP backbone for CLIP-I and CLIP-T: folder or hub id", group="metrics")
    clip_revision: str | None = option(None, "Hub revision of the CLIP backbone", group="metrics")
    dino_model: str = option(DINO_DEFAULT, "DINO backbone for DINO and PRES: folder or hub id", group="metrics")
    dino_revision: str | None = option(None, f"Hub revision of the DINO backbone (default for {DINO_DEFAULT}: "
                                       "refs/pr/1, where its safetensors weights are)", group="metrics")
    lpips_weights: Path | None = option(None, "AlexNet LPIPS weights (.safetensors file or folder) for DIV; DIV is "
                                        "skipped without them", group="metrics")
    bootstrap_resamples: int = option(2000, "Bootstrap resamples for the 95% intervals", check=at_least(100),
                                      group="metrics")
    output_dir: Path = option(Path("evaluation"), "Where images, grids and the report go")

    def check(self) -> None:
        if (self.model is None) == (self.images_dir is None):
            raise ConfigError("model", self.model, "pass exactly one of --model (sample it) or --images_dir "
                                                   "(images already sampled)")
        BACKENDS[self.backend].check_subject(self.subject)


def evaluate(config: EvaluateConfig | dict | str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Score a model (or its images) on the DreamBench protocol, or a toy subject on the toy protocol.

    Args:
        config: an EvaluateConfig, a dict of its fields, or the path of a TOML/YAML/JSON config file.
        **overrides: fields that replace those of `config`.

    Returns:
        The report, as also written to output_dir/report.json.
    """
    from ..generation import check_sequence_length, model_inputs
    from ..quiet import quiet_libraries

    cfg = schema.build(EvaluateConfig, {**schema.values_of(config, EvaluateConfig), **overrides})
    quiet_libraries()
    started = time.time()
    if cfg.model is not None:
        check_sequence_length(str(cfg.model), cfg.max_sequence_length)
    inputs = {"--images_dir": cfg.images_dir, "--real_images": cfg.real_images, "--lpips_weights": cfg.lpips_weights}
    models = {**model_inputs(cfg.model), "--clip_model": cfg.clip_model, "--dino_model": cfg.dino_model}
    with OutputFolder(cfg.output_dir, "evaluate", inputs, models) as out:  # an earlier evaluation's files are replaced
        return _evaluate(cfg, out, started)


def _evaluate(cfg: EvaluateConfig, out: OutputFolder, started: float) -> dict[str, Any]:
    # what is evaluated
    subject = resolve_subject(cfg)
    real = load_real(cfg)
    backend = make_backend(cfg, real)
    cases = backend.cases(subject)
    n = cfg.images_per_prompt or backend.images_per_prompt
    sampler, family = None, None
    if cfg.model is not None:
        from ..families import family_of
        from ..generation import open_pipeline, sampling_options

        sampler = open_pipeline(str(cfg.model), cfg.sampler, cfg.precision, cfg.device)
        family = family_of(sampler[0])
    defaults = backend.sampling_for(family.name if family else None)
    sampling = {k: getattr(cfg, k) if getattr(cfg, k) is not None else v for k, v in defaults.items()}
    if family is not None:  # the backend's (or the family's) sampler and guidance, now that the family is known
        from ..sampling import family_sampler

        sampling["sampler"], sampler[0].scheduler = family_sampler(family, sampling["sampler"],
                                                                   sampler[0].scheduler.config)
        if sampling["guidance_scale"] is None:
            sampling["guidance_scale"] = family.default_guidance
        options = sampling_options(str(cfg.model), cfg.max_sequence_length, sampling.get("max_sequence_length"))
        sampling.pop("max_sequence_length", None)  # recorded below only where the family reads it
        sampling.update(family.pipeline_kwargs(options))  # e.g. SD3's T5 length: as the model was trained
    out.claim()  # every input loaded
    log.info("evaluating %r (%s, identifier %r) on %d %s prompts", subject.name or subject.class_noun,
             subject.class_noun, subject.identifier, len(cases), backend.name)

    # images: sampled here, or read from an earlier run
    class_prompt = backend.class_prompt(subject)
    if cfg.model is not None:
        n_class = cfg.class_images or backend.class_images
        image_root = out.entry("images")
        images, class_imgs = sample_all(cfg, sampler, cases, (class_prompt, n_class), n, sampling, image_root)
    else:
        images, class_imgs = read_images(Path(cfg.images_dir), [c.prompt for c in cases])
        image_root = Path(cfg.images_dir)

    # scores
    scores = [backend.score(case, imgs) for case, imgs in zip(cases, images)]
    class_scores = backend.score_class(class_imgs) if class_imgs else {}

    # report
    report = build_report(cfg, backend, subject, cases, scores, class_prompt, class_scores, sampling,
                          {"images": [len(i) for i in images], "class": len(class_imgs)})
    report["image_root"] = str(image_root)
    report["wall_time_s"] = round(time.time() - started, 1)
    write_report(out, report, cases, images, real)
    log.info("wrote %s and %s", out.path / "report.json", out.path / "report.md")
    return report


def for_training(train_cfg: Any) -> EvaluateConfig:
    """The evaluation `dreambooth train --eval` runs: the trained output, the instance images as the real images,
    the run's identifier and class noun; --eval_config's options on top."""
    values = schema.load_file(train_cfg.eval_config) if train_cfg.eval_config else {}
    identifier = train_cfg.identifier or infer_identifier(train_cfg.instance_prompt, train_cfg.class_prompt)
    if identifier is None:
        raise ConfigError("identifier", None, "required with --eval when it cannot be inferred from the prompts")
    noun = class_noun_after(train_cfg.instance_prompt, identifier)
    defaults = {"real_images": train_cfg.instance_data_dir, "identifier": identifier, "seed": train_cfg.seed or 0,
                "resolution": train_cfg.resolution,
                "output_dir": Path(train_cfg.output_dir) / "evaluation"} | ({"class_noun": noun} if noun else {})
    for fixed in ("model", "images_dir"):
        if fixed in values:
            raise ConfigError(fixed, values[fixed], "set by --eval (the trained output); remove it from --eval_config")
    return schema.build(EvaluateConfig, {**defaults, **values, "model": str(train_cfg.output_dir)})


def resolve_subject(cfg: EvaluateConfig) -> Subject:
    """Class noun, identifier and prompt list from the flags, the protocol and the model's training config."""
    from ..generation import trained_config

    trained = trained_config(cfg.model) if cfg.model else {}
    identifier = cfg.identifier or trained.get("identifier")
    prompt = trained.get("instance_prompt")
    if identifier is None and prompt:
        identifier = infer_identifier(prompt, trained.get("class_prompt"))
    if not identifier:
        raise ConfigError("identifier", None, "required: the [V] word the model was trained with (it could not be "
                          "read from the model's train_config.json)")
    return BACKENDS[cfg.backend].subject(cfg, identifier, prompt)


def load_real(cfg: EvaluateConfig) -> list[Image.Image]:
    if cfg.real_images is None:
        return BACKENDS[cfg.backend].default_real(cfg)
    folder = scan_folder(Path(cfg.real_images), "real-image")
    if not folder.images:
        raise DataError(f"--real_images {cfg.real_images} holds no images; pass the folder of the subject's photos")
    return [open_rgb(p) for p in folder.images]


def make_backend(cfg: EvaluateConfig, real: list[Image.Image]) -> Backend:
    return BACKENDS[cfg.backend].create(cfg, real)


def sample_all(cfg: EvaluateConfig, sampler: tuple[Any, Any], cases: list[Case], class_job: tuple[str, int], n: int,
               sampling: dict[str, Any], folder: Path) -> tuple[list[list[Image.Image]], list[Image.Image]]:
    """Every prompt's n images and the class prompt's images, with fixed seeds, from `sampler` (a pipeline and its
    device); written as they come."""
    from tqdm.auto import tqdm

    from ..generation import render

    pipe, device = sampler
    extra = {k: v for k, v in sampling.items() if k not in ("sampler", "num_inference_steps", "guidance_scale")}
    size = {"height": cfg.resolution, "width": cfg.resolution} if cfg.resolution else {}  # else the pipeline's
    kwargs = {"num_inference_steps": sampling["num_inference_steps"], "guidance_scale": sampling["guidance_scale"],
              "negative_prompt": cfg.negative_prompt, **size,
              **extra}  # the family's pipeline arguments, resolved in _evaluate (e.g. SD3's T5 length)
    jobs = [(f"{i:02d}", c.prompt, n) for i, c in enumerate(cases)]
    jobs.append((CLASS_FOLDER, *class_job))
    results = {}
    for name, prompt, count in tqdm(jobs, desc="sampling", unit="prompt", disable=None):
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        imgs = render(pipe, prompt, [derive_seed(cfg.seed, i) for i in range(count)], cfg.batch_size, device,
                      **kwargs)
        for i, img in enumerate(imgs):
            save_image_atomic(img, target / f"{i:02d}.png")
        results[name] = imgs
    write_text_atomic(folder / "prompts.json", json.dumps(
        {name: prompt for name, prompt, _ in jobs}, indent=2) + "\n")
    return [results[f"{i:02d}"] for i in range(len(cases))], results[CLASS_FOLDER]


def read_images(folder: Path, prompts: list[str]) -> tuple[list[list[Image.Image]], list[Image.Image]]:
    """Images in the layout `sample_all` writes; a missing prompt folder, or images sampled for other prompts (per
    the folder's prompts.json, when there is one), is named in one line."""
    if not folder.is_dir():
        raise DataError(f"--images_dir {folder} is not a folder; pass the `images` folder an earlier "
                        "`dreambooth evaluate --model ...` wrote")
    n_cases = len(prompts)
    recorded = json.loads((folder / "prompts.json").read_text()) if (folder / "prompts.json").is_file() else {}
    for i, prompt in enumerate(prompts):
        if recorded.get(f"{i:02d}", prompt) != prompt:
            raise DataError(f"{folder / f'{i:02d}'} was sampled for {recorded[f'{i:02d}']!r}, not {prompt!r}; pass "
                            "the --subject/--class_noun/--identifier/--backend those images were made for")

    def load(sub: Path) -> list[Image.Image]:
        return [Image.open(p).convert("RGB") for p in sorted(sub.glob("*.png")) + sorted(sub.glob("*.jpg"))]

    images = []
    for i in range(n_cases):
        imgs = load(folder / f"{i:02d}") if (folder / f"{i:02d}").is_dir() else []
        if len(imgs) < 2:
            raise DataError(f"{folder / f'{i:02d}'} holds {len(imgs)} image(s) for prompt {i}; each of the "
                            f"{n_cases} prompt folders 00..{n_cases - 1:02d} needs 2 or more")
        images.append(imgs)
    class_imgs = load(folder / CLASS_FOLDER) if (folder / CLASS_FOLDER).is_dir() else []
    return images, class_imgs


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The overall metrics, one per line, for the terminal."""
    lines = []
    for name, m in report["metrics"].items():
        lo, hi = m["ci95"]
        arrow = "higher is better" if m["better"] == "higher" else "lower is better"
        lines.append(f"{name:<8} {m['value']:.3f}  [{lo:.3f}, {hi:.3f}]  ({arrow}; {m['units']} {m['unit']}s)")
    return lines

