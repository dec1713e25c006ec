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
from .ablations import MARKER, QUICK, STUDIES, ReproduceConfig, plan, run_all, studies_of
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
        identifiers |= companion_identifiers(cfg, model, identifiers)
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


def companion_identifiers(cfg: ReproduceConfig, model: str, identifiers: dict[str, str]) -> dict[str, str]:
    """The identifiers of the subjects the multi-subject study trains beside each unit's, as f"{unit}/{which}":
    a set that shares no token piece with the unit's own, which stays its single runs' identifier."""
    from ..families import ModelSource, get_family
    from ..identifier import distinct_identifiers

    kinds = list(dict.fromkeys(w for study in studies_of(cfg) for _, v in STUDIES[study].variants.values()
                               for w in v.companions))
    if not kinds:
        return {}
    source = ModelSource(model)
    tokenizer, text_encoder = get_family(source).load_text(source)
    out = {}
    for name in cfg.subjects:
        chosen = distinct_identifiers({"text_encoder": tokenizer}, text_encoder.eval(), SUBJECTS[name].cls,
                                      1 + len(kinds))
        if chosen[0].token != identifiers[name]:  # (the unit's own pick is the ranking's first)
            raise DreamBoothError(f"the identifier set for {name} does not start with its own {identifiers[name]!r}")
        out |= {f"{name}/{which}": c.token for which, c in zip(kinds, chosen[1:])}
    return out
