"""FP8 block-scaled linears: `fp8_linear` (y = q(x) W^T) and `fp8_grouped_linear` (wo_a, one W slice per group).

W is uint8 e4m3 bits [N, K] with one scale per 128x128 block (e8m0 bytes as the checkpoint ships them, or
float32); with act_quant, x is FP8-quantised per row
and 128 channels with power-of-two scales (W8A8, registry.fp8_linear). One kernel does both: a K step is
exactly one 128-wide scale block, so the activation quantisation is local to the x tile the program already
holds (fused, no extra pass over x), and

    y[m, n] = sum_kb  s_x[m, kb] * s_w[n // 128, kb] * (q_x[m, kb-block] . w[n, kb-block])

On the GPU the inner dot is a bf16 tensor-core dot (e4m3 values are exact in bf16, products exact, fp32
accumulation; FP8 MMAs are not, see common.py); without act_quant x stays fp32 and the dot is tf32x3 (GPU) /
fp32 (interpreter).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsv4c.graphs.quant import FP8_BLOCK
from dsv4c.targets.tensorrt.kernels.common import (F32_PRECISION, LOWP_DOT, check_scale_dtype, check_shape,
                                                   check_tensors, e4m3_values, f32, quantize_fp8_rows, require,
                                                   scale_operand, weight_scales)


@triton.jit
def fp8_gemm_kernel(x_ptr, w_ptr, ws_ptr, M, N, K, G, y_ptr,
                    ACT_QUANT: tl.constexpr, LOWP_DOT: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, E8M0: tl.constexpr):
    # x [M, G, K] f32, w [G*N, K] u8 e4m3, ws [ceil(G*N/128), ceil(K/128)] e8m0 u8 (E8M0) or f32, y [M, G, N] f32
    # program (m block, n block, group g); group g uses rows g*N .. g*N+N-1 of w
    BLOCK_K: tl.constexpr = 128  # = the scale block: one s_x per row and one s_w per column per step
    g = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = (g * N + cols).to(tl.int64)
    row_ok, col_ok = rows < M, cols < N
    kbs = tl.cdiv(K, BLOCK_K)
    x_base = x_ptr + rows[:, None].to(tl.int64) * G * K + g * K
    w_base = w_ptr + w_rows[None, :] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, kbs):
        ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_base + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, 128]
        wb = tl.load(w_base + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0)  # [128, BN] bits
        s_w = weight_scales(tl.load(ws_ptr + (w_rows // 128) * kbs + kb, mask=col_ok, other=0), E8M0)  # [BN]
        if ACT_QUANT:
            xq, s_x = quantize_fp8_rows(x)
            if LOWP_DOT:  # e4m3 values are exact in bf16
                part = tl.dot(xq.to(tl.bfloat16), e4m3_values(wb, LOWP_DOT).to(tl.bfloat16))
            else:
                part = tl.dot(xq, e4m3_values(wb, LOWP_DOT), input_precision=PRECISION)
            acc += part * s_x[:, None] * s_w[None, :]
        else:
            part = tl.dot(x, e4m3_values(wb, LOWP_DOT), input_precision=PRECISION)
            acc += part * s_w[None, :]
    y_offs = rows[:, None].to(tl.int64) * G * N + g * N + cols[None, :]
    tl.store(y_ptr + y_offs, acc, mask=row_ok[:, None] & col_ok[None, :])


def gemm_blocks(m: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) by the number of rows: thin decode GEMMs split N finely so every SM streams weights."""
    if m <= 16:
        return 16, 32
    if m <= 64:
        return 32, 64
    return 64, 128


def _check(op: str, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, rows: int, act_quant: bool) -> None:
    check_tensors(op, x=x, w=w, w_scale=w_scale)
    k = x.shape[-1]
    require(w.dtype == torch.uint8, op, f"`w` must be uint8 e4m3 bit patterns, got {w.dtype}")
    check_shape(op, "w", w, (rows, k))
    check_shape(op, "w_scale", w_scale, (math.ceil(rows / FP8_BLOCK), math.ceil(k / FP8_BLOCK)))
    check_scale_dtype(op, "w_scale", w_scale)
    require(not act_quant or k % FP8_BLOCK == 0, op,
            f"act_quant quantises `x` in blocks of {FP8_BLOCK}: its last dim ({k}) must be a multiple of {FP8_BLOCK}")


def _run(x3: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, n: int, act_quant: bool) -> torch.Tensor:
    """x3 [M, G, K] f32 contiguous -> y [M, G, N]."""
    m, g, k = x3.shape
    y = torch.empty(m, g, n, dtype=torch.float32, device=x3.device)
    if m == 0 or n == 0:
        return y
    bm, bn = gemm_blocks(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), g)
    scales, e8m0 = scale_operand(w_scale)
    fp8_gemm_kernel[grid](x3, w.contiguous(), scales, m, n, k, g, y, ACT_QUANT=act_quant,
                          LOWP_DOT=LOWP_DOT, PRECISION=F32_PRECISION, BLOCK_M=bm, BLOCK_N=bn, E8M0=e8m0)
    return y


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, act_quant: bool) -> torch.Tensor:
    """dsv4::fp8_linear: x [..., K] f32, w [N, K] u8 e4m3, w_scale [ceil(N/128), ceil(K/128)] (e8m0 bytes or
    float32) -> [..., N]."""
    _check("fp8_linear", x, w, w_scale, w.shape[0], act_quant)
    k, n = x.shape[-1], w.shape[0]
    y = _run(f32(x).reshape(-1, 1, k), w, w_scale, n, act_quant)
    return y.reshape(*x.shape[:-1], n)


def fp8_grouped_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, act_quant: bool) -> torch.Tensor:
    """dsv4::fp8_grouped_linear: x [..., G, K], w [G*R, K] -> y [..., G, R], y[.., g, :] = x[.., g, :] @ w_g^T."""
    require(x.dim() >= 2, "fp8_grouped_linear", f"`x` must be [..., G, K], got shape {list(x.shape)}")
    g, k = x.shape[-2], x.shape[-1]
    require(g > 0 and w.shape[0] % g == 0, "fp8_grouped_linear",
            f"rows of `w` ({w.shape[0]}) must be a multiple of the group count G={g} (dim -2 of `x`)")
    _check("fp8_grouped_linear", x, w, w_scale, w.shape[0], act_quant)
    r = w.shape[0] // g
    y = _run(f32(x).reshape(-1, g, k), w, w_scale, r, act_quant)
    return y.reshape(*x.shape[:-1], r)
