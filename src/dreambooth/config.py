"""The training config: the single source of truth for `dreambooth train` flags, config files and `dreambooth.train`.

Flag names and defaults follow the reference `train_dreambooth.py` wherever the two share an option, so an existing
command line works unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from . import schema
from .errors import ConfigError
from .families.help import family_help, option_default, shown
from .objectives import WEIGHTING_SCHEMES
from .sampling import sampler_names
from .schema import at_least, between, in_unit_interval, option, positive

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
PRECISIONS = ("no", "fp16", "bf16")
PRIOR_PRECISIONS = ("no", "fp32", "fp16", "bf16")
REPORTERS = ("none", "tensorboard", "wandb", "comet_ml", "all")
PREDICTION_TYPES = ("epsilon", "v_prediction")
PRIOR_TARGETS = ("class_images", "base_model")
ADAPTERS = ("lora", "lokr", "loha")
# Adam moves each weight by about the learning rate every step, whatever its gradient: past 10 the weights are noise
# at once, and 1e38 overflows inside the optimizer; Prodigy, which sets its own step size, is given 1.0
MAX_LEARNING_RATE = 10.0


def _multiple_of_8(v: int | None) -> str | None:
    if v is None or (v % 8 == 0 and v >= 8):
        return None
    return "must be a positive multiple of 8 (the VAE downsamples by 8)"


FULL_LEARNING_RATE = 5e-6  # the DreamBooth reference script's (full fine-tuning, every family here)


def _learning_rate(v: float | None) -> str | None:
    if v is None or 0 < v <= MAX_LEARNING_RATE:
        return None
    return f"must be > 0 and at most {MAX_LEARNING_RATE:g} (usual: 1e-6 to 1e-4 with adamw, 1.0 with prodigy)"


def _factor(v: int) -> str | None:
    return None if v == -1 or v >= 1 else "-1 (automatic) or a positive factor, e.g. 8 or 16"


def _extension(v: str | None) -> str | None:
    """A file extension that `Path.with_suffix` takes: a dot, then a name that is neither empty nor a folder."""
    if v is None or (v.startswith(".") and v.strip(".") and not any(sep in v for sep in "/\\")):
        return None
    return "an extension with its dot and no folder, e.g. .txt"


def _multiples_near(value: int, multiple: int) -> str:
    """The allowed values either side of `value`, e.g. "512 or 528" for 520 and 16."""
    below = value // multiple * multiple
    return f"{below} or {below + multiple}" if below else str(multiple)


def _family_choices() -> list[str]:
    from .families import FAMILIES

    return ["auto", *FAMILIES]


def layer_numbers(v: list[int] | None) -> str | None:
    return None if v is None or (v and min(v) >= 0) else "must be one or more layer numbers (0 or more)"


@dataclasses.dataclass
class Subject:
    """One more subject trained in the same run as the first (--instance_data_dir, --instance_prompt): a config
    file's [[subjects]] table, a dict in Python, JSON text on the command line."""

    instance_data_dir: Path = option(help="Folder of this subject's photos")
    instance_prompt: str = option(help='Its prompt, with its own identifier, e.g. "a photo of qlp cat"')
    identifier: str | None = option(None, "Its identifier (inferred from the prompts when not given)")
    class_prompt: str | None = option(None, "Its class prompt with prior preservation (default: the first "
                                      "subject's --class_prompt)")
    class_data_dir: Path | None = option(None, "Its class images (default: --class_data_dir when the class prompt "
                                         "is the first subject's; another class needs its own folder)")
    repeats: int | None = option(None, "Times each of its photos appears per epoch (default: --repeats)",
                                 check=at_least(1))


@dataclasses.dataclass
class TrainConfig(schema.Validated):
    # model
    pretrained_model_name_or_path: str = option(help="Base model: a diffusers pipeline folder or a hub id",
                                                group="model")
    revision: str | None = option(None, "Hub revision of the base model", group="model")
    variant: str | None = option(None, "Weight variant of the base model files, e.g. fp16", group="model")
    tokenizer_name: str | None = option(None, "Tokenizer folder or hub id, if not the model's own", group="model",
                                        path=True)
    pretrained_vae_model_name_or_path: str | None = option(
        None, "A VAE to use instead of the model's own (folder or hub id), e.g. madebyollin/sdxl-vae-fp16-fix",
        group="model")
    family: str = option("auto", "Model family; auto reads model_index.json", choices=_family_choices, group="model")
    prediction_type: str | None = option(
        None, "Override the scheduler's prediction type", choices=PREDICTION_TYPES, group="model"
    )

    # data
    instance_data_dir: Path = option(help="Folder of the subject's images (3-5 is typical)", group="data")
    instance_prompt: str = option(help='Prompt with the identifier, e.g. "a photo of zwx dog"', group="data")
    identifier: str | None = option(
        None, "The rare-token identifier in the instance prompt (inferred when not given)", group="data"
    )
    class_data_dir: Path | None = option(None, "Folder of class images; missing ones are generated", group="data")
    subjects: list[Subject] = option((), "More subjects trained in the same run, each with its own photos, prompt "
                                     "and identifier (and class, with prior preservation): in a config file a "
                                     "[[subjects]] table each (instance_data_dir, instance_prompt, and optionally "
                                     "identifier, class_prompt, class_data_dir, repeats); on the command line one "
                                     "JSON text per subject; the first subject is --instance_data_dir",
                                     group="data")
    class_prompt: str | None = option(None, 'Prompt of the class, e.g. "a photo of dog"', group="data")
    with_prior_preservation: bool = option(False, "Add the class-specific prior-preservation loss", group="data")
    prior_loss_weight: float = option(1.0, "Weight lambda of the prior-preservation loss", check=at_least(0),
                                      group="data")
    prior_target: str = option("class_images", "What the class examples are trained towards: class_images (the "
                               "paper: the denoising loss on generated class images) or base_model (the frozen base "
                               "model's own prediction on the same noisy latents and the class prompt, as sd-scripts' "
                               "Differential Output Preservation; without --class_data_dir the instance images are "
                               "the inputs and no class image is made)", choices=PRIOR_TARGETS, group="data")
    offload_base_model: bool = option(False, "With --prior_target base_model and a full fine-tune: keep the frozen "
                                      "copy of the denoiser in CPU memory, each layer moved to the GPU as it runs",
                                      group="data")
    num_class_images: int = option(100, "Class images used for prior preservation", check=at_least(1), group="data")
    sample_batch_size: int | None = option(None, "Batch size when generating class images (default: 4 on CPU; on "
                                           "a GPU as many as its free memory holds)", check=at_least(1),
                                           group="data")
    prior_generation_precision: str | None = option(
        None, "Precision of class-image generation (default: fp16 on GPU, fp32 on CPU)", choices=PRIOR_PRECISIONS,
        group="data",
    )
    class_sampler: str | None = option(None, family_help(
        "Sampler for class images (default: the family's: {})", lambda f: f.default_sampler),
        choices=sampler_names, group="data")
    class_inference_steps: int = option(25, "Sampler steps for class images", check=at_least(1), group="data")
    class_guidance_scale: float | None = option(None, family_help(
        "Guidance scale for class images (default: the family's: {})", lambda f: f.default_guidance),
        check=at_least(0), group="data")
    class_negative_prompt: str | None = option(None, "Negative prompt for class images", group="data")
    repeats: int = option(1, "Times each instance photo appears per epoch (as the reference scripts' option; "
                          "epochs, --num_train_epochs and --validation_epochs count in these)", check=at_least(1),
                          group="data")
    caption_dropout: float = option(0.0, "Probability that an instance example trains with the empty prompt "
                                    "instead of its own (drawn per example from the seed; the Flux.2 klein and "
                                    "Krea 2 scripts' option)", check=in_unit_interval, group="data")
    caption_extension: str | None = option(None, "Per-image captions: a file with this extension beside each "
                                           "instance image (e.g. .txt) holds its prompt, with [V] (or the "
                                           "identifier itself) where the subject is named; images without one use "
                                           "--instance_prompt", check=_extension, group="data")
    masked_loss: bool = option(False, "Weight the instance loss by a mask of the subject: <image>-masklabel.png "
                               "beside each instance image (white: subject) or else the image's alpha channel",
                               group="data")
    mask_background_weight: float = option(0.0, "With --masked_loss: the loss weight outside the mask (0: the "
                                           "background is not learnt at all)", check=between(0, 1), group="data")
    resolution: int | None = option(None, family_help(
        "Training resolution in pixels (default: the family's: {})", lambda f: f.default_resolution),
        check=_multiple_of_8, group="data")
    center_crop: bool = option(False, "Centre-crop instead of random-crop after resizing", group="data")
    random_flip: bool = option(False, "Randomly flip training images horizontally", group="data")
    use_aspect_ratio_buckets: bool = option(
        False, "Aspect-ratio buckets: each photo trains whole at the height x width nearest its shape (about "
        "--resolution squared pixels, never above the photo's own size) instead of a square crop; a batch never "
        "mixes buckets", group="data")
    aspect_ratio_buckets: str | None = option(
        None, "Your own buckets as \"height,width;height,width\" (each side a multiple of the model's 8 or 16): "
        "each photo goes to the one nearest its shape; implies --use_aspect_ratio_buckets", group="data")
    allow_small_buckets: bool = option(
        False, "With buckets: a bucket holding fewer photos than one batch (--train_batch_size x processes) repeats "
        "them to fill its batches (without it, that is an error)", group="data")
    dataloader_num_workers: int = option(0, "Data-loading worker processes", check=at_least(0), group="data")

    # optimisation
    output_dir: Path = option(Path("dreambooth-model"), "Where the pipeline, checkpoints and logs go", group="training")
    seed: int | None = option(None, "Seed for a reproducible run (one is drawn and recorded if not given)",
                              group="training")
    train_text_encoder: bool = option(False, "Also fine-tune the text encoder", group="training")
    train_batch_size: int = option(4, "Instance images per device per step", check=at_least(1), group="training")
    num_train_epochs: int = option(1, "Epochs, when --max_train_steps is not given", check=at_least(1),
                                   group="training")
    max_train_steps: int | None = option(None, "Optimizer steps (overrides epochs)", check=at_least(1),
                                         group="training")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step", check=at_least(1),
                                              group="training")
    gradient_checkpointing: bool = option(False, "Trade compute for memory in the denoiser (and trained text "
                                          "encoders)", group="training")
    channels_last: bool = option(False, "Keep the denoiser's activations channels-last (often faster convolutions on "
                                 "GPUs)", group="training")
    torch_compile: bool = option(False, "torch.compile the trained models (slow first steps, faster afterwards)",
                                 group="training")
    torch_compile_mode: str = option("default", "torch.compile mode: reduce-overhead replays each step as a CUDA "
                                     "graph, max-autotune also tunes kernels (longer compile)",
                                     choices=("default", "reduce-overhead", "max-autotune",
                                              "max-autotune-no-cudagraphs"), group="training")
    cache_latents: bool = option(True, "Encode each training view (image, crop, flip) with the frozen VAE once and "
                                 "reuse it; --no-cache_latents encodes every step", group="training")
    learning_rate: float | None = option(None, family_help(
        f"Peak learning rate (default: the reference scripts' for the method: {shown(FULL_LEARNING_RATE)} for full "
        "fine-tuning; with --use_lora the family's: {})", lambda f: f.lora_learning_rate),
        check=_learning_rate, group="training")
    scale_lr: bool = option(False, "Multiply the lr by processes x accumulation x batch size", group="training")
    lr_scheduler: str = option("constant", "Learning-rate schedule", choices=LR_SCHEDULERS, group="training")
    lr_warmup_steps: int = option(500, "Warm-up steps (schedules *_with_warmup, linear, cosine, ...)",
                                  check=at_least(0), group="training")
    lr_num_cycles: int = option(1, "Hard restarts for cosine_with_restarts", check=at_least(1), group="training")
    lr_power: float = option(1.0, "Power of the polynomial schedule", check=positive, group="training")
    adam_beta1: float = option(0.9, "AdamW beta1", check=in_unit_interval, group="training")
    adam_beta2: float = option(0.999, "AdamW beta2", check=in_unit_interval, group="training")
    adam_weight_decay: float = option(1e-2, "AdamW weight decay", check=at_least(0), group="training")
    adam_epsilon: float = option(1e-8, "AdamW epsilon", check=positive, group="training")
    max_grad_norm: float = option(1.0, "Gradient clipping norm", check=positive, group="training")
    use_8bit_adam: bool = option(False, "8-bit AdamW from bitsandbytes (GPU)", group="training")
    optimizer: str = option("adamw", "adamw, or prodigy (sets its own step size: use --learning_rate 1.0; needs "
                            "`pip install prodigyopt`)", choices=("adamw", "prodigy"), group="training")
    prodigy_beta3: float | None = option(None, "Prodigy's beta3 (default: sqrt(beta2))", check=in_unit_interval,
                                         group="training")
    prodigy_decouple: bool = option(True, "Prodigy: AdamW-style decoupled weight decay", group="training")
    prodigy_use_bias_correction: bool = option(True, "Prodigy: Adam's bias correction", group="training")
    prodigy_safeguard_warmup: bool = option(True, "Prodigy: no step-size growth during warm-up", group="training")
    adam_weight_decay_text_encoder: float | None = option(None, family_help(
        "Weight decay of the text encoders (default: the family's reference script's: {})",
        lambda f: f.text_encoder_weight_decay if f.text_encoder_weight_decay is not None
        else "--adam_weight_decay"), check=at_least(0), group="training")
    mixed_precision: str | None = option(None, "Mixed precision (default: accelerate's config)", choices=PRECISIONS,
                                         group="training")
    allow_tf32: bool = option(False, "Allow TF32 matmuls on Ampere+ GPUs", group="training")
    device: str = option("auto", "Where to train: auto (the GPU when there is one, as accelerate decides), cpu (even "
                         "when a GPU exists), or cuda (refused without one)", choices=("auto", "cpu", "cuda"),
                         group="training")
    fsdp: bool = option(False, "Shard the denoiser's weights, gradients and optimizer state over the processes "
                        "(PyTorch FSDP2): for full fine-tunes that one GPU cannot hold; launch with `accelerate "
                        "launch --num_processes N` (or torchrun)", group="training")
    fsdp_cpu_offload: bool = option(False, "With --fsdp: keep the sharded parameters, gradients and optimizer state "
                                    "in CPU memory (slower; the least GPU memory)", group="training")
    fsdp_reshard_after_forward: bool = option(True, "With --fsdp: free each block's gathered weights after its "
                                              "forward pass and gather them again for the backward pass (less "
                                              "memory, more communication)", group="training")
    ddp_timeout: int = option(600, "Seconds a process waits for the others at a collective (a barrier, the gradient "
                              "exchange) before the run ends with an error; phases only the main process does "
                              "(validation, saving) must fit in it. A process that dies ends the others within "
                              "seconds on one machine whatever this is", check=at_least(10), group="training")
    deterministic: bool = option(False, "Deterministic GPU kernels (no cuDNN autotuning, deterministic attention and "
                                 "cuBLAS), so that a resumed run matches an uninterrupted one bit for bit on a GPU "
                                 "too; slower", group="training")
    offset_noise: bool = option(False, "Add offset noise (brighter darks, darker lights)", group="training")
    offset_noise_strength: float = option(0.1, "Scale of the offset noise", check=at_least(0), group="training")
    snr_gamma: float | None = option(None, "Min-SNR loss weighting gamma (5.0 is the usual choice)", check=positive,
                                     group="training")

    # exponential moving average of the trained weights
    use_ema: bool = option(False, "Keep an exponential moving average (EMA) of the trained weights (full or LoRA), "
                           "saved beside the raw ones in output_dir/ema and in every checkpoint", group="ema")
    ema_decay: float = option(0.9999, "EMA decay (the ceiling, with --ema_warmup)", check=in_unit_interval,
                              group="ema")
    ema_min_decay: float = option(0.0, "Lowest EMA decay", check=in_unit_interval, group="ema")
    ema_update_after_step: int = option(0, "Steps before the EMA starts following the weights", check=at_least(0),
                                        group="ema")
    ema_warmup: bool = option(True, "Decay grows with the step, 1 - (1 + step / inv_gamma) ** -power, up to "
                              "--ema_decay (so a short DreamBooth run averages over a few dozen steps, not 10,000)",
                              group="ema")
    ema_inv_gamma: float = option(1.0, "EMA warm-up inverse multiplicative factor", check=positive, group="ema")
    ema_power: float = option(2 / 3, "EMA warm-up exponent (2/3 suits short runs, 3/4 long ones)", check=positive,
                              group="ema")
    validate_with_ema: bool = option(False, "Render validation images with the EMA weights (needs --use_ema)",
                                     group="ema")

    # rectified flow (SD3, Flux); refused for the other families
    weighting_scheme: str | None = option(None, family_help(
        "How sigma is drawn and losses weighted (default: the family's: {})", option_default("weighting_scheme")),
        choices=WEIGHTING_SCHEMES, group="flow")
    logit_mean: float = option(0.0, "Mean of the logit-normal sigma density", group="flow")
    logit_std: float = option(1.0, "Standard deviation of the logit-normal sigma density", check=positive,
                              group="flow")
    mode_scale: float = option(1.29, "Scale of the `mode` sigma density", group="flow")
    precondition_outputs: bool | None = option(None, family_help(
        "Read the model's output as a prediction of the clean latents (SD3's preconditioning; default: the "
        "family's: {})", option_default("precondition_outputs")), group="flow")
    max_sequence_length: int | None = option(None, family_help(
        "T5 tokens per prompt (default: the family's: {})", option_default("max_sequence_length")),
        check=at_least(1), group="flow")
    text_encoder_out_layers: list[int] | None = option(None, family_help(
        "The language model's hidden layers read side by side per token, for training and sampling alike (default: "
        "the family's: {})", option_default("text_encoder_out_layers")), check=layer_numbers, group="flow")
    guidance_scale: float | None = option(None, "Flux dev: the guidance value the transformer is given while "
                                          "training (default 3.5)", check=at_least(0), group="flow")

    # LoRA
    use_lora: bool = option(False, "Train LoRA adapters (peft) instead of the full denoiser / text encoders",
                            group="lora")
    quantize_base: str = option("none", "Keep the frozen denoiser quantized by bitsandbytes (CUDA only, with "
                                "--use_lora): int8, or nf4 (4-bit, QLoRA)", choices=("none", "int8", "nf4"),
                                group="lora")
    rank: int = option(4, "LoRA rank", check=at_least(1), group="lora")
    lora_alpha: float | None = option(None, "LoRA alpha (default: the rank, so the scale alpha/rank is 1)",
                                      check=positive, group="lora")
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch", check=in_unit_interval, group="lora")
    use_dora: bool = option(False, "Weight-decomposed LoRA (DoRA)", group="lora")
    adapter: str = option("lora", "The adapter kind (peft): lora; lokr (LyCORIS LoKr: Kronecker factors, --rank and "
                          "--lora_alpha for its low-rank factor); loha (LyCORIS LoHa: Hadamard product of two "
                          "rank---rank pairs); lokr and loha imply --use_lora", choices=ADAPTERS, group="lora")
    lokr_factor: int = option(-1, "LoKr: the Kronecker factor's size (-1: as square as the shape allows; kohya's "
                              "`factor`)", check=_factor, group="lora")
    lokr_decompose_both: bool = option(False, "LoKr: decompose the small factor into rank --rank too",
                                       group="lora")
    lora_target_modules: list[str] | None = option(None, "Denoiser modules that get adapters (default: the "
                                                   "family's; SD: to_k to_q to_v to_out.0)", group="lora")
    lora_blocks: list[int] | None = option(None, family_help(
        "Only these numbered blocks get adapters (default: all; the families that have them: {})",
        lambda f: f"{f.lora_block_list[0]}.N" if f.lora_block_list else None), group="lora")
    text_encoder_lora_target_modules: list[str] = option(("q_proj", "k_proj", "v_proj", "out_proj"),
                                                         "Text-encoder modules that get adapters "
                                                         "(with --train_text_encoder)", group="lora")
    text_encoder_lr: float | None = option(None, family_help(
        "Learning rate of the text encoders (default: the family's reference script's: {}; --learning_rate with "
        "Prodigy)", lambda f: f.text_encoder_learning_rate if f.text_encoder_learning_rate is not None
        else "--learning_rate"), check=_learning_rate, group="lora")

    save_precision: str = option("fp32", "Precision of the saved pipeline's weights (fp16/bf16: half the size; "
                                 "LoRA adapters and checkpoints stay fp32)", choices=("fp32", "fp16", "bf16"),
                                 group="checkpoints")

    # checkpoints
    checkpointing_steps: int = option(500, "Save a resumable checkpoint every N steps", check=at_least(1),
                                      group="checkpoints")
    checkpoints_total_limit: int | None = option(None, "Keep only the newest N checkpoints", check=at_least(1),
                                                 group="checkpoints")
    checkpoint_in_background: bool = option(
        True, "Write checkpoints on a background thread while training goes on: the loop waits only for a copy of "
        "the weights and optimizer state in host memory, held while the files are written (a save whose copy would "
        "take over half the available memory is written while the loop waits); false: the loop always waits for "
        "the disk, copying nothing", group="checkpoints")
    resume_from_checkpoint: str | None = option(
        None, 'Resume from "latest" or a checkpoint folder (name inside output_dir, or a path)', group="checkpoints",
        path=True)

    # validation and logging
    validation_prompt: str | None = option(None, "Prompt rendered every --validation_steps", group="validation")
    num_validation_images: int = option(4, "Images per validation", check=at_least(1), group="validation")
    validation_steps: int = option(100, "Validate every N steps", check=at_least(1), group="validation")
    validation_epochs: int | None = option(None, "Validate every N epochs instead (the reference scripts' flag; an "
                                           "epoch is one pass over the images)", check=at_least(1),
                                           group="validation")
    validation_sampler: str | None = option(None, "Sampler for validation images (default: the family's)",
                                            choices=sampler_names, group="validation")
    validation_inference_steps: int = option(25, "Sampler steps for validation images", check=at_least(1),
                                             group="validation")
    validation_guidance_scale: float | None = option(None, "Guidance scale for validation images (default: the "
                                                     "family's)", check=at_least(0), group="validation")
    eval: bool = option(False, "After training, run `dreambooth evaluate` on the result with the instance images as "
                        "the real images; report in output_dir/evaluation", group="validation")
    eval_config: Path | None = option(None, "Options file for that evaluation (backend, backbones, subject, ...)",
                                      group="validation")
    logging_steps: int = option(10, "Read the loss back from the device every N steps (each read makes the host "
                                "wait for the GPU); every step is still logged", check=at_least(1),
                                group="validation")
    report_to: str = option("none", "Experiment tracker", choices=REPORTERS, group="validation")
    logging_dir: Path = option(Path("logs"), "Tracker folder, relative to output_dir", group="validation")

    @property
    def adapters(self) -> bool:
        """Whether adapters train (LoRA, or another --adapter) rather than the whole model."""
        return self.use_lora or self.adapter != "lora"

    @property
    def buckets(self) -> bool:
        """Whether photos train in aspect-ratio buckets (the flag, or a list of buckets)."""
        return self.use_aspect_ratio_buckets or self.aspect_ratio_buckets is not None

    def check(self) -> None:
        """Cross-field rules, checked before any model loads."""
        if self.with_prior_preservation:
            if self.class_prompt is None:
                raise ConfigError("class_prompt", None, "required with --with_prior_preservation, e.g. 'a dog'")
            if self.class_data_dir is None and self.prior_target == "class_images":
                raise ConfigError("class_data_dir", None, "required with --with_prior_preservation (a folder), "
                                  "unless --prior_target base_model")
        else:
            if self.class_prompt is not None:
                raise ConfigError(
                    "class_prompt", self.class_prompt, "only used with --with_prior_preservation; add that flag"
                )
            if self.class_data_dir is not None:
                raise ConfigError(
                    "class_data_dir", str(self.class_data_dir), "only used with --with_prior_preservation; add it"
                )
        if self.prior_target != "class_images" and not self.with_prior_preservation:
            raise ConfigError("prior_target", self.prior_target, "only used with --with_prior_preservation; add it")
        if self.offload_base_model and (self.prior_target != "base_model" or self.adapters):
            raise ConfigError("offload_base_model", True, "only used with --prior_target base_model and a full "
                              "fine-tune (LoRA's base model is the denoiser with its adapters off)")
        if self.prior_target == "base_model" and self.prediction_type is not None:
            raise ConfigError("prediction_type", self.prediction_type, "not with --prior_target base_model (the "
                              "frozen base model predicts in its own parameterization); drop one of them")
        if self.validate_with_ema and not self.use_ema:
            raise ConfigError("validate_with_ema", True, "needs --use_ema; add it")
        if self.ema_min_decay > self.ema_decay:
            raise ConfigError("ema_min_decay", self.ema_min_decay, f"at most --ema_decay ({self.ema_decay})")
        if self.allow_small_buckets and not self.buckets:
            raise ConfigError("allow_small_buckets", True, "only used with --use_aspect_ratio_buckets; add it")
        if self.mask_background_weight != 0.0 and not self.masked_loss:
            raise ConfigError("mask_background_weight", self.mask_background_weight, "only used with --masked_loss")
        if self.fsdp_cpu_offload and not self.fsdp:
            raise ConfigError("fsdp_cpu_offload", True, "only used with --fsdp; add it")
        if not self.fsdp_reshard_after_forward and not self.fsdp:
            raise ConfigError("fsdp_reshard_after_forward", False, "only used with --fsdp; add it")
        if self.fsdp:
            for name, clash, why in (("use_ema", self.use_ema, "the average of sharded weights is not built yet"),
                                     ("quantize_base", self.quantize_base != "none", "a quantized base is not "
                                      "sharded"),
                                     ("use_8bit_adam", self.use_8bit_adam, "bitsandbytes' optimizer does not take "
                                      "sharded parameters"),
                                     ("mixed_precision", self.mixed_precision == "fp16", "fp16 needs a sharded "
                                      "gradient scaler; use bf16")):
                if clash:
                    raise ConfigError(name, getattr(self, name), f"not with --fsdp ({why}); drop one of them")
        if self.use_8bit_adam and self.optimizer != "adamw":
            raise ConfigError("use_8bit_adam", True, f"only with --optimizer adamw, not {self.optimizer}")
        if self.quantize_base != "none" and not self.adapters:
            raise ConfigError("quantize_base", self.quantize_base, "only with --use_lora (a quantized base stays "
                              "frozen; the adapters train)")
        if self.lora_blocks is not None and not self.adapters:
            raise ConfigError("lora_blocks", self.lora_blocks, "only used with --use_lora; add that flag")
        if self.use_dora and not self.use_lora:
            raise ConfigError("use_dora", True, "only used with --use_lora; add that flag")
        if self.use_dora and self.adapter != "lora":
            raise ConfigError("use_dora", True, f"DoRA is a kind of LoRA, not of {self.adapter}; drop one of them")
        if self.adapter != "lokr" and (self.lokr_factor != -1 or self.lokr_decompose_both):
            raise ConfigError("lokr_factor" if self.lokr_factor != -1 else "lokr_decompose_both",
                              self.lokr_factor if self.lokr_factor != -1 else True, "only used with --adapter lokr")
        if self.torch_compile_mode != "default" and not self.torch_compile:
            raise ConfigError("torch_compile_mode", self.torch_compile_mode, "only used with --torch_compile; add it")
        if self.eval_config is not None and not self.eval:
            raise ConfigError("eval_config", str(self.eval_config), "only used with --eval; add that flag")
        if not self.instance_prompt.strip():
            raise ConfigError("instance_prompt", self.instance_prompt, "a non-empty prompt")
        if self.identifier is not None and self.identifier not in self.instance_prompt.split():
            raise ConfigError("identifier", self.identifier, "a word of --instance_prompt")
        if self.subjects:
            self._check_subjects()
            if self.eval:
                raise ConfigError("eval", True, "scores one subject; with several, run `dreambooth evaluate --model "
                                  "OUTPUT --identifier WORD --real_images PHOTOS` for each of them")

    def _check_subjects(self) -> None:
        """Each further subject: its own folder and identifier; with prior preservation, one class folder per class
        prompt."""
        from .identifier import infer_identifier

        folders = {Path(self.instance_data_dir).expanduser().resolve(): "--instance_data_dir"}
        first = self.identifier or infer_identifier(self.instance_prompt, self.class_prompt)
        identifiers = {first: "the first subject"} if first else {}
        prompts = {} if first else {"the first subject": self.instance_prompt}  # (whose identifier is not known)
        classes = {self.class_prompt: self.class_data_dir}
        for i, s in enumerate(self.subjects):
            name = f"subjects[{i}]"
            folder = Path(s.instance_data_dir).expanduser().resolve()
            if folder in folders:
                raise ConfigError(f"{name}.instance_data_dir", str(s.instance_data_dir), f"the same folder as "
                                  f"{folders[folder]}; each subject needs its own photos (the first subject is "
                                  "--instance_data_dir: list only the others)")
            folders[folder] = f"{name}.instance_data_dir"
            if not s.instance_prompt.strip():
                raise ConfigError(f"{name}.instance_prompt", s.instance_prompt, "a non-empty prompt")
            class_prompt = s.class_prompt or self.class_prompt
            word = s.identifier or infer_identifier(s.instance_prompt, class_prompt)
            if s.identifier is not None and s.identifier not in s.instance_prompt.split():
                raise ConfigError(f"{name}.identifier", s.identifier, f"a word of {name}.instance_prompt")
            # the same word names another subject (its identifier, or a word of its prompt when its identifier is
            # not known)
            owner = identifiers.get(word) or next(
                (who for who, text in prompts.items() if word is not None and word in text.split()), None)
            if owner is not None:
                raise ConfigError(f"{name}.identifier", word, f"already {owner}'s; each subject needs its own "
                                  "(`dreambooth identifier --count N` suggests distinct ones)")
            if word is not None:
                identifiers[word] = name
            else:
                prompts[name] = s.instance_prompt
            if not self.with_prior_preservation:
                for key in ("class_prompt", "class_data_dir"):
                    if getattr(s, key) is not None:
                        raise ConfigError(f"{name}.{key}", str(getattr(s, key)), "only used with "
                                          "--with_prior_preservation; add that flag")
                continue
            if self.prior_target != "class_images":
                if s.class_data_dir is not None and self.class_data_dir is None:
                    raise ConfigError(f"{name}.class_data_dir", str(s.class_data_dir), "--prior_target base_model "
                                      "without --class_data_dir uses no class images; drop it")
            elif s.class_prompt not in (None, self.class_prompt) and s.class_data_dir is None:
                raise ConfigError(f"{name}.class_data_dir", None, f"required: its class ({s.class_prompt!r}) is "
                                  "not the first subject's, so its class images need their own folder")
            folder = s.class_data_dir if s.class_data_dir is not None else classes.get(class_prompt)
            if class_prompt in classes and folder != classes[class_prompt]:
                raise ConfigError(f"{name}.class_data_dir", str(folder), f"{class_prompt!r} already has its class "
                                  f"images in {classes[class_prompt]}; one folder per class")
            if folder is not None and class_prompt not in classes and folder in classes.values():
                raise ConfigError(f"{name}.class_data_dir", str(folder), "already the folder of another class; "
                                  "each class needs its own")
            classes[class_prompt] = folder

    def check_family(self, family) -> None:
        """Rules that need the model's family, checked before any weights load: options that only other families
        (or their objective) read are refused, the resolution fits, the samplers exist for its kind of model."""
        from .families import FAMILIES
        from .objectives import OBJECTIVES
        from .sampling import resolve_sampler

        for name in family.unsupported_options:
            if getattr(self, name) is not None:
                raise ConfigError(name, getattr(self, name), f"{family.name} models' pipeline does not use it; "
                                  "remove it")
        if self.train_text_encoder and not family.trained_text_encoders:
            raise ConfigError("train_text_encoder", True, f"{family.name} models train no text encoder here (their "
                              "language model stays frozen, as in the reference scripts); remove it")
        reads = {*family.options, *OBJECTIVES[family.objective].options}
        scoped = {opt for kind in (*FAMILIES.values(), *OBJECTIVES.values()) for opt in kind.options}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in sorted(scoped - reads):
            if getattr(self, name) != defaults[name]:
                raise ConfigError(name, getattr(self, name), f"means nothing for {family.name} models "
                                  f"({family.pipeline_classes[0]}); remove it")
        multiple = family.resolution_multiple
        if self.resolution is not None and self.resolution % multiple:
            raise ConfigError("resolution", self.resolution, f"must be a multiple of {multiple} for {family.name} "
                              f"models (e.g. {_multiples_near(self.resolution, multiple)})")
        if self.aspect_ratio_buckets is not None:
            from .data.buckets import parse

            parse(self.aspect_ratio_buckets, multiple)
        # only the T5 families get here with it set: the others refuse it above as meaning nothing to them
        limit = getattr(family, "max_sequence_length_limit", None)
        if self.max_sequence_length is not None and limit is not None and self.max_sequence_length > limit:
            raise ConfigError("max_sequence_length", self.max_sequence_length, f"at most {limit} for "
                              f"{family.name} models (their T5 text encoder reads no more tokens)")
        resolve_sampler(self.class_sampler, family, "class_sampler")
        resolve_sampler(self.validation_sampler, family, "validation_sampler")
