"""`dreambooth reproduce`: plan the ablation studies (ablations.py), train and score them, write the report
(ablation_report.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .. import schema
from ..errors import DreamBoothError
from ..files import write_text_atomic
from ..outputs import OutputFolder
from ..quiet import quiet_libraries
from .ablation_report import docs_targets, summarize, write_report
from .ablations import MARKER, QUICK, ReproduceConfig, plan, run_all
from .demo import pick_identifier, toy_model
from .models import TOY_MODELS
from .subjects import SUBJECTS


def reproduce(config: ReproduceConfig | dict | str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the ablation studies on the toy world; returns the results (also written as ablations.json)."""
    values = {**schema.values_of(config, ReproduceConfig), **overrides}
    if values.get("quick"):
        values = {**QUICK, **values}  # flags given with --quick still win
    cfg = schema.build(ReproduceConfig, values)
    quiet_libraries()
    started = time.time()
    model = toy_model(cfg.family, cfg.model)
    if not (Path(model) / "model_index.json").is_file():
        raise DreamBoothError(f"{model} holds no toy pipeline (model_index.json); pass --model with a folder that "
                              "`dreambooth toy pretrain` wrote")
    if cfg.docs_dir is not None:
        docs_targets(cfg.docs_dir, cfg.family, cfg.docs_name)  # refused now, not after the runs
    out = cfg.output_dir or Path(f"reproduce{TOY_MODELS[cfg.family].stem_suffix}")
    with OutputFolder(out, "reproduce", models={"--model": model}) as folder:
        identifiers = {name: pick_identifier(model, SUBJECTS[name].cls) for name in cfg.subjects}  # the model loads
        folder.claim()
        write_text_atomic(folder.entry(MARKER), json.dumps(schema.to_dict(cfg), default=str, indent=2) + "\n")
        for written_by_the_runs in ("runs", "class-images"):
            folder.entry(written_by_the_runs)
        jobs = plan(cfg, model, identifiers, folder.path)
        results, reused = run_all(jobs, cfg.jobs)

        summary = summarize(cfg, jobs, results, identifiers)
        summary |= {"reused_runs": reused, "wall_time_s": round(time.time() - started, 1)}
        write_report(summary, folder, cfg.docs_dir)
    return summary
