"""Bit-identity guard for refactors: run a fixed set of short DreamBooth runs per model family (tiny random models
built offline, and the bundled toy models) on the CPU, and fingerprint everything they produce: the saved weights
(tensor bytes, key by key), the class images, the mean and final losses, a generated image, an export and a few toy
pretraining steps. Record the fingerprints before a refactor, check them after: a refactor that claims "no change of
behaviour" must leave every one bit-identical on the same machine.

    python benchmarks/bit_identity.py --record /tmp/before.json
    python benchmarks/bit_identity.py --check /tmp/before.json     # exit 1 and the differing entries if any differ

Fingerprints depend on the machine's CPU kernels: compare only runs of one machine and one torch build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builders the suite uses


def tensor_digest(folder: Path) -> str:
    """One hash over every tensor (name, dtype, shape, bytes) of every .safetensors file under `folder`, in path
    order; metadata (which may hold paths) is left out."""
    from safetensors import safe_open

    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):
        h.update(str(f.relative_to(folder)).encode())
        with safe_open(str(f), "pt") as st:
            for key in sorted(st.keys()):
                t = st.get_tensor(key).contiguous()
                h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
                h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def file_digest(paths) -> str:
    """One hash over the pixels of these images, in path order (not their bytes: a PNG's text chunks may hold a
    temporary folder's name)."""
    import numpy as np
    from PIL import Image

    h = hashlib.sha256()
    for p in sorted(paths):
        with Image.open(p) as im:
            h.update(np.asarray(im).tobytes())
    return h.hexdigest()[:16]


def losses(summary: dict) -> dict:
    return {k: summary.get(k).hex() if isinstance(summary.get(k), float) else summary.get(k)
            for k in ("final_loss", "mean_loss", "mean_instance_loss", "mean_prior_loss")}


def configurations(family: str) -> dict[str, dict]:
    """Per family: full fine-tuning with prior preservation and the text encoder, LoRA on both, and one with the
    extras (EMA, offset noise, a loss weighting) that touch the objective."""
    extras = ({"snr_gamma": 5.0, "offset_noise": True} if family in ("sd", "sdxl")
              else {"weighting_scheme": "logit_normal"})
    return {
        "full": dict(train_text_encoder=True),
        "lora": dict(use_lora=True, rank=4, train_text_encoder=True),
        "extras": dict(use_ema=True, **extras),
    }


def run_family(family: str, work: Path, results: dict) -> None:
    import dreambooth
    from tiny import TINY, make_images

    model = TINY[family](work / "models" / family)
    images = make_images(work / "images" / family, n=3)
    for name, extra in configurations(family).items():
        out = work / "out" / family / name
        args = dict(pretrained_model_name_or_path=str(model), instance_data_dir=str(images),
                    instance_prompt="a photo of zwx dog", class_prompt="a photo of dog",
                    with_prior_preservation=True, class_data_dir=str(work / "class" / family / name),
                    num_class_images=3, class_inference_steps=2, sample_batch_size=3, output_dir=str(out),
                    resolution=64, train_batch_size=2, max_train_steps=3, learning_rate=1e-3, seed=0,
                    checkpointing_steps=2, device="cpu", **extra)
        summary = dreambooth.train(**args)
        key = f"{family}/{name}"
        results[key] = {"weights": tensor_digest(out), "losses": losses(summary),
                        "class_images": file_digest((work / "class" / family / name).glob("*.png"))}
        if name == "full":
            shots = dreambooth.generate(model=str(out), prompt=["a photo of zwx dog"], num_images=1,
                                        num_inference_steps=3, seed=1, output_dir=str(work / "gen" / family))
            results[key]["generated"] = file_digest(shots[:-1])
        if name == "lora":
            from dreambooth.export import export
            target = work / "export" / f"{family}-merged"
            export(model=str(out), format="merged", output=str(target))
            results[key]["merged"] = tensor_digest(target)


def toy_models() -> dict:
    """The bundled toy models' folders by family (read where this version of the package keeps them)."""
    try:
        from dreambooth.toy.models import TOY_MODELS
        return {name: m.path for name, m in TOY_MODELS.items()}
    except ImportError:  # before the toy models were records
        from dreambooth.toy.demo import BUNDLED_MODELS
        return dict(BUNDLED_MODELS)


def run_toy(family: str, work: Path, results: dict) -> None:
    from PIL import Image

    import dreambooth
    from dreambooth.toy.measure import load_toy, sample, toy_train_settings
    from dreambooth.toy.pretrain import pretrain
    from dreambooth.toy.subjects import SUBJECTS

    model = toy_models()[family]
    subject = work / "toy-subject" / family
    subject.mkdir(parents=True)
    for i, img in enumerate(SUBJECTS["circle"].instance_images(4, seed=0)):
        Image.fromarray(img).save(subject / f"circle-{i}.png")
    out = work / "toy-out" / family
    args = dict(pretrained_model_name_or_path=str(model), instance_data_dir=str(subject),
                instance_prompt="a zwx circle", class_prompt="a circle", with_prior_preservation=True,
                class_data_dir=str(work / "toy-class" / family), num_class_images=4, max_train_steps=3,
                train_batch_size=2, seed=0, output_dir=str(out), device="cpu",
                **{**toy_train_settings(family), "sample_batch_size": 4, "class_inference_steps": 3})
    summary = dreambooth.train(**args)
    results[f"toy-{family}/train"] = {"weights": tensor_digest(out), "losses": losses(summary),
                                      "class_images": file_digest((work / "toy-class" / family).glob("*.png"))}
    pipe = load_toy(out)
    images = sample(pipe, ["a circle"], 2, seed=0, steps=3)
    h = hashlib.sha256(b"".join(im.tobytes() for row in images for im in row)).hexdigest()[:16]
    results[f"toy-{family}/sample"] = h
    pre = pretrain(output_dir=str(work / "toy-pre" / family), family=family, vae_steps=2, unet_steps=2,
                   images=64, batch_size=8, vae_batch_size=8, warmup_steps=1)
    results[f"toy-{family}/pretrain"] = tensor_digest(pre)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--record", type=Path, help="write the fingerprints to this JSON file")
    what.add_argument("--check", type=Path, help="compare with the fingerprints in this JSON file")
    parser.add_argument("--families", nargs="*", help="only these (default: every registered family and toy)")
    args = parser.parse_args()

    from dreambooth.families import FAMILIES

    results: dict = {}
    wanted = args.families
    with tempfile.TemporaryDirectory(prefix="bit-identity-") as tmp:
        for family in FAMILIES:
            if not wanted or family in wanted:
                run_family(family, Path(tmp), results)
        for family in toy_models():
            if not wanted or f"toy-{family}" in wanted:
                run_toy(family, Path(tmp), results)
    if args.record:
        args.record.write_text(json.dumps(results, indent=2, sort_keys=True))
        print(f"recorded {len(results)} fingerprints to {args.record}")
        return 0
    expected = json.loads(args.check.read_text())
    differ = [k for k in sorted(set(expected) | set(results)) if expected.get(k) != results.get(k)]
    for k in differ:
        print(f"DIFFERS {k}: before {expected.get(k)} after {results.get(k)}")
    print(f"{len(results) - len(differ)} of {len(results)} fingerprints identical" +
          ("" if not differ else f"; {len(differ)} differ"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
