"""Peak GPU memory per process of a sharded full fine-tune (`--fsdp`) of a Flux-architecture transformer with random
weights: the figure the README quotes per GPU. Run on the GPU machine (one GPU: one process, with and without CPU
offload; under torchrun: N processes):

    python benchmarks/fsdp_memory.py --out results            # Flux.1-dev widths, 2 + 4 blocks (fits anywhere)
    python benchmarks/fsdp_memory.py --double 19 --single 38  # the whole 12B model (needs ~200 GB of CPU memory
                                                              # for fp32 AdamW states with --cpu_offload)

Per-block memory is linear in the number of blocks, so the small model's figures scale to the full one; the script
prints both the measured peak and the per-block slope from two sizes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def measure(double: int, single: int, offload: bool, steps: int, device: torch.device, tiny: bool) -> dict:
    from diffusers import FluxTransformer2DModel

    from dreambooth.families import FAMILIES
    from dreambooth.sharding import Sharding

    torch.manual_seed(0)
    widths = dict(attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                  axes_dims_rope=(2, 2, 4)) if tiny else {}
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, guidance_embeds=True, **widths)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.enable_gradient_checkpointing()
    if not offload:
        model.to(device)
    processes = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    acc = SimpleNamespace(device=device, num_processes=processes, distributed_type=SimpleNamespace(value="NO"))
    cfg = SimpleNamespace(fsdp_reshard_after_forward=True, fsdp_cpu_offload=offload)
    sharding = Sharding.apply(model, FAMILIES["flux"](), cfg, acc, torch.bfloat16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    c = model.config
    tokens, text = (16, 8) if tiny else (4096, 512)  # 1024 px (64 x 64 packed latents), Flux's T5 length
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    started = time.time()
    for _ in range(steps):
        inputs = dict(hidden_states=torch.randn(1, tokens, c.in_channels), timestep=torch.rand(1),
                      guidance=torch.full((1,), 3.5), pooled_projections=torch.randn(1, c.pooled_projection_dim),
                      encoder_hidden_states=torch.randn(1, text, c.joint_attention_dim),
                      txt_ids=torch.zeros(text, 3), img_ids=torch.zeros(tokens, 3))
        with torch.autocast(device.type, torch.bfloat16):
            out = model(**{k: v.to(device) for k, v in inputs.items()}, return_dict=False)[0]
        out.float().pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
    params = sum(p.numel() for p in model.parameters())
    sharding.close()
    return {"double_blocks": double, "single_blocks": single, "parameters": params, "cpu_offload": offload,
            "processes": processes,
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
            "s_per_step": round((time.time() - started) / steps, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--tiny", action="store_true", help="narrow blocks: a quick check that runs on a CPU")
    args = ap.parse_args()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rows = []
    for offload in (False, True):
        for scale in (1, 2):  # two sizes: the per-block slope
            rows.append(measure(args.double * scale, args.single * scale, offload, args.steps, device, args.tiny))
            print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fsdp_memory.json").write_text(json.dumps({"gpu": name, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
