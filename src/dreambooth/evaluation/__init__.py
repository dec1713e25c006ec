"""Evaluation: the paper's metrics (DINO, CLIP-I, CLIP-T, PRES, DIV) on the DreamBench protocol, or the toy world's
judges on toy subjects, as `dreambooth evaluate`."""

from .evaluate import EvaluateConfig, evaluate

__all__ = ["EvaluateConfig", "evaluate"]
