"""How long the training loop waits for a checkpoint: written in the background (the default: the loop waits for a
host copy of the weights and optimizer state) against written while the loop waits (`--checkpoint_in_background
false`), for a full fine-tune of an SD 1.5-architecture UNet with random weights and AdamW state.

    python benchmarks/checkpoint_stall.py --out results             # SD 1.5 widths (GPU; ~21 GB of CPU memory)
    python benchmarks/checkpoint_stall.py --half --out /tmp/stall   # half the widths (a quarter of the weights):
                                                                    # what a 24 GB CPU machine holds

Each mode saves three times into a fresh folder; `blocked_s` is the time `save` kept the loop, `complete_s` the
time until the checkpoint was in place.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch


def build(half: bool, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    widths = (160, 320, 640, 640) if half else (320, 640, 1280, 1280)
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=widths, cross_attention_dim=768,
                                attention_head_dim=8).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    for p in unet.parameters():  # AdamW's two moments exist after a step: a real checkpoint's optimizer state
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return unet, opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--half", action="store_true", help="half the SD 1.5 widths (fits a 24 GB CPU machine)")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    from accelerate import Accelerator

    from dreambooth.checkpoint import CheckpointWriter

    cuda = torch.cuda.is_available()
    acc = Accelerator(cpu=not cuda)
    unet, opt = build(args.half, acc.device)
    params = sum(p.numel() for p in unet.parameters())
    work = Path(tempfile.mkdtemp(dir=args.work))
    rows = []
    try:
        for background in (False, True):
            folder = work / ("background" if background else "waited")
            writer = CheckpointWriter(background)
            for i in range(1, args.saves + 1):
                start = time.perf_counter()
                writer.save(folder, i, {"unet": unet}, opt, {"lr_scheduler": {}}, {}, acc, total_limit=1)
                blocked = time.perf_counter() - start
                writer.wait()
                complete = time.perf_counter() - start
                size = sum(p.stat().st_size for p in (folder / f"checkpoint-{i}").rglob("*") if p.is_file())
                rows.append({"background": background, "save": i, "blocked_s": round(blocked, 3),
                             "complete_s": round(complete, 3), "checkpoint_gb": round(size / 1e9, 2)})
                print(rows[-1], flush=True)
            writer.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    device = torch.cuda.get_device_name() if cuda else "CPU"
    result = {"device": device, "unet_params": params, "half": args.half, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-stall-{'gpu' if cuda else 'cpu'}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    waited = [r for r in rows if not r["background"]]
    lines = [f"# How long the loop waits for a checkpoint ({device}, UNet {params / 1e6:.0f} M parameters, fp32 "
             "weights + AdamW state)", "", "`python benchmarks/checkpoint_stall.py"
             + (" --half" if args.half else "") + "`", "",
             "| save | waited: loop blocked (s) | background: loop blocked (s) | background: complete (s) | GB |",
             "| --- | --- | --- | --- | --- |"]
    for w, b in zip(waited, [r for r in rows if r["background"]]):
        lines.append(f"| {w['save']} | {w['blocked_s']:.2f} | {b['blocked_s']:.2f} | {b['complete_s']:.2f} | "
                     f"{w['checkpoint_gb']:.2f} |")
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
