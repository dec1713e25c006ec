import json

import pytest

import dreambooth
from dreambooth.errors import DreamBoothError
from dreambooth.events import EventFile, Events, eta_seconds, read_events


def test_a_reader_gets_whole_lines_only_and_picks_up_where_it_stopped(tmp_path):
    path = tmp_path / "events.jsonl"
    assert read_events(path) == ([], 0)  # the run has not written yet
    sink = EventFile(path)
    events = Events(sink)
    events.emit("start", step=0)
    with open(path, "a") as f:
        f.write('{"event": "step", "st')  # a line another process is still writing
    got, offset = read_events(path)
    assert [e["event"] for e in got] == ["start"] and offset == len(path.read_bytes().split(b"\n")[0]) + 1
    with open(path, "a") as f:
        f.write('ep": 1}\n')
    got, offset = read_events(path, offset)
    assert got == [{"event": "step", "step": 1}] and offset == path.stat().st_size
    sink.close()


def test_a_sink_added_later_receives_the_earlier_events_first(tmp_path):
    seen_early, seen_late = [], []
    events = Events(seen_early.append)
    events.emit("class_images", done=2, total=4)
    events.add(seen_late.append)
    events.emit("start", step=0)
    assert [e["event"] for e in seen_early] == ["class_images", "start"] == [e["event"] for e in seen_late]
    assert events.last("start")["step"] == 0
    with pytest.raises(KeyError):
        events.last("finish")


def test_eta_is_the_pace_of_this_invocation():
    assert eta_seconds(10, 10, 0, 0.0, 5.0) == 0
    assert eta_seconds(14, 20, 10, 100.0, 108.0) == pytest.approx(12.0)  # resumed at 10: 4 steps in 8 s
    assert eta_seconds(10, 20, 10, 100.0, 108.0) is None


def test_a_run_that_fails_after_starting_says_so_in_its_stream(base_args, tmp_path, monkeypatch):
    import dreambooth.training as training

    def broken(*args, **kwargs):
        raise DreamBoothError("the validation pipeline broke")

    monkeypatch.setattr(training, "render_validation", broken)
    args = base_args(max_train_steps=4, validation_prompt="a zwx dog", validation_steps=2, checkpointing_steps=1)
    with pytest.raises(DreamBoothError, match="validation pipeline broke"):
        dreambooth.train(**args)
    lines = (tmp_path / "out" / "events.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["event"] == "error" and last["message"] == "the validation pipeline broke"
    assert "checkpoint-2" in last["kept"]  # the newest complete checkpoint survives, and the line says so
    assert [json.loads(line)["step"] for line in lines if '"checkpoint"' in line] == [1, 2]


def test_a_new_run_starts_the_file_afresh_and_a_broken_file_never_stops_training(tmp_path, caplog):
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "error", "message": "an earlier run"}\n')
    sink = EventFile(path)  # a new run in a folder its command wrote before
    sink({"event": "start", "loss": float("nan")})
    sink.close()
    assert read_events(path)[0] == [{"event": "start", "loss": None}]  # NaN as null: browsers parse it
    resumed = EventFile(path, append=True)
    resumed({"event": "start", "step": 3})
    assert [e.get("step") for e in read_events(path)[0]] == [None, 3]

    class Full:
        closed = False

        def write(self, _):
            raise OSError(28, "No space left on device")

        def close(self):
            self.closed = True

    resumed.file.close()
    resumed.file = Full()
    resumed({"event": "step", "step": 4})  # warns and gives the file up
    resumed({"event": "step", "step": 5})
    assert resumed.file.closed and "no longer written" in caplog.text
