"""The ablation report: per-variant toy metrics and paired differences with 95% intervals over units (subject x
seed), each claim of the paper given a verdict; written as ablations.json, ablations.md and ablations.png."""

from __future__ import annotations

import json
import logging
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from .. import schema
from ..evaluation.backends import BACKENDS
from ..evaluation.metrics import t_interval
from ..files import write_text_atomic
from ..outputs import OutputFolder, check_output_file
from .ablations import QUICK, STUDIES, STUDY_METRICS, Job, ReproduceConfig, studies_of, variant_name
from .models import TOY_MODELS

TITLE = "# DreamBooth's ablations, reproduced on the toy world"  # the first line: how a table of ours is recognised
SOFTWARE = "dreambooth reproduce"  # the plot's PNG metadata, likewise

log = logging.getLogger("dreambooth")
NAMES = {"subject": "subject fidelity", "prompt": "prompt fidelity", "pres": "PRES", "div": "DIV",
         "leak": "background leak", "bleed": "identity bleed (twin)", "bleed_next": "identity bleed (other class)",
         "class_bleed": "bleed into the class prompt"}


def _interval(values: list[float]) -> dict[str, float]:
    mean, low, high = t_interval(values)
    return {"mean": mean, "low": low, "high": high}


def verdict(diff: dict[str, float], paper: bool = True) -> str:
    """Whether a paired difference (expected > 0) reproduces the paper's direction (or, for a claim of ours, holds)."""
    mean, low, high = diff["mean"], diff["low"], diff["high"]
    if math.isnan(mean):  # runs made before the metric existed: their result.json lacks it
        return "not measured (re-run the runs that lack this metric)"
    if mean == low == high == 0:  # every unit measured the same on both sides (e.g. a bleed that never shows)
        return "no difference: every unit measured 0"
    if math.isnan(low):
        return "same direction (one unit: no interval)" if mean > 0 else "opposite direction (one unit: no interval)"
    if low > 0:
        return "reproduces" if paper else "holds"
    if high < 0:
        return "opposite direction: does not " + ("reproduce" if paper else "hold")
    return "same direction, not significant" if mean > 0 else "opposite direction, not significant"


def summarize(cfg: ReproduceConfig, jobs: list[Job], results: dict[Path, dict[str, Any]],
              identifiers: dict[str, str]) -> dict[str, Any]:
    """Per study: each variant's per-unit metrics, their mean and interval, and each claim's paired difference."""
    units = [(s, seed) for s in cfg.subjects for seed in cfg.seeds]
    by_variant = {(variant_name(j.variant), j.subject, j.seed): results[j.folder]["metrics"] for j in jobs}
    studies = {}
    for key in studies_of(cfg):
        study = STUDIES[key]
        per_unit = {vk: {m: [by_variant[(variant_name(v), s, seed)].get(m, float("nan")) for s, seed in units]
                         for m in study.metrics}
                    for vk, (_, v) in study.variants.items()}
        variants = {vk: {"label": label, "run": variant_name(v), "per_unit": per_unit[vk],
                         "metrics": {m: _interval(per_unit[vk][m]) for m in study.metrics},
                         "paper": study.paper.get(vk, {})}
                    for vk, (label, v) in study.variants.items()}
        if study.timed:  # seconds of training per run (class images are made once per class noun, before)
            for vk, (_, v) in study.variants.items():
                times = [results[j.folder].get("train_time_s", float("nan")) for j in jobs
                         if j.variant == v]
                variants[vk]["train_time_s"] = _interval(times)
        if study.sized:  # the adapter file of each variant (the same in every unit)
            for vk, (_, v) in study.variants.items():
                runs = [results[j.folder] for j in jobs if j.variant == v]
                variants[vk]["adapter"] = {k: float(np.mean([r.get(k, float("nan")) for r in runs]))
                                           for k in ("adapter_params", "adapter_kb")}
        claims = []
        for c in study.claims:
            diffs = list(np.subtract(per_unit[c.high][c.metric], per_unit[c.low][c.metric]))
            d = _interval(diffs)
            claims.append({"text": c.text, "metric": c.metric, "high": c.high, "low": c.low, "difference": d,
                           "per_unit": diffs, "verdict": verdict(d, study.default)})
        studies[key] = {"title": study.title, "paper_source": study.paper_source, "metrics": list(study.metrics),
                        "variants": variants, "claims": claims, "paper_study": study.default}
    return {"command": command_line(cfg), "settings": schema.to_dict(cfg), "units": [list(u) for u in units],
            "identifiers": identifiers, "runs": len(jobs),
            "train_time_s": round(sum(r["wall_time_s"] for r in results.values()), 1), "studies": studies}


def command_line(cfg: ReproduceConfig) -> str:
    """The `dreambooth reproduce` flags that differ from the defaults (what a reader types to get these figures)."""
    def plain(c: ReproduceConfig) -> dict[str, Any]:
        return json.loads(json.dumps(schema.to_dict(c)))  # tuples and lists alike

    defaults = plain(ReproduceConfig()) | (QUICK if cfg.quick else {})  # what --quick implies goes unsaid
    parts = ["dreambooth reproduce"]
    for name, value in plain(cfg).items():
        if value == defaults[name] or name in ("jobs", "keep_models"):
            continue
        if isinstance(value, bool):
            parts.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, list):
            parts.append(f"--{name} " + " ".join(map(str, value)))
        else:
            parts.append(f"--{name} {value}")
    return " ".join(parts)


def _cell(m: dict[str, float]) -> str:
    if math.isnan(m["mean"]):
        return "–"
    if math.isnan(m["low"]):
        return f"{m['mean']:.3f}"
    return f"{m['mean']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def _signed(m: dict[str, float]) -> str:
    if math.isnan(m["low"]):
        return f"{m['mean']:+.3f}"
    return f"{m['mean']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]"


def markdown(summary: dict[str, Any], plot: str | None) -> str:
    s = summary["settings"]
    units = summary["units"]
    toy = BACKENDS["toy"].metrics
    shown = [m for m in NAMES if any(m in st["metrics"] for st in summary["studies"].values())]
    beyond = [] if any(st.get("paper_study", True) for st in summary["studies"].values()) else [
        "Beyond the paper: what today's trainers add to DreamBooth, measured on the same toy world and recipe as "
        "[ablations.md](ablations.md). A claim *holds* when the interval of its difference excludes zero on the "
        "claimed side.", ""]
    lines = [
        TITLE, "", *beyond, *TOY_MODELS[s.get("family", next(iter(TOY_MODELS)))].docs_intro,
        "Made by:", "", "```", summary["command"], "```", "",
        f"{summary['runs']} training runs of "
        + (f"{s['steps_per_image']} steps per instance image" if s.get("steps_per_image")
           else f"{s['max_train_steps']} steps")
        + (" per subject" if any("-with-" in v["run"] for st in summary["studies"].values()
                                 for v in st["variants"].values()) else "")
        + f" (learning rate {s['learning_rate']}, batch "
        f"{s['train_batch_size']}, text encoder {'trained' if s['train_text_encoder'] else 'frozen'}, λ = "
        f"{s['prior_loss_weight']}, {s['num_class_images']} class images), each scored on 7 prompts × "
        f"{s['images_per_prompt']} images and {s['class_images']} bare class-prompt images. The runs took "
        f"{summary['train_time_s'] / 60:.0f} min in all (the sum over runs of training and scoring, "
        f"{s['jobs']} at a time). This call ran {summary['runs'] - summary['reused_runs']} of them in "
        f"{summary['wall_time_s'] / 60:.1f} min" + (f" and reused {summary['reused_runs']} from earlier calls"
                                                   if summary["reused_runs"] else "")
        + f". Units: {len(units)} (subject, seed) pairs — "
        + ", ".join(f"{a}/{b}" for a, b in units) + ". Identifiers: "
        + ", ".join(f"{k} `{v}`" for k, v in summary["identifiers"].items()) + ".", "",
        "Each figure is the mean over units with its 95% Student-t interval over units; differences are paired "
        "(a unit's variants share instance images, identifier and evaluation seeds)."
        + ("" if beyond else " A claim *reproduces* when the interval of its difference excludes zero on the "
           "paper's side."), "",
        "Toy metrics (`dreambooth evaluate --backend toy`):", "",
        *[f"- **{m}** ({'~' + toy[m].analogue_of + ', ' if toy[m].analogue_of else ''}{toy[m].better} is better): "
          f"{toy[m].description}" if m in toy else f"- **{m}** ({STUDY_METRICS[m][1]} is better): "
          f"{STUDY_METRICS[m][0]}" for m in shown], "",
    ]
    if plot:
        lines += [f"![ablations]({plot})", ""]
    for st in summary["studies"].values():
        metrics = st["metrics"]
        paper_cols = [m for m in metrics if any(m in v["paper"] for v in st["variants"].values())]
        has_paper = any(v["paper"] for v in st["variants"].values())
        timed = all("train_time_s" in v for v in st["variants"].values())
        sized = all("adapter" in v for v in st["variants"].values())
        lines += [f"## {st['title']}", "", f"Paper: {st['paper_source']}." if has_paper else f"{st['paper_source']}.",
                  "",
                  "| variant | " + " | ".join(metrics) + "".join(f" | paper {NAMES[m]}" for m in paper_cols)
                  + (" | training time (s)" if timed else "") + (" | adapter parameters | file (KB)" if sized else "")
                  + " |",
                  "|---|" + "---|" * (len(metrics) + len(paper_cols) + timed + 2 * sized)]
        for v in st["variants"].values():
            time_cell = f" | {v['train_time_s']['mean']:.0f} [{v['train_time_s']['low']:.0f}, " \
                        f"{v['train_time_s']['high']:.0f}]" if timed else ""
            size_cell = f" | {v['adapter']['adapter_params']:,.0f} | {v['adapter']['adapter_kb']:.0f}" if sized else ""
            lines.append(f"| {v['label']} | " + " | ".join(_cell(v["metrics"][m]) for m in metrics)
                         + "".join(f" | {v['paper'][m]:.3f}" if m in v["paper"] else " | –" for m in paper_cols)
                         + time_cell + size_cell + " |")
        claim = "the paper's claim" if has_paper else "the claim"
        lines += ["", f"| {claim} | toy difference, 95% CI | verdict |", "|---|---|---|"]
        for c in st["claims"]:
            hi, lo = st["variants"][c["high"]]["label"], st["variants"][c["low"]]["label"]
            lines.append(f"| {c['text']} ({c['metric']}: {hi} − {lo}) | {_signed(c['difference'])} | "
                         f"{c['verdict']} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> bool:
    """One panel per study: variant means with their intervals, each unit as a dot, the paper's figures as
    crosses. False (and a warning) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("no plot: matplotlib is not installed (pip install 'dreambooth[reproduce]')")
        return False
    studies = summary["studies"]
    # a panel of many metrics is wider, its metric names slanted (the paper's studies have at most four)
    widths = [max(5.6, 1.45 * len(st["metrics"])) for st in studies.values()]
    fig, axes = plt.subplots(1, len(studies), figsize=(sum(widths), 5.4 if max(widths) == 5.6 else 6.4), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, st in zip(axes[0], studies.values()):
        variants = list(st["variants"].values())
        metrics = st["metrics"]
        width = 0.8 / len(variants)
        labelled = False  # the paper's crosses get one legend entry
        for i, v in enumerate(variants):
            x = np.arange(len(metrics)) + (i - (len(variants) - 1) / 2) * width
            means = [v["metrics"][m]["mean"] for m in metrics]
            err = np.array([[max(v["metrics"][m]["mean"] - v["metrics"][m]["low"], 0),
                             max(v["metrics"][m]["high"] - v["metrics"][m]["mean"], 0)] for m in metrics]).T
            err = None if np.isnan(err).any() else err
            ax.bar(x, means, width * 0.92, yerr=err, capsize=3, label=v["label"], alpha=0.85)
            for j, m in enumerate(metrics):
                ax.scatter(np.full(len(v["per_unit"][m]), x[j]), v["per_unit"][m], s=8, color="black", zorder=3)
                if m in v["paper"]:
                    ax.scatter([x[j]], [v["paper"][m]], marker="x", s=60, color="red", zorder=4,
                               label=None if labelled else "paper")
                    labelled = True
        slanted = {"rotation": 20, "ha": "right"} if len(metrics) > 4 else {}
        ax.set_xticks(np.arange(len(metrics)), [NAMES[m] for m in metrics], **slanted)
        ax.set_ylim(0, 1.05)
        ax.set_title(textwrap.fill(st["title"], 60), fontsize=10)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.36 if slanted else -0.09), ncol=2,
                  frameon=False)
    crosses = any(v["paper"] for st in studies.values() for v in st["variants"].values())
    fig.suptitle("Toy world: mean, 95% interval over (subject, seed) units;\ndots = units"
                 + (", x = paper" if crosses else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png", metadata={"Software": SOFTWARE}, bbox_inches="tight")
    plt.close(fig)
    return True


def docs_targets(docs_dir: Path, family: str = "sd", name: str | None = None) -> tuple[Path, Path]:
    """ablations.md and ablations.png (ablations-sd3.* for the SD3 toy; `name`.* when given) in --docs_dir, refused
    (before any run) if either exists and was not written by `reproduce`: the table by its title, the plot by its
    PNG metadata (or, from before that, by the table beside it)."""
    stem = name or f"ablations{TOY_MODELS[family].stem_suffix}"
    md, png = Path(docs_dir) / f"{stem}.md", Path(docs_dir) / f"{stem}.png"

    def md_ours(path: Path) -> bool:
        try:
            return path.read_text(encoding="utf-8").startswith(TITLE)
        except (OSError, UnicodeDecodeError):
            return False

    def png_ours(path: Path) -> bool:
        from PIL import Image

        try:
            with Image.open(path) as img:
                return img.info.get("Software") == SOFTWARE or md_ours(md)
        except OSError:
            return False

    return check_output_file(md, "--docs_dir", ours=md_ours), check_output_file(png, "--docs_dir", ours=png_ours)


def write_report(summary: dict[str, Any], out: OutputFolder, docs_dir: Path | None) -> None:
    targets = [(out.entry("ablations.md"), out.entry("ablations.png"))]
    if docs_dir:
        Path(docs_dir).mkdir(parents=True, exist_ok=True)
        targets.append(docs_targets(docs_dir, summary["settings"]["family"], summary["settings"].get("docs_name")))
    for md, png in targets:
        drawn = plot(summary, png)
        write_text_atomic(md, markdown(summary, png.name if drawn else None))
    write_text_atomic(out.entry("ablations.json"), json.dumps(summary, indent=2) + "\n")
    for st in summary["studies"].values():
        for c in st["claims"]:
            print(f"{st['title']}: {c['text']}: {_signed(c['difference'])} -> {c['verdict']}")
    where = out.path
    print(f"tables: {where / 'ablations.md'}; plot: {where / 'ablations.png'}; figures: {where / 'ablations.json'}")
