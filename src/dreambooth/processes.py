"""What the processes of one run share: decisions made once by the main process, and each other's liveness.

Processes start at different moments (one loads its libraries faster, another waits for its GPU), so anything one of
them decides from the file system (which class images are missing, whether the run resumes) may differ from what
another decides a moment later, after the first has written there. Such a decision is taken by the main process
alone and broadcast; the others never look for themselves.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import DreamBoothError, first_line, say

T = TypeVar("T")


def decided_once(accelerator, decide: Callable[[], T], encode: Callable[[T], Any] = lambda v: v,
                 decode: Callable[[Any], T] = lambda v: v) -> T:
    """`decide()` on the main process; its value (or its DreamBoothError, raised in every process) for all.
    `encode`/`decode` turn the value into JSON-able data and back: only a string travels (the broadcast pickles
    it), and nothing of ours is unpickled beyond it."""
    if accelerator.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    if not accelerator.is_main_process:
        (message,) = broadcast_object_list([None])
        shared = json.loads(message)
        if "error" in shared:
            raise DreamBoothError(shared["error"])
        return decode(shared["value"])
    try:
        value = decide()
    except DreamBoothError as e:  # the same refusal in every process
        broadcast_object_list([json.dumps({"error": str(e)})])
        raise
    except BaseException:
        broadcast_object_list([json.dumps({"error": "the main process failed; its own message says why"})])
        raise
    broadcast_object_list([json.dumps({"value": encode(value)})])
    return value


class PeerFailed(DreamBoothError):
    """Another process of the run (or its launcher) ended, or stopped answering: this one ends too."""


def _machine() -> str:
    """Which processes can see each other's pids: one boot of one machine, one pid namespace (containers sharing a
    host name are told apart)."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:  # no /proc (macOS): the host name alone
        pass
    return "/".join(parts)


def _alive(pid: int) -> bool:
    """Whether a process of this machine runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds the number: ours is gone
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): os.kill's answer stands
    return state not in ("Z", "X")


class Peers:
    """The other processes of a run, watched so that one that dies ends the rest within seconds.

    A process killed in a collective is noticed by the others' collective at once (gloo: "connection reset"), but a
    process busy on its own (sampling class images, rendering validation, saving the result on the main process)
    would only notice at its next collective, and NCCL waits for its timeout. So a thread looks at the other
    processes of this machine, and at the launcher, a few times a second. When one has ended it asks the main thread
    to stop (SIGTERM, whose handler raises `PeerFailed` while a peer is known dead: see `run.StopRequests`); a main
    thread that cannot raise (stuck inside a collective) is ended after GRACE_S, with the same one line. Processes
    on other machines are bounded by the process-group timeout (--ddp_timeout) instead. A launcher that tears the
    run down itself (torchrun, accelerate launch: SIGTERM to the survivors) meets the same handler."""

    POLL_S, GRACE_S = 0.2, 10.0

    def __init__(self, accelerator):
        import torch.distributed as dist

        self.rank, self.count = accelerator.process_index, accelerator.num_processes
        me = {"machine": _machine(), "pid": os.getpid()}
        everyone: list[str | None] = [None] * self.count
        dist.all_gather_object(everyone, json.dumps(me))  # JSON text: only strings travel
        peers = {rank: json.loads(text) for rank, text in enumerate(everyone) if rank != self.rank}
        self.here = {rank: p["pid"] for rank, p in peers.items() if p["machine"] == me["machine"] and _alive(p["pid"])}
        self.launcher = os.getppid()
        self.kept: Callable[[], str] = lambda: "nothing was written"
        self.failure: str | None = None
        self.raised = False
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="peers", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        """The run's collective part is over: the others end now, as they should."""
        return self._ended.is_set()

    def ended(self) -> str | None:
        """What ended, if anything: another process of the run on this machine, or the launcher."""
        if self.failure is None:
            for rank, pid in self.here.items():
                if not _alive(pid):
                    self.failure = f"process {rank} of {self.count} (pid {pid}) ended"
                    break
            else:
                if os.getppid() != self.launcher:
                    self.failure = f"the launcher of the run (pid {self.launcher}) ended"
        return self.failure

    def error(self, what: str | None = None) -> PeerFailed:
        """The one-line error of this process's end."""
        self.raised = True
        what = what or self.ended() or "another process of the run stopped answering"
        return PeerFailed(f"{what} before this one (process {self.rank}) was done; it stops too; {self.kept()}")

    def _watch(self) -> None:
        while not self._ended.wait(self.POLL_S):
            if self.ended() is None:
                continue
            if self.raised or self.closed:  # the main thread knows already (a collective failed, the launcher's
                break  # SIGTERM), or the run's collective part ended as this failure was seen
            import _thread

            _thread.interrupt_main(signal.SIGTERM)  # its handler raises PeerFailed in the main thread
            break
        else:
            return
        if self._ended.wait(self.GRACE_S):
            return
        say(f"dreambooth train: error: {self.error()} (ended after {self.GRACE_S:.0f} s of waiting for this "
            "process's own cleanup)")
        os._exit(FAILED_EXIT)

    def close(self) -> None:
        """The run is over (done or failed and cleaned up): nothing to watch any more."""
        self._ended.set()


FAILED_EXIT = 2  # as the CLI's exit status for any one-line error

_KEPT: list[Any] = []


def keep_till_exit(obj: Any) -> None:
    """Never free `obj` (a multi-process run's models): freeing the DDP-wrapped model runs gloo's process-group
    destructor, which deadlocked for good once the other processes had left (about 1 run in 6 on 2 CPU processes).
    The CLI ends such a run's processes without teardown once everything is written."""
    _KEPT.append(obj)


def distributed_error(error: BaseException, peers: Peers | None, timeout_s: int) -> PeerFailed | None:
    """A collective's failure in a run of several processes (gloo: "connection reset", "timed out"; NCCL:
    DistBackendError), as the one line that names what happened; None for any other error."""
    import time

    import torch.distributed as dist

    from .errors import is_out_of_memory

    text = str(error)
    if peers is None or is_out_of_memory(error):  # one process (a group of one for --fsdp), or advice to give
        return None
    if not (isinstance(error, dist.DistError) or "gloo" in text or "NCCL" in text or "c10d" in text):
        return None
    deadline = time.monotonic() + 2.0  # a killed process's sockets close a moment before it is gone
    while peers.ended() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if peers.ended():
        return peers.error()
    if "timed out" in text.lower() or "timeout" in text.lower():
        what = f"another process of the run did not answer for {timeout_s} s (--ddp_timeout)"
    else:
        what = f"another process of the run stopped answering ({first_line(error, 160)})"
    return peers.error(what)
