from __future__ import annotations

import os
import sys
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


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped, with the reason, where there is none (CI, the 2-core CPU machine)."""
    import torch

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


@pytest.fixture(scope="module", params=["sd", "sdxl", "sd3", "flux"])
def tiny(request, tmp_path_factory):
    """(family name, its tiny pipeline folder), for every registered family (test_families checks the list)."""
    return request.param, TINY[request.param](tmp_path_factory.mktemp("models") / request.param)


@pytest.fixture
def family_args(base_args, tiny):
    from dreambooth.families import FAMILIES

    family, model = tiny
    extra = {"max_sequence_length": T5_TOKENS} if "max_sequence_length" in FAMILIES[family].options else {}
    return lambda **changes: base_args(**{"pretrained_model_name_or_path": str(model), **extra, **changes})
