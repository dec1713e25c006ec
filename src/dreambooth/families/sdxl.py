"""Stable Diffusion XL: two CLIP text encoders whose penultimate hidden states are concatenated, the second one's
pooled (projected) embedding, and micro-conditioning on each image's original size, crop and target size."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ..devices import to_device
from . import register
from .base import Components
from .common import TextPart
from .sd import StableDiffusion


@register
class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    default_resolution = 1024
    lora_learning_rate = 1e-4  # --use_lora without --learning_rate: the reference LoRA script's
    text_encoder_learning_rate, text_encoder_weight_decay = 5e-6, 1e-3  # the reference scripts'
    pipeline_class = StableDiffusionXLPipeline
    text_parts = (TextPart("tokenizer", "text_encoder", CLIPTextModel),
                  TextPart("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
    load_options = {"add_watermarker": False}
    optional_parts = ("image_encoder", "feature_extractor")
    upcast_vae_in_fp16 = True
    trained_text_encoders = ("text_encoder", "text_encoder_2")

    def encode(self, c: Components, input_ids: dict[str, torch.Tensor], cfg: Any,
               text_encoders: dict[str, torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """As the SDXL pipeline encodes a prompt: penultimate layers concatenated, and the second encoder's
        projected pooled output."""
        encoders = {**c.text_encoders, **(text_encoders or {})}
        hidden, pooled = [], None
        for part in self.text_parts:
            encoder = encoders[part.encoder]
            out = encoder(to_device(input_ids[part.encoder], encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # CLIPTextModelWithProjection: text_embeds
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def unet_kwargs(self, cond: dict[str, torch.Tensor], batch: dict[str, Any], cfg: Any) -> dict[str, Any]:
        """add_time_ids per example: (original height, width, crop top, left, target height, width)."""
        states = cond["encoder_hidden_states"]
        target = batch["target_sizes"]  # the training size (an aspect-ratio bucket's, or the square)
        time_ids = torch.cat([batch["original_sizes"], batch["crop_top_lefts"], target], dim=1)
        return {"encoder_hidden_states": states,
                "added_cond_kwargs": {"text_embeds": cond["text_embeds"],
                                      "time_ids": to_device(time_ids, states.device, states.dtype)}}

    def single_file_state(self, pipe: Any) -> dict[str, torch.Tensor]:
        from ..single_file import pipeline_to_ldm

        return pipeline_to_ldm(pipe, {"text_encoder": ("clip", "conditioner.embedders.0.transformer."),
                                      "text_encoder_2": ("open_clip", "conditioner.embedders.1.model.")})
