"""Tokenizer: a checkpoint's `tokenizer.json` + `tokenizer_config.json` through the `tokenizers` package.

* The V4 chat encoder writes BOS (and every other special token) as text, so `encode` adds nothing: it only maps
  text to ids, special-token strings included (each to its single id).
* `StreamDecoder` turns ids into text deltas while they are generated, holding back bytes of a character that is
  not complete yet (byte-level BPE splits multi-byte UTF-8 characters across tokens).
* `synthetic_tokenizer_dir()` makes the tokenizer of the synthetic test models: byte-level BPE learned
  deterministically from a small built-in English text, with every V4 special string (same strings as the real
  vocabulary, BOS = 0 and EOS = 1 as in the model config), exactly `vocab_size` entries so every id a model can
  sample decodes (a vocabulary larger than the text yields merges for is topped up with placeholder tokens, as
  the real vocabulary has).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers

from dsv4c.runtime.chat.encoding import (BOS, DSML, EOS, REASONING_EFFORT_MAX_PREFIX, SPECIAL_TOKENS, THINK_END,
                                         THINK_START, render_tools)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class TokenizerError(ValueError):
    """A tokenizer directory that is missing files or does not describe a usable tokenizer."""


def _token_string(value, key: str, where: Path) -> str:
    """tokenizer_config.json writes special tokens as a string or as {"content": ..., ...} (AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise TokenizerError(f"{where}: {key!r} must be a token string or {{'content': ...}}, got {value!r}")
    return value


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, bos_token: str, eos_token: str, source: str = "<memory>"):
        self.backend, self.bos_token, self.eos_token, self.source = backend, bos_token, eos_token, source
        ids = {t: backend.token_to_id(t) for t in (bos_token, eos_token)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(f"{source}: special token(s) {missing} are not in the vocabulary")
        self._bos_id, self._eos_id = ids[bos_token], ids[eos_token]

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `path`/tokenizer.json and `path`/tokenizer_config.json (for the BOS / EOS strings)."""
        path = Path(path)
        missing = [f for f in TOKENIZER_FILES if not (path / f).is_file()]
        if missing:
            raise TokenizerError(f"tokenizer directory {path} lacks {' and '.join(missing)} (a checkpoint's tokenizer "
                                 f"needs both {TOKENIZER_FILES[0]} and {TOKENIZER_FILES[1]})")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the tokenizers package raises a bare Exception on bad files
            raise TokenizerError(f"{path / 'tokenizer.json'} is not a valid tokenizers file: {e}") from e
        config_path = path / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{config_path} is not valid JSON: {e}") from e
        for key in ("bos_token", "eos_token"):
            if config.get(key) is None:
                raise TokenizerError(f"{config_path} has no {key!r}")
        return cls(backend, _token_string(config["bos_token"], "bos_token", config_path),
                   _token_string(config["eos_token"], "eos_token", config_path), source=str(path))

    # ---- ids <-> text ---------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings map to their ids; nothing is added (no BOS)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- streaming ------------------------------------------------------------------------------------------
    def incremental_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def decode_stream(self, ids: Iterable[int], skip_special_tokens: bool = False) -> Iterator[str]:
        """Text deltas for ids as they arrive (empty deltas are not yielded); they concatenate to decode(ids)."""
        decoder = self.incremental_decoder(skip_special_tokens)
        for token_id in ids:
            if delta := decoder.push(token_id):
                yield delta
        if delta := decoder.flush():
            yield delta


class StreamDecoder:
    """Ids in, text deltas out. Decodes a short window (from the last point where the text was complete) so a
    token that only completes a multi-byte character releases it whole; U+FFFD at the window's end means "bytes
    still missing". flush() releases whatever is held (as U+FFFD if the bytes never completed)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: ids before it are fully released
        self._read = 0  # ids[_prefix:_read] decode to text already released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._decode(self.ids[self._prefix:])
        if text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for its remaining bytes
        return self._release(text)

    def flush(self) -> str:
        return self._release(self._decode(self.ids[self._prefix:]))

    def _release(self, text: str) -> str:
        released = self._decode(self.ids[self._prefix:self._read])
        if len(text) <= len(released) or not text.startswith(released):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(released):]


# ---- the synthetic tokenizer ---------------------------------------------------------------------------------
SYNTHETIC_FORMAT = 1  # bump when the construction below changes (it is part of the cache key)
_CORPUS = Path(__file__).parent / "assets" / "synthetic_corpus.txt"
# Special strings that are text-like in the chat format; the rest are control tokens (skip_special_tokens drops them).
_TEXT_LIKE_SPECIALS = (THINK_START, THINK_END, DSML)


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map, indexed by byte: printable Latin-1 bytes stand for themselves,
    the others are shifted past 255 (what the tokenizers ByteLevel pre-tokenizer emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


def _training_text() -> str:
    """The built-in English text plus the fixed prose of the chat format (tool instructions, max-effort prefix)."""
    example_tool = {"name": "get_weather", "description": "Get the weather for a specific location",
                    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}
    return "\n".join([_CORPUS.read_text(encoding="utf-8"), render_tools([example_tool]), REASONING_EFFORT_MAX_PREFIX])


def _learn_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Classic BPE: repeatedly merge the most frequent adjacent pair (ties -> the smallest pair) inside the
    byte-level pre-tokens of `text`, until `n_merges` merges or every pre-token is one symbol."""
    pre = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words: Counter[tuple[str, ...]] = Counter(tuple(piece) for piece, _ in pre.pre_tokenize_str(text))
    pairs: Counter[tuple[str, str]] = Counter()
    for word, freq in words.items():
        for pair in zip(word, word[1:]):
            pairs[pair] += freq
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges and pairs:
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word in [w for w in words if best[0] in w and best[1] in w]:
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            merged = tuple(merged)
            if merged == word:
                continue
            freq = words.pop(word)
            words[merged] += freq
            for pair in zip(word, word[1:]):
                pairs[pair] -= freq
                if pairs[pair] <= 0:
                    del pairs[pair]
            for pair in zip(merged, merged[1:]):
                pairs[pair] += freq
    return merges


def build_synthetic_tokenizer(vocab_size: int = 1024) -> tuple[tokenizers.Tokenizer, dict]:
    """(tokenizer, tokenizer_config) of the synthetic vocabulary: ids 0.. the V4 special strings (BOS 0, EOS 1),
    then the 256 byte symbols in byte order, then learned merges, then (only when the built-in text runs out of
    merges, e.g. for the real 129280-entry shape) placeholder tokens, to exactly `vocab_size` ids."""
    alphabet = _byte_alphabet()
    n_merges = vocab_size - len(SPECIAL_TOKENS) - len(alphabet)
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is too small: {len(SPECIAL_TOKENS)} special tokens + 256 bytes")
    merges = _learn_merges(_training_text(), n_merges)
    placeholders = [f"<｜place▁holder▁no▁{k}｜>" for k in range(n_merges - len(merges))]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet, *(a + b for a, b in merges),
                                                 *placeholders])}
    assert len(vocab) == vocab_size, "a merged token collides with another vocabulary entry"
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = tokenizers.decoders.ByteLevel()
    # Added tokens take the ids they already have in the vocabulary; matched in raw text before pre-tokenizing.
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in [*SPECIAL_TOKENS, *placeholders] if t not in _TEXT_LIKE_SPECIALS])
    backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in _TEXT_LIKE_SPECIALS])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False, "add_eos_token": False,  # the chat encoder writes BOS itself
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "model_max_length": 1048576, "clean_up_tokenization_spaces": False,
    }
    return backend, config


def _cache_root() -> Path:
    if os.environ.get("DSV4C_TOKENIZER_CACHE"):
        return Path(os.environ["DSV4C_TOKENIZER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsv4c" / "tokenizers"


def synthetic_tokenizer_dir(vocab_size: int = 1024, cache_dir: str | Path | None = None) -> Path:
    """A directory with tokenizer.json + tokenizer_config.json of the synthetic tokenizer, created once per content
    under `cache_dir` (default $DSV4C_TOKENIZER_CACHE, else $XDG_CACHE_HOME/dsv4c/tokenizers, else
    ~/.cache/dsv4c/tokenizers). Creation is atomic: written to a temporary directory, then renamed."""
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    key = hashlib.sha256(json.dumps([SYNTHETIC_FORMAT, vocab_size, SPECIAL_TOKENS, _training_text(),
                                     tokenizers.__version__]).encode()).hexdigest()[:16]
    final = root / f"synthetic-{vocab_size}-{key}"
    if all((final / f).is_file() for f in TOKENIZER_FILES):
        return final
    root.mkdir(parents=True, exist_ok=True)
    backend, config = build_synthetic_tokenizer(vocab_size)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        backend.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        try:
            tmp.rename(final)
        except OSError:  # another process finished first (or a broken leftover): keep a complete one
            if not all((final / f).is_file() for f in TOKENIZER_FILES):
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
