"""Validation grids during training: the same prompt and seeds at every check, so grids compare across steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .data import derive_seed
from .devices import unparked
from .families import Components, ModelFamily
from .grid import make_grid
from .sampling import family_sampler


@torch.no_grad()
def render_validation(family: ModelFamily, components: Components, denoiser, text_encoders: dict, cfg: TrainConfig,
                      step: int, accelerator) -> Path:
    """Render cfg.num_validation_images for the validation prompt; save and log them as one grid."""
    _, scheduler = family_sampler(family, cfg.validation_sampler, components.noise_scheduler.config,
                                  "validation_sampler")
    encoders = {k: accelerator.unwrap_model(m) for k, m in text_encoders.items()}
    pipe = family.pipeline(components, accelerator.unwrap_model(denoiser), encoders, scheduler)
    device = accelerator.device
    generators = [torch.Generator(device).manual_seed(derive_seed(cfg.seed, "validation", i))
                  for i in range(cfg.num_validation_images)]
    guidance = cfg.validation_guidance_scale if cfg.validation_guidance_scale is not None else family.default_guidance
    was_training = denoiser.training
    denoiser.eval()
    with accelerator.autocast(), unparked(encoders.values(), device):
        images = pipe(
            prompt=[cfg.validation_prompt] * cfg.num_validation_images, generator=generators,
            num_inference_steps=cfg.validation_inference_steps, **family.guidance(guidance, cfg.num_validation_images),
            **family.pipeline_kwargs(cfg),
        ).images
    denoiser.train(was_training)
    folder = Path(cfg.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.png"
    make_grid(images).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step,
                                      dataformats="NHWC")
    return path
