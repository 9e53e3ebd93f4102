"""Test inputs and comparisons shared by the op tests (torch reference, ONNX bodies, C++ kernels, quant)."""

from __future__ import annotations

import math

import numpy as np
import torch

from dsv4c.graphs import quant


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def bf16_initializer(name: str, t: torch.Tensor):
    """A bfloat16 tensor as an ONNX initializer (numpy has no bfloat16, so ORT cannot be fed one: test models
    hold bf16 weights as initializers, as the engines do)."""
    from onnx import TensorProto, helper

    raw = t.contiguous().view(torch.int16).numpy().tobytes()
    return helper.make_tensor(name, TensorProto.BFLOAT16, list(t.shape), raw, raw=True)


def feeds(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The graph inputs of a test model: every input but the bf16 ones (initializers, see bf16_initializer)."""
    return {n: t.numpy() for n, t in inputs.items() if t.dtype != torch.bfloat16}


def reference(name: str, attrs: dict, **inputs: torch.Tensor) -> list[np.ndarray]:
    """The torch reference of dsv4 op `name` (registry.py) on named inputs and attributes, outputs as numpy."""
    from dsv4c.graphs.ops import OPS
    from dsv4c.graphs.ops.onnx import tensor_inputs

    op = OPS[name]
    out = getattr(torch.ops.dsv4, name)(*(inputs[n] for n in tensor_inputs(op)), *(attrs[n] for n in op.attributes))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def sylvester(d: int) -> torch.Tensor:
    """The d x d Hadamard matrix (Sylvester's construction, unnormalised), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def fp8_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real FP8 weights: uint8 e4m3 bits [n, k], float32 power-of-two 128x128 block scales."""
    q, s = quant.quantize_fp8_blocks(rand(n, k, seed=seed, scale=0.05))
    return q.view(torch.uint8), quant.e8m0_to_float(s)


def attention_blocks(h: int = 5, d: int = 40) -> dict[str, torch.Tensor]:
    """sparse_attn inputs with K = 200 picks, i.e. four 64-pick online-softmax blocks (64, 64, 64, 8): -1 picks
    scattered through a row, a whole block of them after valid picks, a row whose first block and a half are -1
    (the running max is still -inf after an empty block), a row with none at all (sink only: zeros). With
    bf16 the blocks' positions matter: the same picks compacted to the front give another result. The 300 rows
    come in the op's two parts, kv (90 rows) and cmp (210): the picks land in both, blocks mixing them."""
    b, s, n, k = 2, 3, 300, 200
    idx = torch.randint(0, n, (b, s, k), generator=torch.Generator().manual_seed(0))
    idx[0, 0, 64:128] = -1
    idx[0, 1, ::3] = -1
    idx[1, 1] = -1
    idx[1, 2, :100] = -1
    kv, cmp = split_rows(rand(b, n, d, seed=2), 90)
    return dict(q=rand(b, s, h, d, seed=1), kv=kv, cmp=cmp, sink=rand(h, seed=3), idx=idx)


def split_rows(rows: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sparse_attn's key rows [B, N, D] as its two parts (kv: the first n rows, cmp: the rest): the same row
    numbers, so the same picks and the same result as one tensor of all the rows."""
    return rows[:, :n].contiguous(), rows[:, n:].contiguous()


def indexer_grid(n: int = 80) -> dict[str, torch.Tensor]:
    """indexer_topk inputs on integer grids (q, k small integers, w multiples of 1/8): every dot product, product
    and head sum is exact in fp32 whatever the order, so the bf16 roundings are the only inexact steps and every
    implementation must pick exactly the reference's entries. Keys near a common row give close scores, which
    bf16 rounding makes tie (and reorders against fp32)."""
    g = torch.Generator().manual_seed(5)
    b, s, h, d = 2, 6, 5, 16
    keys = torch.randint(-15, 16, (b, 1, d), generator=g) + torch.randint(-3, 4, (b, n, d), generator=g)
    n_visible = torch.tensor([[n, n - 7, n // 2 - 3, 5, 1, 0], [n - 1, n, 2, n // 2, 8, 3 * n // 4]])
    return dict(q=torch.randint(-15, 16, (b, s, h, d), generator=g).float(), k=keys.float(),
                w=torch.randint(-16, 17, (b, s, h), generator=g).float() / 8, n_visible=n_visible)


def e4m3_value(byte: int) -> float:
    """float8_e4m3fn by its definition (spec §3): sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
    subnormal; S.1111.111 is NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 15, byte & 7
    if exp == 15 and man == 7:
        return math.nan
    if exp == 0:
        return sign * man / 8 * 2.0 ** -6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def differences_within_a_bf16_step(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Asserts every value of `got` lies within one bf16 step (8 significant bits) of `want`, as a bf16 rounding
    that went the other way leaves it; returns where the two differ (how rarely is each test's own bound)."""
    assert (np.abs(got - want) <= np.abs(want) * 2.0 ** -7).all()
    return got != want


def assert_outputs_match(got: list[np.ndarray], want: list[np.ndarray], exact: bool) -> None:
    """Bit-exact, or max |diff| <= 1e-5 * max |reference| per output; shapes and dtypes always equal."""
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if exact:
            np.testing.assert_array_equal(g, w)
        else:
            assert np.abs(g - w).max(initial=0) <= 1e-5 * max(np.abs(w).max(initial=0), 1e-30)


def packed_rows_case(d: int = 192, rope: int = 64, rows: int = 12) -> torch.Tensor:
    """KV / indexer-key rows [2, rows, d] to pack: magnitudes 1e-3 .. 1e3 across rows, an all-zero 64-block, a -0.0,
    values that round to zero (their sign kept in the byte), values that are e4m3 subnormals at their block's scale
    (where the scale's choice shows in the values), a bf16 subnormal in the RoPE dims."""
    x = rand(2, rows, d, seed=7) * torch.logspace(-3, 3, rows)[None, :, None]
    x[0, 0, :64] = 0.0
    x[0, 1, 5] = -0.0
    x[0, 2, :4] = torch.tensor([-1e-9, 1e-9, -3e-4, 3e-4])
    x[1, 0, 8:11] = x[1, 0, :64].abs().max() * torch.tensor([1e-5, -2.3e-5, 3.1e-6])  # e4m3 subnormals of the block
    x[1, 3, d - rope] = 1e-40
    return x
