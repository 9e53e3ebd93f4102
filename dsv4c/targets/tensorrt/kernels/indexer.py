"""Lightning indexer: `indexer_topk` = a Triton scoring kernel + a top-k over packed keys; `indexer_scores` = the
same scores as float32 (one tensor-parallel rank's heads, all-reduced before the top-k).

Two passes. The kernel scores every compressed entry for a block of queries,

    score[b, s, n] = sum_h w[b, s, h] * relu(q[b, s, h] . k[b, n])      (-inf where n >= n_visible[b, s])

(with BF16, as the reference's bf16 einsum / product / reduction: each q . k, each w * relu(.) and the head
sum, accumulated in fp32, are rounded to bf16; spec §3.9.4)

and writes one int64 sort key per entry: the score's order-preserving integer image in the high 32 bits and
(2^32 - 1 - n) in the low 32 bits. Keys are unique, larger key = larger score, and among equal scores the lower
entry id wins: exactly the reference's stable descending order (ONNX TopK's tie rule). The second pass is
`torch.topk` on the keys (unique keys make its order fully determined), then ids >= n_visible become -1.
An in-kernel top-k over up to 256K entries per query (1M context / 4) is not practical in one Triton
program; on TensorRT the same split maps to this plugin (scores) feeding TensorRT's own TopK layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4c.graphs import quant
from dsv4c.targets.tensorrt.kernels.common import (F32_PRECISION, check_shape, check_tensors, f32, load_fp4_rows,
                                                    next_pow2, packed_rows, require, round_bf16)

LOW_MASK = (1 << 32) - 1


@triton.jit
def _head_scores(q_ptr, k_ptr, w_ptr, S, H, N, b, qs, ents, D: tl.constexpr, BF16: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, PACKED: tl.constexpr):
    # sum_h w[b,s,h] relu(q[b,s,h] . k[b,n]) for the BLOCK_S queries `qs` x BLOCK_N entries `ents`, at the
    # reference's bf16 points; the BLOCK_S queries' heads form the rows of one dot. Shared by indexer_topk's key
    # kernel and indexer_scores (the head-partial scores a tensor-parallel rank all-reduces before the top-k).
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    s_ok, n_ok, h_ok, d_ok = qs < S, ents < N, heads < H, dims < D
    q_rows = (b * S + qs)[:, None] * H + heads[None, :]  # [BS, BH]
    q = tl.load(q_ptr + q_rows[:, :, None] * D + dims[None, None, :],
                mask=(s_ok[:, None] & h_ok[None, :])[:, :, None] & d_ok[None, None, :], other=0.0)
    keys_t = load_fp4_rows(k_ptr, b * N + tl.where(n_ok, ents, 0), n_ok, dims, D, PACKED)  # bf16: widened exactly
    logits = tl.dot(tl.reshape(q, (BLOCK_S * BLOCK_H, BLOCK_D)), tl.trans(keys_t), input_precision=PRECISION)
    w = tl.load(w_ptr + q_rows, mask=s_ok[:, None] & h_ok[None, :], other=0.0)  # [BS, BH]
    logits = tl.reshape(logits, (BLOCK_S, BLOCK_H, BLOCK_N))
    if BF16:
        logits = round_bf16(logits)
    weighted = tl.maximum(logits, 0.0) * w[:, :, None]
    if BF16:
        weighted = round_bf16(weighted)
    score = tl.sum(weighted, axis=1)  # padding heads hold 0
    if BF16:
        score = round_bf16(score)
    return score


@triton.jit
def indexer_keys_kernel(q_ptr, k_ptr, w_ptr, nvis_ptr, S, H, N, keys_ptr,
                        D: tl.constexpr, BF16: tl.constexpr, PRECISION: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PACKED: tl.constexpr = False):
    # q [B,S,H,D], k [B,N,D], w [B,S,H] f32, n_visible [B,S] i64 -> keys [B,S,N] i64
    # program (b, query block, entry block)
    b = tl.program_id(0).to(tl.int64)
    qs = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    ents = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    s_ok, n_ok = qs < S, ents < N
    score = _head_scores(q_ptr, k_ptr, w_ptr, S, H, N, b, qs, ents, D, BF16, PRECISION, BLOCK_S, BLOCK_H, BLOCK_N,
                         BLOCK_D, PACKED)
    n_vis = tl.load(nvis_ptr + b * S + qs, mask=s_ok, other=0)
    score = tl.where(ents[None, :] < n_vis[:, None], score, float("-inf"))
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0 (the reference compares values)
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone in the float value
    keys = ordered.to(tl.int64) * 4294967296 + (4294967295 - ents.to(tl.int64))[None, :]
    tl.store(keys_ptr + (b * S + qs)[:, None] * N + ents[None, :], keys, mask=s_ok[:, None] & n_ok[None, :])


@triton.jit
def indexer_scores_kernel(q_ptr, k_ptr, w_ptr, S, H, N, out_ptr,
                          D: tl.constexpr, BF16: tl.constexpr, PRECISION: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          PACKED: tl.constexpr = False):
    # q [B,S,H,D], k [B,N,D], w [B,S,H] f32 -> scores [B,S,N] f32 (no mask: the summed scores are masked by the
    # top-k that follows the all-reduce); program (b, query block, entry block)
    b = tl.program_id(0).to(tl.int64)
    qs = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    ents = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    score = _head_scores(q_ptr, k_ptr, w_ptr, S, H, N, b, qs, ents, D, BF16, PRECISION, BLOCK_S, BLOCK_H, BLOCK_N,
                         BLOCK_D, PACKED)
    tl.store(out_ptr + (b * S + qs)[:, None] * N + ents[None, :], score, mask=(qs < S)[:, None] & (ents < N)[None, :])


def indexer_blocks(h: int, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_S, BLOCK_H, BLOCK_N, BLOCK_D): at least 16 dot rows (queries x heads), 64 entries per program."""
    bh = next_pow2(h)
    return max(1, 16 // bh), bh, 64, max(16, next_pow2(d))


def indexer_keys(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, n_visible: torch.Tensor,
                 bf16: bool) -> torch.Tensor:
    """Pass 1: the int64 sort keys [B, S, N] (see the module doc)."""
    b, s, h, d = q.shape
    n = k.shape[1]
    keys = torch.empty(b, s, n, dtype=torch.int64, device=q.device)
    if keys.numel() == 0:
        return keys
    bs, bh, bn, bd = indexer_blocks(h, d)
    indexer_keys_kernel[(b, triton.cdiv(s, bs), triton.cdiv(n, bn))](
        f32(q), packed_rows(k), f32(w), n_visible.contiguous(), s, h, n, keys, D=d, BF16=bool(bf16),
        PRECISION=F32_PRECISION, BLOCK_S=bs, BLOCK_H=bh, BLOCK_N=bn, BLOCK_D=bd, PACKED=k.dtype == torch.uint8)
    return keys


def check_indexer_inputs(op: str, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int, int]:
    """The query, key and head-weight tensors both indexer ops take, checked: q [B,S,h,d], k [B,N,d], w [B,S,h].
    -> (B, S, h, d)."""
    check_tensors(op, q=q, k=k, w=w)
    require(q.dim() == 4, op, f"`q` must be [B, S, h, d], got shape {list(q.shape)}")
    b, s, h, d = q.shape
    check_shape(op, "k", k, (b, None, quant.fp4_row_bytes(d) if k.dtype == torch.uint8 else d))
    check_shape(op, "w", w, (b, s, h))
    return b, s, h, d


def indexer_topk(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, n_visible: torch.Tensor, topk: int,
                 bf16: bool) -> torch.Tensor:
    """dsv4::indexer_topk: q [B,S,h,d], k [B,N,d], w [B,S,h], n_visible [B,S] int64 -> ids [B,S,min(topk,N)]
    in descending score order (ties: lower id first), -1 for picks that are not visible; `bf16` scores at the
    reference's bf16 rounding points."""
    op = "indexer_topk"
    check_tensors(op, n_visible=n_visible)
    b, s, _, _ = check_indexer_inputs(op, q, k, w)
    check_shape(op, "n_visible", n_visible, (b, s))
    require(n_visible.dtype == torch.int64, op, f"`n_visible` must be int64, got {n_visible.dtype}")
    require(topk > 0, op, f"topk must be positive, got {topk}")
    kk = min(topk, k.shape[1])
    keys = indexer_keys(q, k, w, n_visible, bf16)
    if kk == 0:
        return keys[..., :0]
    best = torch.topk(keys, kk, dim=-1, largest=True, sorted=True).values
    ids = LOW_MASK - (best & LOW_MASK)
    return torch.where(ids >= n_visible[..., None], torch.full_like(ids, -1), ids)


def indexer_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, bf16: bool) -> torch.Tensor:
    """dsv4::indexer_scores: q [B,S,h,d], k [B,N,d] (or packed FP4 rows, uint8), w [B,S,h] -> the heads' summed scores [B,S,N] float32, at the
    reference's bf16 points with `bf16`, no mask (a tensor-parallel rank's partial scores, all-reduced before the
    top-k: spec §2.5)."""
    b, s, h, d = check_indexer_inputs("indexer_scores", q, k, w)
    n = k.shape[1]
    out = torch.empty(b, s, n, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    bs, bh, bn, bd = indexer_blocks(h, d)
    indexer_scores_kernel[(b, triton.cdiv(s, bs), triton.cdiv(n, bn))](
        f32(q), packed_rows(k), f32(w), s, h, n, out, D=d, BF16=bool(bf16), PRECISION=F32_PRECISION, BLOCK_S=bs,
        BLOCK_H=bh, BLOCK_N=bn, BLOCK_D=bd, PACKED=k.dtype == torch.uint8)
    return out
