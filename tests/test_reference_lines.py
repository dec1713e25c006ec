"""The reference command lines of diffusers' examples/dreambooth READMEs (SD3, Flux.1, Flux.2 klein and dev, Z-Image,
Qwen-Image, Krea 2) run unchanged on each family's tiny model, train and resume (SD/SDXL's: test_training.py)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from dreambooth.cli import main
from dreambooth.families import FAMILIES
from test_training import same, weights

REFERENCE_FLAGS = {  # the SD3 / Flux / Flux.2 klein and dev / Z-Image / Qwen-Image README command lines of diffusers'
    # examples/dreambooth (but --push_to_hub, wandb, 8-bit Adam: GPU only), on a tiny model; where the script has
    # aspect-ratio buckets, with them as its README or its own test spells them (at the tiny model's sizes)
    "sd3": ["--mixed_precision", "bf16", "--instance_prompt", "a photo of sks dog", "--train_batch_size", "1",
            "--gradient_accumulation_steps", "2", "--learning_rate", "4e-4", "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--validation_prompt", "A photo of sks dog in a bucket",
            "--validation_epochs", "1", "--weighting_scheme", "logit_normal", "--max_sequence_length", "16",
            "--lora_layers", "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0", "--lora_blocks", "0"],
    "flux": ["--mixed_precision", "bf16", "--instance_prompt", "a photo of sks dog", "--train_batch_size", "1",
             "--guidance_scale", "1", "--gradient_accumulation_steps", "2", "--optimizer", "prodigy",
             "--learning_rate", "1.", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
             "--validation_prompt", "A photo of sks dog in a bucket", "--validation_epochs", "1",
             "--max_sequence_length", "16", "--upcast_before_saving", "--aspect_ratio_buckets=64,64;48,80"],
    "flux2_klein": ["--do_fp8_training", "--gradient_checkpointing", "--cache_latents", "--instance_prompt",
                    "a photo of sks dog", "--train_batch_size", "1", "--guidance_scale", "1",
                    "--gradient_accumulation_steps", "2", "--optimizer", "adamW", "--learning_rate", "1e-4",
                    "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--validation_prompt",
                    "A photo of sks dog in a bucket", "--validation_epochs", "1", "--max_sequence_length", "16",
                    "--aspect_ratio_buckets", "64,64;64,128"],
    "z_image": ["--mixed_precision", "bf16", "--gradient_checkpointing", "--cache_latents", "--instance_prompt",
                "a photo of sks dog", "--train_batch_size", "1", "--guidance_scale", "5.0",
                "--gradient_accumulation_steps", "2", "--optimizer", "adamW", "--learning_rate", "1e-4",
                "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--validation_prompt",
                "A photo of sks dog in a bucket", "--validation_epochs", "1", "--max_sequence_length", "16",
                "--use_aspect_ratio_buckets"],
    "qwen_image": ["--mixed_precision", "bf16", "--instance_prompt", "a photo of sks dog", "--train_batch_size", "1",
                   "--gradient_accumulation_steps", "4", "--learning_rate", "2e-4", "--lr_scheduler", "constant",
                   "--lr_warmup_steps", "0", "--validation_prompt", "A photo of sks dog in a bucket",
                   "--validation_epochs", "1", "--aspect_ratio_buckets", "64,64;64,128"],  # (its
    # --max_sequence_length: the default, 512)
    "flux2": ["--do_fp8_training", "--gradient_checkpointing", "--remote_text_encoder", "--cache_latents",
              "--instance_prompt", "a photo of sks dog", "--train_batch_size", "1", "--guidance_scale", "1",
              "--gradient_accumulation_steps", "4", "--optimizer", "prodigy", "--learning_rate", "1.",
              "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "100", "--validation_prompt",
              "A photo of sks dog in a bucket", "--validation_epochs", "1", "--max_sequence_length", "16",
              "--use_aspect_ratio_buckets", "--aspect_ratio_buckets", "64,64;48,64;64,48"],
    "krea2": ["--mixed_precision", "bf16", "--instance_prompt", "a photo of sks dog", "--train_batch_size", "1",
              "--gradient_checkpointing", "--cache_latents", "--rank", "32", "--lora_alpha", "32", "--optimizer",
              "adamW", "--learning_rate", "3e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
              "--validation_model_path", "krea/Krea-2-Turbo", "--validation_prompt", "a photo of sks dog",
              "--validation_epochs", "1", "--max_sequence_length", "16", "--use_aspect_ratio_buckets"],
}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_reference_command_lines_train_and_resume(tiny, tmp_path, instance_dir, lora, capsys):
    family_name, model = tiny
    if family_name not in REFERENCE_FLAGS:
        pytest.skip("the SD/SDXL reference command line is tested in test_training.py")
    argv = ["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instance_dir),
            "--resolution", "64", "--seed", "0", "--device", "cpu", "--with_prior_preservation", "--class_prompt",
            "a photo of dog", "--class_data_dir", str(tmp_path / "class"), "--num_class_images", "2",
            "--class_inference_steps", "2", "--num_validation_images", "1", "--validation_inference_steps", "1",
            *REFERENCE_FLAGS[family_name], *(["--use_lora", "--rank", "4"] if lora else [])]
    flags = [*argv, "--checkpointing_steps", "1"]
    if not lora:  # --lora_layers / --lora_blocks / --rank mean nothing without LoRA: refused in one line
        lora_only = ("--lora_", "--rank")
        flags = [a for i, a in enumerate(flags) if not (a.startswith(lora_only) or flags[i - 1].startswith(lora_only))]
    assert main([*flags, "--max_train_steps", "2", "--output_dir", str(tmp_path / "stopped")]) == 0
    assert main([*flags, "--max_train_steps", "3", "--output_dir", str(tmp_path / "stopped"),
                 "--resume_from_checkpoint", "latest"]) == 0
    assert main([*flags, "--max_train_steps", "3", "--output_dir", str(tmp_path / "straight")]) == 0
    out = tmp_path / "straight"
    assert sorted(p.name for p in (out / "validation").iterdir()), "--validation_epochs 1 validates every epoch"
    part = "pytorch_lora_weights.safetensors" if lora else FAMILIES[family_name].denoiser_name
    a = load_file(out / part) if lora else weights(out, part)
    b = load_file(tmp_path / "stopped" / part) if lora else weights(tmp_path / "stopped", part)
    # the lr schedule is constant and the run length only decides when to stop, so 2 + resume + 1 = 3 straight
    assert same(a, b)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["family"] == family_name and summary["class_images"]["used"] == 2
