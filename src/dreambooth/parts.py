"""What the training loop trains, built in named steps from a `Run`: the base model's parts and the class images,
the prompts encoded once, the trained modules placed (LoRA or full, precision, devices), the keyed dataset, the
optimizer and schedule, and a checkpoint's state restored when resuming."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.optimization import get_scheduler

from . import schema
from .base_model import BaseModel
from .checkpoint import CheckpointWriter, load_checkpoint
from .compilation import compile_blocks
from .config import TrainConfig
from .data import DreamBoothDataset
from .data.buckets import nearest
from .data.dataset import CLASS_PROMPT, INSTANCE_PROMPT
from .data.images import upright_size
from .devices import cast_as_loaded, park, reduced_dtype
from .ema import Ema
from .families import Components, ModelFamily
from .identifier import check_prompts_name_identifier, warn_about_identifier
from .latent_cache import LatentCache
from .lora import add_adapters, lora_targets, quantization
from .objectives import OBJECTIVES, Objective
from .optimizer import make_optimizer, trainable
from .prior import ClassImages, ensure_class_images
from .run import Run
from .sharding import Sharding, check_processes

log = logging.getLogger("dreambooth")


@dataclass
class Parts:
    """What `build` makes for `fit`."""

    components: Components
    denoiser: torch.nn.Module  # the UNet or transformer, prepared for training
    text_encoders: dict[str, torch.nn.Module]  # by pipeline name; prepared for training when they are trained
    objective: Objective
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    dataset: DreamBoothDataset
    class_images: ClassImages | None
    cond: dict[str, torch.Tensor] | None  # cached conditioning of every prompt when the text encoders are frozen
    input_ids: dict[str, torch.Tensor]  # token ids per text encoder of [instance prompt, class prompt, *captions]
    weight_dtype: torch.dtype
    max_train_steps: int
    validation_every: int  # steps (--validation_steps, or --validation_epochs in steps)
    latents: LatentCache  # the frozen VAE's output per training view
    base: BaseModel | None  # --prior_target base_model: the frozen model whose prediction the class examples learn
    ema: Ema | None  # --use_ema
    sharding: Sharding | None  # --fsdp
    checkpoints: CheckpointWriter  # on a background thread unless --checkpoint_in_background false
    # wall_time_s: seconds of the invocations that led here (up to the checkpoint a run resumed from)
    state: dict[str, Any] = field(default_factory=lambda: {"step": 0, "loss_sum": 0.0, "instance_sum": 0.0,
                                                           "prior_sum": 0.0, "wall_time_s": 0.0})


def build(run: Run) -> Parts:
    """Class images, models, data, optimizer and schedule; restores a checkpoint when resuming."""
    cfg, acc, family = run.cfg, run.accelerator, run.family
    c, class_images = load_models(run)
    weight_dtype = reduced_dtype(acc.mixed_precision) or torch.float32
    trained_names = trained_text_encoders(cfg, family, c.text_encoders)
    encoders = [c.text_encoders[n] for n in trained_names]
    input_ids, encoded, prompt_ids = encode_prompts(run, c, trained_names, weight_dtype)
    cond = None if encoders else encoded
    denoiser, base = place_models(run, c, encoders, encoded, weight_dtype)
    objective = OBJECTIVES[family.objective].from_config(c.noise_scheduler, cfg, family.option_defaults)

    if cfg.torch_compile:  # block by block, in place (compilation.py): the first steps compile
        count = sum(compile_blocks(m, cfg.torch_compile_mode) for m in [denoiser, *encoders])
        log.info("--torch_compile: %d repeated blocks compile on their first call (mode %s)", count,
                 cfg.torch_compile_mode)

    # resuming: the weights now, into the unsharded modules; the optimizer's state once it exists
    trained = trained_modules(run, denoiser, c.text_encoders)
    if run.resume_from is not None:
        check_processes(load_checkpoint(run.resume_from, trained, None, acc.process_index), acc.num_processes)
    sharding = (Sharding.apply(denoiser, family, cfg, acc, reduced_dtype(acc.mixed_precision))
                if cfg.fsdp else None)

    dataset, max_train_steps, validation_every, per_step = make_dataset(run, class_images, prompt_ids)
    optimizer, lr_scheduler = optimization(cfg, denoiser, encoders, per_step, max_train_steps)
    parts = Parts(c, denoiser, dict(c.text_encoders), objective, optimizer, lr_scheduler, dataset, class_images,
                  cond, input_ids, weight_dtype, max_train_steps, validation_every,
                  LatentCache(c.vae, cfg.cache_latents, posterior=family.posterior), base,
                  Ema(trained, cfg) if cfg.use_ema else None, sharding,
                  CheckpointWriter(cfg.checkpoint_in_background, patience_s=cfg.ddp_timeout))
    if run.resume_from is not None:
        restore_state(run, parts)
    if sharding is None:
        parts.denoiser, *prepared, parts.optimizer = acc.prepare(denoiser, *encoders, optimizer)
    else:  # sharded already: accelerate would wrap it in DDP
        *prepared, parts.optimizer = acc.prepare(*encoders, optimizer) if encoders else (acc.prepare(optimizer),)
    parts.text_encoders.update(zip(trained_names, prepared))
    return parts


def load_models(run: Run) -> tuple[Components, ClassImages | None]:
    """The base model's parts and, with prior preservation, the class images; then the output folder is the run's.
    One load serves both: missing class images are sampled by the loaded parts, lent to the GPU in the generation
    dtype and given back untouched. Not with a quantized denoiser (it cannot be lent) or another tokenizer (class
    images are the model's own): generation then loads its own pipeline first, freed before training's loads."""
    cfg, acc = run.cfg, run.accelerator
    run.events.emit("phase", name="loading the base model")
    quantized = quantization(cfg, reduced_dtype(acc.mixed_precision))
    one_load = quantized is None and cfg.tokenizer_name is None
    prior = cfg.with_prior_preservation and cfg.class_data_dir is not None
    class_images = class_images_of(run) if prior and not one_load else None
    c = run.family.load(run.source, cfg.prediction_type, quantized)
    for k, subject in enumerate(run.subjects):
        mine = [i for i, s in enumerate(run.subject_of) if s == k]
        check_prompts_name_identifier(subject.prompt, subject.identifier, run.family, cfg, c,
                                      [run.instance.images[i] for i in mine],
                                      [run.instance.captions[i] for i in mine] if run.instance.captions else None,
                                      subject.prompt_flag)
    if prior and one_load:
        class_images = class_images_of(run, loaded=c)
    run.claim()  # the inputs loaded: from here on the output folder is this run's
    return c, class_images


def class_images_of(run: Run, loaded: Components | None = None) -> ClassImages:
    """Each class's images (one class per class prompt; the first subject's is --class_prompt), made where
    missing at the sizes of the aspect-ratio buckets of that class's photos."""
    cfg, classes, buckets = run.cfg, run.classes, run.instance.buckets
    per_class = []
    for k, (prompt, folder) in enumerate(zip(classes.prompts, classes.folders)):
        mine = [i for i, s in enumerate(run.subject_of) if classes.of_subject[s] == k]
        own = cfg if k == 0 else schema.derive(cfg, class_prompt=prompt, class_data_dir=folder, subjects=())
        per_class.append(ensure_class_images(own, run.family, run.source, run.accelerator, run.events, loaded,
                                             None if buckets is None else [buckets[i] for i in mine]))
    return ClassImages.joined(per_class)


@dataclass(frozen=True)
class PromptIds:
    """Rows of the encoded prompts: each instance image's, each class's and the empty prompt's (with
    --caption_dropout)."""

    instance: list[int]
    classes: list[int]
    empty: int | None = None


def encode_prompts(run: Run, c: Components, trained_names: list[str], weight_dtype: torch.dtype
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], PromptIds]:
    """Prompts encoded once: (token ids, the untouched encoders' conditioning, which rows are whose).
    The frozen encoders (T5-XXL alone ~9.5 GB) then leave the GPU before the denoiser arrives, their part of the
    conditioning cached."""
    cfg, acc, family = run.cfg, run.accelerator, run.family
    for name, encoder in c.text_encoders.items():
        full = name in trained_names and not cfg.use_lora  # fully trained weights stay fp32; T5's fp32 parts too
        cast_as_loaded(encoder.requires_grad_(False), acc.device, torch.float32 if full else weight_dtype).eval()
    captions = list(dict.fromkeys(t for t in run.instance.captions or [] if t is not None))
    prompts = [cfg.instance_prompt, cfg.class_prompt or cfg.instance_prompt, *captions]
    empty_id = None
    if cfg.caption_dropout > 0:  # the prompt a dropped caption trains with
        prompts, empty_id = [*prompts, ""], len(prompts)
    # further subjects: their prompts, then the further classes' (a one-subject run has none)
    subject_ids = [INSTANCE_PROMPT] + list(range(len(prompts), len(prompts) + len(run.subjects) - 1))
    prompts += [s.prompt for s in run.subjects[1:]]
    class_ids = [CLASS_PROMPT] + list(range(len(prompts), len(prompts) + len(run.classes.prompts) - 1))
    prompts += [p for p in run.classes.prompts[1:]]
    prompt_ids = [subject_ids[s] if t is None else 2 + captions.index(t)
                  for t, s in zip(run.instance.captions or [None] * len(run.instance.images), run.subject_of)]
    input_ids = family.tokenize(c, prompts, cfg)
    with torch.no_grad():
        encoded = family.encode(c, input_ids, cfg)  # the untouched encoders: also the base model's conditioning
        # (measured with the text encoder, before it leaves the GPU)
        warn_about_identifier(cfg, c, [(s.identifier, s.prompt) for s in run.subjects])
    for name, encoder in c.text_encoders.items():
        if name not in trained_names:
            park(encoder)
    return input_ids, encoded, PromptIds(prompt_ids, class_ids, empty_id)


def place_models(run: Run, c: Components, encoders: list[torch.nn.Module], encoded: dict[str, torch.Tensor],
                 weight_dtype: torch.dtype) -> tuple[torch.nn.Module, BaseModel | None]:
    """The frozen VAE, the frozen base model (--prior_target base_model) and the trained modules on their devices,
    in their dtypes, in training mode: LoRA adapters added (base weights frozen in the compute dtype or quantized,
    adapters in fp32) or every weight trained."""
    cfg, acc, family, denoiser = run.cfg, run.accelerator, run.family, c.denoiser
    c.vae.requires_grad_(False).to(acc.device, family.vae_dtype(c, weight_dtype)).eval()
    base = None
    if cfg.with_prior_preservation and cfg.prior_target == "base_model":
        table = {k: v.detach() for k, v in encoded.items()}  # each class example's class prompt is a row of it
        base = (BaseModel.adapters_off(table) if cfg.use_lora else  # before any weight trains or resumes
                BaseModel.frozen_copy(denoiser, acc.device, weight_dtype, cfg.offload_base_model, table))
    if cfg.use_lora:
        if cfg.quantize_base != "none":
            from peft import prepare_model_for_kbit_training

            denoiser = prepare_model_for_kbit_training(denoiser, use_gradient_checkpointing=False)
        elif cfg.fsdp:  # the base stays fp32 like the adapters (a shard unit holds one dtype; FSDP casts it) and
            denoiser.to(torch.float32)  # off the GPU: fully_shard moves each process's shard there
        else:
            denoiser.to(acc.device, weight_dtype)
        add_adapters(cfg, denoiser, lora_targets(cfg, family, denoiser.config), encoders)
    else:
        for encoder in encoders:
            encoder.requires_grad_(True)
        denoiser.requires_grad_(True)
        if not cfg.fsdp:  # sharded, each process moves only its shard to the GPU
            denoiser.to(acc.device)
    if cfg.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    denoiser.train()
    for encoder in encoders:
        encoder.train()
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for encoder in encoders:
            encoder.gradient_checkpointing_enable()
    return denoiser, base


def make_dataset(run: Run, class_images: ClassImages | None, prompt_ids: PromptIds
                 ) -> tuple[DreamBoothDataset, int, int, int]:
    """The keyed dataset, and (max train steps, validation interval in steps, examples per optimizer step). The
    base model's target needs no class images: without them the instance images are its inputs."""
    cfg, acc = run.cfg, run.accelerator
    base_model = cfg.with_prior_preservation and cfg.prior_target == "base_model"
    classes = run.classes.of_subject
    instance_classes = [classes[s] for s in run.subject_of]  # each instance image's class
    if class_images:
        class_paths, class_of = class_images.paths, class_images.class_of or [0] * len(class_images.paths)
    else:  # without class images the base model's inputs are the instance images, each of its own class
        class_paths, class_of = (run.instance.images, instance_classes) if base_model else (None, None)
    buckets = run.instance.buckets
    class_buckets = None if buckets is None or class_paths is None else [
        nearest(*upright_size(p), sorted({b for b, k in zip(buckets, instance_classes) if k == c}))
        for p, c in zip(class_paths, class_of)]
    repeats = cfg.repeats if len(run.subjects) == 1 else [run.subjects[s].repeats for s in run.subject_of]
    dataset = DreamBoothDataset(run.instance.images, class_paths, cfg.resolution, cfg.seed, cfg.center_crop,
                                cfg.random_flip, prompt_ids.instance, run.instance.masks, cfg.caption_dropout,
                                prompt_ids.empty, repeats, buckets, class_buckets,
                                cfg.train_batch_size * acc.num_processes, cfg.allow_small_buckets,
                                classes=(instance_classes, class_of, prompt_ids.classes) if len(
                                    prompt_ids.classes) > 1 else None)
    per_step = cfg.train_batch_size * acc.num_processes * cfg.gradient_accumulation_steps
    if per_step > 2 * dataset.epoch_length:
        log.warning("one optimizer step takes %d examples, %.0f passes over the %d training images: "
                    "--gradient_accumulation_steps %d makes each step that much longer and repeats the same images; "
                    "lower it", per_step, per_step / dataset.epoch_length, dataset.epoch_length,
                    cfg.gradient_accumulation_steps)
    steps_per_epoch = math.ceil(dataset.epoch_length / per_step)
    max_train_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    validation_every = (cfg.validation_steps if cfg.validation_epochs is None
                        else cfg.validation_epochs * steps_per_epoch)
    return dataset, max_train_steps, validation_every, per_step


def optimization(cfg: TrainConfig, denoiser: torch.nn.Module, encoders: list[torch.nn.Module], per_step: int,
                 max_train_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer (the denoiser's group, one group per trained text encoder with its rate and decay) and the
    learning-rate schedule."""
    scale = per_step if cfg.scale_lr else 1
    groups = [{"params": trainable(denoiser), "lr": cfg.learning_rate * scale}]
    text_decay = {} if cfg.adam_weight_decay_text_encoder is None else {
        "weight_decay": cfg.adam_weight_decay_text_encoder}
    for encoder in encoders:
        groups.append({"params": trainable(encoder), "lr": (cfg.text_encoder_lr or cfg.learning_rate) * scale,
                       **text_decay})
    optimizer = make_optimizer(cfg, groups)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_train_steps, num_cycles=cfg.lr_num_cycles,
                                 power=cfg.lr_power)
    return optimizer, lr_scheduler


def restore_state(run: Run, parts: Parts) -> None:
    """Resuming: the optimizer, EMA, schedule, gradient scaler and counters of the checkpoint (its weights were
    loaded into the modules before sharding)."""
    acc = run.accelerator
    state = load_checkpoint(run.resume_from, {}, parts.optimizer, acc.process_index,
                            sharded=parts.sharding is not None)
    if parts.ema is not None:
        parts.ema.load(run.resume_from)
    parts.lr_scheduler.load_state_dict(state.pop("lr_scheduler"))
    if acc.scaler is not None and state.get("grad_scaler"):
        acc.scaler.load_state_dict(state.pop("grad_scaler"))
    parts.state.update(state)
    log.info("resumed from %s at step %d", run.resume_from, state["step"])


def trained_text_encoders(cfg: TrainConfig, family: ModelFamily, present) -> list[str]:
    """The text encoders --train_text_encoder trains for this family (never T5), of those `present`."""
    return [n for n in family.trained_text_encoders if n in present] if cfg.train_text_encoder else []


def trained_modules(run: Run, denoiser: torch.nn.Module, text_encoders: dict[str, torch.nn.Module]
                    ) -> dict[str, torch.nn.Module]:
    """What is trained, by its pipeline name (the checkpoint's folder names)."""
    names = trained_text_encoders(run.cfg, run.family, text_encoders)
    return {run.family.denoiser_name: denoiser, **{n: text_encoders[n] for n in names}}


