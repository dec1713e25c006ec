"""Qwen-Image (and Qwen-Image-2512, the same pipeline): a dual-stream rectified-flow transformer
(`QwenImageTransformer2DModel`, MMDiT-like) over 2x2-packed latents of a video-shaped VAE (one frame), standardised
by the VAE's per-channel mean and std; conditioned on the last hidden states of Qwen2.5-VL read through a fixed
system prompt whose 34 tokens are dropped, with a mask over the padding. Sampling uses true CFG with a negative
prompt. (Qwen-Image 2.1 is another architecture: Qwen3-VL, a 16x VAE and a block-causal transformer.)"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLForConditionalGeneration

from ..devices import to_device
from . import register
from .base import Components, Denoise
from .common import DiffusersFamily, TextPart

# QwenImagePipeline's prompt template (Krea 2's too) and the number of its leading (system turn) tokens dropped
# from the states
PREFIX = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
          "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
DROPPED = 34


class VideoVAELatents:
    """The latents of Qwen-Image's video VAE (`AutoencoderKLQwenImage`, which Krea 2 shares): each image encoded as
    one frame, standardised per channel by the VAE's latents_mean and latents_std (the pipelines' decode undoes it)."""

    def posterior(self, vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = vae.encode(pixels.unsqueeze(2)).latent_dist
        return dist.mean.squeeze(2), dist.std.squeeze(2)

    def normalize_latents(self, c: Components, latents: torch.Tensor) -> torch.Tensor:
        config = c.vae.config
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        return (latents - mean) / std


@register
class QwenImage(VideoVAELatents, DiffusersFamily):
    name = "qwen_image"
    pipeline_classes = ("QwenImagePipeline",)
    pipeline_class = QwenImagePipeline
    denoiser_name = "transformer"
    shard_blocks = ("transformer_blocks",)
    denoiser_class = QwenImageTransformer2DModel
    vae_class = AutoencoderKLQwenImage
    scheduler_class = FlowMatchEulerDiscreteScheduler
    text_parts = (TextPart("tokenizer", "text_encoder", Qwen2_5_VLForConditionalGeneration),)
    default_resolution = 512  # the reference script's default
    lora_learning_rate = 1e-4  # the reference LoRA script's
    resolution_multiple = 16  # latents are packed 2x2
    objective = "rectified_flow"
    options = ("max_sequence_length", "lora_blocks")  # no guidance input (the reference script has no such flag)
    lora_block_list = ("transformer_blocks", "num_layers")
    option_defaults = {"weighting_scheme": "none", "precondition_outputs": False, "max_sequence_length": 512}
    t5_part = "text_encoder"  # its prompts are --max_sequence_length tokens after the dropped system turn
    max_sequence_length_limit = 1024  # the pipeline's
    default_sampler = "euler"
    default_guidance = 4.0  # the pipeline's true_cfg_scale
    default_lora_targets = ("to_k", "to_q", "to_v", "to_out.0")  # the reference script's
    trained_text_encoders = ()  # Qwen2.5-VL stays frozen (the reference trains none)
    render_at_training_size = True  # the pipeline's default size is 1024
    upcast_vae_in_fp16 = False  # its VAE config has no force_upcast

    def single_file_state(self, pipe: Any) -> dict[str, torch.Tensor]:
        """The transformer alone: its original layout is diffusers' own names (ComfyUI's Load Diffusion Model and
        diffusers' `from_single_file` read them as they are)."""
        return dict(pipe.transformer.state_dict())

    def guidance(self, scale: float, count: int, negative_prompt: str | None = None) -> dict[str, Any]:
        """True CFG, which QwenImagePipeline applies only with a negative prompt: " " where none is given (the
        model card's), none at a scale of 1 or less."""
        if scale <= 1 and not negative_prompt:
            return {"true_cfg_scale": 1.0}
        return {"true_cfg_scale": scale, "negative_prompt": [negative_prompt or " "] * count}

    def tokenize(self, c: Components, prompts: list[str], cfg: Any) -> dict[str, torch.Tensor]:
        """Each prompt in the pipeline's template, padded to the system turn plus --max_sequence_length tokens
        (the language model is causal: what follows a token never changes its state, so this cut keeps the
        states the pipeline keeps)."""
        texts = [PREFIX + p + SUFFIX for p in prompts]
        length = DROPPED + self.option(cfg, "max_sequence_length")
        return {"text_encoder": c.tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                                            return_tensors="pt").input_ids}

    def encode(self, c: Components, input_ids: dict[str, torch.Tensor], cfg: Any,
               text_encoders: dict[str, torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """The last hidden states after the system turn, zero on the padding, and the mask of the prompt's own
        positions (as `QwenImagePipeline.encode_prompt`; padded here to one length for all prompts)."""
        encoder = {**c.text_encoders, **(text_encoders or {})}["text_encoder"]
        ids = input_ids["text_encoder"]
        pad = c.tokenizer.pad_token_id

        def states(rows: torch.Tensor) -> torch.Tensor:
            rows = to_device(rows, encoder.device)
            mask = (rows != pad).long()
            hidden = encoder(input_ids=rows, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            return (hidden * mask.unsqueeze(-1).to(hidden.dtype))[:, DROPPED:]

        mask = (ids != pad).long()[:, DROPPED:]
        return {"encoder_hidden_states": self.frozen_states(c, "text_encoder", ids, states),
                "encoder_hidden_states_mask": mask}

    def denoiser_call(self, c: Components, denoiser: torch.nn.Module, cond: dict[str, torch.Tensor],
                      batch: dict[str, Any], cfg: Any) -> Denoise:
        """The text cut to the batch's longest prompt (the mask dropped where every position is a prompt's, as
        the pipeline does), the latents packed 2x2 with their (frame, height, width) shape, the timestep as a
        fraction of 1000, the output unpacked."""
        states = cond["encoder_hidden_states"]
        mask = cond["encoder_hidden_states_mask"]  # made from the token ids: on the CPU, read without a sync
        length = int(mask.sum(dim=1).max())
        states, mask = states[:, :length], mask[:, :length]
        mask = None if bool(mask.all()) else to_device(mask, states.device)

        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            n, channels, height, width = noisy.shape
            pred = denoiser(hidden_states=QwenImagePipeline._pack_latents(noisy, n, channels, height, width),
                            timestep=timesteps / 1000, encoder_hidden_states=states,
                            encoder_hidden_states_mask=mask, img_shapes=[[(1, height // 2, width // 2)]] * n,
                            return_dict=False)[0]
            pred = pred.view(n, height // 2, width // 2, channels, 2, 2)  # the inverse of _pack_latents
            return pred.permute(0, 3, 1, 4, 2, 5).reshape(n, channels, height, width)

        return denoise
