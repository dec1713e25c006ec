"""What every model family provides; the training loop talks to families only through this interface."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import ModelError, first_line
from ..latent_cache import vae_posterior
from ..objectives import OBJECTIVES, Denoise


@dataclass
class ModelSource:
    """Where a base model comes from: a local folder or a hub id, with revision and variant; optionally a VAE
    from elsewhere (e.g. the fp16-fix SDXL VAE) and a tokenizer from elsewhere."""

    name_or_path: str
    revision: str | None = None
    variant: str | None = None
    tokenizer_name: str | None = None
    vae: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.name_or_path).expanduser().exists()

    @property
    def path(self) -> Path:
        return Path(self.name_or_path).expanduser()

    def hub_kwargs(self) -> dict[str, Any]:
        return {"revision": self.revision, "variant": self.variant, "use_safetensors": True}


@dataclass
class Components:
    """The loaded parts of a pipeline. Text encoders are keyed by their pipeline attribute (`text_encoder`,
    `text_encoder_2`, ...), and so are the tokenizers that feed them; the first pair is the primary one. The
    denoiser is the pipeline's `unet` or `transformer`."""

    family: str
    source: ModelSource
    tokenizers: dict[str, Any]  # by the name of the text encoder each one feeds
    text_encoders: dict[str, torch.nn.Module]
    vae: torch.nn.Module
    denoiser: torch.nn.Module
    noise_scheduler: Any  # the training schedule
    frozen: dict[Any, torch.Tensor] = field(default_factory=dict)  # what frozen text encoders gave, by input

    @property
    def tokenizer(self) -> Any:
        return next(iter(self.tokenizers.values()))

    @property
    def text_encoder(self) -> torch.nn.Module:
        return next(iter(self.text_encoders.values()))


class ModelFamily(ABC):
    """A family of text-to-image pipelines (SD 1.x/2.x, SDXL, SD3, Flux, ...) behind one interface; the training
    loop, generation, evaluation and export talk to families only through it. A new family is one module that
    subclasses this (usually through `DiffusersFamily`), fills the abstract hooks and registers itself."""

    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]  # model_index.json `_class_name`s this family reads
    default_resolution: ClassVar[int]  # training resolution when --resolution is not given
    lora_learning_rate: ClassVar[float]  # --use_lora without --learning_rate
    # --train_text_encoder without --text_encoder_lr / --adam_weight_decay_text_encoder (None: the denoiser's);
    # the SDXL, SD3 and Flux reference scripts train their CLIPs at 5e-6 with weight decay 1e-3
    text_encoder_learning_rate: ClassVar[float | None] = None
    text_encoder_weight_decay: ClassVar[float | None] = None
    resolution_multiple: ClassVar[int] = 8  # the VAE downsamples by 8 (Flux packs 2x2 latents: 16)
    denoiser_name: ClassVar[str]  # the pipeline attribute of the trained denoiser: unet or transformer
    objective: ClassVar[str]  # the OBJECTIVES entry that trains it
    options: ClassVar[tuple[str, ...]] = ()  # TrainConfig fields only this family reads (e.g. Flux's guidance_scale)
    option_defaults: ClassVar[dict[str, Any]] = {}  # its values of those (and of its objective's) left unset
    unsupported_options: ClassVar[tuple[str, ...]] = ()  # TrainConfig fields its pipeline would ignore
    default_sampler: ClassVar[str]
    default_guidance: ClassVar[float]  # for class images, validation, generate and evaluate
    default_lora_targets: ClassVar[tuple[str, ...]]  # denoiser modules that get adapters by default
    trained_text_encoders: ClassVar[tuple[str, ...]]  # what --train_text_encoder trains (T5 never is)
    # class images and validation grids at --resolution, where the pipeline's default size is not the model's
    # (Flux: always 1024); else at the pipeline's default, the model's own
    render_at_training_size: ClassVar[bool] = False
    # --fsdp: the denoiser's attributes whose blocks (each child of a ModuleList, or the module itself) are sharded
    # one by one, so that only one block's full weights exist at a time
    shard_blocks: ClassVar[tuple[str, ...]]
    # --lora_blocks: (the denoiser's attribute holding its blocks, the config key of their count); a family that
    # lists "lora_blocks" in its options must set it
    lora_block_list: ClassVar[tuple[str, str] | None] = None
    latent_mode: ClassVar[bool] = False  # trains on the VAE posterior's mode (Flux.2, Z-Image), not a sample of it
    # how a LoKr / LoHa file for ComfyUI and A1111 names a denoiser module: this prefix, then the diffusers module
    # path (with "_" for "." after a prefix ending in "_": LyCORIS's own naming); None: `<denoiser_name>.<path>`,
    # the diffusers names ComfyUI maps itself (see lora_formats.lycoris)
    lycoris_prefix: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "lora_blocks" in getattr(cls, "options", ()) and cls.lora_block_list is None:
            raise TypeError(f"{cls.__name__} reads --lora_blocks but sets no lora_block_list")

    @property
    def sampler_kind(self) -> str:
        """Which samplers fit (sampling.SAMPLERS): its objective's ("ddpm" or "flow")."""
        return OBJECTIVES[self.objective].sampler_kind

    def lora_defaults(self, config: Any) -> list[str]:
        """The denoiser modules that get adapters without --lora_target_modules, for a denoiser of this config
        (a family whose reference names modules per block adds them here)."""
        return list(self.default_lora_targets)

    def posterior(self, vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the frozen VAE's posterior for images (N, 3, H, W), as (N, C, h, w) latents (a family
        whose VAE has a frame axis adds and drops it here)."""
        return vae_posterior(vae, pixels)

    def guidance(self, scale: float, count: int, negative_prompt: str | None = None) -> dict[str, Any]:
        """The pipeline call's guidance keywords for `count` prompts: the scale and (when given) the negative
        prompt, as `guidance_scale` and `negative_prompt` for most pipelines."""
        return {"guidance_scale": scale, **({"negative_prompt": [negative_prompt] * count} if negative_prompt else {})}

    def option(self, cfg: Any, name: str) -> Any:
        """A TrainConfig option this family reads: the user's value, else the family's default."""
        value = getattr(cfg, name, None)
        return self.option_defaults.get(name) if value is None else value

    def pipeline_kwargs(self, cfg: Any = None) -> dict[str, Any]:
        """What its pipeline call needs from the run's options (T5 length, image size) for class images and
        validation grids; without a run (generate, evaluate), the family's defaults, as training uses them."""
        resolution = getattr(cfg, "resolution", None)
        return {"height": resolution, "width": resolution} if self.render_at_training_size and resolution else {}

    @abstractmethod
    def check_source(self, source: ModelSource) -> None:
        """Raise ModelError if the model cannot be this family's pipeline; cheap, no weights are read."""

    @abstractmethod
    def load(self, source: ModelSource, prediction_type: str | None = None,
             quantization: dict[str, Any] | None = None) -> Components:
        """Every part training needs, from a folder or hub id; `quantization` (from_pretrained keywords: a
        diffusers quantization config and its dtype) loads the denoiser quantized, on the GPU."""

    @abstractmethod
    def load_text(self, source: ModelSource) -> tuple[Any, torch.nn.Module]:
        """(tokenizer, text encoder) of the primary (CLIP) encoder alone, for identifier search."""

    @abstractmethod
    def tokenize(self, c: Components, prompts: list[str], cfg: Any) -> dict[str, torch.Tensor]:
        """Prompts -> token ids (prompts, length) per text encoder name."""

    @abstractmethod
    def encode(self, c: Components, input_ids: dict[str, torch.Tensor], cfg: Any,
               text_encoders: dict[str, torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """Token ids -> per-prompt conditioning tensors (leading dimension: prompts) as the pipeline encodes them,
        with `text_encoders` (the trained ones) in place of the loaded ones when given."""

    @abstractmethod
    def normalize_latents(self, c: Components, latents: torch.Tensor) -> torch.Tensor:
        """A VAE sample -> what the denoiser trains on (shift and scale, as the pipeline undoes them)."""

    @abstractmethod
    def denoiser_call(self, c: Components, denoiser: torch.nn.Module, cond: dict[str, torch.Tensor],
                      batch: dict[str, Any], cfg: Any) -> Denoise:
        """How the denoiser is called on a batch: per-example conditioning (one row per example) bound, latents
        in and out in (N, C, H, W) (a family that packs them packs and unpacks here)."""

    @abstractmethod
    def pipeline(self, c: Components, denoiser: torch.nn.Module, text_encoders: dict[str, torch.nn.Module],
                 scheduler: Any) -> Any:
        """An inference pipeline built from (possibly trained) modules, without reloading anything."""

    @abstractmethod
    def load_pipeline(self, source: ModelSource, dtype: torch.dtype) -> Any:
        """The whole inference pipeline, for generate and evaluate (and class images when nothing is loaded)."""

    @abstractmethod
    def pipeline_around(self, c: Components, denoiser: torch.nn.Module,
                        text_encoders: dict[str, torch.nn.Module]) -> Any:
        """The base model's own pipeline (its inference scheduler) around modules already loaded: only what they
        lack (scheduler, feature extractor) is read from the model, as `load_pipeline` reads it."""

    @abstractmethod
    def save(self, c: Components, denoiser: torch.nn.Module, text_encoders: dict[str, torch.nn.Module],
             output_dir: Path, dtype: torch.dtype | None = None) -> None:
        """The fine-tuned pipeline as a diffusers folder (every weight in `dtype` when given)."""

    @abstractmethod
    def lora_file(self, denoiser: torch.nn.Module, text_encoders: dict[str, torch.nn.Module] | None,
                  copy: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[Path], None]:
        """The adapters as the diffusers LoRA file (`pytorch_lora_weights.safetensors`) of this family's pipeline:
        their tensors taken now (through `copy`, for a checkpoint written in the background), the file written into
        a folder when the returned function is called."""

    def save_lora(self, denoiser: torch.nn.Module, text_encoders: dict[str, torch.nn.Module] | None,
                  output_dir: Path) -> None:
        self.lora_file(denoiser, text_encoders)(output_dir)

    def single_file_state(self, pipe: Any) -> dict[str, torch.Tensor]:
        """The pipeline's weights in the original single-file layout that A1111 / ComfyUI load (a family whose
        models have no such layout leaves this as it is: the export is refused in one line)."""
        raise ModelError(f"{self.name} models have no single-file layout here; use --format merged (a diffusers "
                         "folder ComfyUI and diffusers load)")

    def vae_dtype(self, c: Components, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype the frozen VAE encodes in under mixed precision."""
        return weight_dtype

    def kohya_lora(self, state: dict[str, torch.Tensor], lora_alpha: float, rank: int, source: ModelSource
                   ) -> dict[str, torch.Tensor]:
        """A run's LoRA (peft-format keys) in the kohya layout that A1111 / ComfyUI read for this family."""
        raise ModelError(f"{self.name} LoRAs have no kohya layout; ComfyUI and diffusers load the run's "
                         "pytorch_lora_weights.safetensors as it is")


def read_model_index(source: ModelSource) -> dict[str, Any]:
    """model_index.json of a local folder or hub repo, or a ModelError saying what is wrong."""
    if source.is_local:
        index = source.path / "model_index.json"
        if not source.path.is_dir():
            raise ModelError(f"model {source.name_or_path} is a file, not a diffusers pipeline folder; "
                             "convert single-file checkpoints with diffusers' from_single_file first")
        if not index.is_file():
            raise ModelError(f"model folder {source.name_or_path} is not a diffusers pipeline (no model_index.json); "
                             "pass the folder that holds model_index.json, unet/, vae/, text_encoder/")
        try:
            return json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{index} is not valid JSON ({e}); re-download or re-save the model") from None
    if source.name_or_path.startswith((".", "/", "~")) or source.name_or_path.count("/") != 1:
        raise ModelError(f"model {source.name_or_path!r} is neither an existing folder nor a hub id (owner/name); "
                         "check the path")
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(source.name_or_path, revision=source.revision)
    except Exception as e:  # network, auth, missing repo: all reported as one line
        first = first_line(e, 300)
        raise ModelError(f"cannot fetch {source.name_or_path} from the hub ({first}); "
                         "check the id, your network, or pass a local folder") from None


def model_identity(source: ModelSource, part: str) -> dict[str, Any]:
    """A cheap fingerprint of the base model: changes when its denoiser's weights (the pipeline folder `part`, the
    family's denoiser_name) change, not when it is moved."""
    ident: dict[str, Any] = {"model": source.name_or_path, "revision": source.revision, "variant": source.variant}
    if source.is_local:
        weights = sorted((source.path / part).glob("*.safetensors"))
        h = hashlib.sha256()
        for path in weights:
            size = path.stat().st_size
            h.update(f"{path.name}:{size}".encode())
            with path.open("rb") as f:
                h.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read(1 << 20))
        # Content only, no path: a moved or re-cloned model keeps its class images (and their seeds).
        ident = {"variant": source.variant, f"{part}_digest": h.hexdigest()[:16]}
    if source.vae is not None:  # a replaced VAE changes every generated image
        ident["vae"] = source.vae
    return ident
