"""LPIPS (Zhang et al. 2018, v0.1, AlexNet) for DIV, written here because the `lpips` package needs torchvision.

The network: AlexNet's five ReLU outputs, each unit-normalised over channels; the squared difference between two
images' features is weighted per channel by a learned 1x1 convolution, averaged over space and summed over layers.

Weights load from safetensors only. Two key layouts are accepted, in one file or spread over the `.safetensors`
files of a folder: torchvision's AlexNet (`features.{0,3,6,8,10}.*`) with lpips' linear layers
(`lin{0..4}.model.1.weight`), or a whole lpips `LPIPS` module's state dict (`net.slice{1..5}.N.*`, `lin*`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from ..errors import DreamBoothError

CHANNELS = (64, 192, 384, 256, 256)
TAPS = (1, 4, 7, 9, 11)  # indices of the ReLUs in AlexNet's `features` whose outputs LPIPS compares
# lpips' ScalingLayer: maps [-1, 1] images to ImageNet-normalised ones
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def alexnet_features() -> nn.Sequential:
    """torchvision's `alexnet().features` up to the last ReLU, with the same indices (so its keys load as is)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
    )


class _Linear(nn.Module):
    """lpips' NetLinLayer (dropout, then a bias-free 1x1 conv to one channel); kept so keys match `lin{k}.model.1`."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = alexnet_features()
        for k, c in enumerate(CHANNELS):
            self.add_module(f"lin{k}", _Linear(c))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distances between image batches a and b, shape (N, 3, H, W) in [-1, 1]; returns (N,)."""
        total = torch.zeros(len(a), device=a.device)
        for k, (fa, fb) in enumerate(zip(self._taps(a), self._taps(b))):
            total = total + getattr(self, f"lin{k}").model((fa - fb) ** 2).mean(dim=(1, 2, 3))
        return total


def _our_key(key: str) -> str | None:
    """Map a key of either accepted layout to ours; None for keys LPIPS does not use."""
    if m := re.fullmatch(r"(?:net\.slice\d\.|features\.)(\d+)\.(weight|bias)", key):
        return f"features.{m[1]}.{m[2]}"
    if re.fullmatch(r"lin\d\.model\.1\.weight", key):
        return key
    return None


def load_lpips(weights: str | Path, device: torch.device | str = "cpu") -> LPIPS:
    """An LPIPS network from a .safetensors file or a folder of them; one line names what is missing."""
    path = Path(weights).expanduser()
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() and f.suffix == ".safetensors" for f in files):
        raise DreamBoothError(f"no LPIPS weights at {path}: pass --lpips_weights with a .safetensors file (or a "
                              "folder of them) holding AlexNet's `features.*` and lpips' `lin*` weights")
    state = {}
    for f in files:
        try:
            tensors = load_file(f)
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise DreamBoothError(f"{f} is not a readable safetensors file ({e}); re-export it") from None
        state.update({ours: t for key, t in tensors.items() if (ours := _our_key(key))})
    net = LPIPS()
    expected = set(net.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise DreamBoothError(f"the LPIPS weights in {path} lack {len(missing)} tensor(s), e.g. {missing[0]!r}; "
                              "they need AlexNet's features.{0,3,6,8,10} and lpips' lin0..lin4")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise DreamBoothError(f"the LPIPS weights in {path} have the wrong shapes ({str(e).splitlines()[1].strip()})"
                              "; they must be for AlexNet LPIPS v0.1") from None
    return net.to(device)


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images (one size) -> (N, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


@torch.no_grad()
def pairwise_distances(net: LPIPS, images: Sequence[Image.Image]) -> np.ndarray:
    """The symmetric matrix of LPIPS distances between all pairs of `images` (all resized to the first's size)."""
    size = images[0].size
    device = next(net.parameters()).device
    x = to_tensor([img if img.size == size else img.resize(size, Image.BICUBIC) for img in images]).to(device)
    n = len(images)
    out = np.zeros((n, n), dtype=np.float64)
    rows, cols = np.triu_indices(n, k=1)
    if len(rows):
        d = net(x[torch.from_numpy(rows)], x[torch.from_numpy(cols)]).cpu().numpy()
        out[rows, cols] = d
        out[cols, rows] = d
    return out
