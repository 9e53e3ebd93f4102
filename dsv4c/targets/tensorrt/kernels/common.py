"""What every dsv4 Triton kernel shares: the execution mode, input checks, and exact number-format arithmetic.

Mode. `@triton.jit` decides at decoration time whether a kernel runs natively or in Triton's interpreter
(`TRITON_INTERPRET=1`, CPU, numpy), so the mode is fixed when this package is imported: set the variable
before importing `dsv4c.targets.tensorrt.kernels`. Interpreted kernels take CPU tensors, native ones CUDA.

Dots. Every kernel accumulates in fp32. Where both operands are exactly representable in bf16 (FP8/FP4 weights
times power-of-two scales, FP8-quantised activations) a bf16 tensor-core dot gives exact products, so it
matches the fp32 reference up to summation order. FP8 tensor-core dots are not used: on H100 (Triton 3.6) the
FP8 MMA accumulates with a shortened mantissa, and even promoting every 32 products
(max_num_imprecise_acc=32) left errors of ~3e-4 relative to the output scale, i.e. not the reference.
Where an operand is a plain fp32 activation the GPU uses `tf32x3` (three tf32 products, ~fp32 accuracy); the
interpreter always computes in fp32 (its bf16 dot is not usable: it stores bf16 as uint16 and would multiply
the bit patterns).

Number formats. FP8 e4m3 and FP4 e2m1 rounding are written out arithmetically (exponent bits + round-half-to-
even on the format's grid) instead of `x.to(tl.float8e4nv)`: the interpreter's FP8 cast is wrong for ~1% of
inputs, and one code path for both modes keeps the kernels bit-exact with torch's
`float8_e4m3fn` cast and with dsv4c.graphs.quant everywhere.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 reads the variable through knobs
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRET: bool = _interpreting()
DEVICE = "cpu" if INTERPRET else "cuda"


LOWP_DOT: bool = not INTERPRET  # bf16 dots for exactly-representable operands (GPU only, see module doc)
F32_PRECISION: str = "ieee" if INTERPRET else "tf32x3"  # tl.dot input_precision for plain fp32 operands



class KernelInputError(ValueError):
    """A launcher argument does not fit its op's schema (the message names the op and the tensor)."""


def require(cond: bool, op: str, message: str) -> None:
    if not cond:
        raise KernelInputError(f"dsv4::{op}: {message}")


def check_tensors(op: str, **tensors: torch.Tensor) -> None:
    """Every tensor on the device this mode runs on (CPU under the interpreter, else CUDA)."""
    for name, t in tensors.items():
        require(isinstance(t, torch.Tensor), op, f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        mode = "in Triton interpreter mode (CPU tensors)" if INTERPRET else "natively (CUDA tensors)"
        require(t.device.type == DEVICE, op, f"`{name}` is on {t.device}, but the kernels run {mode}; "
                "TRITON_INTERPRET must be set before dsv4c.targets.tensorrt.kernels is imported")


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    """`shape` entries: an int (must equal) or None (any)."""
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    require(ok, op, f"`{name}` has shape {list(t.shape)}, expected {want}")


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def cache_rows(t: torch.Tensor) -> torch.Tensor:
    """Cache rows as the kernels read them: bf16 as stored (they widen each load), anything else as float32."""
    return t.contiguous() if t.dtype == torch.bfloat16 else f32(t)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ---- exact power-of-two arithmetic --------------------------------------------------------------------------
@triton.jit
def exponent_of(x):
    """floor(log2 |x|) of a normal fp32, read from its exponent bits (-127 for zero)."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) - 127


@triton.jit
def exp2i(e):
    """2^e as fp32, exactly, for integer e in [-126, 127]."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def weight_scales(s, E8M0: tl.constexpr):
    """Loaded weight scales as fp32: e8m0 bytes (the checkpoint's format, which the bundle stores) decoded to
    2^(byte - 127) exactly (byte 0 is the subnormal 2^-127, 0xFF NaN, as quant.e8m0_to_float), float32 as is."""
    if E8M0:
        b = s.to(tl.int32)
        return tl.where(b == 0, 0x00400000, tl.where(b == 255, 0x7FC00000, b << 23)).to(tl.float32, bitcast=True)
    else:
        return s


def scale_operand(s: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Weight scales as a kernel reads them: e8m0 bytes (uint8) as stored, anything else as float32; and whether
    they are bytes (the kernels' E8M0 flag)."""
    return (s.contiguous(), True) if s.dtype == torch.uint8 else (f32(s), False)


def check_scale_dtype(op: str, name: str, s: torch.Tensor) -> None:
    require(s.dtype in (torch.uint8, torch.float32), op,
            f"`{name}` must be e8m0 bytes (uint8) or float32 scales, got {s.dtype}")


@triton.jit
def ceil_pow2(x):
    """Smallest power of two >= x (x > 0, normal): quant.ceil_pow2."""
    bits = x.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.where((bits & 0x7FFFFF) == 0, e, e + 1)
    return exp2i(e)


@triton.jit
def round_half_even(t):
    """Round to the nearest integer, ties to even, for |t| < 2^22: adding 1.5 * 2^23 leaves no fraction bits,
    and fp32 addition rounds half-to-even (compilers do not fold (t + c) - c for floats)."""
    return (t + 12582912.0) - 12582912.0


@triton.jit
def round_bf16(x):
    """Round fp32 to the nearest bfloat16 (ties to even) and back, on the bits: the interpreter's bf16 cast
    truncates, so `x.to(tl.bfloat16)` cannot be used for the reference's bf16 storage points."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 = 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


# ---- FP8 e4m3 ---------------------------------------------------------------------------------------------
@triton.jit
def round_to_e4m3(y):
    """y in [-448, 448] -> nearest float8_e4m3fn value (ties to even), subnormals (step 2^-9) included.
    A binade [2^e, 2^(e+1)) holds 8 e4m3 values, step 2^(e-3); below 2^-6 the step stays 2^-9."""
    e = tl.maximum(exponent_of(y), -6)
    return round_half_even(y * exp2i(3 - e)) * exp2i(e - 3)


@triton.jit
def quantize_fp8_rows(x):
    """x [R, BLOCK] f32, one quantisation block per row -> (values on the e4m3 grid [R, BLOCK], scale [R]),
    as quant.fake_quant_fp8: scale = 2^ceil(log2(max(amax, 1e-4) / 448)), q = e4m3(clamp(x / scale)).
    Dequantised value = q * scale. Padding lanes must hold 0 (they do not change amax)."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
    scale = ceil_pow2(tl.div_rn(amax, 448.0))  # correctly rounded, like torch's division
    inv = exp2i(-exponent_of(scale))  # 1 / scale exactly (a power of two)
    y = tl.minimum(tl.maximum(x * inv[:, None], -448.0), 448.0)
    return round_to_e4m3(y), scale


@triton.jit
def decode_e4m3(bits):
    """uint8 e4m3fn bit patterns -> fp32 (exact; 0x7f / 0xff are NaN)."""
    b = bits.to(tl.int32)
    exp = (b >> 3) & 15
    man = b & 7
    normal = (((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
    value = tl.where(exp == 0, man.to(tl.float32) * 0.001953125, normal)  # subnormal: man * 2^-9
    value = tl.where((b & 0x7F) == 0x7F, float("nan"), value)
    return tl.where((b & 0x80) != 0, -value, value)


@triton.jit
def e4m3_values(bits, NATIVE: tl.constexpr):
    """decode_e4m3, by the hardware's conversion on a GPU (e4m3 -> fp16 -> fp32 is exact and far cheaper than
    the bit arithmetic, which GEMM tiles would redo for every row block). The interpreter's FP8 conversions are
    not trusted (module doc), so it decodes arithmetically."""
    if NATIVE:
        return bits.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        return decode_e4m3(bits)


# ---- FP4 e2m1 ---------------------------------------------------------------------------------------------
@triton.jit
def decode_e2m1(code):
    """4-bit e2m1 codes (int32 0..15) -> fp32: 0, .5, 1, 1.5, 2, 3, 4, 6 and their negatives."""
    e = (code >> 1) & 3
    m = (code & 1).to(tl.float32)
    mag = tl.where(e == 0, m * 0.5, exp2i(e - 1) * (1.0 + m * 0.5))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def unpack_fp4(packed, ROWS: tl.constexpr, HALF: tl.constexpr):
    """uint8 [ROWS, HALF] bytes, two e2m1 values each (element 2k in the LOW nibble) -> fp32 [ROWS, 2*HALF]."""
    b = packed.to(tl.int32)
    pairs = tl.join(decode_e2m1(b & 15), decode_e2m1((b >> 4) & 15))  # [ROWS, HALF, 2]: (low, high)
    return tl.reshape(pairs, (ROWS, 2 * HALF))


@triton.jit
def round_to_e2m1(y):
    """Nearest e2m1 value (ties to even), saturating at +-6: quant._round_e2m1_values. Grid steps: 0.5 below 2,
    1 below 4, 2 up to 6 (multiplying by 1/step is exact)."""
    mag = tl.minimum(tl.abs(y), 6.0)
    step = tl.where(mag < 2.0, 0.5, tl.where(mag < 4.0, 1.0, 2.0))
    inv_step = tl.where(mag < 2.0, 2.0, tl.where(mag < 4.0, 1.0, 0.5))
    q = tl.minimum(round_half_even(mag * inv_step) * step, 6.0)
    return tl.where(y < 0, -q, q)


# ---- packed cache rows (quant.py's layouts) -----------------------------------------------------------------
@triton.jit
def load_kv_rows(kv_ptr, rows, mask_rows, dims, D: tl.constexpr, ROPE: tl.constexpr, ROW_BYTES: tl.constexpr):
    """Cache rows `rows` [R] (int64 row numbers), dims [C] -> fp32 [R, C]. ROPE = 0: float or bf16 rows of D
    (widened exactly); ROPE > 0: packed FP8 rows of ROW_BYTES bytes (quant.pack_kv_fp8: e4m3 non-RoPE dims times
    their block's e8m0 scale, bf16 RoPE dims), unpacked to the same values. Masked lanes give 0."""
    ok = mask_rows[:, None] & (dims < D)[None, :]
    if ROPE == 0:
        return tl.load(kv_ptr + rows[:, None] * D + dims[None, :], mask=ok, other=0.0).to(tl.float32)
    else:
        NOPE: tl.constexpr = D - ROPE
        base = kv_ptr + rows[:, None] * ROW_BYTES
        nope = (dims < NOPE)[None, :]
        code = tl.load(base + dims[None, :], mask=ok & nope, other=0)
        scale = tl.load(base + NOPE + 2 * ROPE + dims[None, :] // 64, mask=ok & nope, other=127)
        value = decode_e4m3(code) * exp2i(scale.to(tl.int32) - 127)  # pack keeps scales >= 2^-22: normal
        r = tl.where(nope, 0, dims[None, :] - NOPE)
        lo = tl.load(base + NOPE + 2 * r, mask=ok & ~nope, other=0).to(tl.int32)
        hi = tl.load(base + NOPE + 2 * r + 1, mask=ok & ~nope, other=0).to(tl.int32)
        rope = ((hi << 24) | (lo << 16)).to(tl.float32, bitcast=True)  # bf16 bits are a float's upper half
        return tl.where(nope, value, rope)


@triton.jit
def load_fp4_rows(k_ptr, rows, mask_rows, dims, D: tl.constexpr, PACKED: tl.constexpr):
    """Indexer keys `rows` [R], dims [C] -> fp32 [R, C]: float / bf16 rows of D, or (PACKED) quant.pack_fp4_rows
    rows of D/2 + D/32 bytes (e2m1 pairs, low nibble first, then the e8m0 scales), unpacked exactly."""
    ok = mask_rows[:, None] & (dims < D)[None, :]
    if PACKED:
        ROW: tl.constexpr = D // 2 + D // 32
        base = k_ptr + rows[:, None] * ROW
        byte = tl.load(base + dims[None, :] // 2, mask=ok, other=0).to(tl.int32)
        code = tl.where((dims % 2 == 0)[None, :], byte & 15, (byte >> 4) & 15)
        scale = tl.load(base + D // 2 + dims[None, :] // 32, mask=ok, other=127).to(tl.int32)
        return decode_e2m1(code) * exp2i(scale - 127)
    else:
        return tl.load(k_ptr + rows[:, None] * D + dims[None, :], mask=ok, other=0.0).to(tl.float32)


def packed_rows(t: torch.Tensor) -> torch.Tensor:
    """Cache rows as the kernels read them: packed uint8 rows as they are, else as cache_rows."""
    return t.contiguous() if t.dtype == torch.uint8 else cache_rows(t)
