"""The frozen VAE's posterior for each distinct training view, encoded once per run.

A view is (kind, image, crop top-left, flip): the dataset's augmentation decides it from (seed, position), so the
same view always gives the same pixels and, the VAE being frozen, the same posterior moments (mean, std). Views are
encoded the first time a batch needs them, each on its own, so the moments do not depend on which batch came first
(a resumed run gets bit-identical latents). The per-position sample mean + std * eps is drawn after the cache, so a
cached run draws the latents an uncached one would, up to the VAE's float rounding across batch sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from .devices import to_device


def vae_posterior(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of a VAE's posterior for images (N, 3, H, W): what most families encode (ModelFamily.posterior)."""
    dist = vae.encode(pixels).latent_dist
    return dist.mean, dist.std


class LatentCache:
    def __init__(self, vae: torch.nn.Module, enabled: bool = True, max_views: int = 4096,
                 posterior: Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None):
        """`posterior(vae, pixels) -> (mean, std)`: the family's encoding (ModelFamily.posterior; default: the
        VAE's latent_dist as it is)."""
        self.vae, self.enabled, self.max_views = vae, enabled, max_views
        self.posterior = posterior or vae_posterior
        self.store: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}
        self.encoded = 0  # images that went through the VAE
        self.hits = 0  # images served from the cache

    @torch.no_grad()
    def moments(self, pixels: torch.Tensor | Sequence[torch.Tensor | None], views: Sequence[Hashable]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the posterior of each image in `pixels` (on any device), one per view key; only images
        the cache lacks are moved to the VAE's device and encoded (a cached view's pixels may be None: the dataset
        skips decoding those)."""
        if not self.enabled:
            self.encoded += len(views)
            return self.posterior(self.vae, self._to_vae(pixels))
        missing = list(dict.fromkeys(v for v in views if v not in self.store))  # a view twice in a batch: once
        fresh: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}
        for view in missing:  # one at a time: a view's moments must not depend on the batch it first came in
            i = views.index(view)
            mean, std = self.posterior(self.vae, self._to_vae(pixels[i].unsqueeze(0)))
            fresh[view] = (mean[0], std[0])
        if missing:
            self.encoded += len(missing)
            room = self.max_views - len(self.store)
            self.store.update(list(fresh.items())[: max(0, room)])
        self.hits += len(views) - len(missing)
        pairs = [fresh.get(v) or self.store[v] for v in views]
        return torch.stack([m for m, _ in pairs]), torch.stack([s for _, s in pairs])

    def _to_vae(self, pixels: torch.Tensor) -> torch.Tensor:
        return to_device(pixels, self.vae.device, self.vae.dtype)

    def stats(self) -> dict[str, int | bool]:
        return {"enabled": self.enabled, "views": len(self.store), "encoded": self.encoded, "hits": self.hits}
