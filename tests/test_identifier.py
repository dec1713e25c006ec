import logging
import string

import pytest

import dreambooth
from dreambooth.cli import main
from dreambooth.errors import DataError
from dreambooth.families import ModelSource, get_family
from dreambooth.identifier import (
    _pieces,
    candidates,
    check,
    distinct_identifiers,
    infer_identifier,
    rank,
    shared_pieces,
)
from tiny import RARE, write_t5_tokenizer


def load(tiny_model):
    source = ModelSource(str(tiny_model))
    return get_family(source).load_text(source)


def test_candidates_are_rare_single_short_tokens(tiny_model):
    tokenizer, _ = load(tiny_model)
    found = candidates(tokenizer)
    assert [c.token for c in found[: len(RARE)]] == RARE[::-1]  # the latest-merged words come first
    assert all(len(c.token) <= 3 and len(tokenizer(c.token, add_special_tokens=False).input_ids) == 1
               for c in found)
    assert [c.token_id for c in found] == sorted((c.token_id for c in found), reverse=True)


def test_rank_orders_by_measured_prior(tiny_model):
    tokenizer, encoder = load(tiny_model)
    ranked = rank(tokenizer, encoder, "dog", top=5)
    shifts = [c.shift for c in ranked]
    assert len(ranked) == 5 and shifts == sorted(shifts) and all(s >= 0 for s in shifts)


def test_check_reports_splits_and_known_bad(tiny_model):
    tokenizer, encoder = load(tiny_model)
    assert check(tokenizer, encoder, "zwx", "dog").pieces == ["zwx"]
    split = check(tokenizer, encoder, "zwxqek", "dog")
    assert len(split.pieces) > 1 and "".join(split.pieces) == "zwxqek" and "splits into" in split.problems[0]
    assert "rifle" in check(tokenizer, encoder, "sks", "dog").problems[0]


def test_infer_identifier():
    assert infer_identifier("a photo of zwx dog", "a photo of dog") == "zwx"
    assert infer_identifier("a zwx dog", None) is None


def test_cli_lists_and_checks(tiny_model, capsys):
    assert main(["identifier", "--model", str(tiny_model), "--class_noun", "dog", "--top", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    tokenizer, _ = load(tiny_model)
    listed = [line.split()[0] for line in lines[1:]]
    shifts = [float(line.split()[2]) for line in lines[1:]]
    assert len(listed) == 3 and "dog" not in listed and shifts == sorted(shifts)
    assert set(listed) <= {c.token for c in candidates(tokenizer)}
    assert main(["identifier", "--model", str(tiny_model), "--class_noun", "dog", "--check", "zwxqek"]) == 1
    assert "splits into" in capsys.readouterr().out


def test_train_warns_about_a_split_identifier(base_args, caplog):
    with caplog.at_level(logging.WARNING, logger="dreambooth"):
        dreambooth.train(**base_args(instance_prompt="a photo of zwxqek dog", max_train_steps=1))
    assert "'zwxqek' splits into 3 tokens" in caplog.text


def test_no_suggestion_is_a_word_of_the_toy_world(capsys):
    """`dreambooth identifier` on the bundled toy models: every suggestion is a string with no meaning, never a word
    the toy world's captions use nor a common word its vocabulary holds (as "big" and "box" once were)."""
    from dreambooth.toy.demo import toy_model
    from dreambooth.toy.tokenizer import EXTRA_COMMON
    from dreambooth.toy.world import CAPTION_WORDS

    words = set(CAPTION_WORDS) | set(EXTRA_COMMON)
    for family in ("sd", "sd3"):
        assert main(["identifier", "--model", str(toy_model(family, None)), "--class_noun", "circle",
                     "--top", "50"]) == 0
        listed = [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()[1:]]
        assert len(listed) >= 8 and not set(listed) & words, listed


def test_words_with_a_meaning_are_never_candidates(tmp_path):
    """A vocabulary whose rarest part holds words and abbreviations beside meaningless strings (as a real BPE
    vocabulary's does): only the meaningless ones are offered, "sks" (a rifle in SD 1.x) neither."""
    from dreambooth.identifier import known_words
    from dreambooth.toy.tokenizer import write_bpe_tokenizer

    meaningful = ["big", "box", "nyc", "btw", "lol", "ufo", "dj", "ok", "tv", "Dog"]
    tokenizer = write_bpe_tokenizer(tmp_path / "tok", ["the", "photo", "of", "dog"],
                                    [*(w.lower() for w in meaningful), "sks", "qek", "zwx", "vyb", "xaq"])
    assert {w.lower() for w in meaningful} <= known_words()
    assert [c.token for c in candidates(tokenizer)] == ["xaq", "vyb", "zwx", "qek"]


def clip_tokenizer(folder):
    """CLIP's real tokenizer, built offline from its BPE merges as CLIP builds it: the 256 byte characters, each
    also as a word end, then one token per merge, then the two special tokens (49,408 in all)."""
    import gzip
    import json
    from pathlib import Path

    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    data = Path(__file__).parent / "data" / "clip_bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(data, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = [*chars, *(c + "</w>" for c in chars), *("".join(m.split()) for m in merges),
             "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def test_on_clips_real_vocabulary_the_candidates_have_no_meaning(tmp_path):
    """On the vocabulary SD's CLIP text encoders read: hundreds of candidates, each one whole token of 2-3 letters
    from the rarest half, none an English word, abbreviation, class or prompt word, nor "sks"; and a word the
    picker refuses is in that vocabulary as a single rare token (the refusal is what keeps it out, not luck)."""
    from dreambooth.identifier import STOPWORDS, known_words

    tokenizer = clip_tokenizer(tmp_path / "clip")
    assert len(tokenizer) == 49408 and tokenizer.tokenize("a photo of sks dog") == [
        "a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>"]
    found = candidates(tokenizer)
    words = [c.token for c in found]
    assert len(words) >= 200
    assert not set(words) & (known_words() | STOPWORDS | {"sks", "dog", "cat", "car", "toy", "box"})
    assert all(2 <= len(w) <= 3 and w.isalpha() and len(tokenizer.tokenize(w)) == 1 for w in words)
    assert all(c.token_id >= len(tokenizer) // 2 for c in found)
    vocab = tokenizer.get_vocab()
    refused = [w for w in known_words() if vocab.get(w + "</w>", 0) >= len(tokenizer) // 2]
    assert len(refused) >= 100, refused  # real words sit in the rare half too: without the list they'd be offered


def test_a_byte_level_vocabulary_gets_candidates_and_measured_priors(tmp_path, capsys):
    """Qwen3's byte-level BPE (Flux.2 klein, Z-Image) marks a word by the space before it ("Ġzwx"), not CLIP's
    "</w>" after it: its rare whole words are the candidates, one token each as they occur in a prompt, ranked by
    the language model's prior (the mean of its last states: it pools nothing)."""
    from tiny import make_tiny_z_image

    model = make_tiny_z_image(tmp_path / "z")
    tokenizer, encoder = load(model)
    found = [c.token for c in candidates(tokenizer)]
    assert set(RARE) <= set(found) and not {"dog", "photo", "a"} & set(found)
    assert check(tokenizer, encoder, "zwx", "dog").pieces == ["zwx"]
    assert len(check(tokenizer, encoder, "zwxqek", "dog").pieces) > 1
    assert main(["identifier", "--model", str(model), "--class_noun", "dog", "--top", "3"]) == 0
    listed = capsys.readouterr().out
    assert sum(word in listed for word in found) >= 3


def letters_t5_tokenizer():
    """A T5 (Unigram) tokenizer that knows single letters only, as a real T5 knows few rare strings: "zwx" reads as
    "▁" + "z" + "w" + "x", so two rare words that share a letter share a piece."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    return T5Tokenizer(vocab=vocab + [(c, -2.0) for c in string.ascii_lowercase], extra_ids=0)


def assert_distinct(tokenizers, words):
    assert len({w[:2] for w in words}) == len(words)
    for tok in tokenizers.values():
        pieces = [set(_pieces(tok, w)) for w in words]
        assert all(not pieces[i] & pieces[j] for i in range(len(words)) for j in range(i + 1, len(words)))


def test_distinct_identifiers_share_no_piece_under_any_tokenizer(tiny_model):
    """With a T5 beside CLIP, a rare word that is one CLIP token but shares a letter piece under T5 with one already
    chosen is passed over; the set is the weakest-prior (or rarest) candidates that stay apart, the same each time."""
    tokenizer, encoder = load(tiny_model)
    tokenizers = {"text_encoder": tokenizer, "text_encoder_3": letters_t5_tokenizer()}
    chosen = distinct_identifiers(tokenizers, encoder, "dog", 3)
    words = [c.token for c in chosen]
    assert len(words) == 3 and [c.token for c in distinct_identifiers(tokenizers, encoder, "dog", 3)] == words
    assert_distinct(tokenizers, words)
    assert words[0] == rank(tokenizer, encoder, "dog", top=1)[0].token
    assert [c.shift for c in chosen] == sorted(c.shift for c in chosen)
    # rarest first without a class noun: xaq, pyz, kiv, fuh; then jox (x), vyb (v, y), qek (q, k), zwx (z, x) clash
    assert [c.token for c in distinct_identifiers(tokenizers, None, None, 4)] == ["xaq", "pyz", "kiv", "fuh"]
    with pytest.raises(DataError, match="found 4 identifiers .* among the 8 rarest") as e:
        distinct_identifiers(tokenizers, None, None, 5)
    assert "\n" not in str(e.value)
    # CLIP alone reads each rare word as one token of its own: all eight apart
    assert len(distinct_identifiers({"text_encoder": tokenizer}, None, None, len(RARE))) == len(RARE)


def test_shared_pieces_flags_repeats_and_overlaps(tmp_path):
    """An identifier given twice is its own line (first, for the caller to refuse); two words that T5 splits into
    overlapping pieces are flagged under T5 alone (CLIP reads each whole); a clean pair passes."""
    from tiny import write_tokenizer

    tokenizers = {"text_encoder": write_tokenizer(tmp_path / "clip"), "text_encoder_3": letters_t5_tokenizer()}
    assert shared_pieces(tokenizers, ["zwx", "qek"]) == [] == shared_pieces(tokenizers, ["zwx"])
    same = shared_pieces(tokenizers, ["zwx", "qek", "zwx"])
    assert len(same) == 1 and same[0].startswith("identifier 'zwx' is given to 2 subjects")
    overlap = shared_pieces(tokenizers, ["zwx", "jox"])
    assert len(overlap) == 1 and overlap[0].startswith("identifiers 'zwx' and 'jox' share token pieces: 'x' under "
                                                       "text_encoder_3 (z + w + x / j + o + x)")
    assert "text_encoder " not in overlap[0] and "\n" not in overlap[0]
    # the tiny T5 has a whole piece for each test word, and "▁z" + letters for others: "zab" and "zcd" share "▁z",
    # as CLIP's tiny vocabulary shares "z"; both tokenizers are named
    both = {"text_encoder": tokenizers["text_encoder"], "text_encoder_3": write_t5_tokenizer(tmp_path / "t5")}
    [line] = shared_pieces(both, ["zab", "zcd"])
    assert "'z' under text_encoder (" in line and "'\u2581z' under text_encoder_3 (" in line
    assert shared_pieces(both, ["zwx", "qek", "jox"]) == []


def test_cli_suggests_a_set_and_refuses_check_with_count(tiny_model, capsys):
    assert main(["identifier", "--model", str(tiny_model), "--class_noun", "dog", "--count", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "share a token piece" in lines[0] and len(lines) == 4
    words = [line.split()[0] for line in lines[1:]]
    shifts = [float(line.split()[2]) for line in lines[1:]]
    tokenizer, _ = load(tiny_model)
    assert set(words) <= set(RARE) and shifts == sorted(shifts)
    assert_distinct({"text_encoder": tokenizer}, words)
    assert main(["identifier", "--model", str(tiny_model), "--count", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert main(["identifier", "--model", str(tiny_model), "--check", "zwx", "--count", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "count=2 is not allowed" in captured.err
