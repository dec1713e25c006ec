"""What `train` refuses before it writes anything, what a resume may not change, and SIGTERM's meaning at each phase
(cases of the second adversarial pass that the trainer owns)."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from PIL import Image

import dreambooth
from conftest import to_argv
from dreambooth import training
from dreambooth.checkpoint import list_checkpoints, verify
from dreambooth.cli import main
from dreambooth.events import read_events
from test_bad_input import run_cli


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- the class folder is a place of its own ------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["instance", "inside-instance", "holds-instance", "base-model", "other-run"])
def test_a_class_folder_among_the_inputs_is_refused_and_nothing_is_written(base_args, tiny_model, instance_dir,
                                                                            tmp_path, capsys, where):
    if where == "other-run":
        dreambooth.train(**base_args(output_dir=str(tmp_path / "earlier"), max_train_steps=1))
    folder = {"instance": instance_dir, "inside-instance": instance_dir / "class", "holds-instance": tmp_path,
              "base-model": tiny_model / "class", "other-run": tmp_path / "earlier" / "class"}[where]
    watched = {p: listing(p) for p in (instance_dir, tiny_model)}
    line = run_cli(capsys, base_args(class_data_dir=str(folder), output_dir=str(tmp_path / "new")))
    assert "pass a folder of its own for --class_data_dir" in line, line
    assert {p: listing(p) for p in watched} == watched  # no class image or manifest among the photos or the model
    assert not (tmp_path / "new").exists()


# -- masks and captions that would train on nothing, or without the identifier --------------------------------------

def mask_beside(image, box) -> None:
    with Image.open(image) as img:
        mask = np.zeros((img.height, img.width), dtype=np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    Image.fromarray(mask).save(image.with_name(f"{image.stem}-masklabel.png"))


def test_a_mask_the_centre_crop_cuts_away_is_refused_and_random_crops_are_warned_about(base_args, tmp_path, capsys,
                                                                                       caplog):
    folder = tmp_path / "wide"
    folder.mkdir()
    for i in range(2):  # 160 x 64: the 64 px crop slides over 97 positions; the subject sits in the first 8 columns
        Image.new("RGB", (160, 64), (40 * i, 90, 160)).save(folder / f"img{i}.png")
        mask_beside(folder / f"img{i}.png", (0, 0, 8, 64))
    args = base_args(instance_data_dir=str(folder), masked_loss=True, max_train_steps=1)
    line = run_cli(capsys, {**args, "center_crop": True})
    assert "img0.png" in line and "outside the centre crop" in line
    with caplog.at_level("WARNING", logger="dreambooth"):
        dreambooth.train(**args)
    assert any("of its random crops hold none of the mask's subject" in r.message for r in caplog.records)


def test_captions_need_a_known_identifier(base_args, instance_dir, capsys):
    (instance_dir / "subject_0.txt").write_text("a photo of a dog on a sofa")  # names no subject at all
    line = run_cli(capsys, base_args(caption_extension=".txt", class_prompt=None, with_prior_preservation=False,
                                     class_data_dir=None))
    assert "needs the subject's identifier" in line and "--identifier" in line


def test_a_caption_whose_identifier_the_text_encoder_never_reads_is_refused(base_args, instance_dir, tmp_path,
                                                                           capsys):
    (instance_dir / "subject_0.txt").write_text("a photo " * 20 + "of zwx dog")  # the identifier after 40 words
    line = run_cli(capsys, base_args(caption_extension=".txt", output_dir=str(tmp_path / "new")))
    assert "subject_0.png" in line and "past the 16 tokens the text encoder reads" in line, line  # (tiny CLIP's)
    assert not any((tmp_path / "class").glob("*.png"))  # refused before the class images were made


# -- what a run is: a resume may not change it ----------------------------------------------------------------------

@pytest.mark.parametrize("change", [{"prior_target": "base_model"}, {"caption_extension": ".txt"},
                                    {"masked_loss": True}])
def test_a_resume_that_changes_what_the_run_learns_is_refused(base_args, instance_dir, tmp_path, capsys, change):
    for image in instance_dir.glob("*.png"):  # (the captions and masks such a resume would read)
        image.with_suffix(".txt").write_text("a photo of zwx dog")
        mask_beside(image, (0, 0, 40, 40))
    args = base_args(max_train_steps=2, checkpointing_steps=1)
    dreambooth.train(**{**args, "max_train_steps": 1})
    line = run_cli(capsys, {**args, **change, "resume_from_checkpoint": "latest"})
    key = next(iter(change))
    assert "another run" in line and key in line


def test_a_checkpoint_from_before_the_new_identity_settings_still_resumes(base_args, tmp_path):
    args = base_args(max_train_steps=2, checkpointing_steps=1)
    dreambooth.train(**{**args, "max_train_steps": 1})
    state = tmp_path / "out" / "checkpoint-1" / "state.json"
    saved = json.loads(state.read_text())
    for key in ("prior_target", "caption_extension", "masked_loss"):
        del saved["identity"][key]  # as an older version recorded it
    state.write_text(json.dumps(saved))
    manifest = tmp_path / "out" / "checkpoint-1" / "manifest.json"
    manifest.unlink()  # (the edit would otherwise read as damage)
    assert dreambooth.train(**args, resume_from_checkpoint="latest")["steps"] == 2


def test_a_resume_without_ema_leaves_no_average_of_other_weights_beside_the_result(base_args, tmp_path):
    args = base_args(max_train_steps=2, checkpointing_steps=1)
    with pytest.raises(KeyboardInterrupt):  # the first invocation ends after step 1, its ema/ written by hand
        real = training.finish

        def interrupted(run, parts):
            raise KeyboardInterrupt

        training.finish = interrupted
        try:
            dreambooth.train(**args, use_ema=True)
        finally:
            training.finish = real
    (tmp_path / "out" / "ema").mkdir()
    (tmp_path / "out" / "ema" / "train_config.json").write_text("{}")  # an earlier invocation's average
    dreambooth.train(**args, resume_from_checkpoint="latest")
    assert not (tmp_path / "out" / "ema").exists()


# -- SIGTERM: before training, twice while stopping -----------------------------------------------------------------

def test_a_stop_before_training_begins_ends_the_run_as_stopped(base_args, tmp_path, monkeypatch, capsys):
    from dreambooth import prior

    real = prior._sample

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # while the class images are made
        return real(*args, **kwargs)

    monkeypatch.setattr(prior, "_sample", signalled)
    capsys.readouterr()
    assert main(["train", *to_argv(base_args())]) == 143
    err = capsys.readouterr().err
    assert "dreambooth train: stopped on request before training began" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_stop_never_interrupts_the_save_of_the_first(base_args, tmp_path, monkeypatch, capsys):
    """Two Stop clicks 0.4 s apart: the second SIGTERM arrives while the stop's checkpoint is being written."""
    from dreambooth import checkpoint

    real_write, real_report = checkpoint._write, training.report_losses

    def report_then_signal(run, parts, pending):
        if any(step == 2 for step, _, _ in pending):
            os.kill(os.getpid(), signal.SIGTERM)
        real_report(run, parts, pending)

    def write_after_a_second_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # on the writer thread: delivered to the main thread, waiting for it
        return real_write(*args, **kwargs)

    monkeypatch.setattr(training, "report_losses", report_then_signal)
    monkeypatch.setattr(checkpoint, "_write", write_after_a_second_signal)
    args = base_args(max_train_steps=5, checkpointing_steps=100, logging_steps=1)
    capsys.readouterr()
    assert main(["train", *to_argv(args)]) == 143
    err = capsys.readouterr().err
    assert "stopped at step 2 on request; checkpoint-2 is saved" in err, err
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-2"]
    assert verify(tmp_path / "out" / "checkpoint-2") is None and not list((tmp_path / "out").glob(".checkpoint-*"))
    events, _ = read_events(tmp_path / "out" / "events.jsonl")
    assert [e["event"] for e in events][-2:] == ["checkpoint", "stopped"]


def test_a_stop_while_a_library_loads_weights_is_a_stop_not_a_damaged_file(base_args, monkeypatch, capsys):
    """diffusers turns any Exception raised while it reads a weights file into "Unable to load weights": the stop
    must pass through such a handler untouched."""
    import safetensors.torch

    real = safetensors.torch.load_file

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, inside diffusers' try/except Exception
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", signalled)
    capsys.readouterr()
    assert main(["train", *to_argv(base_args(with_prior_preservation=False, class_prompt=None,
                                             class_data_dir=None))]) == 143
    err = capsys.readouterr().err
    assert "stopped on request before training began" in err and "damaged" not in err, err
