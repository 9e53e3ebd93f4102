"""The thin runtime: load an artifact, track positions, run prefill/decode, sample outside the engine.

    eng = Engine.load("artifacts/tiny-cpu")
    s = eng.session(batch_size=2)          # independent caches (held by the executor, in its memory)
    logits = s.prefill(token_ids)          # int array [B, T] (or ragged lists) -> float32 [B, vocab]
    logits = s.decode(next_ids)            # int array [B] -> [B, vocab]
    out = eng.generate([[...], [...]], max_new_tokens=32, temperature=0.0)

The engine files are run by the executor the manifest's target names (CPU: ONNX Runtime; `emulate=True` runs
another target's bundle on ONNX Runtime with the reference implementations of its custom ops). The executor
owns each session's caches (dsv4c.targets.base.Cache); a session keeps positions and samples. A multi-device
artifact (`engine.mesh` in its manifest) gets the same protocol from dsv4c.runtime.mesh, which runs the ranks in
worker processes; `Engine.close()` (or `with Engine.load(...) as eng:`) stops them.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from dsv4c.artifact import ArtifactError, Manifest, read_manifest
from dsv4c.runtime.sampling import sample
from dsv4c.targets.base import Cache, cache_slots

PREFILL_CHUNK = 256  # tokens per prefill call: bounds activation memory for long prompts


class Engine:
    def __init__(self, root: Path, manifest: Manifest, executor, tokenizer=None):
        self.root, self.manifest, self.executor, self.tokenizer = root, manifest, executor, tokenizer
        eng = manifest.engine
        self.cache_slots = cache_slots(eng)
        self.max_batch_size = int(manifest.runtime["max_batch_size"])
        self.max_seq_len = int(manifest.runtime["max_seq_len"])
        self.vocab_size = int(eng["vocab_size"])
        self.eos_id = int(eng["eos_token_id"])

    @classmethod
    def load(cls, path: str | Path, emulate: bool = False, threads: int | None = None,
             device: str | None = None) -> "Engine":
        """`threads`: the most threads a program runs on (default: one per core; the CPU executor runs a small
        model's decode program on one, dsv4c.targets.cpu.executor.program_threads). `device` runs a TensorRT bundle
        without TensorRT: "cuda" with the Triton plugin kernels on the GPU, "cpu" with the ops' torch reference
        (dsv4c.targets.tensorrt.torch_executor)."""
        root = Path(path)
        manifest = read_manifest(root)
        kind = manifest.target
        try:
            executors = importlib.import_module(f"dsv4c.targets.{kind}.executor")
        except ModuleNotFoundError:
            raise ArtifactError(f"{root}: target {kind!r} has no executor in this dsv4c; upgrade dsv4c") from None
        if device is not None and kind != "tensorrt":
            raise ArtifactError(f"{root}: device={device!r} is for TensorRT bundles; a {kind} artifact runs on its "
                                "own executor")
        extra = {"device": device} if device is not None else {}
        if "mesh" in manifest.engine:  # multi-device: one worker process per rank (dsv4c.runtime.mesh)
            from dsv4c.runtime.mesh import load_mesh_executor

            executor = load_mesh_executor(root, manifest, emulate=emulate, threads=threads)
        else:
            executor = executors.load_executor(root, manifest, emulate=emulate, threads=threads, **extra)
        return cls(root, manifest, executor, _load_tokenizer(root))

    def close(self) -> None:
        """Release the executor's processes (a multi-device engine's workers; they also stop when the engine is
        collected or the interpreter exits). Single-device executors hold none."""
        close = getattr(self.executor, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def session(self, batch_size: int = 1) -> "Session":
        if not 1 <= batch_size <= self.max_batch_size:
            raise ValueError(f"batch_size {batch_size} outside 1..{self.max_batch_size} (the artifact's "
                             "runtime.max_batch_size; rebuild with a larger one)")
        return Session(self, batch_size)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop_tokens: Sequence[int] | None = None,
                 on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """Generate for a batch of token lists; returns the new tokens of each (stopping at a stop token,
        which is included). on_token(sequence index, token) streams tokens as they are sampled."""
        out: list[list[int]] = [[] for _ in prompts]
        for b, tok in self.stream(prompts, max_new_tokens, temperature, top_p, seed, stop_tokens):
            out[b].append(tok)
            if on_token:
                on_token(b, tok)
        return out

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None,
               stop_tokens: Sequence[int] | None = None) -> Iterator[tuple[int, int]]:
        """Yield (sequence index, token) as tokens are produced."""
        stops = set(stop_tokens if stop_tokens is not None else [self.eos_id])
        rng = np.random.default_rng(seed)
        session = self.session(len(prompts))
        logits = session.prefill([list(p) for p in prompts])
        active = np.ones(len(prompts), dtype=bool)
        for _ in range(max_new_tokens):
            nxt = sample(logits, temperature, top_p, rng)
            for b in np.flatnonzero(active):
                yield int(b), int(nxt[b])
                if int(nxt[b]) in stops:
                    active[b] = False
            if not active.any() or session.positions.max() + 1 >= self.max_seq_len:
                return
            logits = session.decode(nxt, active=active)


class Session:
    """One batch of independent sequences: their positions here, their caches a handle of the executor's."""

    def __init__(self, engine: Engine, batch_size: int, cache: Cache | None = None):
        self.engine, self.batch_size = engine, batch_size
        self.cache = cache if cache is not None else engine.executor.new_cache(batch_size)
        self.positions = np.zeros(batch_size, dtype=np.int64)

    def prefill(self, token_ids) -> np.ndarray:
        """token_ids: int array [B, T] or B lists (ragged). Continues from each sequence's current position
        (so a second prefill is a chunked prefill). -> float32 [B, vocab] at each sequence's last token."""
        rows = [list(map(int, r)) for r in (token_ids.tolist() if isinstance(token_ids, np.ndarray) else token_ids)]
        if len(rows) != self.batch_size:
            raise ValueError(f"prefill got {len(rows)} sequences for a session of batch_size {self.batch_size}")
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        if (lengths == 0).any():
            raise ValueError("prefill: every sequence needs at least one token")
        self._check_room(lengths)
        last = np.zeros((self.batch_size, self.engine.vocab_size), dtype=np.float32)
        for offset in range(0, int(lengths.max()), PREFILL_CHUNK):
            n_valid = np.clip(lengths - offset, 0, PREFILL_CHUNK)
            width = int(n_valid.max())
            tokens = np.zeros((self.batch_size, width), dtype=np.int64)
            for b, r in enumerate(rows):
                chunk = r[offset:offset + width]
                tokens[b, :len(chunk)] = chunk
            logits = self._step("prefill" if width >= 2 else "decode", tokens, n_valid)
            last[n_valid > 0] = logits[n_valid > 0]
        return last

    def decode(self, next_ids, active: np.ndarray | None = None) -> np.ndarray:
        """next_ids: int array [B] -> float32 [B, vocab]. Sequences with active=False keep their state."""
        ids = np.asarray(next_ids, dtype=np.int64).reshape(self.batch_size, 1)
        n_valid = np.ones(self.batch_size, dtype=np.int64) if active is None else active.astype(np.int64)
        self._check_room(n_valid)
        return self._step("decode", ids, n_valid)

    def prefill_slots(self, slots: Sequence[int], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Prefill (or continue prefilling) only the sequences in `slots`, one token list each: the engine runs on
        a sub-batch gathered from those slots' caches, so the other sequences are neither touched nor computed
        (a scheduler's newcomers cost what their own tokens cost). -> float32 [len(slots), vocab]."""
        idx = np.asarray(slots, dtype=np.int64)
        sub = Session(self.engine, len(idx), cache=self.cache.take(idx))
        sub.positions = self.positions[idx]
        logits = sub.prefill(token_ids)
        self.cache.put(idx, sub.cache)
        self.positions[idx] = sub.positions
        return logits

    def reset(self, slot: int) -> None:
        """Forget sequence `slot`: its caches back to their initial fill, its position back to 0 (the slot can
        then take a new sequence while the others keep theirs)."""
        self.cache.reset(slot)
        self.positions[slot] = 0

    def _step(self, program: str, tokens: np.ndarray, n_valid: np.ndarray) -> np.ndarray:
        logits = self.engine.executor.run(program, tokens, self.positions.copy(), n_valid, self.cache)
        self.positions = self.positions + n_valid
        return logits

    def _check_room(self, new_tokens: np.ndarray) -> None:
        if (self.positions + new_tokens > self.engine.max_seq_len).any():
            raise ValueError(f"sequence would exceed max_seq_len={self.engine.max_seq_len} "
                             f"(positions {self.positions.tolist()} + {new_tokens.tolist()} new tokens)")


def _load_tokenizer(root: Path):
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        return None
    from dsv4c.runtime.tokenizer import Tokenizer

    return Tokenizer.from_dir(tok_dir)


def engine_info(root: str | Path) -> dict:
    """What `dsv4c inspect` shows: the manifest plus the validation report if present."""
    root = Path(root)
    info = read_manifest(root).data
    report = root / "validation.json"
    if report.is_file():
        info["validation_report"] = json.loads(report.read_text())
    return info
