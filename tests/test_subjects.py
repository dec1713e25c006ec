"""Several subjects in one run: each trains under its own identifier and prompt, a class example comes from its
instance example's class, and the run resumes, loads and renders like a one-subject run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import to_argv
from dreambooth import schema
from dreambooth.cli import main
from dreambooth.config import TrainConfig
from dreambooth.data import DreamBoothDataset
from dreambooth.errors import ConfigError
from tiny import make_images


def config(tmp_path: Path, subjects: list, **changes) -> TrainConfig:
    values = dict(pretrained_model_name_or_path="m", instance_data_dir=str(tmp_path / "dog"),
                  instance_prompt="a photo of zwx dog", class_prompt="a photo of dog", with_prior_preservation=True,
                  class_data_dir=str(tmp_path / "class-dog"), subjects=subjects) | changes
    return schema.build(TrainConfig, values)


@pytest.mark.parametrize("subject, changes, field, words", [
    ({"instance_data_dir": "dog", "instance_prompt": "a photo of qlp dog"}, {}, "subjects[0].instance_data_dir",
     "the same folder as --instance_data_dir"),
    ({"instance_data_dir": "cat", "instance_prompt": "a photo of zwx cat", "class_prompt": "a photo of cat",
      "class_data_dir": "class-cat"}, {}, "subjects[0].identifier", "already the first subject's"),
    ({"instance_data_dir": "cat", "instance_prompt": "a photo of qlp cat", "class_prompt": "a photo of cat"}, {},
     "subjects[0].class_data_dir", "need their own folder"),
    ({"instance_data_dir": "cat", "instance_prompt": "a photo of qlp cat", "class_prompt": "a photo of cat",
      "class_data_dir": "class-dog"}, {}, "subjects[0].class_data_dir", "each class needs its own"),
    ({"instance_data_dir": "cat", "instance_prompt": "a photo of qlp cat", "class_data_dir": "class-cat"},
     {"with_prior_preservation": False, "class_prompt": None, "class_data_dir": None},
     "subjects[0].class_data_dir", "only used with --with_prior_preservation"),
    ({"instance_data_dir": "cat", "instance_prompt": "a photo of qlp cat", "identifier": "zzq"}, {},
     "subjects[0].identifier", "a word of subjects[0].instance_prompt"),
    ({"instance_data_dir": "cat"}, {}, "subjects[0].instance_prompt", "required in each entry"),
    ({"instance_data_dir": "cat", "instance_prompt": "a photo of qlp dog"}, {"eval": True}, "eval",
     "with several, run `dreambooth evaluate"),
], ids=["same-photos", "same-identifier", "other-class-no-folder", "class-folder-shared", "class-without-prior",
        "identifier-not-in-prompt", "no-prompt", "eval"])
def test_a_bad_subject_is_named_by_its_place_in_the_list(tmp_path, monkeypatch, subject, changes, field, words):
    monkeypatch.chdir(tmp_path)
    subject = {k: str(tmp_path / v) if k.endswith("_dir") else v for k, v in subject.items()}
    with pytest.raises(ConfigError) as e:
        config(tmp_path, [subject], **changes)
    assert e.value.field == field and words in str(e.value), str(e.value)


def test_subjects_come_from_a_config_table_or_json_on_the_command_line(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('instance_data_dir = "dog"\ninstance_prompt = "a zwx dog"\n'
                    '[[subjects]]\ninstance_data_dir = "cat"\ninstance_prompt = "a qlp cat"\nidentifier = "qlp"\n'
                    'repeats = 3\n')
    from_file = schema.build(TrainConfig, {**schema.load_file(toml), "pretrained_model_name_or_path": "m"})
    from_json = schema.build(TrainConfig, {"pretrained_model_name_or_path": "m", "instance_data_dir": "dog",
                                           "instance_prompt": "a zwx dog", "subjects": [
                                               '{"instance_data_dir": "cat", "instance_prompt": "a qlp cat", '
                                               '"identifier": "qlp", "repeats": 3}']})
    assert from_file.subjects == from_json.subjects
    (cat,) = from_file.subjects
    assert (str(cat.instance_data_dir), cat.identifier, cat.repeats) == ("cat", "qlp", 3)
    # what train_config.json records builds the same config again
    assert schema.build(TrainConfig, json.loads(json.dumps(schema.to_dict(from_file)))).subjects == [cat]


def test_each_class_example_is_of_its_instance_examples_class(tmp_path):
    """Two subjects of two classes, one with twice the repeats: per epoch each photo shows its repeats' worth of
    times, and every class example is an image of its instance example's class, with that class's prompt."""
    dogs = make_images(tmp_path / "dog", n=3)
    cats = make_images(tmp_path / "cat", n=2, seed=1)
    dog_class = make_images(tmp_path / "class-dog", n=4, seed=2)
    cat_class = make_images(tmp_path / "class-cat", n=3, seed=3)
    images = sorted(dogs.glob("*.png")) + sorted(cats.glob("*.png"))
    classes = sorted(dog_class.glob("*.png")) + sorted(cat_class.glob("*.png"))
    class_of = [0] * 4 + [1] * 3
    data = DreamBoothDataset(images, classes, 32, seed=0, instance_prompt_ids=[0, 0, 0, 5, 5], repeats=[1, 1, 1, 2, 2],
                             classes=([0, 0, 0, 1, 1], class_of, [1, 6]))
    assert data.epoch_length == 3 + 2 * 2
    shown = Counter()
    for position in range(3 * data.epoch_length):
        item = data[position]
        index = item["instance"]["view"][1]
        shown[index] += 1
        klass = 0 if index < 3 else 1
        assert item["instance"]["prompt"] == (0 if klass == 0 else 5)
        assert class_of[item["class"]["view"][1]] == klass
        assert item["class"]["prompt"] == [1, 6][klass]
    assert shown == {0: 3, 1: 3, 2: 3, 3: 6, 4: 6}  # three epochs


def test_two_subjects_train_resume_exactly_and_render_in_diffusers(base_args, tmp_path, monkeypatch, capsys):
    """A dog and a cat in one run with prior preservation: each class gets its own class images from its own
    prompt, the run resumes bit for bit, and diffusers' own pipeline loads the result and renders each subject."""
    from diffusers import StableDiffusionPipeline

    from test_resume import straight_and_resumed
    from test_training import same, weights

    cats = make_images(tmp_path / "cat", n=2, seed=1)
    cat = {"instance_data_dir": str(cats), "instance_prompt": "a photo of qlp cat", "class_prompt": "a photo of cat",
           "class_data_dir": str(tmp_path / "class-cat")}
    summary = straight_and_resumed(base_args, tmp_path, monkeypatch, 2, max_train_steps=4, checkpointing_steps=2,
                                   subjects=[cat], num_class_images=3)
    assert same(weights(tmp_path / "straight", "unet"), weights(tmp_path / "stopped", "unet"))
    assert [(s["identifier"], s["images"]) for s in summary["subjects"]] == [("zwx", 4), ("qlp", 2)]
    for folder, prompt in (("class", "a photo of dog"), ("class-cat", "a photo of cat")):
        manifest = json.loads((tmp_path / folder / "dreambooth_manifest.json").read_text())
        assert [s["prompt"] for s in manifest["settings"].values()] == [prompt]
        assert len(list((tmp_path / folder).glob("class-*.png"))) == 3

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "straight", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    for prompt in ("a photo of zwx dog", "a photo of qlp cat"):
        image = pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="np").images[0]
        assert image.shape == (64, 64, 3) and (image > 0).any()

    # the same subjects in another order are another run: its checkpoint is not resumed into them
    rc = main(["train", *to_argv(base_args(output_dir=str(tmp_path / "stopped"), resume_from_checkpoint="latest",
                                           max_train_steps=6)),
               "--subjects", json.dumps({**cat, "instance_prompt": "a photo of qlp kitten", "identifier": "qlp"})])
    assert rc != 0
    assert "another run (subjects:" in capsys.readouterr().err


def test_a_run_never_writes_into_a_further_subjects_photos(base_args, tmp_path, capsys):
    cats = make_images(tmp_path / "cat", n=2, seed=1)
    cat = {"instance_data_dir": str(cats), "instance_prompt": "a photo of qlp dog"}
    rc = main(["train", *to_argv(base_args(output_dir=str(cats / "out"))), "--subjects", json.dumps(cat)])
    err = capsys.readouterr().err
    assert rc != 0 and "subjects[0].instance_data_dir" in err and len(err.strip().splitlines()) == 1, err
    assert not (cats / "out").exists()
