"""Sparse MQA with an attention sink over gathered K=V rows: `sparse_attn`.

Every query (b, s) attends to K rows of its batch's [kv | cmp] picked by idx[b, s] (-1 = no row; row N + j is
cmp's row j: the window and the compressed entries stay two tensors, so a step never copies the long one); all H
heads share
those rows (one latent K=V head), so a program loads each gathered row block once for BLOCK_H heads and runs
an online softmax over the picks. The blocks are part of the numerics, not a tuning choice (registry.py
sparse_attn, spec §3.9.2): exactly ATTN_BLOCK = 64 picks per block, in idx order; per block

    m' = max(m, max_k l_k),   p_k = exp(l_k - m'),   l = scale * q_h . kv_k   (-inf for -1 picks)
    denom = denom * exp(m - m') + sum_k p_k                  (the unrounded p)
    acc   = acc   * exp(m - m') + sum_k bf16(p_k) kv_k        (p rounded to bf16 first when BF16)

and at the end o = acc / (denom + exp(sink_h - m)): the sink joins the denominator only, against the final
max (0 while nothing was valid, so blocks of -1 picks give exp(-inf) = 0, never NaN). Rows with no valid pick
give o = 0. Indices outside [0, N + M) are treated as -1 (never read), so a bad index cannot fault the GPU.
kv rows are float, bf16, or packed FP8 rows (ROPE > 0: quant.pack_kv_fp8), unpacked as they are loaded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4c.graphs.ops.registry import ATTN_BLOCK
from dsv4c.graphs import quant
from dsv4c.targets.tensorrt.kernels.common import (F32_PRECISION, check_shape, check_tensors, f32, load_kv_rows,
                                                    next_pow2, packed_rows, require, round_bf16)


@triton.jit
def load_picks(kv_ptr, cmp_ptr, rows_kv, rows_cmp, valid, in_kv, dims, D: tl.constexpr, ROPE: tl.constexpr,
               ROW_BYTES: tl.constexpr):
    """The picked rows [R, C] from whichever part holds each (a select, so the values are exactly the row's)."""
    from_kv = load_kv_rows(kv_ptr, rows_kv, valid & in_kv, dims, D, ROPE, ROW_BYTES)
    from_cmp = load_kv_rows(cmp_ptr, rows_cmp, valid & ~in_kv, dims, D, ROPE, ROW_BYTES)
    return tl.where(in_kv[:, None], from_kv, from_cmp)


@triton.jit
def sparse_attn_kernel(q_ptr, kv_ptr, cmp_ptr, sink_ptr, idx_ptr, S, H, N, M, K, o_ptr,
                       D: tl.constexpr, SCALE: tl.constexpr, BF16: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
                       ROPE: tl.constexpr = 0, ROW_BYTES: tl.constexpr = 0):
    # q [B,S,H,D] f32, kv [B,N,D] and cmp [B,M,D] f32 / bf16 or [B,*,ROW_BYTES] packed (ROPE > 0), sink [H] f32,
    # idx [B,S,K] i64 rows of [kv | cmp]
    # -> o [B,S,H,D]; program (b*S+s, head block)
    # q.kv runs over D in chunks of BLOCK_DC (only a [BH, DC] slice of q and a [BK, DC] slice of the rows live
    # at once); the P.V product needs the full rows, re-read from L1/L2
    bs = tl.program_id(0).to(tl.int64)
    b = bs // S
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    h_ok, d_ok = heads < H, dims < D
    q_rows = (bs * H + heads)[:, None] * D
    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)  # running max of the logits
    l = tl.zeros((BLOCK_H,), tl.float32)  # running sum of exp(logit - m)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        picks = k0 + tl.arange(0, BLOCK_K)
        ids = tl.load(idx_ptr + bs * K + picks, mask=picks < K, other=-1)
        valid = (ids >= 0) & (ids < N + M)
        in_kv = ids < N
        rows_kv = b * N + tl.where(valid & in_kv, ids, 0)
        rows_cmp = b * M + tl.where(valid & ~in_kv, ids - N, 0)
        logits = tl.zeros((BLOCK_H, BLOCK_K), tl.float32)
        for d0 in tl.static_range(0, BLOCK_D, BLOCK_DC):
            dc = d0 + tl.arange(0, BLOCK_DC)
            qc = tl.load(q_ptr + q_rows + dc[None, :], mask=h_ok[:, None] & (dc < D)[None, :], other=0.0)
            rc = load_picks(kv_ptr, cmp_ptr, rows_kv, rows_cmp, valid, in_kv, dc, D, ROPE, ROW_BYTES)
            logits += tl.dot(qc, tl.trans(rc), input_precision=PRECISION)
        logits = tl.where(valid[None, :], logits * SCALE, float("-inf"))  # [BH, BK]
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: no -inf - -inf
        alpha = tl.exp(m - m_ref)
        p = tl.exp(logits - m_ref[:, None])
        l = l * alpha + tl.sum(p, axis=1)  # the denominator sums the unrounded p
        if BF16:
            p = round_bf16(p)  # the reference's P.V takes bf16 probabilities
        rows = load_picks(kv_ptr, cmp_ptr, rows_kv, rows_cmp, valid, in_kv, dims, D, ROPE, ROW_BYTES)
        acc = acc * alpha[:, None] + tl.dot(p, rows, input_precision=PRECISION)
        m = m_new
    sink = tl.load(sink_ptr + heads, mask=h_ok, other=0.0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    o = tl.div_rn(acc, (l + tl.exp(sink - m_ref))[:, None])  # correctly rounded, as torch's division
    tl.store(o_ptr + q_rows + dims[None, :], o, mask=h_ok[:, None] & d_ok[None, :])


# (BLOCK_H, BLOCK_DC, num_warps) by padded head dim; overridable for tuning (benchmarks/). BLOCK_K is not
# tunable: it is the reference's ATTN_BLOCK. "large" was measured on H100 with 32-pick blocks
# (benchmarks/triton_kernels.py --sweep); to be re-measured at 64.
ATTN_CONFIG: dict[str, tuple[int, int, int]] = {"large": (16, 128, 8), "small": (16, 64, 4)}


def attn_blocks(d: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_H, BLOCK_K, BLOCK_D, BLOCK_DC, num_warps): 16 heads share each gathered row block."""
    bd = max(16, next_pow2(d))
    bh, dc, warps = ATTN_CONFIG["large" if bd >= 256 else "small"]
    return bh, ATTN_BLOCK, bd, min(dc, bd), warps


def sparse_attn(q: torch.Tensor, kv: torch.Tensor, cmp: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                scale: float, bf16: bool, kv_rope: int = 0) -> torch.Tensor:
    """dsv4::sparse_attn: q [B,S,H,D], kv [B,N,D] and cmp [B,M,D] (or packed FP8 rows [B,*,kv_row_bytes] uint8
    with kv_rope RoPE dims), sink [H], idx [B,S,K] int64 rows of [kv | cmp] (-1 = none) -> o [B,S,H,D]; `bf16`
    rounds each block's probabilities to bf16 before the P.V product."""
    op = "sparse_attn"
    check_tensors(op, q=q, kv=kv, cmp=cmp, sink=sink, idx=idx)
    require(q.dim() == 4, op, f"`q` must be [B, S, H, D], got shape {list(q.shape)}")
    b, s, h, d = q.shape
    require((kv.dtype == torch.uint8) == (kv_rope > 0), op, f"`kv` must be packed uint8 rows exactly when "
            f"kv_rope > 0, got {kv.dtype} with kv_rope={kv_rope}")
    require(cmp.dtype == kv.dtype, op, f"`cmp` must hold rows like `kv` ({kv.dtype}), got {cmp.dtype}")
    width = quant.kv_row_bytes(d, kv_rope) if kv_rope else d
    check_shape(op, "kv", kv, (b, None, width))
    check_shape(op, "cmp", cmp, (b, None, width))
    check_shape(op, "sink", sink, (h,))
    check_shape(op, "idx", idx, (b, s, None))
    require(idx.dtype == torch.int64, op, f"`idx` must be int64, got {idx.dtype}")
    n, m, k = kv.shape[1], cmp.shape[1], idx.shape[2]
    o = torch.empty(b, s, h, d, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o
    rows = packed_rows(kv)
    cmp_rows = packed_rows(cmp) if m else rows  # no compressed entries: a valid address that is never read
    bh, bk, bd, dc, warps = attn_blocks(d)
    sparse_attn_kernel[(b * s, triton.cdiv(h, bh))](
        f32(q), rows, cmp_rows, f32(sink), idx.contiguous(), s, h, n, m, k, o, D=d, SCALE=float(scale),
        BF16=bool(bf16), PRECISION=F32_PRECISION, BLOCK_H=bh, BLOCK_K=bk, BLOCK_D=bd, BLOCK_DC=dc, ROPE=int(kv_rope),
        ROW_BYTES=width if kv_rope else 0, num_warps=warps)
    return o
