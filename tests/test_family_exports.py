"""The exports of every registered family on the tiny pipelines of tests/tiny.py: the run's LoRA loads in diffusers,
merged, kohya and ComfyUI files, single files in each family's original layout read back by diffusers, and the
ComfyUI key map of the real-size transformers (meta device)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dreambooth
from dreambooth.cli import main
from dreambooth.families import FAMILIES, ModelFamily, ModelSource, get_family
from dreambooth.generation import load_for_inference
from test_families import LORA, NO_PRIOR, render, trains_te


def base_pipeline(model):
    family = get_family(ModelSource(str(model)))
    return family.load_pipeline(ModelSource(str(model)), torch.float32)


@pytest.fixture
def lora_run(family_args, tiny, tmp_path):
    targets = {}
    if tiny[0] == "flux":  # diffusers' kohya-Flux reader hard-codes Flux-dev's widths for the single blocks' fused
        # linear1, so the tiny model's round trip adapts the double blocks; test_kohya_flux_layout covers linear1
        targets = {"lora_target_modules": [f"transformer_blocks.0.{m}" for m in FAMILIES["flux"].default_lora_targets]}
    dreambooth.train(**family_args(**LORA, train_text_encoder=trains_te(tiny), max_train_steps=2, **targets))
    return tmp_path / "out"


def test_lora_run_loads_in_diffusers_and_exports(lora_run, tiny, tmp_path, capsys):
    family_name, model = tiny
    family = FAMILIES[family_name]
    keys = set(load_file(lora_run / "pytorch_lora_weights.safetensors"))
    assert {k.split(".")[0] for k in keys} == {family.denoiser_name, *family.trained_text_encoders}
    theirs = base_pipeline(model)
    before = render(theirs)
    theirs.load_lora_weights(lora_run)
    after = render(theirs)
    assert np.abs(after - before).max() > 1e-4  # the adapters change the image
    assert np.allclose(render(load_for_inference(str(lora_run), torch.float32)), after, atol=1e-6)

    merged = tmp_path / "merged"
    assert main(["export", "--model", str(lora_run), "--format", "merged", "--output", str(merged)]) == 0
    # fused weights: W + BA summed once instead of added per call, float rounding apart
    assert np.allclose(render(family.pipeline_class.from_pretrained(merged)), after, atol=1e-4)

    # the file ComfyUI loads: every adapter with the `.alpha` ComfyUI reads its strength from (the run's lora_alpha)
    comfy = tmp_path / "comfyui.safetensors"
    assert main(["export", "--model", str(lora_run), "--format", "comfyui", "--output", str(comfy)]) == 0
    comfy_state = load_file(comfy)
    alphas = {k.removesuffix(".alpha"): v for k, v in comfy_state.items() if k.endswith(".alpha")}
    saved = json.loads((lora_run / "train_config.json").read_text())
    downs = {k.rsplit(".", 2)[0]: v for k, v in comfy_state.items() if k.endswith((".lora_A.weight",
                                                                                  ".lora_down.weight"))}
    scale = (saved["lora_alpha"] or saved["rank"]) / saved["rank"]
    # ComfyUI scales by alpha / the down matrix's rows (Flux's fused q, k, v: 3 x rank rows and 3 x alpha)
    assert alphas and all(float(v) / downs[m].shape[0] == scale for m, v in alphas.items())
    ups = [k for k in comfy_state if k.endswith((".lora_B.weight", ".lora_up.weight"))]
    assert sorted(k.rsplit(".", 2)[0] for k in ups) == sorted(alphas)  # one alpha per adapted module

    kohya = tmp_path / "kohya.safetensors"
    code = main(["export", "--model", str(lora_run), "--format", "kohya", "--output", str(kohya)])
    from dreambooth.families.base import ModelFamily

    if family.kohya_lora is ModelFamily.kohya_lora:  # no kohya layout (SD3, Flux.2, Z-Image): ComfyUI reads the
        # diffusers file's names itself, so the ComfyUI file is the run's own tensors with the alphas added
        assert code == 2 and "no kohya layout" in capsys.readouterr().err and not kohya.exists()
        assert {k: v for k, v in comfy_state.items() if not k.endswith(".alpha")}.keys() == keys
        return
    assert code == 0
    assert load_file(kohya).keys() == comfy_state.keys()  # where a kohya layout exists, ComfyUI's file is it
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in load_file(kohya))
    converted = base_pipeline(model)
    converted.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    # diffusers' converter splits fused and renamed modules back: the same adapters, up to the order of sums
    assert np.allclose(render(converted), after, atol=1e-5)


@pytest.fixture
def flux_width_shim(monkeypatch):
    """diffusers' Flux single-file reader hard-codes Flux-dev's width (3072) in one split of the single blocks;
    this gives that one split the tiny model's width, and everything else runs as shipped."""
    import diffusers.loaders.single_file_utils as sfu

    split = torch.split

    class Torch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def split(tensor, sizes, dim=0):
            if sizes == (3072, 3072, 3072, 12288) and tensor.shape[0] != sum(sizes):
                inner = tensor.shape[0] // 7  # q, k, v of the inner width and an MLP 4 times as wide
                sizes = (inner, inner, inner, 4 * inner)
            return split(tensor, sizes, dim=dim)

    monkeypatch.setattr(sfu, "torch", Torch())


# names only the original layouts have (ComfyUI's): fused q, k, v; BFL's and Krea's module names; Qwen-Image's
# original names are diffusers' own
FLUX2_ORIGINAL = {"double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_attn.norm.query_norm.scale",
                  "single_blocks.0.linear1.weight", "final_layer.adaLN_modulation.1.weight", "img_in.weight"}
ORIGINAL_KEYS = {"flux2": FLUX2_ORIGINAL, "flux2_klein": FLUX2_ORIGINAL,
                 "z_image": {"layers.0.attention.qkv.weight", "layers.0.attention.out.weight",
                             "final_layer.linear.weight", "x_embedder.weight"},
                 "krea2": {"blocks.0.attn.wq.weight", "blocks.0.attn.gate.weight", "blocks.0.mod.lin", "first.weight",
                           "txtfusion.projector.weight", "last.modulation.lin", "txtmlp.0.scale"},
                 "qwen_image": {"transformer_blocks.0.attn.to_q.weight", "img_in.weight"}}


def test_single_file_export_round_trips_through_from_single_file(family_args, tiny, tmp_path, flux_width_shim):
    family_name, model = tiny
    family = FAMILIES[family_name]
    from dreambooth.families.base import ModelFamily

    dreambooth.train(**family_args(max_train_steps=1, **NO_PRIOR))
    out = tmp_path / "model.safetensors"
    code = main(["export", "--model", str(tmp_path / "out"), "--format", "single-file", "--output", str(out)])
    if family.single_file_state is ModelFamily.single_file_state:  # not written yet (Flux.2, Z-Image): refused
        assert code == 2 and not out.exists()
        return
    assert code == 0
    if family_name in ORIGINAL_KEYS:  # the transformer alone, in its original names (diffusers would read its own)
        written = load_file(out)
        assert ORIGINAL_KEYS[family_name] <= written.keys(), sorted(written)[:8]
    trained = family.pipeline_class.from_pretrained(tmp_path / "out")
    denoiser = getattr(trained, family.denoiser_name)
    back = type(denoiser).from_single_file(str(out), config=str(tmp_path / "out"), subfolder=family.denoiser_name,
                                           local_files_only=True)
    ours, theirs = denoiser.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_kohya_flux_layout_fuses_qkv_and_keeps_the_scale():
    from dreambooth.lora_formats import kohya_flux

    torch.manual_seed(0)
    rank, width, inp = 2, 6, 6
    state = {}
    for module in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                   "transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.attn.to_q",
                   "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v"):
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, inp)
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(width, rank)
    out = kohya_flux(state, alpha=4.0, rank=rank, widths={"proj_mlp": 4 * width})
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert out[f"{qkv}.lora_down.weight"].shape == (3 * rank, inp)
    assert out[f"{qkv}.lora_up.weight"].shape == (3 * width, 3 * rank)
    scale = out[f"{qkv}.alpha"] / (3 * rank)
    assert scale == pytest.approx(4.0 / rank)  # alpha / rank as in each part
    delta = out[f"{qkv}.lora_up.weight"] @ out[f"{qkv}.lora_down.weight"]
    expected = torch.cat([state[f"transformer.transformer_blocks.0.attn.to_{x}.lora_B.weight"]
                          @ state[f"transformer.transformer_blocks.0.attn.to_{x}.lora_A.weight"] for x in "qkv"])
    assert torch.allclose(delta, expected, atol=1e-6)
    linear1 = "lora_unet_single_blocks_0_linear1"
    assert out[f"{linear1}.lora_up.weight"].shape == (7 * width, 4 * rank)  # q, k, v + an empty MLP block
    assert out[f"{linear1}.lora_up.weight"][3 * width:].abs().sum() == 0


def test_comfyui_alphas_carry_a_custom_lora_alpha():
    """ComfyUI takes the strength from `.alpha` / rank only: a run trained at lora_alpha 8, rank 4 must say 8."""
    from dreambooth.errors import DataError
    from dreambooth.lora_formats import with_alphas

    state = {"transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 6),
             "transformer.layers.0.attention.to_q.lora_B.weight": torch.zeros(6, 4)}
    out = with_alphas(state, 8.0)
    assert float(out["transformer.layers.0.attention.to_q.alpha"]) == 8.0 and len(out) == 3
    with pytest.raises(DataError, match="not a LoRA tensor"):
        with_alphas({**state, "transformer.x.dora_scale": torch.zeros(1)}, 8.0)


# What ComfyUI's LoRA loader maps for the families whose `--format comfyui` file keeps diffusers' module names
# (`transformer.<module>`), read from its comfy/lora.py `model_lora_keys_unet` and comfy/utils.py converters
# (`flux_to_diffusers`, `z_image_to_diffusers`, `mmdit_to_diffusers`, `krea2_to_diffusers`; Qwen-Image keeps
# diffusers' names): every Linear module of the real-size transformer, but for Flux.2 the timestep/guidance
# embedders and the modulation layers, which its Flux converter has no entry for (their adapters would be skipped
# with "lora key not loaded").
FLUX2_UNMAPPED = ("time_guidance_embed.", "modulation")
COMFYUI_UNMAPPED = {"sd3": (), "z_image": (), "qwen_image": (), "krea2": (), "flux2": FLUX2_UNMAPPED,
                    "flux2_klein": FLUX2_UNMAPPED}


@pytest.mark.parametrize("family_name", [n for n, f in FAMILIES.items() if f.kohya_lora is ModelFamily.kohya_lora])
def test_comfyui_maps_every_module_a_real_size_export_adapts(family_name):
    """The real-size transformer (its diffusers default config, on the meta device: no weights), the modules the
    default LoRA targets adapt there (peft's own matching), and the keys --format comfyui writes for them: each one
    names a module ComfyUI maps, with its `.alpha`."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from dreambooth.lora_formats import with_alphas

    assert family_name in COMFYUI_UNMAPPED, "read how ComfyUI maps this family's LoRA keys and add it above"
    family = FAMILIES[family_name]()
    with torch.device("meta"):
        model = family.denoiser_class()
    linear = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    config = LoraConfig(target_modules=family.lora_defaults(model.config))
    adapted = {name for name in linear if check_target_module_exists(config, name)}
    assert len(adapted) >= model.config.get("num_layers", 1)  # every block at least
    state = {f"{family.denoiser_name}.{m}.lora_{x}.weight": torch.zeros(1) for m in adapted for x in "AB"}
    exported = with_alphas(state, 4.0)
    modules = {k.removeprefix("transformer.").rsplit(".", 1)[0] for k in exported if k.endswith(".alpha")}
    mapped = {n for n in linear if not any(part in n for part in COMFYUI_UNMAPPED[family_name])}
    assert modules == adapted and modules <= mapped, sorted(modules - mapped)[:5]
