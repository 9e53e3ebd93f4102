"""The dsv4 custom ops (and the model pieces built around them) against formulas written out by hand from the
spec (../shared/spec/dsv4-architecture.md, cited by section), on small inputs: explicit Python loops or
hand-computed numbers, never the implementation's own output.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import dsv4c.graphs.ops  # noqa: F401  (registers torch.ops.dsv4.*)
from dsv4c.graphs import quant
from dsv4c.graphs.config import QuantizationConfig, preset
from dsv4c.graphs.model import (Attention, Compressor, Numerics, SharedExpert, Step, fake_quant_nope,
                                rope_frequencies)

from tensors import e4m3_value, rand, split_rows, sylvester

ops = torch.ops.dsv4


# ---- number formats by their definitions (spec §3 "Numeric formats summary", §5.2) -----------------------------
E2M1 = [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]  # spec §5.2 decode table, nibble 0..15


def dequant_fp8_by_hand(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W[o,i] = e4m3(w[o,i]) * S[o//128, i//128] (spec §5.2), one element at a time."""
    n, k = w.shape
    out = torch.empty(n, k, dtype=torch.float64)
    table = [e4m3_value(b) for b in range(256)]
    for o in range(n):
        for i in range(k):
            out[o, i] = table[int(w[o, i])] * float(scale[o // 128, i // 128])
    return out


def dequant_fp4_by_hand(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Element 2k is the low nibble of byte k; W[o,i] = tab[nibble] * S[o, i//32] (spec §5.2)."""
    n, half = w.shape
    out = torch.empty(n, 2 * half, dtype=torch.float64)
    for o in range(n):
        for b in range(half):
            byte = int(w[o, b])
            out[o, 2 * b] = E2M1[byte & 15] * float(scale[o, (2 * b) // 32])
            out[o, 2 * b + 1] = E2M1[byte >> 4] * float(scale[o, (2 * b + 1) // 32])
    return out


def pow2_ceil(v: float) -> float:
    """2^ceil(log2(v)), exactly (math.frexp: v = m 2^e, m in [0.5, 1))."""
    m, e = math.frexp(v)
    return 2.0 ** (e - 1) if m == 0.5 else 2.0 ** e


def act_quant_by_hand(x: torch.Tensor, block: int) -> torch.Tensor:
    """Spec §3.1: per block amax = max(|x|, 1e-4), s = 2^ceil(log2(amax/448)), y = e4m3(clamp(x/s)) * s."""
    flat = x.double().reshape(-1, x.shape[-1])
    out = torch.empty_like(flat)
    for r in range(flat.shape[0]):
        for b0 in range(0, flat.shape[1], block):
            blk = flat[r, b0:b0 + block]
            s = pow2_ceil(max(blk.abs().max().item(), 1e-4) / 448)
            q = (blk / s).clamp(-448, 448).float().to(torch.float8_e4m3fn).double()
            out[r, b0:b0 + block] = q * s
    return out.reshape(x.shape)


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> bool:
    got, want = got.double(), want.double()
    return bool((got - want).abs().max() <= rtol * max(want.abs().max().item(), 1e-30))


# ---- quantised linears -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k", [(192, 256), (256, 384)])  # 192: ragged 128-row blocks (head_dim 192's wkv)
def test_fp8_linear_dequantises_per_128x128_block(n, k):
    w, s = quant.quantize_fp8_blocks(rand(n, k, seed=1, scale=0.05))
    scale = quant.e8m0_to_float(s)
    scale[-1, 0] /= 8  # block scales that differ, so a wrong block mapping shows
    x = rand(3, k, seed=2)
    want = x.double() @ dequant_fp8_by_hand(w.view(torch.uint8), scale).T
    assert close(ops.fp8_linear(x, w.view(torch.uint8), scale, False), want)
    want_q = act_quant_by_hand(x, 128) @ dequant_fp8_by_hand(w.view(torch.uint8), scale).T
    assert close(ops.fp8_linear(x, w.view(torch.uint8), scale, True), want_q)


def test_fp8_grouped_linear_projects_each_group_with_its_rows():
    g, r, k = 2, 64, 256  # wo_a: [G*R, K], group g uses rows g*R .. g*R+R-1
    w, s = quant.quantize_fp8_blocks(rand(g * r, k, seed=3, scale=0.05))
    scale = quant.e8m0_to_float(s)
    x = rand(2, 3, g, k, seed=4)
    dense = dequant_fp8_by_hand(w.view(torch.uint8), scale)
    got = ops.fp8_grouped_linear(x, w.view(torch.uint8), scale, False)
    for gi in range(g):
        assert close(got[:, :, gi], x[:, :, gi].double() @ dense[gi * r:(gi + 1) * r].T)


# ---- MoE experts and the clamped SwiGLU (spec §2.6) --------------------------------------------------------------
def silu(z: float) -> float:
    return z / (1 + math.exp(-z))


def test_moe_clamped_swiglu_by_hand():
    """Identity experts, limit 10: up clamped to [-10, 10], gate only from above; routing weight before w2."""
    eye = torch.eye(2)
    w = torch.stack([eye, 2 * eye])  # expert 0: identity, expert 1: doubles
    x = torch.tensor([[20.0, -20.0], [3.0, 0.5]])
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.5]])
    indices = torch.tensor([[0, 1], [1, -1]])  # token 1's second slot: no expert
    empty = torch.zeros(0)
    y = ops.moe_experts(x, weights, indices, w, empty, w, empty, w, empty, 2, 10.0, False, False)

    def expert(scale: float, xv: list[float], rw: float) -> list[float]:
        out = []
        for v in xv:
            g = min(scale * v, 10.0)  # gate: clamp from above only
            u = max(min(scale * v, 10.0), -10.0)  # up: symmetric clamp
            out.append(scale * silu(g) * u * rw)  # routing weight applied before w2
        return out

    t0 = [a + b for a, b in zip(expert(1, [20, -20], 0.25), expert(2, [20, -20], 0.75))]
    t1 = expert(2, [3, 0.5], 1.0)
    assert close(y, torch.tensor([t0, t1], dtype=torch.float64))
    # -20 is not clamped from below: silu(-20) * (-10) is tiny but not silu(-10) * (-10)
    assert abs(t0[1] - (0.25 * silu(-20) * -10 + 0.75 * 2 * silu(-40) * -10)) < 1e-12


@pytest.mark.parametrize("fmt", [0, 1, 2])
def test_moe_experts_formula(fmt):
    """out[t] = sum_j w2_e(silu(min(w1_e x, L)) * clamp(w3_e x, -L, L) * weight_tj), e = indices[t, j] (-1 skipped,
    a repeated expert counted twice). fmt 2 passes empty scales, as model.Experts does."""
    e, d, inter, limit = 3, 64, 32, 0.7
    ws, ss, dense = {}, {}, {}
    for seed, (name, (n, k)) in enumerate({"w1": (inter, d), "w3": (inter, d), "w2": (d, inter)}.items()):
        full = rand(e, n, k, seed=10 + seed, scale=0.2)
        if fmt == 0:
            packed = [quant.quantize_fp4(full[i]) for i in range(e)]
            ws[name] = torch.stack([p[0].view(torch.uint8) for p in packed])
            ss[name] = torch.stack([quant.e8m0_to_float(p[1]) for p in packed])
            dense[name] = [dequant_fp4_by_hand(ws[name][i], ss[name][i]) for i in range(e)]
        elif fmt == 1:
            packed = [quant.quantize_fp8_blocks(full[i]) for i in range(e)]
            ws[name] = torch.stack([p[0].view(torch.uint8) for p in packed])
            ss[name] = torch.stack([quant.e8m0_to_float(p[1]) for p in packed])
            dense[name] = [dequant_fp8_by_hand(ws[name][i], ss[name][i]) for i in range(e)]
        else:
            ws[name], ss[name] = full, torch.zeros(0)
            dense[name] = [full[i].double() for i in range(e)]
    x = rand(4, d, seed=5)
    weights = rand(4, 2, seed=6).abs()
    indices = torch.tensor([[0, 2], [1, 1], [-1, 0], [-1, -1]])
    y = ops.moe_experts(x, weights, indices, ws["w1"], ss["w1"], ws["w3"], ss["w3"], ws["w2"], ss["w2"], fmt, limit,
                        False, False)
    want = torch.zeros(4, d, dtype=torch.float64)
    for t in range(4):
        for j in range(2):
            ex = int(indices[t, j])
            if ex < 0:
                continue
            g = (dense["w1"][ex] @ x[t].double()).clamp(max=limit)
            u = (dense["w3"][ex] @ x[t].double()).clamp(-limit, limit)
            want[t] += dense["w2"][ex] @ (torch.nn.functional.silu(g) * u * float(weights[t, j]))
    assert close(y, want)
    assert not y[3].any()


def test_shared_expert_is_clamped_too():
    """Spec §2.6 / trap 9: since 2026-04-27 the shared expert clamps like the routed ones (up ±L, gate <= L)."""
    cfg = preset("tiny").replace(quantization=QuantizationConfig(dense="bf16", experts="bf16"))
    shared = SharedExpert(cfg)
    d, inter = cfg.hidden_size, cfg.moe_intermediate_size
    for lin in (shared.w1, shared.w3):
        lin.weight.zero_()
        lin.weight[0, 0], lin.weight[1, 0] = 1.0, -1.0  # gate/up row 0 = x0, row 1 = -x0
    shared.w2.weight.zero_()
    shared.w2.weight[0, 0] = shared.w2.weight[0, 1] = 1.0  # y0 = h0 + h1
    x = torch.zeros(1, d)
    x[0, 0] = 25.0
    y = shared(x, Numerics.plain())
    want = silu(10.0) * 10.0 + silu(-25.0) * -10.0  # gate clamped to 10 / left at -25; up clamped to ±10
    assert abs(y[0, 0].item() - want) < 1e-4 and not y[0, 1:].any()
    assert inter >= 2


# ---- sparse attention with sink (spec §2.3 step 7, §3.5) -----------------------------------------------------------
def test_sparse_attn_hand_computed():
    """Two keys with logits ln 2 and ln 3 and a sink of 0: p = 2/6, 3/6, the sink takes 1/6 of the mass."""
    kv = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [B=1, N=2, D=2]
    q = torch.tensor([[[[math.log(2), math.log(3)]]]])  # [1, 1, 1, 2]
    sink = torch.zeros(1)
    o = ops.sparse_attn(q, kv[:, :1], kv[:, 1:], sink, torch.tensor([[[0, 1]]]), 1.0, False, 0)  # row 1: cmp's 0
    assert torch.allclose(o[0, 0, 0], torch.tensor([1 / 3, 1 / 2]), atol=1e-6)
    # -1 sentinels contribute nothing; a sink of ln 3 with only key 0 (e^{ln 2} = 2): o = 2/(2+3) kv0
    o = ops.sparse_attn(q, kv, kv[:, :0], torch.tensor([math.log(3)]), torch.tensor([[[-1, 0, -1]]]), 1.0, False, 0)
    assert torch.allclose(o[0, 0, 0], torch.tensor([0.4, 0.0]), atol=1e-6)
    # nothing to attend to: only the sink, output exactly 0
    o = ops.sparse_attn(q, kv[:, :0], kv, sink, torch.tensor([[[-1, -1]]]), 1.0, False, 0)
    assert not o.any()


def test_sparse_attn_formula():
    b, s, h, d, n, k, scale = 2, 70, 3, 8, 9, 5, 0.3  # s > 64: crosses the op's query blocking
    q, kv, sink = rand(b, s, h, d, seed=1), rand(b, n, d, seed=2), rand(h, seed=3)
    idx = torch.randint(-1, n, (b, s, k), generator=torch.Generator().manual_seed(4))
    idx[0, 5] = torch.tensor([2, 2, 2, -1, 7])  # a repeated row counts each time
    o = ops.sparse_attn(q, *split_rows(kv, 4), sink, idx, scale, False, 0)
    for bi in range(b):
        for si in range(s):
            rows = [int(j) for j in idx[bi, si] if j >= 0]
            for hi in range(h):
                e = [math.exp(scale * float(q[bi, si, hi] @ kv[bi, j])) for j in rows]
                denom = sum(e) + math.exp(float(sink[hi]))
                want = sum((ej / denom) * kv[bi, j].double() for ej, j in zip(e, rows)) if rows else torch.zeros(d)
                assert close(o[bi, si, hi], torch.as_tensor(want), rtol=1e-5)


def bf16(v: float) -> float:
    """Round an fp32 value to bf16 (nearest, ties to even) with ml_dtypes, independently of torch."""
    return float(np.float32(v).astype(ml_dtypes.bfloat16))


def sparse_attn_like_the_kernel(q, kv, sink: float, picks: list[int], scale: float) -> np.ndarray:
    """Spec §3.9.2, one query head, scalar fp32 loop: blocks of 64 picks in order; per block the running max
    m, p_k = exp(l_k - m) in fp32, the bf16-rounded p_k times kv into the accumulator, the unrounded p_k into
    the denominator, both rescaled by exp(m_old - m) when the max grows; the sink joins the denominator last."""
    f = np.float32
    m, denom, acc = f(-np.inf), f(0), np.zeros(kv.shape[-1], np.float32)
    for b0 in range(0, len(picks), 64):
        block = [j for j in picks[b0:b0 + 64] if j >= 0]
        logits = [f(f(np.dot(q.astype(np.float64), kv[j].astype(np.float64))) * f(scale)) for j in block]
        new_m = max([m] + logits)
        if new_m == -np.inf:
            continue
        rescale = f(np.exp(f(m - new_m)))
        p = [f(np.exp(f(lg - new_m))) for lg in logits]
        denom = f(denom * rescale + f(sum(np.float64(v) for v in p)))
        acc = (acc * rescale + sum((f(bf16(pk)) * kv[j] for pk, j in zip(p, block)), np.zeros_like(acc)))
        m = new_m
    denom = f(denom + f(np.exp(f(sink - (m if m > -np.inf else 0)))))
    return acc / denom


def test_sparse_attn_rounds_probabilities_per_block_of_64():
    """K = 150 picks (three blocks, -1 picks scattered, one block all -1): the bf16 op follows the kernel's
    block-wise rounding; the unrounded variant is the exact softmax (checked in test_sparse_attn_formula)."""
    b, s, h, d, n, k, scale = 1, 3, 2, 16, 200, 150, 0.25
    q, kv, sink = rand(b, s, h, d, seed=11), rand(b, n, d, seed=12), rand(h, seed=13)
    g = torch.Generator().manual_seed(14)
    idx = torch.randint(0, n, (b, s, k), generator=g)
    idx[:, :, 64:128] = -1  # the middle block sees nothing
    idx[:, 1, ::7] = -1
    idx[:, 2, :64] = torch.sort(idx[:, 2, :64], descending=True).values  # logits grow across the blocks
    got = ops.sparse_attn(q, *split_rows(kv, 120), sink, idx, scale, True, 0)
    exact = ops.sparse_attn(q, *split_rows(kv, 120), sink, idx, scale, False, 0)
    for si in range(s):
        for hi in range(h):
            want = sparse_attn_like_the_kernel(q[0, si, hi].numpy(), kv[0].numpy(), float(sink[hi]),
                                               idx[0, si].tolist(), scale)
            assert close(got[0, si, hi], torch.from_numpy(want), rtol=1e-5), (si, hi)
    # the rounding is visible: bf16 probabilities move the output by ~2^-9 relative, far above fp32 noise
    assert not close(got, exact, rtol=1e-5)


# ---- lightning indexer top-k (spec §2.5) ----------------------------------------------------------------------------
def test_indexer_topk_formula_and_sentinels():
    b, s, h, d, n, topk = 2, 5, 3, 8, 11, 4
    q, k, w = rand(b, s, h, d, seed=1), rand(b, n, d, seed=2), rand(b, s, h, seed=3)
    n_visible = torch.tensor([[11, 6, 2, 0, 4], [1, 11, 3, 9, 7]])
    picks = ops.indexer_topk(q, k, w, n_visible, topk, False)
    assert picks.shape == (b, s, topk) and picks.dtype == torch.int64
    for bi in range(b):
        for si in range(s):
            score = [sum(float(w[bi, si, hh]) * max(float(q[bi, si, hh] @ k[bi, j]), 0.0) for hh in range(h))
                     for j in range(int(n_visible[bi, si]))]
            order = sorted(range(len(score)), key=lambda j: (-score[j], j))[:topk]
            want = order + [-1] * (topk - len(order))  # invalid picks are -1, never hidden entries
            assert picks[bi, si].tolist() == want, (bi, si)


def test_indexer_topk_scores_in_bf16():
    """Spec §3.9.4: s_h = bf16(q_h . k), bf16(w_h * relu(s_h)), bf16(sum over heads); the rounded scores then
    tie where the fp32 ones do not, and ties go to the lower entry id."""
    b, s, h, d, n, topk = 1, 6, 4, 16, 40, 8
    q, k, w = rand(b, s, h, d, seed=21), rand(b, n, d, seed=22), rand(b, s, h, seed=23).abs()
    n_visible = torch.tensor([[40, 33, 17, 8, 3, 0]])
    picks = ops.indexer_topk(q, k, w, n_visible, topk, True)
    ties = 0
    for si in range(s):
        score = []
        for j in range(int(n_visible[0, si])):
            terms = [bf16(float(w[0, si, hh]) * max(bf16(float(q[0, si, hh].double() @ k[0, j].double())), 0.0))
                     for hh in range(h)]
            score.append(bf16(sum(terms)))
        order = sorted(range(len(score)), key=lambda j: (-score[j], j))[:topk]
        ties += len(score) - len(set(score))
        assert picks[0, si].tolist() == order + [-1] * (topk - len(order)), si
    assert ties > 0  # the case the rounding creates: equal bf16 scores, ordered by entry id


def test_indexer_topk_more_than_entries():
    """topk > N returns N picks (min(index_topk, T) in the spec)."""
    q, k, w = rand(1, 2, 2, 8, seed=1).abs(), rand(1, 3, 8, seed=2).abs(), rand(1, 2, 2, seed=3).abs()
    picks = ops.indexer_topk(q, k, w, torch.tensor([[3, 1]]), 512, False)
    assert picks.shape == (1, 2, 3)
    assert (picks[0, 1, 1:] == -1).all() and picks[0, 1, 0] == 0


def test_indexer_topk_ties_lower_index_first():
    """Equal scores come out lower entry id first (ONNX TopK's rule), also where ties straddle the k-th place.
    Scores per entry (q = 1, w = 1, relu(k0)): [1, 2, 1, 2, 0, 0 (relu), 2, 1]."""
    q, w = torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1)
    k = torch.zeros(1, 8, 4)
    k[0, :, 0] = torch.tensor([1.0, 2, 1, 2, 0, -1, 2, 1])
    n_visible = torch.tensor([[8, 6]])
    for rounded in (False, True):  # small integers: the bf16 roundings are exact and change nothing
        assert ops.indexer_topk(q, k, w, n_visible, 3, rounded).tolist() == [[[1, 3, 6], [1, 3, 0]]]
        assert ops.indexer_topk(q, k, w, n_visible, 5, rounded).tolist() == [[[1, 3, 6, 0, 2], [1, 3, 0, 2, 4]]]
    assert ops.indexer_topk(q, k, w, n_visible, 8, False).tolist() == [[[1, 3, 6, 0, 2, 7, 4, 5],
                                                                 [1, 3, 0, 2, 4, 5, -1, -1]]]


def test_indexer_topk_ties_match_onnx_function_body():
    """The ONNX function body (TopK) and the torch reference agree on heavily tied integer scores."""
    pytest.importorskip("onnxruntime")
    from test_onnx_ops import run_onnx

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-1, 2, (2, 16, 3, 8), generator=g).float()
    k = torch.randint(-1, 2, (2, 300, 8), generator=g).float()
    w = torch.randint(0, 3, (2, 16, 3), generator=g).float()
    n_visible = torch.randint(0, 301, (2, 16), generator=g)
    for topk in (7, 64):
        for rounded in (False, True):
            want = ops.indexer_topk(q, k, w, n_visible, topk, rounded).numpy()
            got = run_onnx("indexer_topk", {"topk": topk, "bf16": int(rounded)}, [3], q=q, k=k, w=w,
                           n_visible=n_visible)[0]
            np.testing.assert_array_equal(got, want)


# ---- compressor pooling (spec §2.4) -------------------------------------------------------------------------------
def test_compress_pool_hand_computed():
    """HCA-style window of 2 rows, one channel: scores 0 and ln 3 -> weights 1/4, 3/4; kv 4, 8 -> 7."""
    kv = torch.tensor([[[4.0], [8.0], [100.0]]])
    score = torch.tensor([[[0.0], [math.log(3)], [0.0]]])
    out = ops.compress_pool(kv, score, torch.tensor([[1, -1]]), 2, False)
    assert torch.allclose(out, torch.tensor([[[7.0], [0.0]]]))
    # overlap (CSA-style), ratio 1: candidates = previous row's channel 0 and own row's channel 1
    kv = torch.tensor([[[1.0, 10.0], [2.0, 20.0]]])
    score = torch.tensor([[[0.0, 5.0], [7.0, math.log(3)]]])
    out = ops.compress_pool(kv, score, torch.tensor([[1]]), 1, True)
    assert torch.allclose(out, torch.tensor([[[(1 * 1 + 3 * 20) / 4]]]))


@pytest.mark.parametrize("overlap", [False, True])
def test_compress_pool_formula(overlap):
    b, length, d, m = 2, 24, 6, 4
    c = 2 if overlap else 1
    kv, score = rand(b, length, c * d, seed=1), rand(b, length, c * d, seed=2)
    score[0, :4, :] = -torch.inf  # padding rows (before position 0): only the previous-window half is read there
    ends = torch.tensor([[7, 11, 23, -1], [15, -1, 19, 7]])
    out = ops.compress_pool(kv, score, ends, m, overlap)
    for bi in range(b):
        for ki in range(ends.shape[1]):
            e = int(ends[bi, ki])
            if e < 0:
                assert not out[bi, ki].any()
                continue
            for ch in range(d):
                own = [(float(kv[bi, t, (c - 1) * d + ch]), float(score[bi, t, (c - 1) * d + ch]))
                       for t in range(e - m + 1, e + 1)]
                prev = [(float(kv[bi, t, ch]), float(score[bi, t, ch])) for t in range(e - 2 * m + 1, e - m + 1)]
                cands = prev + own if overlap else own
                z = [math.exp(sc) for _, sc in cands]
                want = sum(v * zi for (v, _), zi in zip(cands, z)) / sum(z)
                assert abs(float(out[bi, ki, ch]) - want) <= 1e-5 * max(1.0, abs(want))


# ---- RoPE (spec §2.3.1) -------------------------------------------------------------------------------------------
def spec_freqs(cfg, yarn: bool) -> list[float]:
    r = cfg.qk_rope_head_dim
    base = cfg.compress_rope_theta if yarn else cfg.rope_theta
    f = [base ** (-2 * i / r) for i in range(r // 2)]
    if not yarn:
        return f
    ys = cfg.rope_scaling

    def corr_dim(rot: float) -> float:
        return r * math.log(ys.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = min(max(math.floor(corr_dim(ys.beta_fast)), 0), r - 1)
    high = min(max(math.ceil(corr_dim(ys.beta_slow)), 0), r - 1)
    out = []
    for i, fi in enumerate(f):
        smooth = 1 - min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(fi / ys.factor * (1 - smooth) + fi * smooth)
    return out


def rope_by_hand(x: torch.Tensor, pos: int, freqs: list[float], inverse: bool = False) -> torch.Tensor:
    """Interleaved pairs (x[n+2i], x[n+2i+1]) of the trailing 2*len(freqs) dims, rotated by pos * f_i. The angle
    is rounded to fp32 as the reference's fp32 table does (at position 65536 that moves it by up to 4e-3)."""
    out = x.double().clone()
    n = x.shape[-1] - 2 * len(freqs)
    for i, f in enumerate(freqs):
        a, b = x[..., n + 2 * i].double(), x[..., n + 2 * i + 1].double()
        angle = float(np.float32(pos) * np.float32(f))
        c, s = math.cos(angle), math.sin(angle) * (-1 if inverse else 1)
        out[..., n + 2 * i], out[..., n + 2 * i + 1] = a * c - b * s, a * s + b * c
    return out


@pytest.mark.parametrize("name", ["v4-flash", "tiny"])
@pytest.mark.parametrize("yarn", [False, True])
def test_rope_frequencies_match_spec(name, yarn):
    cfg = preset(name)
    got = rope_frequencies(cfg, yarn)
    assert torch.allclose(got.double(), torch.tensor(spec_freqs(cfg, yarn), dtype=torch.float64), rtol=1e-6)
    if yarn:  # the lowest frequency is fully interpolated: base^(-62/64) / factor 16
        assert math.isclose(got[-1].item(), cfg.compress_rope_theta ** (-62 / 64) / 16, rel_tol=1e-6)


def test_head_rescale_rounds_each_step_to_bf16_as_the_reference():
    """Spec §3.9.1 by hand, one row at a time in numpy: bf16(q^2), their fp32 mean to bf16, + eps to bf16, the
    reciprocal root to bf16, the product to bf16. Without bf16 it is the fp32 RMS rescale (float64 by hand)."""
    # wide rows over three decades, and 8-wide rows, where rounding the squares moves many means a bf16 step
    for q in (rand(2, 3, 64, seed=9) * torch.logspace(-2, 1, 64), rand(200, 8, seed=10)):
        got, d = ops.head_rescale(q, 1e-6, True), q.shape[-1]
        for row, out in zip(q.reshape(-1, d).tolist(), got.reshape(-1, d).tolist()):
            squares = [np.float32(bf16(np.float32(v) * np.float32(v))) for v in row]
            mean = bf16(np.float32(sum(squares, np.float32(0))) / np.float32(d))
            r = bf16(np.float32(1) / np.sqrt(np.float32(bf16(np.float32(mean) + np.float32(1e-6)))))
            assert out == [bf16(np.float32(v) * np.float32(r)) for v in row]
    q = rand(2, 3, 64, seed=9) * torch.logspace(-2, 1, 64)
    plain = ops.head_rescale(q, 1e-6, False).double()
    want = q.double() / torch.sqrt(q.double().square().mean(-1, keepdim=True) + 1e-6)
    assert ((plain - want).abs() <= 2e-7 * want.abs() + 1e-30).all()


def test_rms_norm_scales_each_row_by_its_inverse_rms_then_by_the_weight():
    """y = x / sqrt(mean(x^2) + eps) * w per row of the last dim (spec §2), against float64 by hand: within 2e-7
    relative (an fp32 mean, rsqrt and two products); eps keeps a zero row at zero."""
    x, w = rand(3, 5, 64, seed=7) * torch.logspace(-3, 2, 64), rand(64, seed=8)
    y = ops.rms_norm(x, w, 1e-6, False).double()
    xd = x.double()
    want = xd / torch.sqrt((xd * xd).sum(-1, keepdim=True) / 64 + 1e-6) * w.double()
    assert ((y - want).abs() <= 2e-7 * want.abs() + 1e-30).all()
    assert not ops.rms_norm(torch.zeros(2, 64), w, 1e-6, False).any()
    # bf16: the norm of the bf16-rounded input, rounded
    rounded = x.to(torch.bfloat16).float()
    want = ops.rms_norm(rounded, w, 1e-6, False).to(torch.bfloat16).float()
    assert torch.equal(ops.rms_norm(x, w, 1e-6, True), want)


@pytest.mark.parametrize("head_dim", [128, 192, 512])
def test_rope_rotates_the_last_dims_interleaved(head_dim):
    """Head layout [nope | rope 64]: only the trailing 64 dims rotate, as interleaved pairs; inverse undoes it.
    head_dim 192 (nope 128) is the shape where transformers disagreed with us (see test_quant/test_checkpoint)."""
    cfg = preset("tiny").replace(head_dim=head_dim)
    freqs = rope_frequencies(cfg, yarn=True)
    x = rand(2, 3, 4, head_dim, seed=1)  # [B, S, H, D]
    pos = torch.tensor([[0, 5, 77], [1000, 3, 65536]])
    y = ops.rope(x, freqs, pos, False, False)
    f = freqs.tolist()
    for bi in range(2):
        for si in range(3):
            want = rope_by_hand(x[bi, si], int(pos[bi, si]), f)
            assert torch.allclose(y[bi, si].double(), want, atol=2e-5)
            # a row without head dim (a KV row [B, S, D]) turns the same way
            row = ops.rope(x[:, :, 0], freqs, pos, False, False)[bi, si]
            assert torch.allclose(row.double(), want[0], atol=2e-5)
    assert torch.equal(y[..., :head_dim - 64], x[..., :head_dim - 64])
    back = ops.rope(y, freqs, pos, True, False)
    assert torch.allclose(back, x, atol=1e-5)
    assert torch.allclose(back[0, 1].double(), rope_by_hand(y[0, 1], 5, f, inverse=True), atol=2e-5)
    # bf16: the rotated result, rounded once
    assert torch.equal(ops.rope(x, freqs, pos, False, True), y.to(torch.bfloat16).float())


@pytest.mark.parametrize("head_dim", [128, 192])
def test_kv_fp8_simulation_only_on_nope_dims(head_dim):
    """Trap 12: FP8 (block 64, pow2 scale) on kv[..., :nope]; the 64 RoPE dims untouched."""
    x = rand(3, head_dim, seed=2) * torch.logspace(-3, 2, head_dim)
    y = fake_quant_nope(x, 64, True)
    assert torch.equal(y[..., -64:], x[..., -64:])
    assert torch.equal(y[..., :-64].double(), act_quant_by_hand(x[..., :-64], 64))
    assert torch.equal(fake_quant_nope(x, 64, False), x)


# ---- hyper-connections (spec §2.2) --------------------------------------------------------------------------------
def hc_pre_by_hand(x, fn, scale, base, iters, norm_eps, hc_eps):
    """Spec §2.2.1 for one token: x [n, D]."""
    n = x.shape[0]
    scale, base = scale.tolist(), base.tolist()
    flat = x.double().flatten()
    rs = 1 / math.sqrt(float((flat ** 2).mean()) + norm_eps)
    mix = ((fn.double() @ flat) * rs).tolist()
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    pre = [sig(mix[j] * scale[0] + base[j]) + hc_eps for j in range(n)]
    post = [2 * sig(mix[n + j] * scale[1] + base[n + j]) for j in range(n)]
    c = [[float(mix[2 * n + n * j + k] * scale[2] + base[2 * n + n * j + k]) for k in range(n)] for j in range(n)]
    for j in range(n):  # row softmax + eps
        mx = max(c[j])
        e = [math.exp(v - mx) for v in c[j]]
        c[j] = [v / sum(e) + hc_eps for v in e]

    def col_norm():
        for k in range(n):
            s = sum(c[j][k] for j in range(n))
            for j in range(n):
                c[j][k] /= s + hc_eps

    def row_norm():
        for j in range(n):
            s = sum(c[j])
            c[j] = [v / (s + hc_eps) for v in c[j]]

    col_norm()
    for _ in range(iters - 1):
        row_norm()
        col_norm()
    y = sum(pre[j] * x[j].double() for j in range(n))
    return y, torch.tensor(post, dtype=torch.float64), torch.tensor(c, dtype=torch.float64)


@pytest.mark.parametrize("iters", [1, 2, 3, 20])  # few passes: each one visibly changes comb
def test_hc_pre_formula_and_sinkhorn(iters):
    b, s, n, d = 1, 3, 4, 16
    x, fn = rand(b, s, n, d, seed=1), rand((2 + n) * n, n * d, seed=2, scale=0.3)
    scale, base = rand(3, seed=3), rand((2 + n) * n, seed=4)
    y, post, comb = ops.hc_pre(x, fn, scale, base, iters, 1e-6, 1e-6)
    for si in range(s):
        wy, wpost, wcomb = hc_pre_by_hand(x[0, si], fn, scale, base, iters, 1e-6, 1e-6)
        assert close(y[0, si], wy) and close(post[0, si], wpost) and close(comb[0, si], wcomb)
    # Sinkhorn properties: the last step is a column normalisation, so columns sum to 1 (up to eps); after the
    # spec's 20 passes rows do too, approximately; all entries positive; post in (0, 2)
    assert torch.allclose(comb.sum(-2), torch.ones(b, s, n), atol=1e-5)
    if iters == 20:
        assert torch.allclose(comb.sum(-1), torch.ones(b, s, n), atol=1e-3)
    assert (comb > 0).all() and ((post > 0) & (post < 2)).all()
    assert not torch.allclose(comb, comb.transpose(-1, -2), atol=1e-3)  # not symmetric: orientation matters


def test_hc_post_applies_comb_transposed():
    """out_k = post_k f + sum_j C[j,k] R_j (trap 1). Hand case with a non-symmetric C."""
    comb = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # only C[0,1] = 1: stream 0 feeds output 1
    res = torch.tensor([[3.0], [5.0]])  # R_0 = 3, R_1 = 5 (D = 1)
    f, post = torch.tensor([2.0]), torch.tensor([10.0, 100.0])
    out = ops.hc_post(f.view(1, 1, 1), res.view(1, 1, 2, 1), post.view(1, 1, 2), comb.view(1, 1, 2, 2))
    assert out.view(2).tolist() == [10 * 2 + 0, 100 * 2 + 3]
    b, s, n, d = 2, 3, 4, 5
    f, res = rand(b, s, d, seed=1), rand(b, s, n, d, seed=2)
    post, comb = rand(b, s, n, seed=3), rand(b, s, n, n, seed=4)
    out = ops.hc_post(f, res, post, comb)
    for bi in range(b):
        for si in range(s):
            for k in range(n):
                want = post[bi, si, k] * f[bi, si] + sum(comb[bi, si, j, k] * res[bi, si, j] for j in range(n))
                assert torch.allclose(out[bi, si, k], want, atol=1e-6)


# ---- QAT simulation ops ---------------------------------------------------------------------------------------------
def test_fake_quant_fp8_op_matches_act_quant_formula():
    x = rand(4, 256, seed=1) * torch.logspace(-6, 3, 256)
    for block in (64, 128):
        assert torch.equal(ops.fake_quant_fp8(x, block).double(), act_quant_by_hand(x, block))




def e2m1_round_by_hand(v: float) -> float:
    """Nearest of ±{0, .5, 1, 1.5, 2, 3, 4, 6}, ties to the even code (codes 0,2,4,6 = 0, 1, 2, 4), saturating."""
    grid = [0, .5, 1, 1.5, 2, 3, 4, 6]
    mag = min(abs(v), 6.0)
    best = min(range(8), key=lambda c: (abs(mag - grid[c]), c % 2))
    return math.copysign(grid[best], v)


def test_hadamard_fp4_op_by_hand():
    """Indexer QAT (spec §2.5 step 2, §3.2, §3.9.3): x H/sqrt(d) (Sylvester order) rounded to bf16, then FP4
    per 32 with pow2 scale."""
    d = 64
    # integers up to 2^12: the butterflies and the 1/8 scale are exact in fp32 but need more than bf16's 8
    # significant bits, so the bf16 rounding before the FP4 step is visible
    x = torch.randint(-4096, 4097, (3, d), generator=torch.Generator().manual_seed(5)).float()
    exact = x.double() @ sylvester(d) / math.sqrt(d)
    rotated = exact.clone().apply_(bf16)
    assert not torch.equal(rotated, exact)
    want = torch.empty_like(rotated)
    for r in range(3):
        for b0 in range(0, d, 32):
            blk = rotated[r, b0:b0 + 32]
            s = pow2_ceil(max(blk.abs().max().item(), 6 * 2.0 ** -126) / 6)
            want[r, b0:b0 + 32] = torch.tensor([e2m1_round_by_hand(v / s) * s for v in blk.tolist()])
    assert torch.equal(ops.hadamard_fp4(x).double(), want)


# ---- sliding window ring (spec §2.3 step 6, trap 6) -------------------------------------------------------------
def test_window_ring_wraps_around():
    """W = 4; calls of various sizes (decode, chunks, longer than W, padded, idle). Each query must see exactly
    positions max(0, i-W+1) .. i, oldest first, -1 padding after them (model.py:254-276); kv rows carry their
    position + 1."""
    cfg = preset("tiny").replace(sliding_window=4)
    attn = Attention(cfg, 0)
    W, d = 4, cfg.head_dim
    ring = torch.zeros(2, W, d)
    starts = [0, 0]
    calls = [([3, 1], 3), ([1, 0], 1), ([1, 5], 6), ([6, 2], 6), ([1, 1], 1), ([9, 0], 9), ([2, 3], 4)]
    for n_valid, s in calls:
        step = Step(torch.tensor(starts), torch.tensor(n_valid), s)
        kv = (step.positions + 1).float()[..., None].expand(2, s, d).clone()  # padding rows too: must be ignored
        keys = torch.cat([ring, kv], dim=1)
        idx = attn.window_indices(step)
        for b in range(2):
            for t in range(n_valid[b]):
                i = starts[b] + t
                seen = [int(keys[b, j, 0]) - 1 if j >= 0 else None for j in idx[b, t].tolist()]
                window = list(range(max(0, i - W + 1), i + 1))  # the reference's order: -1 padding after
                assert seen == window + [None] * (W - len(window)), (b, i)
        ring = attn.updated_ring(ring, kv, step)
        for b in range(2):
            end = starts[b] + n_valid[b]
            for slot in range(W):  # slot holds the latest position p < end with p % W == slot
                held = [p for p in range(end) if p % W == slot]
                assert int(ring[b, slot, 0]) == (held[-1] + 1 if held else 0), (b, slot)
        starts = [a + n for a, n in zip(starts, n_valid)]


# ---- compressor emit boundaries (spec §2.4) ------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [4, 8])
@pytest.mark.parametrize("chunks", [[1] * 19, [5, 2, 9, 1, 6], [23]])
@pytest.mark.parametrize("state", ["fresh", "stale"])
def test_compressor_emits_every_ratio_tokens(ratio, chunks, state):
    """Entry j appears exactly when token (j+1)m-1 arrives, at slot j, and equals the spec's formula: per-channel
    softmax over the window (+ape by offset; CSA: previous window's first-half channels too), RMSNorm, RoPE at
    position j*m. Slots not yet emitted keep their old value (NaN here). One-token chunks take the decode path
    (the state ring read in place), longer ones the prefill path. A stale state (another sequence's rows left in
    the batch slot) changes nothing: a new sequence needs no reset."""
    cfg = preset("tiny")
    d = 64 + cfg.qk_rope_head_dim  # entry width: nope 64 + rope 64
    comp = Compressor(cfg, ratio, d, indexer_keys=False)
    c = 2 if ratio == 4 else 1
    g = torch.Generator().manual_seed(3)
    comp.wkv.weight.copy_(torch.randn(c * d, cfg.hidden_size, generator=g) * 0.1)
    comp.wgate.weight.copy_(torch.randn(c * d, cfg.hidden_size, generator=g) * 0.1)
    comp.ape.copy_(torch.randn(ratio, c * d, generator=g))
    comp.norm.weight.copy_(1 + 0.1 * torch.randn(d, generator=g))
    freqs = rope_frequencies(cfg, yarn=True)
    total = sum(chunks)
    x = torch.randn(1, total, cfg.hidden_size, generator=g)

    # the spec formula over the whole sequence
    K = x[0].double() @ comp.wkv.weight.double().T  # [T, c*d]
    Z = x[0].double() @ comp.wgate.weight.double().T + comp.ape.double()[torch.arange(total) % ratio]
    want = []
    for j in range(total // ratio):
        own = range(j * ratio, (j + 1) * ratio)
        kv_c, sc_c = K[own, (c - 1) * d:], Z[own, (c - 1) * d:]
        if c == 2 and j > 0:
            prev = range((j - 1) * ratio, j * ratio)
            kv_c, sc_c = torch.cat([K[prev, :d], kv_c]), torch.cat([Z[prev, :d], sc_c])
        pooled = (sc_c.softmax(dim=0) * kv_c).sum(0)
        normed = pooled / torch.sqrt((pooled ** 2).mean() + cfg.rms_norm_eps) * comp.norm.weight.double()
        want.append(rope_by_hand(normed, j * ratio, freqs.tolist()))

    n_slots = total // ratio + 2
    entries = torch.full((1, n_slots, d), float("nan"))
    skv, ssc = torch.zeros(1, c * ratio, c * d), torch.full((1, c * ratio, c * d), float("-inf"))
    if state == "stale":
        skv, ssc = torch.randn(skv.shape, generator=g) * 5, torch.randn(ssc.shape, generator=g) * 5
    start = 0
    for n in chunks:
        step = Step(torch.tensor([start]), torch.tensor([n]), n)
        entries, skv, ssc = comp(x[:, start:start + n], step, entries, skv, ssc, freqs, Numerics.plain())
        start += n
        emitted = start // ratio  # windows complete after `start` tokens
        for j in range(n_slots):
            if j < emitted:
                assert torch.allclose(entries[0, j].double(), want[j], atol=1e-5), (start, j)
            else:
                assert torch.isnan(entries[0, j]).all(), f"slot {j} written after {start} tokens"


def test_bf16_linear_widens_a_large_weight_a_slice_of_rows_at_a_time(monkeypatch):
    """Past WIDEN_ROWS_BYTES the reference widens the BF16 weight slice by slice (V4-Flash's head: 2.1 GB in FP32):
    the identity matrix reads every stored value back exactly, and a product stays x @ float(w)^T."""
    from dsv4c.graphs.ops import registry

    monkeypatch.setattr(registry, "WIDEN_ROWS_BYTES", 3 * 4 * 16)  # 3 rows of 16: slices 3, 3, 3, 1
    w = torch.randn(10, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert torch.equal(torch.ops.dsv4.bf16_linear(torch.eye(16), w).T, w.float())
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    want = (x.double() @ w.double().T).float()
    torch.testing.assert_close(torch.ops.dsv4.bf16_linear(x, w), want, rtol=1e-6, atol=1e-6)


# ---- packed cache rows ------------------------------------------------------------------------------------------
def test_a_packed_kv_row_has_the_documented_bytes():
    """Hand-computed: non-RoPE dims all 1.0 -> scale 2^ceil(log2(1/448)) = 2^-8, each value 256 = e4m3 0x78
    (exponent 8 + bias 7, mantissa 0), scale byte 127 - 8 = 119; the second block 0.5 at 2^-9 (same code); RoPE dims
    1.0 and -2.0 as bf16 0x3f80 / 0xc000, little-endian; then zero padding to a multiple of 8."""
    x = torch.cat([torch.ones(64), torch.full((64,), 0.5), torch.tensor([1.0, -2.0])])
    row = ops.pack_kv_fp8(x[None], 2)[0]
    assert row.dtype == torch.uint8 and row.numel() == quant.kv_row_bytes(130, 2) == 136  # 128 + 4 + 2 -> 136
    assert row[:128].tolist() == [0x78] * 128
    assert row[128:132].tolist() == [0x80, 0x3F, 0x00, 0xC0]
    assert row[132:134].tolist() == [119, 118]
    assert row[134:].tolist() == [0, 0]
    assert quant.kv_row_bytes(512, 64) == 584  # V4: 448 + 128 + 7 + 1 (vLLM's fp8_ds_mla row, spec §4.2)


def test_a_packed_fp4_row_has_the_documented_bytes():
    """Hand-computed: 32 values 1, -1.5, 6, 0, ... (amax 6 -> scale 1, e8m0 127): e2m1 codes 2, 8|3 = 11, 7, 0
    packed low nibble first (0xB2, 0x07), then the scale byte."""
    x = torch.tensor([1.0, -1.5, 6.0, 0.0] * 8)
    row = ops.pack_fp4(x[None])[0]
    assert row.tolist() == [0xB2, 0x07] * 8 + [127]
    assert quant.fp4_row_bytes(128) == 68


def test_packed_rows_unpack_to_exactly_the_qat_simulation():
    """The cache's packed rows hold the values the reference's simulation computes (spec §3.1, §4.1): FP8 non-RoPE
    dims in blocks of 64 + bf16 RoPE dims (model.fake_quant_nope), FP4 keys = fake_quant_fp4 — bit for bit, and
    packing FP4-valued keys again keeps their values (the indexer packs hadamard_fp4's output; a block whose
    largest value rounded down may get a scale one step smaller, with every value still on the grid)."""
    from tensors import packed_rows_case

    x = packed_rows_case()
    simulated = fake_quant_nope(x, 64, True)
    simulated = torch.cat([simulated[..., :-64], simulated[..., -64:].to(torch.bfloat16).float()], dim=-1)
    unpacked = quant.unpack_kv_fp8(ops.pack_kv_fp8(x, 64), 192, 64)
    assert torch.equal(unpacked.view(torch.int32), simulated.view(torch.int32))  # -0.0 included
    keys = quant.fake_quant_fp4(x[..., :128])
    packed = ops.pack_fp4(x[..., :128])
    assert torch.equal(quant.unpack_fp4_rows(packed, 128).view(torch.int32), keys.view(torch.int32))
    again = quant.unpack_fp4_rows(ops.pack_fp4(keys), 128)
    assert torch.equal(again.view(torch.int32), keys.view(torch.int32))


def test_attention_and_indexer_read_packed_rows_as_their_values():
    """sparse_attn over packed FP8 rows = sparse_attn over the unpacked floats; the indexer's scores and picks over
    packed FP4 keys = over the unpacked keys (bit for bit, the bf16 rounding points included)."""
    from tensors import attention_blocks, packed_rows_case

    inputs = attention_blocks(d=192)
    kv, cmp = ops.pack_kv_fp8(inputs["kv"], 64), ops.pack_kv_fp8(inputs["cmp"], 64)
    args = (inputs["sink"], inputs["idx"], 192 ** -0.5, True)
    got = ops.sparse_attn(inputs["q"], kv, cmp, *args, 64)
    want = ops.sparse_attn(inputs["q"], quant.unpack_kv_fp8(kv, 192, 64), quant.unpack_kv_fp8(cmp, 192, 64), *args, 0)
    assert torch.equal(got, want)
    keys = ops.pack_fp4(packed_rows_case(d=128)[:, :, :128])
    q, w = rand(2, 3, 4, 128, seed=1), rand(2, 3, 4, seed=2)
    values = quant.unpack_fp4_rows(keys, 128)
    assert torch.equal(ops.indexer_scores(q, keys, w, True), ops.indexer_scores(q, values, w, True))
    n_visible = torch.tensor([[3, 7, 12], [12, 1, 0]])
    assert torch.equal(ops.indexer_topk(q, keys, w, n_visible, 5, True), ops.indexer_topk(q, values, w, n_visible, 5, True))


def test_the_reference_numerics_cache_holds_packed_rows():
    """Under the recipe's FP8 KV / FP4 indexer numerics the window, compressed-entry and indexer-key caches are
    uint8 rows of the packed widths (584 / 68 bytes at V4's dims); plain numerics keep float rows."""
    from dsv4c.graphs.cache import layer_cache_spec

    cfg = preset("mini-1b")
    spec = {e.field: e for e in layer_cache_spec(cfg, "l", 4, 1, 64, Numerics.reference().cache_rows)}
    assert (spec["win"].dtype, spec["win"].shape[-1], spec["win"].packing) == (torch.uint8, 584, "kv_fp8")
    assert (spec["cmp"].dtype, spec["cmp"].shape[-1]) == (torch.uint8, 584)
    assert (spec["idx"].dtype, spec["idx"].shape[-1], spec["idx"].packing) == (torch.uint8, 68, "fp4")
    assert spec["cmp_state_kv"].dtype == torch.float32
    plain = {e.field: e for e in layer_cache_spec(cfg, "l", 4, 1, 64, Numerics.plain().cache_rows)}
    assert plain["win"].dtype == torch.float32 and plain["win"].shape[-1] == cfg.head_dim and not plain["win"].packing
