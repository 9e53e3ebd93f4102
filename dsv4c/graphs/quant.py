"""FP8 / FP4 formats as DeepSeek ships V4, bit-exact with the format rules (spec §3, §5.2).

* FP8 e4m3fn weights: 128x128 blocks, one e8m0 scale per block (value 2^(byte-127)).
* FP4 e2m1 weights: 1x32 blocks along K, e8m0 scales, two values per byte, element 2k in the LOW nibble.
* Activation fake-quant (the reference's act_quant / fp4_act_quant): power-of-two scales rounded UP.
All scale exponents are computed exactly with frexp (a float log2 can round an exact power of two up).
"""

from __future__ import annotations

from enum import IntEnum

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_BLOCK = 128  # FP8 weights: one scale per FP8_BLOCK x FP8_BLOCK block; activations: per 1 x FP8_BLOCK
FP4_BLOCK = 32  # FP4 weights and activations: one scale per 1 x FP4_BLOCK along K
E8M0_BIAS = 127  # an e8m0 byte b is the scale 2^(b - E8M0_BIAS)


class ExpertFormat(IntEnum):
    """How routed-expert weights are stored: the `fmt` argument of the moe_experts op (registry.py), the
    ONNX MoeExperts attribute and the kernels' FMT (Triton constexpr; the C++ kernels' kExpertFormat*)."""

    FP4 = 0  # w [E, N, K/2] packed e2m1, s [E, N, K/32]
    FP8 = 1  # w [E, N, K] e4m3 bits, s [E, ceil(N/128), ceil(K/128)]
    FLOAT = 2  # w [E, N, K] float, no scales
# e2m1 magnitudes by 3-bit code (e e m): 0, .5, 1, 1.5, 2, 3, 4, 6
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def ceil_pow2(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x (x > 0), exactly: frexp gives x = m * 2^e with m in [0.5, 1)."""
    m, e = torch.frexp(x)
    e = torch.where(m == 0.5, e - 1, e)  # x already a power of two
    return torch.ldexp(torch.ones_like(x), e)


def block_scales(xb: torch.Tensor, qmax: float, amax_min: float) -> torch.Tensor:
    """The power-of-two scale of each block along xb's last dim (kept as a dim of 1): 2^ceil(log2(max(amax,
    amax_min) / qmax)), the reference's act_quant / fp4_act_quant rule for activations and FP4 weights alike."""
    return ceil_pow2(xb.abs().amax(-1, keepdim=True).clamp(min=amax_min) / qmax)


def e8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """e8m0 scales (float8_e8m0fnu or raw uint8 bytes) -> float32 2^(byte-127)."""
    raw = s.view(torch.uint8) if s.dtype == torch.float8_e8m0fnu else s.to(torch.uint8)
    return torch.ldexp(torch.ones(raw.shape, device=raw.device), raw.to(torch.int32) - E8M0_BIAS)


def float_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Exact powers of two (float32) -> float8_e8m0fnu."""
    m, e = torch.frexp(scale.float())
    if not bool((m == 0.5).all()):
        raise ValueError("e8m0 scales must be exact powers of two")
    return (e - 1 + E8M0_BIAS).clamp(0, 2 * E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)


# ---- FP8 weights --------------------------------------------------------------------------------------------
def _blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, int, int]:
    """[N, K] -> zero-padded [N/b, b, K/b, b] blocks (original N, K returned)."""
    n, k = w.shape
    pn, pk = -n % block, -k % block
    wp = torch.nn.functional.pad(w.float(), (0, pk, 0, pn))
    return wp.view((n + pn) // block, block, (k + pk) // block, block), n, k


def quantize_fp8_blocks(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (float8_e4m3fn [N, K], e8m0 scales [ceil(N/128), ceil(K/128)])."""
    wb, n, k = _blocks(w, block)
    amax = wb.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-4)
    scale = ceil_pow2(amax / FP8_MAX)
    q = (wb / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.view(wb.shape[0] * block, wb.shape[2] * block)[:n, :k]
    return q.contiguous(), float_to_e8m0(scale[:, 0, :, 0])


def dequantize_fp8_blocks(w: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    n, k = w.shape
    s = e8m0_to_float(scale) if scale.dtype != torch.float32 else scale
    s = s.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return w.view(torch.float8_e4m3fn).float() * s


# ---- FP4 weights --------------------------------------------------------------------------------------------
def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e2m1 value (ties to even mantissa), saturating at ±6. Returns the 4-bit codes.
    Rounds on the value grid (see _round_e2m1_values), then maps magnitude -> code: 0, .5, 1, 1.5 -> 2v;
    2, 3 -> v + 2; 4, 6 -> v/2 + 4. (The former nearest-of-8 table search took 80% of synthetic-checkpoint
    writing and 8 floats of memory per value.)"""
    mag = _round_e2m1_values(x.float().abs())
    code = torch.where(mag < 2, mag * 2, torch.where(mag < 4, mag + 2, mag / 2 + 4))
    sign = (x < 0) | ((x == 0) & torch.signbit(x))
    return code.to(torch.uint8) | (sign.to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    codes = codes.to(torch.int64)
    mag = torch.tensor(_E2M1, device=codes.device)[codes & 7]
    return torch.where((codes & 8) != 0, -mag, mag)


def quantize_fp4(w: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 packed [N, K/2], e8m0 scales [N, K/32])."""
    n, k = w.shape
    wb = w.float().view(n, k // block, block)
    scale = block_scales(wb, FP4_MAX, FP4_MAX * 2.0 ** -126)
    codes = round_e2m1(wb / scale).view(n, k)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # element 2k -> low nibble
    return packed.view(torch.int8), float_to_e8m0(scale[..., 0])


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8/uint8 [..., K/2] -> float32 e2m1 values [..., K] (no scale). One lookup per byte in a table of its two
    values (the per-nibble decode through int64 codes took 16x as long: the validation's reference decodes every
    FP4 expert it runs)."""
    b = packed.view(torch.uint8)
    return torch.nn.functional.embedding(b.int(), _byte_pairs(b.device)).flatten(-2)


def _byte_pairs(device: torch.device) -> torch.Tensor:
    """[256, 2]: the e2m1 values of every byte's low and high nibble."""
    b = torch.arange(256, device=device)
    return torch.stack([decode_e2m1(b & 15), decode_e2m1(b >> 4)], dim=-1)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    s = e8m0_to_float(scale) if scale.dtype != torch.float32 else scale
    return (unpack_fp4(packed).unflatten(-1, (-1, block)) * s[..., None]).flatten(-2)


def transcode_fp4_to_fp8(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless FP4 (1x32 scales) -> FP8 (128x128 scales), as DeepSeek's convert.py: per 128x128 block
    s_blk = max(32-block scales) / 2^6; values rescaled by scale / s_blk. Exact as long as no 32-block scale
    in a 128x128 block is more than 2^6... below the block's largest so far that e2m1 values leave FP8's range
    (checked: raises ValueError rather than lose bits)."""
    values = unpack_fp4(packed)  # [N, K]
    n, k = values.shape
    s32 = e8m0_to_float(scale)  # [N, K/32]
    sb, _, _ = _blocks(s32.repeat_interleave(FP4_BLOCK, 1), FP8_BLOCK)
    s_blk = sb.amax(dim=(1, 3), keepdim=True) / 64.0  # [N/128, 1, K/128, 1]
    full = values * s32.repeat_interleave(FP4_BLOCK, 1)
    fb, _, _ = _blocks(full, FP8_BLOCK)
    q = (fb / s_blk).view(-1, fb.shape[2] * FP8_BLOCK)[:n, :k]
    q8 = q.to(torch.float8_e4m3fn)
    if not torch.equal(q8.float(), q):
        raise ValueError("FP4 -> FP8 transcode would lose precision (32-block scales within a 128x128 block "
                         "differ by more than FP8's range allows)")
    return q8, float_to_e8m0(s_blk[:, 0, :, 0])


# ---- activation fake-quant (QAT simulations and W8A8 inputs) ----------------------------------------------------
def fake_quant_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """FP8 e4m3 quantise-dequantise along the last dim in blocks of `block`, scale 2^ceil(log2(amax/448))."""
    shape = x.shape
    xb = x.float().reshape(*shape[:-1], shape[-1] // block, block)
    scale = block_scales(xb, FP8_MAX, 1e-4)
    q = (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * scale).reshape(shape)


def fake_quant_fp4(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """FP4 e2m1 quantise-dequantise along the last dim in blocks of 32, scale 2^ceil(log2(amax/6))."""
    shape = x.shape
    xb = x.float().reshape(*shape[:-1], shape[-1] // block, block)
    scale = block_scales(xb, FP4_MAX, FP4_MAX * 2.0 ** -126)
    q = _round_e2m1_values(xb / scale)
    return (q * scale).reshape(shape)


def _round_e2m1_values(x: torch.Tensor) -> torch.Tensor:
    """Round to e2m1 (ties to even), saturating, arithmetically (no table: traceable by torch.export).
    Grid steps: 0.5 in [0, 2), 1 in [2, 4), 2 in [4, 6]."""
    mag = x.abs().clamp(max=FP4_MAX)
    step = torch.where(mag < 2, torch.full_like(mag, 0.5), torch.where(mag < 4, torch.ones_like(mag),
                                                                        torch.full_like(mag, 2.0)))
    q = torch.round(mag / step) * step  # torch.round is half-to-even on the step grid
    return torch.copysign(q.clamp(max=FP4_MAX), x)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Sylvester Walsh-Hadamard transform along the last dim (a power of two), by butterflies."""
    d = x.shape[-1]
    y = x.float()
    h = 1
    while h < d:
        y = y.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    return y.reshape(x.shape) * d ** -0.5


# ---- packed cache rows (the KV cache in its deployed formats, spec §4.2) ---------------------------------------
# A main KV row (window slot or compressed entry, head_dim values) under FP8 KV, in bytes:
#   [0, n)              e4m3 bits of the n = head_dim - rope non-RoPE dims, each divided by its block's scale
#   [n, n + 2r)         the r RoPE dims as bf16, little-endian
#   [n + 2r, + n/64)    one e8m0 scale per 64 non-RoPE dims (the reference's act_quant(kv, 64, ue8m0))
#   zero padding to a multiple of 8 (584 bytes for V4's 512 = 448 + 64, vLLM's fp8_ds_mla row)
# An indexer key row (index_head_dim values) under FP4: [d/2 packed e2m1, low nibble first | d/32 e8m0 scales].
# Both hold exactly the values the QAT simulation computes (the FP8 / FP4 fake quant, bf16 RoPE dims): unpacking a
# packed row gives those floats bit for bit, so the engine stores the reference's cache at half or less the bytes.
KV_SCALE_BLOCK = 64


def kv_row_bytes(head_dim: int, rope_dim: int) -> int:
    nope = head_dim - rope_dim
    return -(-(nope + 2 * rope_dim + nope // KV_SCALE_BLOCK) // 8) * 8


def fp4_row_bytes(dim: int) -> int:
    return dim // 2 + dim // FP4_BLOCK


def pack_kv_fp8(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """[..., head_dim] float -> [..., kv_row_bytes] uint8: the non-RoPE dims FP8 in blocks of 64 with power-of-two
    scales rounded up (fake_quant_fp8(x, 64)'s arithmetic), the RoPE dims rounded to bf16."""
    d = x.shape[-1]
    nope = d - rope_dim
    xb = x[..., :nope].float().reshape(*x.shape[:-1], nope // KV_SCALE_BLOCK, KV_SCALE_BLOCK)
    scale = block_scales(xb, FP8_MAX, 1e-4)  # fake_quant_fp8's
    codes = (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8).flatten(-2)
    rope = x[..., nope:].to(torch.bfloat16).contiguous().view(torch.uint8)
    pad = kv_row_bytes(d, rope_dim) - (nope + 2 * rope_dim + nope // KV_SCALE_BLOCK)
    scales = float_to_e8m0(scale[..., 0]).view(torch.uint8)
    parts = [codes, rope, scales, x.new_zeros((*x.shape[:-1], pad), dtype=torch.uint8)]
    return torch.cat(parts, dim=-1)


def unpack_kv_fp8(rows: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """pack_kv_fp8's inverse: [..., kv_row_bytes] uint8 -> [..., head_dim] float32."""
    nope = head_dim - rope_dim
    codes = rows[..., :nope].contiguous().view(torch.float8_e4m3fn).float()
    rope = rows[..., nope:nope + 2 * rope_dim].contiguous().view(torch.bfloat16).float()
    scale = e8m0_to_float(rows[..., nope + 2 * rope_dim:nope + 2 * rope_dim + nope // KV_SCALE_BLOCK])
    values = (codes.unflatten(-1, (-1, KV_SCALE_BLOCK)) * scale[..., None]).flatten(-2)
    return torch.cat([values, rope], dim=-1)


def pack_fp4_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., d] float -> [..., d/2 + d/32] uint8: the FP4 weight format (quantize_fp4: e2m1 in blocks of 32, scales
    rounded up to powers of two, as fake_quant_fp4) with each row's scale bytes after its packed values. On FP4-valued
    rows (fake_quant_fp4's output) it gives back the same values: the format is idempotent."""
    packed, scales = quantize_fp4(x.reshape(-1, x.shape[-1]))
    rows = torch.cat([packed.view(torch.uint8), scales.view(torch.uint8)], dim=-1)
    return rows.view(*x.shape[:-1], rows.shape[-1])


def unpack_fp4_rows(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """pack_fp4_rows's inverse: [..., d/2 + d/32] uint8 -> [..., d] float32."""
    return dequantize_fp4(rows[..., :dim // 2], rows[..., dim // 2:dim // 2 + dim // FP4_BLOCK])
