"""DeepSeek-V4 in PyTorch, readable top to bottom, with the cache as explicit tensors the caller owns.

One forward handles every kind of step: a prefill from position 0, a chunked prefill continuing at any
position, a decode step (S = 1), and a batch whose sequences sit at different positions with different
numbers of new tokens. Per call:

    tokens    [B, S]  int64   new tokens, right-padded per sequence
    start_pos [B]     int64   position of tokens[:, 0] for each sequence
    n_valid   [B]     int64   how many of the S tokens are real for each sequence (0 = sequence idle)
    cache     tuple of tensors laid out by `cache_spec` (see cache.py), returned updated (functional)

Padding tokens compute garbage that nothing reads: cache writes only take positions < start_pos + n_valid.
This keeps the graph free of data-dependent control flow, which is what torch.export and every target need.

Numerics follow DeepSeek's reference `inference/model.py` (see the spec): `Numerics.reference()` reproduces
its W8A8 FP8 activation quant, FP8-simulated KV, Hadamard+FP4 indexer and bf16 storage points (computed in
fp32 and rounded, so CPUs stay on fast fp32 paths); `Numerics.plain()` turns all of that off for
differential tests against transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

import dsv4c.graphs.ops  # noqa: F401  (registers torch.ops.dsv4.*)
from dsv4c.graphs.cache import CacheEntry, RowFormat, layer_cache_fields, layer_cache_spec
from dsv4c.graphs.config import ModelConfig
from dsv4c.graphs.parallel import GROUP_EXPERT, GROUP_TENSOR, Shard, local_expert, shard_tensor, split_dim
from dsv4c.graphs.quant import ExpertFormat

if TYPE_CHECKING:  # only a type here: importing the model needs no checkpoint I/O
    from dsv4c.graphs.checkpoint import CheckpointReader

ops = torch.ops.dsv4
# recipe name -> the moe_experts op's `fmt` (a plain int: it is traced into the exported graph as a constant)
EXPERT_FORMATS = {f.name.lower(): f.value for f in ExpertFormat}


@dataclass(frozen=True)
class Numerics:
    act_quant: bool = True  # W8A8: FP8 quantise activations (per token x 128, pow2 scales) before FP8/FP4 GEMMs
    kv_fp8: bool = True  # FP8-round the non-RoPE KV dims (block 64), window and compressed entries
    indexer_fp4: bool = True  # Hadamard + FP4 round the indexer q and keys
    bf16: bool = True  # round to bf16 wherever the reference stores bf16

    @staticmethod
    def reference() -> "Numerics":
        return Numerics()

    @staticmethod
    def plain() -> "Numerics":
        return Numerics(act_quant=False, kv_fp8=False, indexer_fp4=False, bf16=False)

    @property
    def cache_rows(self) -> RowFormat:
        """How the caches hold KV rows and indexer keys: packed in the recipe's FP8 / FP4 formats where the values
        are exactly those (FP8 KV rows need bf16 RoPE dims too), the rest bf16 when every row is bf16-rounded
        (the reference's cache dtype; storing them as bf16 is exact), else float32."""
        return RowFormat(torch.bfloat16 if self.bf16 else torch.float32, kv_fp8=self.kv_fp8 and self.bf16,
                         idx_fp4=self.indexer_fp4)

    @staticmethod
    def for_quantization(q: Any) -> "Numerics":
        """The numerics a recipe's `quantization` section asks for (its activations, kv_cache and indexer keys);
        bf16 rounding unless all three are unquantised, the continuous model validation calls plain."""
        return Numerics(act_quant=q.activations == "fp8", kv_fp8=q.kv_cache == "fp8", indexer_fp4=q.indexer == "fp4",
                        bf16=not (q.activations == "none" and q.kv_cache == "bf16" and q.indexer == "bf16"))


@dataclass
class Step:
    """Per-call position bookkeeping shared by every layer."""

    start: torch.Tensor  # [B] position of the first new token
    n_valid: torch.Tensor  # [B] number of real new tokens
    seqlen: int  # S (symbolic under export)

    @property
    def end(self) -> torch.Tensor:  # [B] first position after this call
        return self.start + self.n_valid

    @property
    def positions(self) -> torch.Tensor:  # [B, S]
        return self.start[:, None] + self.arange(self.seqlen)[None, :]

    def arange(self, n: int) -> torch.Tensor:
        """0..n-1 on the step's device (the graph runs on CPU for export, on a GPU for eager checks)."""
        return torch.arange(n, device=self.start.device)


# ---- small building blocks ---------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(dim))

    def forward(self, x: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """`bf16`: the reference's RMSNorm of a bf16 tensor (x and the result rounded to bf16)."""
        return ops.rms_norm(x, self.weight, self.eps, bf16)


class Linear(nn.Module):
    """A checkpoint linear: FP8 (uint8 e4m3 bits + f32 128x128 block scales) or BF16 weights (kept BF16,
    multiplied in FP32 as the reference does)."""

    def __init__(self, in_features: int, out_features: int, fp8: bool):
        super().__init__()
        self.fp8 = fp8
        if fp8:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(math.ceil(out_features / 128), math.ceil(in_features / 128)))
        else:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor, act_quant: bool = False) -> torch.Tensor:
        if self.fp8:
            return ops.fp8_linear(x, self.weight, self.scale, act_quant)
        return ops.bf16_linear(x, self.weight)


def rope_frequencies(cfg: ModelConfig, yarn: bool) -> torch.Tensor:
    """[r/2] inverse frequencies. Compressed layers (yarn=True) use compress_rope_theta with YaRN
    interpolation between beta_fast and beta_slow; sliding-window-only layers use rope_theta as is."""
    r = cfg.qk_rope_head_dim
    base = cfg.compress_rope_theta if yarn else cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
    if yarn:
        ys = cfg.rope_scaling

        def corr_dim(rotations: float) -> float:
            return r * math.log(ys.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr_dim(ys.beta_fast)), 0)
        high = min(math.ceil(corr_dim(ys.beta_slow)), r - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(r // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / ys.factor * (1 - smooth) + freqs * smooth
    return freqs


def fake_quant_nope(x: torch.Tensor, rope_dim: int, enabled: bool) -> torch.Tensor:
    """QAT: FP8-round the non-RoPE dims of a KV row in blocks of 64 (RoPE dims stay bf16)."""
    if not enabled:
        return x
    return torch.cat([ops.fake_quant_fp8(x[..., :-rope_dim], 64), x[..., -rope_dim:]], dim=-1)


def kv_rows(x: torch.Tensor, rope_dim: int, like: torch.Tensor, num: Numerics) -> torch.Tensor:
    """KV rows x [..., d] in the format of the cache `like`: packed FP8 rows where it holds them (uint8; the
    packing is the FP8 simulation, cache.py), else the simulated values in its dtype."""
    if like.dtype == torch.uint8:
        return ops.pack_kv_fp8(x, rope_dim)
    return fake_quant_nope(x, rope_dim, num.kv_fp8).to(like.dtype)


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], rows [B, K] (in range) -> [B, K, D]."""
    return torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1]))


# ---- compressor (CSA / HCA / indexer keys) ----------------------------------------------------------------
class Compressor(nn.Module):
    """Gated pooling of every `ratio` raw tokens into one compressed KV entry (CSA: ratio 4 with overlapping
    windows of 8; HCA: ratio 128). State: the last c*ratio raw rows (kv and gate score incl. `ape`), held as a
    ring (position p at slot p % span, like the window cache); rows before position 0 are masked, so a new
    sequence needs no reset."""

    def __init__(self, cfg: ModelConfig, ratio: int, head_dim: int, indexer_keys: bool):
        super().__init__()
        self.ratio, self.head_dim, self.overlap = ratio, head_dim, ratio == 4
        self.indexer_keys = indexer_keys  # indexer keys get Hadamard+FP4, main keys FP8 on nope dims
        self.rope_dim = cfg.qk_rope_head_dim
        c = 2 if self.overlap else 1
        self.span = c * ratio
        self.register_buffer("ape", torch.zeros(ratio, c * head_dim))
        self.wkv = Linear(cfg.hidden_size, c * head_dim, fp8=False)
        self.wgate = Linear(cfg.hidden_size, c * head_dim, fp8=False)
        self.norm = RMSNorm(head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, step: Step, entries: torch.Tensor, state_kv: torch.Tensor,
                state_score: torch.Tensor, freqs: torch.Tensor, num: Numerics):
        # x [B,S,D]; entries [B,N,d]; state_* [B, span, c*d]
        m, span = self.ratio, self.span
        pos = step.positions  # [B, S]
        kv = self.wkv(x)  # [B, S, c*d], fp32 like the reference
        score = self.wgate(x) + F.embedding(pos % m, self.ape)  # one Gather node, not six
        # The call's last `span` real tokens go to their ring slots (distinct); padding and older tokens do not.
        kept = (pos < step.end[:, None]) & (pos >= step.end[:, None] - span)
        slots = torch.where(kept, pos % span, -1)
        ring_kv, ring_score = ops.cache_write(state_kv, kv, slots), ops.cache_write(state_score, score, slots)
        # Windows that may close in this call: j = start//m + k, last token at (j+1)m-1.
        n_win = step.seqlen // m + 2  # at most S//m + 1 close; +1 more keeps the size >= 2 so export
        # does not specialise on a size-1 dimension
        j = (step.start // m)[:, None] + step.arange(n_win)  # [B, K]
        last = (j + 1) * m - 1
        closes = last < step.end[:, None]
        if step.seqlen == 1:  # decode: a window closing now has all its rows in the updated ring
            ext_kv, ext_score, first = self.ring_in_order(ring_kv, ring_score, step)
        else:  # rows [state in position order (start-span .. start-1) | the call's tokens (start .. start+S-1)]
            order = (step.start[:, None] + step.arange(span)) % span  # slot of start-span+i
            older = (step.start[:, None] - span + step.arange(span) < 0)[..., None]
            ext_kv = torch.cat([take_rows(state_kv, order).masked_fill(older, 0.0), kv], dim=1)
            ext_score = torch.cat([take_rows(state_score, order).masked_fill(older, float("-inf")), score], dim=1)
            first = step.start - span  # position of ext row 0
        rows = torch.where(closes, last - first[:, None], torch.full_like(last, -1))
        pooled = ops.compress_pool(ext_kv, ext_score, rows, m, self.overlap)  # [B, K, d]
        new = self.norm(pooled, num.bf16)
        new = ops.rope(new, freqs, j * m, False, num.bf16)  # RoPE at the window's first position
        if not self.indexer_keys:
            new = kv_rows(new, self.rope_dim, entries, num)
        elif num.indexer_fp4:
            new = ops.hadamard_fp4(new)
            new = ops.pack_fp4(new) if entries.dtype == torch.uint8 else new  # FP4 values: packed exactly
        # Window j that closed in this call is entry j; the others are not written (slot -1).
        entries = ops.cache_write(entries, new.to(entries.dtype), torch.where(closes, j, -1))
        return entries, ring_kv, ring_score

    def ring_in_order(self, ring_kv: torch.Tensor, ring_score: torch.Tensor,
                      step: Step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A one-token step's pooling rows from the ring that includes it, and the position of row 0. HCA
        (span = m): a window closing at this token holds slots 0 .. m-1 in position order, so the ring is read
        as it is (no copy; no window reaches before position 0). CSA's overlapping windows (span = 2m) start
        at either half: the ring twice over holds the span ending at any slot in order, and its rows before
        position 0 (the first window's previous half) are masked."""
        span = self.span
        base = step.start - step.start % span  # position of slot 0's latest row
        if not self.overlap:
            return ring_kv, ring_score, base
        first = base - span
        before_zero = (first[:, None] + step.arange(2 * span) < 0)[..., None]
        ext_kv = torch.cat([ring_kv, ring_kv], dim=1).masked_fill(before_zero, 0.0)
        ext_score = torch.cat([ring_score, ring_score], dim=1).masked_fill(before_zero, float("-inf"))
        return ext_kv, ext_score, first


class Indexer(nn.Module):
    """Lightning indexer (CSA layers): scores every visible compressed entry per query with
    sum_h w_h relu(q_h . k) and keeps the top `index_topk`."""

    def __init__(self, cfg: ModelConfig, shard: Shard = Shard()):
        super().__init__()
        self.shard = shard
        self.head_dim, self.topk = cfg.index_head_dim, cfg.index_topk
        self.n_heads = len(shard.part(cfg.index_n_heads, GROUP_TENSOR))  # this rank's heads
        self.weight_scale = self.head_dim ** -0.5 * cfg.index_n_heads ** -0.5  # over all heads, on every rank
        fp8 = cfg.quantization.dense == "fp8"
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, fp8)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, fp8=False)
        self.compressor = Compressor(cfg, 4, self.head_dim, indexer_keys=True)

    def forward(self, x, qr, step: Step, entries, state_kv, state_score, freqs, num: Numerics):
        b, s, _ = x.shape
        q = _rnd(self.wq_b(qr, num.act_quant), num).view(b, s, self.n_heads, self.head_dim)
        q = ops.rope(q, freqs, step.positions, False, num.bf16)
        if num.indexer_fp4:
            q = ops.hadamard_fp4(q)
        entries, state_kv, state_score = self.compressor(x, step, entries, state_kv, state_score, freqs, num)
        w = _rnd(_rnd(self.weights_proj(x), num) * self.weight_scale, num)
        n_visible = (step.positions + 1) // 4  # entry j is complete for query i iff 4(j+1) <= i+1
        if self.shard.tensor == 1:
            picks = ops.indexer_topk(q, entries, w, n_visible, self.topk, num.bf16)
        else:  # this rank's heads score, the partial scores are summed over the tensor group, then the top-k
            scores = _rnd(ops.all_reduce(ops.indexer_scores(q, entries, w, num.bf16), GROUP_TENSOR), num)
            picks = top_entries(scores, n_visible, self.topk)
        return picks, entries, state_kv, state_score


def top_entries(scores: torch.Tensor, n_visible: torch.Tensor, topk: int) -> torch.Tensor:
    """indexer_topk's selection on summed scores [B,S,N]: entries >= n_visible hidden, the top min(topk, N) ids
    in descending order, -1 for picks that are not visible."""
    entry = torch.arange(scores.shape[-1], device=scores.device)
    scores = scores.masked_fill(entry.view(1, 1, -1) >= n_visible[..., None], float("-inf"))
    # Equal scores (relu zeros tie often) are ordered lower id first, as indexer_topk does. Eagerly that takes a
    # stable sort (torch.topk leaves ties unspecified); the exporter has no stable sort, but ONNX TopK, which
    # torch.topk lowers to, defines ties the same way (lower index first). `plan` traces on the meta device to
    # size the engine's workspace: it gets the engine's top-k too (a full sort would hold [B,S,N] indices).
    k = min(topk, scores.shape[-1])
    if torch.compiler.is_exporting() or scores.is_meta:
        picks = torch.topk(scores, k, dim=-1).indices
    else:
        picks = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.where(picks >= n_visible[..., None], torch.full_like(picks, -1), picks)


# ---- attention ----------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Shared K=V MQA over a sliding window of raw tokens plus compressed entries (HCA: all visible; CSA:
    the indexer's top-k), with a per-head sink, inverse RoPE on the output and a grouped low-rank wo."""

    def __init__(self, cfg: ModelConfig, layer: int, shard: Shard = Shard()):
        super().__init__()
        self.cfg, self.shard = cfg, shard
        self.ratio = cfg.layer_ratio(layer)
        self.head_dim, self.rope_dim = cfg.head_dim, cfg.qk_rope_head_dim
        self.window, self.eps = cfg.sliding_window, cfg.rms_norm_eps
        # this rank's heads and o-groups (all of them on one device)
        self.n_heads = len(shard.part(cfg.num_attention_heads, GROUP_TENSOR))
        self.groups = len(shard.part(cfg.o_groups, GROUP_TENSOR))
        fp8 = cfg.quantization.dense == "fp8"
        self.register_buffer("attn_sink", torch.zeros(self.n_heads))
        self.wq_a = Linear(cfg.hidden_size, cfg.q_lora_rank, fp8)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, fp8)
        self.wkv = Linear(cfg.hidden_size, self.head_dim, fp8)
        self.kv_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.wo_a = Linear(cfg.num_attention_heads * self.head_dim // cfg.o_groups, self.groups * cfg.o_lora_rank, fp8)
        self.wo_b = Linear((self.groups if shard.split_wo_b else cfg.o_groups) * cfg.o_lora_rank, cfg.hidden_size, fp8)
        self.register_buffer("freqs", rope_frequencies(cfg, yarn=self.ratio != 0), persistent=False)
        if self.ratio:
            self.compressor = Compressor(cfg, self.ratio, self.head_dim, indexer_keys=False)
        self.indexer = Indexer(cfg, shard) if self.ratio == 4 else None

    def forward(self, x: torch.Tensor, step: Step, cache: dict[str, torch.Tensor], num: Numerics):
        b, s, _ = x.shape
        pos, W, r = step.positions, self.window, self.rope_dim
        qr = self.q_norm(self.wq_a(x, num.act_quant), num.bf16)  # [B,S,q_lora], also the indexer's
        q = _rnd(self.wq_b(qr, num.act_quant), num).view(b, s, self.n_heads, self.head_dim)
        q = head_rescale(q, self.eps, num)  # weightless per-head norm
        q = ops.rope(q, self.freqs, pos, False, num.bf16)
        kv = self.kv_norm(self.wkv(x, num.act_quant), num.bf16)  # [B,S,d]
        kv = kv_rows(ops.rope(kv, self.freqs, pos, False, num.bf16), r, cache["win"], num)

        # Keys: [window ring (W) | this call's tokens (S)] and the compressed entries (N), in the cache's row format
        window = torch.cat([cache["win"], kv], dim=1)
        idx, cmp = [self.window_indices(step)], window[:, :0]  # no compressed entries in a window-only layer
        new_cache = {"win": self.updated_ring(cache["win"], kv, step)}
        if self.ratio:
            cmp, skv, ssc = self.compressor(x, step, cache["cmp"], cache["cmp_state_kv"],
                                            cache["cmp_state_score"], self.freqs, num)
            new_cache.update(cmp=cmp, cmp_state_kv=skv, cmp_state_score=ssc)
            if self.indexer is not None:
                picks, icmp, ikv, isc = self.indexer(x, qr, step, cache["idx"], cache["idx_state_kv"],
                                                     cache["idx_state_score"], self.freqs, num)
                new_cache.update(idx=icmp, idx_state_kv=ikv, idx_state_score=isc)
            else:  # HCA: every complete entry
                entry = step.arange(cmp.shape[1])
                picks = torch.where(entry[None, None, :] < ((pos + 1) // self.ratio)[..., None], entry, -1)
            idx.append(torch.where(picks >= 0, picks + W + s, picks))
        packed = cache["win"].dtype == torch.uint8
        o = ops.sparse_attn(q, window, cmp, self.attn_sink, torch.cat(idx, dim=-1), self.head_dim ** -0.5, num.bf16,
                            r if packed else 0)
        o = ops.rope(_rnd(o, num), self.freqs, pos, True, num.bf16)  # inverse: strip V's absolute position
        z = _rnd(self.project_groups(o.view(b, s, self.groups, -1)), num)  # [B, S, G, o_lora]
        z = z.flatten(2)
        if self.shard.tensor > 1 and not self.shard.split_wo_b:  # whole wo_b: every rank's groups, in order
            z = ops.all_gather(z, GROUP_TENSOR, self.shard.tensor)
        y = _rnd(self.wo_b(z, num.act_quant), num)
        if self.shard.tensor > 1 and self.shard.split_wo_b:  # wo_b split by its input: sum the partial outputs
            y = _rnd(ops.all_reduce(y, GROUP_TENSOR), num)
        return y, new_cache

    def project_groups(self, o: torch.Tensor) -> torch.Tensor:
        """wo_a per head group: o [B,S,G,K] -> [B,S,G,R]. No activation quant: the reference runs this einsum
        in bf16 on a dequantised wo_a."""
        if self.wo_a.fp8:
            return ops.fp8_grouped_linear(o, self.wo_a.weight, self.wo_a.scale, False)
        return torch.einsum("bsgk,grk->bsgr", o, self.wo_a.weight.view(self.groups, -1, o.shape[-1]))

    def window_indices(self, step: Step) -> torch.Tensor:
        """[B, S, W] key rows for positions max(i-W+1, 0) .. i, oldest first and -1 padding after, the
        reference's order (model.py:254-276; the attention kernel's 64-pick blocks make the order part of the
        numerics): ring slot (pos % W) for positions before this call, row W + t for this call's tokens."""
        W = self.window
        pos = step.positions[..., None]
        kpos = (pos - (W - 1)).clamp(min=0) + step.arange(W)  # [B, S, W]
        start = step.start[:, None, None]
        rows = torch.where(kpos >= start, W + (kpos - start), kpos % W)
        return torch.where(kpos <= pos, rows, torch.full_like(rows, -1))

    def updated_ring(self, ring: torch.Tensor, kv: torch.Tensor, step: Step) -> torch.Tensor:
        """Slot s holds the latest position p < end with p % W == s: the call's real tokens among the last W
        positions are written at p % W (distinct slots); padding and older tokens of a long call are not."""
        W = self.window
        pos = step.positions  # [B, S]
        kept = (pos < step.end[:, None]) & (pos >= step.end[:, None] - W)
        return ops.cache_write(ring, kv, torch.where(kept, torch.remainder(pos, W), -1))


# ---- mixture of experts --------------------------------------------------------------------------------------
class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.topk, self.route_scale = cfg.num_experts_per_tok, cfg.routed_scaling_factor
        self.hash = cfg.is_hash_layer(layer)
        self.register_buffer("weight", torch.zeros(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.bfloat16))
        if self.hash:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.topk, dtype=torch.int64))
        else:
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.softplus(ops.bf16_linear(x, self.weight)).sqrt()  # [T, E] sqrtsoftplus, fp32
        if self.hash:
            picks = F.embedding(tokens, self.tid2eid)  # static hash routing by token id
        else:
            picks = (scores + self.bias).topk(self.topk, dim=-1).indices  # bias steers selection only
        weights = scores.gather(1, picks)
        return weights / weights.sum(-1, keepdim=True) * self.route_scale, picks


class Experts(nn.Module):
    """The routed experts, stacked [E, ...] so one op runs them all (fmt: fp4 / fp8 / float)."""

    def __init__(self, cfg: ModelConfig, fmt: str, shard: Shard = Shard()):
        super().__init__()
        self.fmt, self.limit = fmt, cfg.swiglu_limit
        self.n_experts = cfg.n_routed_experts
        self.mine = shard.part(cfg.n_routed_experts, GROUP_EXPERT)  # the experts this rank holds
        e, d, i = len(self.mine), cfg.hidden_size, cfg.moe_intermediate_size
        for name, (n, k) in {"w1": (i, d), "w3": (i, d), "w2": (d, i)}.items():
            if fmt == "fp4":
                w, s = torch.zeros(e, n, k // 2, dtype=torch.uint8), torch.ones(e, n, k // 32)
            elif fmt == "fp8":
                w, s = torch.zeros(e, n, k, dtype=torch.uint8), torch.ones(e, math.ceil(n / 128), math.ceil(k / 128))
            else:
                w, s = torch.zeros(e, n, k), torch.zeros(0)
            self.register_buffer(name, w)
            self.register_buffer(f"{name}_scale", s)

    def forward(self, x, weights, picks, num: Numerics) -> torch.Tensor:
        """picks: global expert ids; an expert another rank holds is skipped here (-1)."""
        if len(self.mine) < self.n_experts:
            local = picks - self.mine.start
            picks = torch.where((local >= 0) & (local < len(self.mine)), local, torch.full_like(local, -1))
        return ops.moe_experts(x, weights, picks, self.w1, self.w1_scale, self.w3, self.w3_scale, self.w2,
                               self.w2_scale, EXPERT_FORMATS[self.fmt], self.limit,
                               num.act_quant and self.fmt != "float", num.bf16)


class SharedExpert(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        fp8, d, i = cfg.quantization.dense == "fp8", cfg.hidden_size, cfg.moe_intermediate_size
        self.limit = cfg.swiglu_limit
        self.w1, self.w3, self.w2 = Linear(d, i, fp8), Linear(d, i, fp8), Linear(i, d, fp8)

    def forward(self, x: torch.Tensor, num: Numerics) -> torch.Tensor:
        gate = _rnd(self.w1(x, num.act_quant), num).clamp(max=self.limit)
        up = _rnd(self.w3(x, num.act_quant), num).clamp(-self.limit, self.limit)  # clamped too (2026-04-27)
        return _rnd(self.w2(_rnd(F.silu(gate) * up, num), num.act_quant), num)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, expert_format: str, shard: Shard = Shard()):
        super().__init__()
        self.expert_parallel = shard.expert > 1
        self.gate = Gate(cfg, layer)
        self.experts = Experts(cfg, expert_format, shard)
        self.shared_experts = SharedExpert(cfg)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, num: Numerics) -> torch.Tensor:
        b, s, d = x.shape
        flat = x.reshape(b * s, d)
        weights, picks = self.gate(flat, tokens.reshape(-1))
        routed = self.experts(flat, weights, picks, num)
        if self.expert_parallel:  # each rank ran its own experts: sum over the expert group (fp32, as the reference)
            routed = ops.all_reduce(routed, GROUP_EXPERT)
        y = routed + self.shared_experts(flat, num)
        return _rnd(y, num).view(b, s, d)


# ---- block, head, model --------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, expert_format: str, shard: Shard = Shard()):
        super().__init__()
        self.cfg = cfg
        self.attn = Attention(cfg, layer, shard)
        self.ffn = MoE(cfg, layer, expert_format, shard)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        mix, width = cfg.hc_mix_dim, cfg.hc_mult * cfg.hidden_size
        for part in ("attn", "ffn"):
            self.register_buffer(f"hc_{part}_fn", torch.zeros(mix, width))
            self.register_buffer(f"hc_{part}_base", torch.zeros(mix))
            self.register_buffer(f"hc_{part}_scale", torch.zeros(3))

    def hc_pre(self, part: str, streams: torch.Tensor, num: Numerics):
        """Streams [B,S,n,D] -> (the `part` sub-layer's normed input [B,S,D], post, comb)."""
        c = self.cfg
        x, post, comb = ops.hc_pre(streams, getattr(self, f"hc_{part}_fn"), getattr(self, f"hc_{part}_scale"),
                                   getattr(self, f"hc_{part}_base"), c.hc_sinkhorn_iters, c.rms_norm_eps, c.hc_eps)
        norm = self.attn_norm if part == "attn" else self.ffn_norm
        return norm(x, num.bf16), post, comb

    @staticmethod
    def hc_post(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                num: Numerics) -> torch.Tensor:
        """A sub-layer's output back into the streams (bf16 streams, as the reference keeps them)."""
        return _rnd(ops.hc_post(out, streams, post, comb), num)

    def forward(self, streams: torch.Tensor, tokens: torch.Tensor, step: Step, cache: dict, num: Numerics):
        # streams [B, S, n, D]
        x, post, comb = self.hc_pre("attn", streams, num)
        x, new_cache = self.attn(x, step, cache, num)
        streams = self.hc_post(x, streams, post, comb, num)
        x, post, comb = self.hc_pre("ffn", streams, num)
        return self.hc_post(self.ffn(x, tokens, num), streams, post, comb, num), new_cache


class HcHead(nn.Module):
    """Collapse the n streams into one (sigmoid weights, no Sinkhorn), then the final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n, self.eps, self.hc_eps = cfg.hc_mult, cfg.rms_norm_eps, cfg.hc_eps
        self.register_buffer("hc_head_fn", torch.zeros(cfg.hc_mult, cfg.hc_mult * cfg.hidden_size))
        self.register_buffer("hc_head_base", torch.zeros(cfg.hc_mult))
        self.register_buffer("hc_head_scale", torch.zeros(1))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, streams: torch.Tensor, num: Numerics) -> torch.Tensor:
        flat = streams.flatten(-2)
        mix = F.linear(flat, self.hc_head_fn) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.eps)
        pre = torch.sigmoid(mix * self.hc_head_scale + self.hc_head_base) + self.hc_eps
        return self.norm((pre[..., None] * streams).sum(-2), num.bf16)


class MTPBlock(nn.Module):
    """Multi-token prediction: combines the main model's pre-hc_head streams at position t with the
    embedding of token t+1 and predicts token t+2 through one sliding-window block."""

    def __init__(self, cfg: ModelConfig, layer: int, expert_format: str, shard: Shard = Shard()):
        super().__init__()
        fp8 = cfg.quantization.dense == "fp8"
        self.block = Block(cfg, layer, expert_format, shard)
        self.e_proj = Linear(cfg.hidden_size, cfg.hidden_size, fp8)
        self.h_proj = Linear(cfg.hidden_size, cfg.hidden_size, fp8)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = HcHead(cfg)


class DeepseekV4(nn.Module):
    def __init__(self, cfg: ModelConfig, numerics: Numerics | None = None, expert_format: str | None = None,
                 shard: Shard | None = None):
        """`shard`: the rank of a tensor/expert-parallel mesh this model computes (graphs/parallel.py); the
        default is the whole model on one device."""
        super().__init__()
        self.cfg = cfg.validate()
        self.numerics = numerics or Numerics.reference()
        self.shard = shard = shard or Shard()
        fmt = expert_format or {"fp4": "fp4", "fp8": "fp8"}.get(cfg.quantization.experts, "float")
        self.expert_format = fmt
        vocab = len(shard.part(cfg.vocab_size, GROUP_TENSOR))  # vocabulary-parallel embedding and head
        # embedding and head stay BF16 as shipped (half a float32 copy); rows are widened as they are read
        self.register_buffer("embed", torch.zeros(vocab, cfg.hidden_size, dtype=torch.bfloat16))
        self.layers = nn.ModuleList(Block(cfg, i, fmt, shard) for i in range(cfg.num_hidden_layers))
        self.final = HcHead(cfg)
        self.register_buffer("head", torch.zeros(vocab, cfg.hidden_size, dtype=torch.bfloat16))
        self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.num_hidden_layers + i, fmt, shard)
                                 for i in range(cfg.num_nextn_predict_layers))

    # -- cache ----------------------------------------------------------------------------------------------
    def cache_spec(self, batch: int, max_seq_len: int, include_mtp: bool = False) -> list[CacheEntry]:
        spec, rows = [], self.numerics.cache_rows
        for i in range(self.cfg.num_hidden_layers):
            spec += layer_cache_spec(self.cfg, f"layers.{i}", self.cfg.layer_ratio(i), batch, max_seq_len, rows)
        if include_mtp:
            for i in range(self.cfg.num_nextn_predict_layers):
                layer = self.cfg.num_hidden_layers + i
                spec += layer_cache_spec(self.cfg, f"mtp.{i}", self.cfg.layer_ratio(layer), batch, max_seq_len, rows)
        return spec

    def new_cache(self, batch: int, max_seq_len: int, include_mtp: bool = False) -> tuple[torch.Tensor, ...]:
        return tuple(e.empty() for e in self.cache_spec(batch, max_seq_len, include_mtp))

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, start_pos: torch.Tensor, n_valid: torch.Tensor,
                cache: tuple[torch.Tensor, ...], all_logits: bool = False, return_streams: bool = False):
        """-> (logits [B, V] at each sequence's last real token (or [B, S, V] with all_logits), new cache
        tuple [, pre-hc_head streams [B, S, n, D] for the MTP block])."""
        num, cfg = self.numerics, self.cfg
        step = Step(start_pos, n_valid, tokens.shape[1])
        x = self.embed_tokens(tokens)  # [B, S, D]
        streams = x[:, :, None, :].expand(-1, -1, cfg.hc_mult, -1)  # n identical streams
        new_cache, cursor = [], 0
        for i, block in enumerate(self.layers):
            names = layer_cache_fields(cfg.layer_ratio(i))
            layer_cache = dict(zip(names, cache[cursor:cursor + len(names)]))
            cursor += len(names)
            streams, updated = block(streams, tokens, step, layer_cache, num)
            new_cache += [updated[n] for n in names]
        logits = self.logits(self.final, streams, n_valid, all_logits)
        out = (logits, tuple(new_cache))
        return out + (streams,) if return_streams else out

    def logits(self, head: HcHead, streams: torch.Tensor, n_valid: torch.Tensor, all_logits: bool) -> torch.Tensor:
        if not all_logits:  # only each sequence's last real position: [B, 1, n, D]
            last = (n_valid - 1).clamp(min=0)
            streams = torch.gather(streams, 1, last.view(-1, 1, 1, 1).expand(-1, 1, *streams.shape[2:]))
        y = ops.bf16_linear(head(streams, self.numerics), self.head)
        if self.shard.tensor > 1:  # this rank's slice of the vocabulary: gather the others'
            y = ops.all_gather(y, GROUP_TENSOR, self.shard.tensor)
        return y if all_logits else y[:, 0]

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding rows of `tokens`; vocabulary-parallel: each rank looks up the ids in its slice, zeros for the
        others, and the tensor group sums them (exact: one rank contributes each row)."""
        if self.shard.tensor == 1:
            return F.embedding(tokens, self.embed).float()
        rows = self.embed.shape[0]
        local = tokens - self.shard.tp_rank * rows
        mine = (local >= 0) & (local < rows)
        x = self.embed[local.clamp(0, rows - 1)].float() * mine[..., None].float()
        return ops.all_reduce(x, GROUP_TENSOR)

    def mtp_input(self, tokens: torch.Tensor, streams: torch.Tensor, index: int = 0) -> torch.Tensor:
        """The MTP block's input streams: e_proj(enorm(embed(token t+1))) + h_proj(hnorm(streams_t)) per stream."""
        num, mtp = self.numerics, self.mtp[index]
        e = _rnd(mtp.enorm(self.embed_tokens(tokens)), num)
        h = _rnd(mtp.hnorm(streams), num)
        return _rnd(_rnd(mtp.e_proj(e, num.act_quant), num)[:, :, None, :] + _rnd(mtp.h_proj(h, num.act_quant), num), num)

    def forward_mtp(self, tokens: torch.Tensor, streams: torch.Tensor, start_pos: torch.Tensor,
                    n_valid: torch.Tensor, cache: tuple[torch.Tensor, ...], index: int = 0, all_logits: bool = False):
        """MTP block `index`: tokens [B,S] (token t+1 for stream position t), streams [B,S,n,D] from forward(...,
        return_streams=True). Cache: this MTP layer's entries only. -> (logits, new cache)."""
        num, mtp = self.numerics, self.mtp[index]
        step = Step(start_pos, n_valid, tokens.shape[1])
        x = self.mtp_input(tokens, streams, index)
        layer = self.cfg.num_hidden_layers + index
        names = layer_cache_fields(self.cfg.layer_ratio(layer))
        x, updated = mtp.block(x, tokens, step, dict(zip(names, cache)), num)
        return self.logits(mtp.head, x, n_valid, all_logits), tuple(updated[n] for n in names)


def head_rescale(q: torch.Tensor, eps: float, num: Numerics) -> torch.Tensor:
    """q * rsqrt(mean(q^2) + eps) per head, op by op in bf16 as the reference (registry.head_rescale)."""
    return ops.head_rescale(q, eps, num.bf16)


def _rnd(x: torch.Tensor, num: Numerics) -> torch.Tensor:
    """Round to bf16 where the reference stores bf16 (a no-op in plain numerics)."""
    return x.to(torch.bfloat16).float() if num.bf16 else x


# ---- loading official checkpoint tensors -------------------------------------------------------------------
_MTP_BLOCK_PARTS = ("attn.", "ffn.", "attn_norm.", "ffn_norm.", "hc_attn_", "hc_ffn_")
_MTP_HEAD_PARTS = ("hc_head_", "norm.")


def module_name(official: str) -> tuple[str, int | None]:
    """Official checkpoint name -> (model buffer name, expert index for stacked experts or None)."""
    if official in ("embed.weight", "head.weight"):
        return official.split(".")[0], None
    if official == "norm.weight" or official.startswith("hc_head_"):
        return f"final.{official}", None
    parts = official.split(".")
    if parts[0] == "mtp":
        rest = ".".join(parts[2:])
        if rest.startswith(_MTP_BLOCK_PARTS):
            official = f"mtp.{parts[1]}.block.{rest}"
        elif rest.startswith(_MTP_HEAD_PARTS):
            official = f"mtp.{parts[1]}.head.{rest}"
        parts = official.split(".")
    if "experts" in parts and parts[parts.index("experts") - 1] == "ffn" and parts[parts.index("experts") + 1].isdigit():
        i = parts.index("experts")
        expert, proj, kind = int(parts[i + 1]), parts[i + 2], parts[i + 3]
        stem = ".".join(parts[:i + 1])
        return f"{stem}.{proj}" + ("_scale" if kind == "scale" else ""), expert
    return official, None


def load_official(model: DeepseekV4, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Copy official-format tensors (one layer or any subset) into the model's buffers, converting formats:
    FP8 -> uint8 bits, e8m0 scales -> float32, FP4 int8 -> uint8, bf16 -> float32, and FP4 experts -> FP8 when
    the model was built with expert_format="fp8" (lossless transcode). Returns the buffer names written."""
    from dsv4c.graphs import quant

    buffers = dict(model.named_buffers())
    written = []
    shard = model.shard
    # another rank's routed experts are dropped first: neither transcoded nor converted here
    pending = {name: t for name, t in tensors.items() if _held_here(name, model.cfg.n_routed_experts, shard)}
    if model.expert_format == "fp8":
        pending = _transcode_experts(pending, quant)
    for name, t in pending.items():
        target, expert = module_name(name)
        if target not in buffers:
            raise KeyError(f"checkpoint tensor {name!r} has no place in the model (looked for {target!r})")
        if expert is not None:
            expert = local_expert(expert, model.cfg.n_routed_experts, shard)
        t = _rank_slice(name, t, pending, shard)
        dst = buffers[target] if expert is None else buffers[target][expert]
        src = _convert(t, dst.dtype, quant)
        if src.shape != dst.shape:
            raise ValueError(f"checkpoint tensor {name!r}: shape {tuple(src.shape)} does not fit model buffer "
                             f"{target!r} {tuple(dst.shape)}")
        dst.copy_(src)
        written.append(target)
    return written


def _held_here(name: str, n_experts: int, shard: Shard) -> bool:
    """Whether this rank holds (a slice of) official tensor `name`: every tensor but another rank's experts."""
    expert = module_name(name)[1]
    return expert is None or local_expert(expert, n_experts, shard) is not None


def _rank_slice(name: str, t: torch.Tensor, tensors: dict[str, torch.Tensor], shard: Shard) -> torch.Tensor:
    """This rank's slice of an official tensor (a scale is sliced by the blocks of its weight's slice)."""
    dim = split_dim(name, shard)
    if dim is None:
        return t
    weight = tensors.get(name[: -len("scale")] + "weight") if name.endswith(".scale") else None
    return shard_tensor(name, t, None if weight is None else weight.shape[dim], shard)


def load_checkpoint_model(reader: CheckpointReader, numerics: Numerics | None = None,
                          expert_format: str | None = None, shard: Shard | None = None) -> DeepseekV4:
    """DeepseekV4 (or one rank's shard of it) with the weights of an official-format checkpoint, read layer by
    layer (besides the model, at most one layer's tensors and the globals are held at once). Defaults as
    DeepseekV4's."""
    model = DeepseekV4(reader.config, numerics, expert_format, shard)
    load_official(model, reader.read_globals())
    for _, tensors in reader.iter_layers():
        load_official(model, tensors)
    return model.eval()


def _convert(t: torch.Tensor, dtype: torch.dtype, quant) -> torch.Tensor:
    if t.dtype == torch.float8_e8m0fnu:
        return quant.e8m0_to_float(t)
    if dtype == torch.uint8:
        return t.view(torch.uint8)
    return t.to(dtype)


def _transcode_experts(tensors: dict[str, torch.Tensor], quant) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for name, t in tensors.items():
        if ".experts." in name and name.endswith(".weight") and t.dtype == torch.int8:
            scale_name = name[: -len("weight")] + "scale"
            w8, s8 = quant.transcode_fp4_to_fp8(t, tensors[scale_name])
            out[name], out[scale_name] = w8, s8
    return out
