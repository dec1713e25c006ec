"""What every model family provides; the training loop talks to families only through this interface."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import ModelError, first_line


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
    `text_encoder_2`, ...) and tokenizers are in the same order; the first pair is the primary one."""

    family: str
    source: ModelSource
    tokenizers: list[Any]
    text_encoders: dict[str, torch.nn.Module]
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers[0]

    @property
    def text_encoder(self) -> torch.nn.Module:
        return next(iter(self.text_encoders.values()))

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


class ModelFamily:
    """A family of text-to-image pipelines (SD 1.x/2.x, SDXL, ...) behind one interface."""

    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]  # model_index.json `_class_name`s this family reads
    default_resolution: ClassVar[int]  # training resolution when --resolution is not given

    def check_source(self, source: ModelSource) -> None:
        """Raise ModelError if the model cannot be this family's pipeline; cheap, no weights are read."""

    def load(self, source: ModelSource, prediction_type: str | None = None) -> Components:
        raise NotImplementedError

    def load_text(self, source: ModelSource) -> tuple[Any, torch.nn.Module]:
        """(tokenizer, text encoder) alone, for identifier search."""
        raise NotImplementedError

    def tokenize(self, c: Components, prompts: list[str]) -> torch.Tensor:
        """Prompts -> token ids, shape (prompts, tokenizers, length)."""
        raise NotImplementedError

    def encode(self, c: Components, input_ids: torch.Tensor,
               text_encoders: dict[str, torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """Token ids -> per-prompt conditioning tensors (encoder_hidden_states, ...), with `text_encoders` (the
        trained ones) in place of the loaded ones when given."""
        raise NotImplementedError

    def unet_inputs(self, cond: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], resolution: int
                    ) -> dict[str, Any]:
        """Per-example conditioning (one row per example of `batch`) -> the UNet's keyword arguments."""
        return cond

    def vae_dtype(self, c: Components, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype the frozen VAE encodes in under mixed precision."""
        return weight_dtype

    def pipeline(self, c: Components, unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module],
                 scheduler: Any) -> Any:
        """An inference pipeline built from (possibly trained) modules, without reloading anything."""
        raise NotImplementedError

    def load_pipeline(self, source: ModelSource, dtype: torch.dtype) -> Any:
        raise NotImplementedError

    def save(self, c: Components, unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module],
             output_dir: Path) -> None:
        raise NotImplementedError

    def single_file_text_layout(self, pipe: Any) -> dict[str, tuple[str, str]]:
        """For the original single-file checkpoint: each text encoder's (layout, key prefix), where layout is
        `clip` (transformers keys) or `open_clip`."""
        raise NotImplementedError

    def save_lora(self, unet: torch.nn.Module, text_encoders: dict[str, torch.nn.Module] | None,
                  output_dir: Path) -> None:
        """The adapters as the diffusers LoRA file (`pytorch_lora_weights.safetensors`) of this family's pipeline."""
        raise NotImplementedError


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


def model_identity(source: ModelSource) -> dict[str, Any]:
    """A cheap fingerprint of the base model: changes when its UNet weights change, not when it is moved."""
    ident: dict[str, Any] = {"model": source.name_or_path, "revision": source.revision, "variant": source.variant}
    if source.is_local:
        weights = sorted((source.path / "unet").glob("*.safetensors"))
        h = hashlib.sha256()
        for path in weights:
            size = path.stat().st_size
            h.update(f"{path.name}:{size}".encode())
            with path.open("rb") as f:
                h.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read(1 << 20))
        # Content only, no path: a moved or re-cloned model keeps its class images (and their seeds).
        ident = {"variant": source.variant, "unet_digest": h.hexdigest()[:16]}
    if source.vae is not None:  # a replaced VAE changes every generated image
        ident["vae"] = source.vae
    return ident
