"""`python tests/hooked_run.py train ...`, launched by torch.distributed.run: the `dreambooth` CLI with one test hook
in the processes that DREAMBOOTH_TEST_HOOK names, so that a test can make a process arrive late, or die at a chosen
phase, deterministically rather than by timing:

    late                    every process but the main one plans its class images only once the folder holds one
                            (so it would see what the main process has already written, if it planned for itself)
    kill:<phase>:<rank>     process <rank> kills itself (SIGKILL) on entering <phase>, one of PHASES (training:
                            at step KILL_AT_STEP; checkpoint: mid-way through its part of the second checkpoint;
                            launcher: it kills the launcher instead, at step KILL_AT_STEP)
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from dreambooth import checkpoint, prior, training
from dreambooth.cli import main

RANK = int(os.environ.get("RANK", "0"))
KILL_AT_STEP = 5  # "training", "launcher": the step whose losses are reported (checkpoint-2 is complete by then)


def die(*_, **__) -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def late() -> None:
    plan = prior.plan

    def after_the_main_process_wrote(folder: Path, *args, **kwargs):
        deadline = time.monotonic() + 120
        while not any(folder.glob("class-*.png")) and time.monotonic() < deadline:
            time.sleep(0.05)
        return plan(folder, *args, **kwargs)

    if RANK != 0:
        prior.plan = after_the_main_process_wrote


def training_step(run, parts, pending):
    if pending and pending[-1][0] >= KILL_AT_STEP:
        die()
    return REPORT(run, parts, pending)


def checkpoint_write(tmp, final, *args, **kwargs):
    if final.name == FIRST_CHECKPOINT:  # the first one is written: a complete checkpoint stays to resume from
        return WRITE(tmp, final, *args, **kwargs)
    (tmp / f"rng-{RANK}.partial").write_text("a file of this process's part, then it dies")
    die()


def kill_launcher(run, parts, pending):
    if pending and pending[-1][0] >= KILL_AT_STEP:
        os.kill(os.getppid(), signal.SIGKILL)  # the processes it started live on, orphaned
        time.sleep(60)  # (then ended by the other process's and this one's watch of the launcher)
    return REPORT(run, parts, pending)


REPORT, WRITE = training.report_losses, checkpoint._write
FIRST_CHECKPOINT = "checkpoint-2"
PHASES = {  # module, function replaced, replacement
    "class_images": (prior, "_sample", die),
    "training": (training, "report_losses", training_step),
    "checkpoint": (checkpoint, "_write", checkpoint_write),  # on the background thread, mid-way through its files
    "validation": (training, "validate", die),
    "final_save": (training, "save_result", die),
    "launcher": (training, "report_losses", kill_launcher),  # the launcher killed, its processes orphaned
}


def install(hook: str) -> None:
    if hook == "late":
        late()
    elif hook.startswith("kill:"):
        _, phase, rank = hook.split(":")
        if int(rank) == RANK:
            module, name, replacement = PHASES[phase]
            setattr(module, name, replacement)
    elif hook:
        raise SystemExit(f"unknown DREAMBOOTH_TEST_HOOK {hook!r}")


if __name__ == "__main__":
    install(os.environ.get("DREAMBOOTH_TEST_HOOK", ""))
    sys.exit(main())
