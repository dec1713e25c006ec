"""`dreambooth toy pretrain`: train the toy world's base model from scratch, as a diffusers SD pipeline folder.

Phases: the VAE alone on renders (objects sometimes two-tone, so it can encode any subject later); then every
training image is encoded once (the VAE is frozen from here on); then the UNet and the text encoder train together
on the cached latents with random captions, and an EMA of both is what ships. Step counts, not wall time, bound
each phase, so a seed reproduces the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from .. import schema
from ..files import write_text_atomic
from ..outputs import OutputFolder
from ..schema import at_least, option, positive
from .models import TOY_MODELS, family_help
from .tokenizer import write_toy_tokenizer
from .world import COLOURS, SIZE, Scene, caption, held_out_triples, random_scene, render, with_pattern

log = logging.getLogger("dreambooth")




@dataclasses.dataclass
class PretrainConfig:
    output_dir: Path = option(Path("toy-model"), "Where the pipeline folder is written")
    family: str = option("sd", family_help("Which toy model"), choices=lambda: list(TOY_MODELS))
    seed: int = option(0, "Seed of everything: weights, renders, captions, noise")
    layers: int = option(6, "sd3: joint transformer blocks", check=at_least(1))
    patch_size: int = option(2, "sd3: latent pixels per token side (2, as SD3's)", check=at_least(1))
    shift: float = option(1.0, "sd3: the flow-matching schedule's shift (SD3 uses 3 at 1024 px; 32 px wants 1)",
                          check=positive)
    vae_steps: int = option(2500, "VAE training steps", check=at_least(1))
    vae_batch_size: int = option(32, "VAE batch size", check=at_least(1))
    vae_learning_rate: float = option(2e-3, "VAE learning rate", check=positive)
    images: int = option(40000, "Rendered training images (encoded once)", check=at_least(64))
    unet_steps: int | None = option(None, "Denoiser (UNet or transformer) + text encoder training steps (default: "
                                    "4500 for sd, 4000 for sd3)", check=at_least(1))
    batch_size: int = option(64, "UNet batch size", check=at_least(1))
    learning_rate: float = option(8e-4, "UNet and text encoder learning rate", check=positive)
    warmup_steps: int = option(200, "Linear warm-up steps, then cosine decay to a tenth", check=at_least(0))
    ema_decay: float = option(0.999, "EMA decay of the shipped weights", check=schema.in_unit_interval)
    caption_dropout: float = option(0.1, "Share of empty captions (for classifier-free guidance)",
                                    check=schema.in_unit_interval)
    two_tone_share: float = option(0.3, "Share of two-tone objects in the VAE's renders", check=schema.in_unit_interval)


def build_models(vocab_size: int) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=SIZE,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=3,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=64,
    ))
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    return vae, text_encoder, unet


def noise_schedule() -> DDPMScheduler:
    """Stable Diffusion's training schedule, so the toy model samples with the same solvers."""
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         steps_offset=1, prediction_type="epsilon", num_train_timesteps=1000)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def vae_renders(rng: np.random.Generator, n: int, two_tone: float) -> torch.Tensor:
    scenes = []
    for _ in range(n):
        s = random_scene(rng)
        if rng.random() < two_tone:
            a, b = rng.choice(list(COLOURS), 2, replace=False)
            s = with_pattern(s, "xy"[rng.integers(2)], str(a), str(b))
        scenes.append(render(s))
    return to_tensor(scenes)


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_vae(vae: AutoencoderKL, cfg: PretrainConfig, rng: np.random.Generator) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 100, cfg.vae_steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.vae_steps), desc="vae", dynamic_ncols=True)
    for _ in bar:
        x = vae_renders(rng, cfg.vae_batch_size, cfg.two_tone_share)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(gen)).sample
        # L1 beside MSE keeps edges sharp; the KL term is tiny, as in SD's VAE (latents are rescaled later)
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")


@torch.no_grad()
def encode_all(vae: AutoencoderKL, scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in tqdm(range(0, len(scenes), 256), desc="encode", dynamic_ncols=True):
        dist = vae.encode(to_tensor([render(s) for s in scenes[start : start + 256]])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


class EMA:
    """Exponential moving average of parameters, with the usual (1 + t) / (10 + t) warm-up of the decay."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.step = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def train_denoiser(unet, text_encoder, tokenizer, latents: tuple[torch.Tensor, torch.Tensor], scaling: float,
                   scenes: list[Scene], cfg: PretrainConfig, rng: np.random.Generator) -> EMA:
    mean, std = latents
    schedule = noise_schedule()
    held_out = set(held_out_triples())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.unet_steps))
    ema = EMA([unet, text_encoder], cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    ids_of: dict[str, torch.Tensor] = {}

    def token_ids(text: str) -> torch.Tensor:
        if text not in ids_of:
            ids_of[text] = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids[0]
        return ids_of[text]

    bar = tqdm(range(cfg.unet_steps), desc="unet", dynamic_ncols=True)
    for _ in bar:
        idx = rng.integers(len(scenes), size=cfg.batch_size)
        texts = ["" if rng.random() < cfg.caption_dropout else caption(scenes[i], rng, held_out) for i in idx]
        ids = torch.stack([token_ids(t) for t in texts])
        index = torch.from_numpy(idx)
        z0 = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=gen)) * scaling
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, schedule.config.num_train_timesteps, (len(idx),), generator=gen)
        pred = unet(schedule.add_noise(z0, noise, t), t, text_encoder(ids)[0]).sample
        update(F.mse_loss(pred, noise), opt, sched, ema, params, bar)
    return ema


def update(loss: torch.Tensor, opt, sched, ema: EMA, params: list, bar) -> None:
    """One pretraining step after the loss: gradients clipped to norm 1, AdamW, schedule, EMA, progress."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    ema.update()
    bar.set_postfix(loss=f"{loss.item():.4f}")


def pretrain(config: PretrainConfig | dict | str | Path | None = None, **overrides) -> Path:
    """Train and save the toy base model; returns the pipeline folder."""
    cfg = schema.build(PretrainConfig, {**schema.values_of(config, PretrainConfig), **overrides})
    if cfg.unet_steps is None:  # each family's default fits the 45-minute budget on the 2-core CPU
        cfg = dataclasses.replace(cfg, unet_steps=TOY_MODELS[cfg.family].pretrain_steps)
    with OutputFolder(cfg.output_dir, "toy pretrain") as folder:  # no inputs to load: claimed at once
        folder.claim()
        return _pretrain(cfg, folder.path)


def write_recipe(out: Path, family: str) -> None:
    """The DreamBooth recipe a toy model carries (recipes.py): what `train`, the demo and the page start from."""
    from ..recipes import RECIPE_FILE
    from .measure import TOY_METHOD, TOY_RECIPE_MEASURED, toy_recipe

    recipe = {"full": toy_recipe(family), "lora": toy_recipe(family, lora=True), "method": TOY_METHOD,
              "measured": TOY_RECIPE_MEASURED}
    write_text_atomic(out / RECIPE_FILE, json.dumps(recipe, indent=2) + "\n")


def _pretrain(cfg: PretrainConfig, out: Path) -> Path:
    """Train the family's toy model into `out`, then record how (pretrain.json)."""
    info = TOY_MODELS[cfg.family].pretrain_function()(cfg, out)
    info = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in schema.to_dict(cfg).items()}, **info,
            "torch_threads": torch.get_num_threads()}
    write_text_atomic(out / "pretrain.json", json.dumps(info, indent=2) + "\n")
    write_recipe(out, cfg.family)
    log.info("toy model written to %s in %.1f min", out, info["minutes"])
    return out


def pretrain_sd(cfg: PretrainConfig, out: Path) -> dict:
    """The DDPM toy model: VAE, then UNet and text encoder on the cached latents; returns what pretrain.json
    records."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    started = time.time()
    tokenizer = write_toy_tokenizer(out / "tokenizer")
    vae, text_encoder, unet = build_models(len(tokenizer.get_vocab()))

    # vae
    train_vae(vae, cfg, rng)
    vae.eval().requires_grad_(False)
    vae_minutes = (time.time() - started) / 60

    # latents: encoded once; the scaling factor makes them unit-variance, as in SD
    scenes = [random_scene(rng) for _ in range(cfg.images)]
    mean, std = encode_all(vae, scenes)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)

    # unet + text encoder
    ema = train_denoiser(unet, text_encoder, tokenizer, (mean, std), scaling, scenes, cfg, rng)
    ema.copy_to_model()

    # save: a standard SD pipeline folder; DPM++ is its inference scheduler
    scheduler = DPMSolverMultistepScheduler.from_config(noise_schedule().config)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return {"minutes": round((time.time() - started) / 60, 1), "vae_minutes": round(vae_minutes, 1),
            "scaling_factor": scaling}
