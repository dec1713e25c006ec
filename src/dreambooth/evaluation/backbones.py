"""The metric backbones, loaded through transformers from a local folder or a hub id: DINO ViT-S/16 and CLIP.

Both image preprocessings run on PIL (transformers' PIL image processor), so scores do not depend on whether
torchvision happens to be installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image
from transformers import AutoModel, AutoTokenizer, CLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ..errors import DreamBoothError, first_line

DINO_DEFAULT = "facebook/dino-vits16"
CLIP_DEFAULT = "openai/clip-vit-base-patch32"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Hub repos whose safetensors weights live only in the conversion bot's pull request, not on main.
SAFETENSORS_REVISIONS = {DINO_DEFAULT: "refs/pr/1"}
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC
T = TypeVar("T")


def load_or_explain(what: str, flag: str, name: str, load: Callable[[], T]) -> T:
    """Run a loader; turn a missing or unreadable backbone into one line naming the flag that fixes it."""
    try:
        return load()
    except (OSError, ValueError) as e:
        first = first_line(e, 300)
        revision_flag = flag.replace("model", "revision")
        hub = "" if Path(name).expanduser().exists() else (
            f", or, for a hub repo whose safetensors sit in a conversion pull request, --{revision_flag} refs/pr/N")
        raise DreamBoothError(f"cannot load the {what} from {name!r} ({first[:200]}); pass --{flag} with a local "
                              f"folder that holds its config and model.safetensors{hub}") from None


def revision_for(name: str, revision: str | None) -> str | None:
    return revision or SAFETENSORS_REVISIONS.get(name)


def _features(out: Any) -> torch.Tensor:
    """transformers 4 returns the projected features as a tensor, transformers 5 as `pooler_output`."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def embed_images(net: Any, images: Sequence[Image.Image], embed: Callable[[torch.Tensor], torch.Tensor]
                 ) -> torch.Tensor:
    """Preprocess with `net.processor` and embed in batches of `net.batch_size`; fp32 rows on the CPU."""
    out = []
    for start in range(0, len(images), net.batch_size):
        pixels = net.processor(images=list(images[start : start + net.batch_size]),
                               return_tensors="pt")["pixel_values"].to(net.device)
        out.append(embed(pixels).float().cpu())
    return torch.cat(out)


class Dino:
    """DINO CLS embeddings with DINO's evaluation preprocessing: resize 256 (bicubic), centre crop 224, ImageNet
    normalisation."""

    def __init__(self, name: str = DINO_DEFAULT, device: torch.device | str = "cpu", batch_size: int = 32,
                 revision: str | None = None):
        self.name, self.device, self.batch_size = name, torch.device(device), batch_size
        rev = revision_for(name, revision)
        self.model = load_or_explain("DINO backbone", "dino_model", name,
                                     lambda: AutoModel.from_pretrained(name, revision=rev, use_safetensors=True))
        self.model.to(self.device).eval()
        self.processor = CLIPImageProcessorPil(
            size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=BICUBIC,
            image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True,
        )

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return embed_images(self, images, lambda px: self.model(pixel_values=px).last_hidden_state[:, 0])


class Clip:
    """CLIP image and text embeddings (the projected features), with the model's own preprocessing."""

    def __init__(self, name: str = CLIP_DEFAULT, device: torch.device | str = "cpu", batch_size: int = 32,
                 revision: str | None = None):
        self.name, self.device, self.batch_size = name, torch.device(device), batch_size
        rev = revision_for(name, revision)
        self.model = load_or_explain("CLIP backbone", "clip_model", name,
                                     lambda: CLIPModel.from_pretrained(name, revision=rev, use_safetensors=True))
        self.model.to(self.device).eval()
        self.tokenizer = load_or_explain("CLIP tokenizer", "clip_model", name,
                                         lambda: AutoTokenizer.from_pretrained(name, revision=rev))
        self.processor = load_or_explain("CLIP image processor", "clip_model", name,
                                         lambda: CLIPImageProcessorPil.from_pretrained(name, revision=rev))

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return embed_images(self, images, lambda px: _features(self.model.get_image_features(pixel_values=px)))

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _features(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                      attention_mask=tokens["attention_mask"])).float().cpu()
