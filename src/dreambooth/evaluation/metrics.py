"""The metrics as small pure functions of embeddings and distances, plus the bootstrap.

Every metric is first a per-unit score (a generated image, or for DIV a prompt), so that the overall value, the
per-prompt and per-category values and the bootstrap all come from the same numbers: the metric is the mean of
its units' scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) cosine similarities between the rows of a and the rows of b."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def similarity_to_set(generated: torch.Tensor, real: torch.Tensor) -> np.ndarray:
    """Per generated image: its mean cosine similarity to every real image (DINO, CLIP-I and PRES per image).

    The mean of these is the paper's "average pairwise cosine similarity between generated and real images".
    """
    return cosine_matrix(generated, real).mean(dim=1).cpu().numpy()


def text_image_similarity(text: torch.Tensor, images: torch.Tensor) -> np.ndarray:
    """Per image: cosine similarity between the prompt's text embedding (one row) and the image's (CLIP-T)."""
    return cosine_matrix(images, text.reshape(1, -1))[:, 0].cpu().numpy()


def within_set_similarity(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity over distinct pairs of one set (the paper's "real images" reference row)."""
    n = len(embeddings)
    if n < 2:
        return float("nan")
    sims = cosine_matrix(embeddings, embeddings)
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def mean_pairwise(distances: np.ndarray) -> float:
    """Mean of a symmetric distance matrix over distinct pairs (i < j); DIV of one prompt's images."""
    n = len(distances)
    if n < 2:
        return float("nan")
    upper = np.triu_indices(n, k=1)
    return float(np.asarray(distances)[upper].mean())


def bootstrap_ci(values: Sequence[float] | np.ndarray, resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of `values` (units resampled with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond 30 the normal's 1.96 is within 4%).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_interval(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval for the mean of a few independent units (e.g. training runs),
    where a bootstrap over so few units would be too narrow. One unit: the interval is unknown (nan)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if len(x) == 1:
        return mean, float("nan"), float("nan")
    df = len(x) - 1
    half = (_T975[df - 1] if df <= len(_T975) else 1.96) * float(x.std(ddof=1)) / np.sqrt(len(x))
    return mean, mean - half, mean + half
