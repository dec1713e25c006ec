"""The UI server against hostile or unlucky input: paths that leave the workspace (typed on the page, or read
from a run folder copied in), malformed and oversized requests, Host and Content-Type headers as browsers and
attackers send them, IPv6, and run control across stops sent twice, a restarted page and a failed resume. Runs
here are a stand-in trainer (FAKE): it behaves as `dreambooth train` does towards the page (lock file with its
pid, events.jsonl, SIGTERM: a checkpoint then exit 143, a second SIGTERM: dead at once) in milliseconds."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import end_page
from dreambooth.toy.models import TOY_MODELS
from dreambooth.ui.server import UIConfig, make_server
from dreambooth.ui.workspace import Workspace, plain

FAKE = r"""
import json, os, signal, sys, time
from pathlib import Path
cfg = json.loads(Path(sys.argv[sys.argv.index("--config") + 1]).read_text())
out, mode = Path(cfg["output_dir"]), os.environ.get("FAKE_TRAINER", "train")
out.mkdir(parents=True, exist_ok=True)
if mode == "in-use":  # what the trainer says when another process holds the folder
    sys.exit(print(f"dreambooth train: error: --output_dir {out} is in use by another dreambooth process (pid 1); "
                   "wait for it to finish or pass another folder", file=sys.stderr) or 2)
(out / ".dreambooth.lock").write_text(str(os.getpid()))
def emit(kind, **data):
    with open(out / "events.jsonl", "a") as f:
        f.write(json.dumps({"event": kind, "time": time.time(), **data}) + "\n")
if mode == "load":  # loading models: SIGTERM ends the process (its default action)
    time.sleep(600)
stop = []
def on_term(*_):  # the first asks for a checkpoint; a second one kills, as in run.StopRequests
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    stop.append(1)
signal.signal(signal.SIGTERM, on_term)
(out / "train_config.json").write_text(json.dumps(cfg))
emit("start", step=0)
for step in range(1, 100000):
    emit("step", step=step, max_train_steps=100000, loss=0.1, lr=1e-3)
    if mode == "fail" and step == 3:
        sys.stderr.write(" 30%|###   | 3/10 [00:01<00:02,  3.01it/s]")
        emit("error", message="the GPU fell over", error="RuntimeError", kept="nothing was written")
        (out / ".dreambooth.lock").unlink()
        sys.stderr.write("\r 40%|####  | 4/10 [00:01<00:02,  3.01it/s]")
        sys.stderr.flush()
        os._exit(1)
    if stop:
        tmp = out / f".checkpoint-{step}.tmp"
        tmp.mkdir()
        time.sleep(2)  # saving the checkpoint: a second SIGTERM now loses it
        tmp.rename(out / f"checkpoint-{step}")
        emit("stopped", step=step, path=str(out / f"checkpoint-{step}"))
        (out / ".dreambooth.lock").unlink()
        print(f"dreambooth train: stopped at step {step}", file=sys.stderr)
        sys.exit(143)
    time.sleep(0.02)
"""


class Page:
    """A server on a free port over a workspace, and calls to it."""

    def __init__(self, workspace: Path, host: str = "127.0.0.1"):
        self.server = make_server(UIConfig(host=host, port=0, workspace=workspace))
        self.ws: Workspace = self.server.RequestHandlerClass.app.ws  # type: ignore[attr-defined]
        self.ws.program = [sys.executable, "-c", FAKE]
        self.host = host
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}"

    def call(self, path: str, body: dict | None = None, raw: bytes | None = None,
             **headers: str) -> tuple[int, dict]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data,
                                     headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(req, timeout=60) as res:
                return res.status, json.loads(res.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def raw(self, request: bytes) -> tuple[int, dict]:
        """A request as bytes on a socket (headers no client library sends); the status and JSON answer."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(request)
            s.shutdown(socket.SHUT_WR) if b"Content-Length: -1" not in request else None
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)

    def wait(self, run: str, until, timeout: float = 60) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            state = self.call(f"/api/runs/{run}")[1]
            if until(state):
                return state
            time.sleep(0.1)
        raise AssertionError(f"run {run}: {state}")

    def close(self, end_runs: bool = True) -> None:
        """The page goes; with `end_runs` the processes it started go too (a test leaves nothing running)."""
        if end_runs:
            end_page(self.server)
        else:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def page(tmp_path):
    made = Page(tmp_path / "ws")
    yield made
    made.close()
    for job in made.ws.jobs.values():  # nothing the test started outlives it
        if job.proc is not None and job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()


def start_fake(page: Page, name: str, monkeypatch, mode: str = "train", **config) -> Path:
    monkeypatch.setenv("FAKE_TRAINER", mode)
    folder = page.ws.root / "runs" / name
    page.ws.start("train", {"output_dir": str(folder), "instance_prompt": "a qek dog", **config}, folder, run=name)
    return folder


def steps(state: dict) -> bool:
    return any(e["event"] == "step" for e in state["events"])


# -- 1, 2: paths stay in the workspace ---------------------------------------------------------------------------
def test_resume_and_the_run_actions_refuse_a_run_whose_files_name_places_outside_the_workspace(page, tmp_path):
    outside = tmp_path / "elsewhere"
    run = page.ws.root / "runs" / "copied"
    run.mkdir(parents=True)
    (run / "events.jsonl").write_text(json.dumps({"event": "stopped", "step": 3, "time": 1.0}) + "\n")
    (run / "train_config.json").write_text(json.dumps({"output_dir": str(outside), "instance_prompt": "a qek dog",
                                                       "instance_data_dir": str(tmp_path)}))
    status, res = page.call("/api/runs/copied/resume", {})
    assert status == 400 and "output folder" in res["error"] and "\n" not in res["error"], res
    assert not outside.exists() and not page.ws.jobs  # nothing started, nothing written

    config = {"output_dir": str(run), "instance_data_dir": str(tmp_path), "pretrained_model_name_or_path": "x"}
    (run / "train_config.json").write_text(json.dumps(config))
    status, res = page.call("/api/runs/copied/resume", {})
    assert status == 400 and "photos folder" in res["error"] and "workspace" in res["error"], res
    status, res = page.call("/api/runs/copied/evaluate", {"backend": "dreambench"})
    assert status == 400 and "outside the workspace" in res["error"], res

    # a checkpoint (or "latest") that links out of the workspace: the page does not load it
    (run / "train_config.json").write_text(json.dumps({**config, "instance_data_dir": str(page.ws.root / "uploads")}))
    (run / "checkpoint-3").symlink_to(outside, target_is_directory=True)
    for action in ("resume", "gallery", "export"):
        status, res = page.call(f"/api/runs/copied/{action}", {"prompts": ["a qek dog"], "format": "kohya"})
        assert status == 400 and "link out of the workspace" in res["error"], (action, res)
    (run / "checkpoint-3").unlink()
    (run / "latest").write_text("../../../elsewhere\n")
    status, res = page.call("/api/runs/copied/resume", {})
    assert status == 400 and "latest checkpoint is outside" in res["error"], res
    assert not page.ws.jobs

    # a run folder that is itself a link out of the workspace: listed as refused, never read
    outside.mkdir()
    (outside / "run_summary.json").write_text("{}")
    (page.ws.root / "runs" / "linked").symlink_to(outside, target_is_directory=True)
    status, res = page.call("/api/runs/linked")
    assert status == 400 and "outside the workspace" in res["error"]
    listed = {r["name"]: r for r in page.call("/api/runs")[1]["runs"]}
    assert listed["linked"]["status"] == "refused" and listed["copied"]["status"] == "stopped"


def test_every_path_the_page_takes_stays_inside_the_workspace(tmp_path):
    ws = Workspace(tmp_path / "ws")
    photos = ws.root / "uploads" / "20240101-000000"
    run = ws.root / "runs" / "r1"
    good = {"output_dir": str(run), "instance_data_dir": str(photos), "logging_dir": "logs",
            "class_data_dir": str(ws.root / "class-images" / "dog"),
            "pretrained_model_name_or_path": str(TOY_MODELS["sd"].path)}
    assert ws.path_problems(good) == {}
    for name, value, words in (
            ("logging_dir", str(tmp_path / "tb"), "log folder must be inside the workspace"),
            ("logging_dir", "../../../x", "log folder must be inside the workspace"),
            ("output_dir", str(tmp_path / "out"), "output folder"),
            ("output_dir", str(ws.root / "galleries" / "x"), "output folder"),
            ("instance_data_dir", str(tmp_path), "photos folder must be inside"),
            ("eval_config", str(tmp_path / "e.toml"), "evaluation options file must be inside"),
            ("resume_from_checkpoint", str(tmp_path / "checkpoint-1"), "checkpoint to resume from must be inside"),
            ("class_data_dir", str(tmp_path / "cls"), "class images folder must be inside the workspace"),
            ("class_data_dir", str(photos), "cannot be, hold or be inside the uploaded photos"),
            ("class_data_dir", str(photos / "sub"), "the uploaded photos"),
            ("class_data_dir", str(ws.root), "the uploaded photos"),
            ("class_data_dir", str(ws.root / "uploads" / "other"), "the uploaded photos"),
            ("class_data_dir", str(ws.root / "runs" / "other-run" / "cls"), "inside a run's folder")):
        problems = ws.path_problems({**good, name: value})
        assert words in problems.get(name, ""), (name, value, problems)
        assert "--" not in problems[name] and "\n" not in problems[name]
    model = ws.root / "models" / "mine"
    model.mkdir(parents=True)
    problems = ws.path_problems({**good, "pretrained_model_name_or_path": str(model),
                                 "class_data_dir": str(model / "cls")})
    assert "base model's folder" in problems["class_data_dir"]
    # resuming: the output folder is the run's own
    assert "not the run's own" in ws.path_problems({**good, "output_dir": str(ws.root / "runs" / "r2")}, run)[
        "output_dir"]
    assert ws.path_problems(good, run) == {}


def test_the_page_refuses_a_log_folder_outside_the_workspace(page, tmp_path):
    values = {"pretrained_model_name_or_path": str(TOY_MODELS["sd"].path),
              "instance_data_dir": str(page.ws.root / "uploads"),
              "instance_prompt": "a qek circle", "logging_dir": str(tmp_path / "tb"), "report_to": "tensorboard"}
    status, res = page.call("/api/train", {"values": values})
    assert status == 200 and "log folder" in res["problems"]["logging_dir"], res
    status, res = page.call("/api/train", {"values": {**values, "logging_dir": "logs",
                                                      "with_prior_preservation": True, "class_prompt": "a circle",
                                                      "class_data_dir": str(page.ws.root / "uploads")}})
    assert status == 200 and "uploaded photos" in res["problems"]["class_data_dir"], res
    assert not page.ws.jobs and not list((page.ws.root / "runs").iterdir())


# -- 3, 5: run control --------------------------------------------------------------------------------------------
def test_stop_is_sent_once_and_the_run_stops_at_its_checkpoint(page, monkeypatch):
    folder = start_fake(page, "twice", monkeypatch)
    page.wait("twice", steps)
    assert page.call("/api/runs/twice/stop", {}) == (200, {"stopping": "twice"})
    status, res = page.call("/api/runs/twice/stop", {})  # while it saves: a second SIGTERM would kill it
    assert status == 200 and "already stopping" in res["message"]
    state = page.wait("twice", lambda s: s["status"] != "running")
    assert state["status"] == "stopped" and state["message"] is None, state
    assert not list(folder.glob(".checkpoint-*.tmp")) and list(folder.glob("checkpoint-*"))


def test_a_failed_run_shows_its_error_event_not_the_progress_bar(page, monkeypatch):
    start_fake(page, "fails", monkeypatch, mode="fail")
    state = page.wait("fails", lambda s: s["status"] != "running")
    assert state["status"] == "failed" and state["message"] == "the GPU fell over (nothing was written)", state
    assert "%|" in (page.ws.root / "jobs" / f"{next(iter(page.ws.jobs))}.log").read_text()  # it was there


def test_a_failed_resume_shows_as_failed_in_the_pages_words(page, monkeypatch):
    folder = start_fake(page, "again", monkeypatch)
    page.wait("again", steps)
    page.call("/api/runs/again/stop", {})
    assert page.wait("again", lambda s: s["status"] != "running")["status"] == "stopped"
    config = json.loads((folder / "train_config.json").read_text())
    (folder / "train_config.json").write_text(json.dumps({**config, "pretrained_model_name_or_path": "x",
                                                          "instance_data_dir": str(page.ws.root / "uploads")}))
    monkeypatch.setenv("FAKE_TRAINER", "in-use")  # the folder was taken between the check and the start
    assert page.call("/api/runs/again/resume", {})[0] == 200
    state = page.wait("again", lambda s: s["status"] != "running")
    assert state["status"] == "failed" and "the output folder" in state["message"], state
    assert "--" not in state["message"] and "in use" in state["message"]


def test_resume_of_a_run_whose_folder_is_in_use_is_refused(page):
    run = page.ws.root / "runs" / "busy"
    run.mkdir(parents=True)
    (run / "train_config.json").write_text(json.dumps({"output_dir": str(run)}))
    (run / ".dreambooth.lock").write_text(str(os.getpid()))  # a live process holds it (this one)
    status, res = page.call("/api/runs/busy/resume", {})
    assert status == 409 and "in use by another process" in res["error"] and not page.ws.jobs
    status, res = page.call("/api/runs/busy/stop", {})
    assert status == 409 and "did not start" in res["error"]


def test_a_stop_while_the_models_load_shows_stopped(page, monkeypatch):
    folder = start_fake(page, "loading", monkeypatch, mode="load")
    end = time.time() + 60
    while not (folder / ".dreambooth.lock").exists() and time.time() < end:
        time.sleep(0.05)
    assert page.call("/api/runs/loading/stop", {})[0] == 200
    state = page.wait("loading", lambda s: s["status"] != "running")
    assert state["status"] == "stopped" and "before training began" in state["message"], state


def test_a_restarted_page_stops_the_run_it_shows_running(tmp_path, monkeypatch):
    first = Page(tmp_path / "ws")
    try:
        start_fake(first, "long", monkeypatch)
        first.wait("long", steps)
    finally:
        first.close(end_runs=False)  # the page goes; its run goes on
    again = Page(tmp_path / "ws")
    try:
        assert again.call("/api/runs/long")[1]["status"] == "running"
        assert again.call("/api/runs/long/stop", {}) == (200, {"stopping": "long"})
        assert "already stopping" in again.call("/api/runs/long/stop", {})[1]["message"]
        state = again.wait("long", lambda s: s["status"] != "running")
        assert state["status"] == "stopped", state
        assert any(e["event"] == "stopped" for e in state["events"])
    finally:
        again.close()
        for job in first.ws.jobs.values():
            job.proc.kill()
            job.proc.wait()


def test_a_pid_reused_by_another_process_is_not_taken_for_the_run(tmp_path):
    ws = Workspace(tmp_path / "ws")
    (ws.root / "jobs" / "train-x.json").write_text("{}")
    (ws.root / "jobs" / "train-x.pid").write_text(json.dumps(  # this process: alive, but not that job's
        {"pid": os.getpid(), "command": "train", "run": "r", "output": str(ws.root / "runs" / "r"), "started": 0}))
    assert not Workspace(ws.root).jobs


# -- 4: requests the server survives --------------------------------------------------------------------------------
def test_malformed_and_oversized_requests_get_one_line_and_leave_nothing(page):
    deep = b'{"values": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, res = page.call("/api/validate", raw=deep)
    assert status == 400 and "nested too deeply" in res["error"]
    head = "POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\n"
    status, res = page.raw((head + "Content-Length: -1\r\n\r\n").format(page.port).encode())
    assert status == 400 and "Content-Length" in res["error"]
    # over the cap: refused from the header alone, the body never sent
    status, res = page.raw((head + "Content-Length: {}\r\n\r\n").format(page.port, 10**9).encode())
    assert status == 413 and "MB" in res["error"] and "\n" not in res["error"]
    status, res = page.raw((head.replace("upload", "train") + "Content-Length: 2000000\r\n\r\n").format(
        page.port).encode())
    assert status == 413
    photos = [{"name": "a.png", "data": "aGk="}]
    for resolution in (20000, 1048576, 7, -5):
        status, res = page.call("/api/upload", {"files": photos, "resolution": resolution})
        assert status == 400 and "resolution must be from 8 to 4096" in res["error"], res
    assert page.call("/api/upload", {"files": photos, "resolution": "big"})[0] == 400
    status, res = page.call("/api/upload", {"files": photos + [{"name": "b.png", "data": "###"}], "resolution": 64})
    assert status == 400 and "not base64" in res["error"]
    status, res = page.call("/api/upload", {"files": [{"name": "c.png", "data": "aGk="}], "resolution": 64})
    assert status == 400  # not an image
    assert not list((page.ws.root / "uploads").iterdir())  # failed uploads leave nothing
    assert page.call("/api/runs")[0] == 200  # and the server goes on


# -- 6, 7: headers -------------------------------------------------------------------------------------------------
def test_json_media_types_are_read_case_insensitively(page):
    for kind in ("Application/JSON", "application/json; charset=utf-8", "APPLICATION/JSON;charset=UTF-8"):
        status, res = page.call("/api/validate", {"values": {}}, **{"Content-Type": kind})
        assert status == 200 and "problems" in res, kind
    assert page.call("/api/validate", {"values": {}}, **{"Content-Type": "application/jsonx"})[0] == 403


def test_a_shared_page_answers_to_the_machines_names_and_refuses_others(tmp_path):
    try:
        shared = Page(tmp_path / "ws", host="0.0.0.0")
    except OSError as e:
        pytest.skip(f"cannot bind 0.0.0.0 here: {e}")
    try:
        port = shared.port
        shared.host = "127.0.0.1"  # reach it over loopback, naming the machine as a user on the network would
        for name in {socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1"}:
            assert shared.call("/api/runs", Host=f"{name}:{port}")[0] == 200, name
        assert shared.call("/api/runs", Host=f"evil.example:{port}")[0] == 403
        assert shared.call("/api/runs", Host=f"{socket.gethostname()}:{port + 1}")[0] == 403
        assert shared.call("/api/validate", {"values": {}}, Origin=f"http://{socket.gethostname()}:{port}")[0] == 200
        assert shared.call("/api/validate", {"values": {}}, Origin=f"http://evil.example:{port}")[0] == 403
    finally:
        shared.close()


def test_a_loopback_page_refuses_the_machines_other_names(page):
    assert page.call("/api/runs", Host=f"localhost:{page.port}")[0] == 200
    assert page.call("/api/runs", Host=f"[::1]:{page.port}")[0] == 200
    if socket.gethostname() not in ("localhost",):
        assert page.call("/api/runs", Host=f"{socket.gethostname()}:{page.port}")[0] == 403


def test_an_ipv6_page_serves_on_its_own_address(tmp_path):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    six = Page(tmp_path / "ws", host="::1")
    try:
        assert six.call("/api/runs") == (200, {"runs": []})  # the client sends Host: [::1]:port
        assert six.call("/api/runs", Host=f"[0:0::1]:{six.port}")[0] == 200
        assert six.call("/api/runs", Host=f"evil.example:{six.port}")[0] == 403
    finally:
        six.close()


def test_messages_name_settings_in_the_pages_words():
    line = plain("--class_data_dir /x is a file;\n continue with --resume_from_checkpoint latest or --max_train_steps")
    assert line == "the class images folder /x is a file; continue with Resume or the max train steps"
