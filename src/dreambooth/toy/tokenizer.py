"""A CLIP BPE tokenizer with its own small vocabulary, written as vocab.json + merges.txt."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

from .world import CAPTION_WORDS

# 2-3 letter tokens that never occur in a caption: identifier candidates with no prior at all.
RARE = ("zq", "vx", "kp", "qj", "xw", "jz", "wq", "zk", "zwx", "qek", "vyb", "jox", "fuh", "kiv", "pyz", "xaq")
# Common words outside the captions: a vocabulary holds more than the training set uses, and these fill the
# frequent (low-id) half of it, as common words do in a real BPE vocabulary.
EXTRA_COMMON = (
    "the", "in", "with", "and", "is", "it", "to", "at", "by", "for", "from", "one", "two",
    "dog", "toy", "car", "cup", "box", "ball", "house", "sky", "sun", "big", "tiny", "round",
    "shape", "color", "light", "dark", "bright", "left", "right", "top", "middle", "star", "heart",
)


def write_bpe_tokenizer(folder: Path, common: tuple[str, ...] | list[str], rare: tuple[str, ...] | list[str],
                        max_length: int = 16) -> CLIPTokenizer:
    """Every word becomes a single token; the common words first, so the rare ones get the last (rarest) ids."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[str] = []
    for word in list(common) + list(rare):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if f"{pieces[0]} {pieces[1]}" not in merges:
                merges.append(f"{pieces[0]} {pieces[1]}")
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    split = [w for w in list(common) + list(rare) if len(tokenizer.tokenize(w)) != 1]
    if split:
        raise RuntimeError(f"tokenizer splits {split}; reorder the word lists")
    return tokenizer


def write_toy_tokenizer(folder: Path) -> CLIPTokenizer:
    return write_bpe_tokenizer(folder, CAPTION_WORDS + list(EXTRA_COMMON), RARE + ("sks",))
