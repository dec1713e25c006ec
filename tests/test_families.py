"""One suite over every registered model family on the tiny pipelines of tests/tiny.py: encoding as the pipeline
does, training with prior preservation (full and LoRA), exact resume, generate, evaluation (the exports:
test_family_exports.py). A new family gets all of it by registering and adding a tiny builder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dreambooth
from conftest import T5_TOKENS, to_argv
from dreambooth.cli import main
from dreambooth.families import FAMILIES, ModelSource, get_family
from dreambooth.generation import load_for_inference
from dreambooth.registry import Registry
from test_resume import straight_and_resumed
from test_training import same, weights
from tiny import TINY, make_tiny_clip, make_tiny_dino, make_tiny_sd3

LORA = dict(use_lora=True, rank=4, learning_rate=1e-2)
NO_PRIOR = dict(with_prior_preservation=False, class_prompt=None, class_data_dir=None)


def trains_te(tiny) -> bool:
    """--train_text_encoder where the family trains one (Flux.2 klein's and Z-Image's language models never are:
    the option is refused for them)."""
    return bool(FAMILIES[tiny[0]].trained_text_encoders)


def render(pipe, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    if "max_sequence_length" in type(pipe).__call__.__code__.co_varnames:
        kwargs.setdefault("max_sequence_length", T5_TOKENS)
    return pipe(prompt="a photo of zwx dog", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images[0]


def test_every_registered_family_has_a_tiny_pipeline_and_fills_every_hook():
    assert set(FAMILIES) == set(TINY)
    for cls in FAMILIES.values():
        cls()  # abstract hooks left unfilled would refuse to instantiate


def test_registries_refuse_duplicates_and_unfilled_hooks():
    from dreambooth.families.base import ModelFamily

    registry: Registry[type] = Registry("thing")
    registry.register("a")(int)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")(float)

    class Half(ModelFamily):
        name = "half"

    with pytest.raises(TypeError, match="does not fill these hooks: .*denoiser_call"):
        registry.register()(Half)


# -- encoding ------------------------------------------------------------------------------------------------------


def pipeline_encoding(family: str, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The conditioning each pipeline computes for itself, under our names."""
    if family == "sd":
        embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        return {"encoder_hidden_states": embeds}
    if family == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                  max_sequence_length=T5_TOKENS)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    if family in ("flux2_klein", "flux2"):
        embeds, _ = pipe.encode_prompt(prompts, max_sequence_length=T5_TOKENS)
        return {"encoder_hidden_states": embeds}
    if family == "z_image":  # one unpadded sequence per prompt: ours are padded, with a mask of the prompt's
        embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
        return {"cap_feats": embeds}
    if family == "qwen_image":  # padded to the batch's longest prompt; no mask where none is padded
        embeds, mask = pipe.encode_prompt(prompts, max_sequence_length=T5_TOKENS)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}
    if family == "krea2":
        embeds, mask = pipe.encode_prompt(prompts, max_sequence_length=T5_TOKENS)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
    embeds, pooled, _ = pipe.encode_prompt(prompts, prompts, max_sequence_length=T5_TOKENS)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


@pytest.mark.parametrize("without_t5", [False, True], ids=["", "sd3-without-t5"])
def test_encodes_as_the_pipeline_does(tiny, tmp_path, without_t5):
    family_name, model = tiny
    if without_t5:
        if family_name != "sd3":
            pytest.skip("only SD3 allows leaving T5 out")
        model = make_tiny_sd3(tmp_path / "sd3-no-t5", with_t5=False)
    source = ModelSource(str(model))
    family = get_family(source)
    c = family.load(source)
    prompts = ["a photo of zwx dog", "a photo of dog"]
    cfg = type("Cfg", (), {"max_sequence_length": T5_TOKENS})()
    with torch.no_grad():
        ours = family.encode(c, family.tokenize(c, prompts, cfg), cfg)
        pipe = family.pipeline(c, c.denoiser, c.text_encoders, c.noise_scheduler)
        theirs = pipeline_encoding(family_name, pipe, prompts)
    if "cap_mask" in ours:  # Z-Image: the prompt's own positions of our padded states are the pipeline's
        ours = {"cap_feats": [feats[keep] for feats, keep in zip(ours["cap_feats"], ours.pop("cap_mask"))]}
        assert [t.shape for t in ours["cap_feats"]] == [t.shape for t in theirs["cap_feats"]]
        ours, theirs = ({"cap_feats": torch.cat(x["cap_feats"])} for x in (ours, theirs))
    if "encoder_hidden_states_mask" in ours:  # Qwen-Image: ours padded to one length, zero past each prompt
        length = theirs["encoder_hidden_states"].shape[1]
        assert not ours["encoder_hidden_states_mask"][:, length:].any()
        assert not ours["encoder_hidden_states"][:, length:].any()
        ours = {k: v[:, :length] for k, v in ours.items()}
        assert theirs["encoder_hidden_states_mask"] is not None  # the two prompts' lengths differ
    assert ours.keys() == theirs.keys()
    for key in ours:  # the same modules on the same inputs, batched alike: equal to float rounding
        assert torch.allclose(ours[key], theirs[key], atol=1e-6), key


def captured_call(family: str, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy latents (N, C, H, W), time) in our conventions, from a pipeline's own call of its denoiser."""
    if family in ("sd", "sdxl"):
        return args[0], args[1]
    if family == "sd3":
        return kwargs["hidden_states"], kwargs["timestep"]
    if family in ("flux2_klein", "flux2"):  # (N, H*W, C) -> (N, C, H, W): the 4x4 grid of 2x2 patches of 8x8 latents
        packed = kwargs["hidden_states"]
        return packed.permute(0, 2, 1).reshape(packed.shape[0], -1, 4, 4), kwargs["timestep"] * 1000
    if family == "z_image":  # a list of (C, 1, H, W), time as 1 - t
        return torch.stack(args[0]).squeeze(2), 1000 - args[1] * 1000
    if family in ("qwen_image", "krea2"):  # packed 2x2 into (N, H*W/4, 4C), the frame axis dropped
        from diffusers import QwenImagePipeline

        return QwenImagePipeline._unpack_latents(kwargs["hidden_states"], 64, 64, 8).squeeze(2), \
            kwargs["timestep"] * 1000
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(kwargs["hidden_states"], 64, 64, 8), kwargs["timestep"] * 1000


def test_the_denoiser_is_called_as_the_pipeline_calls_it(tiny, monkeypatch):
    """Timestep scale, packing, ids, guidance, size conditioning: our call of the denoiser on the pipeline's own
    inputs gives the pipeline's own output."""
    from types import SimpleNamespace

    family_name, model = tiny
    family = FAMILIES[family_name]()
    source = ModelSource(str(model))
    c = family.load(source)
    pipe = family.load_pipeline(source, torch.float32)
    denoiser = getattr(pipe, family.denoiser_name)
    seen = []
    forward = type(denoiser).forward

    def spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        seen.append((args, kwargs, out[0] if isinstance(out, tuple) else out.sample))
        return out

    monkeypatch.setattr(type(denoiser), "forward", spy)
    cfg = SimpleNamespace(max_sequence_length=T5_TOKENS, guidance_scale=2.0, resolution=64)
    extra = {"max_sequence_length": T5_TOKENS} if family.t5_part else {}
    with torch.no_grad():  # guidance 2 is Flux's guidance input; the others run without CFG at 1 (Z-Image: at 0)
        pipe(prompt="a photo of zwx dog", num_inference_steps=1, height=64, width=64, output_type="latent",
             guidance_scale={"flux": 2.0, "flux2": 2.0, "z_image": 0.0, "krea2": 0.0}.get(family_name, 1.0),
             generator=torch.Generator().manual_seed(0), **extra)
        args, kwargs, theirs = seen[0]
        noisy, t = captured_call(family_name, args, kwargs)
        cond = family.encode(c, family.tokenize(c, ["a photo of zwx dog"], cfg), cfg)
        batch = {"original_sizes": torch.tensor([[64, 64]]), "crop_top_lefts": torch.tensor([[0, 0]]),
                 "target_sizes": torch.tensor([[64, 64]])}
        ours = family.denoiser_call(c, c.denoiser, cond, batch, cfg)(noisy, t)
    if family_name == "flux":
        from diffusers import FluxPipeline

        theirs = FluxPipeline._unpack_latents(theirs, 64, 64, 8)
    if family_name in ("flux2_klein", "flux2"):
        theirs = theirs.permute(0, 2, 1).reshape(theirs.shape[0], -1, 4, 4)
    if family_name == "z_image":  # the pipeline negates the output before its scheduler step
        theirs = -torch.stack(theirs).squeeze(2)
    if family_name in ("qwen_image", "krea2"):
        from diffusers import QwenImagePipeline

        theirs = QwenImagePipeline._unpack_latents(theirs, 64, 64, 8).squeeze(2)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5)  # the same modules and inputs: float rounding apart


# -- one load for class images and training ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_loaded_parts_lent_in_a_dtype_are_what_loading_in_it_gives_and_come_back_untouched(tiny, dtype):
    """Class images sample with the parts training loaded (fp32), lent in the generation dtype: every weight and
    buffer is then what `from_pretrained(dtype=...)` gives (T5 keeps its `wo` layers fp32 under fp16, as loading
    does), and afterwards each is its own fp32 tensor again. Casts of the same stored values: compared bitwise."""
    from dreambooth.devices import lent

    _, model = tiny
    source = ModelSource(str(model))
    family = get_family(source)
    c = family.load(source)
    parts = {family.denoiser_name: c.denoiser, "vae": c.vae, **c.text_encoders}
    before = {name: {k: (t, t.clone()) for k, t in m.state_dict(keep_vars=True).items()} for name, m in parts.items()}
    loaded = family.load_pipeline(source, dtype)
    with lent(list(parts.values()), "cpu", dtype):
        for name, module in parts.items():
            expected = getattr(loaded, name).state_dict()
            got = module.state_dict()
            assert got.keys() == expected.keys()
            for key, t in got.items():
                assert t.dtype == expected[key].dtype, (name, key)
                assert torch.equal(t, expected[key]), (name, key)
    for name, module in parts.items():
        for key, t in module.state_dict(keep_vars=True).items():
            own, values = before[name][key]
            assert t is own and t.data_ptr() == own.data_ptr() and torch.equal(t, values), (name, key)


def test_a_diffusers_model_keeps_its_fp32_modules_in_bf16_when_lent_as_when_loaded(tiny_model, monkeypatch):
    """diffusers keeps `_keep_in_fp32_modules` fp32 in every dtype (transformers: under fp16 only); none of the
    four denoisers names any today, so one is named here."""
    from diffusers import UNet2DConditionModel

    from dreambooth.devices import lent

    monkeypatch.setattr(UNet2DConditionModel, "_keep_in_fp32_modules", ["conv_in"])
    loaded = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet", dtype=torch.bfloat16)
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    with lent([unet], "cpu", torch.bfloat16):
        for key, t in unet.state_dict().items():
            assert t.dtype == loaded.state_dict()[key].dtype, key
        assert unet.conv_in.weight.dtype == torch.float32 and unet.conv_out.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_class_images_from_the_training_load_equal_those_of_a_pipeline_loaded_for_them(family_args, tmp_path,
                                                                                      precision):
    """The name of a class image is a pure function of its settings, so the one-load path must make the same file
    bytes as loading the pipeline on its own (what `generate`, older runs and other tools did)."""
    from accelerate import Accelerator

    from dreambooth import schema
    from dreambooth.config import TrainConfig
    from dreambooth.prior import ensure_class_images

    made = {}
    for way in ("own", "lent"):
        cfg = schema.build(TrainConfig, family_args(class_data_dir=str(tmp_path / way), num_class_images=3,
                                                    sample_batch_size=2, prior_generation_precision=precision))
        source = ModelSource(cfg.pretrained_model_name_or_path)
        family = get_family(source)
        loaded = family.load(source) if way == "lent" else None
        ensure_class_images(cfg, family, source, Accelerator(cpu=True), loaded=loaded)
        made[way] = {p.name: p.read_bytes() for p in sorted((tmp_path / way).glob("class-*.png"))}
    assert len(made["own"]) == 3 and made["lent"] == made["own"]


# -- training ------------------------------------------------------------------------------------------------------


def test_full_run_with_prior_trains_what_it_should_and_renders(family_args, tiny, tmp_path):
    family_name, model = tiny
    family = FAMILIES[family_name]
    args = family_args(train_text_encoder=trains_te(tiny), max_train_steps=2, checkpointing_steps=2,
                       validation_prompt="a photo of zwx dog", validation_steps=2, num_validation_images=1,
                       validation_inference_steps=2)
    assert main(["train", *to_argv(args)]) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["family"] == family_name and summary["class_images"]["generated"] == 4
    assert summary["mean_prior_loss"] > 0 and np.isfinite(summary["mean_loss"])
    assert not same(weights(out, family.denoiser_name), weights(model, family.denoiser_name))
    for part in family.trained_text_encoders:
        assert not same(weights(out, part), weights(model, part)), part
    frozen = [p.name for p in model.iterdir() if p.name.startswith("text_encoder")
              and p.name not in family.trained_text_encoders]
    for part in ["vae", *frozen]:  # T5 is never trained
        assert same(weights(out, part), weights(model, part)), part
    assert (out / "validation" / "step-000002.png").is_file()
    assert np.isfinite(render(family.pipeline_class.from_pretrained(out))).all()
    for source in (out, out / "checkpoint-2"):  # the output and a checkpoint on its own
        assert main(["generate", "--model", str(source), "--prompt", "a photo of zwx dog", "--num_images", "1",
                     "--num_inference_steps", "2", "--device", "cpu", "--height", "64", "--width", "64",
                     "--output_dir", str(tmp_path / f"samples-{source.name}")]) == 0


def test_resume_is_exact(family_args, tiny, tmp_path, monkeypatch):
    family = FAMILIES[tiny[0]]
    straight_and_resumed(family_args, tmp_path, monkeypatch, 2, max_train_steps=4, checkpointing_steps=2,
                         train_text_encoder=trains_te(tiny), **NO_PRIOR)
    for part in (family.denoiser_name, *family.trained_text_encoders):  # one device, the same computations
        assert same(weights(tmp_path / "straight", part), weights(tmp_path / "stopped", part)), part


def test_train_with_eval_scores_the_trained_model(family_args, tiny, tmp_path):
    root = tmp_path / "backbones"
    (tmp_path / "eval.toml").write_text("\n".join([
        f'dino_model = "{make_tiny_dino(root / "dino")}"', f'clip_model = "{make_tiny_clip(root / "clip")}"',
        "images_per_prompt = 2", "class_images = 2", "num_inference_steps = 1", "bootstrap_resamples = 100",
        'device = "cpu"']))
    summary = dreambooth.train(**family_args(max_train_steps=1, eval=True, eval_config=str(tmp_path / "eval.toml"),
                                             identifier="zwx",
                                             **NO_PRIOR))
    report = json.loads((tmp_path / "out" / "evaluation" / "report.json").read_text())
    assert report["sampling"]["sampler"] == FAMILIES[tiny[0]].default_sampler
    assert summary["evaluation"]["dino"]["value"] == report["metrics"]["dino"]["value"]


# -- what each family reads ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family_name, option, value, message", [
    ("sd3", "snr_gamma", 5.0, "means nothing for sd3 models"),
    ("flux", "prediction_type", "v_prediction", "means nothing for flux models"),
    ("sd", "weighting_scheme", "logit_normal", "means nothing for sd models"),
    ("sdxl", "max_sequence_length", 77, "means nothing for sdxl models"),
    ("sd3", "guidance_scale", 1.0, "means nothing for sd3 models"),
    ("flux", "resolution", 72, "must be a multiple of 16 for flux models"),
    ("sd3", "class_sampler", "dpm++", "not a sampler for sd3 models; choose one of euler"),
])
def test_options_a_family_does_not_read_are_refused(base_args, tmp_path, capsys, family_name, option, value,
                                                    message):
    model = TINY[family_name](tmp_path / family_name)
    code = main(["train", *to_argv(base_args(pretrained_model_name_or_path=str(model), **{option: value}))])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_flux_is_told_the_training_guidance(family_args, tiny, monkeypatch):
    family_name, _ = tiny
    if family_name not in ("flux", "flux2"):
        pytest.skip("the guidance embedding is Flux.1-dev's and Flux.2-dev's")
    transformer = FAMILIES[family_name].denoiser_class
    seen = []
    forward = transformer.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs["guidance"])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(transformer, "forward", spy)
    dreambooth.train(**family_args(max_train_steps=1, guidance_scale=2.5, **NO_PRIOR))
    assert seen and all(torch.equal(g, torch.full_like(g, 2.5)) for g in seen)


def test_quantized_base_is_refused_where_it_cannot_run(base_args, capsys):
    assert main(["train", *to_argv(base_args(quantize_base="nf4"))]) == 2
    assert "only with --use_lora" in capsys.readouterr().err
    assert main(["train", *to_argv(base_args(quantize_base="nf4", use_lora=True))]) == 2  # device cpu
    assert "needs a CUDA GPU" in capsys.readouterr().err


# -- the frozen base model as the prior's target (--prior_target base_model) ---------------------------------------


def test_lora_base_prediction_is_the_adapter_free_models(tiny):
    """LoRA's base model is the denoiser with its adapters switched off for the call: bit for bit the prediction of
    the model before adapters were added (the base layers' own computation), and the adapters are on again after."""
    import copy

    from dreambooth import schema
    from dreambooth.base_model import BaseModel
    from dreambooth.config import TrainConfig
    from dreambooth.lora import add_adapters, lora_targets

    family_name, model = tiny
    family = FAMILIES[family_name]()
    c = family.load(ModelSource(str(model)))
    t5 = {"max_sequence_length": T5_TOKENS} if family.t5_part else {}
    cfg = schema.build(TrainConfig, dict(pretrained_model_name_or_path=str(model), instance_data_dir=str(model),
                                         instance_prompt="a photo of zwx dog", use_lora=True, resolution=64, **t5))
    plain = copy.deepcopy(c.denoiser)
    with torch.no_grad():
        encoded = family.encode(c, family.tokenize(c, ["a photo of zwx dog", "a photo of dog"], cfg), cfg)
    class_cond = {k: v[1:2] for k, v in encoded.items()}
    add_adapters(cfg, c.denoiser, lora_targets(cfg, family, c.denoiser.config), [])
    with torch.no_grad():
        for name, p in c.denoiser.named_parameters():
            if "lora_B" in name:  # trained adapters: their branch is not zero
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    batch = {"original_sizes": torch.tensor([[64, 64]] * 3), "crop_top_lefts": torch.zeros(3, 2, dtype=torch.long),
             "target_sizes": torch.tensor([[64, 64]] * 3), "prompt_ids": torch.tensor([0, 1, 1])}
    rows = torch.tensor([False, True, True])  # one instance example, two class examples
    channels = getattr(c.vae.config, "latent_channels", None) or c.vae.config.z_dim  # (Qwen-Image's: z_dim)
    noisy = family.normalize_latents(c, torch.randn(2, channels, 8, 8,
                                                   generator=torch.Generator().manual_seed(0)))  # (Flux.2: 2x2 patches)
    t = torch.tensor([500, 20]) if family.objective == "ddpm" else torch.tensor([500.0, 20.0])
    cond = {k: v.expand(2, *v.shape[1:]) for k, v in class_cond.items()}
    sliced = {k: v[rows] for k, v in batch.items()}
    with torch.no_grad():
        ours = BaseModel.adapters_off(encoded).denoise(family, c, c.denoiser, batch, rows, cfg)(noisy, t)
        theirs = family.denoiser_call(c, plain, cond, sliced, cfg)(noisy, t)
        adapted = family.denoiser_call(c, c.denoiser, cond, sliced, cfg)(noisy, t)
    assert torch.equal(ours, theirs)
    assert (adapted - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_base_model_target_starts_at_the_models_own_prediction(family_args, tiny, tmp_path, lora):
    """Without class images (the instance images under the class prompt are the inputs): at step 1 the trained model
    still is the base, so the class examples have nothing to learn; once it has moved, they do. No class image is
    made. With a trained text encoder the target keeps the untouched encoder's conditioning."""
    from dreambooth.events import read_events

    args = family_args(prior_target="base_model", class_data_dir=None, max_train_steps=3, logging_steps=1,
                       train_text_encoder=trains_te(tiny), **(LORA if lora else {}))
    summary = dreambooth.train(**args)
    steps = [e for e in read_events(tmp_path / "out" / "events.jsonl")[0] if e["event"] == "step"]
    # the same weights on the same inputs; only the batch's size differs (4 rows vs the 2 class rows): float
    # rounding of kernels, squared
    assert steps[0]["loss_prior"] < 1e-8
    assert steps[-1]["loss_prior"] > 1e-6
    assert summary["prior_target"] == "base_model" and "class_images" not in summary
    assert not (tmp_path / "class").exists()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_captions_masks_and_ema_train_every_family(family_args, tiny, tmp_path, instance_dir, lora):
    """Per-image captions, the masked loss and EMA together (LoRA: on photos of mixed shapes in aspect-ratio
    buckets, the reference scripts' --aspect_ratio_buckets list in the family's multiple, with prior preservation's
    class images made at the buckets' sizes): the run finishes and writes the average beside the result in the
    result's own format, which loads for inference like the result."""
    import shutil

    from PIL import Image

    from test_buckets import MIXED, shapes

    folder = tmp_path / "annotated"
    m = FAMILIES[tiny[0]].resolution_multiple
    buckets = {"aspect_ratio_buckets": f"{4 * m},{3 * m};{3 * m},{4 * m}"} if lora else {}
    if lora:
        shapes(folder, MIXED)
    else:
        shutil.copytree(instance_dir, folder)
    for i, image in enumerate(sorted(folder.glob("*.png"))):
        image.with_suffix(".txt").write_text(f"a photo of [V] dog number {i}")
        w, h = Image.open(image).size
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
        Image.fromarray(mask).save(folder / f"{image.stem}-masklabel.png")
    args = family_args(instance_data_dir=str(folder), caption_extension=".txt", masked_loss=True, use_ema=True,
                       train_text_encoder=trains_te(tiny), max_train_steps=2, num_class_images=2,
                       **(LORA if lora else {}), **buckets)
    summary = dreambooth.train(**args)
    out = tmp_path / "out"
    assert summary["num_instance_images"] == len(list(folder.glob("*.txt"))) and summary["ema"]["folder"] == "ema"
    if lora:  # 3 portraits, 2 landscapes (the square photo ties and goes to the last): one class image of each
        sizes = sorted(Image.open(p).size for p in (tmp_path / "class").glob("class-*.png"))
        assert sizes == [(3 * m, 4 * m), (4 * m, 3 * m)], sizes
    raw = sorted(p.name for p in out.iterdir() if p.name in {"pytorch_lora_weights.safetensors", "model_index.json"})
    assert raw and sorted(p.name for p in (out / "ema").iterdir() if p.name in raw) == raw
    pipe = load_for_inference(str(out / "ema"), torch.float32)  # a LoRA folder: its base model + the averaged file
    assert type(pipe).__name__ == type(load_for_inference(str(out), torch.float32)).__name__


def test_every_family_names_blocks_its_tiny_denoiser_has_for_sharding(tiny):
    family_name, model = tiny
    family = FAMILIES[family_name]
    c = family().load(ModelSource(str(model)))
    blocks = [getattr(c.denoiser, name) for name in family.shard_blocks if getattr(c.denoiser, name, None) is not None]
    assert blocks and all(isinstance(b, torch.nn.Module) for b in blocks)


def test_a_pipeline_built_from_loaded_parts_keeps_the_base_models_settings(tmp_path):
    """Class images and validation sample with a pipeline built from the loaded modules: it carries the settings
    the base model's model_index.json holds (Flux.2 klein's is_distilled, Krea 2's layer taps), as loading does."""
    from dreambooth.families.base import read_model_index

    built = {"flux2_klein": TINY["flux2_klein"](tmp_path / "klein", distilled=True),  # runs without CFG
             "krea2": TINY["krea2"](tmp_path / "krea2")}
    assert {n for n, f in FAMILIES.items() if getattr(f, "pipeline_settings", ())} == built.keys()
    for family_name, model in built.items():
        family = FAMILIES[family_name]()
        c = family.load(ModelSource(str(model)))
        pipe = family.pipeline(c, c.denoiser, c.text_encoders, c.noise_scheduler)
        index = read_model_index(ModelSource(str(model)))
        for key in family.pipeline_settings:
            assert list(np.atleast_1d(pipe.config[key])) == list(np.atleast_1d(index[key])), key
        if family_name == "flux2_klein":
            assert index["is_distilled"] is True and pipe.config.is_distilled is True


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_without_a_learning_rate_the_method_and_family_default_is_used_and_reported(family_args, tiny, lora):
    """`train --use_lora` without --learning_rate trains at the family's reference LoRA rate (not the full
    fine-tuning rate, ~100x slower); full fine-tuning at the reference 5e-6; the run summary says which."""
    from dreambooth.config import FULL_LEARNING_RATE
    from dreambooth.families import FAMILIES

    args = family_args(max_train_steps=1, use_lora=lora, with_prior_preservation=False, class_prompt=None,
                       class_data_dir=None, train_text_encoder=trains_te(tiny))
    del args["learning_rate"]
    summary = dreambooth.train(**args)
    expected = FAMILIES[tiny[0]].lora_learning_rate if lora else FULL_LEARNING_RATE
    assert summary["learning_rate"] == expected
    assert expected == ({"sd": 5e-4, "sdxl": 1e-4, "sd3": 1e-4, "flux": 1e-4, "flux2_klein": 1e-4,
                         "z_image": 1e-4, "qwen_image": 1e-4, "flux2": 1e-4, "krea2": 3e-4}[tiny[0]] if lora else 5e-6)
    # the text encoders as in the reference scripts: SDXL, SD3 and Flux at 5e-6 with weight decay 1e-3, SD with
    # the denoiser's rate and decay
    saved = json.loads((Path(args["output_dir"]) / "train_config.json").read_text())
    reference = tiny[0] in ("sdxl", "sd3", "flux")  # (klein and Z-Image train no text encoder)
    assert saved["text_encoder_lr"] == (5e-6 if reference else None)
    assert saved["adam_weight_decay_text_encoder"] == (1e-3 if reference else None)


@pytest.mark.parametrize("family_name", ["flux2_klein", "flux2"])
def test_flux2_reads_the_chosen_text_encoder_layers_in_training_and_sampling(family_name, instance_dir, tmp_path,
                                                                            capsys):
    """--text_encoder_out_layers (the reference scripts' flag): the encoding is the pipeline's for those layers, the
    class-image and validation pipelines are told them, and a count the transformer cannot read is refused."""
    from types import SimpleNamespace

    family = FAMILIES[family_name]()
    model = TINY[family_name](tmp_path / family_name)
    c = family.load(ModelSource(str(model)))
    cfg = SimpleNamespace(max_sequence_length=T5_TOKENS, text_encoder_out_layers=[1, 2, 3])
    pipe = family.pipeline(c, c.denoiser, c.text_encoders, c.noise_scheduler)
    with torch.no_grad():
        ours = family.encode(c, family.tokenize(c, ["a photo of zwx dog"], cfg), cfg)["encoder_hidden_states"]
        theirs, _ = pipe.encode_prompt(["a photo of zwx dog"], max_sequence_length=T5_TOKENS,
                                       text_encoder_out_layers=(1, 2, 3))
        default, _ = pipe.encode_prompt(["a photo of zwx dog"], max_sequence_length=T5_TOKENS)
    assert torch.allclose(ours, theirs, atol=1e-6) and not torch.allclose(ours, default, atol=1e-3)
    assert family.pipeline_kwargs(cfg)["text_encoder_out_layers"] == (1, 2, 3)
    defaults = family.option_defaults["text_encoder_out_layers"]
    assert family.pipeline_kwargs()["text_encoder_out_layers"] == tuple(defaults)
    argv = ["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", "a zwx dog", "--output_dir", str(tmp_path / "out"), "--device", "cpu",
            "--resolution", "64", "--max_sequence_length", str(T5_TOKENS), "--text_encoder_out_layers", "1", "2"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "reads 3 of its text encoder's" in err and "Traceback" not in err
