"""The real-size denoiser of each family, counted on the meta device (no weights, no download): its diffusers
default config, which for these classes is the released checkpoint's (Flux.2 [dev], Z-Image, Qwen-Image, Krea 2;
klein's smaller configs are not in diffusers), and the memory arithmetic that follows from it: bytes of the frozen
base per precision, and of a full fine-tune (fp32 weights, gradients and AdamW's two moments: 16 bytes a
parameter). Activations and the text encoders (encoded once, then off the GPU) come on top.

    .venv/bin/python benchmarks/family_sizes.py [--families flux2 z_image ...]
"""

from __future__ import annotations

import argparse

import torch

from dreambooth.families import FAMILIES

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["flux2", "qwen_image", "krea2", "z_image"])
    args = parser.parse_args()
    print("| family | denoiser | parameters | bf16 base | int8 base | nf4 base | full fine-tune |")
    print("|---|---|---|---|---|---|---|")
    for name in args.families:
        family = FAMILIES[name]
        with torch.device("meta"):
            model = family.denoiser_class()
        n = sum(p.numel() for p in model.parameters())
        cells = [f"{n * b / GIB:.1f} GiB" for b in (2, 1, 0.5, 16)]
        print(f"| {name} | {family.denoiser_class.__name__} | {n / 1e9:.2f} B | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
