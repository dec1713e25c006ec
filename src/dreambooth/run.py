"""Everything decided before any model loads: input checks, the output folder's owner, resume, the Accelerator."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed

from . import schema
from .checkpoint import checkpoint_config, checkpoint_identity, find_checkpoint, list_checkpoints
from .config import FULL_LEARNING_RATE, TrainConfig
from .data import ImageFolder, scan_folder
from .data.annotations import check_mask_crops, open_mask, read_captions
from .data.buckets import Groups, bucket_counts, bucket_for
from .data.buckets import parse as parse_buckets
from .data.subjects import ClassOf, Joined, TrainedSubject, classes_of, subjects_of
from .errors import CheckpointError, DataError, DreamBoothError, Stopped, first_line
from .events import EVENTS_FILE, EventFile, Events
from .families import ModelFamily, ModelSource, get_family
from .files import write_text_atomic
from .outputs import OutputFolder, check_class_folder
from .processes import Peers, decided_once

log = logging.getLogger("dreambooth")

CONFIG_FILE = "train_config.json"
SUMMARY_FILE = "run_summary.json"  # written last: its presence marks a finished run
# Settings that define what a run learns; an output folder belongs to one combination of them.
IDENTITY = (
    "pretrained_model_name_or_path", "revision", "variant", "instance_data_dir", "instance_prompt", "class_prompt",
    "with_prior_preservation", "train_text_encoder", "resolution", "use_lora", "pretrained_vae_model_name_or_path",
    "prior_target", "caption_extension", "masked_loss", "adapter", "use_aspect_ratio_buckets", "aspect_ratio_buckets",
    "subjects",
)
SUBJECT_IDENTITY = ("instance_data_dir", "instance_prompt", "class_prompt")  # what defines each further subject
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # what an older record's missing key meant
LOCAL_PATHS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "instance_data_dir")


class Signalled(BaseException):  # noqa: N818 (it carries the error, as KeyboardInterrupt does)
    """What the SIGTERM handler raises wherever the main thread is: not an Exception, so that no library's `except
    Exception` (a model loader turning any error into "the weights are damaged") can swallow or rename it; `train`
    turns it back into the error it carries (`Stopped`, `PeerFailed`)."""

    def __init__(self, error: DreamBoothError):
        super().__init__(str(error))
        self.error = error


class StopRequests:
    """SIGTERM (what the UI's stop button sends) for the whole run. Before training begins (loading models, making
    class images) it stops the run at once (`Stopped`: nothing to resume yet); while the loop runs it asks for a
    checkpoint and a stop at the end of the current step, and a second one changes nothing (the first one's save is
    never interrupted); after the loop (saving the result) it acts as SIGTERM does by default. Ctrl-C still
    interrupts at once. Several processes agree to stop at a step where they all report (a logging step), so that
    each saves its part of the same checkpoint. With several processes, a SIGTERM that comes because another
    process died (the launcher's tear-down, or `Peers`' own) ends this one with the one line that says so."""

    BEFORE, LOOP, AFTER = "before", "loop", "after"

    def __init__(self, peers: Peers | None = None) -> None:
        self.requested = threading.Event()
        self.previous: Any = None
        self.phase = self.BEFORE
        self.peers = peers

    def listen(self) -> None:
        """The loop starts: from now on SIGTERM asks for a checkpointed stop."""
        self.phase = self.LOOP

    def _on_signal(self, signum: int, frame: Any) -> None:
        watching = self.peers is not None and not self.peers.closed  # (closed: the others' part is done)
        if watching and self.peers.raised:
            return  # ending already, because another process did
        if watching and self.peers.ended():
            raise Signalled(self.peers.error())
        if self.phase == self.BEFORE:
            raise Signalled(Stopped("stopped on request before training began; nothing was trained, so there is "
                                    "nothing to resume: start the run again"))
        if self.phase == self.AFTER:
            self.restore()
            signal.raise_signal(signum)
        elif self.requested.is_set():
            log.warning("a stop was asked for already: the run stops once its checkpoint is saved")
        else:
            self.requested.set()

    def close(self) -> None:
        """The loop is over: SIGTERM acts as by default again."""
        self.phase = self.AFTER

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self.previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()  # whatever ended the run, the process's own handler comes back
        if self.peers is not None:
            self.peers.close()
            if self.peers.raised and threading.current_thread() is threading.main_thread():
                # ending because another process did: the launcher's SIGTERM must not cut off the line that says so
                signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def agreed(self, acc: Accelerator, reported: bool) -> bool:
        """Whether every process stops now."""
        if acc.num_processes == 1:
            return self.requested.is_set()
        if not reported:
            return False
        flag = torch.tensor([float(self.requested.is_set())], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)


@dataclass
class Run:
    cfg: TrainConfig
    accelerator: Accelerator
    source: ModelSource
    family: ModelFamily
    instance: ImageFolder
    resume_from: Path | None
    output: OutputFolder  # locked by the main process; claimed once the models have loaded
    peers: Peers | None = None  # the other processes, watched (several processes only)
    started: float = field(default_factory=time.time)
    events: Events = field(default_factory=Events)  # progress; written to events.jsonl once the folder is claimed
    stop: StopRequests = field(default_factory=StopRequests)  # SIGTERM's meaning while the run goes on
    subjects: list[TrainedSubject] = field(default_factory=list)  # the first, then those `subjects` adds
    subject_of: list[int] = field(default_factory=list)  # each instance image's subject

    @functools.cached_property
    def classes(self) -> ClassOf:
        """The classes of the subjects (worked out once: the subjects are set when the run is made)."""
        return classes_of(self.subjects)

    def __post_init__(self) -> None:
        self.stop.peers = self.peers
        if not self.subjects:  # (a Run made without them: the config's)
            self.subjects = subjects_of(self.cfg)
            self.subject_of = [0] * len(self.instance.images)

    def claim(self) -> None:
        """The models loaded: the output folder becomes this run's (record, train_config.json, events.jsonl)."""
        if self.accelerator.is_main_process:
            self.output.claim(identity=identity(schema.to_dict(self.cfg)))
            write_text_atomic(Path(self.cfg.output_dir) / CONFIG_FILE,
                              json.dumps(schema.to_dict(self.cfg), indent=2))
            self.events.add(EventFile(self.output.entry(EVENTS_FILE), append=self.resume_from is not None))

    def kept(self) -> str:
        """What survives a failure now (for one-line errors)."""
        if not self.output.claimed and self.accelerator.is_main_process:  # (the main process claims for all)
            return "nothing was written"
        found = list_checkpoints(Path(self.cfg.output_dir))
        if found:
            return (f"{found[-1].name} (the newest complete checkpoint) is kept; continue with "
                    "--resume_from_checkpoint latest")
        return f"no checkpoint was complete yet; {self.cfg.output_dir} keeps only what was written before"


def identity(values: dict) -> dict:
    """The IDENTITY settings, local paths resolved (so `sd` and `/abs/sd` are one model); a setting a record from
    an older version lacks is that version's behaviour, the default."""
    out = {k: values.get(k, DEFAULTS[k]) for k in IDENTITY}
    out["subjects"] = [{k: s.get(k) for k in SUBJECT_IDENTITY} | {
        "instance_data_dir": str(Path(s["instance_data_dir"]).expanduser().resolve())} for s in out["subjects"] or []]
    for key in LOCAL_PATHS:
        if out[key] is not None and (key == "instance_data_dir" or Path(out[key]).expanduser().exists()):
            out[key] = str(Path(out[key]).expanduser().resolve())
    return out


def _read_identity(config_file: Path) -> dict:
    try:
        return identity(json.loads(config_file.read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _differences(a: dict, b: dict, keys) -> list[str]:
    """The settings that differ; one a record lacks (written before the setting existed) is its default."""
    a, b = ({k: d.get(k, DEFAULTS.get(k)) for k in keys} for d in (a, b))
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in keys if a[k] != b[k]]


def resolve_resume(cfg: TrainConfig, output: OutputFolder) -> tuple[Path | None, int | None]:
    """Which checkpoint to resume from, and the seed it ran with (the run keeps it when --seed is not given);
    refuse to mix two runs in one output folder or to replace a finished one."""
    out = Path(cfg.output_dir)
    mine = identity(schema.to_dict(cfg))
    checkpoints = list_checkpoints(out)
    finished = (out / SUMMARY_FILE).is_file()
    if output.ours:
        recorded = output.record.get("identity")
        owner = recorded if isinstance(recorded, dict) else _read_identity(out / CONFIG_FILE)
        diff = _differences(owner, mine, IDENTITY)
        if diff and (checkpoints or finished):
            raise CheckpointError(f"output dir {out} belongs to another run ({'; '.join(diff)}); "
                                  "choose a new --output_dir")
        if diff:  # an earlier run stopped before its first checkpoint: nothing of value is there
            log.warning("output dir %s holds an unfinished run without checkpoints (%s); it is replaced", out,
                        "; ".join(diff))
    if cfg.resume_from_checkpoint is None:
        if checkpoints:
            raise CheckpointError(f"output dir {out} already holds checkpoints ({checkpoints[-1].name} is the "
                                  "latest); pass --resume_from_checkpoint latest to continue that run, or choose a "
                                  "new --output_dir")
        if finished:
            raise CheckpointError(f"output dir {out} holds a finished run, which is not replaced; choose a new "
                                  "--output_dir (or delete the folder)")
        return None, None
    ckpt = find_checkpoint(out, cfg.resume_from_checkpoint)
    if ckpt is None:
        if finished:
            raise CheckpointError(f"output dir {out} holds a finished run without checkpoints, so there is nothing "
                                  "to resume and it is not replaced; choose a new --output_dir")
        log.info("no checkpoint in %s yet: starting a new run", out)
        return None, None
    previous = checkpoint_config(ckpt)
    saved = checkpoint_identity(ckpt)  # resolved when it was saved: the same run from any working directory
    diff = _differences(saved if saved is not None else identity(previous), mine, IDENTITY)
    if diff:
        raise CheckpointError(f"checkpoint {ckpt} is from another run ({'; '.join(diff)}); resume with the same "
                              "settings or choose a new --output_dir")
    seed = previous["seed"] if cfg.seed is None else cfg.seed
    now = json.loads(json.dumps({**schema.to_dict(cfg), "seed": seed}))  # as train_config.json holds it
    skip = {"resume_from_checkpoint", "device"}
    changed = _differences(previous, now, [k for k in previous if k not in IDENTITY and k not in skip])
    if changed:
        log.warning("resuming %s with changed settings: %s", ckpt.name, "; ".join(changed))
    return ckpt, seed


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise DreamBoothError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if cfg.mixed_precision == "fp16" and not cuda:
        raise DreamBoothError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
    if cfg.use_8bit_adam and not cuda:
        raise DreamBoothError("--use_8bit_adam needs a CUDA GPU (bitsandbytes); drop the flag on CPU")
    if cfg.quantize_base != "none" and not cuda:
        raise DreamBoothError(f"--quantize_base {cfg.quantize_base} needs a CUDA GPU (bitsandbytes); use "
                              "--quantize_base none on CPU")
    trackers = None if cfg.report_to == "none" else cfg.report_to
    project = ProjectConfiguration(project_dir=str(cfg.output_dir),
                                   logging_dir=str(Path(cfg.output_dir) / cfg.logging_dir))
    # accelerate keeps one AcceleratorState per Python process; a second train() call may want other settings
    AcceleratorState._reset_state()
    # accelerate only starts CPU (gloo) process groups when told to run on CPU
    on_cpu = cfg.device == "cpu" or (not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    # every collective waits --ddp_timeout at most (gloo and NCCL), not torch's 30 minutes
    bounded = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))
    try:
        accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                  mixed_precision=cfg.mixed_precision, log_with=trackers, project_config=project,
                                  cpu=on_cpu, kwargs_handlers=[bounded])
    except (ValueError, ImportError) as e:
        raise DreamBoothError(f"cannot set up the run: {first_line(e, 300)}") from None
    if cfg.allow_tf32 and cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


@contextmanager
def determinism(enabled: bool) -> Iterator[None]:
    """--deterministic: deterministic kernels for the run (strict: an op without one fails loudly rather than
    silently breaking bit-identity), no cuDNN autotuning; the process's previous settings come back afterwards."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    # torch < 2.10 refuses deterministic cuBLAS without it; it is read when cuBLAS handles are made, so a process
    # that used cuBLAS before keeps its workspaces (deterministic per handle and stream in torch >= 2.10)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def assign_buckets(cfg: TrainConfig, family: ModelFamily, sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each photo's aspect-ratio bucket (height, width), and the counts logged."""
    explicit = parse_buckets(cfg.aspect_ratio_buckets, family.resolution_multiple) if cfg.aspect_ratio_buckets \
        else None
    buckets = [bucket_for(w, h, cfg.resolution, family.resolution_multiple, explicit) for w, h in sizes]
    log.info("aspect-ratio buckets (width x height: photos): %s",
             ", ".join(f"{w}x{h}: {n}" for (h, w), n in bucket_counts(buckets)))
    return buckets


def setup(cfg: TrainConfig) -> Run:
    """All checks that need no model weights, then the Accelerator, the output folder's lock and the seed."""
    source = ModelSource(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant, cfg.tokenizer_name,
                         cfg.pretrained_vae_model_name_or_path)
    family = get_family(source, cfg.family)
    cfg.check_family(family)
    cfg = schema.derive(cfg, **family_defaults(cfg, family))
    subjects = subjects_of(cfg)
    joined = Joined.of([instance_folder(cfg, s) for s in subjects])
    instance = joined.images
    if len(subjects) > 1:
        log.info("%d subjects: %s", len(subjects), "; ".join(
            f"{s.identifier} ({n} photos)" for s, n in zip(subjects, map(joined.subject_of.count, range(
                len(subjects))))))
    if cfg.buckets:
        instance.buckets = assign_buckets(cfg, family, instance.sizes)
    if cfg.masked_loss:
        instance.masks = [open_mask(p) for p in instance.images]
        check_mask_crops(instance.images, instance.masks, instance.buckets or [cfg.resolution] * len(instance.images),
                         cfg.center_crop)
    classes = classes_of(subjects)
    for folder in classes.folders:
        if folder is not None and Path(folder).is_file():
            raise DataError(f"class folder {folder} is a file; pass a folder (it is created if missing)")
        if cfg.with_prior_preservation and folder is not None:
            for subject in subjects:
                check_class_folder(folder, subject.folder, {
                    "base model": cfg.pretrained_model_name_or_path, "VAE": cfg.pretrained_vae_model_name_or_path})
    output = OutputFolder(
        cfg.output_dir, "train",
        inputs={"--instance_data_dir": cfg.instance_data_dir, "--class_data_dir": cfg.class_data_dir,
                "--eval_config": cfg.eval_config,
                **{s.flag: s.folder for s in subjects[1:]},
                **{f"subjects[{i}].class_data_dir": s.class_data_dir for i, s in enumerate(cfg.subjects)}},
        models={"base model (--pretrained_model_name_or_path)": cfg.pretrained_model_name_or_path,
                "VAE (--pretrained_vae_model_name_or_path)": cfg.pretrained_vae_model_name_or_path,
                "tokenizer (--tokenizer_name)": cfg.tokenizer_name})
    output.check()  # fails fast, before the Accelerator; checked again under the folder's lock
    accelerator = make_accelerator(cfg)
    if instance.buckets is not None:  # a bucket smaller than a batch fails now, not after the models load
        Groups(instance.buckets, cfg.train_batch_size * accelerator.num_processes, cfg.seed or 0,
               [subjects[s].repeats for s in joined.subject_of], cfg.allow_small_buckets)
    resume_from, seed = _open_on_main(cfg, output, accelerator)
    cfg = schema.derive(cfg, seed=seed)  # what train_config.json records: the seed a resumed run keeps
    try:
        set_seed(cfg.seed)
        peers = Peers(accelerator) if accelerator.num_processes > 1 else None
        run = Run(cfg, accelerator, source, family, instance, resume_from, output, peers, subjects=subjects,
                  subject_of=joined.subject_of)
    except BaseException:
        output.close()
        raise
    output.kept = run.kept  # a file-system error names what survives
    if peers is not None:
        peers.kept = run.kept
    return run


def instance_folder(cfg: TrainConfig, subject: TrainedSubject) -> ImageFolder:
    """One subject's photos (and, with --caption_extension, their captions, each checked to name the subject)."""
    companions = (cfg.caption_extension,) if cfg.caption_extension else ()
    found = scan_folder(subject.folder, "instance", cfg.resolution, companions=companions)
    if not found.images:
        raise DataError(f"instance folder {subject.folder} holds no images; add 3-5 photos of the subject "
                        "(.jpg, .png, .webp, ...)")
    if cfg.caption_extension:
        if subject.identifier is None:  # a caption could not be checked for naming the subject
            raise DataError("--caption_extension needs the subject's identifier to check that each caption names "
                            "the subject; pass --identifier (the rare word of --instance_prompt)")
        found.captions = read_captions(found.images, cfg.caption_extension, subject.identifier)
        log.info("%d of %d instance images in %s have a caption (%s files); the others use its prompt",
                 sum(c is not None for c in found.captions), len(found.images), subject.folder,
                 cfg.caption_extension)
    return found


def family_defaults(cfg: TrainConfig, family: ModelFamily) -> dict[str, Any]:
    """The options left unset whose defaults depend on the model's family (and the method), as the reference
    scripts set them: resolution, learning rate, the text encoders' rate and weight decay."""
    derived: dict[str, Any] = {}
    if cfg.adapters and not cfg.use_lora:  # --adapter lokr / loha: adapters train (what --use_lora means)
        derived["use_lora"] = True
    if cfg.resolution is None:
        derived["resolution"] = family.default_resolution
    if cfg.learning_rate is None:  # the method's (and with LoRA the family's), as the reference scripts
        derived["learning_rate"] = (1.0 if cfg.optimizer == "prodigy" else family.lora_learning_rate
                                    if cfg.adapters else FULL_LEARNING_RATE)
    if cfg.train_text_encoder and cfg.optimizer != "prodigy":  # Prodigy: one step size, its own
        if cfg.text_encoder_lr is None:
            derived["text_encoder_lr"] = family.text_encoder_learning_rate
        if cfg.adam_weight_decay_text_encoder is None:
            derived["adam_weight_decay_text_encoder"] = family.text_encoder_weight_decay
    return derived


def _open_on_main(cfg: TrainConfig, output: OutputFolder, accelerator: Accelerator
                  ) -> tuple[Path | None, int]:
    """The main process locks the folder and decides whether and where the run resumes; the others share its
    outcome and its seed (a refusal stops them all, in one line each)."""

    def decide() -> dict[str, Any]:
        try:
            output.open()
            resume_from, seed = resolve_resume(cfg, output)
        except BaseException:
            output.close()  # the lock, and the folder if this run made it
            raise
        if seed is None:
            seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31)
        return {"resume_from": None if resume_from is None else str(resume_from), "seed": seed}

    decided = decided_once(accelerator, decide)
    if not accelerator.is_main_process:
        output.attach()
    return None if decided["resume_from"] is None else Path(decided["resume_from"]), decided["seed"]

