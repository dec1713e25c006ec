"""Z-Image (base and Turbo): a single-stream rectified-flow transformer (`ZImageTransformer2DModel`) over 2x2
patches of a 16-channel VAE's latents (shift and scale as Flux's), conditioned on the penultimate hidden states of a
Qwen3 model with the padding dropped (one variable-length sequence per prompt). It reads time as 1 - t and predicts
the opposite velocity, which the pipeline negates."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Model

from ..devices import to_device
from . import register
from .base import Components, Denoise
from .common import DiffusersFamily, TextPart, chat_template_ids

# diffusers -> the original names of Z-Image's transformer (the inverse of diffusers'
# convert_z_image_transformer_checkpoint_to_diffusers); each attention's q, k and v are fused back into one qkv
RENAMES = (("all_final_layer.2-1.", "final_layer."), ("all_x_embedder.2-1.", "x_embedder."),
           (".attention.to_out.0.", ".attention.out."), (".attention.norm_k.", ".attention.k_norm."),
           (".attention.norm_q.", ".attention.q_norm."))


def original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith((".attention.to_k.weight", ".attention.to_v.weight")):
            continue  # fused with to_q
        if key.endswith(".attention.to_q.weight"):
            stem = key.removesuffix(".to_q.weight")
            out[f"{stem}.qkv.weight"] = torch.cat([state[f"{stem}.to_{x}.weight"] for x in "qkv"])
            continue
        for new, old in RENAMES:
            key = key.replace(new, old)
        out[key] = value
    return out


@register
class ZImage(DiffusersFamily):
    name = "z_image"
    # ai-toolkit's Z-Image LoKr names (diffusers' paths): ComfyUI maps them and diffusers' loader reads them back
    lycoris_prefix = "diffusion_model."
    pipeline_classes = ("ZImagePipeline",)
    pipeline_class = ZImagePipeline
    denoiser_name = "transformer"
    shard_blocks = ("noise_refiner", "context_refiner", "layers")
    denoiser_class = ZImageTransformer2DModel
    scheduler_class = FlowMatchEulerDiscreteScheduler
    text_parts = (TextPart("tokenizer", "text_encoder", Qwen3Model),)
    default_resolution = 512  # the reference script's default
    lora_learning_rate = 1e-4  # the reference LoRA script's
    resolution_multiple = 16  # the transformer patches latents 2x2
    objective = "rectified_flow"
    # guidance_scale: the reference README passes it and its script reads it nowhere (no guidance input): accepted,
    # so that command line runs as written, and unused
    options = ("max_sequence_length", "guidance_scale", "lora_blocks")
    lora_block_list = ("layers", "n_layers")  # its main blocks
    option_defaults = {"weighting_scheme": "none", "precondition_outputs": False, "max_sequence_length": 512}
    latent_mode = True  # the reference encodes the posterior's mode
    t5_part = "text_encoder"  # its prompts are --max_sequence_length tokens (the chat template included)
    default_sampler = "euler"
    default_guidance = 5.0  # the pipeline's (true CFG); Turbo samples at 0
    default_lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    trained_text_encoders = ()  # the Qwen3 model stays frozen (the reference trains none)
    render_at_training_size = True  # the pipeline's default size is 1024

    def single_file_state(self, pipe: Any) -> dict[str, torch.Tensor]:
        """The transformer alone in the original layout (ComfyUI's Load Diffusion Model; diffusers'
        `from_single_file` reads it back)."""
        return original_layout(pipe.transformer.state_dict())

    def tokenize(self, c: Components, prompts: list[str], cfg: Any) -> dict[str, torch.Tensor]:
        """As `ZImagePipeline._encode_prompt`: each prompt as a user turn of the chat template (thinking on),
        padded to --max_sequence_length tokens."""
        return {"text_encoder": chat_template_ids(c.tokenizer, prompts, self.option(cfg, "max_sequence_length"),
                                                  enable_thinking=True)}

    def encode(self, c: Components, input_ids: dict[str, torch.Tensor], cfg: Any,
               text_encoders: dict[str, torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """The penultimate hidden states (padding masked) and which positions are the prompt's: the transformer
        reads each prompt's states without its padding."""
        encoder = {**c.text_encoders, **(text_encoders or {})}["text_encoder"]
        ids = input_ids["text_encoder"]
        pad = c.tokenizer.pad_token_id

        def states(rows: torch.Tensor) -> torch.Tensor:
            rows = to_device(rows, encoder.device)
            return encoder(input_ids=rows, attention_mask=rows != pad, output_hidden_states=True).hidden_states[-2]

        return {"cap_feats": self.frozen_states(c, "text_encoder", ids, states), "cap_mask": ids != pad}

    def denoiser_call(self, c: Components, denoiser: torch.nn.Module, cond: dict[str, torch.Tensor],
                      batch: dict[str, Any], cfg: Any) -> Denoise:
        """Each example as its own (C, 1, H, W) latent and its own unpadded prompt states, time as 1 - t/1000, the
        output negated (as ZImagePipeline does)."""
        mask = to_device(cond["cap_mask"], cond["cap_feats"].device)
        captions = [feats[keep] for feats, keep in zip(cond["cap_feats"], mask)]

        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            out = denoiser(list(noisy.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, captions,
                           return_dict=False)[0]
            return -torch.stack(out).squeeze(2)

        return denoise
