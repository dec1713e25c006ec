"""DreamBooth (Ruiz et al., CVPR 2023): subject-driven fine-tuning of text-to-image diffusion models.

Python API: `dreambooth.train(...)`, `dreambooth.generate(...)`, `dreambooth.evaluate(...)`, with the same options
as the CLI.
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


def evaluate(config: Any = None, **overrides: Any) -> dict[str, Any]:
    """Score a model on the DreamBench protocol (or a toy subject); see `dreambooth evaluate --help`."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(config, **overrides)


def __getattr__(name: str) -> Any:
    if name in ("TrainConfig",):
        from .config import TrainConfig

        return TrainConfig
    if name == "GenerateConfig":
        from .generation import GenerateConfig

        return GenerateConfig
    if name == "EvaluateConfig":
        from .evaluation import EvaluateConfig

        return EvaluateConfig
    raise AttributeError(name)


__all__ = ["EvaluateConfig", "GenerateConfig", "TrainConfig", "__version__", "evaluate", "generate", "train"]
