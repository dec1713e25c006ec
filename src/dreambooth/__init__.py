"""DreamBooth (Ruiz et al., CVPR 2023): subject-driven fine-tuning of text-to-image diffusion models.

Python API: `dreambooth.train(...)`, `dreambooth.generate(...)`, with the same options as the CLI.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def train(config: Any = None, **overrides: Any) -> dict[str, Any]:
    """Run DreamBooth training; see `dreambooth.training.train` and `dreambooth train --help` for the options."""
    from .training import train as _train

    return _train(config, **overrides)


def generate(config: Any = None, **overrides: Any) -> list:
    """Render prompts from a model; see `dreambooth generate --help` for the options."""
    from .generation import generate as _generate

    return _generate(config, **overrides)


def __getattr__(name: str) -> Any:
    if name in ("TrainConfig",):
        from .config import TrainConfig

        return TrainConfig
    if name == "GenerateConfig":
        from .generation import GenerateConfig

        return GenerateConfig
    raise AttributeError(name)


__all__ = ["GenerateConfig", "TrainConfig", "__version__", "generate", "train"]
