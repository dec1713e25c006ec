"""Instance and class images: reading them safely and streaming them as training batches."""

from .dataset import DreamBoothDataset, StepBatchSampler, collate, derive_seed, keyed_generator
from .images import ImageFolder, open_rgb, scan_folder

__all__ = [
    "DreamBoothDataset", "ImageFolder", "StepBatchSampler", "collate", "derive_seed", "keyed_generator",
    "open_rgb", "scan_folder",
]
