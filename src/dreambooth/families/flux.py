"""Flux.1: a rectified-flow transformer (`FluxTransformer2DModel`) over 2x2-packed latents with positional ids;
CLIP-L's pooled output and T5's sequence condition it; the dev models also take the guidance value as an input
(guidance distillation)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from ..devices import to_device
from . import register
from .base import Components, Denoise, ModelSource
from .common import DiffusersFamily, TextPart

T5_PART = "text_encoder_2"


@register
class Flux(DiffusersFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    pipeline_class = FluxPipeline
    denoiser_name = "transformer"
    shard_blocks = ("transformer_blocks", "single_transformer_blocks")
    denoiser_class = FluxTransformer2DModel
    scheduler_class = FlowMatchEulerDiscreteScheduler
    text_parts = (TextPart("tokenizer", "text_encoder", CLIPTextModel),
                  TextPart("tokenizer_2", T5_PART, T5EncoderModel))
    optional_parts = ("image_encoder", "feature_extractor")
    default_resolution = 512  # the reference scripts' default
    lora_learning_rate = 1e-4  # --use_lora without --learning_rate: the reference LoRA script's
    text_encoder_learning_rate, text_encoder_weight_decay = 5e-6, 1e-3  # the reference scripts'
    resolution_multiple = 16  # latents are packed 2x2
    objective = "rectified_flow"
    options = ("max_sequence_length", "guidance_scale", "lora_blocks")
    lora_block_list = ("transformer_blocks", "num_layers")  # its double-stream blocks
    # guidance_scale: the value the dev transformer is told while training (the reference's default)
    option_defaults = {"weighting_scheme": "none", "precondition_outputs": False, "max_sequence_length": 512,
                       "guidance_scale": 3.5}
    unsupported_options = ("class_negative_prompt",)  # FluxPipeline ignores it without true CFG
    t5_part = T5_PART
    default_sampler = "euler"
    default_guidance = 3.5
    default_lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                            "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                            "ff_context.net.0.proj", "ff_context.net.2")
    trained_text_encoders = ("text_encoder",)
    render_at_training_size = True

    def encode(self, c: Components, input_ids: dict[str, torch.Tensor], cfg: Any,
               text_encoders: dict[str, torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """As `FluxPipeline.encode_prompt`: CLIP-L's pooled output, T5's last hidden states."""
        encoders = {**c.text_encoders, **(text_encoders or {})}
        clip, t5 = encoders["text_encoder"], encoders[T5_PART]
        pooled = clip(to_device(input_ids["text_encoder"], clip.device), output_hidden_states=False).pooler_output
        ids = input_ids[T5_PART]
        states = self.frozen_states(c, T5_PART, ids,
                                    lambda x: t5(to_device(x, t5.device), output_hidden_states=False)[0])
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def denoiser_call(self, c: Components, denoiser: torch.nn.Module, cond: dict[str, torch.Tensor],
                      batch: dict[str, Any], cfg: Any) -> Denoise:
        """Pack the latents 2x2 with their positional ids, pass the timestep as a fraction of 1000 and (dev) the
        training guidance, unpack the prediction: FluxPipeline's own helpers, as the reference scripts use them."""
        states, pooled = cond["encoder_hidden_states"], cond["pooled_projections"]
        text_ids = torch.zeros(states.shape[1], 3, device=states.device, dtype=states.dtype)
        config = denoiser.config

        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            n, channels, height, width = noisy.shape
            packed = FluxPipeline._pack_latents(noisy, n, channels, height, width)
            image_ids = FluxPipeline._prepare_latent_image_ids(n, height // 2, width // 2, noisy.device, noisy.dtype)
            guidance = None
            if config.guidance_embeds:
                value = float(self.option(cfg, "guidance_scale"))
                guidance = torch.full((n,), value, device=noisy.device, dtype=torch.float32)
            pred = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                            pooled_projections=pooled, encoder_hidden_states=states, txt_ids=text_ids,
                            img_ids=image_ids, return_dict=False)[0]
            scale = 2 ** (len(c.vae.config.block_out_channels) - 1)
            return FluxPipeline._unpack_latents(pred, height * scale, width * scale, scale)

        return denoise

    lycoris_prefix = "lycoris_"  # ComfyUI maps each of q, k, v onto its rows of BFL's fused linear

    def kohya_lora(self, state: dict[str, torch.Tensor], lora_alpha: float, rank: int, source: ModelSource
                   ) -> dict[str, torch.Tensor]:
        """BFL's fused layout, as most Flux LoRAs in the wild are; the widths of fused parts without an adapter
        come from the base model's transformer config."""
        from ..lora_formats import kohya_flux
        from .common import loading

        with loading(source, "transformer"):
            config = FluxTransformer2DModel.load_config(source.name_or_path, subfolder="transformer",
                                                        revision=source.revision)
        inner = config["num_attention_heads"] * config["attention_head_dim"]
        widths = {"to_q": inner, "to_k": inner, "to_v": inner, "add_q_proj": inner, "add_k_proj": inner,
                  "add_v_proj": inner, "proj_mlp": int(inner * 4.0)}  # FluxSingleTransformerBlock's mlp_ratio
        return kohya_flux(state, lora_alpha, rank, widths)

    def single_file_state(self, pipe: Any) -> dict[str, torch.Tensor]:
        from ..single_file_mmdit import flux_single_file

        return flux_single_file(pipe)
