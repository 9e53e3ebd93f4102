"""QAT simulations: `fake_quant_fp8` (KV cache rounding) and `hadamard_fp4` (indexer q / keys); the packed cache
rows' writers `pack_kv_fp8` and `pack_fp4` (torch glue on the launcher's device, no Triton kernel yet).

Both are elementwise-per-block and bit-exact with the torch reference (registry.py): the FP8/FP4 rounding is
exact arithmetic (common.py) and the Walsh-Hadamard butterflies run in the reference's order
(pairs (a, b) -> (a + b, a - b) at distance 1, 2, 4, ..., then one multiply by d^-1/2).

Kernel signatures follow the TensorRT AOT plugin convention (plugins.py): input pointers, int32 scalars,
output pointers, then compile-time constants.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsv4c.graphs import quant as qt
from dsv4c.targets.tensorrt.kernels.common import (ceil_pow2, check_tensors, exp2i, exponent_of, f32, next_pow2,
                                                    quantize_fp8_rows, require, round_bf16, round_to_e2m1)

FAKE_QUANT_ROWS = 16  # rows per program
HADAMARD_ROWS = 16


@triton.jit
def fake_quant_fp8_kernel(x_ptr, R, K, y_ptr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    # x, y [R, K] f32, quantisation blocks of BLOCK along K; program (row block, K block)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    lane = tl.arange(0, BLOCK_P)  # BLOCK padded to a power of two
    mask = (rows[:, None] < R) & (lane[None, :] < BLOCK)
    offs = rows[:, None].to(tl.int64) * K + tl.program_id(1) * BLOCK + lane[None, :]
    q, scale = quantize_fp8_rows(tl.load(x_ptr + offs, mask=mask, other=0.0))
    tl.store(y_ptr + offs, q * scale[:, None], mask=mask)


def fake_quant_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """dsv4::fake_quant_fp8: FP8 e4m3 quantise-dequantise along the last dim in blocks of `block`."""
    check_tensors("fake_quant_fp8", x=x)
    k = x.shape[-1]
    require(block > 0 and k % block == 0, "fake_quant_fp8",
            f"last dim of `x` ({k}) must be a multiple of block={block}")
    xf = f32(x)
    y = torch.empty_like(xf)
    rows = xf.numel() // k if k else 0
    if rows:
        grid = (triton.cdiv(rows, FAKE_QUANT_ROWS), k // block)
        fake_quant_fp8_kernel[grid](xf, rows, k, y, BLOCK=block, BLOCK_P=next_pow2(block), BLOCK_R=FAKE_QUANT_ROWS)
    return y


@triton.jit
def hadamard_fp4_kernel(x_ptr, R, y_ptr, D: tl.constexpr, LOG2_D: tl.constexpr, SCALE: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    # x, y [R, D] f32, D a power of two >= 32; program: BLOCK_R rows
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = rows[:, None].to(tl.int64) * D + tl.arange(0, D)[None, :]
    mask = rows[:, None] < R
    y = tl.load(x_ptr + offs, mask=mask, other=0.0)
    for stage in tl.static_range(LOG2_D):  # butterflies at distance h = 2^stage, as quant.hadamard
        pairs = tl.reshape(y, (BLOCK_R, D // (2 << stage), 2, 1 << stage))  # [.., 2, h]: (a, b) at distance h
        pairs = tl.permute(pairs, (0, 1, 3, 2))
        a, b = tl.split(pairs)
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (BLOCK_R, D))
    y = y * SCALE  # d^-1/2 rounded to fp32, as torch multiplies by the Python float
    y = round_bf16(y)  # the reference's Hadamard returns bf16, which the FP4 simulation takes (spec §3.9.3)
    # FP4 e2m1 fake-quant in blocks of 32, scale 2^ceil(log2(max(amax, 6 * 2^-126) / 6))
    yb = tl.reshape(y, (BLOCK_R, D // 32, 32))
    amax = tl.maximum(tl.max(tl.abs(yb), axis=2), 7.052966104933725e-38)
    scale = ceil_pow2(tl.div_rn(amax, 6.0))
    q = round_to_e2m1(yb * exp2i(-exponent_of(scale))[:, :, None]) * scale[:, :, None]
    tl.store(y_ptr + offs, tl.reshape(q, (BLOCK_R, D)), mask=mask)


def hadamard_fp4(x: torch.Tensor) -> torch.Tensor:
    """dsv4::hadamard_fp4: orthonormal Walsh-Hadamard rotation of the last dim, rounded to bf16, then FP4
    fake-quant (blocks of 32)."""
    check_tensors("hadamard_fp4", x=x)
    d = x.shape[-1]
    require(d >= 32 and d & (d - 1) == 0, "hadamard_fp4", f"last dim of `x` must be a power of two >= 32, got {d}")
    xf = f32(x)
    y = torch.empty_like(xf)
    rows = xf.numel() // d
    if rows:
        hadamard_fp4_kernel[(triton.cdiv(rows, HADAMARD_ROWS),)](
            xf, rows, y, D=d, LOG2_D=int(math.log2(d)), SCALE=d ** -0.5, BLOCK_R=HADAMARD_ROWS)
    return y


# ---- packed cache rows: torch glue (a few rows per step; no Triton kernel yet) ------------------------------------
def pack_kv_fp8(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """dsv4::pack_kv_fp8 with torch ops on the launcher's device: rows [..., D] -> packed FP8 rows (uint8)."""
    require(x.shape[-1] > rope_dim > 0 and (x.shape[-1] - rope_dim) % qt.KV_SCALE_BLOCK == 0, "pack_kv_fp8",
            f"rope_dim={rope_dim} must leave a multiple of 64 non-RoPE dims of x {list(x.shape)}")
    return qt.pack_kv_fp8(f32(x), rope_dim)


def pack_fp4(x: torch.Tensor) -> torch.Tensor:
    """dsv4::pack_fp4 with torch ops on the launcher's device: rows [..., d] -> packed FP4 rows (uint8)."""
    require(x.shape[-1] % qt.FP4_BLOCK == 0, "pack_fp4", f"the last dim of x {list(x.shape)} must be a multiple of 32")
    return qt.pack_fp4_rows(f32(x))
