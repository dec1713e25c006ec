from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any cuBLAS handle: `gpu` tests use --deterministic
# a module the run parks in host memory (cached text encoders) refuses to run: on a GPU such a call would mix devices
os.environ["DREAMBOOTH_GUARD_PARKED"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: 2 workers x 2 threads thrash 2 cores
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

from tiny import TINY, make_images, make_tiny_sd, make_tiny_sdxl  # noqa: E402

T5_TOKENS = 16  # --max_sequence_length for the families with T5: short, for speed


# No test may hang the suite: one that runs past this is ended, every thread's stack written first (its worker
# exits; xdist reports the test as crashed and goes on, and the stacks are printed at the end of the run). The
# longest tests take about 5 minutes on a loaded 2-core machine (two 2-process runs), each of their waits bounded
# well below this. DREAMBOOTH_TEST_HANG_S changes it.
HANG_LIMIT_S = float(os.environ.get("DREAMBOOTH_TEST_HANG_S", 900))


def _hang_file(session_pid: int, worker: str) -> Path:
    return Path(tempfile.gettempdir()) / f"dreambooth-test-hang-{session_pid}-{worker}.txt"


@pytest.fixture(autouse=True)
def _hang_guard(request):
    """Stderr is captured while a test runs (and an xdist worker's is never shown): the stacks go to a file, which
    the main process prints (under -n; without it, the file stays: $TMPDIR/dreambooth-test-hang-<pid>-main.txt)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    path = _hang_file(os.getppid() if worker else os.getpid(), worker or "main")
    slow = request.node.get_closest_marker("hang_limit")  # a test that trains a whole recipe: its own bound
    limit = max(HANG_LIMIT_S, slow.args[0]) if slow else HANG_LIMIT_S
    with path.open("w") as stacks:
        stacks.write(f"{request.node.nodeid} ran past {limit:.0f} s; its process's threads:\n")
        stacks.flush()
        faulthandler.dump_traceback_later(limit, exit=True, file=stacks)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()
    path.unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter):
    """The stacks of a test that hung (written by its worker before it exited)."""
    for path in sorted(Path(tempfile.gettempdir()).glob(f"dreambooth-test-hang-{os.getpid()}-*.txt")):
        terminalreporter.write_sep("=", f"a test hung: {path.name}")
        terminalreporter.write_line(path.read_text(errors="replace"))
        path.unlink(missing_ok=True)


def run_bounded(cmd: list[str], timeout: float, env: dict | None = None,
                check: bool = False) -> subprocess.CompletedProcess:
    """`cmd` with its output captured: when it ends or its `timeout` passes, nothing it started is left. Its
    processes are found by a mark in their environment, which every child inherits: a launcher's workers start
    sessions of their own (torch.distributed.run does), outlive a kill of its group and hold its pipes, so that
    `subprocess.run` would wait for them forever. A leftover process, a timeout or (with `check`) a failure fails
    the test with the end of the output."""
    mark = f"{os.getpid()}-{uuid.uuid4().hex}"
    env = {**(os.environ if env is None else env), "DREAMBOOTH_TEST_RUN": mark}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        leftover = marked_processes(mark)
        for pid in leftover:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if timed_out or proc.returncode is None:
            out, err = proc.communicate(timeout=60)  # every writer of its pipes is dead: they close
    assert not timed_out, f"{' '.join(cmd[:6])} ... ran past {timeout} s:\n{err[-3000:]}"
    assert not leftover, f"processes of the run were still alive after it ended: {leftover}"
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        assert result.returncode == 0, err[-3000:]
    return result


def end_page(server) -> None:
    """Shut a test's UI server down and end every process its page started (each runs in a session of its own, so
    a failed test would otherwise leave its run training)."""
    server.shutdown()
    server.server_close()
    for job in list(server.RequestHandlerClass.app.ws.jobs.values()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(job.pid, signal.SIGKILL)
        if job.proc is not None:
            job.proc.wait(timeout=60)


def marked_processes(mark: str) -> list[int]:
    """The live (not zombie) processes whose environment holds DREAMBOOTH_TEST_RUN=`mark`."""
    found, needle = [], f"DREAMBOOTH_TEST_RUN={mark}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0") and \
                    (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(environ.parent.name))
        except (OSError, IndexError):
            continue
    return found


# The longest tests on the 2-core CPU (seconds: `--durations` of the whole suite at 2 workers), each worker's first:
# `make test`'s `--dist worksteal` gives worker 0 the first half of the collection and worker 1 the second, and a worker
# that runs out takes tests from the end of the other's queue, so a long test collected late ran alone at the end
# while the other worker idled. Two groups of about equal time head the two halves; whole modules move where they
# share a module fixture.
LONG_FIRST = (
    ("test_ui_browser.py::test_the_default_path_trains_a_subject_that_shows[sd]",  # 163 s
     "test_ui_server.py::test_a_run_from_the_page_stops_at_a_checkpoint_and_resumes_to_the_end",  # 70 s
     "test_process_failures.py"),  # 190 s with its module fixture
    ("test_ui_browser.py::test_the_default_path_trains_a_subject_that_shows[sd3]",  # 104 s
     "test_ablations.py::test_quick_run_reproduces_the_prior_preservation_direction",  # 60-120 s
     "test_sharding.py", "test_distributed.py"),  # 100 and 70 s
)


def pytest_collection_modifyitems(config, items):
    """The long tests first in each worker's half (LONG_FIRST; the rest as collected); `gpu` tests need CUDA:
    skipped, with the reason, where there is none (CI, the 2-core CPU machine)."""
    import torch

    def place(item) -> tuple[int, int] | None:  # (group, the prefix's place in it)
        path = item.nodeid.split("/")[-1]
        return next(((g, i) for g, prefixes in enumerate(LONG_FIRST) for i, prefix in enumerate(prefixes)
                     if path.startswith(prefix)), None)

    def group(item) -> int | None:
        return None if place(item) is None else place(item)[0]

    first, second = (sorted((it for it in items if group(it) == g), key=place) for g in (0, 1))
    rest = [it for it in items if group(it) is None]
    k = max(0, len(items) // 2 - len(first))  # the first half: the first group, then the rest's start
    items[:] = first + rest[:k] + second + rest[k:]

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run the suite on a GPU machine; see README, Development)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return make_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_model_v(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction")


@pytest.fixture
def instance_dir(tmp_path) -> Path:
    return make_images(tmp_path / "instance", n=4)


@pytest.fixture
def base_args(tiny_model, instance_dir, tmp_path):
    """A small, fast run: returns a dict of TrainConfig values (prior preservation on)."""

    def make(**changes):
        args = dict(
            pretrained_model_name_or_path=str(tiny_model), instance_data_dir=str(instance_dir),
            instance_prompt="a photo of zwx dog", class_prompt="a photo of dog", with_prior_preservation=True,
            class_data_dir=str(tmp_path / "class"), num_class_images=4, class_inference_steps=2,
            sample_batch_size=4, output_dir=str(tmp_path / "out"), resolution=64, train_batch_size=2,
            max_train_steps=4, learning_rate=1e-3, seed=0, checkpointing_steps=1000,
            device="cpu",  # CPU behaviour (exactness, tolerances) is what these tests assert, also where CUDA exists
        )
        args.update(changes)
        return {k: v for k, v in args.items() if v is not None}

    return make


def to_argv(args: dict) -> list[str]:
    argv = []
    for key, value in args.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False:
            argv += [f"--{key}", str(value)]
    return argv


# every registered family (test_plugins checks TINY covers them); built once per process: the tests only read it
@pytest.fixture(scope="session", params=list(TINY))
def tiny(request, tmp_path_factory):
    """(family name, its tiny pipeline folder), for every registered family (test_families checks the list)."""
    return request.param, TINY[request.param](tmp_path_factory.mktemp("models") / request.param)


@pytest.fixture
def family_args(base_args, tiny):
    from dreambooth.families import FAMILIES

    family, model = tiny
    extra = {"max_sequence_length": T5_TOKENS} if "max_sequence_length" in FAMILIES[family].options else {}
    return lambda **changes: base_args(**{"pretrained_model_name_or_path": str(model), **extra, **changes})
