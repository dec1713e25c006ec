"""The UI's API without a browser: uploads go through the CLI's image checks, bad requests get one line, nothing
outside the workspace is served, and a run started from the page stops at a checkpoint and resumes to the end."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import end_page
from dreambooth.cli import parser
from dreambooth.toy.models import TOY_MODELS
from dreambooth.ui.server import UIConfig, make_server


@pytest.fixture
def api(tmp_path):
    server = make_server(UIConfig(port=0, workspace=tmp_path / "ws"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def call(path: str, body: dict | None = None, raw: bytes | None = None, **headers: str) -> tuple[int, dict]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(base + path, data=data,
                                     headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(req) as res:
                return res.status, json.loads(res.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    call.base = base  # type: ignore[attr-defined]
    yield call, tmp_path / "ws"
    end_page(server)


def png(colour: tuple[int, int, int], size: int = 40) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), colour, np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_upload_checks_photos_like_the_cli_and_shows_the_crop(api):
    call, ws = api
    files = [{"name": f"../p{i}.png", "data": png((40 * i, 0, 0), 40 + 8 * i)} for i in range(3)]
    status, res = call("/api/upload", {"files": files + [{"name": "notes.txt", "data": "aGk="}], "resolution": 48})
    assert status == 200
    folder = ws / "uploads" / res["folder"].rsplit("/", 1)[1]
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "p0.png", "p1.png", "p2.png"]  # no "../"
    assert [p["small"] for p in res["photos"]] == [True, False, False]  # 40 px < 48 px
    assert any("notes.txt" in w for w in res["warnings"]) and any("upscaled" in w for w in res["warnings"])
    preview = Image.open(io.BytesIO(urllib.request.urlopen(call.base + res["photos"][2]["preview"]).read()))
    assert preview.size == (48, 48)  # the square the trainer takes at --resolution 48

    same = [{"name": n, "data": png((0, 0, 200))} for n in ("a.png", "a-2.png", "a.png", "A.png")]
    status, res = call("/api/upload", {"files": same, "resolution": 32})
    assert status == 200 and sorted(p["name"] for p in res["photos"]) == ["a-2.png", "a-3.png", "a-4.png", "a.png"]

    status, res = call("/api/upload", {"files": [{"name": "x.png", "data": base64.b64encode(b"nope").decode()}],
                                       "resolution": 48})
    assert status == 400 and "x.png (not a readable image)" in res["error"] and "\n" not in res["error"]
    status, res = call("/api/upload", {"files": [], "resolution": 48})
    assert status == 400 and "no photos" in res["error"]


def test_bad_requests_are_one_line_and_nothing_outside_the_workspace_is_served(api, tmp_path):
    call, ws = api
    (tmp_path / "secret.txt").write_text("x")
    assert call("/files/../secret.txt")[0] == 404
    assert call("/files/%2e%2e/secret.txt")[0] == 404
    assert call("/files/uploads/%2e%2e/%2e%2e/secret.txt")[0] == 404
    # only this page drives the server: another site's form or a DNS-rebinding page is refused, nothing starts
    assert call("/api/runs", Host="evil.example:80")[0] == 403
    assert call("/api/train", {"values": {}}, **{"Content-Type": "text/plain"})[0] == 403
    assert call("/api/train", {"values": {}}, Origin="http://evil.example")[0] == 403
    assert call("/api/nothing")[0] == 404
    assert call("/api/runs/no-such-run")[0] == 404
    status, res = call("/api/train", raw=b"{not json")
    assert status == 400 and res["error"].startswith("bad request")
    status, res = call("/api/train", {"values": {"learning_rate": "fast", "max_train_steps": "0"}})
    assert status == 200 and set(res["problems"]) >= {"learning_rate", "max_train_steps", "instance_data_dir"}
    assert not list((ws / "runs").iterdir())  # nothing started, nothing written


def test_a_run_from_the_page_stops_at_a_checkpoint_and_resumes_to_the_end(api):
    call, ws = api
    status, res = call("/api/upload", {"files": [{"name": f"p{i}.png", "data": png((200, 30 * i, 0), 32)}
                                                 for i in range(3)], "resolution": 32})
    values = {"pretrained_model_name_or_path": str(TOY_MODELS["sd"].path), "instance_data_dir": res["folder"],
              "instance_prompt": "a qek circle", "identifier": "qek", "use_lora": True, "resolution": "32",
              "max_train_steps": "200",
              "learning_rate": "1e-3", "checkpointing_steps": "1000", "logging_steps": "1", "train_batch_size": "1",
              "train_text_encoder": False}  # the toy recipe's text encoder is not what this test is about
    status, res = call("/api/train", {"values": values})
    assert status == 200, res
    run = res["run"]

    def view() -> dict:
        return call(f"/api/runs/{run}")[1]

    def wait(until, timeout: float = 480) -> dict:  # a loaded 2-core CPU
        end = time.time() + timeout
        while time.time() < end:
            state = view()
            if until(state):
                return state
            time.sleep(0.5)
        raise AssertionError(f"run {run} did not get there: {state['status']} {state.get('message')}")

    wait(lambda s: any(e["event"] == "step" for e in s["events"]))
    assert call(f"/api/runs/{run}/stop", {})[0] == 200
    state = wait(lambda s: s["status"] != "running")
    assert state["status"] == "stopped", state
    stopped = [e for e in state["events"] if e["event"] == "stopped"]
    assert len(stopped) == 1 and 0 < stopped[0]["step"] < 200
    assert (ws / "runs" / run / f"checkpoint-{stopped[0]['step']}").is_dir()
    assert call(f"/api/runs/{run}/stop", {})[0] == 400  # not training any more: one line, nothing happens

    assert call(f"/api/runs/{run}/resume", {})[0] == 200
    state = wait(lambda s: s["status"] not in ("running", "stopped"))
    assert state["status"] == "finished", state
    starts = [e for e in state["events"] if e["event"] == "start"]
    assert starts[-1]["resumed_from"].endswith(f"checkpoint-{stopped[0]['step']}")
    assert state["summary"]["steps"] == 200
    listed = call("/api/runs")[1]["runs"]
    assert [r["name"] for r in listed] == [run] and listed[0]["status"] == "finished"

    def evaluated(which: str) -> dict:  # the page's evaluation of one model, few images ("images per prompt")
        status, job = call(f"/api/runs/{run}/evaluate", {"subject": "circle", "images_per_prompt": 2,
                                                          "class_images": 2, "which": which})
        assert status == 200, job
        end = time.time() + 480  # a loaded 2-core CPU
        while job["status"] == "running" and time.time() < end:
            time.sleep(0.5)
            job = call(f"/api/jobs/{job['id']}")[1]
        assert job["status"] == "done", job
        return job

    # the result: a toy model's run is judged by the toy judges without being told
    job = evaluated("tuned")
    assert {"subject", "pres", "div"} <= set(job["report"]["metrics"])
    assert all(len(m["ci95"]) == 2 for m in job["report"]["metrics"].values())
    assert any("/grids/" in f for f in job["files"]) and job["output"].startswith(str(ws / "evaluations"))
    # the base model, measured the same way beside it (it has no training config: the page names the identifier
    # and the class noun from the run's prompt)
    base = evaluated("base")
    assert set(base["report"]["metrics"]) == set(job["report"]["metrics"])
    assert base["report"]["source"] == {"model": str(TOY_MODELS["sd"].path)}


def test_a_reopened_workspace_shows_its_runs_as_their_files_say(tmp_path):
    """A page started again over an existing workspace (no jobs in memory) lists a failed run with its error, a
    stopped one as resumable, one whose process is gone without a word as interrupted."""
    runs = tmp_path / "ws" / "runs"
    for name, events in {"failed": [{"event": "start", "step": 0},
                                    {"event": "error", "message": "out of memory", "kept": "checkpoint-2 is kept"}],
                         "stopped": [{"event": "start", "step": 0}, {"event": "stopped", "step": 3, "path": "x"}],
                         "gone": [{"event": "start", "step": 0}, {"event": "step", "step": 1}],
                         "empty": []}.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    server = make_server(UIConfig(port=0, workspace=tmp_path / "ws"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        listed = {r["name"]: r["status"] for r in json.loads(urllib.request.urlopen(base + "/api/runs").read())["runs"]}
        assert listed == {"failed": "failed", "stopped": "stopped", "gone": "interrupted", "empty": "interrupted"}
        failed = json.loads(urllib.request.urlopen(base + "/api/runs/failed").read())
        assert failed["message"] == "out of memory (checkpoint-2 is kept)"
    finally:
        server.shutdown()
        server.server_close()


def test_ui_command_refuses_a_bad_port_in_one_line(capsys, tmp_path):
    import socket

    from dreambooth.cli import main

    assert main(["ui", "--port", "70000", "--workspace", str(tmp_path / "ws")]) == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port), "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "dreambooth ui: error: port=70000 is not allowed: must be from 0 to 65535"
    assert err[1].startswith(f"dreambooth ui: error: cannot serve on 127.0.0.1:{port} (") and len(err) == 2


def test_the_command_of_a_form_and_downloads_of_files_and_folders(api):
    """"Show the command" gives the `dreambooth train` line of what differs from the defaults; a file downloads as
    an attachment, a folder as a zip of it, and nothing outside the workspace does."""
    import shlex
    import zipfile

    call, ws = api
    status, res = call("/api/command", {"values": {"pretrained_model_name_or_path": "my model", "use_lora": True,
                                                    "max_train_steps": "5", "with_prior_preservation": False,
                                                    "lora_target_modules": "to_q, to_k", "resolution": ""}})
    assert status == 200, res
    argv = shlex.split(res["command"])
    assert argv[0] == "dreambooth" and "--with_prior_preservation" not in res["command"]  # a default is not said
    parsed = vars(parser(argv[1:]).parse_args(argv[1:]))  # the line runs: the CLI reads back what the form held
    assert {k: v for k, v in parsed.items() if v is not None and k not in ("command", "handler")} == {
        "pretrained_model_name_or_path": "my model", "use_lora": True, "max_train_steps": "5",
        "lora_target_modules": ["to_q", "to_k"]}
    (ws / "exports" / "merged").mkdir(parents=True)
    (ws / "exports" / "merged" / "model_index.json").write_text("{}")
    (ws / "exports" / "lora.safetensors").write_bytes(b"12345678{}")
    with urllib.request.urlopen(call.base + "/files/exports/lora.safetensors?download") as res:
        assert res.headers["Content-Disposition"] == "attachment; filename*=UTF-8''lora.safetensors"
        assert res.read() == b"12345678{}"
    with urllib.request.urlopen(call.base + "/files/exports/merged?download") as res:
        assert res.headers["Content-Type"] == "application/zip"
        archive = zipfile.ZipFile(io.BytesIO(res.read()))
    assert archive.namelist() == ["merged/model_index.json"] and archive.read("merged/model_index.json") == b"{}"
    for outside in ("/files/..%2F..%2Fetc?download", "/files/?download", "/files/nothing?download"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(call.base + outside)
        assert refused.value.code == 404


def png_of(width: int, height: int, colour: tuple[int, int, int] = (200, 40, 0)) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), colour, np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def standin(monkeypatch):
    """Runs that only wait (what a run is given, not how it trains, is what these tests check; the page ends
    them)."""
    import sys

    from dreambooth.ui.workspace import Workspace

    monkeypatch.setattr(Workspace, "program", [sys.executable, "-c", "import time; time.sleep(120)"])


def test_two_subjects_from_the_page_each_get_their_photos_and_class_folder(api, standin):
    """A second subject of another class without a class folder gets the workspace's folder for its class (as the
    first subject does); the recorded config builds as `dreambooth train --config` reads it."""
    from dreambooth import schema
    from dreambooth.config import TrainConfig

    call, ws = api
    folders = [call("/api/upload", {"files": [{"name": f"p{i}.png", "data": png((200, 60 * i, k * 90), 32)}
                                              for i in range(3)], "resolution": 32})[1]["folder"] for k in (0, 1)]
    model = TOY_MODELS["sd"].path
    values = {"pretrained_model_name_or_path": str(model), "instance_data_dir": folders[0],
              "instance_prompt": "a qek circle", "identifier": "qek", "class_prompt": "a circle",
              "with_prior_preservation": True, "resolution": "32", "max_train_steps": "2",
              "subjects": [{"instance_data_dir": folders[1], "instance_prompt": "a vyb square",
                            "identifier": "vyb", "class_prompt": "a square", "class_data_dir": " "}]}
    status, res = call("/api/train", {"values": values})
    assert status == 200 and "run" in res, res
    config = call(f"/api/runs/{res['run']}")[1]["config"]  # the config the run was started with
    classes = ws.resolve() / "class-images"
    assert config["class_data_dir"] == str(classes / f"{model.name}-a-circle")
    assert [{k: v for k, v in s.items() if v is not None} for s in config["subjects"]] == [
        {"instance_data_dir": folders[1], "instance_prompt": "a vyb square", "identifier": "vyb",
         "class_prompt": "a square", "class_data_dir": str(classes / f"{model.name}-a-square")}]
    cfg = schema.build(TrainConfig, config)
    assert [str(s.instance_data_dir) for s in cfg.subjects] == [folders[1]]


def test_a_further_subjects_paths_stay_in_the_workspace_and_its_problems_show_beside_it(api, standin, tmp_path):
    call, ws = api
    folder = call("/api/upload", {"files": [{"name": "p.png", "data": png((1, 2, 3), 32)}],
                                  "resolution": 32})[1]["folder"]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    values = {"pretrained_model_name_or_path": str(TOY_MODELS["sd"].path), "instance_data_dir": folder,
              "instance_prompt": "a qek circle", "identifier": "qek", "class_prompt": "a circle",
              "with_prior_preservation": True}

    def problems(*subjects: dict) -> dict:
        status, res = call("/api/train", {"values": {**values, "subjects": list(subjects)}})
        assert status == 200 and "problems" in res, res
        for message in res["problems"].values():  # the page's words: no flag, no option name
            assert "--" not in message and "instance_data_dir" not in message and "subjects[" not in message
        return res["problems"]

    found = problems({"instance_data_dir": str(outside), "instance_prompt": "a vyb square", "class_prompt": "a "
                      "square", "class_data_dir": str(outside / "squares")})
    assert set(found) == {"subjects[0].instance_data_dir", "subjects[0].class_data_dir"}
    assert found["subjects[0].instance_data_dir"].startswith("subject 2's photos folder must be inside the workspace")
    found = problems({"instance_data_dir": folder + "-2", "instance_prompt": "a vyb square", "class_prompt": "a "
                      "square", "class_data_dir": folder})  # its class images in the uploaded photos
    assert list(found) == ["subjects[0].class_data_dir"] and "uploaded photos" in found["subjects[0].class_data_dir"]
    found = problems({"instance_data_dir": folder + "-2", "instance_prompt": "a vyb square", "repeats": "none"})
    assert found == {"subjects[0].repeats": "expected an integer"}
    found = problems({"instance_data_dir": folder + "-2", "instance_prompt": "a vyb square"},
                     {"instance_data_dir": folder + "-3", "instance_prompt": "a qek square", "identifier": "qek"})
    assert list(found) == ["subjects[1].identifier"] and "`" not in found["subjects[1].identifier"], found
    assert problems({"instance_prompt": "a zwx square"}) == {"subjects[0].instance_data_dir": "required"}
    assert not list((ws / "runs").iterdir())  # nothing started


def test_identifier_suggestions_share_no_token_piece_with_those_taken(api):
    from dreambooth.identifier import shared_pieces, tokens_of

    call, _ = api
    model = str(TOY_MODELS["sd"].path)
    status, free = call("/api/identifiers", {"model": model, "class_noun": "circle", "top": 50})
    assert status == 200, free
    taken = ["zwxqek", "jox"]  # "zwxqek": pieces zw + x + qek under the toy tokenizer
    status, res = call("/api/identifiers", {"model": model, "class_noun": "circle", "top": 50, "taken": taken})
    assert status == 200, res
    before, after = [s["token"] for s in free["suggestions"]], [s["token"] for s in res["suggestions"]]
    assert {"qek", "jox"} <= set(before) and after and not {"qek", "jox"} & set(after)
    assert after == [t for t in before if t not in ("qek", "jox")]  # the same ranking, less what is taken
    from dreambooth.families import ModelSource, get_family

    tokenizer, _ = get_family(ModelSource(model)).load_text(ModelSource(model))
    assert "qek" in tokens_of(tokenizer, "zwxqek")
    assert not any(shared_pieces({"text_encoder": tokenizer}, [word, token]) for word in taken for token in after)


def test_upload_previews_follow_the_aspect_ratio_buckets(api):
    """With buckets on, a 3:4 photo's preview is its bucket (not the centre square), captioned by its size; the
    previews are drawn again when the options change; a bucket list the schema refuses leaves squares and says
    why in the page's words."""
    from dreambooth.data.buckets import bucket_for

    call, _ = api
    model = str(TOY_MODELS["sd"].path)  # an SD family: sides of multiples of 8
    files = [{"name": "tall.png", "data": png_of(30, 40)}, {"name": "square.png", "data": png_of(40, 40)}]
    status, res = call("/api/upload", {"files": files, "resolution": 32, "model": model,
                                       "use_aspect_ratio_buckets": True})
    assert status == 200, res

    def sizes(answer: dict) -> dict[str, tuple[int, int]]:
        return {p["name"]: Image.open(io.BytesIO(urllib.request.urlopen(call.base + p["preview"]).read())).size
                for p in answer["photos"]}

    h, w = bucket_for(30, 40, 32, 8, None)
    assert sizes(res)["tall.png"] == (w, h) and h > w and w % 8 == 0
    assert {p["name"]: p["bucket"] for p in res["photos"]} == {"tall.png": [w, h], "square.png": [32, 32]}
    status, listed = call("/api/previews", {"folder": res["folder"], "resolution": 32, "model": model,
                                            "aspect_ratio_buckets": "48,32;32,32"})  # a list implies buckets
    assert status == 200 and sizes(listed) == {"tall.png": (32, 48), "square.png": (32, 32)}
    status, square = call("/api/previews", {"folder": res["folder"], "resolution": 32})
    assert status == 200 and set(sizes(square).values()) == {(32, 32)} and "bucket" not in square["photos"][0]
    status, refused = call("/api/previews", {"folder": res["folder"], "resolution": 32, "model": model,
                                             "aspect_ratio_buckets": "36,32"})
    assert status == 200 and set(sizes(refused).values()) == {(32, 32)}
    warning = [w for w in refused["warnings"] if "centre squares" in w]
    assert warning and "not a multiple of 8" in warning[0] and "_" not in warning[0], refused["warnings"]
    assert call("/api/previews", {"folder": str(Path(res["folder"]).parent), "resolution": 32})[0] == 400
