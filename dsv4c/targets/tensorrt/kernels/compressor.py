"""Gated pooling of raw token rows into compressed KV entries: `compress_pool` (CSA ratio 4 with overlap,
HCA ratio 128, the indexer's keys).

A program owns one entry (b, k) and a block of channels. The entry's span is the c*ratio rows ending at row
ends[b, k]; with overlap (c = 2) the older `ratio` rows contribute channels [:d] and the window's own rows
channels [d:]. Per channel: softmax of the scores over the span's rows, then the weighted sum of kv:

    entry[ch] = sum_j exp(score_j - max) kv_j / sum_j exp(score_j - max)

Entries with ends = -1 are zero. Rows are clamped to the tensor (never read out of bounds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4c.targets.tensorrt.kernels.common import check_shape, check_tensors, f32, next_pow2, require


@triton.jit
def compress_pool_kernel(kv_ptr, score_ptr, ends_ptr, L, KN, D, out_ptr,
                         RATIO: tl.constexpr, C: tl.constexpr, SPAN_P: tl.constexpr, BLOCK_D: tl.constexpr):
    # kv, score [B, L, C*D] f32, ends [B, KN] i64 -> out [B, KN, D]; program (b*KN + k, channel block)
    SPAN: tl.constexpr = C * RATIO
    bk = tl.program_id(0).to(tl.int64)
    b = bk // KN
    end = tl.load(ends_ptr + bk)
    chans = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    j = tl.arange(0, SPAN_P)  # span row, oldest first
    rows = tl.maximum(end, SPAN - 1) - (SPAN - 1) + j
    half = tl.where(j >= SPAN - RATIO, C - 1, 0)  # overlap: older window -> channels [:d], own window -> [d:]
    mask = (j < SPAN)[:, None] & (rows < L)[:, None] & (chans < D)[None, :]
    offs = (b * L + rows)[:, None] * (C * D) + (half * D)[:, None] + chans[None, :]
    kv = tl.load(kv_ptr + offs, mask=mask, other=0.0)  # [SPAN_P, BD]
    score = tl.load(score_ptr + offs, mask=mask, other=float("-inf"))
    score = tl.where((chans < D)[None, :], score, 0.0)  # idle channel lanes: finite, so no inf - inf
    p = tl.exp(score - tl.max(score, axis=0)[None, :])
    pooled = tl.sum(p * kv, axis=0) / tl.sum(p, axis=0)
    pooled = tl.where(end >= 0, pooled, 0.0)
    tl.store(out_ptr + bk * D + chans, pooled, mask=chans < D)


def compress_pool(kv: torch.Tensor, score: torch.Tensor, ends: torch.Tensor, ratio: int, overlap: bool) -> torch.Tensor:
    """dsv4::compress_pool: kv, score [B, L, c*d], ends [B, K] int64 (-1 = none) -> [B, K, d]."""
    op = "compress_pool"
    check_tensors(op, kv=kv, score=score, ends=ends)
    require(kv.dim() == 3, op, f"`kv` must be [B, L, c*d], got shape {list(kv.shape)}")
    b, length, cd = kv.shape
    c = 2 if overlap else 1
    require(cd % c == 0, op, f"with overlap the last dim of `kv` ({cd}) must be even (2*d)")
    require(ratio > 0, op, f"ratio must be positive, got {ratio}")
    check_shape(op, "score", score, (b, length, cd))
    require(ends.dim() == 2 and ends.shape[0] == b, op, f"`ends` must be [B={b}, K], got shape {list(ends.shape)}")
    require(ends.dtype == torch.int64, op, f"`ends` must be int64, got {ends.dtype}")
    d, kn = cd // c, ends.shape[1]
    out = torch.empty(b, kn, d, dtype=torch.float32, device=kv.device)
    if out.numel() == 0:
        return out
    block_d = min(128, next_pow2(d))
    compress_pool_kernel[(b * kn, triton.cdiv(d, block_d))](
        f32(kv), f32(score), ends.contiguous(), length, kn, d, out, RATIO=ratio, C=c, SPAN_P=next_pow2(c * ratio),
        BLOCK_D=block_d)
    return out
