"""FP8 e4m3 / FP4 e2m1 / e8m0 formats and the quantizers against the format rules (spec §3 "Numeric formats
summary", §3.1-3.2, §5.2-5.3): bit patterns and values written out by hand, never the quantizers' own output."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4c.graphs import quant
from dsv4c.graphs.ops.registry import decode_fp4, decode_fp8

from tensors import e4m3_value, rand, sylvester

E2M1 = [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]  # spec §5.2, nibble 0..15


def e8m0(*exponents: int) -> torch.Tensor:
    """e8m0 bytes for 2^e: byte = e + 127."""
    return torch.tensor([e + 127 for e in exponents], dtype=torch.uint8).view(torch.float8_e8m0fnu)


# ---- e2m1 ----------------------------------------------------------------------------------------------------------
def test_every_e2m1_code_decodes_to_the_table():
    codes = torch.arange(16, dtype=torch.uint8)
    got = quant.decode_e2m1(codes)
    assert got.tolist() == E2M1
    assert torch.signbit(got[8])  # code 8 is -0


def test_every_e2m1_value_encodes_to_its_code():
    values = torch.tensor(E2M1)
    assert quant.round_e2m1(values).tolist() == list(range(16))


def test_fp4_nibble_order_low_first():
    """One 32-block [1, -2, 0, ...]: amax 2 -> scale 2^ceil(log2(2/6)) = 0.5; values/scale 2 (code 4) and -4
    (code 8|6 = 14); element 0 is the LOW nibble: byte 0 = 0xE4."""
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 1.0, -2.0
    packed, scale = quant.quantize_fp4(w)
    assert packed.dtype == torch.int8 and packed.shape == (1, 16) and scale.shape == (1, 1)
    assert packed.view(torch.uint8)[0, 0].item() == 0xE4 and not packed[0, 1:].any()
    assert scale.view(torch.uint8).item() == 127 - 1
    # decoding reads the low nibble first: 0x3A -> [tab[0xA], tab[0x3]] = [-1, 1.5]
    assert quant.unpack_fp4(torch.tensor([[0x3A]], dtype=torch.uint8)).tolist() == [[-1.0, 1.5]]


@pytest.mark.parametrize("v,want", [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0),
                                    (5.0, 4.0), (-0.75, -1.0), (-5.0, -4.0), (0.26, 0.5), (4.9, 4.0), (5.1, 6.0),
                                    (6.0, 6.0), (7.0, 6.0), (1e9, 6.0), (-1e9, -6.0)])
def test_e2m1_rounds_to_nearest_even_and_saturates(v, want):
    """Ties go to the even code (0, 1, 2, 4 have mantissa 0); beyond 6 saturates at ±6. Both the table rounding
    (weights) and the arithmetic one (activation fake-quant, via a block whose amax 6 gives scale 1)."""
    assert E2M1[int(quant.round_e2m1(torch.tensor([v]))[0])] == want
    if abs(v) <= 6:
        block = torch.zeros(1, 32)
        block[0, 0], block[0, 1] = 6.0, v
        assert quant.fake_quant_fp4(block)[0, 1].item() == want


def test_fp4_scale_is_power_of_two_rounded_up():
    """s = 2^ceil(log2(amax/6)) per 1x32 block; amax 0 is clamped to 6*2^-126 -> s = 2^-126."""
    amaxes = [6.0, 6.5, 3.0, 3.01, 0.75, 1000.0, 0.0]
    want = [0, 1, -1, 0, -3, 8, -126]
    w = torch.zeros(1, 32 * len(amaxes))
    for i, a in enumerate(amaxes):
        w[0, 32 * i + 5] = -a
    _, scale = quant.quantize_fp4(w)
    assert (scale.view(torch.uint8)[0].int() - 127).tolist() == want


# ---- e8m0 ----------------------------------------------------------------------------------------------------------
def test_e8m0_decode_every_byte():
    raw = torch.arange(255, dtype=torch.uint8)  # 255 is NaN in float8_e8m0fnu
    want = torch.tensor([math.ldexp(1.0, b - 127) for b in range(255)], dtype=torch.float64)
    for s in (raw, raw.view(torch.float8_e8m0fnu)):
        got = quant.e8m0_to_float(s)
        assert got.dtype == torch.float32 and torch.equal(got.double(), want)


def test_float_to_e8m0_round_trip_and_refusal():
    powers = torch.tensor([2.0 ** e for e in range(-126, 128)])
    back = quant.float_to_e8m0(powers)
    assert back.dtype == torch.float8_e8m0fnu
    assert back.view(torch.uint8).tolist() == list(range(1, 255))
    with pytest.raises(ValueError, match="power"):
        quant.float_to_e8m0(torch.tensor([0.75]))


# ---- FP8 e4m3 ------------------------------------------------------------------------------------------------------
def test_every_e4m3_byte_decodes_by_the_format_rule():
    raw = torch.arange(256, dtype=torch.uint8)
    want = torch.tensor([e4m3_value(b) for b in range(256)], dtype=torch.float64)
    one = torch.ones(1, 2)  # [1, 256]: two 128-column blocks
    for got in (decode_fp8(raw[None], one)[0], quant.dequantize_fp8_blocks(raw[None], quant.float_to_e8m0(one))[0]):
        finite = ~torch.isnan(want)
        assert torch.equal(got.double()[finite], want[finite]) and torch.isnan(got[~finite]).all()


def test_fp8_decode_applies_each_block_scale_to_its_block_ragged_edges_included():
    """Every byte 0x38 (e4m3 1.0) in [200, 300], block scales 1..32: element (r, c) is scale[r // 128, c // 128]."""
    scale = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    got = decode_fp8(torch.full((200, 300), 0x38, dtype=torch.uint8), scale)
    rows, cols = torch.arange(200)[:, None] // 128, torch.arange(300)[None, :] // 128
    assert torch.equal(got, scale[rows, cols])


def test_every_fp4_byte_decodes_to_its_two_table_values():
    """Byte b holds element 2i in its low nibble and 2i+1 in its high one; each 32-block takes its own scale."""
    raw = torch.arange(256, dtype=torch.uint8).view(4, 64)  # 4 rows of 128 values: 4 scale blocks per row
    scale = 2.0 ** torch.arange(-8, 8, dtype=torch.float32).view(4, 4)
    got = decode_fp4(raw, scale)
    for b in range(256):
        row, i = divmod(b, 64)
        s = scale[row, (2 * i) // 32].item()
        assert got[row, 2 * i].item() == E2M1[b & 15] * s and got[row, 2 * i + 1].item() == E2M1[b >> 4] * s


def test_fp8_block_scales_power_of_two_rounded_up_with_ragged_edges():
    """[200, 300] -> scales [2, 3], one per 128x128 block (the edge blocks partial), s = 2^ceil(log2(amax/448))."""
    amax = [[448.0, 449.0, 224.0], [1e-9, 0.001, 448 * 2.0 ** 10]]  # 1e-9 is clamped to 1e-4 first
    w = torch.zeros(200, 300)
    for i in range(2):
        for j in range(3):
            w[min(i * 128 + 70, 199), min(j * 128 + 100, 299)] = amax[i][j]
    q, s = quant.quantize_fp8_blocks(w)
    assert q.shape == (200, 300) and q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    want = [[0, 1, -1], [math.ceil(math.log2(1e-4 / 448)), math.ceil(math.log2(0.001 / 448)), 10]]
    assert (s.view(torch.uint8).int() - 127).tolist() == want
    # each block's amax lands on or below 448 after scaling, never saturating
    deq = quant.dequantize_fp8_blocks(q, s)
    assert deq[70, 100].item() == 448.0 and deq[70, 228].item() == 448.0  # 449 -> 448 (s = 2, 224.5 -> 224)


@pytest.mark.parametrize("v,want", [(1.0625, 1.0), (1.1875, 1.25), (1.0624, 1.0), (1.0626, 1.125),
                                    (3 * 2.0 ** -10, 2.0 ** -8), (2.0 ** -10, 0.0), (-1.1875, -1.25),
                                    (448.0, 448.0), (432.0, 448.0), (415.0, 416.0)])
def test_e4m3_activation_quant_rounds_to_nearest_even(v, want):
    """A block whose amax is 448 gets scale 1, so values pass straight into e4m3: spacing 1/8 at 1 (1.0625 is a
    tie -> even mantissa 1.0; 1.1875 -> 1.25), subnormal spacing 2^-9 (3*2^-10 is a tie -> 2^-8; 2^-10 -> 0),
    32 near the top (432 ties to 448 whose mantissa 110 is even)."""
    x = torch.zeros(1, 128)
    x[0, 0], x[0, 1] = 448.0, v
    assert quant.fake_quant_fp8(x, 128)[0, 1].item() == want


def test_fp8_act_quant_scale_exact_at_powers_of_two():
    """amax exactly 448 * 2^k gets s = 2^k (a float log2 could round the exponent up)."""
    for k in (-20, -3, 0, 7, 30):
        x = torch.zeros(1, 64)
        x[0, 3] = 448 * 2.0 ** k
        x[0, 4] = 2.0 ** (k - 9)  # e4m3's smallest subnormal at s = 2^k; at s = 2^(k+1) it would round to 0
        x[0, 5] = 449.0 / 448 * 2.0 ** k  # 1.0022 rounds to 1.0 at s = 2^k
        y = quant.fake_quant_fp8(x, 64)
        assert y[0, 3] == x[0, 3] and y[0, 4] == x[0, 4] and y[0, 5] == 2.0 ** k


def test_fp8_weight_round_trip():
    w = rand(256, 384, seed=1, scale=0.03) * torch.logspace(-2, 1, 384)
    q, s = quant.quantize_fp8_blocks(w)
    deq = quant.dequantize_fp8_blocks(q, s)
    scale = quant.e8m0_to_float(s).repeat_interleave(128, 0).repeat_interleave(128, 1)
    # normals keep 3 mantissa bits (half-ulp 2^-4 relative); subnormals are 2^-9 * s apart
    assert ((deq - w).abs() <= torch.maximum(w.abs() * 2.0 ** -4, scale * 2.0 ** -10)).all()
    # quantising a dequantised weight changes no value (bytes may differ: an amax that rounded down to 224 s
    # picks s/2 the second time)
    assert torch.equal(quant.dequantize_fp8_blocks(*quant.quantize_fp8_blocks(deq)), deq)


def test_fp4_weight_round_trip():
    """Grid values times a power-of-two block scale survive exactly; arbitrary values requantise idempotently."""
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (64, 128), generator=g)
    exps = torch.randint(-10, 10, (64, 4), generator=g)
    codes[:, ::32] = 7  # each block holds a 6 so its scale is exactly the chosen power of two
    w = torch.tensor(E2M1)[codes] * torch.pow(2.0, exps.float()).repeat_interleave(32, 1)
    packed, s = quant.quantize_fp4(w)
    assert torch.equal(quant.dequantize_fp4(packed, s), w)
    assert torch.equal(decode_fp4(packed.view(torch.uint8), quant.e8m0_to_float(s)), w)
    assert (s.view(torch.uint8).int() - 127 == exps).all()
    arbitrary = rand(8, 64, seed=3)
    once = quant.dequantize_fp4(*quant.quantize_fp4(arbitrary))
    assert torch.equal(quant.dequantize_fp4(*quant.quantize_fp4(once)), once)
    _, s_once = quant.quantize_fp4(arbitrary)  # error at most half the top step (2 s) of the e2m1 grid
    assert ((once - arbitrary).abs() <= quant.e8m0_to_float(s_once).repeat_interleave(32, 1)).all()


# ---- FP4 -> FP8 transcode (spec §5.3 step 4) ------------------------------------------------------------------------
def fp4_weight(n: int, k: int, exps: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.randint(0, 16, (n, k // 2), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = (codes | (torch.flip(codes, [1]) << 4)).view(torch.int8)
    return packed, e8m0(*exps.flatten().tolist()).view(n, k // 32)


def test_fp4_to_fp8_transcode_is_lossless():
    """Per 128x128 block: s_blk = max(32-block scales) / 2^6; the FP8 values decode to exactly the FP4 ones, the
    largest (6 * 2^6 = 384) stays below 448."""
    n, k = 256, 256
    g = torch.Generator().manual_seed(4)
    top = torch.randint(-8, 4, (2, 2), generator=g)  # per 128x128 block, the largest 32-block exponent
    exps = top.repeat_interleave(128, 0).repeat_interleave(4, 1) - torch.randint(0, 6, (n, k // 32), generator=g)
    exps[0::128, 0::4] = top  # each block's max is attained
    packed, scale = fp4_weight(n, k, exps, seed=5)
    q8, s8 = quant.transcode_fp4_to_fp8(packed, scale)
    assert q8.dtype == torch.float8_e4m3fn and s8.shape == (2, 2)
    assert torch.equal(s8.view(torch.uint8).int() - 127, top - 6)
    assert torch.equal(quant.dequantize_fp8_blocks(q8, s8), quant.dequantize_fp4(packed, scale))
    assert q8.float().abs().max() <= 384


def test_fp4_to_fp8_transcode_refuses_when_lossy():
    """A 32-block 2^16 below its 128x128 block's largest: 0.5 * 2^-16 / 2^-6 = 2^-11 is below e4m3's smallest
    subnormal 2^-9, so the transcode must refuse rather than round."""
    exps = torch.zeros(128, 4, dtype=torch.int64)
    exps[3, 2] = -16
    packed = torch.zeros(128, 64, dtype=torch.uint8)
    packed[0, 0] = 7  # a 6 at scale 1
    packed[3, 32] = 1  # a 0.5 at scale 2^-16 (element 64 = low nibble of byte 32, in 32-block 2)
    with pytest.raises(ValueError, match="lose precision"):
        quant.transcode_fp4_to_fp8(packed.view(torch.int8), e8m0(*exps.flatten().tolist()).view(128, 4))


# ---- Hadamard (spec §3.7) -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [32, 64, 128])
def test_hadamard_is_orthonormal_sylvester(d):
    eye = torch.eye(d)
    h = quant.hadamard(eye).double()  # rows: e_i H / sqrt(d)
    assert torch.allclose(h, sylvester(d) / math.sqrt(d), atol=1e-7)
    assert torch.allclose(h @ h.T, torch.eye(d, dtype=torch.float64), atol=1e-6)
    x, y = rand(5, d, seed=1), rand(5, d, seed=2)
    assert torch.allclose(quant.hadamard(quant.hadamard(x)), x, atol=1e-5)  # symmetric and orthogonal: involution
    assert torch.allclose((quant.hadamard(x) * quant.hadamard(y)).sum(-1), (x * y).sum(-1), atol=1e-4)
