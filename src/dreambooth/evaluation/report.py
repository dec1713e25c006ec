"""The evaluation report: per-unit scores -> overall, per-category and per-prompt values with bootstrap intervals;
written as report.json, report.md and one grid per prompt (real images on top, generated below)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .. import schema
from ..errors import DreamBoothError
from ..files import save_image_atomic, write_text_atomic
from ..generation import slug
from ..grid import make_grid
from ..outputs import OutputFolder, check_output_file, writing
from .backends import BACKENDS, Backend, Case, Metric, Subject
from .metrics import bootstrap_ci

Scores = dict[str, np.ndarray]


def summarize(defined: dict[str, Metric], units: dict[str, list[np.ndarray]], resamples: int, seed: int
              ) -> dict[str, dict[str, Any]]:
    """{metric: value, ci95, units, ...} for the metrics that have units."""
    out = {}
    for name, metric in defined.items():
        values = np.concatenate(units[name]) if units.get(name) else np.array([])
        values = values[~np.isnan(values)]
        if not len(values):
            continue
        low, high = bootstrap_ci(values, resamples, seed=seed)
        out[name] = {"value": float(values.mean()), "ci95": [low, high], "units": int(len(values)),
                     "unit": metric.unit, "better": metric.better, "description": metric.description}
        if metric.analogue_of:
            out[name]["analogue_of"] = metric.analogue_of
    return out


def _collect(scores: list[Scores]) -> dict[str, list[np.ndarray]]:
    units: dict[str, list[np.ndarray]] = {}
    for s in scores:
        for name, values in s.items():
            units.setdefault(name, []).append(np.asarray(values, dtype=np.float64))
    return units


def build_report(cfg: Any, backend: Backend, subject: Subject, cases: list[Case], scores: list[Scores],
                 class_prompt: str, class_scores: Scores, sampling: dict[str, Any], counts: dict[str, Any]
                 ) -> dict[str, Any]:
    resamples, seed = cfg.bootstrap_resamples, cfg.seed
    overall = _collect([*scores, class_scores])
    categories = list(dict.fromkeys(c.category for c in cases))
    per_category = {cat: summarize(backend.metrics, _collect([s for c, s in zip(cases, scores) if c.category == cat]),
                                   resamples, seed) for cat in categories}
    per_prompt = [{"index": i, "prompt": c.prompt, "category": c.category, "scored_text": c.text,
                   "images": counts["images"][i], "metrics": {k: float(np.nanmean(v)) for k, v in s.items()},
                   "unit_scores": {k: [float(x) for x in v] for k, v in s.items()}}
                  for i, (c, s) in enumerate(zip(cases, scores))]
    reference = {"real images of this subject (mean over distinct pairs)": backend.real_reference(),
                 **backend.references}
    return {
        "backend": backend.name,
        "subject": dataclasses.asdict(subject),
        "source": {"model": cfg.model} if cfg.model else {"images_dir": str(cfg.images_dir)},
        "metrics": summarize(backend.metrics, overall, resamples, seed),
        "per_category": per_category,
        "per_prompt": per_prompt,
        "class_prompt": {"prompt": class_prompt, "images": counts["class"],
                         "metrics": {k: float(np.mean(v)) for k, v in class_scores.items()},
                         "unit_scores": {k: [float(x) for x in v] for k, v in class_scores.items()}},
        "reference": {k: v for k, v in reference.items() if v},
        "sampling": {**sampling, "seed": cfg.seed, "negative_prompt": cfg.negative_prompt} if cfg.model else None,
        "settings": schema.to_dict(cfg),
        "notes": backend.notes(),
    }


def _fmt(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def markdown(report: dict[str, Any]) -> str:
    s, metrics = report["subject"], report["metrics"]
    names = list(metrics)
    refs = report["reference"]
    title = f"{s['name'] or s['class_noun']} ({s['class_noun']}), identifier `{s['identifier']}`"
    lines = [f"# DreamBooth evaluation: {title}",
             "",
             f"Backend `{report['backend']}`; " + ", ".join(f"{k} `{v}`" for k, v in report["source"].items())
             + f"; {len(report['per_prompt'])} prompts, {sum(p['images'] for p in report['per_prompt'])} images, "
             f"{report['class_prompt']['images']} of \"{report['class_prompt']['prompt']}\".",
             "", "| metric | value | 95% CI | better |" + "".join(f" {r} |" for r in refs),
             "|---|---|---|---|" + "---|" * len(refs)]
    for name in names:
        m = metrics[name]
        label = name + (f" (~{m['analogue_of']})" if "analogue_of" in m else "")
        lines.append(f"| {label} | {_fmt(m['value'])} | {_fmt(m['ci95'][0])}–{_fmt(m['ci95'][1])} | {m['better']} |"
                     + "".join(f" {_fmt(r.get(name))} |" for r in refs.values()))
    lines += ["", "## Per category", "", "| category | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for cat, ms in report["per_category"].items():
        lines.append(f"| {cat} | " + " | ".join(_fmt(ms[n]["value"]) if n in ms else "–" for n in names) + " |")
    lines += ["", "## Per prompt", "", "| # | prompt | category | " + " | ".join(names) + " |",
              "|---|---|---|" + "---|" * len(names)]
    for p in report["per_prompt"]:
        lines.append(f"| {p['index']:02d} | {p['prompt']} | {p['category']} | "
                     + " | ".join(_fmt(p["metrics"].get(n)) for n in names) + " |")
    lines += ["", "## Metrics", ""] + [f"- **{n}**: {metrics[n]['description']}" for n in names]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["- Intervals: percentile bootstrap of the mean over units (images; prompts for DIV), "
              f"{report['settings']['bootstrap_resamples']} resamples."]
    return "\n".join(lines) + "\n"


def write_report(out: OutputFolder, report: dict[str, Any], cases: list[Case], images: list[list[Image.Image]],
                 real: list[Image.Image]) -> None:
    grids = out.entry("grids")
    grids.mkdir(exist_ok=True)
    for i, (case, imgs) in enumerate(zip(cases, images)):
        cols = max(len(real), len(imgs))
        size = imgs[0].size
        tiles = [ImageOps.fit(r, size, Image.BICUBIC) for r in real] + [None] * (cols - len(real)) + list(imgs)
        blank = Image.new("RGB", size, "white")
        grid = make_grid([t or blank for t in tiles], cols=cols)
        scale = max(1, 96 // size[0])  # toy images are 32 px: enlarge them, without smoothing, to be seen
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST) if scale > 1 else grid
        save_image_atomic(grid, grids / f"{i:02d}-{slug(case.prompt)}.png")
    write_text_atomic(out.entry("report.md"), markdown(report))
    write_text_atomic(out.entry("report.json"), json.dumps(report, indent=2, default=str) + "\n")


REPORT_KEYS = ("backend", "metrics", "per_prompt", "class_prompt")
SUMMARY_MARK = "dreambooth evaluate-summary"  # `written_by` of a summary file: the only kind it replaces


def read_report(path: Path) -> dict[str, Any]:
    """A report.json that `dreambooth evaluate` wrote (or a folder holding one), or a one-line error."""
    path = path / "report.json" if path.is_dir() else path
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        report = None
    if not isinstance(report, dict):
        raise DreamBoothError(f"{path} is not a readable report.json; pass the files `dreambooth evaluate` wrote")
    lacking = [k for k in REPORT_KEYS if k not in report]
    if lacking:
        raise DreamBoothError(f"{path} is not a report of `dreambooth evaluate` (it has no {', '.join(lacking)}); "
                              "pass the report.json files that command wrote")
    return report


def _is_summary(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("written_by") == SUMMARY_MARK
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def summary_target(output: str | Path, inputs: list[str]) -> Path:
    """Where the pooled summary goes: a new file, or an earlier summary (nothing else is replaced)."""
    return check_output_file(output, "--output", {f"report {r}": r for r in inputs}, ours=_is_summary)


def write_summary(summary: dict[str, Any], out: Path) -> Path:
    """The pooled summary as JSON, marked as ours."""
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps({"written_by": SUMMARY_MARK, **summary}, indent=2) + "\n")
    return out


def combine(reports: dict[str, dict[str, Any]], resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Pool the unit scores of several reports ({label: report}) of one backend, e.g. the 30 DreamBench subjects,
    into one figure per metric with its bootstrap interval; each report's own values are kept by label."""
    backends = {r["backend"] for r in reports.values()}
    if len(backends) != 1:
        raise DreamBoothError(f"the reports come from different backends ({', '.join(sorted(backends))}); combine "
                              "reports of one backend")
    units = _collect([part.get("unit_scores", {}) for r in reports.values()
                      for part in [*r["per_prompt"], r["class_prompt"]]])
    name = backends.pop()
    per_report = {label: {k: m["value"] for k, m in r["metrics"].items()} for label, r in reports.items()}
    return {"backend": name, "subjects": len(reports),
            "metrics": summarize(BACKENDS[name].metrics, units, resamples, seed), "per_report": per_report}
