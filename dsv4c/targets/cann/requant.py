"""Weights in the formats the Ascend kernels read, converted from the shipped FP8 / FP4 ones, with the error of
every conversion measured against the dequantized shipped weight.

Ascend 950 (MX formats, all exact):
  * FP8 dense, 128x128 pow2 block scales -> MXFP8: the same e4m3 bytes, one e8m0 scale per 1x32 block along K
    = the scale of the 128x128 block it lies in. Exact because every 1x32 block lies inside one 128x128 block
    (32 divides 128) and an e8m0 byte holds any power of two 2^-127..2^127: the shipped scales are e8m0 already.
  * FP4 experts (e2m1 + e8m0 per 1x32) ARE MXFP4: only the scales go back from float to their e8m0 bytes.
Ascend 910B (no FP8 / FP4 arithmetic: INT8 / INT4):
  * FP8 dense -> INT8 per output channel (QuantBatchMatmulV3's weight scale is per channel or per tensor on
    A2/A3): s_n = max_k |w_nk| / 127, q = round_half_even(w / s_n). Lossy: e4m3 keeps 3 mantissa bits over a
    wide exponent range, int8 a fixed step per row.
  * FP4 experts -> INT8, exact: 2 * e2m1 is an integer in [-12, 12], so q = 2 v with scale s/2 per 1x32 block.
  * FP4 experts -> INT4 (W4A8), lossy: the e2m1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} does not fit 16 evenly spaced
    levels; per 1x32 block s = amax / 7, q = clamp(round_half_even(w / s), -8, 7).
  * Dense weights read without activation quantization (wo_a): bf16, exact (e4m3 x pow2 fits bf16's 8 mantissa
    bits and exponent range), on both SoCs.

`ErrorStats` accumulates, per module group, the relative Frobenius error ||W' - W|| / ||W|| and the max abs error
of the converted weights against the dequantized shipped ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from dsv4c.graphs import quant
from dsv4c.graphs.quant import E8M0_BIAS, FP4_BLOCK, FP8_BLOCK
from dsv4c.targets.cann.mapping import MX_BLOCK


# ---- decoding the shipped formats (the references every error is measured against) -------------------------
def decode_fp8(bits: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """uint8 e4m3 [N, K] + f32 pow2 scales [ceil(N/128), ceil(K/128)] -> f32 [N, K]."""
    return quant.dequantize_fp8_blocks(torch.from_numpy(bits), torch.from_numpy(scale).float(), FP8_BLOCK)


def decode_fp4(packed: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """uint8 packed e2m1 [..., N, K/2] + f32 scales [..., N, K/32] -> f32 [..., N, K]."""
    return quant.unpack_fp4(torch.from_numpy(packed)) * torch.from_numpy(scale).float().repeat_interleave(FP4_BLOCK, -1)


def to_e8m0(scale: np.ndarray | torch.Tensor, name: str = "scale") -> np.ndarray:
    """Exact powers of two (f32) -> e8m0 bytes (uint8, value 2^(byte-127)); anything else is an error."""
    s = torch.as_tensor(scale).float()
    mant, exp = torch.frexp(s)
    if not bool((mant == 0.5).all()):
        bad = s[mant != 0.5].flatten()[:3].tolist()
        raise ValueError(f"{name}: scales must be exact powers of two to be e8m0 (got e.g. {bad})")
    byte = exp - 1 + E8M0_BIAS
    if bool(((byte < 0) | (byte > 2 * E8M0_BIAS)).any()):
        raise ValueError(f"{name}: a scale is outside e8m0's range 2^-127..2^127")
    return byte.to(torch.uint8).numpy()


def from_e8m0(byte: np.ndarray) -> torch.Tensor:
    return torch.ldexp(torch.ones(byte.shape), torch.from_numpy(byte.astype(np.int32)) - E8M0_BIAS)


# ---- Ascend 950 ---------------------------------------------------------------------------------------------
def fp8_to_mxfp8(bits: np.ndarray, scale: np.ndarray, name: str = "weight") -> np.ndarray:
    """128x128 block scales [nb, kb] -> MX scales as QuantBatchMatmulV3 reads them for x2 (n, k):
    e8m0 [N, K/64, 2] (pairs of consecutive 1x32 blocks). The e4m3 bytes are unchanged."""
    n, k = bits.shape
    if k % (2 * MX_BLOCK):
        raise ValueError(f"{name}: K = {k} is not a multiple of 64, which the MX scale layout [n, k/64, 2] needs")
    per_32 = np.repeat(np.repeat(scale, FP8_BLOCK, 0)[:n], FP8_BLOCK // MX_BLOCK, 1)[:, : k // MX_BLOCK]
    return to_e8m0(per_32, f"{name} (FP8 block scale)").reshape(n, k // (2 * MX_BLOCK), 2)


def decode_mxfp8(bits: np.ndarray, mx_scale: np.ndarray) -> torch.Tensor:
    """uint8 e4m3 [N, K] + e8m0 [N, K/64, 2] -> f32 [N, K] (independent of the FP8 block decode)."""
    n, k = bits.shape
    values = torch.from_numpy(bits).view(torch.float8_e4m3fn).float()
    return values * from_e8m0(mx_scale.reshape(n, k // MX_BLOCK)).repeat_interleave(MX_BLOCK, 1)


# ---- Ascend 910B --------------------------------------------------------------------------------------------
def int8_per_channel(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """f32 [N, K] -> (int8 [N, K], f32 scales [N]): symmetric per output channel, round half to even."""
    amax = w.abs().amax(dim=1)
    s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
    return q.numpy(), s.numpy().astype(np.float32)


def fp4_to_int8(packed: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FP4 experts -> (int8 [..., N, K] = 2 x e2m1, f32 scales [..., N, K/32] = s / 2): exact."""
    values = quant.unpack_fp4(torch.from_numpy(packed))  # e2m1 values, halves included
    return (2 * values).to(torch.int8).numpy(), (scale.astype(np.float32) / 2)


def int4_per_group(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """f32 [..., N, K] -> (int4 packed two per byte, low nibble first, two's complement [..., N, K/2],
    f32 scales [..., N, K/32]): symmetric per 1x32 block, s = amax / 7."""
    blocks = w.reshape(*w.shape[:-1], -1, MX_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    s = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
    q = torch.round(blocks / s).clamp(-8, 7).to(torch.int8).reshape(w.shape)
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).numpy(), s[..., 0].numpy().astype(np.float32)


def unpack_int4(packed: np.ndarray) -> torch.Tensor:
    """uint8 [..., K/2] -> int values [..., K] (low nibble first, two's complement)."""
    b = torch.from_numpy(packed).to(torch.int16)
    lo, hi = b & 0xF, (b >> 4) & 0xF
    vals = torch.stack([lo, hi], dim=-1).flatten(-2)
    return torch.where(vals >= 8, vals - 16, vals).float()


def decode_int(q: np.ndarray, scale: np.ndarray, bits: int) -> torch.Tensor:
    """INT8 [..., N, K] or packed INT4 [..., N, K/2] with per-1x32 scales [..., N, K/32] -> f32."""
    values = torch.from_numpy(q).float() if bits == 8 else unpack_int4(q)
    return values * torch.from_numpy(scale).float().repeat_interleave(MX_BLOCK, -1)


def bf16_exact(w: torch.Tensor, name: str = "weight") -> np.ndarray:
    """f32 -> bf16 bit patterns (uint16), refusing any value bf16 would round."""
    b = w.to(torch.bfloat16)
    if not torch.equal(b.float(), w):
        raise ValueError(f"{name}: not exactly representable in bf16")
    return b.view(torch.uint16).numpy()


# ---- error accounting ---------------------------------------------------------------------------------------
@dataclass
class GroupError:
    fmt: str
    tensors: int = 0
    sum_sq_err: float = 0.0
    sum_sq_ref: float = 0.0
    max_abs_error: float = 0.0
    worst: tuple[str, float] = ("", 0.0)

    def add(self, name: str, ref: torch.Tensor, got: torch.Tensor) -> None:
        err = (got.double() - ref.double())
        sq_err, sq_ref = float(err.square().sum()), float(ref.double().square().sum())
        self.tensors += 1
        self.sum_sq_err += sq_err
        self.sum_sq_ref += sq_ref
        self.max_abs_error = max(self.max_abs_error, float(err.abs().max()) if err.numel() else 0.0)
        rel = math.sqrt(sq_err / sq_ref) if sq_ref else 0.0
        if rel >= self.worst[1] and (rel > 0 or not self.worst[0]):
            self.worst = (name, rel)

    def summary(self) -> dict:
        rel = math.sqrt(self.sum_sq_err / self.sum_sq_ref) if self.sum_sq_ref else 0.0
        return {"format": self.fmt, "tensors": self.tensors, "rel_fro_error": rel,
                "max_abs_error": self.max_abs_error, "worst_tensor": {"name": self.worst[0], "rel_fro_error":
                                                                       self.worst[1]}}


@dataclass
class ErrorStats:
    """Per module group ("dense", "dense_bf16", "experts"): the conversion error of its weights."""

    groups: dict[str, GroupError] = field(default_factory=dict)
    seen: set[tuple[str, str]] = field(default_factory=set)  # a weight shared by prefill and decode counts once

    def add(self, group: str, fmt: str, name: str, ref: torch.Tensor, got: torch.Tensor) -> None:
        if (group, name) in self.seen:
            return
        self.seen.add((group, name))
        self.groups.setdefault(group, GroupError(fmt)).add(name, ref, got)

    def summary(self) -> dict[str, dict]:
        return {g: e.summary() for g, e in sorted(self.groups.items())}
