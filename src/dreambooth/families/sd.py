"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, an epsilon or v-prediction UNet on a DDPM schedule, a KL VAE.
SDXL (`sdxl.py`) builds on this class: it adds a second encoder, pooled embeddings and size conditioning."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from ..devices import to_device
from . import register
from .base import Components, Denoise, ModelSource
from .common import DiffusersFamily, TextPart


@register
class StableDiffusion(DiffusersFamily):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    pipeline_class = StableDiffusionPipeline
    denoiser_name = "unet"
    shard_blocks = ("down_blocks", "mid_block", "up_blocks")
    denoiser_class = UNet2DConditionModel
    scheduler_class = DDPMScheduler
    text_parts = (TextPart("tokenizer", "text_encoder", CLIPTextModel),)
    load_options = {"safety_checker": None, "requires_safety_checker": False}
    optional_parts = ("feature_extractor",)
    upcast_vae_in_fp16 = False
    default_resolution = 512
    lora_learning_rate = 5e-4  # --use_lora without --learning_rate: the reference LoRA script's
    objective = "ddpm"
    default_sampler = "dpm++"
    default_guidance = 7.5
    default_lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    trained_text_encoders = ("text_encoder",)

    def encode(self, c: Components, input_ids: dict[str, torch.Tensor], cfg: Any,
               text_encoders: dict[str, torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
        encoder = {**c.text_encoders, **(text_encoders or {})}["text_encoder"]
        return {"encoder_hidden_states": encoder(to_device(input_ids["text_encoder"], encoder.device))[0]}

    def unet_kwargs(self, cond: dict[str, torch.Tensor], batch: dict[str, Any], cfg: Any) -> dict[str, Any]:
        """The UNet's conditioning keywords for a batch (SDXL adds size conditioning)."""
        return cond

    def denoiser_call(self, c: Components, denoiser: torch.nn.Module, cond: dict[str, torch.Tensor],
                      batch: dict[str, Any], cfg: Any) -> Denoise:
        kwargs = self.unet_kwargs(cond, batch, cfg)
        return lambda noisy, timesteps: denoiser(noisy, timesteps, **kwargs).sample

    lycoris_prefix = "lora_unet_"  # the kohya/LyCORIS UNet names (ComfyUI maps them through unet_to_diffusers)

    def kohya_lora(self, state: dict[str, torch.Tensor], lora_alpha: float, rank: int, source: ModelSource
                   ) -> dict[str, torch.Tensor]:
        from ..lora_formats import kohya_sd

        return kohya_sd(state, lora_alpha)

    def single_file_state(self, pipe: Any) -> dict[str, torch.Tensor]:
        """SD 1.x keeps OpenAI CLIP (quick_gelu) in transformers keys; SD 2.x's OpenCLIP encoder (gelu) is stored
        in OpenCLIP's own layout."""
        from ..single_file import pipeline_to_ldm

        if pipe.text_encoder.config.hidden_act == "gelu":
            return pipeline_to_ldm(pipe, {"text_encoder": ("open_clip", "cond_stage_model.model.")})
        return pipeline_to_ldm(pipe, {"text_encoder": ("clip", "cond_stage_model.transformer.")})
