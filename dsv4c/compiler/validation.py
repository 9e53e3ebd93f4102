"""The validate stage's gate: the built engine against the PyTorch reference of the same recipe.

    prompts     `validation_prompts`: seeded prompts sized from the model so every layer type does its work — the
                sliding window wraps, every compressed layer type emits >= 2 entries, the CSA top-k binds (more
                entries than `index_topk`); a shorter prompt crosses a compression boundary during its decode steps.
    reference   `reference_steps`: per batch of at most `max_batch_size` prompts, the reference's prefill (chunked
                like the engine's) and teacher-forced decode steps: inputs, the cache before and after, the logits.
    engine      `EngineReplay`: the same steps on the engine; every decode step starts from the reference's cache,
                so the gate measures the engine's step function, not accumulated drift. Per step: a check per
                logit row and a check per sequence on the cache rows written (worst row). The build runs the
                reference's steps first, spilled to disk, and a streamed reference gives its weights back before
                the engine loads (`validate_engine`): the build's peak holds one model, not both.
    thresholds  `derive_gate`: written recipe keys win; otherwise derived. Continuous numerics (plain): the strict
                gate, every check at cosine 0.9999. DeepSeek's numerics are discontinuous (FP8 block scales, bf16
                points, FP4 indexer, top-k routing/selection): the reference against itself with its embedding
                perturbed by 1e-6 (relative) on the same steps (`Sensitivity`) measures how far two correct
                implementations can land apart, and the gate sits below that with a stated slack.
    report      `gate_report`: verdict, the first failing step/row, the thresholds and how they were obtained,
                coverage per layer type, every check.
"""

from __future__ import annotations

import dataclasses
import pickle
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from dsv4c.compiler.errors import ValidationGateError
from dsv4c.graphs.cache import from_host, host_array, row_values

GATE_VERSION = 3  # part of the validate stage's cache key: a changed gate re-validates
PREFILL_CHUNK = 256  # the runtime's chunk (dsv4c.runtime.engine.PREFILL_CHUNK); the reference prefills alike
PERTURBATION = 1e-6  # relative noise on the embedding rows of the reference's sensitivity run
SENSITIVITY_DRAWS = 2  # independent perturbations; the gate uses the worst of them
STRICT_COSINE = 0.9999  # continuous numerics: fp32 reassociation moves a row by ~1e-12, not 1e-4
ROW_COSINE = 0.999  # discontinuous numerics: the cosine a row needs to count as agreeing
# Derived gate (discontinuous numerics), from the worst sensitivity draw:
#   agreement = 1 - AGREEMENT_SLACK * (reference's own disagreement) - AGREEMENT_MARGIN, within
#               [MIN_AGREEMENT, AGREEMENT_CAP]: the engine flips roundings elsewhere than a perturbation does, and
#               34 rows estimate a rate to +-5 points; the cap keeps a lucky flip-free draw from demanding more
#               than a correct tiny engine reaches (measured 88-97 % on seeds 0-5, README "Validation").
#   floor     = 1 - FLOOR_SLACK * (1 - reference's own worst cosine) per check kind, within [MIN_FLOOR, FLOOR_CAP]:
#               the cap because a correct engine's worst row reached 0.91 (logits) / 0.87 (cache) where a draw
#               may have flipped nothing. The broken engines of tests/mutants.py fail on agreement (<= 44 %) or on
#               a missed cache write (cosine 0), far from these caps.
# Continuous numerics: the same rules without margin and caps, bounded above by the strict cosine.
AGREEMENT_SLACK, AGREEMENT_MARGIN, AGREEMENT_CAP = 2.0, 0.05, 0.8
FLOOR_SLACK, FLOOR_CAP = 4.0, 0.8
# Lower bounds, so the gate never vanishes: mini-1b's reference agrees with itself on only 47-65 % of its rows
# (516-token prompts), where the rule gives < 0, and correct mini-1b engines agree on 26.5-55.9 % (seeds 0-5,
# README "Validation"): 0.15 keeps them passing while the mutants that break most rows still fail there (0-9 %);
# at that depth the per-kind floors and the written-row cache checks carry the rest of the gate.
MIN_AGREEMENT, MIN_FLOOR = 0.15, 0.5


# ---- inputs ---------------------------------------------------------------------------------------------------
def coverage_length(cfg) -> int:
    """Tokens one sequence needs so every layer type of `cfg` does its work (see module doc)."""
    need = [cfg.sliding_window + 1]
    for ratio in set(cfg.compress_ratios[:cfg.num_hidden_layers]) - {0}:
        need.append(2 * ratio)
        if ratio == 4:
            need.append(4 * (cfg.index_topk + 1))
    return max(need)


def prompt_lengths(cfg, v, max_seq_len: int) -> list[int]:
    """The longest prompt covers everything by the end of its prefill; the others end `decode_steps // 2` (then
    3 more per prompt) before a multiple of the largest compression ratio, so their decode steps emit an entry of
    every compressed layer type. Clamped to max_seq_len - decode_steps. A written `prompt_len` keeps the old
    scheme (3 tokens shorter per prompt)."""
    room = max_seq_len - v.decode_steps
    if v.prompt_len is not None:
        return [max(2, min(v.prompt_len, room) - 3 * i) for i in range(v.prompts)]
    longest = min(coverage_length(cfg), room)
    largest = max(cfg.compress_ratios[:cfg.num_hidden_layers]) or cfg.sliding_window
    boundary = longest // largest * largest or longest  # no boundary fits the context: just shorter
    second = min(longest - 1, boundary - v.decode_steps // 2)
    return [longest] + [max(2, second - 3 * i) for i in range(v.prompts - 1)]


def validation_prompts(cfg, v, max_seq_len: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(v.seed)
    return [torch.randint(2, cfg.vocab_size, (n,), generator=gen).tolist() for n in prompt_lengths(cfg, v, max_seq_len)]


# ---- the reference --------------------------------------------------------------------------------------------
@dataclass
class RefStep:
    """One reference step of one batch: what the engine is given and what it must produce."""

    batch: int  # index of the prompt batch
    step: int  # 0: prefill, then decode steps
    sequences: list[int]  # global prompt indices of the batch rows
    prompts: list[list[int]]  # the batch's prompts (prefill input)
    tokens: np.ndarray  # decode input [B] (empty for the prefill)
    start: np.ndarray  # [B] position of the step's first token
    cache_in: list[np.ndarray]  # the cache the step starts from (the empty cache for the prefill)
    logits: np.ndarray  # [B, V] at each sequence's last token
    cache_out: list[np.ndarray]


def reference_steps(model, prompts: list[list[int]], decode_steps: int, max_batch: int,
                    max_seq_len: int) -> Iterator[RefStep]:
    """The reference's steps, batch by batch (batches of at most `max_batch` prompts)."""
    for batch, first in enumerate(range(0, len(prompts), max_batch)):
        rows = prompts[first:first + max_batch]
        sequences = list(range(first, first + len(rows)))
        empty = [host_array(c) for c in model.new_cache(len(rows), max_seq_len)]
        logits, cache = reference_prefill(model, rows, empty)
        yield RefStep(batch, 0, sequences, rows, np.zeros(0, np.int64), np.zeros(len(rows), np.int64), empty,
                      logits, cache)
        pos = np.array([len(r) for r in rows], dtype=np.int64)
        for step in range(1, decode_steps + 1):
            tokens = logits.argmax(-1)  # teacher forcing with the reference's greedy tokens
            new_logits, new_cache = reference_decode(model, tokens, pos, cache)
            yield RefStep(batch, step, sequences, rows, tokens, pos.copy(), cache, new_logits, new_cache)
            logits, cache, pos = new_logits, new_cache, pos + 1


@torch.no_grad()
def reference_prefill(model, prompts: list[list[int]], cache: list[np.ndarray],
                      chunk: int = PREFILL_CHUNK) -> tuple[np.ndarray, list[np.ndarray]]:
    """Ragged prompts from position 0, in chunks of `chunk` tokens like the runtime (bounded memory)."""
    lengths = torch.tensor([len(p) for p in prompts])
    state = tuple(from_host(c.copy()) for c in cache)
    last = torch.zeros(len(prompts), model.cfg.vocab_size)
    for offset in range(0, int(lengths.max()), chunk):
        n_valid = (lengths - offset).clamp(0, chunk)
        tokens = torch.zeros(len(prompts), int(n_valid.max()), dtype=torch.long)
        for b, p in enumerate(prompts):
            part = p[offset:offset + tokens.shape[1]]
            tokens[b, :len(part)] = torch.tensor(part, dtype=torch.long)
        logits, state = model(tokens, torch.full_like(lengths, offset).minimum(lengths), n_valid, state)
        last[n_valid > 0] = logits[n_valid > 0]
    return last.numpy(), [host_array(c) for c in state]


@torch.no_grad()
def reference_decode(model, tokens: np.ndarray, pos: np.ndarray,
                     cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    pos_t = torch.from_numpy(pos.copy())
    logits, state = model(torch.from_numpy(tokens.copy())[:, None], pos_t, torch.ones_like(pos_t),
                          tuple(from_host(c) for c in cache))
    return logits.numpy(), [host_array(c) for c in state]


# ---- weights dequantised once ---------------------------------------------------------------------------------
DEQUANT_CACHE_BYTES = 1 << 30  # decoded weights kept across calls (a bounded working set); beyond it: per call


@contextmanager
def weights_dequantised_once(max_bytes: int = DEQUANT_CACHE_BYTES):
    """The reference ops decode FP8/FP4 weights on every call (registry.decode_fp8 / decode_fp4): for a validation
    of hundreds of tokens and dozens of steps on mini-1b that was most of its time (~300 expert matrices per
    decode step). Within this context each weight is decoded once and reused — the same pure function of the same
    tensors, so the same values. Entries hold their input tensors, so no address is reused while cached; once
    `max_bytes` are held, further weights are decoded per call again. The bound keeps the validation's memory from
    growing with depth (decoded float32 is 4-8x the stored bytes: a whole model's would be the build's peak)."""
    from dsv4c.graphs.ops import registry

    originals = {name: getattr(registry, name) for name in ("decode_fp8", "decode_fp4")}
    cache: dict[tuple, tuple] = {}
    held = [0]

    def memoised(decode):
        def run(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            key = (w.data_ptr(), tuple(w.shape), w.stride(), scale.data_ptr(), tuple(scale.shape))
            if key in cache:
                return cache[key][2]
            out = decode(w, scale)
            if held[0] + out.numel() * out.element_size() <= max_bytes:
                cache[key] = (w, scale, out)
                held[0] += out.numel() * out.element_size()
            return out
        return run

    for name, fn in originals.items():
        setattr(registry, name, memoised(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(registry, name, fn)


def dequant_budget(model) -> int:
    """A streamed reference re-reads its blocks on each use (graphs.streamed): their decoded weights would never be
    asked for again, and an entry would keep a released block's tensors alive. Decode per call then."""
    streamed = getattr(model, "streamed", None)
    return 0 if streamed is not None and streamed.streaming else DEQUANT_CACHE_BYTES


# ---- comparisons ----------------------------------------------------------------------------------------------
def logit_checks(rec: RefStep, got: np.ndarray, v) -> list[dict]:
    """One check per sequence: cosine, top-1 (near-ties: reference lead <= top1_margin), KL(ref || got)."""
    ref, got = rec.logits.astype(np.float64), np.asarray(got, dtype=np.float64)
    cos = (ref * got).sum(-1) / np.maximum(np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1), 1e-300)
    top2 = np.sort(ref, -1)[:, -2:]
    near_tie = top2[:, 1] - top2[:, 0] <= v.top1_margin
    same = ref.argmax(-1) == got.argmax(-1)
    lp, lq = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return [{"check": "logits", "batch": rec.batch, "step": rec.step, "sequence": rec.sequences[b],
             "cosine": _finite(cos[b]), "top1_equal": bool(same[b]), "near_tie": bool(near_tie[b]),
             "kl": _finite(kl[b], bad=float("inf"))} for b in range(ref.shape[0])]


CACHE_KINDS = ("win", "cmp", "idx", "state")


def cache_kind(name: str) -> str:
    """The field kind of a cache tensor name: win (window ring), cmp (compressed entries), idx (indexer keys),
    state (compressor state rings). Kinds are gated apart: their rows differ in how rounding moves them."""
    field = name.rsplit(".", 1)[-1]
    return "state" if "_state_" in field else field


CacheValues = Callable[[str, np.ndarray], np.ndarray]  # (cache tensor name, its array) -> its rows as values


def cache_values(model) -> CacheValues:
    """How to read a model's cache tensors as values: packed rows (cache.RowFormat) unpacked, others as float."""
    packing = {e.name: e.packing for e in model.cache_spec(1, 1)}
    return lambda name, rows: row_values(rows, packing.get(name, ""), model.cfg)


def _as_float(name: str, rows: np.ndarray) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32)


def cache_checks(rec: RefStep, got: list[np.ndarray], names: list[str], values: CacheValues = _as_float) -> list[dict]:
    """One check per sequence and cache kind: the worst cosine over the rows of that kind the step wrote (in the
    reference or in the engine), a row being one slot of one cache tensor (a window slot, a compressed entry, a
    state row), compared as values (`values`: packed rows unpacked). A row only one side wrote (a missed or stray
    write), whose set of finite entries differs, or that is zero on one side only, counts as cosine 0."""
    worst: dict[tuple[int, str], tuple[float, str]] = {}
    written: dict[tuple[int, str], int] = {}
    for name, before, ref, eng in zip(names, rec.cache_in, rec.cache_out, got):
        kind = cache_kind(name)
        b_idx, r_idx, cos = _written_row_cosines(*(values(name, np.asarray(t)) for t in (before, ref, eng)))
        for b, r, c in zip(b_idx.tolist(), r_idx.tolist(), cos.tolist()):
            written[b, kind] = written.get((b, kind), 0) + 1
            if c < worst.get((b, kind), (2.0, ""))[0]:
                worst[b, kind] = (c, f"{name}[{r}]")
    return [{"check": f"cache.{kind}", "batch": rec.batch, "step": rec.step, "sequence": rec.sequences[b],
             "cosine": c, "row": row, "rows_written": written[b, kind]} for (b, kind), (c, row) in sorted(worst.items())]


def _written_row_cosines(before: np.ndarray, ref: np.ndarray, got: np.ndarray):
    """(batch index, row index, cosine) of every row of a [B, R, ...] cache tensor written by either side."""
    shape = (ref.shape[0], ref.shape[1], -1)
    before, ref, got = before.reshape(shape), ref.reshape(shape), got.reshape(shape)
    ref_wrote, got_wrote = (ref != before).any(-1), (got != before).any(-1)  # NaN != anything: counts as written
    b_idx, r_idx = np.nonzero(ref_wrote | got_wrote)
    one_sided = ref_wrote[b_idx, r_idx] != got_wrote[b_idx, r_idx]  # a row only one side wrote: a missed write
    r, g = ref[b_idx, r_idx].astype(np.float64), got[b_idx, r_idx].astype(np.float64)
    fr, fg = np.isfinite(r), np.isfinite(g)
    r, g = np.where(fr, r, 0.0), np.where(fg, g, 0.0)
    nr, ng = np.linalg.norm(r, axis=-1), np.linalg.norm(g, axis=-1)
    cos = (r * g).sum(-1) / np.maximum(nr * ng, 1e-300)
    cos = np.where((nr == 0) & (ng == 0), 1.0, cos)
    cos = np.where((fr != fg).any(-1) | one_sided, 0.0, cos)
    return b_idx, r_idx, cos


def _finite(x: float, bad: float = 0.0) -> float:
    return float(x) if np.isfinite(x) else bad


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.where(np.isfinite(x), x, 0.0)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---- the engine -----------------------------------------------------------------------------------------------
class EngineReplay:
    """Runs the reference's steps on an engine: the prefill from an empty cache; every decode step from the
    reference's cache (`stepped`), and also from the engine's own previous cache (`free`, reported only)."""

    def __init__(self, engine, cache_names: list[str], v, values: CacheValues):
        self.engine, self.names, self.v, self.values = engine, cache_names, v, values
        self.stepped = self.free = None

    def checks(self, rec: RefStep) -> tuple[list[dict], list[dict]]:
        """(gated checks, free-running logit checks) of one step."""
        if rec.step == 0:
            self.stepped = self.engine.session(len(rec.prompts))
            got = self.stepped.prefill(rec.prompts)
            self.free = self.engine.session(len(rec.prompts))
            self.free.cache.from_host(self.stepped.cache.to_host())
            self.free.positions = self.stepped.positions.copy()
            free = []
        else:
            self.stepped.cache.from_host(rec.cache_in)
            self.stepped.positions = rec.start.copy()
            got = self.stepped.decode(rec.tokens)
            free = logit_checks(rec, self.free.decode(rec.tokens), self.v)
        gated = logit_checks(rec, got, self.v) + cache_checks(rec, self.stepped.cache.to_host(), self.names,
                                                                 self.values)
        return gated, free


# ---- the reference against itself -----------------------------------------------------------------------------
@contextmanager
def perturbed_embedding(model, token_ids: Iterable[int], draw: int, noise: float = PERTURBATION):
    """Scale the embedding rows of `token_ids` by (1 + noise * N(0, 1)) (deterministic per draw and token) for
    the duration. The model keeps its table in BF16, which cannot hold a 1e-6 change, so the rows are scaled as
    they are read, in float32 (the reference widens them to FP32 anyway): only the used rows' factors are held,
    not a float32 copy of the table (2.1 GB at V4-Flash's vocabulary)."""
    ids = sorted(set(int(t) for t in token_ids))
    factors = torch.ones(len(ids) + 1, model.cfg.hidden_size)  # row 0: tokens left as they are
    for k, t in enumerate(ids, start=1):
        gen = torch.Generator().manual_seed(1_000_003 * (draw + 1) + t)
        factors[k] = 1 + noise * torch.randn(model.cfg.hidden_size, generator=gen)
    row = torch.zeros(model.cfg.vocab_size, dtype=torch.long)
    row[ids] = torch.arange(1, len(ids) + 1)
    shipped = model.embed_tokens
    model.embed_tokens = lambda tokens: shipped(tokens) * factors[row[tokens]]
    try:
        yield
    finally:
        del model.embed_tokens  # the class's method again


class Sensitivity:
    """The reference against a perturbed copy of itself on every step the engine is checked on, with the same
    checks: how far apart two correct implementations of these numerics land on these inputs."""

    def __init__(self, model, cache_names: list[str], v, draws: int | None = None):
        draws = draws or SENSITIVITY_DRAWS
        self.model, self.names, self.v, self.draws = model, cache_names, v, draws
        self.values = cache_values(model)
        self.checks: list[list[dict]] = [[] for _ in range(draws)]

    def observe(self, rec: RefStep) -> None:
        used = [t for p in rec.prompts for t in p] + rec.tokens.tolist()
        for draw in range(self.draws):
            with perturbed_embedding(self.model, used, draw):
                if rec.step == 0:
                    logits, cache = reference_prefill(self.model, rec.prompts, rec.cache_in)
                else:
                    logits, cache = reference_decode(self.model, rec.tokens, rec.start, rec.cache_in)
            self.checks[draw] += logit_checks(rec, logits, self.v) + cache_checks(rec, cache, self.names, self.values)


# ---- thresholds -----------------------------------------------------------------------------------------------
@dataclass
class Gate:
    """A logit row agrees at cosine >= min_cosine, equal top-1 (unless a near-tie or not required) and KL <=
    max_kl; at least `agreement` of the logit rows must agree and every one reach `floor_cosine`. Every written
    cache row must reach its kind's floor (`cache_floor`, default `floor_cosine`)."""

    min_cosine: float
    require_top1: bool
    top1_margin: float
    max_kl: float
    agreement: float
    floor_cosine: float
    cache_floor: dict[str, float] = field(default_factory=dict)
    derivation: dict[str, Any] = field(default_factory=dict)

    def agrees(self, check: dict) -> bool:
        if check["check"] != "logits":
            return check["cosine"] >= self.min_cosine
        top1 = check["top1_equal"] or check["near_tie"] or not self.require_top1
        return check["cosine"] >= self.min_cosine and top1 and check["kl"] <= self.max_kl

    def floor(self, check: dict) -> float:
        if check["check"] == "logits":
            return self.floor_cosine
        return self.cache_floor.get(check["check"].split(".", 1)[1], self.floor_cosine)

    def thresholds(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("min_cosine", "require_top1", "top1_margin", "max_kl", "agreement",
                                              "floor_cosine", "cache_floor")}


def is_continuous(numerics) -> bool:
    """No activation quantization, no QAT simulation, no bf16 points: nothing a tiny difference can flip (routing
    and indexer top-k aside, whose near-ties fp32 noise does not reach in practice)."""
    return not any(vars(numerics).values())


def needs_sensitivity(v) -> bool:
    return v.agreement is None or v.floor_cosine is None


def derived_floor(worst: float, min_cos: float, continuous: bool) -> float:
    floor = max(MIN_FLOOR, min(min_cos, 1 - FLOOR_SLACK * (1 - worst)))
    return floor if continuous else min(floor, FLOOR_CAP)


def derive_gate(v, numerics, sensitivity: Sensitivity | None) -> Gate:
    """Recipe keys win; the rest as the module doc says. `derivation` records where each figure came from."""
    continuous = is_continuous(numerics)
    min_cos = v.min_cosine if v.min_cosine is not None else (STRICT_COSINE if continuous else ROW_COSINE)
    gate = Gate(min_cos, v.require_top1, v.top1_margin, v.max_kl, v.agreement or 1.0,
                v.floor_cosine if v.floor_cosine is not None else min_cos)
    derivation: dict[str, Any] = {
        "numerics": "continuous" if continuous else "discontinuous",
        "min_cosine": "recipe" if v.min_cosine is not None else (
            "strict (continuous numerics)" if continuous else "row criterion for discontinuous numerics"),
        "agreement": "recipe" if v.agreement is not None else "derived",
        "floor_cosine": "recipe" if v.floor_cosine is not None else "derived"}
    if sensitivity is not None:
        draws = sensitivity.checks
        logits = [[c for c in d if c["check"] == "logits"] for d in draws]
        ref_agreement = min(sum(gate.agrees(c) for c in d) / len(d) for d in logits)
        ref_worst = {"logits": min(c["cosine"] for d in logits for c in d)}
        for kind in CACHE_KINDS:
            rows = [c["cosine"] for d in draws for c in d if c["check"] == f"cache.{kind}"]
            if rows:
                ref_worst[kind] = min(rows)
        margin, cap = (0.0, 1.0) if continuous else (AGREEMENT_MARGIN, AGREEMENT_CAP)
        if v.agreement is None:
            gate.agreement = max(MIN_AGREEMENT, min(cap, 1 - AGREEMENT_SLACK * (1 - ref_agreement) - margin))
        if v.floor_cosine is None:
            gate.floor_cosine = derived_floor(ref_worst["logits"], min_cos, continuous)
            gate.cache_floor = {k: derived_floor(w, min_cos, continuous) for k, w in ref_worst.items() if k != "logits"}
        floor_cap = "" if continuous else f", {FLOOR_CAP}"
        derivation["reference_sensitivity"] = {
            "perturbation": PERTURBATION, "draws": sensitivity.draws, "reference_agreement": ref_agreement,
            "reference_worst_cosine": ref_worst,
            "agreement_per_draw": [sum(gate.agrees(c) for c in d) / len(d) for d in logits],
            "rule": f"agreement = max({MIN_AGREEMENT}, min({cap}, 1 - {AGREEMENT_SLACK} x (1 - reference "
                    f"agreement) - {margin})); floor per check kind = max({MIN_FLOOR}, min(min_cosine, 1 - "
                    f"{FLOOR_SLACK} x (1 - reference worst cosine){floor_cap})); reference figures: worst draw"}
    gate.derivation = derivation
    return gate


# ---- coverage -------------------------------------------------------------------------------------------------
class Coverage:
    """What the validation inputs made each layer type do, measured on the reference's caches."""

    def __init__(self, cfg, cache_names: list[str]):
        self.cfg, self.names = cfg, cache_names
        self.tokens = 0
        self.after_prefill: dict[tuple[str, int], int] = {}  # (cache name, sequence) -> entries
        self.final: dict[tuple[str, int], int] = {}

    def observe(self, rec: RefStep) -> None:
        self.tokens = max(self.tokens, int(rec.start.max()) + (1 if rec.step else max(map(len, rec.prompts))))
        for name, cache in zip(self.names, rec.cache_out):
            if not name.endswith(".cmp"):
                continue
            for b, n in enumerate(_entries(cache).tolist()):
                key = (name, rec.sequences[b])
                if rec.step == 0:
                    self.after_prefill[key] = n
                self.final[key] = n

    def _entries(self, layers: list[int]) -> tuple[int, int]:
        """(most entries any sequence emitted, most any sequence emitted during its decode steps), fewest layer."""
        def per_layer(i: int) -> tuple[int, int]:
            keys = [k for k in self.final if k[0] == f"layers.{i}.cmp"]
            return (max(self.final[k] for k in keys), max(self.final[k] - self.after_prefill[k] for k in keys))
        counts = [per_layer(i) for i in layers]
        return min(c[0] for c in counts), min(c[1] for c in counts)

    def report(self) -> dict[str, Any]:
        cfg, layers = self.cfg, range(self.cfg.num_hidden_layers)
        out: dict[str, Any] = {"sliding_window": {"layers": list(layers), "window": cfg.sliding_window,
                                                  "tokens": self.tokens, "wrapped": self.tokens > cfg.sliding_window}}
        missing = [] if self.tokens > cfg.sliding_window else ["sliding_window: the window never wrapped"]
        for kind, ratios in (("csa", lambda r: r == 4), ("hca", lambda r: r not in (0, 4))):
            ids = [i for i in layers if ratios(cfg.layer_ratio(i))]
            if not ids:
                continue
            entries, in_decode = self._entries(ids)
            item = {"layers": ids, "ratio": sorted({cfg.layer_ratio(i) for i in ids}), "entries": entries,
                    "entries_emitted_in_decode": in_decode}
            if entries < 2:
                missing.append(f"{kind}: {entries} entries emitted (needs 2)")
            if kind == "csa":
                item.update(index_topk=cfg.index_topk, topk_bound=entries > cfg.index_topk)
                if entries <= cfg.index_topk:
                    missing.append(f"csa: top-k never bound ({entries} entries <= index_topk {cfg.index_topk})")
            out[kind] = item
        hashed = [i for i in layers if cfg.is_hash_layer(i)]
        out["moe_routing"] = {"hash_layers": hashed, "score_layers": [i for i in layers if i not in hashed]}
        out["complete"], out["missing"] = not missing, missing
        return out


def _entries(cache: np.ndarray) -> np.ndarray:
    """Written rows per sequence of a compressed-entry cache [B, N, d] (an emitted entry is never all zero)."""
    return (cache != 0).any(-1).sum(-1)


# ---- the whole gate -------------------------------------------------------------------------------------------
def gate_report(checks: list[dict], free: list[dict], gate: Gate, coverage: dict, lengths: list[int], v,
                max_batch: int) -> dict:
    for c in checks + free:
        c["agrees"] = gate.agrees(c)
    logits = [c for c in checks if c["check"] == "logits"]
    agreement = sum(c["agrees"] for c in logits) / len(logits)
    min_cos = min(c["cosine"] for c in logits)
    cache_min = {k: min(c["cosine"] for c in checks if c["check"] == f"cache.{k}")
                 for k in CACHE_KINDS if any(c["check"] == f"cache.{k}" for c in checks)}
    top1 = all(c["top1_equal"] or c["near_tie"] for c in logits)
    max_kl = max(c["kl"] for c in logits)
    below = [c for c in checks if c["cosine"] < gate.floor(c)]
    passed = agreement >= gate.agreement and not below
    first = below[0] if below else (next(c for c in logits if not c["agrees"]) if not passed else None)
    where = "" if first is None else f"; first failing: {_describe(first, gate)}"
    summary = (f"{agreement:.1%} of logit rows agree (need {gate.agreement:.1%}), min cosine {min_cos:.6f} "
               f"(floor {gate.floor_cosine:.6f}), {len(below)} checks under their floor, top-1 "
               f"{'equal' if top1 else 'differs'} outside near-ties, max KL {max_kl:.2e}{where}")
    return {"passed": passed, "prompts": lengths, "batches": -(-len(lengths) // max_batch),
            "decode_steps": v.decode_steps, "agreement": agreement, "min_cosine": min_cos,
            "min_cache_cosine": cache_min, "top1_equal": top1, "max_kl": max_kl, "thresholds": gate.thresholds(),
            "threshold_derivation": gate.derivation, "coverage": coverage, "first_failure": first,
            "summary": summary, "checks": checks,
            "free_running": {"agreement": sum(c["agrees"] for c in free) / max(len(free), 1),
                             "min_cosine": min((c["cosine"] for c in free), default=1.0), "rows": free}}


def _describe(c: dict, gate: Gate) -> str:
    what = "logits" if c["check"] == "logits" else f"cache row {c['row']}"
    step = "prefill" if c["step"] == 0 else f"decode step {c['step']}"
    return f"{step}, sequence {c['sequence']}, {what} (cosine {c['cosine']:.6f}, floor {gate.floor(c):.6f})"


def gate_error(report: dict, kept: Path | None = None) -> ValidationGateError:
    """The exit-5 error of a failed gate: one line with the figures and the first failing step/row."""
    where = f" (report kept at {kept})" if kept is not None else ""
    return ValidationGateError(f"engine does not match the PyTorch reference: {report['summary']}{where}")


def validate_engine(artifact, model, v, emulate: bool = False, engine=None) -> dict:
    """The gate on an artifact (or an already loaded `engine`) against the reference `model`: the report.

    The reference runs first, its steps written beside the artifact (`SpilledSteps`), and a streamed reference
    then gives its weights back before the engine is loaded: the two models are never resident at once (at
    V4-Flash width: a layer and the globals, then the engine, instead of both). An engine loaded here gives each
    node's weight pages back after the node (CPU executor: `drop_weight_pages`)."""
    from dsv4c.artifact import read_manifest
    from dsv4c.runtime.engine import Engine

    if engine is not None:
        batch, seq_len = engine.max_batch_size, engine.max_seq_len
    else:
        runtime = read_manifest(artifact).runtime
        batch, seq_len = int(runtime["max_batch_size"]), int(runtime["max_seq_len"])
    beside = Path(artifact).parent if artifact is not None else None
    with tempfile.TemporaryDirectory(prefix=".reference-", dir=beside) as spill:
        ref = ReferenceRun.record(model, v, batch, seq_len, Path(spill))
        streamed = getattr(model, "streamed", None)
        if streamed is not None and streamed.streaming:
            streamed.release()
        if engine is None:
            engine = Engine.load(artifact, emulate=emulate)
            # the gate reads each weight once per step: its pages need not stay resident after the node that read
            # them (CPU engines; at depth they were the build's peak, a serving engine keeps them)
            drop = getattr(engine.executor, "drop_weight_pages", None)
            if drop is not None:
                drop()
        return ref.check(engine)


class SpilledSteps:
    """Reference steps kept on disk, one file each, read back one at a time: the steps of a validation hold a
    cache before and after each step, which at depth is more than the memory a step needs. A step's `cache_in`
    is not written: it is the previous step's `cache_out` (a prefill's: the empty cache, written once)."""

    def __init__(self, into: Path):
        self.into, self.count = into, 0

    def append(self, rec: RefStep) -> None:
        if rec.step == 0:
            self._dump(f"{self.count}.empty", rec.cache_in)
        self._dump(str(self.count), dataclasses.replace(rec, cache_in=[]))
        self.count += 1

    def __iter__(self) -> Iterator[RefStep]:
        previous: list[np.ndarray] = []
        for i in range(self.count):
            rec = self._load(str(i))
            rec.cache_in = self._load(f"{i}.empty") if rec.step == 0 else previous
            previous = rec.cache_out
            yield rec

    def _dump(self, name: str, obj) -> None:
        with open(self.into / name, "wb") as f:
            pickle.dump(obj, f, protocol=5)

    def _load(self, name: str):
        with open(self.into / name, "rb") as f:
            return pickle.load(f)


@dataclass
class ReferenceRun:
    """The reference side of a validation, run once (`record`): prompts, steps, coverage, gate; `check` replays
    the steps on an engine (several engines, in the tests)."""

    v: Any
    max_batch: int
    steps: Iterable[RefStep]
    lengths: list[int]
    names: list[str]
    coverage: Coverage
    gate: Gate
    values: CacheValues  # the cache tensors as values (cache_values)

    @classmethod
    def record(cls, model, v, max_batch: int, max_seq_len: int, spill: Path | None = None) -> ReferenceRun:
        """Run the reference's steps with its sensitivity and coverage and derive the gate; the steps are kept in
        memory, or spilled to the directory `spill` (`SpilledSteps`)."""
        prompts = validation_prompts(model.cfg, v, max_seq_len)
        names = [e.name for e in model.cache_spec(1, max_seq_len)]
        sensitivity = Sensitivity(model, names, v) if needs_sensitivity(v) else None
        coverage = Coverage(model.cfg, names)
        steps: list[RefStep] | SpilledSteps = [] if spill is None else SpilledSteps(spill)
        with weights_dequantised_once(dequant_budget(model)):
            for rec in reference_steps(model, prompts, v.decode_steps, max_batch, max_seq_len):
                coverage.observe(rec)
                if sensitivity is not None:
                    sensitivity.observe(rec)
                steps.append(rec)
        return cls(v, max_batch, steps, [len(p) for p in prompts], names, coverage,
                   derive_gate(v, model.numerics, sensitivity), cache_values(model))

    def check(self, engine) -> dict:
        replay, checks, free = EngineReplay(engine, self.names, self.v, self.values), [], []
        for rec in self.steps:
            gated, free_rows = replay.checks(rec)
            checks += gated
            free += free_rows
        return gate_report(checks, free, self.gate, self.coverage.report(), self.lengths, self.v, self.max_batch)
