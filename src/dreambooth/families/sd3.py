"""Stable Diffusion 3 / 3.5: an MMDiT transformer (`SD3Transformer2DModel`) trained by rectified flow; CLIP-L and
CLIP-G (penultimate hidden states concatenated, pooled projections concatenated) and T5 (optional: the pipeline
zero-fills its part without it); a 16-channel VAE with shift and scaling factors."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from ..devices import to_device
from . import register
from .base import Components, Denoise
from .common import DiffusersFamily, TextPart

T5_PART = "text_encoder_3"


@register
class StableDiffusion3(DiffusersFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    pipeline_class = StableDiffusion3Pipeline
    denoiser_name = "transformer"
    shard_blocks = ("transformer_blocks",)
    denoiser_class = SD3Transformer2DModel
    scheduler_class = FlowMatchEulerDiscreteScheduler
    text_parts = (TextPart("tokenizer", "text_encoder", CLIPTextModelWithProjection),
                  TextPart("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection),
                  TextPart("tokenizer_3", T5_PART, T5EncoderModel, optional=True))
    optional_parts = ("image_encoder", "feature_extractor")
    default_resolution = 512  # the reference scripts' default (the models' own is 1024)
    lora_learning_rate = 1e-4  # --use_lora without --learning_rate: the reference LoRA script's
    text_encoder_learning_rate, text_encoder_weight_decay = 5e-6, 1e-3  # the reference scripts'
    resolution_multiple = 16  # the transformer patches latents 2x2
    objective = "rectified_flow"
    options = ("max_sequence_length", "lora_blocks")
    lora_block_list = ("transformer_blocks", "num_layers")  # its joint blocks
    # the reference script's: its T5 length is 77 (the pipeline's own default is 256)
    option_defaults = {"weighting_scheme": "logit_normal", "precondition_outputs": True, "max_sequence_length": 77}
    t5_part = T5_PART
    default_sampler = "euler"
    default_guidance = 7.0
    default_lora_targets = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                            "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
    trained_text_encoders = ("text_encoder", "text_encoder_2")

    def encode(self, c: Components, input_ids: dict[str, torch.Tensor], cfg: Any,
               text_encoders: dict[str, torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """As `StableDiffusion3Pipeline.encode_prompt`: both CLIPs' penultimate layers side by side, zero-padded
        to T5's width, then T5's sequence after them; the pooled projections side by side."""
        encoders = {**c.text_encoders, **(text_encoders or {})}
        hidden, pooled = [], []
        for part in self.text_parts[:2]:
            encoder = encoders[part.encoder]
            out = encoder(to_device(input_ids[part.encoder], encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        if T5_PART in encoders:
            t5, ids = encoders[T5_PART], input_ids[T5_PART]
            t5_states = self.frozen_states(c, T5_PART, ids, lambda x: t5(to_device(x, t5.device))[0]).to(clip.dtype)
        else:  # as the pipeline does without T5
            width = c.denoiser.config.joint_attention_dim
            t5_states = clip.new_zeros(clip.shape[0], self.option(cfg, "max_sequence_length"), width)
        clip = torch.nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5_states], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}

    def denoiser_call(self, c: Components, denoiser: torch.nn.Module, cond: dict[str, torch.Tensor],
                      batch: dict[str, Any], cfg: Any) -> Denoise:
        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond[
                "encoder_hidden_states"], pooled_projections=cond["pooled_projections"], return_dict=False)[0]

        return denoise

    def single_file_state(self, pipe: Any) -> dict[str, torch.Tensor]:
        from ..single_file_mmdit import sd3_single_file

        return sd3_single_file(pipe)
