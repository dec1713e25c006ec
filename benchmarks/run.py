"""Performance benchmarks: `make bench` (or `python benchmarks/run.py`).

Each measurement runs in its own subprocess, so its peak memory (RSS on CPU, max allocated on GPU) is its own.
Results go to benchmarks/results/<device>.json and .md. Measurements:

- peak: the machine's measured matmul FLOP/s (fp32 on CPU, bf16 on GPU): the limit MFU is taken against.
- toy_train: `dreambooth train` on the bundled toy model (small SD architecture, 32 px), prior preservation on,
  training-loop steps/s with the latent cache on and off (same run settings, one process each).
- sd15_vae: the SD 1.5 VAE encoding 2 images at 512 px: what the latent cache saves per step at that size.
- class_images: class images/s and the toy judges' class accuracy and diversity against sampler steps: the
  default (dpm++, 25 steps) and fewer, against the reference script's 50 steps (PNDM, its pipelines' default).
- sd15: an SD 1.5-architecture UNet (random weights) at 512 px, batch 1 instance + 1 prior: full fine-tune step
  (with gradient checkpointing; on a GPU also with 8-bit Adam, and with `--deterministic`'s kernels) and LoRA
  step; FLOPs counted with torch.utils.flop_counter, MFU = FLOPs per step x steps/s / peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def steps_per_second(step, steps: int) -> float:
    """One warm-up step (allocations, kernels), then `steps` timed ones; the peak memory counts from here."""
    step()
    reset_peak()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps / (time.perf_counter() - start)


# --- measurements (each runs in a subprocess) --------------------------------------------------------------------

def peak(args) -> dict:
    dev = device()
    n, dtype = (8192, torch.bfloat16) if dev.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        sync()
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t) / 5)
    return {"matmul_n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": 2 * n**3 / best,
            "threads": torch.get_num_threads()}


def _toy_setup(folder: Path) -> dict:
    from PIL import Image

    from dreambooth.toy.models import TOY_MODELS
    from dreambooth.toy.subjects import SUBJECTS
    from dreambooth.toy.world import prompt

    subject = next(iter(SUBJECTS.values()))
    inst = folder / "instance"
    inst.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(subject.instance_images(5, seed=0)):
        Image.fromarray(img).save(inst / f"{i}.png")
    return dict(pretrained_model_name_or_path=str(TOY_MODELS["sd"].path), instance_data_dir=str(inst),
                instance_prompt=prompt(subject.cls, identifier="jox"), with_prior_preservation=True,
                class_prompt=prompt(subject.cls), class_data_dir=str(folder / "class"), num_class_images=50,
                class_sampler="dpm++", class_inference_steps=20, class_guidance_scale=2.0, sample_batch_size=50,
                resolution=32, train_batch_size=4, learning_rate=1e-4, lr_warmup_steps=0, seed=0, mixed_precision="no",
                checkpointing_steps=10**6)


def toy_train(args) -> dict:
    """Training-loop steps/s (fit only: class images exist already, models are loaded)."""
    from dreambooth import schema
    from dreambooth.config import TrainConfig
    from dreambooth.quiet import quiet_libraries
    from dreambooth.run import setup
    from dreambooth.training import build, fit

    quiet_libraries()
    folder = Path(args.workdir)
    values = {**_toy_setup(folder), "max_train_steps": args.steps, "cache_latents": args.variant == "cached",
              "output_dir": str(folder / f"out-{args.variant}"), "center_crop": True}
    run = setup(schema.build(TrainConfig, values))
    parts = build(run)
    reset_peak()
    if args.variant == "bare":
        return {"variant": "bare", "steps": args.steps, "steps_per_s": steps_per_second(_bare_step(run, parts),
                                                                                       args.steps),
                "peak_memory_gb": peak_memory_gb()}
    sync()
    t = time.perf_counter()
    fit(run, parts)
    sync()
    elapsed = time.perf_counter() - t
    return {"variant": args.variant, "steps": args.steps, "steps_per_s": args.steps / elapsed,
            "latent_cache": parts.latents.stats(), "peak_memory_gb": peak_memory_gb()}


def _bare_step(run, parts):
    """The model's own step at the loop's shapes (the same denoiser call, loss, clipping and AdamW step, on fixed
    tensors): the loop's time per step minus this one is what the loop adds around the model."""
    from dreambooth.training import conditioning, trainable

    cfg, c = run.cfg, parts.components
    n = cfg.train_batch_size
    side = cfg.resolution // 2 ** (len(c.vae.config.block_out_channels) - 1)  # the VAE's downsampling
    latents = torch.randn(2 * n, c.vae.config.latent_channels, side, side, device=run.accelerator.device)
    timesteps = torch.randint(0, 1000, (2 * n,), device=latents.device)
    batch = {"original_sizes": torch.full((2 * n, 2), cfg.resolution),
             "crop_top_lefts": torch.zeros(2 * n, 2, dtype=torch.long),
             "target_sizes": torch.full((2 * n, 2), cfg.resolution)}
    params = trainable(parts.denoiser)

    def step():
        denoise = run.family.denoiser_call(c, parts.denoiser, conditioning(run, parts, n, n), batch, cfg)
        loss = torch.nn.functional.mse_loss(denoise(latents, timesteps), latents)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)

    return step


def class_images(args) -> dict:
    """Images/s and toy-judge quality of class images per (sampler, steps)."""
    import numpy as np

    from dreambooth.generation import open_pipeline, render
    from dreambooth.toy.judges import read
    from dreambooth.toy.measure import diversity
    from dreambooth.toy.models import TOY_MODELS
    from dreambooth.toy.subjects import SUBJECTS
    from dreambooth.toy.world import prompt

    cls = next(iter(SUBJECTS.values())).cls
    rows = []
    for sampler, steps in [("pndm", 50), ("dpm++", 25), ("dpm++", 15), ("dpm++", 10), ("dpm++", 5)]:
        pipe, dev = open_pipeline(str(TOY_MODELS["sd"].path), sampler, "auto", "auto")
        seeds = list(range(args.images))
        render(pipe, prompt(cls), seeds[:8], 8, dev, num_inference_steps=steps, guidance_scale=2.0)  # warm-up
        sync()
        t = time.perf_counter()
        images = render(pipe, prompt(cls), seeds, 50, dev, num_inference_steps=steps, guidance_scale=2.0)
        sync()
        elapsed = time.perf_counter() - t
        readings = [read(np.asarray(img)) for img in images]
        rows.append({"sampler": sampler, "steps": steps, "images_per_s": len(images) / elapsed,
                     "class_accuracy": float(np.mean([r.cls == cls for r in readings])),
                     "diversity": diversity(readings)})
    return {"class_noun": cls, "images": args.images, "rows": rows, "peak_memory_gb": peak_memory_gb()}


def sd15(args) -> dict:
    """One SD 1.5-size training step: UNet forward + backward + optimizer, batch 2 (1 instance + 1 prior)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from dreambooth.run import determinism

    dev = device()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                attention_head_dim=8).to(dev)
    variant = args.variant
    if "checkpointing" in variant:
        unet.enable_gradient_checkpointing()
    if "lora" in variant:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(torch.bfloat16 if dev.type == "cuda" else torch.float32)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"],
                                    init_lora_weights="gaussian"))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    params = [p for p in unet.parameters() if p.requires_grad]
    if "8bit" in variant:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-6)
    else:
        opt = torch.optim.AdamW(params, lr=1e-6, fused=dev.type == "cuda" or None)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    x = torch.randn(2, 4, 64, 64, device=dev)
    t = torch.tensor([100, 700], device=dev)
    c = torch.randn(2, 77, 768, device=dev)

    def step():
        with autocast:
            loss = torch.nn.functional.mse_loss(unet(x, t, c).sample.float(), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter, autocast:
        unet(x, t, c).sample.float().pow(2).mean().backward()
    opt.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    with determinism("deterministic" in variant):  # what `train --deterministic` switches on
        per_s = steps_per_second(step, args.steps)
    return {"variant": variant, "steps": args.steps, "steps_per_s": per_s, "flops_per_step": flops,
            "trainable_params": sum(p.numel() for p in params), "peak_memory_gb": peak_memory_gb()}


def sd15_vae(args) -> dict:
    """What the latent cache saves per step at SD 1.5 size: the frozen VAE encoding 2 images at 512 px."""
    from diffusers import AutoencoderKL

    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4).to(dev, dtype).eval()
    x = torch.randn(2, 3, 512, 512, device=dev, dtype=dtype)
    with torch.no_grad():
        vae.encode(x)
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            vae.encode(x).latent_dist.mean.sum().item()
        sync()
    return {"encode_s": (time.perf_counter() - start) / args.steps, "images": 2}


def flux(args) -> dict:
    """A Flux.1-dev-architecture transformer (random weights, full depth: 19 double + 38 single blocks, unless
    --images gives a smaller depth for a smoke run) as `train --use_lora` runs it at 512 px, batch 1 instance + 1
    prior: bf16 base (or --quantize_base nf4), LoRA rank 16 on the default targets, gradient checkpointing, T5
    embeddings of 512 tokens; steps/s and peak memory."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig

    from dreambooth.families import FAMILIES

    dev = device()
    depth = args.images or 0
    config = dict(patch_size=1, in_channels=64, num_layers=depth or 19, num_single_layers=depth or 38,
                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                  pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    dtype = torch.bfloat16
    torch.manual_seed(0)
    if "nf4" in args.variant:
        import tempfile as tf

        from diffusers import BitsAndBytesConfig

        with tf.TemporaryDirectory() as folder:  # quantized at load time, as `train --quantize_base nf4` does
            FluxTransformer2DModel(**config).to(dtype).save_pretrained(folder)
            model = FluxTransformer2DModel.from_pretrained(folder, dtype=dtype, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))
    else:
        model = FluxTransformer2DModel(**config).to(dev, dtype)
    model.requires_grad_(False)
    model.enable_gradient_checkpointing()
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                 target_modules=list(FAMILIES["flux"].default_lora_targets)))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda" or None)
    n, latent = 2, 64  # 512 px / 8
    x = torch.randn(n, 16, latent, latent, device=dev, dtype=dtype)
    packed = FluxPipeline._pack_latents(x, n, 16, latent, latent)
    ids = FluxPipeline._prepare_latent_image_ids(n, latent // 2, latent // 2, dev, dtype)
    text = torch.randn(n, 512, 4096, device=dev, dtype=dtype)
    pooled = torch.randn(n, 768, device=dev, dtype=dtype)
    t = torch.tensor([0.3, 0.8], device=dev, dtype=dtype)
    guidance = torch.full((n,), 1.0, device=dev)

    def step():
        with torch.autocast(dev.type, dtype=dtype):
            pred = model(hidden_states=packed, timestep=t, guidance=guidance, pooled_projections=pooled,
                         encoder_hidden_states=text, txt_ids=torch.zeros(512, 3, device=dev, dtype=dtype),
                         img_ids=ids, return_dict=False)[0]
        torch.nn.functional.mse_loss(pred.float(), packed.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    per_s = steps_per_second(step, args.steps)
    return {"variant": args.variant, "steps": args.steps, "layers": [config["num_layers"], config["num_single_layers"]],
            "steps_per_s": per_s,
            "base_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "trainable_params": sum(p.numel() for p in params), "peak_memory_gb": peak_memory_gb()}


MEASUREMENTS = {"peak": peak, "toy_train": toy_train, "class_images": class_images, "sd15": sd15,
                "sd15_vae": sd15_vae, "flux": flux}


# --- driver ------------------------------------------------------------------------------------------------------

def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def child(name: str, variant: str, steps: int, images: int, workdir: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    cmd = [sys.executable, __file__, "--one", name, "--variant", variant, "--steps", str(steps),
           "--images", str(images), "--workdir", workdir, "--result", str(result)]
    print(f"[bench] {name} {variant}".rstrip(), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    data = json.loads(result.read_text())
    result.unlink()
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--quick", action="store_true", help="fewer steps and images (a smoke run)")
    p.add_argument("--skip_sd15", action="store_true", help="skip the SD 1.5-size steps (minutes and ~20 GB on CPU)")
    p.add_argument("--skip_flux", action="store_true", help="skip the Flux-size LoRA steps (GPU only)")
    p.add_argument("--one", choices=list(MEASUREMENTS), help=argparse.SUPPRESS)
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.result.write_text(json.dumps(MEASUREMENTS[args.one](args)))
        return

    gpu = torch.cuda.is_available()
    results: dict = {"device": torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)",
                     "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "command": "python benchmarks/run.py " + " ".join(sys.argv[1:])}
    with tempfile.TemporaryDirectory() as work:
        results["peak"] = child("peak", "", 0, 0, work)
        toy_steps = 20 if args.quick else 100
        child("toy_train", "cached", 1, 0, work)  # generates the class images once; not timed
        results["toy_train"] = [child("toy_train", v, toy_steps, 0, work) for v in ("uncached", "cached", "bare")]
        results["class_images"] = child("class_images", "", 0, 50 if args.quick else 200, work)
        if not args.skip_sd15:
            variants = ["full+checkpointing", "lora"]
            if gpu:
                variants = ["full", "full+deterministic", "full+checkpointing", "full+8bit+checkpointing", "lora"]
            results["sd15"] = [child("sd15", v, 1 if not gpu else 10, 0, work) for v in variants]
            results["sd15_vae"] = child("sd15_vae", "", 3 if not gpu else 20, 0, work)
        if gpu and not args.skip_flux:  # 12B parameters: a GPU's work (about 24 GB in bf16 before activations)
            results["flux"] = [child("flux", v, 5, 0, work) for v in ("lora", "lora+nf4")
                               if v == "lora" or _installed("bitsandbytes")]
    peak_flops = results["peak"]["flops_per_s"]
    for row in results.get("sd15", []):
        row["mfu"] = row["flops_per_step"] * row["steps_per_s"] / peak_flops
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu" if gpu else "cpu"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{name}.md").write_text(markdown(results))
    print(markdown(results))


def markdown(r: dict) -> str:
    lines = [f"Device: {r['device']}, torch {r['torch']}, {r['started']}; `{r['command']}`", "",
             f"Measured matmul peak: {r['peak']['flops_per_s'] / 1e9:.1f} GFLOP/s ({r['peak']['dtype']}, "
             f"n={r['peak']['matmul_n']}, {r['peak']['threads']} threads)", "",
             "| toy training loop | steps/s | VAE encodings | cache hits | peak memory (GB) |",
             "| --- | --- | --- | --- | --- |"]
    base = r["toy_train"][0]["steps_per_s"]
    loops = [row for row in r["toy_train"] if "latent_cache" in row]
    for row in loops:
        lc = row["latent_cache"]
        lines.append(f"| {row['variant']} | {row['steps_per_s']:.2f} ({row['steps_per_s'] / base:.2f}x) | "
                     f"{lc['encoded']} | {lc['hits']} | {row['peak_memory_gb']:.2f} |")
    bare = next((row for row in r["toy_train"] if row["variant"] == "bare"), None)
    if bare is not None:
        cached = next(row for row in loops if row["variant"] == "cached")
        loop_ms, bare_ms = 1000 / cached["steps_per_s"], 1000 / bare["steps_per_s"]
        lines += ["", "Loop overhead (toy model, same shapes): what the training loop adds around the model's own "
                  "step (denoiser call, loss, clipping, AdamW on fixed tensors):", "",
                  "| cached loop ms/step | bare model step ms/step | loop overhead ms/step | overhead share |",
                  "| --- | --- | --- | --- |",
                  f"| {loop_ms:.1f} | {bare_ms:.1f} | {loop_ms - bare_ms:.1f} | {(loop_ms - bare_ms) / loop_ms:.0%} |"]
    ci = r["class_images"]
    ref = ci["rows"][0]["images_per_s"]
    lines += ["", f"Class images ({ci['images']} of \"{ci['class_noun']}\", toy model, guidance 2.0):", "",
              "| sampler | steps | images/s | vs 50-step PNDM | class accuracy | diversity |",
              "| --- | --- | --- | --- | --- | --- |"]
    for row in ci["rows"]:
        lines.append(f"| {row['sampler']} | {row['steps']} | {row['images_per_s']:.1f} | "
                     f"{row['images_per_s'] / ref:.2f}x | {row['class_accuracy']:.2f} | {row['diversity']:.3f} |")
    if "sd15" in r:
        lines += ["", "SD 1.5-size UNet step at 512 px, batch 1 + 1 prior:", "",
                  "| variant | steps/s | s/step | TFLOP/step | MFU | trainable params (M) | peak memory (GB) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in r["sd15"]:
            lines.append(f"| {row['variant']} | {row['steps_per_s']:.3f} | {1 / row['steps_per_s']:.1f} | "
                         f"{row['flops_per_step'] / 1e12:.2f} | {row['mfu']:.1%} | "
                         f"{row['trainable_params'] / 1e6:.1f} | {row['peak_memory_gb']:.1f} |")
        vae = r["sd15_vae"]["encode_s"]
        lines += ["", f"Frozen VAE encoding 2 images at 512 px: {vae:.2f} s. An uncached step pays it every step, a "
                  "cached one once per view:", "", "| variant | uncached s/step | cached s/step | cached speed-up |",
                  "| --- | --- | --- | --- |"]
        for row in r["sd15"]:
            step = 1 / row["steps_per_s"]
            lines.append(f"| {row['variant']} | {step + vae:.2f} | {step:.2f} | {(step + vae) / step:.2f}x |")
    if "flux" in r:
        lines += ["", "Flux.1-dev-size transformer (random weights), `--use_lora --rank 16 --gradient_checkpointing "
                  "--mixed_precision bf16` at 512 px, batch 1 + 1 prior:", "",
                  "| variant | steps/s | s/step | base params (B) | trainable (M) | peak memory (GB) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row in r["flux"]:
            lines.append(f"| {row['variant']} | {row['steps_per_s']:.3f} | {1 / row['steps_per_s']:.2f} | "
                         f"{row['base_params'] / 1e9:.2f} | {row['trainable_params'] / 1e6:.1f} | "
                         f"{row['peak_memory_gb']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
