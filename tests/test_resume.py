import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dreambooth
import dreambooth.training as training
from conftest import to_argv
from dreambooth.checkpoint import find_checkpoint, list_checkpoints
from dreambooth.cli import main
from dreambooth.errors import CheckpointError
from test_training import same, weights


class Killed(Exception):
    pass


def kill_after_checkpoint(monkeypatch, at_step: int):
    """Simulate a kill right after checkpoint `at_step` is written."""
    real_save = training.save

    def save_then_die(run, parts, step):
        path = real_save(run, parts, step)
        if step == at_step:
            parts.checkpoints.wait()  # written (not only begun: a kill then would lose it)
            raise Killed
        return path

    monkeypatch.setattr(training, "save", save_then_die)


def straight_and_resumed(make_args, tmp_path, monkeypatch, at_step: int, **common) -> dict:
    """Train `straight` uninterrupted, and `stopped` killed right after checkpoint `at_step` then resumed with
    `latest`; returns the resumed run's summary."""
    dreambooth.train(**make_args(output_dir=str(tmp_path / "straight"), **common))
    stopped = make_args(output_dir=str(tmp_path / "stopped"), **common)
    kill_after_checkpoint(monkeypatch, at_step)
    with pytest.raises(Killed):
        dreambooth.train(**stopped)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path / "stopped")] == [f"checkpoint-{at_step}"]
    summary = dreambooth.train(**stopped, resume_from_checkpoint="latest")
    assert summary["resumed_from"].endswith(f"checkpoint-{at_step}")
    return summary


@pytest.mark.parametrize("extra", [
    {},
    {"train_text_encoder": True, "gradient_accumulation_steps": 2, "train_batch_size": 1, "caption_dropout": 0.5},
    {"deterministic": True},
], ids=["unet", "text-encoder+accumulation+caption-dropout", "deterministic"])
def test_resume_is_exact(base_args, tmp_path, monkeypatch, extra):
    """On one device the resumed run repeats the straight run's computations exactly (same kernels, same batches,
    latents encoded per view), so weights and optimizer state are bit-identical."""
    summary = straight_and_resumed(base_args, tmp_path, monkeypatch, 3, max_train_steps=6, checkpointing_steps=3,
                                   lr_scheduler="linear", lr_warmup_steps=2, **extra)
    assert summary["steps"] == 6

    for part in ["unet"] + (["text_encoder"] if extra.get("train_text_encoder") else []):
        assert same(weights(tmp_path / "straight", part), weights(tmp_path / "stopped", part)), part
    a = load_file(tmp_path / "straight" / "checkpoint-6" / "optimizer.safetensors")
    b = load_file(tmp_path / "stopped" / "checkpoint-6" / "optimizer.safetensors")
    assert same(a, b)
    s1 = json.loads((tmp_path / "straight" / "run_summary.json").read_text())
    # the mean loss is a float sum over steps, kept in state.json through the resume: the same additions, in order
    assert s1["mean_loss"] == summary["mean_loss"]
    assert not torch.are_deterministic_algorithms_enabled()  # --deterministic restores the process's setting


def test_checkpoint_limit_keeps_newest(base_args, tmp_path):
    dreambooth.train(**base_args(max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2))
    out = tmp_path / "out"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert (out / "latest").read_text().strip() == "checkpoint-4"
    assert not list(out.glob(".checkpoint-*"))


def test_kill_during_save_leaves_previous_checkpoint_usable(base_args, tmp_path, monkeypatch):
    args = base_args(max_train_steps=4, checkpointing_steps=2)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".checkpoint-4.tmp"):
            raise Killed  # the process dies before the new checkpoint is renamed into place
        return real_replace(src, dst)

    monkeypatch.setattr("dreambooth.checkpoint.os.replace", failing_replace)
    with pytest.raises(Killed):
        dreambooth.train(**args)
    monkeypatch.undo()
    out = tmp_path / "out"
    assert (out / ".checkpoint-4.tmp").is_dir()  # the half-written one
    assert find_checkpoint(out, "latest").name == "checkpoint-2"
    summary = dreambooth.train(**args, resume_from_checkpoint="latest")
    assert summary["steps"] == 4 and not list(out.glob(".checkpoint-*"))


def test_output_dir_of_another_run_is_refused_and_kept(base_args, tmp_path, capsys):
    args = base_args(max_train_steps=2, checkpointing_steps=1)
    dreambooth.train(**args)
    before = sorted(str(p) for p in (tmp_path / "out").rglob("*"))
    capsys.readouterr()

    assert main(["train", *to_argv(args)]) == 2  # same run, checkpoints present, no --resume_from_checkpoint
    err = capsys.readouterr().err
    assert "--resume_from_checkpoint latest" in err and "Traceback" not in err and err.count("\n") == 1

    other = base_args(max_train_steps=2, instance_prompt="a photo of qek dog")
    assert main(["train", *to_argv({**other, "resume_from_checkpoint": "latest"})]) == 2
    assert "belongs to another run" in capsys.readouterr().err
    assert sorted(str(p) for p in (tmp_path / "out").rglob("*")) == before


def test_resume_from_missing_named_checkpoint_is_one_line(base_args, tmp_path):
    dreambooth.train(**base_args(max_train_steps=2, checkpointing_steps=1))
    with pytest.raises(CheckpointError, match="checkpoint-9 is not a complete checkpoint.*checkpoint-1, checkpoint-2"):
        dreambooth.train(**base_args(max_train_steps=4, resume_from_checkpoint="checkpoint-9"))


def test_checkpoint_folder_renders_on_its_own(base_args, tmp_path):
    dreambooth.train(**base_args(max_train_steps=2, checkpointing_steps=2))
    paths = dreambooth.generate(model=str(tmp_path / "out" / "checkpoint-2"), prompt=["a zwx dog"], num_images=2,
                                num_inference_steps=2, output_dir=str(tmp_path / "samples"))
    assert [p.name for p in paths] == ["00-a-zwx-dog-000.png", "00-a-zwx-dog-001.png", "grid.png"]


def test_sigterm_stops_at_a_checkpoint_that_resumes_exactly(base_args, tmp_path, monkeypatch, capsys):
    """The UI's stop button sends SIGTERM: the run saves a checkpoint at the end of that step, says so in one line
    (exit 143) and in its event stream, and --resume_from_checkpoint latest continues it exactly."""
    import signal

    from dreambooth.events import read_events

    common = dict(max_train_steps=5, checkpointing_steps=100, logging_steps=1)
    dreambooth.train(**base_args(output_dir=str(tmp_path / "straight"), **common))
    args = base_args(output_dir=str(tmp_path / "stopped"), **common)
    real_report = training.report_losses

    def report_then_signal(run, parts, pending):
        if any(step == 2 for step, _, _ in pending):
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by the run's own handler
        real_report(run, parts, pending)

    monkeypatch.setattr(training, "report_losses", report_then_signal)
    capsys.readouterr()
    assert main(["train", *to_argv(args)]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("dreambooth train: stopped at step 2 on request; checkpoint-2 is saved; continue with "
                       "--resume_from_checkpoint latest"), err
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler lives only while the run trains
    events, _ = read_events(tmp_path / "stopped" / "events.jsonl")
    # the stop's checkpoint is announced once written (on the background thread), then the stop
    assert [e["event"] for e in events][-3:] == ["step", "checkpoint", "stopped"]
    assert events[-2]["step"] == events[-1]["step"] == 2 and events[-2]["path"].endswith("checkpoint-2")
    assert [p.name for p in list_checkpoints(tmp_path / "stopped")] == ["checkpoint-2"]
    assert not (tmp_path / "stopped" / "run_summary.json").exists()

    summary = dreambooth.train(**args, resume_from_checkpoint="latest")
    assert summary["steps"] == 5
    assert same(weights(tmp_path / "straight", "unet"), weights(tmp_path / "stopped", "unet"))


@pytest.mark.parametrize("variant", ["full", "lora", "fsdp"])
def test_a_checkpoint_written_in_the_background_is_its_step_while_the_next_steps_train(base_args, tmp_path,
                                                                                      monkeypatch, variant):
    """The loop only waits for a host copy: checkpoint-2's files are written while steps 3 and 4 train (the writer
    is held until the loop has reported step 4), and they are those the loop writes when it waits (bit for bit:
    the same tensors of the same step, serialised the same way), EMA and train_config included. --fsdp in one CPU
    process: the gathered weights are the live shards themselves there, so they are copied too."""
    import threading

    import dreambooth.checkpoint as checkpoint

    extra = {"full": dict(use_ema=True), "lora": dict(use_lora=True, rank=4, learning_rate=1e-2, use_ema=True),
             "fsdp": dict(fsdp=True)}[variant]
    common = dict(max_train_steps=5, checkpointing_steps=2, logging_steps=1, **extra)
    dreambooth.train(**base_args(output_dir=str(tmp_path / "waited"), checkpoint_in_background=False, **common))

    trained_on = threading.Event()
    real_write, real_report = checkpoint._write, training.report_losses
    steps_during_write = []

    def held_write(tmp, final, *args, **kwargs):
        if final.name == "checkpoint-2":
            assert threading.current_thread() is not threading.main_thread()
            assert trained_on.wait(60), "the loop did not go on while checkpoint-2 was being written"
            steps_during_write.append(4)
        return real_write(tmp, final, *args, **kwargs)

    def report(run, parts, pending):
        if any(step == 4 for step, _, _ in pending):
            trained_on.set()
        real_report(run, parts, pending)

    monkeypatch.setattr(checkpoint, "_write", held_write)
    monkeypatch.setattr(training, "report_losses", report)
    dreambooth.train(**base_args(output_dir=str(tmp_path / "background"), **common))
    assert steps_during_write == [4]

    for step in (2, 4):
        a, b = tmp_path / "waited" / f"checkpoint-{step}", tmp_path / "background" / f"checkpoint-{step}"
        names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
        assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
        for name in names:
            if name.endswith(".safetensors"):
                assert same(load_file(a / name), load_file(b / name)), name
        state_a, state_b = (json.loads((x / "state.json").read_text()) for x in (a, b))
        assert {k: v for k, v in state_a.items() if k != "wall_time_s"} == {
            k: v for k, v in state_b.items() if k != "wall_time_s"}
        if variant != "fsdp":
            assert json.loads((a / "ema.json").read_text()) == json.loads((b / "ema.json").read_text())
    events = [json.loads(line) for line in (tmp_path / "background" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4]


def test_a_process_that_cannot_write_its_part_fails_the_checkpoint_in_one_line(tmp_path):
    """Several processes: each writes its files and a mark; the main process completes the checkpoint once every
    mark is there, and a process whose write failed fails it (named), its temporary folder removed."""
    import dreambooth.checkpoint as checkpoint

    tmp, final = tmp_path / ".checkpoint-3.tmp", tmp_path / "checkpoint-3"
    tmp.mkdir()

    def full(folder):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        checkpoint._write(tmp, final, [full], {}, 1, 2, False, None, 5.0, 0.01)
    assert (tmp / ".rank-1.failed").is_file()
    with pytest.raises(CheckpointError, match="process 1 could not write its part of .checkpoint-3.tmp: "
                                              ".*No space left on device"):
        checkpoint._write(tmp, final, [], {"step": 3}, 0, 2, True, None, 5.0, 0.01)
    assert not tmp.exists() and not final.exists()

    tmp.mkdir()
    checkpoint._write(tmp, final, [lambda f: (f / "part-1").write_text("1")], {}, 1, 2, False, None, 5.0, 0.01)
    checkpoint._write(tmp, final, [lambda f: (f / "part-0").write_text("0")], {"step": 3}, 0, 2, True, None, 5.0,
                      0.01)
    assert sorted(p.name for p in final.iterdir()) == ["manifest.json", "part-0", "part-1", "state.json"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-3" and checkpoint.verify(final) is None


def test_ctrl_c_drops_the_checkpoint_being_written_and_nothing_is_written_after(base_args, tmp_path, monkeypatch):
    """Ctrl-C while checkpoint-4 is being written in the background: the run ends at once without completing it
    (its temporary folder removed), checkpoint-2 stays `latest`, and no file appears after `train` has let go of
    the output folder."""
    import threading
    import time

    import dreambooth.checkpoint as checkpoint

    real_write, real_report = checkpoint._write, training.report_losses
    writing = threading.Event()

    def slow_write(tmp, final, *args):
        if final.name == "checkpoint-4":
            writing.set()
            cancelled = args[-1]  # the save's cancel event: a disk slow until the interrupt comes, so it comes
            cancelled.wait(60)  # while this save is in flight, however loaded the machine (never cancelled: 60 s)
        return real_write(tmp, final, *args)

    def report(run, parts, pending):
        real_report(run, parts, pending)
        if parts.state["step"] == 5:
            assert writing.wait(30)
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_write", slow_write)
    monkeypatch.setattr(training, "report_losses", report)
    with pytest.raises(KeyboardInterrupt):
        dreambooth.train(**base_args(max_train_steps=8, checkpointing_steps=2, logging_steps=1))
    out = tmp_path / "out"
    time.sleep(1.0)  # a writer left running would finish checkpoint-4 by now
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert find_checkpoint(out, "latest").name == "checkpoint-2" and not list(out.glob(".checkpoint-*"))
    assert not (out / ".dreambooth.lock").exists()  # the run let go of its folder


def test_each_checkpoint_is_announced_while_it_exists_even_when_the_next_rotates_it_away(base_args, tmp_path,
                                                                                        monkeypatch):
    """With --checkpoints_total_limit 1 each save deletes the one before: its "checkpoint" event comes first."""
    from dreambooth.events import Events

    real_emit, seen = Events.emit, []

    def emit(self, kind, **data):
        if kind == "checkpoint":
            seen.append((data["step"], Path(data["path"]).is_dir()))
        return real_emit(self, kind, **data)

    monkeypatch.setattr(Events, "emit", emit)
    dreambooth.train(**base_args(max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=1))
    assert seen == [(1, True), (2, True), (3, True), (4, True)]


def test_a_save_too_big_for_the_free_host_memory_is_written_while_the_loop_waits(base_args, tmp_path, monkeypatch,
                                                                                 caplog):
    """The background copy needs host memory; when less than twice the checkpoint's size is available the save is
    written on the training thread instead (one warning), and the checkpoints are the same."""
    import threading
    from types import SimpleNamespace

    import psutil

    import dreambooth.checkpoint as checkpoint

    real_write, threads = checkpoint._write, []

    def write(*args, **kwargs):
        threads.append(threading.current_thread() is threading.main_thread())
        return real_write(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_write", write)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1000))
    dreambooth.train(**base_args(max_train_steps=2, checkpointing_steps=1))
    assert threads == [True, True]
    assert caplog.text.count("checkpoints are written while training waits") == 1
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-1", "checkpoint-2"]


def test_a_wait_interrupted_by_ctrl_c_keeps_the_save_pending_for_close(tmp_path):
    """Ctrl-C while waiting for a background save: the save stays pending, so `close` still waits for the thread
    (nothing written after the run lets go of its folder) and announces the save if it completed."""
    from dreambooth.checkpoint import CheckpointWriter

    class Future:
        interrupted = False

        def result(self):
            if not self.interrupted:
                self.interrupted = True
                raise KeyboardInterrupt
            (tmp_path / "checkpoint-3").mkdir()

        def done(self):
            return self.interrupted and (tmp_path / "checkpoint-3").is_dir()

    writer = CheckpointWriter(background=True)
    writer.pending = (3, tmp_path / "checkpoint-3", Future())
    with pytest.raises(KeyboardInterrupt):
        writer.wait()
    assert writer.pending is not None
    assert writer.close() == [(3, tmp_path / "checkpoint-3")] and writer.pending is None
