"""`dreambooth export --format single-file`: a full fine-tune as one checkpoint in the original SD / SDXL key
layout, read back by diffusers' from_single_file with every tensor unchanged and the same images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

import dreambooth
from dreambooth.cli import main
from test_lora import LORA
from tiny import make_tiny_sd

NO_PRIOR = dict(with_prior_preservation=False, class_prompt=None, class_data_dir=None, max_train_steps=2)
PIPELINES = {"sd": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
PREFIXES = {"sd": ("cond_stage_model.transformer.text_model.",), "sd2": ("cond_stage_model.model.transformer.",),
            "sdxl": ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.transformer.")}


def render(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of zwx dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images[0]


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd2", text_act="gelu")


@pytest.mark.parametrize("kind", ["sd", "sd2", "sdxl"])
def test_full_fine_tune_round_trips_through_from_single_file(kind, request, base_args, tmp_path):
    model = request.getfixturevalue({"sd": "tiny_model", "sd2": "tiny_sd2", "sdxl": "tiny_sdxl"}[kind])
    dreambooth.train(**base_args(pretrained_model_name_or_path=str(model), train_text_encoder=True, **NO_PRIOR))
    run = tmp_path / "out"
    out = tmp_path / "export" / "zwx.safetensors"
    assert main(["export", "--model", str(run), "--format", "single-file", "--output", str(out)]) == 0

    keys = set(load_file(out))
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    for prefix in PREFIXES[kind]:
        assert any(k.startswith(prefix) for k in keys), prefix

    cls = PIPELINES[kind]
    trained = cls.from_pretrained(run)
    back = cls.from_single_file(str(out), config=str(run), local_files_only=True)
    for part in ("unet", "vae", *(n for n in back.components if n.startswith("text_encoder"))):
        ours, theirs = getattr(trained, part).state_dict(), getattr(back, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    # The weights are bit-identical (above), but the two loaders build the modules differently (e.g. tensor strides,
    # attention processors), so float sums may run in another order: images agree to float rounding, ~1e-7 seen;
    # 1e-5 is far below one 8-bit level (3.9e-3).
    assert np.allclose(render(trained), render(back), rtol=0, atol=1e-5)


def test_lora_run_exports_fused_and_matches_merged(base_args, tiny_model, tmp_path):
    dreambooth.train(**base_args(**LORA, train_text_encoder=True, **NO_PRIOR))
    run = tmp_path / "out"
    single, merged = tmp_path / "zwx.safetensors", tmp_path / "merged"
    assert main(["export", "--model", str(run), "--format", "single-file", "--output", str(single)]) == 0
    assert main(["export", "--model", str(run), "--format", "merged", "--output", str(merged)]) == 0
    assert not any("lora" in k for k in load_file(single))
    back = StableDiffusionPipeline.from_single_file(str(single), config=str(tiny_model), local_files_only=True)
    assert np.allclose(render(back), render(StableDiffusionPipeline.from_pretrained(merged)), atol=1e-5)


def test_real_sizes_get_the_layout_diffusers_recognises():
    """At the real SD 1.5, SD 2 and SDXL sizes (on the meta device: no memory, no weights) the written keys are the
    ones diffusers' own single-file detector classifies as v1, v2 and xl_base, with the original key counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth.single_file import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        sd1 = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                   attention_head_dim=8)
        sd2 = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                                   attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
        xl = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                              intermediate_size=3072))
        open_h = CLIPTextModel(CLIPTextConfig(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16,
                                              intermediate_size=4096, hidden_act="gelu"))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, num_hidden_layers=32,
                                                           num_attention_heads=20, intermediate_size=5120,
                                                           hidden_act="gelu", projection_dim=1280))
    v = vae_to_ldm(vae.state_dict(), vae.config)
    layouts = {
        "v1": {**unet_to_ldm(sd1.state_dict(), sd1.config), **v,
               **clip_to_ldm(clip_l.state_dict(), "cond_stage_model.transformer.")},
        "v2": {**unet_to_ldm(sd2.state_dict(), sd2.config), **v,
               **open_clip_to_ldm(open_h.state_dict(), "cond_stage_model.model.")},
        "xl_base": {**unet_to_ldm(xl.state_dict(), xl.config), **v,
                    **clip_to_ldm(clip_l.state_dict(), "conditioner.embedders.0.transformer."),
                    **open_clip_to_ldm(big_g.state_dict(), "conditioner.embedders.1.model.")},
    }
    unet_keys = {"v1": 686, "v2": 686, "xl_base": 1680}
    for kind, state in layouts.items():
        assert infer_diffusers_model_type(state) == kind
        assert sum(k.startswith("model.diffusion_model.") for k in state) == unet_keys[kind]
    assert layouts["xl_base"]["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    assert layouts["v1"]["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_single_file_needs_a_safetensors_name(tiny_model, tmp_path, capsys):
    assert main(["export", "--model", str(tiny_model), "--format", "single-file", "--output",
                 str(tmp_path / "model.ckpt")]) == 2
    err = capsys.readouterr().err
    assert ".safetensors" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "model.ckpt").exists()


def test_sd3_and_flux_at_real_size_read_back_through_diffusers_converters():
    """At SD3-medium and Flux.1-dev sizes (meta device: shapes, no weights) diffusers' detector classifies our
    files as sd3 and flux-dev, and its own converters give back every key of the model with its shape; the Flux
    LoRA in kohya layout converts back to the run's peft keys (the fused linear1 at the real width)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        convert_sd3_transformer_checkpoint_to_diffusers,
        infer_diffusers_model_type,
    )
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from dreambooth.families import FAMILIES
    from dreambooth.lora_formats import kohya_flux
    from dreambooth.single_file import UNET_PREFIX
    from dreambooth.single_file_mmdit import flux_transformer_to_original, sd3_transformer_to_original

    with torch.device("meta"):
        sd3 = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                    caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                    pos_embed_max_size=192)
        flux = FluxTransformer2DModel(guidance_embeds=True)  # the defaults are Flux.1-dev's
    for model, to_original, to_diffusers, kind in (
            (sd3, sd3_transformer_to_original, convert_sd3_transformer_checkpoint_to_diffusers, "sd3"),
            (flux, flux_transformer_to_original, convert_flux_transformer_checkpoint_to_diffusers, "flux-dev")):
        state = model.state_dict()
        original = to_original(state, model.config)
        assert infer_diffusers_model_type({UNET_PREFIX + k: v for k, v in original.items()}) == kind
        back = to_diffusers(dict(original))
        assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}, kind

    with torch.device("meta"):
        flux.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=list(FAMILIES["flux"].default_lora_targets)))
    # the converter reads values (a sparsity check): real tensors of the real shapes, for the first block of each kind
    peft_state = {f"transformer.{k}": torch.randn(v.shape) for k, v in get_peft_model_state_dict(flux).items()
                  if k.startswith(("transformer_blocks.0.", "single_transformer_blocks.0."))}
    kohya = kohya_flux(peft_state, 16.0, 16, {"proj_mlp": 12288})
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in kohya
    converted = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    # every adapter comes back under its own name; the fused linear1 also gives proj_mlp a (zero) adapter
    expected = {k: v.shape for k, v in peft_state.items()}
    got = {k: v.shape for k, v in converted.items() if ".proj_mlp." not in k}
    assert got == expected
    # alpha / rank is 1 here, so each adapter comes back as it was (the scale moves no bits)
    assert all(torch.equal(converted[k], peft_state[k]) for k in expected)
