"""LoRA files in the kohya / AUTOMATIC1111 / ComfyUI key layouts, from the peft-format keys a run writes
(`unet.<module>.lora_A.weight`, `transformer.<module>.lora_B.weight`, `text_encoder.<module>...`). The inverse of
diffusers' `_convert_kohya_flux_lora_to_diffusers` and of its SD/SDXL kohya converter; each family picks its layout.
"""

from __future__ import annotations

import torch

from .errors import DataError


def _split(key: str) -> tuple[str, str, str]:
    """(part, module path, A or B) of a peft-format key."""
    module, _, kind = key.rpartition(".lora_")
    part, _, path = module.partition(".")
    return part, path, kind[0]


def _text_name(part: str, path: str, prefix: str) -> str:
    if not path.startswith("text_model."):
        path = "text_model." + path  # transformers 5 drops it from peft keys; kohya names keep it
    return f"{prefix}_{path.replace('.', '_')}"


def kohya_sd(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """SD / SDXL: `lora_unet_<module>.lora_down.weight`, `lora_te_text_model_<module>.lora_up.weight`,
    `<...>.alpha`; a model with two text encoders (SDXL) names them `lora_te1_` and `lora_te2_`, as kohya's SDXL
    trainer does."""
    two_encoders = any(key.startswith("text_encoder_2.") for key in state)
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1" if two_encoders else "lora_te",
                "text_encoder_2": "lora_te2"}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        part, path, kind = _split(key)
        if part not in prefixes:
            raise DataError(f"LoRA key {key!r} belongs to no part this export knows ({', '.join(prefixes)})")
        name = (_text_name(part, path, prefixes[part]) if part.startswith("text_encoder")
                else f"{prefixes[part]}_{path.replace('.', '_')}")
        out[f"{name}.{'lora_down' if kind == 'A' else 'lora_up'}.weight"] = tensor
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


# Flux: diffusers module (inside a block) -> BFL module, for modules kept apart in both
FLUX_DOUBLE = {"attn.to_out.0": "img_attn_proj", "attn.to_add_out": "txt_attn_proj", "ff.net.0.proj": "img_mlp_0",
               "ff.net.2": "img_mlp_2", "ff_context.net.0.proj": "txt_mlp_0", "ff_context.net.2": "txt_mlp_2",
               "norm1.linear": "img_mod_lin", "norm1_context.linear": "txt_mod_lin"}
FLUX_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation_lin"}
FLUX_GLOBAL = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer_linear",
               "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
               "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
               "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
               "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
               "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
               "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
               "norm_out.linear": "final_layer_adaLN_modulation_1"}
# fused in BFL's layout: (block kind, fused name) -> the diffusers modules it holds, in order
FLUX_FUSED = {("double", "img_attn_qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
              ("double", "txt_attn_qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
              ("single", "linear1"): ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def kohya_flux(state: dict[str, torch.Tensor], alpha: float, rank: int, widths: dict[str, int]
               ) -> dict[str, torch.Tensor]:
    """Flux: `lora_unet_double_blocks_<i>_img_attn_qkv.lora_down.weight`, `lora_te1_text_model_...` (CLIP-L),
    `.alpha`. BFL fuses q, k, v (and, in single blocks, the MLP input) into one linear: its LoRA is the parts'
    down matrices stacked and their up matrices on the block diagonal (a part without adapter gets a zero block
    of the same rank, `widths[module]` rows, e.g. widths["proj_mlp"]), alpha scaled so alpha / rank is unchanged.
    diffusers splits such a file back into the parts exactly."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        part, path, kind = _split(key)
        if part == "text_encoder":
            name = _text_name(part, path, "lora_te1")
            out[f"{name}.{'lora_down' if kind == 'A' else 'lora_up'}.weight"] = tensor
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
        elif part == "transformer":
            modules.setdefault(path, {})[kind] = tensor
        else:
            raise DataError(f"LoRA key {key!r} belongs to no part of a Flux model (transformer, text_encoder)")
    done: set[str] = set()
    for path, ab in sorted(modules.items()):
        if path in done:
            continue
        blocks, _, rest = path.partition(".")
        index, _, inner = rest.partition(".")
        kind = {"transformer_blocks": "double", "single_transformer_blocks": "single"}.get(blocks)
        fused = next(((name, parts) for (k, name), parts in FLUX_FUSED.items() if k == kind and inner in parts),
                     None)
        if fused is not None:
            name, parts = fused
            prefix = f"{blocks}.{index}."
            downs, ups = [], []
            for p in parts:
                got = modules.get(prefix + p)
                done.add(prefix + p)
                like = {"dtype": ab["A"].dtype, "device": ab["A"].device}
                a = got["A"] if got else torch.zeros(rank, ab["A"].shape[1], **like)
                b = got["B"] if got else torch.zeros(widths[p.rpartition(".")[2]], rank, **like)
                downs.append(a)
                ups.append(b)
            target = f"lora_unet_{'double' if kind == 'double' else 'single'}_blocks_{index}_{name}"
            out[f"{target}.lora_down.weight"] = torch.cat(downs)
            out[f"{target}.lora_up.weight"] = torch.block_diag(*ups)
            out[f"{target}.alpha"] = torch.tensor(float(alpha) * len(parts))  # alpha / rank as in each part
            continue
        table = {"double": FLUX_DOUBLE, "single": FLUX_SINGLE}.get(kind, FLUX_GLOBAL)
        local = inner if kind else path
        if local not in table:
            raise DataError(f"LoRA on Flux module {path!r} has no kohya name; export the diffusers LoRA file "
                            "(pytorch_lora_weights.safetensors) instead")
        target = f"lora_unet_{kind}_blocks_{index}_{table[local]}" if kind else f"lora_unet_{table[local]}"
        up = ab["B"]
        if local == "norm_out.linear":  # BFL stores (shift, scale) where diffusers stores (scale, shift)
            first, second = up.chunk(2, dim=0)
            up = torch.cat([second, first])
        out[f"{target}.lora_down.weight"] = ab["A"]
        out[f"{target}.lora_up.weight"] = up
        out[f"{target}.alpha"] = torch.tensor(float(alpha))
        done.add(path)
    return out


LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def lycoris(state: dict[str, torch.Tensor], alpha: float, rank: int, denoiser: str, prefix: str | None
            ) -> dict[str, torch.Tensor]:
    """A run's LoKr / LoHa (peft keys `<part>.<module>.lokr_w1`, `.hada_w1_a`, ...: the tensors LyCORIS names the
    same) in the layout ComfyUI and A1111 load: denoiser modules as `prefix` + module path (see
    ModelFamily.lycoris_prefix), text encoders as kohya's `lora_te[12]_text_model_...`, and an `.alpha` per module.
    They scale a module by alpha / rank only where a factor is rank-decomposed (LoKr's `_a`/`_b`, every LoHa); a
    LoKr of two full factors is read at scale 1, so peft's alpha / rank is multiplied into `lokr_w1` there."""
    two_encoders = any(key.startswith("text_encoder_2.") for key in state)
    texts = {"text_encoder": "lora_te1" if two_encoders else "lora_te", "text_encoder_2": "lora_te2"}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, kind = key.rpartition(".")
        if kind not in LOKR + LOHA:
            raise DataError(f"{key} is not a LoKr or LoHa tensor; export a LoKr or LoHa run's own "
                            "pytorch_lora_weights.safetensors")
        modules.setdefault(module, {})[kind] = tensor
    out: dict[str, torch.Tensor] = {}
    for module, tensors in modules.items():
        part, _, path = module.partition(".")
        if part in texts:
            name = _text_name(part, path, texts[part])
        elif part == denoiser:
            name = module if prefix is None else prefix + (path.replace(".", "_") if prefix.endswith("_") else path)
        else:
            raise DataError(f"LoKr/LoHa key {module!r} belongs to no part this export knows ({denoiser}, "
                            f"{', '.join(texts)})")
        if "lokr_w1" in tensors and "lokr_w2" in tensors:  # two full factors: no alpha is applied on reading
            tensors = {**tensors, "lokr_w1": tensors["lokr_w1"] * (alpha / rank)}
            out[f"{name}.alpha"] = torch.tensor(float(rank))
        else:
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
        out.update({f"{name}.{kind}": t for kind, t in tensors.items()})
    return out


def with_alphas(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A diffusers LoRA file's tensors (`<module>.lora_A.weight` / `.lora_B.weight`) with a `<module>.alpha`
    beside each module: ComfyUI reads the diffusers names of SD3, Flux.2 and Z-Image itself but takes the strength
    from `.alpha` alone (never from the file's metadata), so without it an adapter trained with lora_alpha != rank
    loads at rank / lora_alpha times its strength. (diffusers refuses `.alpha` in its own format: the run's file
    keeps none.)"""
    out = dict(state)
    for key in state:
        if key.endswith(".lora_A.weight"):
            out[key.removesuffix(".lora_A.weight") + ".alpha"] = torch.tensor(float(alpha))
    unknown = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if unknown:
        raise DataError(f"{unknown[0]} is not a LoRA tensor of a diffusers LoRA file; export the run's own "
                        "pytorch_lora_weights.safetensors")
    return out

