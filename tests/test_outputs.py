"""One rule for every command that writes (outputs.py): a command never replaces a file it did not write, never
writes into a folder that holds its inputs, holds a lock on its output folder while it runs, claims a folder only
once its inputs have loaded, and turns file-system errors into one line that says what was kept."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import dreambooth
from conftest import run_bounded, to_argv
from dreambooth.cli import main
from dreambooth.errors import DreamBoothError
from dreambooth.outputs import LOCK, RECORD, OutputFolder, check_output_file


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr and no traceback."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith(f"dreambooth {argv[0]}: error:")]
    assert "Traceback" not in err and len(lines) == 1, err  # progress bars may share stderr
    return lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- the rule itself ---------------------------------------------------------------------------------------------


def test_a_new_folder_is_removed_again_when_the_command_fails_before_claiming_it(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), OutputFolder(out, "generate"):
        assert (out / LOCK).is_file()
        raise RuntimeError("the model did not load")
    assert not (tmp_path / "a").exists()  # the parent it made too
    with OutputFolder(out, "generate") as folder:
        folder.claim()
    assert sorted(p.name for p in out.iterdir()) == [RECORD]  # claimed: kept, lock released


def test_foreign_files_files_and_other_commands_are_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(DreamBoothError, match="not empty and was not written by `dreambooth generate`"):
        OutputFolder(tmp_path / "mine", "generate").check()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DreamBoothError, match="is a file"):
        OutputFolder(tmp_path / "file", "generate").check()
    with OutputFolder(tmp_path / "gen", "generate") as folder:
        folder.claim()
    with pytest.raises(DreamBoothError, match="written by `dreambooth generate`, not `dreambooth evaluate`"):
        OutputFolder(tmp_path / "gen", "evaluate").check()
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".DS_Store").write_text("x")
    OutputFolder(tmp_path / "hidden", "generate").check()  # hidden files do not make a folder someone's


def test_inside_its_own_folder_a_command_replaces_only_what_it_wrote(tmp_path):
    with OutputFolder(tmp_path / "o", "generate") as folder:
        folder.claim()
        folder.entry("grid.png").write_text("ours")
    (tmp_path / "o" / "notes.txt").write_text("the user's")
    with OutputFolder(tmp_path / "o", "generate") as folder:
        folder.claim()
        folder.entry("grid.png").write_text("ours again")  # recorded: replaced
        with pytest.raises(DreamBoothError, match="notes.txt was not written by"):
            folder.entry("notes.txt")
    assert (tmp_path / "o" / "notes.txt").read_text() == "the user's"


def test_outputs_that_are_hold_or_sit_inside_an_input_are_refused(tmp_path):
    photos, model = tmp_path / "photos", tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    photos.mkdir()
    photo_input, model_input = {"--instance_data_dir": photos}, {"--model": model}
    for out, inputs, models, fragment in [
        (photos, photo_input, {}, "is the --instance_data_dir input"),
        (tmp_path, photo_input, {}, "holds the --instance_data_dir input"),
        (photos / "out", photo_input, {}, "is inside the --instance_data_dir input"),
        (tmp_path / "c" / "out", {"--class_data_dir": tmp_path / "c"}, {}, "is inside the --class_data_dir"),
        (tmp_path / "o", {"--class_data_dir": tmp_path / "o" / "class"}, {}, "holds the --class_data_dir"),
        (model, {}, model_input, "is the --model input"),
        (model / "unet", {}, model_input, "is inside the --model input"),
    ]:
        with pytest.raises(DreamBoothError, match=fragment):
            OutputFolder(out, "train", inputs, models).check()
    OutputFolder(model / "evaluation", "evaluate", models=model_input).check()  # a new folder in a model
    OutputFolder(tmp_path / "new", "train", models={"--model": "owner/name"}).check()  # a hub id is no path


def test_a_second_process_is_refused_while_the_first_holds_the_folder(tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from dreambooth.outputs import OutputFolder
        with OutputFolder({str(out)!r}, "train"):
            print("locked", flush=True)
            sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DreamBoothError, match=f"in use by another dreambooth process \\(pid {holder.pid}\\)"):
            OutputFolder(out, "train").open()
    finally:
        holder.communicate("\n", timeout=60)
    with OutputFolder(out, "train") as folder:  # released when the holder ended
        folder.claim()


def test_single_output_files(tmp_path):
    (tmp_path / "theirs.json").write_text("{}")
    with pytest.raises(DreamBoothError, match="already exists and was not written"):
        check_output_file(tmp_path / "theirs.json", "--output")
    assert check_output_file(tmp_path / "theirs.json", "--output", ours=lambda p: True) == tmp_path / "theirs.json"
    with pytest.raises(DreamBoothError, match="is a folder"):
        check_output_file(tmp_path, "--output")
    with pytest.raises(DreamBoothError, match="is the report input"):
        check_output_file(tmp_path / "theirs.json", "--output", {"report": tmp_path / "theirs.json"})


# -- train ---------------------------------------------------------------------------------------------------------


def test_train_into_the_base_model_folder_is_refused_and_the_model_kept(base_args, tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    before = tree_digest(model)
    line = one_line_error(capsys, ["train", *to_argv(base_args(pretrained_model_name_or_path=str(model),
                                                                output_dir=str(model)))])
    assert "is the base model" in line
    assert tree_digest(model) == before


def test_train_into_a_folder_of_the_users_or_holding_its_photos_is_refused(base_args, instance_dir, tmp_path,
                                                                         capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert "not written by `dreambooth train`" in one_line_error(
        capsys, ["train", *to_argv(base_args(output_dir=str(mine)))])
    assert "holds the --instance_data_dir input" in one_line_error(
        capsys, ["train", *to_argv(base_args(output_dir=str(instance_dir.parent)))])
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_output_dir_that_is_a_file_is_one_line_for_every_command(base_args, tiny_model, tmp_path, capsys):
    path = tmp_path / "a-file"
    path.write_text("keep")
    for argv in (["train", *to_argv(base_args(output_dir=str(path)))],
                 ["generate", "--model", str(tiny_model), "--prompt", "a dog", "--output_dir", str(path)],
                 ["evaluate", "--backend", "toy", "--subject", "circle", "--model", str(tiny_model),
                  "--identifier", "zwx", "--output_dir", str(path)],
                 ["demo", "--output_dir", str(path)],
                 ["reproduce", "--quick", "--output_dir", str(path)]):
        assert "is a file" in one_line_error(capsys, argv)
    assert path.read_text() == "keep"


def test_a_model_that_fails_to_load_claims_nothing_so_the_corrected_retry_runs(base_args, tiny_model, tmp_path,
                                                                               capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    args = base_args(with_prior_preservation=False, class_prompt=None, class_data_dir=None)
    line = one_line_error(capsys, ["train", *to_argv({**args, "pretrained_model_name_or_path": str(broken)})])
    assert "damaged or incomplete" in line and "convert" not in line
    assert not (tmp_path / "out").exists()
    assert main(["train", *to_argv(args)]) == 0


def test_the_model_path_is_one_run_however_it_is_typed(base_args, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_model.parent)
    args = base_args(pretrained_model_name_or_path=tiny_model.name, max_train_steps=2, checkpointing_steps=1)
    dreambooth.train(**args)
    summary = dreambooth.train(**{**args, "pretrained_model_name_or_path": str(tiny_model), "max_train_steps": 3},
                               resume_from_checkpoint="latest")
    assert summary["steps"] == 3 and summary["resumed_from"].endswith("checkpoint-2")
    monkeypatch.chdir(tmp_path)  # another working directory, another relative spelling of the same model
    summary = dreambooth.train(**{**args, "pretrained_model_name_or_path": os.path.relpath(tiny_model, tmp_path),
                                  "max_train_steps": 4}, resume_from_checkpoint="latest")
    assert summary["steps"] == 4 and summary["resumed_from"].endswith("checkpoint-3")


def test_a_users_train_config_does_not_make_a_folder_trains(base_args, tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "train_config.json").write_text(json.dumps(base_args()))  # the user's --config, kept beside notes
    (exp / "notes.txt").write_text("keep")
    assert "not written by `dreambooth train`" in one_line_error(
        capsys, ["train", "--config", str(exp / "train_config.json"), "--output_dir", str(exp)])
    assert sorted(p.name for p in exp.iterdir()) == ["notes.txt", "train_config.json"]


def test_a_run_that_stopped_before_its_first_checkpoint_may_be_replaced(base_args, tmp_path, monkeypatch):
    import dreambooth.training as training

    def die(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "fit", die)
    with pytest.raises(KeyboardInterrupt):
        dreambooth.train(**base_args())
    monkeypatch.undo()
    assert (tmp_path / "out" / "train_config.json").is_file() and not (tmp_path / "out" / LOCK).exists()
    assert dreambooth.train(**base_args(resolution=32, max_train_steps=1))["steps"] == 1  # other settings too


def together(commands: list[list[str]], timeout: float = 300) -> list[tuple[int, str]]:
    """The commands run at the same time; each one's (exit code, stderr)."""
    with ThreadPoolExecutor(len(commands)) as pool:
        done = list(pool.map(lambda cmd: run_bounded(cmd, timeout), commands))
    return [(proc.returncode, proc.stderr) for proc in done]


def test_two_runs_started_together_on_one_folder_one_is_refused(base_args, tmp_path):
    run = [sys.executable, "-m", "dreambooth", "train"]
    common = dict(max_train_steps=6, with_prior_preservation=False, class_prompt=None, class_data_dir=None)
    results = together([[*run, *to_argv(base_args(seed=seed, **common))] for seed in (1, 2)])
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "in use by another dreambooth process" in refused or "holds a finished run" in refused
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    winner = next(i for i, (code, _) in enumerate(results) if code == 0)
    assert summary["seed"] == (1, 2)[winner]  # the folder holds the run that said "done", whole


def test_identical_runs_started_together_do_not_race_on_the_checkpoint_folder(base_args, tmp_path):
    run = [sys.executable, "-m", "dreambooth", "train"]
    args = base_args(max_train_steps=4, checkpointing_steps=2, with_prior_preservation=False, class_prompt=None,
                     class_data_dir=None)
    results = together([[*run, *to_argv(args)]] * 2)
    assert sorted(code for code, _ in results) == [0, 2], results
    assert all("Traceback" not in err for _, err in results)
    assert not list((tmp_path / "out").glob(".checkpoint-*"))


# -- checkpoints ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["unet/diffusion_pytorch_model.safetensors", "optimizer.safetensors",
                                    "state.json"])
def test_a_damaged_newest_checkpoint_is_named_and_the_newest_intact_one_offered(base_args, tmp_path, capsys,
                                                                                damage):
    args = base_args(max_train_steps=4, checkpointing_steps=2)
    assert main(["train", *to_argv({**args, "max_train_steps": 4})]) == 0
    out = tmp_path / "out"
    path = out / "checkpoint-4" / damage
    os.truncate(path, path.stat().st_size // 2)
    line = one_line_error(capsys, ["train", *to_argv({**args, "max_train_steps": 6,
                                                      "resume_from_checkpoint": "latest"})])
    assert f"checkpoint-4 is damaged ({damage} has" in line
    assert "--resume_from_checkpoint checkpoint-2" in line
    summary = dreambooth.train(**{**args, "max_train_steps": 6}, resume_from_checkpoint="checkpoint-2")
    assert summary["steps"] == 6 and summary["resumed_from"].endswith("checkpoint-2")


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(base_args, tmp_path, monkeypatch, capsys):
    import dreambooth.checkpoint as checkpoint

    real = checkpoint.save_file

    def full_at_step_4(tensors, path, *a, **k):
        if ".checkpoint-4.tmp" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", full_at_step_4)
    args = base_args(max_train_steps=4, checkpointing_steps=2)
    line = one_line_error(capsys, ["train", *to_argv(args)])
    assert "No space left on device" in line and "checkpoint-2 (the newest complete checkpoint) is kept" in line
    out = tmp_path / "out"
    assert not list(out.glob(".checkpoint-*")) and not (out / LOCK).exists()
    monkeypatch.undo()
    assert dreambooth.train(**args, resume_from_checkpoint="latest")["steps"] == 4


def test_a_read_only_output_is_one_line(base_args, tmp_path, monkeypatch, capsys):
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    line = one_line_error(capsys, ["train", *to_argv(base_args(output_dir=str(tmp_path / "ro" / "out")))])
    assert "Read-only file system" in line and "nothing was written" in line


def test_resume_adds_up_the_wall_time(base_args, tmp_path):
    from test_resume import Killed, kill_after_checkpoint

    args = base_args(max_train_steps=4, checkpointing_steps=2)
    with pytest.MonkeyPatch.context() as mp:
        kill_after_checkpoint(mp, at_step=2)
        with pytest.raises(Killed):
            dreambooth.train(**args)
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "state.json").read_text())
    summary = dreambooth.train(**args, resume_from_checkpoint="latest")
    assert state["wall_time_s"] > 0
    assert summary["wall_time_s"] == pytest.approx(state["wall_time_s"] + summary["wall_time_this_invocation_s"],
                                                   abs=0.05)  # both rounded to 0.01 s, taken a moment apart


# -- other commands ------------------------------------------------------------------------------------------------


def test_generate_keeps_a_users_grid_and_reuses_its_own_folder(tiny_model, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "grid.png").write_bytes(b"the user's picture")
    argv = ["generate", "--model", str(tiny_model), "--prompt", "a dog", "--num_images", "1",
            "--num_inference_steps", "1", "--device", "cpu"]
    assert "not written by `dreambooth generate`" in one_line_error(capsys, [*argv, "--output_dir", str(mine)])
    assert (mine / "grid.png").read_bytes() == b"the user's picture"
    for _ in range(2):  # its own folder again: allowed
        assert main([*argv, "--output_dir", str(tmp_path / "samples")]) == 0
    assert (tmp_path / "samples" / "grid.png").is_file()


def test_evaluate_whose_model_fails_to_load_leaves_no_folder(tiny_model, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "unet")
    one_line_error(capsys, ["evaluate", "--backend", "toy", "--subject", "circle", "--model", str(broken),
                            "--identifier", "zwx", "--output_dir", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()


def test_an_export_that_finds_its_output_taken_meanwhile_keeps_it(base_args, tmp_path, monkeypatch, capsys):
    import dreambooth.single_file as single_file

    dreambooth.train(**base_args(with_prior_preservation=False, class_prompt=None, class_data_dir=None,
                                 max_train_steps=1))
    out = tmp_path / "m.safetensors"
    real = single_file.pipeline_to_ldm

    def another_export_finishes_first(*a, **k):
        out.write_bytes(b"the other export")
        return real(*a, **k)

    monkeypatch.setattr(single_file, "pipeline_to_ldm", another_export_finishes_first)
    line = one_line_error(capsys, ["export", "--model", str(tmp_path / "out"), "--format", "single-file",
                                   "--output", str(out)])
    assert "appeared while exporting" in line and out.read_bytes() == b"the other export"
    assert [p.name for p in tmp_path.glob(".m.safetensors*")] == []


def test_evaluate_keeps_a_users_report(tiny_model, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text('{"mine": true}')
    (mine / "report.md").write_text("# my notes")
    line = one_line_error(capsys, ["evaluate", "--backend", "toy", "--subject", "circle", "--model",
                                   str(tiny_model), "--identifier", "zwx", "--output_dir", str(mine)])
    assert "not written by `dreambooth evaluate`" in line
    assert (mine / "report.json").read_text() == '{"mine": true}' and (mine / "report.md").read_text() == "# my notes"


def test_evaluate_summary_refuses_non_reports_and_foreign_output_files(tmp_path, capsys):
    report = {"backend": "toy", "metrics": {"subject": {"value": 0.5}},
              "per_prompt": [{"unit_scores": {"subject": [0.5, 0.5]}}], "class_prompt": {"unit_scores": {}}}
    (tmp_path / "a.json").write_text(json.dumps(report))
    (tmp_path / "other.json").write_text(json.dumps({"loss": 1.0}))
    assert "is not a report of `dreambooth evaluate` (it has no backend" in one_line_error(
        capsys, ["evaluate-summary", str(tmp_path / "other.json")])
    (tmp_path / "theirs.json").write_text("keep")
    assert "already exists and was not written" in one_line_error(
        capsys, ["evaluate-summary", str(tmp_path / "a.json"), "--output", str(tmp_path / "theirs.json")])
    assert (tmp_path / "theirs.json").read_text() == "keep"
    for _ in range(2):  # a summary it wrote is replaced
        assert main(["evaluate-summary", str(tmp_path / "a.json"), "--output", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["subjects"] == 1


def test_export_into_a_read_only_place_is_one_line_and_leaves_nothing(base_args, tmp_path, monkeypatch, capsys):
    dreambooth.train(**base_args(with_prior_preservation=False, class_prompt=None, class_data_dir=None,
                                 max_train_steps=1))

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", read_only)
    out = tmp_path / "x" / "model.safetensors"
    line = one_line_error(capsys, ["export", "--model", str(tmp_path / "out"), "--format", "single-file",
                                   "--output", str(out)])
    assert "Read-only file system" in line and not out.exists() and not list(out.parent.glob(".*"))


def test_identifier_names_an_unknown_class_noun_and_refuses_a_negative_top(tiny_model, capsys):
    assert main(["identifier", "--model", str(tiny_model), "--class_noun", "zebra", "--top", "2"]) == 0
    err = capsys.readouterr().err
    assert "class noun 'zebra' is not a word of this model's vocabulary" in err
    assert "top=-3 is not allowed" in one_line_error(capsys, ["identifier", "--model", str(tiny_model), "--top",
                                                                "-3"])


def test_a_config_that_is_a_folder_is_named(base_args, tmp_path, capsys):
    assert "is a folder" in one_line_error(capsys, ["train", "--config", str(tmp_path)])


def test_accumulating_past_the_images_warns(base_args, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="dreambooth"):
        dreambooth.train(**base_args(with_prior_preservation=False, class_prompt=None, class_data_dir=None,
                                     train_batch_size=1, gradient_accumulation_steps=12, max_train_steps=1))
    assert "--gradient_accumulation_steps 12" in caplog.text and "3 passes over the 4 training images" in caplog.text


def test_running_out_of_memory_is_one_line(base_args, monkeypatch, capsys):
    from dreambooth.latent_cache import LatentCache

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 68719476736 bytes")

    monkeypatch.setattr(LatentCache, "moments", oom)
    line = one_line_error(capsys, ["train", *to_argv(base_args())])
    assert "out of memory" in line and "--resolution 64" in line and "--gradient_checkpointing" in line


def test_class_images_are_only_read_when_nothing_is_missing(base_args, tmp_path, monkeypatch):
    import dreambooth.prior as prior

    dreambooth.train(**base_args(max_train_steps=1))
    manifest = (tmp_path / "class" / "dreambooth_manifest.json").read_text()

    def no_writes(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(prior, "write_text_atomic", no_writes)  # a shared, read-only class folder
    summary = dreambooth.train(**base_args(max_train_steps=1, output_dir=str(tmp_path / "second")))
    assert summary["class_images"]["reused"] == 4
    assert (tmp_path / "class" / "dreambooth_manifest.json").read_text() == manifest


# -- real file systems: a read-only mount and a full one (in a user namespace, where the kernel allows one) ------


def _namespaces_work() -> bool:
    """Whether this kernel lets an unprivileged process mount a tmpfs and a read-only bind in its own namespace."""
    probe = ("d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && mount --bind $d $d && "
             "mount -o remount,ro,bind $d $d && ! touch $d/x 2>/dev/null")
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_mounts = pytest.mark.skipif(not _namespaces_work(), reason="mounts in an unprivileged user namespace (unshare "
                                  "-rm) are not permitted here; the monkeypatched cases above cover the same paths")


def in_namespace(mounts: str, commands: list[list[str]]) -> str:
    """Run `mounts` (sh) then each dreambooth command in a private mount namespace; print each exit code."""
    runs = "; ".join(" ".join(map(shlex.quote, [sys.executable, "-m", "dreambooth", *c])) + ' 2>&1; echo "rc=$?"'
                     for c in commands)
    # three fresh processes (each imports torch, loads the model) on a 2-core CPU other work may load: 600 s was
    # seen too short at load average 11; the suite's hang guard (900 s a test) stays the outer bound
    proc = run_bounded(["unshare", "-rm", "sh", "-c", f"{mounts} && {{ {runs}; }}"], 780)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@needs_mounts
def test_a_full_disk_during_a_checkpoint_on_a_real_file_system(base_args, tmp_path):
    out = tmp_path / "small-disk"
    out.mkdir()
    args = base_args(output_dir=str(out), max_train_steps=4, checkpointing_steps=2, with_prior_preservation=False,
                     class_prompt=None, class_data_dir=None)
    # checkpoint-2 takes about 9.7 MB (UNet, AdamW moments): 14 MB hold one checkpoint, not two
    log = in_namespace(f"mount -t tmpfs -o size=14m tmpfs {shlex.quote(str(out))}",
                       [["train", *to_argv(args)]])
    errors = [line for line in log.splitlines() if "dreambooth train: error:" in line]
    assert "rc=2" in log and "Traceback" not in log and len(errors) == 1, log
    assert "No space left on device" in errors[0] and "checkpoint-2 (the newest complete checkpoint) is kept" in (
        errors[0])


@needs_mounts
def test_read_only_output_and_a_read_only_class_folder_on_a_real_file_system(base_args, tmp_path):
    dreambooth.train(**base_args(max_train_steps=1))  # fills the class folder
    ro, cls = tmp_path / "ro", tmp_path / "class"
    ro.mkdir()
    read_only = " && ".join(f"mount --bind {shlex.quote(str(d))} {shlex.quote(str(d))} && "
                            f"mount -o remount,ro,bind {shlex.quote(str(d))}" for d in (ro, cls))
    log = in_namespace(read_only, [
        ["train", *to_argv(base_args(max_train_steps=1, output_dir=str(ro / "out")))],
        ["train", *to_argv(base_args(max_train_steps=1, output_dir=str(tmp_path / "second")))],
        ["export", "--model", str(tmp_path / "out"), "--format", "single-file", "--output",
         str(ro / "m.safetensors")],
    ])
    errors = [line for line in log.splitlines() if ": error:" in line]
    assert "Traceback" not in log and [line for line in log.splitlines() if line.startswith("rc=")] == [
        "rc=2", "rc=0", "rc=2"], log
    assert "Read-only file system" in errors[0] and "nothing was written" in errors[0]
    assert errors[1].startswith("dreambooth export: error:") and "Read-only file system" in errors[1]
    assert json.loads((tmp_path / "second" / "run_summary.json").read_text())["class_images"]["reused"] == 4


def test_a_written_safetensors_file_is_readable_by_others_as_any_new_file(tmp_path):
    """safetensors writes 0600; what we stage gets the mode a new file gets under the umask (0644 under 022), so a
    web server or another user can read an export."""
    import os

    import torch
    from safetensors.torch import save_file

    from dreambooth.files import _umask, staged

    with staged(tmp_path / "x.safetensors", exclusive=True) as tmp:
        save_file({"a": torch.zeros(1)}, str(tmp))
    with staged(tmp_path / "folder") as tmp:
        tmp.mkdir()
        save_file({"a": torch.zeros(1)}, str(tmp / "w.safetensors"))
    expected = 0o666 & ~_umask()
    for path in (tmp_path / "x.safetensors", tmp_path / "folder" / "w.safetensors"):
        assert os.stat(path).st_mode & 0o777 == expected, oct(os.stat(path).st_mode)
