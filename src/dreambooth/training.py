"""`dreambooth train`: setup -> build -> fit -> finish. The loop in `fit` reads top to bottom."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import schema
from .config import TrainConfig
from .data import StepBatchSampler, collate
from .devices import reduced_dtype, to_device
from .ema import EMA_FOLDER
from .errors import DreamBoothError, Stopped, first_line, is_out_of_memory
from .evaluation import evaluate
from .evaluation.evaluate import for_training
from .events import eta_seconds, progress_bar, trackers
from .files import write_text_atomic
from .loss import dreambooth_loss, loss_mask
from .noising import sample_latents
from .objectives import Keys
from .optimizer import trainable
from .parts import Parts, build, trained_modules
from .processes import PeerFailed, distributed_error, keep_till_exit
from .quiet import quiet_libraries
from .recipes import under_recipe
from .run import CONFIG_FILE, SUMMARY_FILE, Run, Signalled, determinism, identity, setup
from .sharding import clip_mixed
from .validation import render_validation

log = logging.getLogger("dreambooth")


def train(config: TrainConfig | dict | str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Fine-tune a text-to-image model on a subject with DreamBooth.

    Args:
        config: a TrainConfig, a dict of its fields, or the path of a TOML/YAML/JSON config file.
        **overrides: TrainConfig fields, applied on top of `config`.

    Returns:
        The run summary that is also written to `output_dir/run_summary.json`.
    """
    values = {**schema.values_of(config, TrainConfig), **overrides}
    if not isinstance(config, TrainConfig):  # a built config has every option set: nothing is left to a recipe
        values = under_recipe(values)
    cfg = schema.build(TrainConfig, values)
    quiet_libraries()
    with determinism(cfg.deterministic):
        run = setup(cfg)  # run.cfg: this config with what the run works out (family defaults, the seed)
        # the folder locked till the end; errors say what's kept; SIGTERM in the loop stops at a checkpoint
        with run.output, run.stop, reported(run), memory_errors(run.cfg, run.kept), peer_errors(run):
            # a bad evaluation setting fails before any model loads (at the training resolution, now known)
            evaluation = for_training(run.cfg) if cfg.eval else None
            parts = build(run)
            try:
                fit(run, parts)
                summary = finish(run, parts)
            except BaseException as e:  # Ctrl-C, or another process died: out now; a checkpoint being written
                if ends_now(e, run):  # is dropped (it may lack a part), earlier ones stay
                    parts.checkpoints.cancel()
                raise
            finally:  # a checkpoint being written is completed; a process group of one that --fsdp started ends
                for step, path in parts.checkpoints.close():
                    run.events.emit("checkpoint", step=step, path=str(path))
                if parts.sharding is not None:
                    parts.sharding.close()
            if run.accelerator.num_processes > 1:
                keep_till_exit(parts)
            del parts
            if evaluation is not None and run.accelerator.is_main_process:
                summary["evaluation"] = evaluate(evaluation)["metrics"]
                write_text_atomic(Path(cfg.output_dir) / SUMMARY_FILE, json.dumps(summary, indent=2))
            run.events.emit("finish", step=summary["steps"], summary=summary)  # after the evaluation, if any
    return summary


@contextmanager
def reported(run: Run) -> Iterator[None]:
    """A run that stops on an error (or Ctrl-C) says so in its event stream, in the line the user sees."""
    try:
        yield
    except Stopped:  # not an error: the stream says "stopped" (the loop's stop said it with its checkpoint)
        if "stopped" not in run.events.latest:
            run.events.emit("stopped", step=None, path=None)
        raise
    except BaseException as e:
        message = str(e) if isinstance(e, DreamBoothError) else first_line(e, 300) or type(e).__name__
        try:
            run.events.emit("error", message=message, error=type(e).__name__, kept=run.kept())
        except Exception as secondary:  # the run's own error is the one to raise
            log.warning("the error could not be recorded in the event stream: %s", first_line(secondary, 160))
        raise
    finally:
        run.events.close()


def ends_now(error: BaseException, run: Run) -> bool:
    """Whether the run ends without completing what it was writing: Ctrl-C, or another process gone."""
    if isinstance(error, Signalled):
        error = error.error
    return isinstance(error, KeyboardInterrupt | PeerFailed) or (
        isinstance(error, Exception) and distributed_error(error, run.peers, run.cfg.ddp_timeout) is not None)


@contextmanager
def peer_errors(run: Run) -> Iterator[None]:
    """The error a SIGTERM carried (a stop before training, another process gone), and a collective that failed
    because another process died or stopped answering: the one line that says so."""
    try:
        yield
    except Signalled as e:
        raise e.error from None
    except Exception as e:
        error = None if isinstance(e, DreamBoothError) else distributed_error(e, run.peers, run.cfg.ddp_timeout)
        if error is None:
            raise
        raise error from None


@contextmanager
def memory_errors(cfg: TrainConfig, kept: Callable[[], str]) -> Iterator[None]:
    """Running out of GPU or CPU memory is a setting to change, not a crash: one line with the usual remedies."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        first = first_line(e, 160)
        raise DreamBoothError(
            f"out of memory ({first}) at --resolution {cfg.resolution}, --train_batch_size {cfg.train_batch_size}; "
            f"lower them, or add --gradient_checkpointing, --use_lora or --mixed_precision bf16; {kept()}") from None


def conditioning(run: Run, parts: Parts, prompt_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The prompt conditioning of each example of a batch, from its prompt id (instance, class, caption)."""
    if parts.cond is not None:
        table, index = parts.cond, prompt_ids
    else:  # trained text encoder: encode with gradients, each prompt of the batch once
        used, index = torch.unique(prompt_ids, return_inverse=True)
        table = run.family.encode(parts.components, {k: v[used] for k, v in parts.input_ids.items()}, run.cfg,
                                  parts.text_encoders)
    return {k: v[to_device(index, v.device)] for k, v in table.items()}



def fit(run: Run, parts: Parts) -> None:
    cfg, acc, c = run.cfg, run.accelerator, parts.components
    accum, start = cfg.gradient_accumulation_steps, parts.state["step"]
    sampler = StepBatchSampler(cfg.train_batch_size, acc.process_index, acc.num_processes,
                               start * accum, parts.max_train_steps * accum)
    if parts.latents.enabled and cfg.dataloader_num_workers == 0:
        parts.dataset.cached = parts.latents.store  # a cached view needs no pixels: none are decoded or resized
    loader = DataLoader(parts.dataset, batch_sampler=sampler, collate_fn=collate,
                        num_workers=cfg.dataloader_num_workers, pin_memory=acc.device.type == "cuda",
                        persistent_workers=cfg.dataloader_num_workers > 0)
    trained = list(trained_modules(run, parts.denoiser, parts.text_encoders).values())
    params = [p for m in trained for p in trainable(m)]
    acc.init_trackers("dreambooth", config={k: v for k, v in schema.to_dict(cfg).items()
                                            if isinstance(v, int | float | str | bool)})
    # moved every step (the losses follow each --logging_steps); the ETA from the pace since this run began, not a
    # moving average that a checkpoint or a validation step throws off by hours
    bar = tqdm(total=parts.max_train_steps, initial=start, desc="train", unit="step", smoothing=0,
               disable=not acc.is_local_main_process)
    run.events.add(progress_bar(bar), replay=False)
    run.events.add(trackers(acc), replay=False)
    run.events.emit("start", step=start, max_train_steps=parts.max_train_steps, family=run.family.name,
                    use_lora=cfg.use_lora, processes=acc.num_processes, output_dir=str(cfg.output_dir),
                    resumed_from=str(run.resume_from) if run.resume_from else None)
    window = torch.zeros(3, device=acc.device)  # loss, instance, prior summed over one optimizer step
    pending: list[tuple[int, torch.Tensor, float]] = []  # (step, window, lr) not yet read back from the device
    run.stop.listen()

    for batch in loader:
        with acc.accumulate(*trained):
            # latents, every draw keyed by example position
            keys = Keys(cfg.seed, batch["positions"], batch["is_prior"])
            with torch.no_grad():
                mean, std = parts.latents.moments(batch["pixel_values"], batch["views"])
                latents = mean if run.family.latent_mode else sample_latents(mean, std, keys.seed, keys.positions,
                                                                             keys.is_prior)
                latents = run.family.normalize_latents(c, latents).float()

            # the family's objective: noise, denoise and score each example (class examples against the frozen
            # base model's prediction with --prior_target base_model)
            cond = conditioning(run, parts, batch["prompt_ids"])
            denoise = run.family.denoiser_call(c, parts.denoiser, cond, batch, cfg)
            base = None if parts.base is None else parts.base.denoise(
                run.family, c, acc.unwrap_model(parts.denoiser), batch, keys.is_prior, cfg, acc.autocast)
            mask = loss_mask(batch, latents, cfg.mask_background_weight)
            per_example = parts.objective.losses(denoise, latents, keys, base, mask)
            loss = dreambooth_loss(per_example, keys.is_prior, cfg.prior_loss_weight)

            # update
            acc.backward(loss.loss)
            if acc.sync_gradients:
                if parts.sharding is None:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                else:
                    clip_mixed(params, cfg.max_grad_norm)
            parts.optimizer.step()
            parts.optimizer.zero_grad(set_to_none=True)
            window += torch.stack([loss.loss.detach(), loss.instance.detach(), loss.prior.detach()]) / accum

        if not acc.sync_gradients:
            continue
        if not acc.optimizer_step_was_skipped:
            parts.lr_scheduler.step()
            if parts.ema is not None:
                parts.ema.step()
        step = parts.state["step"] = parts.state["step"] + 1
        bar.update(step - bar.n)
        pending.append((step, window, parts.lr_scheduler.get_last_lr()[0]))
        window = torch.zeros(3, device=acc.device)
        checkpoint = step % cfg.checkpointing_steps == 0
        validation = bool(cfg.validation_prompt) and step % parts.validation_every == 0
        reporting = checkpoint or validation or step % cfg.logging_steps == 0 or step == parts.max_train_steps
        if reporting:
            report_losses(run, parts, pending)  # the loop's one wait on the device

        saved = None
        if checkpoint:  # the previous save complete and announced before the next one may rotate it away
            checkpointed(run, parts, wait=True)
            saved = save(run, parts, step)  # written on while the next steps train
        checkpointed(run, parts)
        if validation:
            with full_denoiser(run, parts) as denoiser:
                validate(run, parts, step, denoiser)
        if step < parts.max_train_steps and run.stop.agreed(acc, reporting):
            report_losses(run, parts, pending)
            saved = saved or save(run, parts, step)
            checkpointed(run, parts, wait=True)
            stop(run, step, saved, bar)
    run.stop.close()
    report_losses(run, parts, pending)
    checkpointed(run, parts, wait=True)
    bar.close()


def checkpointed(run: Run, parts: Parts, wait: bool = False) -> None:
    """A "checkpoint" event for each checkpoint completed since the last look (`wait`: once the one being written
    is complete too); a background save that failed raises here."""
    if wait:
        parts.checkpoints.wait()
    for step, path in parts.checkpoints.collect():
        run.events.emit("checkpoint", step=step, path=str(path))


@contextmanager
def full_denoiser(run: Run, parts: Parts) -> Iterator[torch.nn.Module | None]:
    """The denoiser with all its weights, for saving and rendering: itself, or under --fsdp its weights gathered
    onto the main process (None on the others). Every process enters: a gather is collective."""
    if parts.sharding is None:
        yield run.accelerator.unwrap_model(parts.denoiser)
        return
    with parts.sharding.gathered(run.accelerator.is_main_process) as denoiser:
        yield denoiser


def validate(run: Run, parts: Parts, step: int, denoiser: torch.nn.Module | None) -> None:
    """A validation grid from the main process (with the EMA weights under --validate_with_ema)."""
    if not run.accelerator.is_main_process:
        return
    if parts.sharding is not None:  # the gathered copy renders where the pipeline runs, in the compute dtype
        denoiser = denoiser.to(run.accelerator.device, parts.weight_dtype)
    run.events.emit("phase", name="rendering validation images")
    with parts.ema.applied() if run.cfg.validate_with_ema else nullcontext():
        path = render_validation(run.family, parts.components, denoiser, parts.text_encoders, run.cfg, step,
                                 run.accelerator)
    run.events.emit("validation", step=step, path=str(path), prompt=run.cfg.validation_prompt)


def stop(run: Run, step: int, checkpoint: Path, bar: tqdm) -> None:
    """End a run that was asked to stop, its checkpoint saved."""
    run.events.emit("stopped", step=step, path=str(checkpoint))
    bar.close()
    raise Stopped(f"stopped at step {step} on request; {checkpoint.name} is saved; continue with "
                  "--resume_from_checkpoint latest")


def report_losses(run: Run, parts: Parts, pending: list[tuple[int, torch.Tensor, float]]) -> None:
    """Read the pending steps' losses back from the device in one transfer (averaged over processes), add them to
    the run's sums step by step and emit a "step" event for each. Reading a loss makes the host wait for the GPU,
    so the loop does it every --logging_steps steps (and before a checkpoint or validation), not every step."""
    if not pending:
        return
    rows = run.accelerator.reduce(torch.stack([w for _, w, _ in pending]), reduction="mean").tolist()
    start, now = run.events.last("start"), time.time()
    for (step, _, lr), (loss, instance, prior) in zip(pending, rows):
        for key, value in zip(("loss_sum", "instance_sum", "prior_sum"), (loss, instance, prior)):
            parts.state[key] += value
        parts.state["last_loss"] = loss
        eta = eta_seconds(step, parts.max_train_steps, start["step"], start["time"], now)
        run.events.emit("step", step=step, max_train_steps=parts.max_train_steps, loss=loss, loss_instance=instance,
                        loss_prior=prior, lr=lr, eta_s=None if eta is None else round(eta, 1))
    pending.clear()


def unwrapped(acc, modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    return {name: acc.unwrap_model(m) for name, m in modules.items()}


def save(run: Run, parts: Parts, step: int) -> Path:
    with full_denoiser(run, parts) as denoiser:
        return save_gathered(run, parts, step, denoiser)


def save_gathered(run: Run, parts: Parts, step: int, denoiser: torch.nn.Module | None) -> Path:
    acc = run.accelerator
    state = {**parts.state, "lr_scheduler": parts.lr_scheduler.state_dict(),
             "identity": identity(schema.to_dict(run.cfg)),  # resolved paths: resumable from any directory
             "family": run.family.name,
             "wall_time_s": parts.state["wall_time_s"] + time.time() - run.started}
    if acc.scaler is not None:
        state["grad_scaler"] = acc.scaler.state_dict()
    modules = trained_modules(run, denoiser, unwrapped(acc, parts.text_encoders))
    denoiser = modules.pop(run.family.denoiser_name)

    def extra(copy: Callable[[torch.Tensor], torch.Tensor]) -> list[Callable[[Path], None]]:
        lora = [run.family.lora_file(denoiser, modules or None, copy)] if run.cfg.use_lora else []  # loads alone
        return lora + ([parts.ema.files(copy)] if parts.ema is not None else [])

    modules = {run.family.denoiser_name: denoiser, **modules}
    sharded = parts.sharding is not None
    # the gathered weights are a host copy of this save's own, except in one CPU process (the gather then hands out
    # the live shards themselves)
    private = sharded and (acc.num_processes > 1 or acc.device.type != "cpu")
    return parts.checkpoints.save(Path(run.cfg.output_dir), step, modules, parts.optimizer.optimizer
                                  if hasattr(parts.optimizer, "optimizer") else parts.optimizer, state,
                                  schema.to_dict(run.cfg), acc, run.cfg.checkpoints_total_limit, extra,
                                  sharded=sharded, private=frozenset({run.family.denoiser_name} if private else ()),
                                  also_copied=tuple(parts.ema.model.shadow_params) if parts.ema else ())


def save_result(run: Run, parts: Parts, out: Path, denoiser: torch.nn.Module) -> None:
    """The trained weights as the run's result: the LoRA file, or the whole pipeline folder."""
    acc = run.accelerator
    modules = trained_modules(run, denoiser, unwrapped(acc, parts.text_encoders))
    denoiser = modules.pop(run.family.denoiser_name)
    if run.cfg.use_lora:
        run.family.save_lora(denoiser, modules or None, out)
    else:
        run.family.save(parts.components, denoiser, unwrapped(acc, parts.text_encoders), out,
                        reduced_dtype(run.cfg.save_precision))  # fp32: each module as the base and training left it


def finish(run: Run, parts: Parts) -> dict[str, Any]:
    """Save the pipeline, a final validation grid and the run summary."""
    cfg, acc = run.cfg, run.accelerator
    # the others' part ends after this barrier (with --fsdp, after the gather below): they leave while the main
    # process saves and renders, so no collective waits on that (a slow disk is not a dead process). Each stops
    # watching the others first: they end, as they should (one that dies in the barrier or the gather fails it)
    if run.peers is not None:
        run.peers.close()
    acc.wait_for_everyone()
    run.events.emit("phase", name="saving the result")
    steps = parts.state["step"]
    summary: dict[str, Any] = {
        "steps": steps,
        "final_loss": parts.state.get("last_loss"),
        "mean_loss": parts.state["loss_sum"] / steps if steps else None,
        "mean_instance_loss": parts.state["instance_sum"] / steps if steps else None,
        "mean_prior_loss": parts.state["prior_sum"] / steps if cfg.with_prior_preservation and steps else None,
        # all invocations that led to this result (a resumed run adds those up to its checkpoint), and this one
        "wall_time_s": round(parts.state["wall_time_s"] + time.time() - run.started, 2),
        "wall_time_this_invocation_s": round(time.time() - run.started, 2),
        "processes": acc.num_processes,
        "learning_rate": cfg.learning_rate,
        "seed": cfg.seed,
        "family": run.family.name,
        "num_instance_images": len(run.instance.images),
        **({"subjects": [{"identifier": s.identifier, "instance_data_dir": str(s.folder),
                          "images": run.subject_of.count(k)} for k, s in enumerate(run.subjects)]}
           if len(run.subjects) > 1 else {}),
        "resumed_from": str(run.resume_from) if run.resume_from else None,
        "latent_cache": parts.latents.stats(),
    }
    if cfg.with_prior_preservation:
        summary["prior_target"] = cfg.prior_target
    if parts.ema is not None:
        summary["ema"] = {"folder": EMA_FOLDER, "last_decay": round(parts.ema.decay, 6)}
    if parts.class_images is not None:
        ci = parts.class_images
        summary["class_images"] = {"used": len(ci.paths), "user": ci.user, "reused": ci.reused,
                                   "generated": ci.generated}
    with full_denoiser(run, parts) as denoiser:
        if acc.is_main_process:
            out = Path(cfg.output_dir)
            if parts.ema is None and (out / EMA_FOLDER).is_dir():  # resumed without --use_ema: an earlier
                log.warning("%s is removed: it averaged an earlier invocation's weights, not this result's",
                            out / EMA_FOLDER)  # invocation's average would stand beside a result it is not of
                shutil.rmtree(out / EMA_FOLDER)
            save_result(run, parts, out, denoiser)
            if parts.ema is not None:  # the averaged weights beside the raw ones, in the same format
                with parts.ema.applied():
                    save_result(run, parts, out / EMA_FOLDER, denoiser)
                # what generate/evaluate read from a trained output (identifier, T5 length), for the EMA folder too
                write_text_atomic(out / EMA_FOLDER / CONFIG_FILE, json.dumps(schema.to_dict(cfg), indent=2))
        if cfg.validation_prompt and steps % parts.validation_every != 0:
            validate(run, parts, steps, denoiser)
    if acc.is_main_process:
        write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2))  # last: marks the run finished
        log.info("saved the fine-tuned pipeline to %s (%d steps at learning rate %g, mean loss %s)", out, steps,
                 cfg.learning_rate,
                 f"{summary['mean_loss']:.4f}" if summary["mean_loss"] is not None else "n/a")
    acc.end_training()
    return summary
