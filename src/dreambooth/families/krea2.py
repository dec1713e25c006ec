"""Krea 2 (Raw and Turbo): a single-stream rectified-flow transformer (`Krea2Transformer2DModel`) over 2x2-packed
latents of Qwen-Image's video VAE; the conditioning is twelve hidden layers of Qwen3-VL side by side per token,
read through Qwen-Image's template laid out at a fixed length with the padding before the assistant suffix (and
positions that count only real tokens), which the transformer fuses itself. True CFG in Krea's convention
(cond + g * (cond - uncond), on for any g > 0)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel
from transformers import Qwen3VLModel

from ..devices import to_device
from . import register
from .base import Components, Denoise, read_model_index
from .common import DiffusersFamily, TextPart
from .qwen_image import DROPPED, PREFIX, SUFFIX, VideoVAELatents

SUFFIX_TOKENS = 5  # "<|im_end|>\n<|im_start|>assistant\n" in Qwen's vocabulary (the pipeline counts on it)
# Krea2Pipeline's default taps of Qwen3-VL-4B (indices into hidden_states; 0 is the embeddings); a checkpoint may
# name others in its model_index.json
SELECT_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)


# diffusers -> the original names of Krea 2's transformer (the inverse of diffusers'
# convert_krea2_transformer_checkpoint_to_diffusers): whole names first, then prefixes, then names inside blocks
WHOLE = {"txt_in.norm.weight": "txtmlp.0.scale", "final_layer.norm.weight": "last.norm.scale",
         "final_layer.scale_shift_table": "last.modulation.lin"}
PREFIXES = (("img_in.", "first."), ("time_embed.linear_1.", "tmlp.0."), ("time_embed.linear_2.", "tmlp.2."),
            ("time_mod_proj.", "tproj.1."), ("txt_in.linear_1.", "txtmlp.1."), ("txt_in.linear_2.", "txtmlp.3."),
            ("text_fusion.", "txtfusion."), ("transformer_blocks.", "blocks."), ("final_layer.linear.", "last.linear."))
IN_BLOCKS = ((".attn.to_q.", ".attn.wq."), (".attn.to_k.", ".attn.wk."), (".attn.to_v.", ".attn.wv."),
             (".attn.to_out.0.", ".attn.wo."), (".attn.to_gate.", ".attn.gate."),
             (".attn.norm_q.weight", ".attn.qknorm.qnorm.scale"), (".attn.norm_k.weight", ".attn.qknorm.knorm.scale"),
             (".ff.", ".mlp."), (".norm1.weight", ".prenorm.scale"), (".norm2.weight", ".postnorm.scale"),
             (".scale_shift_table", ".mod.lin"))


def original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = WHOLE.get(key)
        if name is None:
            name = next((old + key[len(new):] for new, old in PREFIXES if key.startswith(new)), key)
            for new, old in IN_BLOCKS:
                name = name.replace(new, old)
        if key.startswith("transformer_blocks.") and key.endswith(".scale_shift_table"):
            value = value.reshape(-1)  # the original keeps a block's six modulation vectors flat
        out[name] = value
    return out




@register
class Krea2(VideoVAELatents, DiffusersFamily):
    name = "krea2"
    pipeline_classes = ("Krea2Pipeline",)
    pipeline_class = Krea2Pipeline
    denoiser_name = "transformer"
    shard_blocks = ("transformer_blocks",)
    denoiser_class = Krea2Transformer2DModel
    vae_class = AutoencoderKLQwenImage
    scheduler_class = FlowMatchEulerDiscreteScheduler
    text_parts = (TextPart("tokenizer", "text_encoder", Qwen3VLModel),)
    default_resolution = 512  # the reference script's default
    lora_learning_rate = 3e-4  # the reference LoRA script's
    resolution_multiple = 16  # latents are packed 2x2
    objective = "rectified_flow"
    options = ("max_sequence_length", "lora_blocks")  # no guidance input
    lora_block_list = ("transformer_blocks", "num_layers")
    option_defaults = {"weighting_scheme": "none", "precondition_outputs": False, "max_sequence_length": 512}
    t5_part = "text_encoder"  # its prompts are --max_sequence_length tokens after the dropped system turn
    max_sequence_length_limit = 1024
    default_sampler = "euler"
    default_guidance = 4.5  # the pipeline's (Turbo samples at 0)
    # the reference script's: the image input and output, every attention projection and gate, the feed-forwards,
    # the text fusion's projector and input MLP, the timestep MLP and modulation
    default_lora_targets = ("img_in", "final_layer.linear", "to_q", "to_k", "to_v", "to_out.0", "to_gate", "ff.up",
                            "ff.down", "text_fusion.projector", "txt_in.linear_1", "txt_in.linear_2",
                            "time_embed.linear_1", "time_embed.linear_2", "time_mod_proj")
    trained_text_encoders = ()  # Qwen3-VL stays frozen (the reference trains none)
    render_at_training_size = True  # the pipeline's default size is 1024
    upcast_vae_in_fp16 = False
    pipeline_settings = ("text_encoder_select_layers", "is_distilled", "patch_size")

    def single_file_state(self, pipe: Any) -> dict[str, torch.Tensor]:
        """The transformer alone in the original layout (ComfyUI's Load Diffusion Model; diffusers'
        `from_single_file` reads it back)."""
        return original_layout(pipe.transformer.state_dict())

    def tokenize(self, c: Components, prompts: list[str], cfg: Any) -> dict[str, torch.Tensor]:
        """As `Krea2Pipeline.get_text_hidden_states`: the template's prefix and the prompt padded so that, with the
        assistant suffix after the padding, the states past the dropped prefix are --max_sequence_length long."""
        length = self.option(cfg, "max_sequence_length") + DROPPED - SUFFIX_TOKENS
        head = c.tokenizer([PREFIX + p for p in prompts], truncation=True, padding="max_length", max_length=length,
                           return_tensors="pt").input_ids
        tail = c.tokenizer([SUFFIX] * len(prompts), return_tensors="pt").input_ids
        return {"text_encoder": torch.cat([head, tail], dim=1)}

    def encode(self, c: Components, input_ids: dict[str, torch.Tensor], cfg: Any,
               text_encoders: dict[str, torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """The selected hidden layers stacked per token (positions counting real tokens only, as the pipeline),
        past the system prefix, and the mask of the real tokens (the padding sits before the suffix)."""
        encoder = {**c.text_encoders, **(text_encoders or {})}["text_encoder"]
        ids = input_ids["text_encoder"]
        pad = c.tokenizer.pad_token_id

        def states(rows: torch.Tensor) -> torch.Tensor:
            layers = read_model_index(c.source).get("text_encoder_select_layers") or SELECT_LAYERS
            rows = to_device(rows, encoder.device)
            mask = rows != pad
            positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1)
            out = encoder(input_ids=rows, attention_mask=mask, position_ids=positions, output_hidden_states=True)
            return torch.stack([out.hidden_states[i] for i in layers], dim=2)[:, DROPPED:]

        return {"encoder_hidden_states": self.frozen_states(c, "text_encoder", ids, states),
                "encoder_attention_mask": (ids != pad)[:, DROPPED:]}

    def denoiser_call(self, c: Components, denoiser: torch.nn.Module, cond: dict[str, torch.Tensor],
                      batch: dict[str, Any], cfg: Any) -> Denoise:
        """Latents packed in patches with their (0, h, w) positions after the text's, the timestep as a fraction
        of 1000, the output (the velocity) unpacked."""
        states = cond["encoder_hidden_states"]
        mask = to_device(cond["encoder_attention_mask"], states.device)
        channels_in = denoiser.config.in_channels

        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            n, channels, height, width = noisy.shape
            p = round((channels_in // channels) ** 0.5)  # the pipeline's patch_size
            packed = noisy.view(n, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
            positions = Krea2Pipeline.prepare_position_ids(states.shape[1], height // p, width // p, noisy.device)
            pred = denoiser(hidden_states=packed.reshape(n, (height // p) * (width // p), channels * p * p),
                            encoder_hidden_states=states, timestep=timesteps / 1000, position_ids=positions,
                            encoder_attention_mask=mask, return_dict=False)[0]
            pred = pred.view(n, height // p, width // p, channels, p, p)  # the inverse of _pack_latents
            return pred.permute(0, 3, 1, 4, 2, 5).reshape(n, channels, height, width)

        return denoise
