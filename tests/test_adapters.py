"""LoKr and LoHa (`--adapter lokr|loha`, peft's LyCORIS tuners) in every family: exact resume, generate, the merged
export, and the LyCORIS file ComfyUI and A1111 load (checked by ComfyUI's reading rules, and read back by diffusers
where its loader takes LoKr: Z-Image and Flux.2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dreambooth
from dreambooth.cli import main
from dreambooth.families import FAMILIES
from dreambooth.generation import load_for_inference
from dreambooth.lora_formats import lycoris
from test_families import NO_PRIOR, render, trains_te
from test_resume import straight_and_resumed
from tiny import TINY

ADAPTER = dict(rank=2, lora_alpha=4, learning_rate=1e-2)  # rank 2: some LoKr factors rank-decomposed, some full
# each family's render-and-export case trains one kind (both kinds resume in every family below)
KIND = {name: ("loha" if i % 2 else "lokr") for i, name in enumerate(TINY)}
KIND.update(z_image="lokr", flux2="lokr", flux2_klein="lokr")  # the families diffusers reads LoKr for
DIFFUSERS_READS_LOKR = ("z_image", "flux2", "flux2_klein")


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lokr_and_loha_resume_exactly_in_every_family(family_args, tiny, tmp_path, monkeypatch, kind):
    straight_and_resumed(family_args, tmp_path, monkeypatch, 1, max_train_steps=2, checkpointing_steps=1,
                         adapter=kind, train_text_encoder=trains_te(tiny), **ADAPTER, **NO_PRIOR)
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "stopped" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    marker = {"lokr": ".lokr_w", "loha": ".hada_w"}[kind]
    assert all(marker in k for k in a) and any(v.abs().max() > 0 for v in a.values())
    config = json.loads((tmp_path / "straight" / "train_config.json").read_text())
    assert config["adapter"] == kind and config["use_lora"] is True  # --adapter alone trains adapters


def test_a_checkpoint_resumes_only_as_the_adapter_it_trained(base_args, tmp_path):
    """A LoRA checkpoint resumed as LoKr (or the reverse) would not fit its adapters: one line, before any load."""
    from dreambooth.errors import CheckpointError

    args = base_args(use_lora=True, max_train_steps=1, checkpointing_steps=1, **NO_PRIOR)
    dreambooth.train(**args)
    with pytest.raises(CheckpointError, match="adapter: 'lora' -> 'lokr'"):
        dreambooth.train(**{**args, "adapter": "lokr", "max_train_steps": 2, "resume_from_checkpoint": "latest"})


def comfyui_delta(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A module's weight change as ComfyUI's weight adapters compute it from a LyCORIS file (comfy/weight_adapter
    lokr.py / loha.py): alpha / rank where a factor is rank-decomposed (rank: lokr_w2_b's rows, else lokr_w1_b's;
    LoHa: hada_w1_b's rows), else scale 1."""
    t = {k.removeprefix(name + "."): v.double() for k, v in state.items() if k.startswith(name + ".")}
    alpha = float(t["alpha"])
    if "hada_w1_a" in t:
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * alpha / t["hada_w1_b"].shape[0]
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    return torch.kron(w1, w2) * (alpha / dim if dim else 1.0)


def state_as_is(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's tensors with the run's alpha beside them and no scale moved: what a naive export would write."""
    return {**state, "unet.0.alpha": torch.tensor(5.0)}


def test_a_lycoris_run_generates_merges_and_exports_what_comfyui_reads(family_args, tiny, tmp_path):
    family_name, model = tiny
    family = FAMILIES[family_name]
    kind = KIND[family_name]
    dreambooth.train(**family_args(adapter=kind, max_train_steps=2, train_text_encoder=trains_te(tiny),
                                   **ADAPTER, **NO_PRIOR))
    out = tmp_path / "out"
    base = family.pipeline_class.from_pretrained(model)
    before = render(base)
    adapted = load_for_inference(str(out), torch.float32)
    after = render(adapted)
    assert np.abs(after - before).max() > 1e-4  # the adapters change the image

    merged = tmp_path / "merged"
    assert main(["export", "--model", str(out), "--format", "merged", "--output", str(merged)]) == 0
    merged_pipe = family.pipeline_class.from_pretrained(merged)
    assert np.allclose(render(merged_pipe), after, atol=1e-4)  # fused once instead of added per call

    comfy = tmp_path / "comfyui.safetensors"
    assert main(["export", "--model", str(out), "--format", "comfyui", "--output", str(comfy)]) == 0
    state = load_file(comfy)
    names = {k.rpartition(".")[0] for k in state}
    assert all(f"{n}.alpha" in state for n in names)  # an alpha per module, which ComfyUI reads
    prefix = family.lycoris_prefix
    denoiser = getattr(base, family.denoiser_name)
    by_name = {(f"{family.denoiser_name}.{m}" if prefix is None else
                prefix + (m.replace(".", "_") if prefix.endswith("_") else m)): m
               for m, _ in denoiser.named_modules()}
    theirs, ours = dict(getattr(merged_pipe, family.denoiser_name).named_parameters()), dict(
        denoiser.named_parameters())
    checked = 0
    for name in sorted(n for n in names if n in by_name):
        weight = f"{by_name[name]}.weight"
        change = (theirs[weight] - ours[weight]).double()
        # the file's delta by ComfyUI's rule is the merged model's change (fp32 merge rounding apart)
        assert torch.allclose(comfyui_delta(state, name).reshape(change.shape), change, atol=1e-5), name
        checked += 1
    assert checked and checked == len([n for n in names if not n.startswith("lora_te")])

    if family_name in DIFFUSERS_READS_LOKR:  # diffusers' own loader reads the run's file and the LyCORIS file
        for folder, weight_name in ((out, "pytorch_lora_weights.safetensors"), (tmp_path, comfy.name)):
            pipe = family.pipeline_class.from_pretrained(model)
            pipe.load_lora_weights(str(folder), weight_name=weight_name)
            assert np.allclose(render(pipe), after, atol=1e-5), weight_name


# ComfyUI's names for a LyCORIS module of each family (comfy/lora.py model_lora_keys_unet): SD/SDXL through
# unet_to_diffusers as `lora_unet_<diffusers path with _>`; Flux and Flux.2 through flux_to_diffusers as
# `lycoris_<diffusers path with _>` (q, k and v onto rows of the fused linear); Z-Image through z_image_to_diffusers
# as `diffusion_model.<diffusers path>`; SD3, Qwen-Image and Krea 2 as `transformer.<diffusers path>`
COMFYUI_NAME = {
    "sd": lambda m: "lora_unet_" + m.replace(".", "_"), "sdxl": lambda m: "lora_unet_" + m.replace(".", "_"),
    "flux": lambda m: "lycoris_" + m.replace(".", "_"), "flux2": lambda m: "lycoris_" + m.replace(".", "_"),
    "flux2_klein": lambda m: "lycoris_" + m.replace(".", "_"), "z_image": lambda m: "diffusion_model." + m,
    "sd3": lambda m: "transformer." + m, "qwen_image": lambda m: "transformer." + m,
    "krea2": lambda m: "transformer." + m,
}


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_lycoris_names_are_comfyuis_for_a_real_size_model(family_name):
    """The real-size denoiser (its diffusers default config on the meta device), the modules the default targets
    adapt there, and the names the LyCORIS export gives them: ComfyUI's own for that family."""
    from peft import LoKrConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from test_family_exports import COMFYUI_UNMAPPED

    assert family_name in COMFYUI_NAME, "read how ComfyUI names this family's LyCORIS modules and add it above"
    family = FAMILIES[family_name]()
    with torch.device("meta"):
        model = family.denoiser_class()
    linear = {name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    config = LoKrConfig(target_modules=family.lora_defaults(model.config))
    adapted = {name for name in linear if check_target_module_exists(config, name)}
    assert adapted
    state = {f"{family.denoiser_name}.{m}.lokr_w1": torch.ones(1, 1) for m in adapted}
    state.update({f"{family.denoiser_name}.{m}.lokr_w2": torch.ones(1, 1) for m in adapted})
    exported = lycoris(state, 4.0, 4, family.denoiser_name, family.lycoris_prefix)
    names = {k.removesuffix(".alpha") for k in exported if k.endswith(".alpha")}
    unmapped = COMFYUI_UNMAPPED.get(family_name, ())
    assert names == {COMFYUI_NAME[family_name](m) for m in adapted}
    assert all(not any(u in m for u in unmapped) for m in adapted)


@pytest.mark.parametrize("kind, rank, decompose_both", [("lokr", 16, False), ("lokr", 2, False), ("lokr", 2, True),
                                                         ("loha", 3, False)],
                         ids=["lokr-full-factors", "lokr-decomposed", "lokr-both-decomposed", "loha"])
def test_the_lycoris_file_carries_peft_s_scale_by_comfyui_s_rules(kind, rank, decompose_both):
    """peft scales every LoKr by alpha / rank; LyCORIS readers scale only a rank-decomposed one (two full factors:
    scale 1), so the export moves the scale into lokr_w1 there. Each module's delta by ComfyUI's rules is peft's."""
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48))
    config = (LoKrConfig(r=rank, alpha=5.0, target_modules=["0"], decompose_both=decompose_both) if kind == "lokr"
              else LoHaConfig(r=rank, alpha=5.0, target_modules=["0"]))
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        if "lokr" in name or "hada" in name:
            p.data.normal_()
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(model).items()}
    layer = model[0]
    expected = layer.get_delta_weight("default").double()
    full = "unet.0.lokr_w1" in state and "unet.0.lokr_w2" in state
    assert full == (kind == "lokr" and rank == 16)  # the case this parametrization means
    exported = lycoris(state, 5.0, rank, "unet", "lora_unet_")
    # peft computes its delta in fp32 (entries up to ~10): float32 rounding of a sum of products, 1e-5 absolute
    assert torch.allclose(comfyui_delta(exported, "lora_unet_0"), expected, atol=1e-5, rtol=0)
    if full:  # a wrong scale would be off by alpha / rank = 5/16: far outside the tolerance
        assert not torch.allclose(comfyui_delta(state_as_is(state), "unet.0"), expected, atol=1e-2, rtol=0)
