"""Component conformance against recordings of DeepSeek's official inference code.

End-to-end logits of random tiny models are chaotic (a last-bit difference grows to cosine 0.93-0.99), so a
logits golden cannot tell a faithful port from an unfaithful one. A recording instead holds the reference's
tensors at every component boundary (attention, indexer top-k, MoE routing and output, hyper-connections,
heads, MTP input); each of our components is fed the *reference's* inputs and compared with its outputs, so an
error stays in the component that made it. Format and thresholds: the recording's FORMAT.md
(`shared/testdata/dsv4-conformance/FORMAT.md` in the project's reference material).

A recording directory holds `ckpt/` (official-format checkpoint) and `conformance.npz`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dsv4c.graphs.cache import layer_cache_fields, layer_cache_spec
from dsv4c.graphs.checkpoint import CheckpointReader
from dsv4c.graphs.model import DeepseekV4, Numerics, Step, load_checkpoint_model

# FORMAT.md "What conforms means": every check must pass.
THRESHOLDS = {
    "attn_reference_topk": {"within_1ulp": 0.90, "median_row_rel_err": 1e-3},
    "topk": {"rows_same_set_modulo_ties": 0.999},
    "ffn": {"within_1ulp": 0.999, "median_row_rel_err": 1e-3, "experts_same_set": 0.999},
    "hc": {"within_1ulp": 0.9999},
    "mtp_in": {"within_1ulp": 0.9999},
    "logits": {"within_1ulp": 0.99, "max_row_rel_err": 1e-3},
}


class RecordingError(ValueError):
    """The recording directory is not in the conformance format (names the file or key)."""


# ---- metrics -------------------------------------------------------------------------------------------------
@dataclass
class Agreement:
    """Element and row statistics of one check, accumulated over layers and steps."""

    elements: int = 0
    within: int = 0
    exact: int = 0
    row_errors: list[float] = field(default_factory=list)

    def add(self, ours: torch.Tensor, ref: np.ndarray) -> None:
        p = ours.detach().double().numpy().reshape(-1, ref.shape[-1])
        r = ref.astype(np.float64).reshape(-1, ref.shape[-1])
        diff = np.abs(p - r)
        self.elements += diff.size
        self.within += int((diff <= bf16_ulp(r)).sum())
        self.exact += int((diff == 0).sum())
        norm = np.linalg.norm(r, axis=-1)
        err = np.linalg.norm(p - r, axis=-1)
        self.row_errors += np.where(norm > 0, err / np.where(norm > 0, norm, 1), np.where(err > 0, np.inf, 0)).tolist()

    def figures(self) -> dict[str, float]:
        rows = np.asarray(self.row_errors or [0.0])
        return {"within_1ulp": self.within / max(self.elements, 1), "exact": self.exact / max(self.elements, 1),
                "median_row_rel_err": float(np.median(rows)), "max_row_rel_err": float(rows.max())}


def bf16_ulp(r: np.ndarray) -> np.ndarray:
    """One bf16 ulp of each reference value: 2^(floor(log2|r|) - 7), and 2^-133 at 0 (FORMAT.md)."""
    a = np.abs(r)
    exp = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    return np.where(a > 0, np.exp2(exp - 7), 2.0 ** -133)


@dataclass
class TopkAgreement:
    rows: int = 0
    same_set: int = 0
    same_modulo_ties: int = 0
    same_order: int = 0
    ref_picks: int = 0
    matched_picks: int = 0

    def add(self, ours: np.ndarray, ref: np.ndarray, scores: np.ndarray) -> None:
        """ours, ref [B, S, K] entry ids (-1 = none); scores [B, S, E] the reference's index scores."""
        ours, ref = ours.reshape(-1, ours.shape[-1]), ref.reshape(-1, ref.shape[-1])
        scores = scores.reshape(-1, scores.shape[-1])
        for o, r, sc in zip(ours, ref, scores):
            mine, theirs = set(o[o >= 0].tolist()), set(r[r >= 0].tolist())
            self.rows += 1
            self.ref_picks += len(theirs)
            self.matched_picks += len(mine & theirs)
            if mine == theirs:
                self.same_set += 1
                self.same_modulo_ties += 1
                self.same_order += int(np.array_equal(o[o >= 0], r[r >= 0]))
            elif len(mine) == len(theirs) and theirs:
                kth = min(sc[j] for j in theirs)  # the k-th best score the reference kept
                differing = mine ^ theirs
                self.same_modulo_ties += int(all(j < len(sc) and sc[j] == kth for j in differing))

    def figures(self) -> dict[str, float]:
        n = max(self.rows, 1)
        return {"rows_same_set_modulo_ties": self.same_modulo_ties / n, "rows_same_set": self.same_set / n,
                "rows_same_order": self.same_order / n, "picks": self.matched_picks / max(self.ref_picks, 1)}


@dataclass
class RoutingAgreement:
    score_tokens: int = 0
    score_same: int = 0
    hash_tokens: int = 0
    hash_same: int = 0
    max_weight_err: float = 0.0

    def add(self, picks: torch.Tensor, weights: torch.Tensor, ref_picks: np.ndarray, ref_weights: np.ndarray,
            hashed: bool) -> None:
        picks, weights = picks.numpy(), weights.double().numpy()
        ref_picks, ref_weights = ref_picks.reshape(picks.shape), ref_weights.reshape(picks.shape)
        for p, w, rp, rw in zip(picks, weights, ref_picks, ref_weights):
            same = set(p.tolist()) == set(rp.tolist())
            if hashed:
                self.hash_tokens, self.hash_same = self.hash_tokens + 1, self.hash_same + same
            else:
                self.score_tokens, self.score_same = self.score_tokens + 1, self.score_same + same
            if same:  # weights paired by expert id
                mine, theirs = dict(zip(p.tolist(), w.tolist())), dict(zip(rp.tolist(), rw.tolist()))
                self.max_weight_err = max(self.max_weight_err, max(abs(mine[e] - theirs[e]) for e in theirs))

    def figures(self) -> dict[str, float]:
        return {"experts_same_set": self.score_same / max(self.score_tokens, 1),
                "experts_same_set_hash_layers": self.hash_same / max(self.hash_tokens, 1),
                "max_routing_weight_err": self.max_weight_err}


# ---- the recording -----------------------------------------------------------------------------------------------
class Recording:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        npz = self.dir / "conformance.npz"
        if not npz.is_file():
            raise RecordingError(f"{npz}: not found (a conformance directory holds ckpt/ and conformance.npz)")
        try:
            self.data = np.load(npz, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise RecordingError(f"{npz}: not a readable .npz archive ({e})") from None
        try:
            self.meta = json.loads(str(self["meta"]))
        except json.JSONDecodeError:
            raise RecordingError(f"{npz}: key 'meta' is not a JSON string") from None
        self.prompts, self.decode_tokens, self.next_tokens = (
            self[k] for k in ("prompts", "decode_tokens", "next_tokens"))
        self.batch, self.prompt_len = self.prompts.shape
        self.steps = 1 + self.decode_tokens.shape[1]
        ckpt = self.dir / str(self.meta.get("ckpt_dir", "ckpt"))
        self.ckpt = ckpt if ckpt.is_dir() else self.dir / "ckpt"

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.data.files:
            raise RecordingError(f"{self.dir / 'conformance.npz'}: key {key!r} missing")
        return self.data[key]

    def has(self, key: str) -> bool:
        return key in self.data.files

    def tokens(self, s: int) -> torch.Tensor:
        return torch.from_numpy(self.prompts if s == 0 else self.decode_tokens[:, s - 1:s]).long()

    def mtp_tokens(self, s: int) -> torch.Tensor:
        t = self.prompt_len
        return torch.from_numpy(self.next_tokens[:, :t] if s == 0 else self.next_tokens[:, t + s - 1:t + s]).long()

    def step(self, s: int) -> Step:
        b = self.batch
        if s == 0:
            return Step(torch.zeros(b, dtype=torch.long), torch.full((b,), self.prompt_len), self.prompt_len)
        return Step(torch.full((b,), self.prompt_len + s - 1), torch.ones(b, dtype=torch.long), 1)

    def streams_out(self, s: int, layer: int, n_layers: int) -> np.ndarray:
        """Block output; for l < L-1 the next block's input is the same tensor (FORMAT.md)."""
        if layer < n_layers - 1:
            return self[f"s{s}/l{layer + 1}/streams_in"]
        return self[f"s{s}/l{layer}/streams_out"]


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float()


# ---- the checks ----------------------------------------------------------------------------------------------
def run_conformance(directory: str | Path, numerics: Numerics | None = None) -> dict:
    """Feed every component of the graph the recording's inputs; -> the report (figures and verdicts)."""
    rec = Recording(directory)
    model = load_checkpoint_model(CheckpointReader(rec.ckpt), numerics or Numerics.reference())
    try:
        with torch.no_grad():
            attn, attn_ref_topk, topk = _attention_checks(model, rec)
            ffn, routing = _moe_checks(model, rec)
            hc, mtp_in, logits = _stream_checks(model, rec)
    except (RuntimeError, ValueError, IndexError) as e:  # shapes of another model than the checkpoint's
        raise RecordingError(f"{rec.dir / 'conformance.npz'} does not fit the checkpoint in {rec.ckpt}: "
                             f"{str(e).splitlines()[0]}") from None
    figures = {
        "attn": attn.figures(),
        "attn_reference_topk": attn_ref_topk.figures(),
        "topk": topk.figures(),
        "ffn": {**ffn.figures(), **routing.figures()},
        "hc": hc.figures(),
        "mtp_in": mtp_in.figures(),
        "logits": logits.figures(),
    }
    checks = {name: _verdict(name, f) for name, f in figures.items()}
    return {"passed": all(c.get("passed", True) for c in checks.values()), "checks": checks, "figures": figures,
            "recording": {"dir": str(rec.dir), "batch": rec.batch, "prompt_len": rec.prompt_len,
                          "decode_steps": rec.steps - 1, "variant": rec.meta.get("variant")}}


def _verdict(name: str, figures: dict[str, float]) -> dict:
    """The check's figures named in the JSON contract plus `passed` against THRESHOLDS (attn: informative)."""
    keys = {"attn": ("within_1ulp", "median_row_rel_err", "max_row_rel_err"),
            "attn_reference_topk": ("within_1ulp", "median_row_rel_err", "max_row_rel_err"),
            "topk": ("rows_same_set_modulo_ties", "picks"),
            "ffn": ("within_1ulp", "median_row_rel_err", "experts_same_set"),
            "hc": ("within_1ulp",), "mtp_in": ("within_1ulp",),
            "logits": ("within_1ulp", "max_row_rel_err")}[name]
    out: dict = {k: figures[k] for k in keys}
    if name in THRESHOLDS:
        out["passed"] = all(figures[k] >= v if k in ("within_1ulp", "rows_same_set_modulo_ties", "experts_same_set")
                            else figures[k] <= v for k, v in THRESHOLDS[name].items())
    return out


def _blocks(model: DeepseekV4):
    """(layer id, Block) for the main layers, then the MTP blocks (layer ids L, L+1, ...)."""
    n = model.cfg.num_hidden_layers
    return [(i, b) for i, b in enumerate(model.layers)] + [(n + i, m.block) for i, m in enumerate(model.mtp)]


def _attention_checks(model: DeepseekV4, rec: Recording):
    """Each layer's attention runs the steps in order on the recorded inputs, keeping its own caches; a second
    copy is fed the reference's top-k picks instead of its indexer's (the arithmetic without the choice)."""
    attn, attn_ref_topk, topk = Agreement(), Agreement(), TopkAgreement()
    max_seq_len = _cache_length(rec, model.cfg)
    for layer, block in _blocks(model):
        ratio = model.cfg.layer_ratio(layer)
        own = _fresh_cache(model, layer, rec.batch, max_seq_len)
        fed = _fresh_cache(model, layer, rec.batch, max_seq_len)
        for s in range(rec.steps):
            x, step = _t(rec[f"s{s}/l{layer}/attn_in"]), rec.step(s)
            want = rec[f"s{s}/l{layer}/attn_out"]
            picks = []
            hook = _capture_picks(block.attn, picks)
            out, own = block.attn(x, step, own, model.numerics)
            hook.remove()
            attn.add(out, want)
            if ratio != 4:
                attn_ref_topk.add(out, want)
                fed = own
                continue
            recorded = rec[f"s{s}/l{layer}/topk"]
            topk.add(picks[0].numpy(), recorded, rec[f"s{s}/l{layer}/index_scores"])
            hook = _substitute_picks(block.attn, torch.from_numpy(recorded).long())
            out, fed = block.attn(x, step, fed, model.numerics)
            hook.remove()
            attn_ref_topk.add(out, want)
    return attn, attn_ref_topk, topk


def _cache_length(rec: Recording, cfg) -> int:
    """Cache rows for the whole recording, rounded up so every compress ratio divides it."""
    ratios = [r for r in cfg.compress_ratios if r] or [1]
    unit = int(np.lcm.reduce(ratios))
    return -(-(rec.prompt_len + rec.steps) // unit) * unit


def _fresh_cache(model: DeepseekV4, layer: int, batch: int, max_seq_len: int) -> dict[str, torch.Tensor]:
    ratio = model.cfg.layer_ratio(layer)
    spec = layer_cache_spec(model.cfg, f"layer{layer}", ratio, batch, max_seq_len, model.numerics.cache_rows)
    return dict(zip(layer_cache_fields(ratio), (e.empty() for e in spec)))


def _capture_picks(attn, sink: list):
    def hook(_module, _inputs, output):
        sink.append(output[0])
    return attn.indexer.register_forward_hook(hook) if attn.indexer is not None else _NoHook()


def _substitute_picks(attn, recorded: torch.Tensor):
    def hook(_module, _inputs, output):
        picks = output[0]
        k = min(recorded.shape[-1], picks.shape[-1])
        replaced = torch.full_like(picks, -1)
        replaced[..., :k] = recorded[..., :k]
        return (replaced, *output[1:])
    return attn.indexer.register_forward_hook(hook)


class _NoHook:
    def remove(self) -> None:
        pass


def _moe_checks(model: DeepseekV4, rec: Recording):
    ffn, routing = Agreement(), RoutingAgreement()
    for layer, block in _blocks(model):
        is_mtp = layer >= model.cfg.num_hidden_layers
        for s in range(rec.steps):
            x = _t(rec[f"s{s}/l{layer}/ffn_in"])
            tokens = rec.mtp_tokens(s) if is_mtp else rec.tokens(s)
            ffn.add(block.ffn(x, tokens, model.numerics), rec[f"s{s}/l{layer}/ffn_out"])
            weights, picks = block.ffn.gate(x.flatten(0, 1), tokens.reshape(-1))
            routing.add(picks, weights, rec[f"s{s}/l{layer}/experts"], rec[f"s{s}/l{layer}/expert_weights"],
                        block.ffn.gate.hash)
    return ffn, routing


def _stream_checks(model: DeepseekV4, rec: Recording):
    """Hyper-connections (four checks per block), the heads and the MTP input, each on recorded inputs only."""
    hc, mtp_in, logits = Agreement(), Agreement(), Agreement()
    n, num = model.cfg.num_hidden_layers, model.numerics
    for s in range(rec.steps):
        for layer, block in _blocks(model):
            g = lambda key: rec[f"s{s}/l{layer}/{key}"]  # noqa: E731
            streams_in, streams_mid = _t(g("streams_in")), _t(g("streams_mid"))
            x, post, comb = block.hc_pre("attn", streams_in, num)
            hc.add(x, g("attn_in"))
            hc.add(block.hc_post(_t(g("attn_out")), streams_in, post, comb, num), g("streams_mid"))
            x, post, comb = block.hc_pre("ffn", streams_mid, num)
            hc.add(x, g("ffn_in"))
            hc.add(block.hc_post(_t(g("ffn_out")), streams_mid, post, comb, num), rec.streams_out(s, layer, n))
        main_out = _t(rec.streams_out(s, n - 1, n))
        n_valid = rec.step(s).n_valid
        logits.add(model.logits(model.final, main_out, n_valid, all_logits=False), rec[f"s{s}/logits"])
        for i, mtp in enumerate(model.mtp):
            mtp_in.add(model.mtp_input(rec.mtp_tokens(s), main_out, i), rec[f"s{s}/l{n + i}/streams_in"])
            mtp_out = _t(rec.streams_out(s, n + i, n))
            logits.add(model.logits(mtp.head, mtp_out, n_valid, all_logits=False), rec[f"s{s}/mtp_logits"])
    return hc, mtp_in, logits


# ---- rendering -------------------------------------------------------------------------------------------------
def format_report(report: dict) -> str:
    f, c = report["figures"], report["checks"]
    r = report["recording"]
    lines = [f"conformance: {r['dir']} ({r['variant']}, batch {r['batch']}, prompt {r['prompt_len']}, "
             f"{r['decode_steps']} decode steps)"]

    def verdict(name: str) -> str:
        return "informative" if "passed" not in c[name] else ("pass" if c[name]["passed"] else "FAIL")

    for name, label in (("attn", "attn"), ("attn_reference_topk", "attn|topk")):
        a = f[name]
        lines.append(f"  {label:<10} <=1ulp {a['within_1ulp']:8.4%}  exact {a['exact']:8.4%}  med rel "
                     f"{a['median_row_rel_err']:.2e}  max rel {a['max_row_rel_err']:.2e}  {verdict(name)}")
    t = f["topk"]
    lines.append(f"  {'topk':<10} rows same set {t['rows_same_set']:8.4%}  mod ties {t['rows_same_set_modulo_ties']:8.4%}"
                 f"  same order {t['rows_same_order']:8.4%}  picks {t['picks']:8.4%}  {verdict('topk')}")
    m = f["ffn"]
    lines.append(f"  {'ffn':<10} <=1ulp {m['within_1ulp']:8.4%}  exact {m['exact']:8.4%}  med rel "
                 f"{m['median_row_rel_err']:.2e}  experts {m['experts_same_set']:8.4%} (hash layers "
                 f"{m['experts_same_set_hash_layers']:.2%})  {verdict('ffn')}")
    for name in ("hc", "mtp_in"):
        a = f[name]
        lines.append(f"  {name:<10} <=1ulp {a['within_1ulp']:8.4%}  exact {a['exact']:8.4%}  max rel "
                     f"{a['max_row_rel_err']:.2e}  {verdict(name)}")
    a = f["logits"]
    lines.append(f"  {'logits':<10} <=1ulp {a['within_1ulp']:8.4%}  exact {a['exact']:8.4%}  max rel "
                 f"{a['max_row_rel_err']:.2e}  {verdict('logits')}")
    lines.append("conforms" if report["passed"] else "does NOT conform")
    return "\n".join(lines)
