"""Routed experts as two grouped GEMMs: `moe_experts` (FP4, FP8 or float expert weights).

Routing glue (torch, on the device, no host sync): the T*k (token, slot) pairs are sorted by expert and cut
into tiles of BLOCK_M pairs of one expert; the tile table has a static upper bound of slots
(min(P, ceil(P / BLOCK_M) + E)) and unused slots exit at once, so nothing waits for the counts.

  gate_up kernel, program (tile, block of I):  g = x W1^T, u = x W3^T for the tile's tokens (x FP8-quantised per
      128 channels in-kernel with act_quant), bf16-rounded, clamped (u in [-L, L], g <= L), then
      h = silu(g) * u * routing_weight, bf16-rounded -> h [P, I] in sorted order.
  down kernel, program (tile, block of D):  with act_quant h is FP8-quantised per 128 channels as it is loaded
      (a K step is one quantisation block), y_pair = bf16(h W2^T), scattered to the pair's original slot.
  Then y[t] = sum over the token's k slots (-1 slots stay zero).

Weights are decoded in registers (scales: e8m0 bytes as the checkpoint ships them, or float32): FP4 (packed
nibbles, low first, one scale per 1x32) is folded with its scale; FP8 keeps its 128x128 block scale outside the
dot. On the GPU the dots are bf16 when both operands are exactly bf16 (FP8-quantised activations against e4m3 /
e2m1 values times power-of-two scales, i.e. e8m0 scales as DeepSeek ships them); otherwise tf32x3. The routing
weight is applied before W2 and the sum over slots runs in slot order (the reference adds experts in id order:
equal up to fp32 rounding).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsv4c.graphs.quant import FP4_BLOCK, FP8_BLOCK, ExpertFormat
from dsv4c.targets.tensorrt.kernels.common import (F32_PRECISION, LOWP_DOT, check_scale_dtype, check_shape,
                                                   check_tensors, e4m3_values, f32, quantize_fp8_rows, require,
                                                   round_bf16, scale_operand, unpack_fp4, weight_scales)

# the expert formats as the kernels' FMT values (a jit function reads a global only when it is a constexpr)
FMT_FP4 = tl.constexpr(int(ExpertFormat.FP4))
FMT_FP8 = tl.constexpr(int(ExpertFormat.FP8))


@triton.jit
def _expert_tile(w_ptr, s_ptr, e, rows, k0, N, K, FMT: tl.constexpr, BLOCK_N: tl.constexpr, NATIVE: tl.constexpr,
                 E8M0: tl.constexpr):
    """Rows `rows` x columns k0..k0+127 of expert e's weight [N, K] -> (values f32 [BLOCK_N, 128], per-row
    scale [BLOCK_N] still to apply). FP4 comes back with its 1x32 scales folded in (scale 1). Scales: e8m0 bytes
    (E8M0) or float32."""
    r_ok = rows < N
    e64 = e.to(tl.int64)
    if FMT == FMT_FP4:  # w [E, N, K/2] u8, s [E, N, K/32]
        byte = k0 // 2 + tl.arange(0, 64)
        packed = tl.load(w_ptr + (e64 * N + rows)[:, None] * (K // 2) + byte[None, :],
                         mask=r_ok[:, None] & (byte < K // 2)[None, :], other=0)
        sub = k0 // 32 + tl.arange(0, 4)
        s = weight_scales(tl.load(s_ptr + (e64 * N + rows)[:, None] * (K // 32) + sub[None, :],
                                  mask=r_ok[:, None] & (sub < K // 32)[None, :], other=0), E8M0)  # [BN, 4]
        values = tl.reshape(unpack_fp4(packed, BLOCK_N, 64), (BLOCK_N, 4, 32)) * s[:, :, None]
        return tl.reshape(values, (BLOCK_N, 128)), tl.full((BLOCK_N,), 1.0, tl.float32)
    else:
        ks = k0 + tl.arange(0, 128)
        offs = (e64 * N + rows)[:, None] * K + ks[None, :]
        mask = r_ok[:, None] & (ks < K)[None, :]
        if FMT == FMT_FP8:  # w [E, N, K] u8, s [E, ceil(N/128), ceil(K/128)]
            kb = tl.cdiv(K, 128)
            s = weight_scales(tl.load(s_ptr + (e64 * tl.cdiv(N, 128) + rows // 128) * kb + k0 // 128, mask=r_ok,
                                      other=0), E8M0)
            return e4m3_values(tl.load(w_ptr + offs, mask=mask, other=0), NATIVE), s
        else:  # float: w [E, N, K] f32
            return tl.load(w_ptr + offs, mask=mask, other=0.0), tl.full((BLOCK_N,), 1.0, tl.float32)


@triton.jit
def _tile_pairs(order_ptr, tile_lo_ptr, tile_hi_ptr, slot, BLOCK_M: tl.constexpr):
    """Tile `slot`'s rows: positions in the expert-sorted order [BM], which are real, and their pair ids."""
    pos = tl.load(tile_lo_ptr + slot) + tl.arange(0, BLOCK_M)
    p_ok = pos < tl.load(tile_hi_ptr + slot)
    return pos, p_ok, tl.load(order_ptr + pos, mask=p_ok, other=0)


@triton.jit
def _dot(a, w, EXACT_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """a [BM, 128] . w[BN, 128]^T in fp32; bf16 operands when both are exactly bf16 (GPU only)."""
    if EXACT_BF16:
        return tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
    else:
        return tl.dot(a, tl.trans(w), input_precision=PRECISION)


@triton.jit
def moe_gate_up_kernel(x_ptr, rw_ptr, order_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
                       w1_ptr, s1_ptr, w3_ptr, s3_ptr, h_ptr, D, I, TOPK,
                       FMT: tl.constexpr, ACT_QUANT: tl.constexpr, BF16: tl.constexpr, LIMIT: tl.constexpr,
                       EXACT_BF16: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, NATIVE: tl.constexpr, E8M0: tl.constexpr):
    # x [T, D] f32, rw [P] f32 routing weight per pair (pair = token * TOPK + slot), order [P] i64: pair ids
    # sorted by expert; tile slot -> expert (-1: unused), first / end position in `order`
    # w1, w3: expert weights [E, I, D(...)] -> h [P, I] f32 in sorted order; program (tile slot, block of I)
    slot = tl.program_id(0)
    e = tl.load(tile_e_ptr + slot)
    if e >= 0:
        pos, p_ok, pair = _tile_pairs(order_ptr, tile_lo_ptr, tile_hi_ptr, slot, BLOCK_M)
        tok = pair // TOPK
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, D, 128):
            ks = k0 + tl.arange(0, 128)
            xt = tl.load(x_ptr + tok[:, None] * D + ks[None, :], mask=p_ok[:, None] & (ks < D)[None, :], other=0.0)
            s_x = tl.full((BLOCK_M,), 1.0, tl.float32)
            if ACT_QUANT:
                xt, s_x = quantize_fp8_rows(xt)
            w1, s1 = _expert_tile(w1_ptr, s1_ptr, e, cols, k0, I, D, FMT, BLOCK_N, NATIVE, E8M0)
            w3, s3 = _expert_tile(w3_ptr, s3_ptr, e, cols, k0, I, D, FMT, BLOCK_N, NATIVE, E8M0)
            gate += _dot(xt, w1, EXACT_BF16, PRECISION) * s_x[:, None] * s1[None, :]
            up += _dot(xt, w3, EXACT_BF16, PRECISION) * s_x[:, None] * s3[None, :]
        if BF16:
            gate = round_bf16(gate)
            up = round_bf16(up)
        if LIMIT > 0:
            up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
            gate = tl.minimum(gate, LIMIT)
        rw = tl.load(rw_ptr + pair, mask=p_ok, other=0.0)
        h = gate * tl.sigmoid(gate) * up * rw[:, None]  # silu(g) * u * routing weight, before W2
        if BF16:
            h = round_bf16(h)
        tl.store(h_ptr + pos[:, None].to(tl.int64) * I + cols[None, :], h, mask=p_ok[:, None] & (cols < I)[None, :])


@triton.jit
def moe_down_kernel(h_ptr, order_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, w2_ptr, s2_ptr, y_ptr, D, I,
                    FMT: tl.constexpr, ACT_QUANT: tl.constexpr, BF16: tl.constexpr, EXACT_BF16: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NATIVE: tl.constexpr,
                    E8M0: tl.constexpr):
    # h [P, I] f32 sorted by expert, w2 [E, D, I(...)] -> y_pairs [P, D] at the pairs' original positions
    # program (tile slot, block of D)
    slot = tl.program_id(0)
    e = tl.load(tile_e_ptr + slot)
    if e >= 0:
        pos, p_ok, pair = _tile_pairs(order_ptr, tile_lo_ptr, tile_hi_ptr, slot, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, I, 128):
            ks = k0 + tl.arange(0, 128)
            ht = tl.load(h_ptr + pos[:, None].to(tl.int64) * I + ks[None, :], mask=p_ok[:, None] & (ks < I)[None, :],
                         other=0.0)
            s_h = tl.full((BLOCK_M,), 1.0, tl.float32)
            if ACT_QUANT:
                ht, s_h = quantize_fp8_rows(ht)
            w2, s2 = _expert_tile(w2_ptr, s2_ptr, e, cols, k0, D, I, FMT, BLOCK_N, NATIVE, E8M0)
            acc += _dot(ht, w2, EXACT_BF16, PRECISION) * s_h[:, None] * s2[None, :]
        if BF16:
            acc = round_bf16(acc)
        tl.store(y_ptr + pair[:, None] * D + cols[None, :], acc, mask=p_ok[:, None] & (cols < D)[None, :])


def _check_weights(op: str, name: str, w: torch.Tensor, s: torch.Tensor, e: int, n: int, k: int, fmt: int) -> None:
    if fmt == ExpertFormat.FP4:
        require(w.dtype == torch.uint8, op, f"`{name}` (fmt 0, FP4) must be uint8 packed e2m1, got {w.dtype}")
        require(k % FP4_BLOCK == 0, op, f"FP4 experts need an input width that is a multiple of {FP4_BLOCK}, got {k}")
        check_shape(op, name, w, (e, n, k // 2))
        check_shape(op, f"scale of {name}", s, (e, n, k // FP4_BLOCK))
        check_scale_dtype(op, f"scale of {name}", s)
    elif fmt == ExpertFormat.FP8:
        require(w.dtype == torch.uint8, op, f"`{name}` (fmt 1, FP8) must be uint8 e4m3 bits, got {w.dtype}")
        check_shape(op, name, w, (e, n, k))
        check_shape(op, f"scale of {name}", s, (e, math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK)))
        check_scale_dtype(op, f"scale of {name}", s)
    else:
        check_shape(op, name, w, (e, n, k))


def route_tiles(indices: torch.Tensor, n_experts: int, block_m: int):
    """Sort the (token, slot) pairs by expert and cut them into tiles of one expert.
    -> order [P] pair ids (valid pairs first, by expert), tile_e / tile_lo / tile_hi [slots] (tile_e = -1: unused)."""
    flat = indices.reshape(-1)
    p = flat.numel()
    key = torch.where((flat >= 0) & (flat < n_experts), flat, torch.full_like(flat, n_experts))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n_experts + 1)[:n_experts]
    starts = torch.cumsum(counts, 0) - counts
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)  # [E]
    slots = min(p, triton.cdiv(p, block_m) + n_experts)  # every used tile holds >= 1 pair
    slot = torch.arange(slots, device=indices.device)
    e = torch.searchsorted(tile_end, slot, right=True).clamp(max=n_experts - 1)
    used = slot < tile_end[-1]
    lo = starts[e] + (slot - (tile_end[e] - tiles[e])) * block_m
    hi = starts[e] + counts[e]
    tile_e = torch.where(used, e, torch.full_like(e, -1))
    return order, tile_e.contiguous(), lo.contiguous(), hi.contiguous()


def moe_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor,
                w3: torch.Tensor, s3: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor, fmt: int,
                swiglu_limit: float, act_quant: bool, bf16: bool) -> torch.Tensor:
    """dsv4::moe_experts: x [T, D], routing weights [T, k], expert ids [T, k] (-1 = none), stacked expert
    weights (fmt 0 FP4, 1 FP8, 2 float) -> [T, D]."""
    op = "moe_experts"
    check_tensors(op, x=x, weights=weights, indices=indices, w1=w1, w3=w3, w2=w2)
    require(fmt in set(ExpertFormat), op, f"fmt must be 0 (FP4), 1 (FP8) or 2 (float), got {fmt}")
    fmt = ExpertFormat(fmt)
    if fmt != ExpertFormat.FLOAT:
        check_tensors(op, s1=s1, s3=s3, s2=s2)
    require(x.dim() == 2, op, f"`x` must be [T, D], got shape {list(x.shape)}")
    t, d = x.shape
    require(indices.dim() == 2 and indices.shape[0] == t, op,
            f"`indices` must be [T={t}, k], got shape {list(indices.shape)}")
    require(indices.dtype == torch.int64, op, f"`indices` must be int64, got {indices.dtype}")
    check_shape(op, "weights", weights, tuple(indices.shape))
    require(w1.dim() == 3, op, f"`w1` must be stacked [E, I, ...], got shape {list(w1.shape)}")
    n_exp, inter = w1.shape[0], w1.shape[1]
    for name, w, s, n, k in (("w1", w1, s1, inter, d), ("w3", w3, s3, inter, d), ("w2", w2, s2, d, inter)):
        _check_weights(op, name, w, s, n_exp, n, k, fmt)
    require(not act_quant or (d % FP8_BLOCK == 0 and inter % FP8_BLOCK == 0), op,
            f"act_quant quantises activations in blocks of {FP8_BLOCK}: D={d} and I={inter} must be multiples")
    topk = indices.shape[1]
    y_pairs = torch.zeros(t * topk, d, dtype=torch.float32, device=x.device)
    if t * topk == 0 or d == 0:
        return y_pairs.view(t, topk, d).sum(1)
    block_m, warps = (16, 4) if t * topk <= 256 else (64, 8)
    order, tile_e, lo, hi = route_tiles(indices, n_exp, block_m)
    h = torch.empty(t * topk, inter, dtype=torch.float32, device=x.device)
    exact = LOWP_DOT and fmt != ExpertFormat.FLOAT and act_quant  # both operands exactly bf16 (module doc)
    dummy = x  # scales are unused for float experts
    ws = [w.contiguous() if fmt != ExpertFormat.FLOAT else f32(w) for w in (w1, w3, w2)]
    ss, e8m0 = [dummy] * 3, False
    if fmt != ExpertFormat.FLOAT:
        ss, bytes_ = zip(*(scale_operand(s) for s in (s1, s3, s2)))
        require(len(set(bytes_)) == 1, op, "the three expert scale tensors must share one dtype (e8m0 bytes or "
                f"float32), got {s1.dtype}, {s3.dtype}, {s2.dtype}")
        e8m0 = bytes_[0]
    bn_up = 32 if block_m == 16 else 64  # two decoded [BN, 128] weight tiles must fit in registers
    moe_gate_up_kernel[(tile_e.numel(), triton.cdiv(inter, bn_up))](
        f32(x), f32(weights).reshape(-1), order, tile_e, lo, hi, ws[0], ss[0], ws[1], ss[1], h, d, inter, topk,
        FMT=int(fmt), ACT_QUANT=act_quant, BF16=bf16, LIMIT=float(swiglu_limit), EXACT_BF16=exact,
        PRECISION=F32_PRECISION, BLOCK_M=block_m, BLOCK_N=bn_up, NATIVE=LOWP_DOT, E8M0=e8m0, num_warps=warps)
    moe_down_kernel[(tile_e.numel(), triton.cdiv(d, 64))](
        h, order, tile_e, lo, hi, ws[2], ss[2], y_pairs, d, inter, FMT=int(fmt), ACT_QUANT=act_quant, BF16=bf16,
        EXACT_BF16=exact, PRECISION=F32_PRECISION, BLOCK_M=block_m, BLOCK_N=64, NATIVE=LOWP_DOT, E8M0=e8m0,
        num_warps=warps)
    return y_pairs.view(t, topk, d).sum(1)
