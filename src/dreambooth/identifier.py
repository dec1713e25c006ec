"""The rare-token identifier [V]: find candidates in the model's own vocabulary and measure their prior.

The paper samples rare tokens that decode to <= 3 characters. With a BPE tokenizer, merges are learnt in frequency
order, so a later token id is a rarer string; among such candidates we rank by a measured prior: how far adding the
token moves the text encoder's pooled output for "a [token] [class]" away from "a [class]". A token that barely
moves it has little meaning to overwrite, which is what DreamBooth wants.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import DataError
from .schema import at_least, option

log = logging.getLogger("dreambooth")


@dataclasses.dataclass
class IdentifierConfig:
    pretrained_model_name_or_path: str = option(help="Pipeline folder or hub id", aliases=("--model",))
    class_noun: str | None = option(None, "The class noun, e.g. dog (needed to measure the prior)")
    check: str | None = option(None, "Check this one identifier instead of listing candidates")
    top: int = option(20, "How many candidates to list", check=at_least(1))
    count: int = option(1, "How many distinct identifiers to suggest, for several subjects in one run (no two share "
                           "a token piece)", check=at_least(1))
    revision: str | None = option(None, "Hub revision of the model")
    variant: str | None = option(None, "Weight variant of the model files, e.g. fp16")


# Identifiers known to carry a strong prior in popular checkpoints, whatever our measurement says.
KNOWN_BAD = {"sks": "in Stable Diffusion 1.x/2.x 'sks' draws a rifle (SKS carbine) into images"}
STOPWORDS = {"a", "an", "the", "of", "photo", "picture", "image", "in", "on", "with", "and", "my", "our", "style"}
WORD_END = "</w>"  # CLIP's BPE marks a word's last piece
WORD_START = "\u0120"  # byte-level BPE (Qwen3: Flux.2 klein, Z-Image) marks a piece that follows a space: "Ġ"
SPACE_PIECE = "\u2581"  # SentencePiece (T5) marks a piece that follows a space: "▁"


def _in_prompt(tokenizer, word: str) -> str:
    """`word` as it occurs inside a prompt: after a space, which a byte-level BPE folds into the word's first piece
    ("a zwx dog" -> "Ġzwx"); CLIP's pre-tokenizer drops the space."""
    return " " + word if _byte_level(tokenizer) else word


def _whole(tokenizer, text: str) -> str:
    """The vocabulary piece of `text` as a whole word."""
    return WORD_START + text if _byte_level(tokenizer) else text + WORD_END


@functools.lru_cache(maxsize=8)
def _byte_level(tokenizer) -> bool:
    """A byte-level BPE without word-end pieces (CLIP's vocabulary holds "Ġ" too, as one of its 256 byte
    characters, but marks words by "</w>")."""
    vocab = tokenizer.get_vocab()
    return not any(p.endswith(WORD_END) for p in vocab) and any(p.startswith(WORD_START) and len(p) > 1
                                                               for p in vocab)


def _text_of(piece: str) -> str | None:
    """The word a whole-word vocabulary piece spells, or None for a piece inside a word."""
    if piece.endswith(WORD_END):
        return piece.removesuffix(WORD_END)
    return piece.removeprefix(WORD_START) if piece.startswith(WORD_START) else None


@dataclass
class Candidate:
    token: str  # the text the user types
    token_id: int
    shift: float | None = None  # 1 - cos(pooled("a tok class"), pooled("a class")); lower = weaker prior


@functools.cache
def known_words() -> frozenset[str]:
    """English words and abbreviations of 2-3 letters common enough to mean something to a text encoder (the list's
    header says where it comes from): "big", "box", "nyc", "btw" are never suggested."""
    lines = (Path(__file__).parent / "known_words.txt").read_text().splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def candidates(tokenizer, max_chars: int = 3, rarest_fraction: float = 0.5, min_chars: int = 2) -> list[Candidate]:
    """Single whole-word tokens of min_chars..max_chars letters from the rarest (latest-merged) part of the vocab,
    none of them a word (or abbreviation) with a meaning, nor an identifier known to draw something.

    Single letters are left out: they are frequent as initials, units and variables, so their prior is strong.
    """
    vocab = tokenizer.get_vocab()
    cutoff = int(len(vocab) * (1 - rarest_fraction))
    meaning = known_words() | STOPWORDS | set(KNOWN_BAD)
    found = []
    for piece, token_id in vocab.items():
        text = _text_of(piece)
        if text is None or token_id < cutoff or not (min_chars <= len(text) <= max_chars):
            continue
        if text.isascii() and text.isalpha() and text.lower() not in meaning and count_tokens(tokenizer, text) == 1:
            found.append(Candidate(text, token_id))
    return sorted(found, key=lambda c: -c.token_id)


def tokens_of(tokenizer, word: str) -> list[str]:
    ids = tokenizer(_in_prompt(tokenizer, word), add_special_tokens=False).input_ids
    return [t.removesuffix(WORD_END).removeprefix(WORD_START) for t in tokenizer.convert_ids_to_tokens(ids)]


def read_past(tokenizer, text: str, word: str, length: int) -> bool:
    """Whether the first `word` of `text` lies past the `length` tokens a text encoder reads (the rest is cut)."""
    import re

    found = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text)
    if found is None:
        return False
    return len(tokenizer(text[:found.end()], truncation=False).input_ids) > length  # special tokens included


def count_tokens(tokenizer, word: str) -> int:
    return len(tokenizer(_in_prompt(tokenizer, word), add_special_tokens=False).input_ids)


def unknown_word(tokenizer, word: str) -> str | None:
    """Why `word` (a class noun) is not one token of the vocabulary, or None when it is."""
    pieces = tokens_of(tokenizer, word)
    if len(pieces) == 1 and tokenizer.convert_tokens_to_ids(_whole(tokenizer, pieces[0])) not in (
            tokenizer.unk_token_id, None):
        return None
    return (f"class noun {word!r} is not a word of this model's vocabulary: it splits into {len(pieces)} tokens "
            f"({' + '.join(pieces)}), so the text encoder may not know it and the priors measured against it mean "
            "little; check the spelling or use a noun the model knows")


@torch.no_grad()
def prior_shift(tokenizer, text_encoder, words: list[str], class_noun: str, batch_size: int = 64) -> list[float]:
    """For each word: 1 - cosine(pooled("a word class"), pooled("a class")) under the text encoder."""
    def pooled(prompts: list[str]) -> torch.Tensor:
        # CLIP pads to its 77 tokens; a language model's tokenizer (Qwen3: 131,072) to the longest prompt
        length = tokenizer.model_max_length if tokenizer.model_max_length <= 512 else None
        enc = tokenizer(prompts, padding="max_length" if length else "longest", truncation=length is not None,
                        max_length=length, return_tensors="pt")
        ids, mask = enc.input_ids.to(text_encoder.device), enc.attention_mask.to(text_encoder.device)
        # (right padding behind causal attention: the prompt's own states do not depend on the mask)
        out = text_encoder(ids, output_hidden_states=True)
        # CLIPTextModel pools; CLIPTextModelWithProjection (SD3's) projects its pool; a language model (Flux.2,
        # Z-Image) pools nothing: the mean of its last hidden states over the prompt's tokens
        for name in ("pooler_output", "text_embeds"):
            if getattr(out, name, None) is not None:
                return getattr(out, name).float()
        last = out.hidden_states[-1].float()
        return (last * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    reference = pooled([f"a {class_noun}"])
    shifts: list[float] = []
    for start in range(0, len(words), batch_size):
        chunk = words[start : start + batch_size]
        emb = pooled([f"a {w} {class_noun}" for w in chunk])
        shifts += (1 - torch.nn.functional.cosine_similarity(emb, reference)).tolist()
    return shifts


def rank(tokenizer, text_encoder, class_noun: str, top: int = 20, pool: int = 256) -> list[Candidate]:
    """The `top` candidates with the weakest measured prior, out of the `pool` rarest."""
    found = [c for c in candidates(tokenizer) if c.token != class_noun][:pool]
    for cand, shift in zip(found, prior_shift(tokenizer, text_encoder, [c.token for c in found], class_noun)):
        cand.shift = shift
    return sorted(found, key=lambda c: c.shift)[:top]


def load_tokenizers(family: Any, source: Any) -> dict[str, Any]:
    """Every tokenizer of the model, by the name of the text encoder it feeds, primary first, without loading any
    text encoder (SD3's and Flux's T5-XXL is ~9 GB): the tokenizer folders the family names. {} for a family that
    names none (its primary tokenizer, from `load_text`, is then the only one)."""
    from transformers import AutoTokenizer

    from .families.common import loading

    parts = getattr(family, "present_parts", None)
    tokenizers = {}
    for part in parts(source) if parts else ():
        with loading(source, part.tokenizer):
            tokenizers[part.encoder] = AutoTokenizer.from_pretrained(source.name_or_path, subfolder=part.tokenizer,
                                                                     revision=source.revision)
    return tokenizers


def _pieces(tokenizer, word: str) -> list[str]:
    """The tokens `word` is read as in a prompt, but for T5's lone "▁" before a word it has no piece for: every such
    word starts with it, and it says nothing about the word."""
    return [p for p in dict.fromkeys(tokens_of(tokenizer, word)) if p.strip(SPACE_PIECE)]


def distinct_identifiers(tokenizers: dict[str, Any], text_encoder: Any, class_noun: str | None, count: int,
                         top_pool: int = 256) -> list[Candidate]:
    """Identifiers for several subjects trained in one run ("a zwx dog", "a qlp cat"), none of which shares a token
    piece with another under any of the model's tokenizers (what a run learns for a shared piece goes to both
    subjects), nor its first two letters (typed, "zwx" and "zwq" are easily swapped).

    Greedy in order of the weakest measured prior for `class_noun` (`rank`), or rarest first without one
    (`candidates`): the first pick is the one `dreambooth identifier` lists first.

    Args:
        tokenizers: the model's tokenizers by text encoder name, primary first: the candidates are its rare words
            and `text_encoder` reads it; the others (T5 for SD3 and Flux, which may split "zwx" into "▁z" + "wx")
            only forbid overlaps.
        text_encoder: the primary text encoder, to measure priors with; unused without a class noun.
        class_noun: the class of the subjects, e.g. "dog"; None picks by rarity alone.
        count: how many identifiers.
        top_pool: how many of the rarest candidates to choose among.

    Raises:
        DataError: fewer than `count` candidates are pairwise distinct.
    """
    primary = next(iter(tokenizers.values()))
    pool = (rank(primary, text_encoder, class_noun, top=top_pool, pool=top_pool) if class_noun
            else candidates(primary)[:top_pool])
    chosen: list[Candidate] = []
    taken: dict[str, set[str]] = {name: set() for name in tokenizers}
    prefixes: set[str] = set()
    for cand in pool:
        prefix = cand.token.lower()[:2]
        if prefix in prefixes:
            continue
        pieces = {name: set(_pieces(tok, cand.token)) for name, tok in tokenizers.items()}
        if any(pieces[name] & taken[name] for name in tokenizers):
            continue
        chosen.append(cand)
        prefixes.add(prefix)
        for name in tokenizers:
            taken[name] |= pieces[name]
        if len(chosen) == count:
            return chosen
    raise DataError(f"found {len(chosen)} identifiers that share no token piece ({', '.join(tokenizers)}) nor first "
                    f"two letters among the {len(pool)} rarest candidates, fewer than the {count} asked for; ask for "
                    "fewer, or train some subjects in a separate run")


def shared_pieces(tokenizers: dict[str, Any], words: list[str]) -> list[str]:
    """One line per problem among the identifiers of subjects trained in one run, for the run to warn with: first
    each identifier given to more than one subject (these lines start with "identifier ", the others with
    "identifiers "), then each pair that shares a token piece under some tokenizer, naming the tokenizers (by
    text encoder) and the pieces. [] when every identifier is its own."""
    counts = {w: words.count(w) for w in dict.fromkeys(words)}
    out = [f"identifier {w!r} is given to {n} subjects; each subject needs its own identifier"
           for w, n in counts.items() if n > 1]
    unique = list(counts)
    pieces = {name: {w: _pieces(tok, w) for w in unique} for name, tok in tokenizers.items()}
    for i, a in enumerate(unique):
        for b in unique[i + 1:]:
            found: dict[tuple, list[str]] = {}  # SDXL's two CLIP tokenizers split alike: one clause for both
            for name in tokenizers:
                pa, pb = pieces[name][a], pieces[name][b]
                common = tuple(p for p in pa if p in pb)
                if common:
                    found.setdefault((common, tuple(pa), tuple(pb)), []).append(name)
            if found:
                where = "; ".join(f"{' '.join(map(repr, common))} under {', '.join(names)} ({' + '.join(pa)} / "
                                  f"{' + '.join(pb)})" for (common, pa, pb), names in found.items())
                out.append(f"identifiers {a!r} and {b!r} share token pieces: {where}; what the run learns for a "
                           "shared piece goes to both subjects (`dreambooth identifier --count N` suggests a set "
                           "with none)")
    return out


def infer_identifier(instance_prompt: str, class_prompt: str | None) -> str | None:
    """The word of the instance prompt that the class prompt lacks (e.g. 'zwx' in 'a zwx dog' vs 'a dog')."""
    if class_prompt is None:
        return None
    class_words = set(class_prompt.lower().split())
    extra = [w for w in instance_prompt.split() if w.lower() not in class_words and w.lower() not in STOPWORDS]
    return extra[0] if len(extra) == 1 else None


def class_noun_after(instance_prompt: str, identifier: str) -> str | None:
    words = instance_prompt.split()
    i = words.index(identifier)
    return words[i + 1].strip(".,") if i + 1 < len(words) else None


@dataclass
class IdentifierReport:
    word: str
    pieces: list[str]
    shift: float | None = None
    percentile: float | None = None  # share of rare candidates with a weaker prior (0 = weakest)
    known_bad: str | None = None

    @property
    def problems(self) -> list[str]:
        out = []
        if len(self.pieces) > 1:
            out.append(f"identifier {self.word!r} splits into {len(self.pieces)} tokens ({' + '.join(self.pieces)}); "
                       "a single rare token binds to the subject more cleanly")
        if self.known_bad:
            out.append(f"identifier {self.word!r} has a strong prior: {self.known_bad}")
        elif self.percentile is not None and self.percentile >= 0.75:
            out.append(f"identifier {self.word!r} moves the text encoder more than {self.percentile:.0%} of rare "
                       "candidates (a strong prior that training must overwrite)")
        return out


def check(tokenizer, text_encoder, word: str, class_noun: str | None, pool: int = 128) -> IdentifierReport:
    """Token count, measured prior and its percentile among the rare candidates."""
    report = IdentifierReport(word, tokens_of(tokenizer, word), known_bad=KNOWN_BAD.get(word.lower()))
    if class_noun and text_encoder is not None:
        words = [c.token for c in candidates(tokenizer)[:pool] if c.token != word]
        shifts = prior_shift(tokenizer, text_encoder, [word, *words], class_noun)
        report.shift = shifts[0]
        if words:
            report.percentile = sum(s < shifts[0] for s in shifts[1:]) / len(words)
    return report


def warn_about_identifier(cfg: Any, c: Any, subjects: list[tuple[str | None, str]]) -> None:
    """Warnings about the run's identifiers (split into pieces, a strong prior; with several subjects, token pieces
    two of them share) from the model's own tokenizers. `subjects`: each subject's (identifier, instance prompt)."""
    for word, prompt in subjects:
        if word is None:
            continue
        report = check(c.tokenizer, c.text_encoder, word, class_noun_after(prompt, word))
        for problem in report.problems:
            log.warning("%s; `dreambooth identifier --pretrained_model_name_or_path %s --class_noun <noun>` lists "
                        "better ones", problem, cfg.pretrained_model_name_or_path)
        for name, tokenizer in list(c.tokenizers.items())[1:]:  # T5 (SD3, Flux) reads the identifier too
            pieces = tokens_of(tokenizer, word)
            if len(pieces) > 1 and type(tokenizer) is not type(c.tokenizer):
                log.info("identifier %r is %d tokens for %s (%s)", word, len(pieces), name, " + ".join(pieces))
    words = [w for w, _ in subjects if w is not None]
    for problem in shared_pieces(c.tokenizers, words) if len(words) > 1 else []:
        log.warning(problem)


def check_prompts_name_identifier(prompt: str, word: str | None, family: Any, cfg: Any, c: Any, images: list[Path],
                                  captions: list[str | None] | None, flag: str = "--instance_prompt") -> None:
    """Each prompt that names the subject (its instance prompt, `flag`, and its images' captions) names it within
    the tokens its text encoders read: a long caption with the identifier at its end would be cut before it, and
    its image would train without it. `word`: the subject's identifier (None: not known, nothing to check)."""
    if word is None:
        return
    prompts = [(flag, prompt)] + [
        (f"the caption of {image}", text) for image, text in zip(images, captions or []) if text is not None]
    lengths = {name: family.option(cfg, "max_sequence_length") if name == getattr(family, "t5_part", None)
               else tok.model_max_length for name, tok in c.tokenizers.items()}
    for what, text in prompts:
        for name, tok in c.tokenizers.items():
            if read_past(tok, text, word, lengths[name]):
                raise DataError(f"{what} names {word!r} past the {lengths[name]} tokens the text encoder reads "
                                f"({name}), so that image would train without it; shorten it or name the subject "
                                "earlier")
