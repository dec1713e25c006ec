"""The architecture's promises: the core names no family and no plug-in, plug-ins (the toy world) register through
entry points, a validated config is frozen, and a new family is one class registered: it trains, resumes and
exports through the generic paths with no other file changed."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import dreambooth
from dreambooth import schema
from dreambooth.config import TrainConfig
from dreambooth.errors import ConfigError
from dreambooth.families import FAMILIES
from dreambooth.registry import Registry

SRC = Path(dreambooth.__file__).parent
TOY = SRC / "toy"


def modules(outside: Path | None = None):
    for path in sorted(SRC.rglob("*.py")):
        if outside is None or outside not in path.parents:
            yield path, ast.parse(path.read_text(), str(path))


def imported(path: Path, tree: ast.AST) -> list[str]:
    """The absolute names of the modules a file imports (relative imports resolved against its package)."""
    package = ["dreambooth", *path.parent.relative_to(SRC).parts]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names += [module] + [f"{module}.{a.name}" for a in node.names]
    return names


def test_no_module_outside_the_toy_world_imports_it():
    found = [f"{path.relative_to(SRC)} imports {name}" for path, tree in modules(outside=TOY)
             for name in imported(path, tree) if name == "dreambooth.toy" or name.startswith("dreambooth.toy.")]
    assert found == []


def compared_names(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each comparison with one of `names` as a string constant (==, !=, in a literal tuple)."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for side in (node.left, *node.comparators):
            items = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
            out += [(node.lineno, i.value) for i in items if isinstance(i, ast.Constant) and i.value in names]
    return out


def test_no_family_or_plugin_name_is_compared_outside_its_own_module():
    """The core reads records: a family's or the toy backend's name compared in code would be a fact about it kept
    outside it. Each family's module may name itself."""
    names = {*FAMILIES, "toy"}
    found = []
    for path, tree in modules():
        own = {path.stem} if path.parent == SRC / "families" else set()
        found += [f"{path.relative_to(SRC)}:{line} compares {name!r}" for line, name in compared_names(tree, names)
                  if name not in own]
    assert found == []


def test_the_greps_would_see_a_violation(tmp_path):
    """The two checks above find what they look for (so their empty results mean something)."""
    code = "from ..toy.demo import demo\nif family == 'sd3' or backend in ('toy', 'x'):\n    pass\n"
    tree = ast.parse(code)
    assert "dreambooth.toy.demo" in imported(SRC / "evaluation" / "x.py", tree)
    assert sorted(n for _, n in compared_names(tree, {"sd3", "toy"})) == ["sd3", "toy"]


def test_the_toy_world_registers_through_entry_points():
    from importlib.metadata import entry_points

    from dreambooth.bundled import BUNDLED
    from dreambooth.cli import COMMANDS
    from dreambooth.evaluation.backends import BACKENDS

    groups = {"dreambooth.commands": COMMANDS, "dreambooth.evaluation_backends": BACKENDS,
              "dreambooth.models": BUNDLED}
    for group, registry in groups.items():
        assert [p.value for p in entry_points(group=group)], f"no plug-in declared for {group}"
        assert registry.plugins == group
    assert {"demo", "reproduce", "toy"} <= set(COMMANDS)
    assert "toy" in BACKENDS
    from dreambooth.toy.models import TOY_MODELS

    assert {m.path for m in BUNDLED.values()} >= {m.path for m in TOY_MODELS.values()}


def test_a_plugin_registry_loads_its_group_once_on_first_read(monkeypatch):
    calls = []

    class Point:
        name, value = "mine", "json"  # any importable module stands in for a plug-in

    def fake(group):
        calls.append(group)
        return [Point()]

    monkeypatch.setattr("dreambooth.registry.entry_points", fake)
    reg: Registry[int] = Registry("thing", plugins="tests.things")
    reg.register("one")(1)
    assert calls == []
    assert list(reg) == ["one"] and "one" in reg and reg["one"] == 1
    assert calls == ["tests.things"]


def minimal_args(tmp_path: Path, tiny_model: Path, instance_dir: Path, **changes: Any) -> dict[str, Any]:
    return {**dict(pretrained_model_name_or_path=str(tiny_model), instance_data_dir=str(instance_dir),
                   instance_prompt="a photo of zwx dog", output_dir=str(tmp_path / "out"), resolution=64,
                   train_batch_size=1, max_train_steps=2, learning_rate=1e-3, seed=0, device="cpu"), **changes}


def test_a_validated_config_refuses_assignment_and_derive_makes_a_checked_copy(tmp_path, tiny_model, instance_dir):
    cfg = schema.build(TrainConfig, minimal_args(tmp_path, tiny_model, instance_dir))
    with pytest.raises(dataclasses.FrozenInstanceError, match="schema.derive"):
        cfg.resolution = 128
    changed = schema.derive(cfg, resolution=128)
    assert (cfg.resolution, changed.resolution) == (64, 128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        changed.seed = 3
    with pytest.raises(ConfigError, match="resolution"):
        schema.derive(cfg, resolution=100)  # checked again: not a multiple of 8


def test_a_run_leaves_the_callers_config_as_validated(tmp_path, tiny_model, instance_dir):
    """Defaults that need the model's family (resolution, learning rate) and the seed live on the run's own copy."""
    cfg = schema.build(TrainConfig, {**minimal_args(tmp_path, tiny_model, instance_dir, max_train_steps=1),
                                     "resolution": None, "learning_rate": None, "seed": None})
    before = schema.to_dict(cfg)
    dreambooth.train(cfg)
    assert schema.to_dict(cfg) == before
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert saved["resolution"] == FAMILIES["sd"].default_resolution and saved["learning_rate"] == 5e-6
    assert isinstance(saved["seed"], int)


def test_registering_needs_every_declared_class_attribute():
    from dreambooth.families.sd import StableDiffusion

    attrs = {k: v for k, v in vars(StableDiffusion).items() if k not in ("shard_blocks", "name", "__dict__",
                                                                          "__weakref__")}
    partial = type("NoShardBlocks", StableDiffusion.__bases__, {**attrs, "name": "no-blocks"})
    with pytest.raises(TypeError, match="shard_blocks"):
        Registry("model family").register()(partial)


# -- a new family is one class: everything else reads it from the registry ---------------------------------------

def minimal_family():
    """A family written for this test alone: SD-architecture models (one CLIP, a UNet on a DDPM schedule) under a
    name of its own, with its own hooks and defaults, and nothing else changed anywhere."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from dreambooth.families.common import DiffusersFamily, TextPart

    class Minimal(DiffusersFamily):
        name = "minimal-test-family"
        pipeline_classes = ("MinimalTestPipeline",)  # no real model is detected as this family
        pipeline_class = StableDiffusionPipeline
        denoiser_name = "unet"
        shard_blocks = ("down_blocks", "mid_block", "up_blocks")
        denoiser_class = UNet2DConditionModel
        scheduler_class = DDPMScheduler
        text_parts = (TextPart("tokenizer", "text_encoder", CLIPTextModel),)
        load_options = {"safety_checker": None, "requires_safety_checker": False}
        optional_parts = ("feature_extractor",)
        default_resolution = 64
        lora_learning_rate = 7e-4
        objective = "ddpm"
        default_sampler = "ddim"
        default_guidance = 5.0
        default_lora_targets = ("to_q", "to_v")
        trained_text_encoders = ("text_encoder",)

        def encode(self, c, input_ids, cfg, text_encoders=None):
            encoder = {**c.text_encoders, **(text_encoders or {})}["text_encoder"]
            return {"encoder_hidden_states": encoder(input_ids["text_encoder"].to(encoder.device))[0]}

        def denoiser_call(self, c, denoiser, cond, batch, cfg):
            return lambda noisy, t: denoiser(noisy, t, **cond).sample

    return Minimal


@pytest.fixture
def registered_family():
    cls = minimal_family()
    FAMILIES.register()(cls)
    try:
        yield cls
    finally:
        FAMILIES.unregister(cls.name)


def test_a_new_family_registers_trains_resumes_and_exports_through_the_generic_paths(
        registered_family, tmp_path, tiny_model, instance_dir):
    from dreambooth.config import TrainConfig as Fresh
    from dreambooth.export import export

    name = registered_family.name
    help_text = schema.help_of(schema.fields(Fresh)["learning_rate"])
    assert f"7e-4 for {name}" in help_text  # its defaults appear in --help with no help text edited
    args = minimal_args(tmp_path, tiny_model, instance_dir, family=name, use_lora=True, checkpointing_steps=1,
                        learning_rate=None, resolution=None, with_prior_preservation=True,
                        class_prompt="a photo of dog", class_data_dir=str(tmp_path / "class"), num_class_images=2,
                        class_inference_steps=2)
    straight = dreambooth.train(**{**args, "output_dir": str(tmp_path / "straight")})
    assert straight["family"] == name and straight["learning_rate"] == 7e-4 and straight["steps"] == 2
    dreambooth.train(**{**args, "max_train_steps": 1})
    resumed = dreambooth.train(**args, resume_from_checkpoint="latest")
    assert resumed["resumed_from"] and resumed["steps"] == 2
    from safetensors.torch import load_file

    from dreambooth.lora import LORA_WEIGHTS

    a, b = (load_file(str(tmp_path / d / LORA_WEIGHTS)) for d in ("straight", "out"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resumed bit for bit
    merged = export(model=str(tmp_path / "out"), format="merged", output=str(tmp_path / "merged"))
    assert (merged / "model_index.json").is_file() and any((merged / "unet").glob("*.safetensors"))


def test_every_registered_family_has_a_tiny_model_for_the_family_suite():
    from tiny import TINY

    assert set(TINY) == set(FAMILIES), "a new family needs its tiny builder in tests/tiny.py (TINY)"


def test_the_toy_world_has_no_import_circles():
    """Counting the imports inside functions too: a circle between two toy modules means one concern in two."""
    graph = {}
    for path, tree in modules():
        if TOY in path.parents:
            name = "dreambooth.toy." + path.stem
            graph[name] = {m for m in imported(path, tree) if m.startswith("dreambooth.toy.")
                           and m.count(".") == 2 and m != name}
    found = []

    def visit(node, trail):
        for nxt in sorted(graph.get(node, ())):
            if nxt in trail:
                found.append(" -> ".join([*trail[trail.index(nxt):], nxt]))
            elif nxt in graph:
                visit(nxt, [*trail, nxt])

    for start in graph:
        visit(start, [start])
    assert found == []
