"""Tiny random Stable Diffusion pipelines and subject images, built in temp folders (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dreambooth.toy.tokenizer import write_bpe_tokenizer

COMMON = ["a", "an", "the", "photo", "of", "dog", "cat", "on", "beach", "in", "red", "blue", "sks", "toy"]
RARE = ["zwx", "qek", "vyb", "jox", "fuh", "kiv", "pyz", "xaq"]


def write_tokenizer(folder: Path, max_length: int = 16) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose words (COMMON, then RARE) are single tokens; rarer words get later ids."""
    return write_bpe_tokenizer(folder, COMMON, RARE, max_length)


def make_tiny_sd(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a ~1M-parameter SD-architecture pipeline (64 px images, 8x8x4 latents) to `folder`."""
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(folder.parent / f"{folder.name}-tok")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=32,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=64,
    )
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_images(folder: Path, n: int = 4, size: int = 72, seed: int = 0) -> Path:
    """n distinct RGB images of a 'subject': a coloured square on a varying background."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = np.full((size, size + 8 * i, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        x, y = rng.integers(4, size // 2, 2)
        arr[y : y + size // 3, x : x + size // 3] = (220, 30, 30)
        Image.fromarray(arr).save(folder / f"subject_{i}.png")
    return folder
