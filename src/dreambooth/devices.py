"""Moving host tensors to the training device without making the host wait."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on `device` (and in `dtype`). To a GPU it goes through pinned memory and is not waited for: a
    copy from pageable memory would make the host wait until the GPU finished all the work queued before it,
    every step, leaving the GPU idle while Python queues the next step."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.to(device, dtype)
