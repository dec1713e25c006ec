"""A process that dies (SIGKILL) at any phase of a 2-process run ends the other soon after, with one line that names
it; no process of the run is left; the newest complete checkpoint is intact and resumes bit for bit. The kill is
placed by a hook (tests/hooked_run.py), not by timing."""

from __future__ import annotations

import json
import re
import shlex
import sys

import pytest
from safetensors.torch import load_file

from conftest import run_bounded
from dreambooth.checkpoint import list_checkpoints, verify
from test_distributed import launch_two

ARGS = dict(max_train_steps=6, train_batch_size=1, num_class_images=4, sample_batch_size=1, checkpointing_steps=2,
            logging_steps=1,  # losses reported each step: the "training" kill comes at step 5, checkpoint-2 complete
            validation_prompt="a photo of zwx dog", validation_steps=4, num_validation_images=1,
            validation_inference_steps=2, ddp_timeout=60)
# (phase, the process that dies there): the main process alone renders validation and saves the result (the other
# has ended by then)
PHASES = [("class_images", 1), ("training", 1), ("checkpoint", 1), ("validation", 0), ("final_save", 0)]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    """The same 2-process run without a kill (its own folders: the module's tests share it)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    from tiny import make_images

    instance = make_images(root / "instance", n=4)
    args = _args(tiny_model, instance, root)
    launch_two(args)
    return load_file(root / "out" / "unet" / "diffusion_pytorch_model.safetensors")


def _args(model, instance, root) -> dict:
    return dict(pretrained_model_name_or_path=str(model), instance_data_dir=str(instance),
                instance_prompt="a photo of zwx dog", class_prompt="a photo of dog", with_prior_preservation=True,
                class_data_dir=str(root / "class"), class_inference_steps=2, output_dir=str(root / "out"),
                resolution=64, learning_rate=1e-3, seed=0, device="cpu", **ARGS)


def errors(stderr: str) -> list[str]:
    """The one-line errors of the processes (a line may follow another process's progress bar)."""
    return re.findall(r"dreambooth train: error: [^\n]*", stderr)


def survivor_line(stderr: str, victim: int) -> str:
    lines = errors(stderr)
    assert lines, f"no one-line error from the other process:\n{stderr[-3000:]}"
    assert f"process {victim} of 2" in lines[0], lines
    return lines[0]


@pytest.mark.parametrize(("phase", "victim"), PHASES)
def test_a_killed_process_ends_the_other(tiny_model, instance_dir, tmp_path, uninterrupted, phase, victim):
    args = _args(tiny_model, instance_dir, tmp_path)
    proc = launch_two(args, hook=f"kill:{phase}:{victim}", timeout=240, check=False)  # no leftover: launch_two
    assert proc.returncode != 0
    out = tmp_path / "out"
    assert not (out / "run_summary.json").exists()  # the run did not pass for finished
    if phase == "final_save":  # the other process's part was over: it left while the main one saved, as it should
        assert not errors(proc.stderr), errors(proc.stderr)
    else:
        line = survivor_line(proc.stderr, victim)
    if phase == "class_images":
        assert "nothing was written" in line
        return
    newest = list_checkpoints(out)[-1]  # checkpoint-2 at least (complete before any of these kills)
    if phase != "final_save":
        assert f"{newest.name} (the newest complete checkpoint) is kept" in line, line
    assert (out / "latest").read_text().strip() == newest.name and verify(newest) is None
    launch_two({**args, "resume_from_checkpoint": "latest"})
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["resumed_from"].endswith(newest.name) and summary["steps"] == 6
    resumed = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed)  # the same computation: bit for bit


def test_a_killed_launcher_ends_its_processes(tiny_model, instance_dir, tmp_path):
    """Nobody tears the run down: each process notices on its own that its launcher has gone, and ends."""
    args = _args(tiny_model, instance_dir, tmp_path)
    proc = launch_two(args, hook="kill:launcher:0", timeout=240, check=False)  # returns once every process ended
    assert proc.returncode != 0
    lines = errors(proc.stderr)
    assert len(lines) == 2 and all(re.search(r"the launcher of the run \(pid \d+\) ended", x) for x in lines), lines


def test_one_line_is_one_write_so_processes_sharing_stderr_never_interleave(tmp_path):
    """Unbuffered (python -u, as under the launchers and the page), print() writes a line and its newline apart:
    two processes' errors could become one line. say() writes each line whole."""
    script = ("import os, sys\nfrom dreambooth.errors import say\n"
              "for i in range(300): say(f'dreambooth train: error: process {sys.argv[1]} line {i} ' + 'x' * 200)\n")
    many = " ".join(f"{sys.executable} -u -c {shlex.quote(script)} {n} &" for n in range(4)) + " wait"
    proc = run_bounded(["sh", "-c", many], 120, check=True)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1200 and all(re.fullmatch(r"dreambooth train: error: process \d line \d+ x{200}", x)
                                      for x in lines), [x for x in lines if not x.endswith("x" * 200)][:3]
