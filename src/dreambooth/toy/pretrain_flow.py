"""`dreambooth toy pretrain --family sd3`: the toy world's flow-matching base model, a small SD3 pipeline.

It reuses the frozen VAE of the bundled DDPM toy model (its latents, with the shift and scaling factors SD3 reads
from the VAE's config), two CLIP-with-projection text encoders on the toy tokenizer (T5 is left out, as
`StableDiffusion3Pipeline` allows), an `SD3Transformer2DModel` and a `FlowMatchEulerDiscreteScheduler`. It is
trained by the training loop's own pieces: the SD3 family's encoding and denoiser call, and the `rectified_flow`
objective (keyed draws, one implementation), so what DreamBooth fine-tunes later is what pretraining taught.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from ..families import FAMILIES, Components, ModelSource
from ..objectives import OBJECTIVES, Keys
from .measure import toy_options
from .pretrain import EMA, encode_all, lr_factor, update
from .tokenizer import write_toy_tokenizer
from .world import SIZE, caption, held_out_triples, random_scene

log = logging.getLogger("dreambooth")
# SD3's pretraining recipe (Esser et al. 2024, rf/lognorm(0, 1)): logit-normal sigmas and the plain velocity loss.
# Not the fine-tuning default of the reference scripts (preconditioned outputs: a loss on x_0, which weighs the
# velocity error by sigma^2): pretrained that way the toy model drew every shape as a blob (class right on 31 % of
# the held-out prompts), the low-noise steps that draw edges weighing 1/25 of the high-noise ones
FLOW_OPTIONS = SimpleNamespace(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                               precondition_outputs=False, **toy_options("sd3"))


def build_sd3_models(vocab_size: int, layers: int, patch_size: int) -> tuple[
        CLIPTextModelWithProjection, CLIPTextModelWithProjection, SD3Transformer2DModel]:
    def clip() -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=3,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=64))

    # 8x8 latents in SD3's 2x2 patches: 16 image tokens (each 8x8 image pixels) beside the prompt's 16 CLIP tokens
    # and one zero token for T5. Per minute of CPU this learns the world faster than one token per latent pixel (64
    # tokens): after 12 minutes each, the 2x2 model had colour right on 93 % of held-out prompts and size on 77 %
    # (one token per pixel: 76 %, 55 %), so the budget buys more steps of a deeper model. The two encoders side by
    # side (64 + 64) are the joint attention's width
    transformer = SD3Transformer2DModel(sample_size=SIZE // 4, patch_size=patch_size, in_channels=4, num_layers=layers,
                                        attention_head_dim=32, num_attention_heads=4, caption_projection_dim=128,
                                        joint_attention_dim=128, pooled_projection_dim=128, out_channels=4,
                                        pos_embed_max_size=SIZE // 4)
    return clip(), clip(), transformer


def pretrain_sd3(cfg: Any, out: Path, vae_from: Path) -> dict[str, Any]:
    """Train and save the SD3 toy pipeline into `out`; returns what pretrain.json records."""

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    started = time.time()
    tokenizer = write_toy_tokenizer(out / "tokenizer")
    vae = AutoencoderKL.from_pretrained(vae_from, subfolder="vae", use_safetensors=True).eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline reads it; the toy VAE's latents are centred
    vocab = len(tokenizer.get_vocab())
    text_encoder, text_encoder_2, transformer = build_sd3_models(vocab, cfg.layers, cfg.patch_size)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.shift)

    scenes = [random_scene(rng) for _ in range(cfg.images)]
    mean, std = encode_all(vae, scenes)
    scaling = vae.config.scaling_factor

    family = FAMILIES["sd3"]()
    c = Components("sd3", ModelSource(str(out)), {"text_encoder": tokenizer, "text_encoder_2": tokenizer},
                   {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}, vae, transformer, scheduler)
    objective = OBJECTIVES[family.objective].from_config(scheduler, FLOW_OPTIONS, family.option_defaults)
    held_out = set(held_out_triples())
    params = [p for m in (transformer, text_encoder, text_encoder_2) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.unet_steps))
    ema = EMA([transformer, text_encoder, text_encoder_2], cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    ids_of: dict[str, dict[str, torch.Tensor]] = {}

    def token_ids(texts: list[str]) -> dict[str, torch.Tensor]:
        for text in texts:
            if text not in ids_of:
                ids_of[text] = {k: v[0] for k, v in family.tokenize(c, [text], FLOW_OPTIONS).items()}
        return {k: torch.stack([ids_of[t][k] for t in texts]) for k in ids_of[texts[0]]}

    bar = tqdm(range(cfg.unet_steps), desc="transformer", dynamic_ncols=True)
    for step in bar:
        idx = rng.integers(len(scenes), size=cfg.batch_size)
        texts = ["" if rng.random() < cfg.caption_dropout else caption(scenes[i], rng, held_out) for i in idx]
        index = torch.from_numpy(idx)
        z0 = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=gen)) * scaling
        cond = family.encode(c, token_ids(texts), FLOW_OPTIONS)
        denoise = family.denoiser_call(c, transformer, cond, {}, FLOW_OPTIONS)
        keys = Keys(cfg.seed, torch.arange(step * len(idx), (step + 1) * len(idx)), torch.zeros(len(idx), dtype=bool))
        update(objective.losses(denoise, z0, keys).mean(), opt, sched, ema, params, bar)
    ema.copy_to_model()

    pipe = StableDiffusion3Pipeline(transformer=transformer.eval(), scheduler=scheduler, vae=vae,
                                    text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out, safe_serialization=True)
    return {"minutes": round((time.time() - started) / 60, 1), "scaling_factor": scaling}


def pretrain_on_toy_vae(cfg: Any, out: Path) -> dict[str, Any]:
    """The SD3 toy model, on the DDPM toy model's VAE (the first toy model's)."""
    from .models import TOY_MODELS

    return pretrain_sd3(cfg, out, next(iter(TOY_MODELS.values())).path)
