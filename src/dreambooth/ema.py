"""An exponential moving average of the trained weights (--use_ema), kept by diffusers' `EMAModel`.

The average covers exactly what the run trains (the full denoiser and text encoders, or only their LoRA adapters),
is updated after every optimizer step, and is saved as safetensors in each checkpoint (`ema.safetensors`, its step
count in `ema.json`) so that a resumed run continues the same average bit for bit. `applied()` swaps the averaged
weights into the modules for as long as a validation or a save needs them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .files import write_text_atomic

EMA_WEIGHTS, EMA_STATE = "ema.safetensors", "ema.json"
EMA_FOLDER = "ema"  # output_dir/ema: the averaged pipeline (or LoRA file), beside the raw one


class Ema:
    def __init__(self, modules: dict[str, torch.nn.Module], cfg: Any):
        # keyed "module/parameter": a checkpoint's tensors are matched by name, not by position
        self.named = [(f"{name}/{pname}", p) for name, module in modules.items()
                      for pname, p in module.named_parameters() if p.requires_grad]
        self.model = EMAModel([p for _, p in self.named], decay=cfg.ema_decay, min_decay=cfg.ema_min_decay,
                              update_after_step=cfg.ema_update_after_step, use_ema_warmup=cfg.ema_warmup,
                              inv_gamma=cfg.ema_inv_gamma, power=cfg.ema_power, foreach=True)

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named]

    def step(self) -> None:
        self.model.step(self.parameters)

    @property
    def decay(self) -> float:
        """The decay of the last update (it grows during warm-up)."""
        return float(getattr(self.model, "cur_decay_value", None) or 0.0)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the modules, the trained ones back afterwards."""
        params = self.parameters
        self.model.store(params)
        self.model.copy_to(params)
        try:
            yield
        finally:
            self.model.restore(params)

    def files(self, copy: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
        """The average as it is now (copied through `copy`), written into a checkpoint folder when the returned
        function is called."""
        tensors = {name: copy(s) for (name, _), s in zip(self.named, self.model.shadow_params)}
        step = self.model.optimization_step

        def write(folder: Path) -> None:
            save_file(tensors, folder / EMA_WEIGHTS)
            write_text_atomic(folder / EMA_STATE, json.dumps({"optimization_step": step}) + "\n")

        return write

    def load(self, folder: Path) -> None:
        if not (folder / EMA_WEIGHTS).is_file():
            raise CheckpointError(f"checkpoint {folder} holds no EMA weights ({EMA_WEIGHTS}); resume without "
                                  "--use_ema, as it was trained, or start a new run")
        tensors = load_file(folder / EMA_WEIGHTS)
        names = [name for name, _ in self.named]
        if set(tensors) != set(names):
            missing = sorted(set(names) - set(tensors)) or sorted(set(tensors) - set(names))
            raise CheckpointError(f"checkpoint {folder}'s EMA weights do not match what this run trains (e.g. "
                                  f"{missing[0]}); resume with the settings it was trained with")
        with torch.no_grad():
            for name, shadow in zip(names, self.model.shadow_params):
                shadow.copy_(tensors[name])
        self.model.optimization_step = json.loads((folder / EMA_STATE).read_text())["optimization_step"]
