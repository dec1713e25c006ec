"""--fsdp: the denoiser sharded over the run's processes with PyTorch's FSDP2 (`fully_shard`).

Each block the family names (`ModelFamily.shard_blocks`: UNet down/mid/up blocks, transformer blocks) is one FSDP
unit, then the root: a process holds 1/N of every parameter, gradient and AdamW state, and a block's full weights
exist only while it runs. The frozen parts (VAE, text encoders, a frozen base model) are not sharded: they run
outside the training step's critical path, as without --fsdp.

`fully_shard` is called directly, not through accelerate's FSDP plugin: accelerate enables FSDP on GPUs only (with
CPU processes it silently falls back to DDP), so the one code path that runs on a GPU cluster is the one the
2-process CPU tests check. What accelerate still does: processes, autocast, backward, gradient clipping (on DTensor
gradients) and accumulation.

Checkpoints: the trained weights are gathered into the usual full folders (so every checkpoint, and the result,
loads on its own, with any number of processes), and each process writes its own shard of the optimizer state
(`optimizer-<rank>.safetensors`), so a resume needs the same number of processes. No `torch.distributed.checkpoint`
files: its metadata is pickled, and this project unpickles nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .errors import CheckpointError, ConfigError


class Sharding:
    def __init__(self, model: torch.nn.Module, twin: torch.nn.Module, own_group: bool = False):
        self.model = model
        self.twin = twin  # the same module unsharded, its parameters on the meta device until `gathered` fills them
        self.own_group = own_group  # a one-process group this run started (and ends)

    @classmethod
    def apply(cls, denoiser: torch.nn.Module, family: Any, cfg: Any, accelerator: Any,
              compute_dtype: torch.dtype | None) -> Sharding:
        """Shard `denoiser` in place over the accelerator's processes (blocks first, then the root)."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
        except ImportError:
            raise ConfigError("fsdp", True, f"needs PyTorch >= 2.6 (FSDP2's fully_shard); this is {torch.__version__}"
                              ) from None

        if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
            raise ConfigError("fsdp", True, f"the accelerate config asks for {accelerator.distributed_type.value}; "
                              "--fsdp shards the denoiser itself: launch with a plain multi-GPU config "
                              "(configs/accelerate-multi-gpu.yaml)")
        own_group = not dist.is_initialized()
        if own_group:  # one process (e.g. to offload to CPU memory): a process group of one
            backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # an empty twin: every parameter replaced by a meta tensor, every buffer shared (they are not sharded)
        memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                for p in denoiser.parameters()}
        twin = copy.deepcopy(denoiser, memo)  # (a deep copy of a compiled block is an eager one)
        mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        # parameters stay fp32; they are cast for the computation, gradients reduced in fp32
        offload = (CPUOffloadPolicy(pin_memory=accelerator.device.type == "cuda") if cfg.fsdp_cpu_offload
                   else OffloadPolicy())
        policy = {"mesh": mesh, "reshard_after_forward": cfg.fsdp_reshard_after_forward, "offload_policy": offload,
                  "mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)}
        units = 0
        for name in family.shard_blocks:
            part = getattr(denoiser, name, None)
            if part is None:
                continue
            for block in part if isinstance(part, torch.nn.ModuleList) else [part]:
                fully_shard(block, **policy)
                units += 1
        if not units:
            raise ConfigError("fsdp", True, f"this {family.name} denoiser has none of the blocks it shards "
                              f"({', '.join(family.shard_blocks)}); train without --fsdp")
        fully_shard(denoiser, **policy)
        return cls(denoiser, twin, own_group)

    def close(self) -> None:
        import torch.distributed as dist

        if self.own_group and dist.is_initialized():
            dist.destroy_process_group()

    @contextmanager
    def gathered(self, is_main: bool) -> Iterator[torch.nn.Module | None]:
        """The full weights on the main process (a plain module, on the CPU), for saving or rendering; every process
        must enter (the gather is collective); the others get None."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not is_main:
            yield None
            return
        self.twin.load_state_dict(full, assign=True)
        try:
            yield self.twin
        finally:  # back to meta: the gathered copy is freed
            for module in self.twin.modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    setattr(module, name, torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                                             requires_grad=p.requires_grad))


def clip_mixed(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """Clip the gradients of sharded (DTensor) and plain parameters (trained text encoders, replicated by DDP)
    together by their one global norm, as `clip_grad_norm_` does for one kind (it refuses a mix of the two)."""
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import get_total_norm

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    norms = []
    if sharded:
        norm = get_total_norm(sharded)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if plain:
        norms.append(get_total_norm(plain).to(norms[0].device if norms else plain[0].device))
    if not norms:
        return
    total = float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This process's part of a sharded optimizer's state: DTensors as their local shards."""
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: copied, not changed
    local = {idx: {key: value.to_local() if hasattr(value, "to_local") else value for key, value in per_param.items()}
             for idx, per_param in state["state"].items()}
    return {**state, "state": local}


def restore_sharding(optimizer: torch.optim.Optimizer) -> None:
    """After loading local shards: each state tensor shaped like its parameter's shard becomes a DTensor again."""
    from torch.distributed.tensor import DTensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            for key, value in optimizer.state.get(p, {}).items():
                local = isinstance(value, torch.Tensor) and not isinstance(value, DTensor)
                if local and value.shape == p.to_local().shape:
                    optimizer.state[p][key] = DTensor.from_local(value.to(p.device), p.device_mesh, p.placements,
                                                                 run_check=False, shape=p.shape, stride=p.stride())


def check_processes(saved: dict[str, Any], processes: int) -> None:
    if saved.get("sharded") and saved.get("num_processes") != processes:
        raise CheckpointError(f"this checkpoint's optimizer state is sharded over {saved.get('num_processes')} "
                              f"processes; resume with that many (now {processes})")
