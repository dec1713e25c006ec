"""End to end on one machine: a full DreamBooth job as users run it, phase by phase (`make bench-e2e`).

Builds an SD 1.5-architecture pipeline with random weights (a random model measures speed and memory as well as
real weights do; `--size tiny` builds a small one, to try the script on a CPU), writes 5 photos, and measures, each
in its own subprocess so that peak memory is its own:

- class: class images/s (`dreambooth train`'s own generation: DPM++ 25 steps with guidance, fp16 on a GPU);
- loop-full, loop-lora: the training loop's it/s (setup and class images excluded), bf16 on a GPU, batch 1 instance
  + 1 class image at 512 px, prior preservation, the LoRA run at rank 4;
- bare: the bare UNet step at the same shapes (`benchmarks/run.py --one sd15 --variant full`);
- e2e: `dreambooth train` as a command, wall clock from start to saved pipeline, for 150 steps + 16 class images
  and 1000 steps + 200 class images (`--quick`: the first only).

Results go to benchmarks/results/e2e-<gpu|cpu>.{json,md}, each written again as soon as a part ends, so that a
part that runs out of time leaves the others' figures. MFU of the loop = the bare step's FLOPs x loop it/s / the
measured peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from run import peak_memory_gb, reset_peak, sync  # noqa: E402

SIZES = {  # UNet, VAE and CLIP text encoder of each size; resolution in pixels
    "sd15": {"unet": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8),
             "vae": dict(block_out_channels=(128, 256, 512, 512)),
             "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
             "resolution": 512, "max_length": 77},
    "tiny": {"unet": dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=64, attention_head_dim=4,
                          norm_num_groups=8, layers_per_block=1),
             "vae": dict(block_out_channels=(16, 16, 16, 16), norm_num_groups=8),
             "text": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2),
             "resolution": 64, "max_length": 77},
}


def build_model(folder: Path, size: str) -> Path:
    """An SD 1.5-layout pipeline folder with random weights and an offline tokenizer."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth.toy.tokenizer import write_toy_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    s = SIZES[size]
    torch.manual_seed(0)
    tokenizer = write_toy_tokenizer(folder.parent / f"{folder.name}-tokenizer")
    tokenizer.model_max_length = s["max_length"]
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1, **s["text"]))
    unet = UNet2DConditionModel(sample_size=s["resolution"] // 8, **s["unet"])
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, layers_per_block=2, sample_size=s["resolution"], **s["vae"])
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def photos(folder: Path, resolution: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(5):  # smooth random images a little larger than the training size, as photos are
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((resolution * 5 // 4, resolution), Image.Resampling.BICUBIC).save(
            folder / f"{i}.png")
    return folder


def train_args(work: Path, size: str, steps: int, class_images: int, lora: bool, tag: str) -> dict:
    gpu = torch.cuda.is_available()
    return dict(pretrained_model_name_or_path=str(work / f"model-{size}"), instance_data_dir=str(work / "photos"),
                instance_prompt="a photo of zq dog", with_prior_preservation=True, class_prompt="a photo of dog",
                class_data_dir=str(work / f"class-{tag}"), num_class_images=class_images,
                resolution=SIZES[size]["resolution"], train_batch_size=1, max_train_steps=steps,
                learning_rate=1e-4 if lora else 5e-6, use_lora=lora, lr_warmup_steps=0,
                mixed_precision="bf16" if gpu else "no", checkpointing_steps=10**6, seed=0,
                output_dir=str(work / f"out-{tag}"))


# --- parts (each runs in a subprocess) ------------------------------------------------------------------------------

def part_class(a) -> dict:
    from accelerate import Accelerator

    from dreambooth import schema
    from dreambooth.config import TrainConfig
    from dreambooth.families import ModelSource, get_family
    from dreambooth.prior import ensure_class_images

    cfg = schema.build(TrainConfig, train_args(a.work, a.size, 1, a.images, False, f"class{a.images}"))
    source = ModelSource(cfg.pretrained_model_name_or_path)
    family = get_family(source)
    cfg.resolution = cfg.resolution or family.default_resolution
    reset_peak()
    t = time.perf_counter()
    ensure_class_images(cfg, family, source, Accelerator(cpu=not torch.cuda.is_available()))
    sync()
    elapsed = time.perf_counter() - t
    return {"images": a.images, "seconds": elapsed, "images_per_s": a.images / elapsed,
            "peak_memory_gb": peak_memory_gb()}


def part_loop(a) -> dict:
    from dreambooth import schema
    from dreambooth.config import TrainConfig
    from dreambooth.quiet import quiet_libraries
    from dreambooth.run import setup
    from dreambooth.training import build, fit

    quiet_libraries()
    lora = a.variant == "lora"
    values = train_args(a.work, a.size, a.steps, 16, lora, "class16")
    values["output_dir"] = str(a.work / f"out-loop-{a.variant}")
    run = setup(schema.build(TrainConfig, values))
    parts = build(run)
    parts.max_train_steps = 5  # warm-up: kernels, allocator, the latent cache's first views
    fit(run, parts)
    parts.max_train_steps = a.steps
    reset_peak()
    sync()
    t = time.perf_counter()
    fit(run, parts)
    sync()
    elapsed = time.perf_counter() - t
    timed = a.steps - 5
    return {"variant": a.variant, "steps": timed, "it_per_s": timed / elapsed, "peak_memory_gb": peak_memory_gb()}


def part_e2e(a) -> dict:
    values = train_args(a.work, a.size, a.steps, a.images, False, f"e2e{a.steps}")
    argv = [sys.executable, "-m", "dreambooth", "train"]
    for k, v in values.items():
        if isinstance(v, bool):
            argv.append(f"--{k}" if v else f"--no-{k}")
        else:
            argv += [f"--{k}", str(v)]
    t = time.perf_counter()
    subprocess.run(argv, check=True)
    elapsed = time.perf_counter() - t
    summary = json.loads((Path(values["output_dir"]) / "run_summary.json").read_text())
    return {"steps": a.steps, "class_images": a.images, "seconds": elapsed,
            "train_wall_time_s": summary["wall_time_s"]}


PARTS = {"class": part_class, "loop": part_loop, "e2e": part_e2e}


def child(work: Path, size: str, name: str, variant: str = "", steps: int = 0, images: int = 0,
          timeout: int = 900) -> dict | None:
    out = work / f"result-{name}-{variant}-{steps}-{images}.json"
    cmd = [sys.executable, __file__, "--work", str(work), "--size", size, "--one", name, "--variant", variant,
           "--steps", str(steps), "--images", str(images), "--result", str(out)]
    print(f"[e2e] {name} {variant} {steps or ''} {images or ''}".rstrip(), flush=True)
    try:
        subprocess.run(cmd, check=True, timeout=timeout, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(f"[e2e] {name} failed: {e}", flush=True)
        return None
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="sd15")
    p.add_argument("--quick", action="store_true", help="150 steps + 16 class images only")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--work", type=Path, default=Path("/tmp/dreambooth-e2e"))
    p.add_argument("--one", choices=list(PARTS), help=argparse.SUPPRESS)
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        a.result.write_text(json.dumps(PARTS[a.one](a)))
        return

    a.work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    r: dict = {"device": torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)",
               "torch": torch.__version__, "size": a.size, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "command": "python benchmarks/e2e.py " + " ".join(sys.argv[1:])}
    name = "gpu" if gpu else "cpu"
    a.out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        (a.out / f"e2e-{name}.json").write_text(json.dumps(r, indent=2))
        (a.out / f"e2e-{name}.md").write_text(markdown(r))

    build_model(a.work / f"model-{a.size}", a.size)
    photos(a.work / "photos", SIZES[a.size]["resolution"])
    steps = 150 if a.size == "sd15" else 20
    r["class"] = child(a.work, a.size, "class", images=16)
    write()
    for variant in ("full", "lora"):
        r[f"loop_{variant}"] = child(a.work, a.size, "loop", variant, steps=steps)
        write()
    if a.size == "sd15":
        bare = subprocess.run([sys.executable, str(ROOT / "run.py"), "--one", "sd15", "--variant", "full",
                               "--steps", "10", "--workdir", str(a.work), "--result", str(a.work / "bare.json")])
        r["bare"] = json.loads((a.work / "bare.json").read_text()) if bare.returncode == 0 else None
        peak = subprocess.run([sys.executable, str(ROOT / "run.py"), "--one", "peak", "--workdir", str(a.work),
                               "--result", str(a.work / "peak.json")])
        r["peak"] = json.loads((a.work / "peak.json").read_text()) if peak.returncode == 0 else None
        write()
    jobs = [(150, 16)] if a.quick else [(150, 16), (1000, 200)]
    if a.size == "tiny":
        jobs = [(20, 4)]
    r["e2e"] = [child(a.work, a.size, "e2e", steps=s, images=n) for s, n in jobs]
    write()
    print(markdown(r))


def markdown(r: dict) -> str:
    def fig(part: dict | None, key: str, fmt: str = "{:.2f}") -> str:
        return fmt.format(part[key]) if part else "failed"

    lines = [f"Device: {r['device']}, torch {r['torch']}, {r['size']} architecture (random weights), "
             f"{r['started']}; `{r['command']}`", "",
             "| measurement | figure | peak memory (GB) |", "| --- | --- | --- |"]
    if "class" in r:
        lines.append(f"| class images (16, DPM++ 25 steps, guidance) | {fig(r['class'], 'images_per_s')} img/s | "
                     f"{fig(r['class'], 'peak_memory_gb', '{:.1f}')} |")
    for variant in ("full", "lora"):
        part = r.get(f"loop_{variant}")
        if f"loop_{variant}" in r:
            lines.append(f"| training loop, {variant} | {fig(part, 'it_per_s')} it/s | "
                         f"{fig(part, 'peak_memory_gb', '{:.1f}')} |")
    bare, peak, loop = r.get("bare"), r.get("peak"), r.get("loop_full")
    if bare:
        lines.append(f"| bare UNet step (full) | {bare['steps_per_s']:.2f} it/s | {bare['peak_memory_gb']:.1f} |")
    if bare and peak and loop:
        mfu = bare["flops_per_step"] * loop["it_per_s"] / peak["flops_per_s"]
        lines.append(f"| MFU of the full loop ({bare['flops_per_step'] / 1e12:.2f} TFLOP/step, peak "
                     f"{peak['flops_per_s'] / 1e12:.0f} TFLOP/s) | {mfu:.1%} | |")
    for e in r.get("e2e", []) or []:
        if e:
            lines.append(f"| end to end, {e['steps']} steps + {e['class_images']} class images | "
                         f"{e['seconds']:.0f} s | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
