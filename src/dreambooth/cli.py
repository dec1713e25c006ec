"""The `dreambooth` command. Flags come from the config schemas; errors print as one line with exit status 2."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is imported anywhere

from . import schema  # noqa: E402
from .errors import STOPPED_EXIT, DreamBoothError, Stopped, say  # noqa: E402
from .registry import Registry  # noqa: E402

log = logging.getLogger("dreambooth")

# Reference-script flags that we accept so that existing command lines run; value = what we tell the user.
COMPAT_IGNORED = {
    "enable_xformers_memory_efficient_attention": "PyTorch SDPA attention is used (as fast, no extra package)",
    "set_grads_to_none": "gradients are always set to None",
    "pre_compute_text_embeddings": "a frozen text encoder's prompt embeddings are always computed once",
    "upcast_before_saving": "trained weights are kept, and saved, in fp32",
    # the Flux.2 klein README's: torchao fp8 linear layers are not implemented here
    "do_fp8_training": "fp8 training is not implemented; the run trains in --mixed_precision (bf16 on a GPU that "
                       "has it) and --use_lora keeps memory low",
    # the Flux.2 [dev] README's: a hosted endpoint encodes the prompts there; here the local text encoder encodes
    # each prompt once and leaves the GPU (the same conditioning, no network)
    "remote_text_encoder": "prompts are encoded once by the local text encoder, which then leaves the GPU",
    # the Krea 2 README's (a value: the Turbo checkpoint): validation here renders with the model being trained
    "validation_model_path": "validation grids render with the model being trained (sample the Turbo checkpoint "
                             "with `dreambooth generate --model <Turbo> --lora <run>` after training)",
    # the Flux.2 / Z-Image / Qwen-Image / Krea 2 scripts'
    "offload": "the frozen VAE and text encoders are on the GPU only while they encode",
    "fsdp_text_encoder": "the text encoders are frozen and encode each prompt once; --fsdp shards the denoiser",
    "skip_final_inference": "no final inference runs after training (validation grids and --eval do)",
    "enable_npu_flash_attention": "PyTorch SDPA attention is used",
    "cache_dir": "models load from the Hugging Face cache (HF_HOME sets where)",
    "final_validation_prompt": "no final inference runs after training; `dreambooth generate` renders any prompt",
}
COMPAT_VALUED = ("validation_model_path", "cache_dir", "final_validation_prompt")  # COMPAT_IGNORED taking a value
COMPAT_REFUSED = {
    "dataset_name": "pass the subject's photos as a local folder with --instance_data_dir",
    "push_to_hub": "upload the output folder with `hf upload` instead",
    "hub_token": "upload the output folder with `hf upload` instead",
    "hub_model_id": "upload the output folder with `hf upload` instead",
    "class_labels_conditioning": "only needed for DeepFloyd IF, which is not supported",
    "validation_images": "only needed for image-to-image pipelines, which are not supported",
    "dataset_config_name": "pass the subject's photos as a local folder with --instance_data_dir",
    "image_column": "pass the subject's photos as a local folder with --instance_data_dir",
    "caption_column": "give captions as text files beside the photos (--caption_extension .txt)",
}


class Parser(argparse.ArgumentParser):
    """No abbreviated flags (`--max_train_step` is a typo, not `--max_train_steps`), and a flag it does not know
    gets the closest one it does."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            known = [flag for p in (self, *_chosen) for flag in _flags(p)]
            hints = []
            for word in message.split(":", 1)[1].split():
                flag = word.split("=", 1)[0]
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75) if flag.startswith("--") else []
                if close:
                    hints.append(f"{flag}: did you mean {close[0]}?")
            if hints:
                message = f"{message} ({'; '.join(hints)})"
            if len(_chosen) == 1:  # the subcommand's flags: its usage and name ("dreambooth train: error: ...")
                argparse.ArgumentParser.error(_chosen[0], message)
        super().error(message)


def _flags(p: argparse.ArgumentParser) -> list[str]:
    """The long flags a parser and its subcommands (`toy pretrain`) take, but for hidden ones."""
    out = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            out += [flag for child in action.choices.values() for flag in _flags(child)]
        out += [o for o in action.option_strings if o.startswith("--") and action.help != argparse.SUPPRESS]
    return out


_chosen: list[argparse.ArgumentParser] = []  # the subcommand's parser, for the "did you mean" of a flag


def config_command(p: argparse.ArgumentParser, config: type, handler: Callable[[argparse.Namespace], int],
                    config_help: str = "A TOML, YAML or JSON file of options") -> argparse.ArgumentParser:
    """A subcommand whose flags come from a config schema, plus --config for a file of the same options."""
    p.add_argument("--config", help=config_help)
    schema.add_arguments(p, config)
    p.set_defaults(handler=handler)
    return p


def _add_train_parser(p: argparse.ArgumentParser) -> None:
    from .config import TrainConfig

    config_command(p, TrainConfig, _run_train, "A TOML, YAML or JSON file of options; flags given here override it")
    compat = p.add_argument_group("accepted for compatibility with the reference script")
    for name in COMPAT_IGNORED:
        kind = {} if name in COMPAT_VALUED else {"action": "store_true"}
        compat.add_argument(f"--{name}", **kind, help=argparse.SUPPRESS)
    for name in ("push_to_hub",):
        compat.add_argument(f"--{name}", action="store_true", help=argparse.SUPPRESS)
    for name in ("hub_token", "hub_model_id", "class_labels_conditioning", "dataset_name", "lora_layers",
                 "dataset_config_name", "image_column", "caption_column"):
        compat.add_argument(f"--{name}", help=argparse.SUPPRESS)
    compat.add_argument("--validation_images", nargs="+", help=argparse.SUPPRESS)
    compat.add_argument("--bnb_quantization_config_path", help=argparse.SUPPRESS)  # -> --quantize_base
    compat.add_argument("--validation_scheduler", dest="validation_sampler", help=argparse.SUPPRESS)
    compat.add_argument("--validation_num_inference_steps", dest="validation_inference_steps", type=int,
                        help=argparse.SUPPRESS)  # the Krea 2 script's name
    compat.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)


def _add_generate_parser(p: argparse.ArgumentParser) -> None:
    from .generation import GenerateConfig

    config_command(p, GenerateConfig, _run_generate)


def _add_evaluate_parser(p: argparse.ArgumentParser) -> None:
    from .evaluation import EvaluateConfig

    config_command(p, EvaluateConfig, _run_evaluate)


def _add_evaluate_summary_parser(c: argparse.ArgumentParser) -> None:
    c.add_argument("reports", nargs="+", help="report.json files (or the folders that hold them)")
    c.add_argument("--output", help="Write the pooled summary to this JSON file")
    c.set_defaults(handler=_run_evaluate_summary)


def _add_export_parser(p: argparse.ArgumentParser) -> None:
    from .export import ExportConfig

    config_command(p, ExportConfig, _run_export)


def _add_identifier_parser(p: argparse.ArgumentParser) -> None:
    from .identifier import IdentifierConfig

    config_command(p, IdentifierConfig, _run_identifier)


def _add_ui_parser(p: argparse.ArgumentParser) -> None:
    from .ui.server import UIConfig

    config_command(p, UIConfig, _run_ui)


def values_of(args: argparse.Namespace) -> dict[str, Any]:
    values = dict(schema.load_file(args.config)) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in vars(args).items()
                   if k not in ("config", "handler", "command") and not k.endswith("_command")})
    return values


def quantization_of(path: str) -> str:
    """The --quantize_base a reference script's --bnb_quantization_config_path JSON asks for: nf4 or int8."""
    import json
    from pathlib import Path

    try:
        spec = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as e:
        raise DreamBoothError(f"--bnb_quantization_config_path {path}: cannot read it as JSON ({e}); pass "
                              "--quantize_base nf4 or int8 instead") from None
    if isinstance(spec, dict) and spec.get("load_in_4bit") and spec.get("bnb_4bit_quant_type", "fp4") == "nf4":
        return "nf4"
    if isinstance(spec, dict) and spec.get("load_in_8bit"):
        return "int8"
    raise DreamBoothError(f"--bnb_quantization_config_path {path}: only 4-bit nf4 or 8-bit is supported "
                          "(load_in_4bit with bnb_4bit_quant_type \"nf4\", or load_in_8bit); or pass --quantize_base")


def _run_train(args: argparse.Namespace) -> int:
    values = values_of(args)
    for name, why in COMPAT_IGNORED.items():
        if values.pop(name, None):
            log.info("--%s: accepted; %s", name, why)
    values.pop("local_rank", None)
    if isinstance(values.get("optimizer"), str):  # the reference scripts read "AdamW" / "adamW" as adamw
        values["optimizer"] = values["optimizer"].lower()
    for name, fix in COMPAT_REFUSED.items():
        if values.pop(name, None):
            raise DreamBoothError(f"--{name} is not supported: {fix}")
    bnb = values.pop("bnb_quantization_config_path", None)
    if bnb is not None:
        values["quantize_base"] = quantization_of(bnb)
    for name, ours in (("lora_layers", "lora_target_modules"), ("lora_blocks", "lora_blocks")):
        given = values.pop(name, None)
        if given is not None:  # the SD3/Flux scripts' comma lists ("12,13"); ours are space-separated
            items = given if isinstance(given, list) else [given]
            values[ours] = [v.strip() for item in items for v in str(item).split(",") if v.strip()]
    from .sampling import LEGACY_NAMES
    if values.get("validation_sampler") in LEGACY_NAMES:
        values["validation_sampler"] = LEGACY_NAMES[values["validation_sampler"]]
    from .training import train

    summary = train(values)
    if summary and _is_main():
        out = values.get("output_dir", "dreambooth-model")
        print(f"done: {summary['steps']} steps, mean loss {summary['mean_loss']:.4f}, pipeline in {out}")
    if summary and summary.get("processes", 1) > 1:  # everything is written: no torch teardown may hang the exit
        logging.shutdown()  # (gloo's process-group destructor can deadlock once the other processes are gone)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from .generation import generate

    paths = generate(values_of(args))
    print(f"wrote {len(paths) - 1} image(s) and {paths[-1]}")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate
    from .evaluation.evaluate import summary_lines

    report = evaluate(values_of(args))
    print("\n".join(summary_lines(report)))
    print(f"report: {report['settings']['output_dir']}/report.md")
    return 0


def _run_evaluate_summary(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluation.evaluate import summary_lines
    from .evaluation.report import combine, read_report, summary_target, write_summary

    target = summary_target(args.output, args.reports) if args.output else None  # refused before any work
    reports = {str(name): read_report(Path(name)) for name in args.reports}
    summary = combine(reports)
    for label, values in summary["per_report"].items():
        print(f"{label}: " + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))
    print(f"pooled over {summary['subjects']} report(s):")
    print("\n".join(summary_lines(summary)))
    if target is not None:
        print(f"wrote {write_summary(summary, target)}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from .export import export

    print(f"wrote {export(values_of(args))}")
    return 0


def _run_identifier(args: argparse.Namespace) -> int:
    from . import identifier as ident
    from .errors import ConfigError
    from .families import ModelSource, get_family

    cfg = schema.build(ident.IdentifierConfig, values_of(args))
    if cfg.check and cfg.count > 1:
        raise ConfigError("count", cfg.count, "--check checks one identifier; leave --count at 1, or drop --check "
                          "to get a set")
    source = ModelSource(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant)
    family = get_family(source)
    tokenizer, text_encoder = family.load_text(source)
    text_encoder.eval()
    unknown = ident.unknown_word(tokenizer, cfg.class_noun) if cfg.class_noun else None
    if unknown:
        print(f"dreambooth identifier: warning: {unknown}", file=sys.stderr)
    if cfg.check:
        report = ident.check(tokenizer, text_encoder, cfg.check, cfg.class_noun)
        print(f"{cfg.check!r}: {len(report.pieces)} token(s) [{' + '.join(report.pieces)}]", end="")
        if report.shift is not None:
            print(f", prior shift {report.shift:.4f} (weaker than {1 - report.percentile:.0%} of rare candidates)"
                  if report.percentile is not None else f", prior shift {report.shift:.4f}", end="")
        print()
        for problem in report.problems:
            print(f"warning: {problem}")
        return 1 if report.problems else 0
    if cfg.count > 1:  # every tokenizer (T5's too) forbids overlaps; only the primary text encoder is loaded
        tokenizers = ident.load_tokenizers(family, source)
        tokenizers = {**tokenizers, next(iter(tokenizers), "text_encoder"): tokenizer}  # the one it measures with
        chosen = ident.distinct_identifiers(tokenizers, text_encoder, cfg.class_noun, cfg.count)
        order = (f"prior shift for 'a <token> {cfg.class_noun}' (lower = weaker prior = better)" if cfg.class_noun
                 else "(rarest first; pass --class_noun to rank by measured prior)")
        print(f"token   id      {order}; no two share a token piece ({', '.join(tokenizers)}) nor their first "
              "two letters")
        for c in chosen:
            print(f"{c.token:<7} {c.token_id:<7} {c.shift:.4f}" if c.shift is not None else
                  f"{c.token:<7} {c.token_id}")
        return 0
    if cfg.class_noun is None:
        found = ident.candidates(tokenizer)[: cfg.top]
        print("token   id      (rarest first; pass --class_noun to rank by measured prior)")
        for c in found:
            print(f"{c.token:<7} {c.token_id}")
        return 0
    ranked = ident.rank(tokenizer, text_encoder, cfg.class_noun, top=cfg.top)
    print(f"token   id      prior shift for 'a <token> {cfg.class_noun}' (lower = weaker prior = better)")
    for c in ranked:
        print(f"{c.token:<7} {c.token_id:<7} {c.shift:.4f}")
    return 0


def _run_ui(args: argparse.Namespace) -> int:
    from .ui.server import UIConfig, serve

    cfg = schema.build(UIConfig, values_of(args))
    try:
        serve(cfg)
    except OSError as e:
        raise DreamBoothError(f"cannot serve on {cfg.host}:{cfg.port} ({e.strerror or e}); pick another --port or "
                              "--host") from None
    except KeyboardInterrupt:
        print("dreambooth ui: stopped (runs started from the page go on in their own processes)", file=sys.stderr)
    return 0


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help, its description, the builder of its flags (run only for the command being
    run: each imports its config, some of them torch, so `dreambooth --help` imports none of them) and extra
    `add_parser` arguments."""

    name: str
    short: str
    description: str
    build: Callable[[argparse.ArgumentParser], None]
    extra: dict[str, Any] = field(default_factory=dict)


# the subcommands, by name; plug-ins add theirs (the toy world: demo, reproduce, toy), loaded when first read
COMMANDS: Registry[Command] = Registry("command", plugins="dreambooth.commands")
command = COMMANDS.register()
for _entry in (
    Command("train", "DreamBooth fine-tuning", "Fine-tune a model on a subject.", _add_train_parser,
            dict(formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS)),
    Command("generate", "Render prompts from a trained model",
            "Render prompts from a trained output, a checkpoint, or any SD pipeline folder.", _add_generate_parser),
    Command("evaluate", "Score a model with the paper's metrics on the DreamBench prompts",
            "Sample the DreamBench prompts (or the toy protocol) with fixed seeds, score DINO, CLIP-I, CLIP-T, PRES "
            "and DIV with bootstrap intervals, and write report.json, report.md and a grid per prompt.",
            _add_evaluate_parser),
    Command("evaluate-summary", "Pool several evaluation reports (e.g. all DreamBench subjects)",
            "Pool the per-image scores of several report.json files of one backend into one figure per metric with "
            "a bootstrap 95%% interval, and list each subject's values.", _add_evaluate_summary_parser),
    Command("export", "Write a run's result for other tools (kohya LoRA, merged pipeline)",
            "Export a LoRA run to the kohya/AUTOMATIC1111 format, or fuse it into the base model as a full "
            "pipeline.", _add_export_parser),
    Command("identifier", "Find or check a rare-token identifier",
            "List rare tokens that are no word the model knows, ranked by how weak their prior is for a class noun, "
            "or check a chosen identifier.", _add_identifier_parser),
    Command("ui", "The DreamBooth flow in a browser (a local web page)",
            "Serve a page on 127.0.0.1: upload photos, pick an identifier, train (each run in its own process), "
            "watch progress, render a gallery, evaluate, export.", _add_ui_parser),
):
    command(_entry)


def parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line; with `argv`, only the command it names gets its flags (all of them without)."""
    p = Parser(prog="dreambooth", description="DreamBooth: subject-driven fine-tuning of text-to-image diffusion "
               "models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    _chosen.clear()
    for name, cmd in COMMANDS.items():
        made = sub.add_parser(name, help=cmd.short, description=cmd.description, **cmd.extra)
        if argv is None or name == wanted:
            cmd.build(made)
            _chosen.append(made)
    return p


def _reference_flags(argv: list[str]) -> list[str]:
    """The SD3 script's `--precondition_outputs=0|1` (an int there, an on/off flag here)."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--precondition_outputs=") else (
            argv[i + 1] if arg == "--precondition_outputs" and i + 1 < len(argv) and argv[i + 1] in ("0", "1")
            else None)
        if i > 0 and argv[i - 1] == "--precondition_outputs" and arg in ("0", "1"):
            continue
        out.append(arg if value is None else "--precondition_outputs" if value == "1" else
                   "--no-precondition_outputs")
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO if _is_main() else logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    argv = _reference_flags(sys.argv[1:] if argv is None else argv)
    args = parser(argv).parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except Stopped as e:
        _close_progress_bars()
        say(f"dreambooth {args.command}: {e}")
        return STOPPED_EXIT
    except DreamBoothError as e:
        _close_progress_bars()
        say(f"dreambooth {args.command}: error: {e}")
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        say(f"dreambooth {args.command}: interrupted; completed checkpoints are kept")
        return 130


def _close_progress_bars() -> None:
    """A bar left open by a failed step would share its line with the error message."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
