"""The Triton kernels of the TensorRT plugins against the torch reference of their ops (registry.py).

Without a GPU the kernels run in Triton's interpreter on CPU tensors; with CUDA they run natively and the same
tests compare them with the reference computed on CPU. Shapes are tiny (the interpreter executes every tile
op in numpy) and deliberately awkward: sizes that are not multiples of the block sizes, -1 sentinels,
duplicate picks, ties.

Tolerances. FP8/FP4/bf16 rounding is exact arithmetic in the kernels, so the quantisers are compared bit for
bit. Everything else is compared against a bound derived from how fp32 results may legitimately differ:
sums of k terms in another order differ by at most ~k * 2^-24 * sum|terms| (Higham's gamma_k), and the GPU's
tf32x3 dots add ~2^-21 relative per product; softmax-weighted averages inherit the relative error of their
logits. Where a transcendental function feeds a bf16/FP8 rounding point (MoE: silu -> bf16 -> FP8), the
rounding may flip for rare elements; those tests bound the flips separately (see test_moe_experts).
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import torch

# The mode must be fixed before triton is imported: @triton.jit reads TRITON_INTERPRET when it decorates, and
# triton.language decorates its own helpers (tl.max, tl.sigmoid, ...) when triton is first imported.
NATIVE = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
# triton already imported natively by something earlier in this process: the interpreter cannot run here, so
# test_kernels_in_fresh_process runs this file in a new Python and every other test is skipped in this one
DELEGATE = not NATIVE and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
PRIOR_INTERPRET = os.environ.get("TRITON_INTERPRET")
if not NATIVE:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in [m for m in sys.modules if m.startswith("dsv4c.targets.tensorrt.kernels")]:
        del sys.modules[_name]  # decorated natively by an earlier import in this process: decorate again


import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import dsv4c.graphs.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4c.graphs import quant  # noqa: E402
from tensors import split_rows  # noqa: E402

K = importlib.import_module("dsv4c.targets.tensorrt.kernels")
common = importlib.import_module("dsv4c.targets.tensorrt.kernels.common")
moe_mod = importlib.import_module("dsv4c.targets.tensorrt.kernels.moe")
ops = torch.ops.dsv4
DEV = K.DEVICE
U = 2.0 ** -24  # fp32 unit roundoff


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def dev(*ts: torch.Tensor):
    return [t.to(DEV) for t in ts]


def assert_within(got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor | float, what: str) -> None:
    err = (got.detach().cpu().double() - want.double()).abs()
    bad = err > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} of {err.numel()} elements off, max error {err.max().item():.3g}"


def dot_bound(abs_terms: torch.Tensor, k: int) -> torch.Tensor:
    """Allowed |kernel - reference| for sums of k products: reordering (k u) + tf32x3 operands (2^-20) +
    one rounding of each side's final scaling (4u); abs_terms = sum of |products| (fp64)."""
    return (k * U + 2.0 ** -20 + 4 * U) * abs_terms + 1e-30


@pytest.fixture(scope="module", autouse=True)
def interpret_mode():
    """TRITON_INTERPRET as it was when this file decorated its kernels, for this file's tests only."""
    with pytest.MonkeyPatch.context() as patch:
        if not NATIVE:
            patch.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture(autouse=True)
def _kernels_run_in_this_process(request):
    if DELEGATE and request.node.originalname != "test_kernels_in_fresh_process":
        pytest.skip("triton was imported natively before this module: run by test_kernels_in_fresh_process")


def test_kernels_in_fresh_process():
    if not DELEGATE:
        pytest.skip("the kernels run in this process (TRITON_INTERPRET was set before triton was imported)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_mode_matches_device():
    assert K.INTERPRET == (not NATIVE) and DEV == ("cuda" if NATIVE else "cpu")


# ---- exact number-format helpers, through a one-line kernel ---------------------------------------------------
@triton.jit
def _formats_kernel(bits_ptr, x_ptr, e4m3_ptr, e2m1_ptr, bf16_ptr, e8m0_ptr, n):
    i = tl.arange(0, 256)
    ok = i < n
    bits = tl.load(bits_ptr + i, mask=ok, other=0)
    tl.store(e4m3_ptr + i, common.decode_e4m3(bits), mask=ok)
    tl.store(e8m0_ptr + i, common.weight_scales(bits, True), mask=ok)
    tl.store(e2m1_ptr + i, common.decode_e2m1(bits.to(tl.int32) & 15), mask=ok)
    tl.store(bf16_ptr + i, common.round_bf16(tl.load(x_ptr + i, mask=ok, other=0.0)), mask=ok)


def test_number_formats_bit_exact():
    bits = torch.arange(256, dtype=torch.uint8)
    # bf16 ties (exactly halfway, both parities), carries into the exponent, subnormals, big values
    x = torch.cat([rand(200, seed=1) * torch.logspace(-40, 30, 200),
                   torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1.9999999, -1 - 2 ** -8, 3.0e38, -0.0, 0.0, 1e-45]),
                   (torch.arange(48) - 24.0) * (1 + 2 ** -9)])
    e4m3, e2m1, bf16, e8m0 = (torch.empty(256) for _ in range(4))
    d_bits, d_x, d_e4m3, d_e2m1, d_bf16, d_e8m0 = dev(bits, x, e4m3, e2m1, bf16, e8m0)
    _formats_kernel[(1,)](d_bits, d_x, d_e4m3, d_e2m1, d_bf16, d_e8m0, 256)
    want_e4m3 = bits.view(torch.float8_e4m3fn).float()
    got = d_e4m3.cpu()
    nan = torch.isnan(want_e4m3)
    assert torch.equal(torch.isnan(got), nan) and torch.equal(got[~nan], want_e4m3[~nan])
    assert torch.equal(d_e2m1.cpu()[:16], quant.decode_e2m1(torch.arange(16)).float())
    assert torch.equal(d_bf16.cpu(), x.to(torch.bfloat16).float())
    # e8m0 weight scales: 2^(byte - 127), byte 0 the subnormal 2^-127, 0xFF NaN (OCP MX)
    want_e8m0 = bits.view(torch.float8_e8m0fnu).float()
    assert torch.equal(d_e8m0.cpu()[:255], want_e8m0[:255]) and torch.isnan(d_e8m0.cpu()[255])
    assert d_e8m0.cpu()[0].item() == 2.0 ** -127 and torch.equal(want_e8m0[:255], quant.e8m0_to_float(bits[:255]))


# ---- quantisation ops: bit-exact ------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [64, 128])
def test_fake_quant_fp8_bit_exact(block):
    # 21 rows (not a multiple of 16), magnitudes 1e-9..1e3 so blocks hit FP8 subnormals, an all-zero block
    # (amax clamped to 1e-4) and the values that cross a power of two when rounded (7.9 -> 8, 124.3 -> 128)
    x = rand(3, 7, 256, seed=2) * torch.logspace(-9, 3, 256)
    x[0, 0, :block] = 0.0
    x[1, 1, :8] = torch.tensor([7.9, 1.97, 124.3, -447.9, 448.0, -0.0, 2 ** -16, 300.0])
    got = K.fake_quant_fp8(*dev(x), block)
    assert torch.equal(got.cpu(), ops.fake_quant_fp8(x, block))


@pytest.mark.parametrize("d", [32, 128])
def test_hadamard_fp4_bit_exact(d):
    x = rand(5, d, seed=3, scale=3.0)  # 5 rows: a partial row block
    x[1] = 0.0
    x[2, :4] = torch.tensor([1e-30, -2.5, 6.0, 1e4])
    got = K.hadamard_fp4(*dev(x))
    assert torch.equal(got.cpu(), ops.hadamard_fp4(x))


def test_hadamard_fp4_rounds_to_bf16_before_fp4():
    # Hadamard outputs just above FP4 midpoints (1.25 + 1e-3, 2.5 + 1e-2; each block's amax 5 -> scale 1): bf16
    # rounds them onto the midpoint, which FP4 then rounds to even (1, 2); unrounded they would go up (1.5, 3)
    y = rand(4, 64, seed=63).clamp(-4, 4)
    y[:, ::32] = 5.0
    y[:, 1::4], y[:, 2::8], y[:, 3::8] = 1.251, -2.51, 2.51
    x = quant.hadamard(y.double()).float()  # the transform is its own inverse
    got = K.hadamard_fp4(*dev(x))
    want = ops.hadamard_fp4(x)
    assert torch.equal(got.cpu(), want)
    assert not torch.equal(want, quant.fake_quant_fp4(quant.hadamard(x), 32))  # the rounding matters here


# ---- FP8 linears ----------------------------------------------------------------------------------------------
def fp8_weight(n: int, k: int, seed: int, pow2_scales: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    w8, s = quant.quantize_fp8_blocks(rand(n, k, seed=seed, scale=0.05))
    scale = quant.e8m0_to_float(s)
    if not pow2_scales:  # arbitrary f32 scales catch a scale read from the wrong block
        scale = scale * (1 + torch.rand(scale.shape, generator=torch.Generator().manual_seed(seed)))
    return w8.view(torch.uint8), scale


@pytest.mark.parametrize("lead,n,k,act_quant", [((3, 5), 200, 256, True), ((2,), 130, 100, False),
                                                ((1,), 64, 128, True), ((4,), 300, 384, False),
                                                ((70,), 160, 256, True)])  # 70 rows: the 64-row tiles
def test_fp8_linear(lead, n, k, act_quant):
    x = rand(*lead, k, seed=4)
    w, s = fp8_weight(n, k, seed=5, pow2_scales=not act_quant)
    got = K.fp8_linear(*dev(x, w, s), act_quant)
    want = ops.fp8_linear(x, w, s, act_quant)
    xq = quant.fake_quant_fp8(x, 128) if act_quant else x
    terms = xq.double().abs() @ quant.dequantize_fp8_blocks(w.view(torch.float8_e4m3fn), s).double().abs().T
    assert got.shape == want.shape
    assert_within(got, want, dot_bound(terms, k), "fp8_linear")


@pytest.mark.parametrize("act_quant", [True, False])
def test_fp8_grouped_linear(act_quant):
    # G=4 groups of R=96 rows: groups straddle the 128-row scale blocks (rows 96..191 span two)
    x = rand(2, 3, 4, 128, seed=6)
    w, s = fp8_weight(4 * 96, 128, seed=7, pow2_scales=False)
    got = K.fp8_grouped_linear(*dev(x, w, s), act_quant)
    want = ops.fp8_grouped_linear(x, w, s, act_quant)
    xq = quant.fake_quant_fp8(x, 128) if act_quant else x
    wd = quant.dequantize_fp8_blocks(w.view(torch.float8_e4m3fn), s).double().view(4, 96, 128)
    terms = torch.einsum("...gk,grk->...gr", xq.double().abs(), wd.abs())
    assert_within(got, want, dot_bound(terms, 128), "fp8_grouped_linear")


def test_fp8_linears_read_e8m0_scale_bytes():
    """Scales as the bundle stores them (the checkpoint's e8m0 bytes): the same output, bit for bit, as the
    float32 scales they encode (checked against the reference above)."""
    x, xg = rand(3, 256, seed=4), rand(2, 4, 128, seed=6)
    w, s = fp8_weight(200, 256, seed=5)
    wg, sg = fp8_weight(4 * 96, 128, seed=7)
    codes, codes_g = (quant.float_to_e8m0(v).view(torch.uint8) for v in (s, sg))
    for act_quant in (True, False):
        assert torch.equal(K.fp8_linear(*dev(x, w, codes), act_quant).cpu(),
                           K.fp8_linear(*dev(x, w, s), act_quant).cpu())
        assert torch.equal(K.fp8_grouped_linear(*dev(xg, wg, codes_g), act_quant).cpu(),
                           K.fp8_grouped_linear(*dev(xg, wg, sg), act_quant).cpu())
    with pytest.raises(ValueError, match="must be e8m0 bytes \\(uint8\\) or float32"):
        K.fp8_linear(*dev(x, w, codes.to(torch.int32)), True)


# ---- attention, compressor, indexer -----------------------------------------------------------------------------
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("b,s,h,d,n,k", [(2, 3, 5, 48, 20, 70),  # H, D, K not multiples of the blocks
                                         (1, 2, 3, 256, 12, 20)])  # the large-head-dim config (V4: 512)
def test_sparse_attn(b, s, h, d, n, k, bf16):
    q, kv, sink = rand(b, s, h, d, seed=8), rand(b, n, d, seed=9), rand(h, seed=10, scale=2.0)
    idx = torch.randint(-1, n, (b, s, k), generator=torch.Generator().manual_seed(11))
    idx[0, 0] = -1  # no pick at all: only the sink's mass, o = 0
    idx[0, 1, :5] = 7  # duplicate picks count once each
    idx[-1, -1, 3:] = -1  # three valid picks
    scale = 3 * d ** -0.5  # sharp softmax
    parts = split_rows(kv, n // 2)  # picks in both parts
    got = K.sparse_attn(*dev(q, *parts, sink, idx), scale, bf16)
    want = ops.sparse_attn(q, *parts, sink, idx, scale, bf16, 0)
    # o is a convex combination of kv rows; logits carry ~(d u + 2^-20)|q||kv| scale error, so the weights
    # err by that much relative: bound by max|kv| times the largest logit error (+ reordering of the K-sum).
    # With bf16 such a logit error may also move a probability across a bf16 rounding boundary (one bf16 ulp,
    # <= 2^-7 of that weight): the bound allows it, so these random cases check the structure, and
    # test_sparse_attn_bf16_blocks (exact logits) the rounding itself.
    logit_err = (d * U + 2.0 ** -20) * q.abs().max() * kv.abs().max() * d * scale
    tol = kv.abs().max() * (2 * logit_err + 4 * k * U + (2.0 ** -7 if bf16 else 0.0))
    assert_within(got, want, tol.item(), "sparse_attn")
    assert torch.equal(got[0, 0].cpu(), torch.zeros(h, d))


def test_sparse_attn_reads_bf16_cache_rows():
    """kv stored as bf16 (the engine's cache rows): the kernel widens each load exactly, so it returns bit for
    bit what it returns on the same values in float32."""
    q, kv, sink = rand(2, 3, 5, 48, seed=8), rand(2, 20, 48, seed=9).to(torch.bfloat16), rand(5, seed=10)
    idx = torch.randint(-1, 20, (2, 3, 70), generator=torch.Generator().manual_seed(11))
    kv, cmp = split_rows(kv, 8)
    for bf16 in (False, True):
        got = K.sparse_attn(*dev(q, kv, cmp, sink, idx), 48 ** -0.5, bf16)
        assert torch.equal(got, K.sparse_attn(*dev(q, kv.float(), cmp.float(), sink, idx), 48 ** -0.5, bf16))


def test_bf16_cache_rows_are_typed_bf16_in_the_aot_signature():
    from dsv4c.targets.tensorrt.plugins import aot_kernel

    shapes = [[1, 1, 4, 64], [1, 30, 64], [1, 7, 64], [4], [1, 1, 16]]
    attrs = {"kv_rope": 0, "scale": 0.125, "bf16": True}
    plain = aot_kernel("sparse_attn", shapes, attrs, lambda a, b: -(-a // b))
    stored = aot_kernel("sparse_attn", shapes, attrs, lambda a, b: -(-a // b), bf16_inputs=[1, 2])
    rows = ("kv_ptr", "cmp_ptr")
    assert [plain.signature[r] for r in rows] == ["*fp32"] * 2 and [stored.signature[r] for r in rows] == ["*bf16"] * 2
    assert {k: v for k, v in stored.signature.items() if k not in rows} == \
        {k: v for k, v in plain.signature.items() if k not in rows}


def near_bf16_boundary(p: torch.Tensor, rel: float) -> torch.Tensor:
    """p (> 0) within `rel` (relative) of a point where rounding to bf16 changes direction (a midpoint)."""
    p = p.double()
    ulp = 2.0 ** (torch.floor(torch.log2(p)) - 7)
    return ((p / ulp).frac() - 0.5).abs() * ulp < rel * p


@pytest.mark.parametrize("bf16", [False, True])
def test_sparse_attn_bf16_blocks(bf16):
    # 200 picks = blocks of 64 picks [0, 64) [64, 128) [128, 192) [192, 200): -1 picks everywhere, a whole
    # invalid block after a valid one (query 0), an invalid first block while the max is still -inf (query 1),
    # and a later block raising the max (query 2: its first block sees rows with small logits only).
    # Small integers and a power-of-two scale make every logit exact in any summation order, so the only
    # inexact step before the bf16 rounding of p = exp(l - m) is exp itself (a few ulps), and no
    # exp(j/8), j = 0..-160 (every l - m these inputs can give) lies within 2^-18 of a bf16 rounding
    # boundary: kernel and reference round every p the same way, and the remaining difference is summation
    # order. Without the rounding, or with another block size, outputs move by ~2^-9 of a term.
    g = torch.Generator().manual_seed(60)
    b, s, h, d, n, k, scale = 1, 3, 3, 32, 40, 200, 0.125
    q = torch.randint(-2, 3, (b, s, h, d), generator=g).float()
    kv = torch.randint(-1, 2, (b, n, d), generator=g).float()
    sink = rand(h, seed=61)
    idx = torch.randint(0, n, (b, s, k), generator=g)
    idx[torch.rand(b, s, k, generator=g) < 0.2] = -1
    idx[0, 0, 64:128] = -1
    idx[0, 1, :64] = -1
    kv[0, 39] = 0.0  # the only row query 2's first block sees: logit 0, later blocks go above it
    idx[0, 2, :64] = 39
    assert not near_bf16_boundary(torch.exp(-torch.arange(161.0) / 8), 2.0 ** -18).any()
    assert (q.abs().max() * kv.abs().max() * d * scale).item() <= 8  # logits in [-8, 8]: |l - m| <= 16
    parts = split_rows(kv, 25)  # row 39 (query 2's first block) is cmp's
    got = K.sparse_attn(*dev(q, *parts, sink, idx), scale, bf16)
    want = ops.sparse_attn(q, *parts, sink, idx, scale, bf16, 0)
    tol = ((k + 16) * U + 2.0 ** -20) * kv.abs().max().item()  # reordering (+ tf32x3 on a GPU)
    assert_within(got, want, tol, "sparse_attn")
    # the cases above do exercise the rounding: it moves the reference's outputs by far more than tol
    other = ops.sparse_attn(q, *parts, sink, idx, scale, not bf16, 0)
    assert (other - want).abs().max() > 20 * tol


@pytest.mark.parametrize("ratio,overlap", [(4, True), (8, False), (128, False)])
def test_compress_pool(ratio, overlap):
    c, d, b = (2 if overlap else 1), 24, 2
    length = c * ratio + 9
    kv, score = rand(b, length, c * d, seed=12), rand(b, length, c * d, seed=13, scale=3.0)
    if overlap:
        score[:, :ratio, :d] = float("-inf")  # previous window before position 0: padding rows
    ends = torch.randint(c * ratio - 1, length, (b, 5), generator=torch.Generator().manual_seed(14))
    ends[0, 1] = -1
    ends[1, 0] = c * ratio - 1  # the first full span
    got = K.compress_pool(*dev(kv, score, ends), ratio, overlap)
    want = ops.compress_pool(kv, score, ends, ratio, overlap)
    # softmax weights are exact up to exp's few ulps; the weighted mean of span rows errs by ~(span+8)u max|kv|
    assert_within(got, want, (c * ratio + 8) * 4 * U * kv.abs().max().item(), "compress_pool")
    assert torch.equal(got[0, 1].cpu(), torch.zeros(d))


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("topk", [6, 64])
def test_indexer_topk_ties_exact(topk, bf16):
    # small integers / halves: every score is exact in fp32 whatever the summation order, so the picks must be
    # identical, including the order inside the many ties (lower id first) and the -1 tail
    g = torch.Generator().manual_seed(15)
    b, s, h, d, n = 2, 3, 3, 32, 50
    q = torch.randint(-2, 3, (b, s, h, d), generator=g).float()
    k = torch.randint(-1, 2, (b, n, d), generator=g).float()
    w = torch.randint(-2, 3, (b, s, h), generator=g).float() * 0.5
    n_visible = torch.tensor([[0, 5, 50], [12, 30, 1]])
    got = K.indexer_topk(*dev(q, k, w, n_visible), topk, bf16)
    want = ops.indexer_topk(q, k, w, n_visible, topk, bf16)
    assert got.shape == want.shape == (b, s, min(topk, n))
    assert torch.equal(got.cpu(), want)
    assert (want == -1).any() and not torch.equal(want[0, 1, :5], torch.arange(5))  # ties and sentinels exercised


def test_indexer_topk_bf16_rounding_points():
    # Keys = one base row + sparse +-1 changes, and two heads with positive q: dots in the thousands that differ
    # by a few units, where bf16 keeps steps of 8-16. Each of the three bf16 roundings (dot, weighted dot, head
    # sum; weights are multiples of 1/16) then changes the picks (checked when written: dropping any one of
    # them alone changes the reference's picks), mostly by merging scores into ties that must be ordered
    # lower id first. Every fp32 value on the way is exact (integers and sixteenths below 2^14), so the kernel
    # must match bit for bit whatever its summation order.
    g = torch.Generator().manual_seed(62)
    b, s, h, d, n, topk = 2, 3, 3, 32, 50, 20
    q = torch.randint(-16, 17, (b, s, h, d), generator=g).float()
    q[:, :, :2] = torch.randint(4, 17, (b, s, 2, d), generator=g).float()
    base = torch.randint(4, 17, (b, 1, d), generator=g).float()
    k = base + torch.randint(-1, 2, (b, n, d), generator=g).float() * (torch.rand(b, n, d, generator=g) < 0.2)
    w = torch.randint(-4, 5, (b, s, h), generator=g).float() * 0.25 + 0.0625
    n_visible = torch.tensor([[50, 7, 33], [0, 50, 49]])
    got = K.indexer_topk(*dev(q, k, w, n_visible), topk, True)
    want = ops.indexer_topk(q, k, w, n_visible, topk, True)
    assert torch.equal(got.cpu(), want)
    assert not torch.equal(want, ops.indexer_topk(q, k, w, n_visible, topk, False))  # the roundings matter


def test_indexer_topk_all_zero_scores_keep_id_order():
    # relu kills every logit: all visible scores are +-0 and must come out as 0, 1, 2, ... (ids, then -1)
    q = -torch.ones(1, 2, 2, 16)
    k = torch.ones(1, 9, 16)
    w = torch.tensor([[[-1.0, -2.0], [1.0, -1.0]]])  # all-negative weights give -0.0 scores
    n_visible = torch.tensor([[9, 4]])
    for bf16 in (False, True):
        got = K.indexer_topk(*dev(q, k, w, n_visible), 6, bf16)
        assert torch.equal(got.cpu(), torch.tensor([[[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, -1, -1]]]))
        assert torch.equal(got.cpu(), ops.indexer_topk(q, k, w, n_visible, 6, bf16))


@pytest.mark.parametrize("bf16", [False, True])
def test_indexer_scores(bf16):
    # the same integer / sixteenth inputs as the rounding-points test: every fp32 value is exact whatever the
    # summation order, so the kernel's scores equal the reference's bit for bit, bf16 points included; sizes that
    # are not multiples of the blocks (3 queries, 5 heads, 70 entries)
    g = torch.Generator().manual_seed(63)
    b, s, h, d, n = 2, 3, 5, 32, 70
    q = torch.randint(-16, 17, (b, s, h, d), generator=g).float()
    k = torch.randint(-3, 4, (b, n, d), generator=g).float()
    w = torch.randint(-4, 5, (b, s, h), generator=g).float() * 0.25 + 0.0625
    got = K.indexer_scores(*dev(q, k, w), bf16)
    want = ops.indexer_scores(q, k, w, bf16)
    assert got.dtype == torch.float32 and got.shape == want.shape == (b, s, n)
    assert torch.equal(got.cpu(), want)
    # the keys stored as bf16 (the engine's indexer cache; these small integers are bf16-exact): the same scores
    assert torch.equal(K.indexer_scores(*dev(q, k.to(torch.bfloat16), w), bf16).cpu(), want)
    # the two head halves' partial scores sum to the whole (tensor parallelism, before the all-reduce): exact
    # without the bf16 points, whose rounding of each half is what the reference rounds too
    if not bf16:
        halves = [K.indexer_scores(*dev(q[:, :, i], k, w[:, :, i]), False).cpu() for i in (slice(0, 2), slice(2, 5))]
        assert torch.equal(halves[0] + halves[1], want)


# ---- hyper-connections ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("iters", [1, 20])
def test_hc_pre(iters):
    b, s, n, d = 2, 9, 4, 40  # 18 tokens (block 16), n*D = 160 (block 128)
    x, fn = rand(b, s, n, d, seed=16), rand((2 + n) * n, n * d, seed=17, scale=0.1)
    scale, base = rand(3, seed=18), rand((2 + n) * n, seed=19)
    got = K.hc_pre(*dev(x, fn, scale, base), iters, 1e-6, 1e-6)
    want = ops.hc_pre(x, fn, scale, base, iters, 1e-6, 1e-6)
    # mix logits err by dot_bound / rms; sigmoid, softmax and Sinkhorn (divisions by sums of positive numbers)
    # keep relative errors of that order (x 2 per normalisation pass); outputs are O(1)
    mix_err = dot_bound(x.flatten(2).double().abs() @ fn.double().abs().T, n * d).max().item()
    for name, g_, w_ in zip(("y", "post", "comb"), got, want):
        assert g_.shape == w_.shape
        assert_within(g_, w_, (mix_err * 8 + 2e-6) * (1 + 2 * iters) * max(1.0, w_.abs().max().item()), name)


def test_hc_post():
    b, s, n, d = 2, 3, 4, 300  # D not a multiple of the 256-wide block
    f, res = rand(b, s, d, seed=20), rand(b, s, n, d, seed=21)
    post, comb = rand(b, s, n, seed=22), rand(b, s, n, n, seed=23)
    got = K.hc_post(*dev(f, res, post, comb))
    want = ops.hc_post(f, res, post, comb)
    if not NATIVE:  # the same operations in the same order (the j-sum first, in order): bit for bit
        assert torch.equal(got, want)
    terms = post.abs()[..., None] * f.abs()[:, :, None, :] + torch.einsum("bsjk,bsjd->bskd", comb.abs(), res.abs())
    assert_within(got, want, (n + 2) * 2 * U * terms.double(), "hc_post")  # a GPU may fuse into FMAs


# ---- routed experts ---------------------------------------------------------------------------------------------
def expert_stack(e: int, n: int, k: int, fmt: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = rand(e, n, k, seed=seed, scale=0.05)
    if fmt == 2:
        return w, torch.zeros(0)
    enc = quant.quantize_fp4 if fmt == 0 else quant.quantize_fp8_blocks
    parts = [enc(w[i]) for i in range(e)]
    return (torch.stack([p[0].view(torch.uint8) for p in parts]),
            torch.stack([quant.e8m0_to_float(p[1]) for p in parts]))


@pytest.mark.parametrize("fmt,act_quant,bf16,tokens", [(0, True, True, 5), (1, True, True, 5), (2, False, False, 5),
                                                       (0, False, False, 5), (1, True, True, 23),
                                                       (0, True, True, 130)])  # 260 pairs: 64-pair tiles
def test_moe_experts(fmt, act_quant, bf16, tokens):
    e, d, inter, topk = 4, 256, 128, 2
    g = torch.Generator().manual_seed(24)
    x = rand(tokens, d, seed=25)
    weights = torch.rand(tokens, topk, generator=g) + 0.1
    idx = torch.randint(0, e - 1, (tokens, topk), generator=g)  # expert e-1 never picked
    idx[0, 1] = -1  # an empty slot
    idx[1] = 2  # the same expert twice for one token
    w1, s1 = expert_stack(e, inter, d, fmt, 26)
    w3, s3 = expert_stack(e, inter, d, fmt, 27)
    w2, s2 = expert_stack(e, d, inter, fmt, 28)
    args = (fmt, 0.3, act_quant, bf16)  # limit 0.3 so the swiglu clamp is active
    got = K.moe_experts(*dev(x, weights, idx, w1, s1, w3, s3, w2, s2), *args).cpu()
    want = ops.moe_experts(x, weights, idx, w1, s1, w3, s3, w2, s2, *args)
    scale = want.abs().max().item()
    if not (act_quant or bf16):  # plain fp32 pipeline: reordering only (two chained dots of 256 / 128 terms)
        assert_within(got, want, 1e-5 * scale, "moe_experts")
        return
    # The reference stores bf16 / FP8 right after silu; a last-ulp difference in exp() can flip such a rounding
    # for a rare element (one bf16 ulp, or one FP8 step = up to 1/8 of that element). Either every output is
    # within fp32 reordering noise, or the flips stay rare and small: >= 99% within 1e-5, all within 2%.
    err = (got - want).abs()
    assert (err <= 1e-5 * scale).float().mean() >= 0.99, f"max error {err.max():.3g}"
    assert_within(got, want, 0.02 * scale, "moe_experts")


@pytest.mark.parametrize("fmt", [0, 1])
def test_moe_experts_read_e8m0_scale_bytes(fmt):
    """FP4 1x32 and FP8 128x128 expert scales as e8m0 bytes: the same output, bit for bit, as their float32
    values (checked against the reference above)."""
    e, d, inter, topk, tokens = 4, 256, 128, 2, 5
    g = torch.Generator().manual_seed(24)
    x, weights = rand(tokens, d, seed=25), torch.rand(tokens, topk, generator=g) + 0.1
    idx = torch.randint(0, e, (tokens, topk), generator=g)
    stacks = [expert_stack(e, n, k, fmt, seed) for n, k, seed in ((inter, d, 26), (inter, d, 27), (d, inter, 28))]
    floats = [t for w, s in stacks for t in (w, s)]
    codes = [t for w, s in stacks for t in (w, quant.float_to_e8m0(s).view(torch.uint8))]
    args = (fmt, 0.3, True, True)
    got = K.moe_experts(*dev(x, weights, idx, *codes), *args).cpu()
    assert torch.equal(got, K.moe_experts(*dev(x, weights, idx, *floats), *args).cpu())
    mixed = codes[:5] + floats[5:]  # w2's scales float, the others bytes
    with pytest.raises(ValueError, match="share one dtype"):
        K.moe_experts(*dev(x, weights, idx, *mixed), *args)


def test_route_tiles_by_hand():
    # pairs (token*k + slot): experts [[1, 0], [1, -1], [1, 1]] with tiles of 2 pairs
    idx = torch.tensor([[1, 0], [1, -1], [1, 1]])
    order, tile_e, lo, hi = moe_mod.route_tiles(*dev(idx), 3, 2)
    assert order.cpu().tolist()[:5] == [1, 0, 2, 4, 5]  # expert 0: pair 1; expert 1: pairs 0, 2, 4, 5
    used = tile_e.cpu() >= 0  # a tile covers positions lo .. min(lo + 2, hi) - 1; hi = end of its expert's pairs
    assert list(zip(tile_e.cpu()[used].tolist(), lo.cpu()[used].tolist(), hi.cpu()[used].tolist())) == [
        (0, 0, 1), (1, 1, 5), (1, 3, 5)]


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_errors_name_the_tensor():
    q = torch.zeros(1, 2, 4, 32, device=DEV)
    with pytest.raises(K.KernelInputError, match="`kv` has shape"):
        K.sparse_attn(q, torch.zeros(1, 5, 16, device=DEV), torch.zeros(1, 2, 32, device=DEV),
                      torch.zeros(4, device=DEV),
                      torch.zeros(1, 2, 3, dtype=torch.int64, device=DEV), 1.0, True)
    with pytest.raises(K.KernelInputError, match="multiple of 128"):
        K.fp8_linear(torch.zeros(2, 100, device=DEV), torch.zeros(8, 100, dtype=torch.uint8, device=DEV),
                     torch.ones(1, 1, device=DEV), True)
    other = "cpu" if NATIVE else "meta"
    with pytest.raises(K.KernelInputError, match="TRITON_INTERPRET"):
        K.hc_post(*(torch.zeros(1, 1, 4, device=other) for _ in range(1)), torch.zeros(1, 1, 2, 4, device=DEV),
                  torch.zeros(1, 1, 2, device=DEV), torch.zeros(1, 1, 2, 2, device=DEV))


# ---- TensorRT plugins (plugins.py): what can be checked without TensorRT ---------------------------------------
plugins = importlib.import_module("dsv4c.targets.tensorrt.plugins")


def plugin_cases() -> list[tuple[str, list[torch.Tensor], dict, int]]:
    """One small instance of every op with an AOT kernel: (op, tensor inputs, attributes, tactic)."""
    g = torch.Generator().manual_seed(30)
    w, s = fp8_weight(200, 256, seed=31, pow2_scales=False)
    wg, sg = fp8_weight(4 * 96, 128, seed=32, pow2_scales=False)
    idx = torch.randint(-1, 20, (2, 3, 70), generator=g)
    ends = torch.randint(7, 30, (2, 5), generator=g)
    ends[0, 1] = -1
    return [
        ("fp8_linear", [rand(3, 5, 256, seed=33), w, s], dict(act_quant=1), 1),
        ("fp8_linear", [rand(70, 256, seed=34), w, s], dict(act_quant=0), 2),
        ("fp8_grouped_linear", [rand(2, 3, 4, 128, seed=35), wg, sg], dict(act_quant=1), 2),
        ("fake_quant_fp8", [rand(3, 7, 256, seed=36) * torch.logspace(-6, 3, 256)], dict(block=64), 1),
        ("hadamard_fp4", [rand(5, 64, seed=37)], {}, 1),
        ("sparse_attn", [rand(2, 3, 5, 48, seed=38), *split_rows(rand(2, 20, 48, seed=39), 12), rand(5, seed=40), idx],
         dict(scale=0.3, bf16=1, kv_rope=0), 1),
        ("sparse_attn", [rand(2, 3, 5, 192, seed=54), *split_rows(ops.pack_kv_fp8(rand(2, 20, 192, seed=55), 64), 12),
                         rand(5, seed=40), idx], dict(scale=0.3, bf16=1, kv_rope=64), 1),  # packed FP8 rows
        ("sparse_attn", [rand(2, 3, 5, 48, seed=38), rand(2, 20, 48, seed=39), torch.zeros(2, 0, 48), rand(5, seed=40),
                         idx],
         dict(scale=0.3, bf16=1, kv_rope=0), 1),  # no compressed rows (a window-only layer)
        ("indexer_scores", [rand(2, 3, 5, 64, seed=56), ops.pack_fp4(rand(2, 70, 64, seed=57)), rand(2, 3, 5, seed=58)],
         dict(bf16=1), 1),  # packed FP4 keys
        ("compress_pool", [rand(2, 30, 48, seed=41), rand(2, 30, 48, seed=42), ends], dict(ratio=4, overlap=1), 1),
        ("indexer_scores", [rand(2, 3, 5, 32, seed=51), rand(2, 70, 32, seed=52), rand(2, 3, 5, seed=53)],
         dict(bf16=1), 1),
        ("hc_pre", [rand(2, 9, 4, 40, seed=43), rand(24, 160, seed=44, scale=0.1), rand(3, seed=45),
                    rand(24, seed=46)], dict(iters=20, norm_eps=1e-6, hc_eps=1e-6), 1),
        ("hc_post", [rand(2, 3, 300, seed=47), rand(2, 3, 4, 300, seed=48), rand(2, 3, 4, seed=49),
                     rand(2, 3, 4, 4, seed=50)], {}, 1),
    ]


def reference_args(op: str, inputs: list[torch.Tensor], attrs: dict) -> list:
    kinds = {a.name: str(a.type) for a in getattr(ops, op).default._schema.arguments}
    return [*inputs, *(bool(attrs[a]) if kinds[a] == "bool" else attrs[a] for a in dsv4c.graphs.ops.OPS[op].attributes)]


def test_plugin_ids_are_the_onnx_node_names():
    from dsv4c.graphs.ops.onnx import DOMAIN
    from dsv4c.targets.tensorrt.target import PLUGIN_NAMESPACE

    assert plugins.PLUGIN_NAMESPACE == PLUGIN_NAMESPACE == DOMAIN
    for name, op in dsv4c.graphs.ops.OPS.items():
        assert plugins.plugin_id(name) == f"dsv4::{op.onnx_name}"


def test_register_all_without_tensorrt_names_what_is_missing():
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is importable here")
    except Exception:
        pass
    from dsv4c.targets.base import ToolchainMissing

    with pytest.raises(ToolchainMissing, match="tensorrt"):
        plugins.register_all()


def test_output_shapes_equal_the_fake_kernels():
    cases = [(op, ins, attrs) for op, ins, attrs, _ in plugin_cases()]
    cases += [("indexer_topk", [torch.zeros(2, 3, 4, 32), torch.zeros(2, 9, 32), torch.zeros(2, 3, 4),
                                torch.zeros(2, 3, dtype=torch.int64)], dict(topk=k, bf16=1)) for k in (4, 64)]
    moe = [torch.zeros(5, 256), torch.zeros(5, 2), torch.zeros(5, 2, dtype=torch.int64)]
    moe += [torch.zeros(4, 128, 128, dtype=torch.uint8), torch.zeros(4, 128, 8)] * 2
    moe += [torch.zeros(4, 256, 64, dtype=torch.uint8), torch.zeros(4, 256, 4)]
    cases.append(("moe_experts", moe, dict(fmt=0, swiglu_limit=10.0, act_quant=1, bf16=1)))
    pool = [torch.zeros(1, 200, 64), torch.zeros(1, 200, 64), torch.zeros(1, 3, dtype=torch.int64)]
    cases.append(("compress_pool", pool, dict(ratio=128, overlap=0)))
    cases += [("pack_kv_fp8", [torch.zeros(2, 3, 576)], dict(rope_dim=64)), ("pack_fp4", [torch.zeros(2, 7, 128)], {})]
    assert {c[0] for c in cases} == {n for n, op in dsv4c.graphs.ops.OPS.items()
                                     if not (op.collective or op.vendor_native)}
    for op, inputs, attrs in cases:
        fake = getattr(ops, op)(*reference_args(op, [t.to("meta") for t in inputs], attrs))
        fake = fake if isinstance(fake, tuple) else (fake,)
        shapes = plugins.output_shapes(op, [list(t.shape) for t in inputs], attrs)
        assert [tuple(f.shape) for f in fake] == shapes, op
        assert [str(f.dtype).removeprefix("torch.") for f in fake] == plugins.output_dtypes(op), op


def test_strip_hidden_params():
    ptx = (".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n\t.param .u64 k_param_2,\n"
           "\t.param .u64 k_param_3\n)\n{\n\tld.param.u64 %rd1, [k_param_0];\n\tld.param.u32 %r1, [k_param_1];\n}")
    out = plugins.strip_hidden_params(ptx, "k", 2)
    assert "k_param_2" not in out and "k_param_3" not in out and "ld.param.u32 %r1, [k_param_1]" in out
    with pytest.raises(ValueError, match="k_param_1 is used"):
        plugins.strip_hidden_params(ptx, "k", 1)


_COMPILE_SCRIPT = """
import json, sys
from triton.backends.compiler import GPUTarget
from dsv4c.targets.tensorrt import plugins
import triton
for op, shapes, attrs, tactic, e8m0 in json.loads(sys.argv[1]):
    spec = plugins.aot_kernel(op, shapes, attrs, triton.cdiv, tactic, e8m0_scales=e8m0)
    name, ptx, shared = plugins.compile_aot(spec, GPUTarget("cuda", 90, 32))
    head = ptx[ptx.index(".entry " + name):]
    head = head[:head.index(")")]
    n = sum(1 for t in spec.signature.values() if t != "constexpr")
    assert head.count(".param") == n == spec.n_inputs + len(spec.scalars) + spec.n_outputs, (op, head)
    print(op, name, n, shared)
"""


@pytest.mark.slow
def test_aot_kernels_compile_for_sm90_with_tensorrt_parameters():
    """Every AOT spec compiles to sm_90 PTX (Triton's bundled ptxas, no GPU needed) and, after dropping the
    unused scratch pointers, has exactly TensorRT's AOT parameter list: inputs, int32 scalars, outputs. The FP8
    linears also with the bundle's e8m0 scale bytes."""
    import json

    cases = [(op, [list(t.shape) for t in ins], attrs, tactic, False) for op, ins, attrs, tactic in plugin_cases()]
    cases += [(op, shapes, attrs, tactic, True) for op, shapes, attrs, tactic, _ in cases if op.startswith("fp8_")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(cases)], env=env, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(done.stdout.splitlines()) == len(cases)


def launch_like_tensorrt(spec, name: str, ptx: str, shared: int, args: list) -> None:
    """What TensorRT does with an AOT plugin: load the PTX, launch it with (inputs, int32 extra args, outputs)."""
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")

    def check(rc: int, what: str) -> None:
        assert rc == 0, f"{what} failed with CUresult {rc}"

    module, func = ctypes.c_void_p(), ctypes.c_void_p()
    check(cuda.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(ptx.encode())), "cuModuleLoadData")
    check(cuda.cuModuleGetFunction(ctypes.byref(func), module, name.encode()), "cuModuleGetFunction")
    if shared > 48 * 1024:  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        check(cuda.cuFuncSetAttribute(func, 8, ctypes.c_int(shared)), "cuFuncSetAttribute")
    holders = [ctypes.c_uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int32(int(a)) for a in args]
    params = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in holders])
    cuda.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    gx, gy, gz = (int(v) for v in spec.grid)
    check(cuda.cuLaunchKernel(func, gx, gy, gz, spec.num_warps * 32, 1, 1, shared,
                              ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), params, None), "cuLaunchKernel")
    torch.cuda.synchronize()
    cuda.cuModuleUnload(module)


@pytest.mark.skipif(not NATIVE, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", range(len(plugin_cases())))
def test_aot_kernels_launched_like_tensorrt_match_reference(case):
    op, inputs, attrs, tactic = plugin_cases()[case]
    want = getattr(ops, op)(*reference_args(op, inputs, attrs))
    want = want if isinstance(want, tuple) else (want,)
    spec = plugins.aot_kernel(op, [list(t.shape) for t in inputs], attrs, triton.cdiv, tactic)
    name, ptx, shared = plugins.compile_aot(spec)
    outs = [torch.empty(w.shape, dtype=w.dtype, device="cuda") for w in want]
    launch_like_tensorrt(spec, name, ptx, shared, [t.cuda().contiguous() for t in inputs] + spec.scalars + outs)
    scale = max(w.abs().max().item() for w in want)
    for got, w in zip(outs, want):
        assert_within(got, w, 2e-5 * scale, op)  # the launcher tests above bound the kernels tightly


# tensorrt.plugin itself: NVIDIA's pure-Python package over a fake `tensorrt` core where its sources can be found,
# and a strict re-statement of its rules everywhere (tests/trt_plugin_api.py)
import trt_plugin_api as trt_api  # noqa: E402  (tests/ is on sys.path, as for tensors.py)
import trt_plugin_misuse  # noqa: E402

PLUGIN_SRC = trt_api.find_real_plugin_sources()


@pytest.fixture(params=["strict", "real"])
def plugin_api(request):
    if request.param == "real":
        if PLUGIN_SRC is None:
            pytest.skip("NVIDIA's tensorrt.plugin sources not found (set DSV4C_TRT_PLUGIN_SRC to an unzipped "
                        "tensorrt-cu12-bindings wheel's tensorrt_bindings/ directory)")
        api = trt_api.RealPluginAPI(PLUGIN_SRC)
    else:
        api = trt_api.StrictPluginAPI()
    yield api
    api.close()


def test_registrations_match_the_onnx_nodes(plugin_api):
    """plugins._register passes tensorrt.plugin's own checks (parameter kinds and annotations, tensors before
    attributes, attribute types, impl / aot_impl / autotune schemas and return annotations); each plugin declares
    the ONNX node's inputs (schema order) and attributes under their ONNX names, has a JIT implementation, an AOT
    one exactly for the single-kernel ops, and its descriptor gives the fake kernel's output shapes."""
    from dsv4c.graphs.ops.onnx import tensor_inputs

    api = plugin_api
    plugins._register(api.trt, api.trtp)
    # every op but the collectives, which the engine build turns into TensorRT's own IDistCollectiveLayer, and the
    # vendor-native ops, inlined into standard layers at lowering
    computing = {n: op for n, op in dsv4c.graphs.ops.OPS.items() if not (op.collective or op.vendor_native)}
    assert api.registered() == {plugins.plugin_id(n) for n in computing}
    assert api.registered() == {plugins.plugin_id(n) for n in plugins.PLUGIN_OPS}  # the table coverage reads
    examples = {op: (ins, attrs) for op, ins, attrs, _ in plugin_cases()}
    api.shape_context(trt_api.IExprBuilder())
    for name, op in computing.items():
        fns = api.definition(plugins.plugin_id(name))
        declared = list(inspect.signature(fns["register"]).parameters)
        assert declared == tensor_inputs(op) + list(op.attributes), name
        assert list(inspect.signature(fns["impl"]).parameters)[:len(declared)] == declared, name
        assert (fns["aot_impl"] is not None) == (name in plugins.AOT_OPS), name
        if name in examples:
            ins, attrs = examples[name]
            out = fns["register"](*(api.tensor_desc(dims(t.shape)) for t in ins), **attrs)
            out = out if isinstance(out, tuple) else (out,)
            got = [tuple(trt_api.value_of(e) for e in o.shape_expr) for o in out]
            assert got == plugins.output_shapes(name, [list(t.shape) for t in ins], attrs), name


def dims(shape, dynamic: int = 2) -> list:
    """Shape expressions as TensorRT hands them to a plugin: the leading `dynamic` dims (batch, sequence) are
    runtime values, the rest build-time constants; a dim of a 1-D / 2-D tensor's last axis is always constant."""
    return [trt_api.IDimensionExpr(d, i >= min(dynamic, len(shape) - 1)) for i, d in enumerate(shape)]


def aot_cases() -> list[tuple[str, list[tuple[int, ...]], dict]]:
    """Shapes for every AOT op, including the 1-D inputs and static divisions that reach cdiv with two ints."""
    cases = [(op, [tuple(t.shape) for t in ins], attrs) for op, ins, attrs, _ in plugin_cases()]
    cases += [("fake_quant_fp8", [(256,)], dict(block=64)), ("hadamard_fp4", [(64,)], {}),
              ("fp8_linear", [(256,), (200, 256), (2, 2)], dict(act_quant=1)),
              ("compress_pool", [(1, 200, 64), (1, 200, 64), (1, 3)], dict(ratio=128, overlap=0))]
    return cases


@pytest.mark.parametrize("case", range(len(aot_cases())))
def test_aot_impls_under_the_plugin_api(plugin_api, case, monkeypatch):
    """Each aot_impl, called as TensorRT calls it (shape expressions, a shape context), returns launch parameters
    and extra args that tensorrt.plugin accepts and that evaluate to the launcher's grid and int32 scalars. (The
    PTX compile is stubbed: it needs a GPU target here and is checked by the sm_90 test above.)"""
    op, shapes, attrs = aot_cases()[case]
    api = plugin_api
    monkeypatch.setattr(plugins, "compile_aot", lambda spec: ("kernel", "// ptx", 0))
    plugins._register(api.trt, api.trtp)
    api.shape_context(trt_api.IExprBuilder())
    descs = [api.tensor_desc(dims(s)) for s in shapes]
    outs = tuple(api.tensor_desc(dims(s)) for s in plugins.output_shapes(op, [list(s) for s in shapes], attrs))
    name, ptx, launch, extra = api.definition(plugins.plugin_id(op))["aot_impl"](*descs, **attrs, outputs=outs,
                                                                                 tactic=1)
    assert isinstance(name, bytes) and isinstance(ptx, bytes)
    want = plugins.aot_kernel(op, [list(s) for s in shapes], attrs, triton.cdiv, 1)
    grid = [trt_api.value_of(g) for g in (launch.grid_x, launch.grid_y, launch.grid_z)]
    assert grid == list(want.grid) and trt_api.value_of(launch.block_x) == want.num_warps * 32
    assert [trt_api.value_of(e) for e in extra] == want.scalars


@pytest.mark.parametrize("op", ["fp8_linear", "fp8_grouped_linear"])
def test_fp8_linear_plugins_take_the_bundles_e8m0_scales(plugin_api, op, monkeypatch):
    """The bundle's FP8 linears read e8m0 scale bytes (float32 where a scale is no power of two): the plugin
    offers TensorRT both scale types, and its AOT kernel is compiled for the type the network gives it."""
    api = plugin_api
    compiled = []
    monkeypatch.setattr(plugins, "compile_aot", lambda spec: compiled.append(spec) or ("kernel", "// ptx", 0))
    plugins._register(api.trt, api.trtp)
    api.shape_context(trt_api.IExprBuilder())
    shapes = [(3, 4, 128), (4 * 96, 128), (3, 1)] if op == "fp8_grouped_linear" else [(3, 256), (200, 256), (2, 2)]
    fns = api.definition(plugins.plugin_id(op))
    outs = tuple(api.tensor_desc(dims(s))
                 for s in plugins.output_shapes(op, [list(s) for s in shapes], {"act_quant": 1}))
    (combo,) = fns["autotune"](*(api.tensor_desc(dims(s)) for s in shapes), act_quant=1, outputs=outs)
    if hasattr(combo, "_get_combinations"):  # NVIDIA's package: the type combinations it expands to
        types = [c.types for c in combo._get_combinations()]
        assert len(types) == 2 and {t[2] for t in types} == {api.trt.uint8, api.trt.float32}
        assert all(t[:2] + t[3:] == [api.trt.float32, api.trt.uint8, api.trt.float32] for t in types)
    else:
        assert [t.strip() for t in combo.io_types.split(",")] == ["FP32", "UINT8", "UINT8*FP32", "FP32"]
    for dtype, e8m0 in ((api.trt.uint8, True), (api.trt.float32, False)):
        descs = [api.tensor_desc(dims(s), dtype if i == 2 else None) for i, s in enumerate(shapes)]
        fns["aot_impl"](*descs, act_quant=1, outputs=outs, tactic=1)
        assert compiled[-1].constexprs["E8M0"] is e8m0
        assert compiled[-1].signature["ws_ptr"] == ("*u8" if e8m0 else "*fp32")


def test_plugin_api_rejects_what_tensorrt_rejects(plugin_api):
    """The checks above can fail: the API (real or re-stated) refuses the misuses issue 18 found or could find."""
    t = plugin_api.trtp
    plugin_api.shape_context(trt_api.IExprBuilder())
    with pytest.raises(ValueError, match="Both arguments cannot be 'int's"):
        t.cdiv(130, 128)
    assert trt_api.value_of(t.cdiv(t.ShapeExpr(trt_api.IDimensionExpr(130, False)), 128)) == 2
    with pytest.raises(AttributeError):
        t.KernelLaunchParams().grid_w = 1

    for bad in trt_plugin_misuse.bad_registrations(t):
        with pytest.raises(ValueError):
            t.register(f"dsv4test::{bad.__name__}")(bad)
    t.register("dsv4test::ok")(trt_plugin_misuse.good_registration(t))
    for decorator, bad in trt_plugin_misuse.bad_implementations(t):
        with pytest.raises(ValueError):
            getattr(t, decorator)("dsv4test::ok")(bad)


# ---- packed cache rows ------------------------------------------------------------------------------------------
def test_kernels_read_and_write_packed_rows():
    """The attention and indexer kernels load packed rows (FP8 KV: e4m3 * e8m0 + bf16 RoPE dims; FP4 keys) as the
    values they hold: bit for bit the results on the unpacked floats; the pack launchers give the reference's
    bytes."""
    from tensors import packed_rows_case

    from dsv4c.graphs import quant

    x = packed_rows_case()
    assert torch.equal(K.pack_kv_fp8(*dev(x), 64).cpu(), ops.pack_kv_fp8(x, 64))
    assert torch.equal(K.pack_fp4(*dev(x[..., :128])).cpu(), ops.pack_fp4(x[..., :128]))
    q, sink = rand(2, 3, 5, 192, seed=8), rand(5, seed=10)
    kv, cmp = split_rows(ops.pack_kv_fp8(rand(2, 20, 192, seed=9), 64), 6)
    idx = torch.randint(-1, 20, (2, 3, 70), generator=torch.Generator().manual_seed(11))
    got = K.sparse_attn(*dev(q, kv, cmp, sink, idx), 0.1, True, 64)
    values = [quant.unpack_kv_fp8(rows, 192, 64) for rows in (kv, cmp)]
    assert torch.equal(got, K.sparse_attn(*dev(q, *values, sink, idx), 0.1, True))
    keys = ops.pack_fp4(x[..., :128])
    qi, w = rand(2, 3, 4, 128, seed=1).round(), rand(2, 3, 4, seed=2)
    values = quant.unpack_fp4_rows(keys, 128)
    assert torch.equal(K.indexer_scores(*dev(qi, keys, w), True), K.indexer_scores(*dev(qi, values, w), True))
    n_visible = torch.tensor([[3, 7, 12], [12, 1, 0]])
    assert torch.equal(K.indexer_topk(*dev(qi, keys, w, n_visible), 5, True),
                       K.indexer_topk(*dev(qi, values, w, n_visible), 5, True))


# Every kernel of this file and of dsv4c is decorated by now (the file's last statement): the variable goes back
# to what it was, and is set again only while this file's tests run (interpret_mode). pytest imports every test
# file before it runs any: left set, it reached the other files' tests, and the TensorRT torch executor, which
# reads it at run time, ran its torch-reference tests on the interpreted Triton kernels instead
# (test_tensorrt_torch_executor: 71 s for a 4 s test, and its reference path never ran in a full run).
if PRIOR_INTERPRET is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = PRIOR_INTERPRET
