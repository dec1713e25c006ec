"""--fsdp: the denoiser sharded over 2 CPU processes (gloo) with FSDP2 trains like one process with twice the batch,
resumes exactly from its sharded checkpoint, saves what an unsharded run saves, and shards LoRA runs too."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_bounded, to_argv
from dreambooth.cli import main
from test_distributed import free_port
from test_training import relative_update_gap, same, weights
from tiny import make_tiny_sd3

NO_PRIOR = dict(with_prior_preservation=False, class_prompt=None, class_data_dir=None)
COMMON = dict(max_train_steps=3, checkpointing_steps=2, learning_rate=1e-4, **NO_PRIOR)


def two_processes(args: dict) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port()), "-m", "dreambooth", "train"]
    return run_bounded([*launch, *to_argv(args)], 300, check=True)


def layout(folder: Path) -> dict[str, tuple]:
    """Every file of a saved pipeline (checkpoints, logs and run records aside) and each tensor's shape and dtype."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_dir() or rel.startswith(("checkpoint-", "logs/")) or "/" not in rel and rel not in (
                "model_index.json", "pytorch_lora_weights.safetensors"):
            continue
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as f:
                out[rel] = tuple(sorted((k, tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype())
                                        for k in f.keys()))  # noqa: SIM118 (safe_open is not a dict)
        else:
            out[rel] = ()
    return out


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    return make_tiny_sd3(tmp_path_factory.mktemp("models") / "sd3")


@pytest.mark.parametrize("family", ["sd", "sd3"])  # a UNet and a transformer: both generations of models
def test_two_sharded_processes_train_like_one_with_double_batch(base_args, tiny_model, tiny_sd3, tmp_path, family):
    model = tiny_model if family == "sd" else tiny_sd3
    # the UNet with its text encoder trained too (replicated, clipped together with the shards by one norm); the
    # transformer with gradient checkpointing (FSDP's gathers re-run in the recomputed forward passes)
    extra = ({"train_text_encoder": True, "max_grad_norm": 0.01} if family == "sd"
             else {"max_sequence_length": 16, "gradient_checkpointing": True})
    one = base_args(pretrained_model_name_or_path=str(model), output_dir=str(tmp_path / "one"), train_batch_size=2,
                    **COMMON, **extra)
    two = {**one, "output_dir": str(tmp_path / "two"), "train_batch_size": 1, "fsdp": True}
    assert main(["train", *to_argv(one)]) == 0
    two_processes(two)
    s1, s2 = (json.loads((tmp_path / n / "run_summary.json").read_text()) for n in ("one", "two"))
    assert (s1["processes"], s2["processes"]) == (1, 2)
    assert abs(s1["mean_loss"] - s2["mean_loss"]) < 1e-5  # the batch split changes float order only
    part = "unet" if family == "sd" else "transformer"
    # the same yardstick as the DDP test: Adam turns float-order noise on tiny gradients into lr-sized steps
    trained = [part, "text_encoder"] if family == "sd" else [part]
    for name in trained:  # max_grad_norm 0.01: the clipping acts on every step, so the norms must agree
        gap = relative_update_gap(weights(model, name), weights(tmp_path / "one", name),
                                  weights(tmp_path / "two", name))
        assert gap < 1e-3, name
    # the result and each checkpoint's weights are full, unsharded folders, file for file as an unsharded run's
    assert layout(tmp_path / "two") == layout(tmp_path / "one")
    assert layout(tmp_path / "two" / "checkpoint-2" / part) == layout(tmp_path / "one" / "checkpoint-2" / part)
    shards = sorted(p.name for p in (tmp_path / "two" / "checkpoint-2").glob("optimizer*"))
    assert shards == ["optimizer-0.json", "optimizer-0.safetensors", "optimizer-1.json", "optimizer-1.safetensors"]
    # each process keeps half of every optimizer state (dim-0 shards: the halves add up to the whole)
    whole = load_file(tmp_path / "one" / "checkpoint-2" / "optimizer.safetensors")
    halves = [load_file(tmp_path / "two" / "checkpoint-2" / f"optimizer-{r}.safetensors") for r in (0, 1)]
    key = max(whole, key=lambda k: whole[k].numel())
    assert halves[0][key].shape[0] + halves[1][key].shape[0] == whole[key].shape[0]


def test_a_sharded_run_resumes_exactly_and_only_on_as_many_processes(base_args, tmp_path, capsys):
    args = base_args(output_dir=str(tmp_path / "two"), train_batch_size=1, fsdp=True, **COMMON)
    two_processes(args)
    finished = weights(tmp_path / "two", "unet")
    shutil.copytree(tmp_path / "two" / "checkpoint-2", tmp_path / "kept-checkpoint-2")
    # as if killed right after checkpoint-2: continue from it with the same two processes
    two_processes({**args, "resume_from_checkpoint": "checkpoint-2"})
    assert same(weights(tmp_path / "two", "unet"), finished)
    # one process cannot take over two processes' optimizer shards
    code = main(["train", *to_argv({**args, "resume_from_checkpoint": str(tmp_path / "kept-checkpoint-2")})])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and "sharded over 2 processes; resume with that many" in err
    # the checkpoint's weights stand on their own, without --fsdp or the run
    from dreambooth.generation import load_for_inference

    pipe = load_for_inference(str(tmp_path / "kept-checkpoint-2"), torch.float32)
    assert same({k: v for k, v in pipe.unet.state_dict().items()}, weights(tmp_path / "kept-checkpoint-2", "unet"))


def test_lora_under_fsdp_trains_like_one_process(base_args, tmp_path):
    lora = dict(use_lora=True, rank=4, learning_rate=1e-3)
    one = base_args(output_dir=str(tmp_path / "one"), train_batch_size=2, **{**COMMON, **lora})
    assert main(["train", *to_argv(one)]) == 0
    two_processes({**one, "output_dir": str(tmp_path / "two"), "train_batch_size": 1, "fsdp": True})
    a, b = (load_file(tmp_path / n / "pytorch_lora_weights.safetensors") for n in ("one", "two"))
    assert a.keys() == b.keys()
    # lora_B starts at zero: its values are the training's updates, compared as the full-model tests compare them
    up = {k: v for k, v in a.items() if "lora_B" in k or "lora.up" in k}
    assert up and relative_update_gap({k: torch.zeros_like(v) for k, v in up.items()}, up,
                                       {k: b[k] for k in up}) < 1e-3


def test_one_sharded_process_trains_like_an_unsharded_one(base_args, tmp_path):
    """--fsdp in one process (how one GPU offloads to CPU memory): a process group of one, the same training, and
    the group is gone afterwards so the next run in this process starts clean."""
    import torch.distributed as dist

    import dreambooth

    dreambooth.train(**base_args(output_dir=str(tmp_path / "plain"), **COMMON))
    dreambooth.train(**base_args(output_dir=str(tmp_path / "sharded"), fsdp=True, fsdp_cpu_offload=True, **COMMON))
    assert not dist.is_initialized()
    # FSDP's flat all-gather and reduce-scatter of one process reorder nothing but the float sums of clipping
    gap = relative_update_gap(weights(Path(base_args()["pretrained_model_name_or_path"]), "unet"),
                              weights(tmp_path / "plain", "unet"), weights(tmp_path / "sharded", "unet"))
    assert gap < 1e-3


def test_mixed_sharded_and_plain_gradients_are_clipped_by_one_global_norm():
    """What `clip_grad_norm_` does over plain tensors, for a mix of DTensor (sharded denoiser) and plain (text
    encoder) gradients: one norm over both, every gradient scaled by the same factor."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from dreambooth.sharding import clip_mixed

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        a_grad, b_grad = torch.randn(6, 4) * 3, torch.randn(5) * 2
        a = torch.nn.Parameter(distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)]))
        b = torch.nn.Parameter(torch.zeros(5))
        a.grad, b.grad = distribute_tensor(a_grad.clone(), mesh, [Shard(0)]), b_grad.clone()
        reference = [torch.nn.Parameter(torch.zeros(6, 4)), torch.nn.Parameter(torch.zeros(5))]
        reference[0].grad, reference[1].grad = a_grad.clone(), b_grad.clone()
        torch.nn.utils.clip_grad_norm_(reference, 1.0)
        clip_mixed([a, b], 1.0)
        # the same norm and factor, computed in another order: float rounding
        assert torch.allclose(a.grad.full_tensor(), reference[0].grad, rtol=1e-5)
        assert torch.allclose(b.grad, reference[1].grad, rtol=1e-5)
        assert abs(float(torch.cat([a.grad.full_tensor().flatten(), b.grad]).norm()) - 1.0) < 1e-4
    finally:
        if started:
            dist.destroy_process_group()
