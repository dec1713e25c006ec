"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, an epsilon or v-prediction UNet, a KL VAE."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel

from ..errors import ModelError
from . import register
from .base import Components, ModelFamily, ModelSource

REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@contextmanager
def loading(source: ModelSource, part: str):
    """Turn the libraries' loading errors into one line that names the part and the fix."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        hint = ("weights load from .safetensors only; convert .bin/.ckpt files with diffusers' conversion scripts"
                if "safetensors" in str(e).lower() else "check that the folder is a complete diffusers pipeline")
        raise ModelError(f"cannot load {part} of {source.name_or_path}: {first}; {hint}") from None


@register
class StableDiffusion(ModelFamily):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)

    def check_source(self, source: ModelSource) -> None:
        """The pipeline's part folders exist (local folders only; hub repos are checked when loading)."""
        if source.is_local:
            missing = [p for p in REQUIRED_PARTS if not (source.path / p).is_dir()]
            if missing:
                raise ModelError(f"model folder {source.name_or_path} lacks {', '.join(m + '/' for m in missing)}; "
                                 "it is not a complete Stable Diffusion pipeline")

    def load_text(self, source: ModelSource) -> tuple[Any, torch.nn.Module]:
        """Only the tokenizer and text encoder (for identifier search)."""
        self.check_source(source)
        with loading(source, "tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(
                source.tokenizer_name or source.name_or_path,
                subfolder=None if source.tokenizer_name else "tokenizer", revision=source.revision,
            )
        with loading(source, "text_encoder"):
            text_encoder = CLIPTextModel.from_pretrained(source.name_or_path, subfolder="text_encoder",
                                                         **source.hub_kwargs())
        return tokenizer, text_encoder

    def load(self, source: ModelSource, prediction_type: str | None = None) -> Components:
        tokenizer, text_encoder = self.load_text(source)
        kw = source.hub_kwargs()
        name = source.name_or_path
        with loading(source, "scheduler"):
            scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", revision=source.revision)
        if prediction_type is not None:
            scheduler.register_to_config(prediction_type=prediction_type)
        with loading(source, "vae"):
            vae = AutoencoderKL.from_pretrained(name, subfolder="vae", **kw)
        with loading(source, "unet"):
            unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", **kw)
        return Components(self.name, source, tokenizer, text_encoder, vae, unet, scheduler)

    def tokenize(self, c: Components, prompts: list[str]) -> torch.Tensor:
        return c.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=c.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids

    def encode(self, c: Components, input_ids: torch.Tensor, text_encoder: torch.nn.Module | None = None
               ) -> dict[str, torch.Tensor]:
        encoder = text_encoder if text_encoder is not None else c.text_encoder
        return {"encoder_hidden_states": encoder(input_ids.to(encoder.device))[0]}

    def pipeline(self, c: Components, unet: torch.nn.Module, text_encoder: torch.nn.Module, scheduler: Any
                 ) -> StableDiffusionPipeline:
        pipe = StableDiffusionPipeline(
            vae=c.vae, text_encoder=text_encoder, tokenizer=c.tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def load_pipeline(self, source: ModelSource, dtype: torch.dtype) -> StableDiffusionPipeline:
        self.check_source(source)
        with loading(source, "pipeline"):
            pipe = StableDiffusionPipeline.from_pretrained(
                source.name_or_path, dtype=dtype, safety_checker=None, requires_safety_checker=False,
                **source.hub_kwargs(),
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save(self, c: Components, unet: torch.nn.Module, text_encoder: torch.nn.Module, output_dir: Path) -> None:
        """The base pipeline with the trained modules swapped in; the base's own inference scheduler is kept."""
        with loading(c.source, "pipeline"):
            pipe = StableDiffusionPipeline.from_pretrained(
                c.source.name_or_path, unet=unet, text_encoder=text_encoder, vae=c.vae, tokenizer=c.tokenizer,
                **c.source.hub_kwargs(),
            )
        pipe.save_pretrained(output_dir, safe_serialization=True)

    def save_lora(self, unet: torch.nn.Module, text_encoder: torch.nn.Module | None, output_dir: Path) -> None:
        """peft-format keys (`unet.<module>.lora_A.weight`) with each adapter's config as metadata, so a custom
        lora_alpha survives loading."""
        from peft.utils import get_peft_model_state_dict

        def layers(module):
            return get_peft_model_state_dict(module, save_embedding_layers=False) if module is not None else None

        def metadata(module):
            return module.peft_config["default"].to_dict() if module is not None else None

        StableDiffusionPipeline.save_lora_weights(
            output_dir, unet_lora_layers=layers(unet), text_encoder_lora_layers=layers(text_encoder),
            unet_lora_adapter_metadata=metadata(unet), text_encoder_lora_adapter_metadata=metadata(text_encoder),
            safe_serialization=True)
