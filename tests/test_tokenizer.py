"""Tokenizer loading, special tokens, streaming detokenisation and the synthetic test-model tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

from dsv4c.graphs.config import preset
from dsv4c.runtime.chat import SPECIAL_TOKENS, encode_messages
from dsv4c.runtime.tokenizer import Tokenizer, TokenizerError, synthetic_tokenizer_dir

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "dsv4-encoding"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
MIXED = "<｜User｜>Grüße aus Zürich — 北京天气 😀👍🏽<｜Assistant｜><think>ok</think>Ça va ✓<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return synthetic_tokenizer_dir(cache_dir=tmp_path_factory.mktemp("tokcache"))


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


# ---- the synthetic tokenizer --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "tiny-b"])
def test_synthetic_tokenizer_fits_the_tiny_presets(tok, name):
    cfg = preset(name)
    assert tok.vocab_size == cfg.vocab_size  # every id the model can sample decodes
    assert (tok.bos_id, tok.eos_id) == (cfg.bos_token_id, cfg.eos_token_id)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1  # as in the real V4 vocabulary


def test_synthetic_tokenizer_is_deterministic_and_cached(tok_dir, tmp_path):
    again = synthetic_tokenizer_dir(cache_dir=tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / f).read_bytes() == (tok_dir / f).read_bytes()
    stamp = (again / "tokenizer.json").stat().st_mtime_ns
    assert synthetic_tokenizer_dir(cache_dir=tmp_path) == again  # second call: the cached directory, untouched
    assert (again / "tokenizer.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [again.name]  # no temporary directory left behind


def test_synthetic_byte_symbols_are_the_byte_level_alphabet(tok):
    """Ids after the special tokens are the 256 byte symbols, each decoding to its single byte."""
    n = len(SPECIAL_TOKENS)
    symbols = [tok.id_to_token(n + b) for b in range(256)]
    assert set(symbols) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert tok.decode([n + ord("A")]) == "A" and tok.decode([n + 0xC3, n + 0xA9]) == "é"


def test_vocab_beyond_the_built_in_merges_is_topped_up_with_placeholders(tmp_path):
    tok = Tokenizer.from_dir(synthetic_tokenizer_dir(2000, cache_dir=tmp_path))
    assert tok.vocab_size == 2000
    last = tok.decode([1999])
    assert last.startswith("<｜place▁holder▁no▁") and tok.decode([1999], skip_special_tokens=True) == ""
    assert tok.encode(last) == [1999]
    assert tok.decode(tok.encode(MIXED)) == MIXED


def test_stage_sizes_the_tokenizer_to_the_model(monkeypatch, tmp_path):
    """dsv4c.compiler.stages gives a synthetic checkpoint a tokenizer with exactly the model's vocab size."""
    from dsv4c.compiler.stages import _synthetic_tokenizer

    monkeypatch.setenv("DSV4C_TOKENIZER_CACHE", str(tmp_path))
    path = _synthetic_tokenizer(1024)
    assert path.parent == tmp_path and Tokenizer.from_dir(path).vocab_size == 1024


def test_transformers_reads_the_synthetic_tokenizer_the_same_way(tok_dir, tok):
    """An independent loader (transformers' AutoTokenizer) gives the same ids and adds no BOS either."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert hf(MIXED)["input_ids"] == tok.encode(MIXED)
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)


# ---- encode / decode ----------------------------------------------------------------------------------------
def test_round_trip_with_special_tokens_and_non_ascii(tok):
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED
    for s in ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", EOS):
        assert ids.count(tok.token_to_id(s)) == 1
    assert ids[0] == tok.token_to_id("<｜User｜>")  # no BOS added
    assert tok.encode("") == [] and tok.decode([]) == ""
    assert tok.token_to_id("<｜no such token｜>") is None
    # Control tokens are skippable; <think> / </think> are text-like and stay.
    assert tok.decode(ids, skip_special_tokens=True) == "Grüße aus Zürich — 北京天气 😀👍🏽<think>ok</think>Ça va ✓"


@pytest.mark.skipif(not VECTORS.is_dir(), reason=f"official vectors not found at {VECTORS}")
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_chat_vectors_tokenize_special_strings_to_single_ids(tok, n):
    with open(VECTORS / f"output_{n}.txt", encoding="utf-8", newline="") as f:
        text = f.read()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids[0] == tok.bos_id
    for s in SPECIAL_TOKENS:
        assert ids.count(tok.token_to_id(s)) == text.count(s), s


def test_special_tokens_inside_words_still_split_out(tok):
    text = encode_messages([{"role": "user", "content": "x<think>y"}])
    ids = tok.encode(text)
    assert ids.count(tok.token_to_id("<think>")) == 2 and tok.decode(ids) == text


# ---- streaming ----------------------------------------------------------------------------------------------
def test_stream_decoder_equals_full_decode_and_never_splits_a_character(tok):
    ids = tok.encode(MIXED * 3)
    # The test means something only if some token carries part of a character.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas = list(tok.decode_stream(ids))
    assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    skipped = list(tok.decode_stream(ids, skip_special_tokens=True))
    assert "".join(skipped) == tok.decode(ids, skip_special_tokens=True)


def test_stream_decoder_push_and_flush(tok):
    emoji = tok.encode("😀")  # four UTF-8 bytes
    assert len(emoji) > 1
    dec = tok.incremental_decoder()
    assert [dec.push(i) for i in emoji[:-1]] == [""] * (len(emoji) - 1)
    assert dec.push(emoji[-1]) == "😀"
    dec.push(emoji[0])  # an incomplete character at the end of generation comes out at flush
    assert dec.flush() == "\ufffd" and dec.flush() == ""


# ---- errors -------------------------------------------------------------------------------------------------
def test_missing_files_name_the_directory_and_file(tmp_path, tok_dir):
    with pytest.raises(TokenizerError, match=f"{tmp_path}.*tokenizer.json and tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    with pytest.raises(TokenizerError, match=f"{tmp_path} lacks tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    with pytest.raises(TokenizerError, match="has no 'bos_token'"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<nope>"},
                                                                "eos_token": EOS}))
    with pytest.raises(TokenizerError, match=r"\['<nope>'\] are not in the vocabulary"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizers file"):
        Tokenizer.from_dir(tmp_path)
