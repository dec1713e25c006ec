"""Diffusers modules -> one state dict in the original (CompVis / Stability "LDM") key layout: the single
`.safetensors` checkpoint AUTOMATIC1111 and ComfyUI load, and diffusers' `from_single_file` reads back.

diffusers ships only the other direction (`diffusers.loaders.single_file_utils`), so this is the inverse of its
mapping, written against its key names. Every tensor is renamed exactly once; a tensor no rule covers is an
error, never silently dropped.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import DreamBoothError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
            "mid_block.resnets.1": "middle_block.2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, table: dict[str, str]) -> tuple[str, str] | None:
    """(new prefix, rest) for the longest module path at the start of `key` that the table renames."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        old = ".".join(parts[:n])
        if old in table:
            return table[old], ".".join(parts[n:])
    return None


def _unmapped(part: str, key: str) -> DreamBoothError:
    return DreamBoothError(f"cannot write {part} tensor {key!r} in the original layout (unknown module); "
                           "--format single-file supports SD 1.x/2.x and SDXL pipelines")


def unet_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel state dict -> `model.diffusion_model.*` (openaimodel numbering of blocks)."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise DreamBoothError("a UNet with per-block layer counts has no original single-file layout")
    blocks, step = len(config["block_out_channels"]), per_block + 1
    table = dict(UNET_TOP)
    resnets = {v for k, v in UNET_TOP.items() if ".resnets." in k}
    for i in range(blocks):
        for j in range(per_block):
            table[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{1 + i * step + j}.0"
            table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{1 + i * step + j}.1"
            resnets.add(f"input_blocks.{1 + i * step + j}.0")
        table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * step}.0.op"
        for j in range(step):
            table[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * step + j}.0"
            table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * step + j}.1"
            resnets.add(f"output_blocks.{i * step + j}.0")
        slot = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1  # after the attention, if any
        table[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * step + per_block}.{slot}.conv"
    out = {}
    for key, tensor in state.items():
        found = _rename(key, table)
        if found is None:
            raise _unmapped("UNet", key)
        prefix, rest = found
        if prefix in resnets:
            name, _, leaf = rest.partition(".")
            if name not in RESNET:
                raise _unmapped("UNet", key)
            rest = f"{RESNET[name]}.{leaf}"
        out[f"{UNET_PREFIX}{prefix}.{rest}"] = tensor
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """An AutoencoderKL state dict -> `first_stage_model.*`; decoder blocks are numbered from the bottom and the
    mid-block attention is 1x1 convolutions there."""
    ups = len(config["up_block_types"])
    table = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out",
             **{m: m for m in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                               "quant_conv", "post_quant_conv")}}  # named alike in both
    for coder in ("encoder", "decoder"):
        table[f"{coder}.mid_block.resnets.0"] = f"{coder}.mid.block_1"
        table[f"{coder}.mid_block.resnets.1"] = f"{coder}.mid.block_2"
        table[f"{coder}.mid_block.attentions.0"] = f"{coder}.mid.attn_1"
    for i in range(len(config["down_block_types"])):
        table[f"encoder.down_blocks.{i}.resnets"] = f"encoder.down.{i}.block"
        table[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
    for i in range(ups):
        table[f"decoder.up_blocks.{i}.resnets"] = f"decoder.up.{ups - 1 - i}.block"
        table[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{ups - 1 - i}.upsample"
    out = {}
    for key, tensor in state.items():
        found = _rename(key, table)
        if found is None:
            raise _unmapped("VAE", key)
        prefix, rest = found
        if prefix.endswith("mid.attn_1"):
            found = _rename(rest, VAE_ATTENTION)
            if found is None:
                raise _unmapped("VAE", key)
            rest = ".".join(found)
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        rest = rest.replace("conv_shortcut.", "nin_shortcut.")
        out[f"{VAE_PREFIX}{prefix}.{rest}"] = tensor
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model -> its keys under `prefix` with the `text_model.` level the original keeps
    (transformers 5 dropped that level from CLIPTextModel); a projection (SD3's encoders) stays beside it."""
    def key(k: str) -> str:
        return k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k

    return {prefix + key(k): v for k, v in state.items()}


OPEN_CLIP = {"embeddings.token_embedding": "token_embedding", "final_layer_norm": "ln_final"}
OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model -> OpenCLIP's layout under `prefix`: q/k/v fused into in_proj, the position
    table as a bare `positional_embedding`, the projection transposed."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif key.startswith("encoder.layers."):
            index, _, rest = key.removeprefix("encoder.layers.").partition(".")
            layer = f"{prefix}transformer.resblocks.{index}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                if rest.startswith("self_attn.q_proj."):  # written once, from q, k and v together
                    kind = rest.rsplit(".", 1)[1]
                    parts = [state[f"encoder.layers.{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    out[f"{layer}attn.in_proj_{kind}"] = torch.cat(parts)
                continue
            found = _rename(rest, OPEN_CLIP_LAYER)
            if found is None:
                raise _unmapped("text encoder", key)
            out[layer + ".".join(found)] = tensor
        else:
            found = _rename(key, OPEN_CLIP)
            if found is None:
                raise _unmapped("text encoder", key)
            out[prefix + ".".join(found)] = tensor
    return out


TEXT_LAYOUTS = {"clip": clip_to_ldm, "open_clip": open_clip_to_ldm}


def pipeline_to_ldm(pipe: Any, text_layout: dict[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
    """The whole pipeline as one original-layout state dict; `text_layout` maps each text encoder's pipeline name
    to (layout, key prefix), which the model family decides."""
    state = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    state.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    for name, (layout, prefix) in text_layout.items():
        state.update(TEXT_LAYOUTS[layout](getattr(pipe, name).state_dict(), prefix))
    return state
