"""Stable Diffusion XL: two CLIP text encoders whose penultimate hidden states are concatenated, the second one's
pooled (projected) embedding, and micro-conditioning on each image's original size, crop and target size."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from . import register
from .base import Components
from .sd import StableDiffusion


@register
class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    default_resolution = 1024
    pipeline_class = StableDiffusionXLPipeline
    text_parts = (("tokenizer", "text_encoder", CLIPTextModel),
                  ("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
    load_options = {"add_watermarker": False}
    optional_parts = ("image_encoder", "feature_extractor")

    def encode(self, c: Components, input_ids: torch.Tensor,
               text_encoders: dict[str, torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """As the SDXL pipeline encodes a prompt: penultimate layers concatenated, and the second encoder's
        projected pooled output."""
        encoders = {**c.text_encoders, **(text_encoders or {})}
        hidden, pooled = [], None
        for i, (_, name, _) in enumerate(self.text_parts):
            encoder = encoders[name]
            out = encoder(input_ids[:, i].to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # CLIPTextModelWithProjection: text_embeds
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def unet_inputs(self, cond: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], resolution: int
                    ) -> dict[str, Any]:
        """add_time_ids per example: (original height, width, crop top, left, target height, width)."""
        states = cond["encoder_hidden_states"]
        target = torch.tensor([resolution, resolution]).expand(len(batch["original_sizes"]), 2)
        time_ids = torch.cat([batch["original_sizes"], batch["crop_top_lefts"], target], dim=1)
        return {"encoder_hidden_states": states,
                "added_cond_kwargs": {"text_embeds": cond["text_embeds"],
                                      "time_ids": time_ids.to(states.device, states.dtype)}}

    def vae_dtype(self, c: Components, weight_dtype: torch.dtype) -> torch.dtype:
        """SDXL's own VAE overflows in fp16 (its config says force_upcast): it stays fp32 unless a separate VAE
        (the fp16-fix one) is given."""
        if weight_dtype == torch.float16 and c.source.vae is None and getattr(c.vae.config, "force_upcast", False):
            return torch.float32
        return weight_dtype

    def single_file_text_layout(self, pipe: Any) -> dict[str, tuple[str, str]]:
        return {"text_encoder": ("clip", "conditioner.embedders.0.transformer."),
                "text_encoder_2": ("open_clip", "conditioner.embedders.1.model.")}
