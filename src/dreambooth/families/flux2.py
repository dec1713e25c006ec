"""Flux.2: a rectified-flow transformer (`Flux2Transformer2DModel`: double- and single-stream blocks) over latents
patchified 2x2, normalised by the VAE's batch-norm statistics and packed into a sequence with 4-axis positional ids;
the conditioning is three hidden layers of a language model side by side, read from its chat template. klein (4B /
9B): Qwen3; its base checkpoints sample with true CFG, the distilled ones (`is_distilled`) without. dev: Mistral
Small 3.1 under a system prompt, and a guidance-distilled transformer told the guidance value."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.pipeline_flux2 import format_input
from transformers import Mistral3ForConditionalGeneration, Qwen3ForCausalLM

from ..devices import to_device
from ..errors import ModelError
from . import register
from .base import Components, Denoise
from .common import DiffusersFamily, TextPart, chat_template_ids

# diffusers -> the original (BFL) names of Flux.2's transformer, the inverse of diffusers'
# convert_flux2_transformer_checkpoint_to_diffusers; q, k and v of each double block are fused back into one qkv
TOP_LEVEL = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
             "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
             "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
             "single_stream_modulation.linear": "single_stream_modulation.lin",
             "norm_out.linear": "final_layer.adaLN_modulation.1"}
DOUBLE_BLOCK = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.to_out.0": "img_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
                "attn.to_add_out": "txt_attn.proj", "ff_context.linear_in": "txt_mlp.0",
                "ff_context.linear_out": "txt_mlp.2"}
SINGLE_BLOCK = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
                "attn.norm_k": "norm.key_norm"}
FUSED = {("attn.to_q", "attn.to_k", "attn.to_v"): "img_attn.qkv",
         ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "txt_attn.qkv"}


def original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Flux.2 transformer's diffusers state dict in the original layout ComfyUI loads (RMS-norm weights as
    `.scale`, the final modulation as (shift, scale))."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        block, _, rest = module.partition(".")
        index, _, inner = rest.partition(".")
        if block == "transformer_blocks" and any(inner in group for group in FUSED):
            group = next(g for g in FUSED if inner in g)
            if inner == group[0]:
                out[f"double_blocks.{index}.{FUSED[group]}.{param}"] = torch.cat(
                    [state[f"transformer_blocks.{index}.{m}.{param}"] for m in group])
            continue
        if block == "transformer_blocks":
            name = f"double_blocks.{index}.{DOUBLE_BLOCK[inner]}"
        elif block == "single_transformer_blocks":
            name = f"single_blocks.{index}.{SINGLE_BLOCK[inner]}"
        else:
            name = TOP_LEVEL[module]
        if module == "norm_out.linear":  # diffusers keeps (scale, shift)
            value = torch.cat(value.chunk(2, dim=0)[::-1])
        out[f"{name}.{'scale' if name.endswith('_norm') else param}"] = value
    return out


@register
class Flux2Klein(DiffusersFamily):
    name = "flux2_klein"
    # LyCORIS's names: ComfyUI maps them, and diffusers' Flux.2 loader reads them back (its LoKr converter)
    lycoris_prefix = "lycoris_"
    pipeline_classes = ("Flux2KleinPipeline",)
    pipeline_class = Flux2KleinPipeline
    denoiser_name = "transformer"
    shard_blocks = ("transformer_blocks", "single_transformer_blocks")
    denoiser_class = Flux2Transformer2DModel
    vae_class = AutoencoderKLFlux2
    scheduler_class = FlowMatchEulerDiscreteScheduler
    text_parts = (TextPart("tokenizer", "text_encoder", Qwen3ForCausalLM),)
    default_resolution = 512  # the reference script's default
    lora_learning_rate = 1e-4  # the reference LoRA script's
    resolution_multiple = 16  # latents are patchified 2x2
    objective = "rectified_flow"
    options = ("max_sequence_length", "guidance_scale", "lora_blocks", "text_encoder_out_layers")
    lora_block_list = ("transformer_blocks", "num_layers")  # its double-stream blocks
    # guidance_scale: what a guidance-distilled transformer (guidance_embeds) is told while training; klein's have
    # no guidance input, so it is read only where one exists (the reference script's rule).
    # text_encoder_out_layers: the hidden layers Flux2KleinPipeline conditions on; the reference script's default
    # ([10, 20, 30]) differs from the pipeline's (diffusers issue #13445), and a model trained on other layers than
    # it samples with draws noise: whatever is chosen, class images and validation sample with it too
    option_defaults = {"weighting_scheme": "none", "precondition_outputs": False, "max_sequence_length": 512,
                       "guidance_scale": 3.5, "text_encoder_out_layers": [9, 18, 27]}
    unsupported_options = ("class_negative_prompt",)  # Flux2KleinPipeline takes no negative prompt
    t5_part = "text_encoder"  # its prompts are --max_sequence_length tokens (the chat template included)
    latent_mode = True  # the reference encodes the posterior's mode
    default_sampler = "euler"
    default_guidance = 4.0  # the pipeline's (true CFG on the base checkpoints; the distilled ones ignore it)
    # the reference script's: attention projections of the double blocks, the fused qkv+MLP input and the output
    # of each single block (added per block by `lora_defaults`)
    default_lora_targets = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj")
    trained_text_encoders = ()  # the Qwen3 language model stays frozen (the reference trains none)
    render_at_training_size = True  # the pipeline's default size is 1024
    pipeline_settings = ("is_distilled",)  # no CFG for distilled checkpoints

    def pipeline_kwargs(self, cfg: Any = None) -> dict[str, Any]:
        """Its pipelines read the same hidden layers the run trained on."""
        return {**super().pipeline_kwargs(cfg), "text_encoder_out_layers": self.out_layers(cfg)}

    def out_layers(self, cfg: Any) -> tuple[int, ...]:
        return tuple(self.option(cfg, "text_encoder_out_layers"))

    def single_file_state(self, pipe: Any) -> dict[str, torch.Tensor]:
        """The transformer alone in the original layout (ComfyUI's Load Diffusion Model; diffusers'
        `from_single_file` reads it back)."""
        return original_layout(pipe.transformer.state_dict())

    def lora_defaults(self, config: Any) -> list[str]:
        blocks = config.get("num_single_layers", 0)
        return [*self.default_lora_targets, *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(blocks))]

    def tokenize(self, c: Components, prompts: list[str], cfg: Any) -> dict[str, torch.Tensor]:
        """As `Flux2KleinPipeline._get_qwen3_prompt_embeds`: each prompt as a user turn of the chat template
        (thinking off), padded to --max_sequence_length tokens."""
        return {"text_encoder": chat_template_ids(c.tokenizer, prompts, self.option(cfg, "max_sequence_length"),
                                                  enable_thinking=False)}

    def encode(self, c: Components, input_ids: dict[str, torch.Tensor], cfg: Any,
               text_encoders: dict[str, torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """--text_encoder_out_layers of the language model (padding masked), side by side per token."""
        encoder = {**c.text_encoders, **(text_encoders or {})}["text_encoder"]
        pad = c.tokenizer.pad_token_id
        layers = self.out_layers(cfg)
        text = encoder.config.get_text_config()
        wanted = c.denoiser.config.joint_attention_dim // text.hidden_size  # layers the transformer reads
        if max(layers) > text.num_hidden_layers or len(layers) != wanted:
            raise ModelError(f"--text_encoder_out_layers {' '.join(map(str, layers))}: {c.source.name_or_path}'s "
                             f"transformer reads {wanted} of its text encoder's {text.num_hidden_layers} layers; "
                             f"pass {wanted} layer numbers up to {text.num_hidden_layers}")

        def states(ids: torch.Tensor) -> torch.Tensor:
            ids = to_device(ids, encoder.device)
            out = encoder(input_ids=ids, attention_mask=(ids != pad).long(), output_hidden_states=True,
                          use_cache=False)
            stacked = torch.stack([out.hidden_states[k] for k in layers], dim=1)
            n, k, length, width = stacked.shape
            return stacked.permute(0, 2, 1, 3).reshape(n, length, k * width)

        return {"encoder_hidden_states": self.frozen_states(c, "text_encoder", input_ids["text_encoder"], states)}

    def normalize_latents(self, c: Components, latents: torch.Tensor) -> torch.Tensor:
        """Patchified 2x2, then standardised by the VAE's batch-norm statistics (as `_encode_vae_image`)."""
        latents = Flux2KleinPipeline._patchify_latents(latents)
        bn = c.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + c.vae.config.batch_norm_eps).to(latents.device,
                                                                                              latents.dtype)
        return (latents - mean) / std

    def denoiser_call(self, c: Components, denoiser: torch.nn.Module, cond: dict[str, torch.Tensor],
                      batch: dict[str, Any], cfg: Any) -> Denoise:
        """Pack the patchified latents into a sequence with their (t, h, w, l) ids, the text with its own, pass
        the timestep as a fraction of 1000 (and the guidance where the transformer has that input), unpack."""
        states = cond["encoder_hidden_states"]
        text_ids = Flux2KleinPipeline._prepare_text_ids(states).to(states.device)
        config = denoiser.config

        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            n, channels, height, width = noisy.shape
            image_ids = Flux2KleinPipeline._prepare_latent_ids(noisy).to(noisy.device)
            guidance = None
            if config.guidance_embeds:
                guidance = torch.full((n,), float(self.option(cfg, "guidance_scale")), device=noisy.device)
            pred = denoiser(hidden_states=Flux2KleinPipeline._pack_latents(noisy), timestep=timesteps / 1000,
                            guidance=guidance, encoder_hidden_states=states, txt_ids=text_ids, img_ids=image_ids,
                            return_dict=False)[0]
            return pred.permute(0, 2, 1).reshape(n, channels, height, width)  # the inverse of _pack_latents

        return denoise


@register
class Flux2Dev(Flux2Klein):
    """Flux.2 [dev]: klein's transformer, VAE and training, conditioned on Mistral Small 3.1 (hidden layers 10, 20
    and 30, the pipeline's and the reference's) under the pipeline's system prompt; guidance-distilled: the
    transformer is told --guidance_scale while training and the guidance value while sampling (no true CFG)."""

    name = "flux2"
    pipeline_classes = ("Flux2Pipeline",)
    pipeline_class = Flux2Pipeline
    text_parts = (TextPart("tokenizer", "text_encoder", Mistral3ForConditionalGeneration),)
    option_defaults = {**Flux2Klein.option_defaults, "text_encoder_out_layers": [10, 20, 30]}
    default_guidance = 4.0  # the pipeline's guidance value
    trained_text_encoders = ()  # Mistral stays frozen (the reference trains none)
    pipeline_settings = ()  # Flux2Pipeline has no is_distilled

    def tokenize(self, c: Components, prompts: list[str], cfg: Any) -> dict[str, torch.Tensor]:
        """As `Flux2Pipeline._get_mistral_3_small_prompt_embeds`: the pipeline's system prompt and each prompt as a
        user turn of the chat template, padded to --max_sequence_length tokens."""
        if getattr(c.tokenizer, "chat_template", None) is None:
            raise ModelError(f"the tokenizer of {c.source.name_or_path} has no chat template (Flux.2 [dev] reads "
                             "prompts through Mistral's); use the model's own tokenizer/ folder")
        return {"text_encoder": c.tokenizer.apply_chat_template(
            format_input(prompts), add_generation_prompt=False, tokenize=True, return_dict=True,
            return_tensors="pt", padding="max_length", truncation=True,
            max_length=self.option(cfg, "max_sequence_length"))["input_ids"]}
