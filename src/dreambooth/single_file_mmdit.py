"""SD3 and Flux transformers -> their original single-file layouts (Stability's MMDiT `joint_blocks`, Black Forest
Labs' `double_blocks` / `single_blocks`): what ComfyUI loads, and the inverse of diffusers'
`convert_sd3_transformer_checkpoint_to_diffusers` / `convert_flux_transformer_checkpoint_to_diffusers`.

The original layouts fuse what diffusers keeps apart: q, k and v in one `qkv` (Flux's single blocks also fuse the
MLP input into `linear1`), and the final adaptive norm stores (shift, scale) where diffusers stores (scale, shift).
Every tensor is renamed once; one no rule covers is an error, never dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import DreamBoothError
from .single_file import UNET_PREFIX, clip_to_ldm, vae_to_ldm


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale): its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _fuse(state: dict[str, torch.Tensor], used: set[str], parts: list[str], leaf: str) -> torch.Tensor:
    used.update(f"{p}.{leaf}" for p in parts)
    return torch.cat([state[f"{p}.{leaf}"] for p in parts], dim=0)


def _leaves(state: dict[str, torch.Tensor], module: str) -> list[str]:
    return sorted(k.removeprefix(module + ".") for k in state if k.startswith(module + "."))


def _copy(state, used, out, src: str, dst: str, swap: bool = False) -> None:
    for leaf in _leaves(state, src):
        key = f"{src}.{leaf}"
        used.add(key)
        out[f"{dst}.{leaf}"] = swap_halves(state[key]) if swap else state[key]


def _check_all_used(state: dict[str, torch.Tensor], used: set[str], family: str) -> None:
    left = sorted(set(state) - used)
    if left:
        raise DreamBoothError(f"cannot write {family} transformer tensor {left[0]!r} in the original layout "
                              f"(unknown module; {len(left)} such tensors)")


def sd3_transformer_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """SD3Transformer2DModel -> `joint_blocks.N.{x_block,context_block}` (no prefix)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    copy = lambda src, dst, swap=False: _copy(state, used, out, src, dst, swap)  # noqa: E731
    used.add("pos_embed.pos_embed")
    out["pos_embed"] = state["pos_embed.pos_embed"]
    copy("pos_embed.proj", "x_embedder.proj")
    copy("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    copy("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    copy("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    copy("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    copy("context_embedder", "context_embedder")
    last = config["num_layers"] - 1
    for i in range(config["num_layers"]):
        b, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for leaf in _leaves(state, f"{b}.attn.to_q"):
            out[f"{o}.x_block.attn.qkv.{leaf}"] = _fuse(state, used, [f"{b}.attn.to_{x}" for x in "qkv"], leaf)
            out[f"{o}.context_block.attn.qkv.{leaf}"] = _fuse(
                state, used, [f"{b}.attn.add_{x}_proj" for x in "qkv"], leaf)
        for leaf in _leaves(state, f"{b}.attn2.to_q"):  # SD3.5 medium's second attention
            out[f"{o}.x_block.attn2.qkv.{leaf}"] = _fuse(state, used, [f"{b}.attn2.to_{x}" for x in "qkv"], leaf)
        copy(f"{b}.attn.to_out.0", f"{o}.x_block.attn.proj")
        copy(f"{b}.attn.to_add_out", f"{o}.context_block.attn.proj")
        copy(f"{b}.attn2.to_out.0", f"{o}.x_block.attn2.proj")
        for src, dst in (("norm_q", "x_block.attn.ln_q"), ("norm_k", "x_block.attn.ln_k"),
                         ("norm_added_q", "context_block.attn.ln_q"), ("norm_added_k", "context_block.attn.ln_k")):
            copy(f"{b}.attn.{src}", f"{o}.{dst}")
        copy(f"{b}.attn2.norm_q", f"{o}.x_block.attn2.ln_q")
        copy(f"{b}.attn2.norm_k", f"{o}.x_block.attn2.ln_k")
        copy(f"{b}.norm1.linear", f"{o}.x_block.adaLN_modulation.1")
        copy(f"{b}.norm1_context.linear", f"{o}.context_block.adaLN_modulation.1", swap=i == last)
        copy(f"{b}.ff.net.0.proj", f"{o}.x_block.mlp.fc1")
        copy(f"{b}.ff.net.2", f"{o}.x_block.mlp.fc2")
        copy(f"{b}.ff_context.net.0.proj", f"{o}.context_block.mlp.fc1")
        copy(f"{b}.ff_context.net.2", f"{o}.context_block.mlp.fc2")
    copy("proj_out", "final_layer.linear")
    copy("norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
    _check_all_used(state, used, "SD3")
    return out


def flux_transformer_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """FluxTransformer2DModel -> BFL's `double_blocks` / `single_blocks` layout (no prefix): the file ComfyUI
    loads as a diffusion model."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    copy = lambda src, dst, swap=False: _copy(state, used, out, src, dst, swap)  # noqa: E731
    for src, dst in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"),
                     ("guidance_embedder", "guidance_in")):
        copy(f"time_text_embed.{src}.linear_1", f"{dst}.in_layer")
        copy(f"time_text_embed.{src}.linear_2", f"{dst}.out_layer")
    copy("context_embedder", "txt_in")
    copy("x_embedder", "img_in")
    for i in range(config["num_layers"]):
        b, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        copy(f"{b}.norm1.linear", f"{o}.img_mod.lin")
        copy(f"{b}.norm1_context.linear", f"{o}.txt_mod.lin")
        for leaf in _leaves(state, f"{b}.attn.to_q"):
            out[f"{o}.img_attn.qkv.{leaf}"] = _fuse(state, used, [f"{b}.attn.to_{x}" for x in "qkv"], leaf)
            out[f"{o}.txt_attn.qkv.{leaf}"] = _fuse(state, used, [f"{b}.attn.add_{x}_proj" for x in "qkv"], leaf)
        for src, dst in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                         ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            used.add(f"{b}.attn.{src}.weight")
            out[f"{o}.{dst}.scale"] = state[f"{b}.attn.{src}.weight"]
        copy(f"{b}.ff.net.0.proj", f"{o}.img_mlp.0")
        copy(f"{b}.ff.net.2", f"{o}.img_mlp.2")
        copy(f"{b}.ff_context.net.0.proj", f"{o}.txt_mlp.0")
        copy(f"{b}.ff_context.net.2", f"{o}.txt_mlp.2")
        copy(f"{b}.attn.to_out.0", f"{o}.img_attn.proj")
        copy(f"{b}.attn.to_add_out", f"{o}.txt_attn.proj")
    for i in range(config["num_single_layers"]):
        b, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        copy(f"{b}.norm.linear", f"{o}.modulation.lin")
        for leaf in _leaves(state, f"{b}.attn.to_q"):
            out[f"{o}.linear1.{leaf}"] = _fuse(state, used, [*(f"{b}.attn.to_{x}" for x in "qkv"),
                                                             f"{b}.proj_mlp"], leaf)
        for src, dst in (("norm_q", "norm.query_norm"), ("norm_k", "norm.key_norm")):
            used.add(f"{b}.attn.{src}.weight")
            out[f"{o}.{dst}.scale"] = state[f"{b}.attn.{src}.weight"]
        copy(f"{b}.proj_out", f"{o}.linear2")
    copy("proj_out", "final_layer.linear")
    copy("norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
    _check_all_used(state, used, "Flux")
    return out


def sd3_single_file(pipe: Any) -> dict[str, torch.Tensor]:
    """An SD3 pipeline as Stability's single file: transformer, VAE and the text encoders it has (CLIP-L, CLIP-G,
    T5-XXL) under the prefixes diffusers' `from_single_file` and ComfyUI read."""
    transformer = pipe.transformer
    state = {UNET_PREFIX + k: v for k, v in
             sd3_transformer_to_original(transformer.state_dict(), transformer.config).items()}
    state.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    for name, prefix in (("text_encoder", "text_encoders.clip_l.transformer."),
                         ("text_encoder_2", "text_encoders.clip_g.transformer.")):
        state.update(clip_to_ldm(getattr(pipe, name).state_dict(), prefix))
    if pipe.text_encoder_3 is not None:  # its input embedding is tied to `shared`: written as its own copy
        t5 = {k: v.clone() if k == "encoder.embed_tokens.weight" else v
              for k, v in pipe.text_encoder_3.state_dict().items()}
        state.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5.items()})
    return state


def flux_single_file(pipe: Any) -> dict[str, torch.Tensor]:
    """A Flux pipeline's transformer as Black Forest Labs' file (`flux1-dev.safetensors` layout): the text
    encoders and VAE are separate files in every Flux UI, so only the transformer is written."""
    return flux_transformer_to_original(pipe.transformer.state_dict(), pipe.transformer.config)
