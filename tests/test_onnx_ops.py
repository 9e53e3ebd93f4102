"""The dsv4 ops' ONNX function bodies (run by ONNX Runtime, no kernel library) against the torch references,
one single-node model per case; then torch.export -> write_onnx_program -> ORT at two shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from dsv4c.graphs import quant
from dsv4c.graphs.ops import OPS
from dsv4c.graphs.ops.onnx import (DOMAIN, ONNX_OPSET, attach_functions, attribute_kinds, output_names,
                                   register_schemas, tensor_inputs, write_onnx_program)
from dsv4c.graphs.ops.onnx_builder import fp8_table
from dsv4c.targets.base import ort_session

from tensors import (assert_outputs_match, attention_blocks, bf16_initializer, differences_within_a_bf16_step, feeds,
                     fp8_weight, indexer_grid, rand, reference, split_rows)

register_schemas()
ops = torch.ops.dsv4
_ELEM = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.uint8): onnx.TensorProto.UINT8,
         np.dtype(np.int64): onnx.TensorProto.INT64, "bfloat16": onnx.TensorProto.BFLOAT16}


def dsv4_node(name: str, attrs: dict, inputs: list[str]) -> onnx.NodeProto:
    op = OPS[name]
    onnx_attrs = {n: int(attrs[n]) if k == "bool" else attrs[n] for n, k in attribute_kinds(op).items()}
    return helper.make_node(op.onnx_name, inputs, list(output_names(op)), domain=DOMAIN, **onnx_attrs)


def single_node_model(name: str, inputs: dict[str, torch.Tensor], attrs: dict,
                      out_ranks: list[int], static: bool = False) -> onnx.ModelProto:
    """One dsv4 node with its function body attached; every input dim dynamic (the checker wants output ranks),
    or with `static` the inputs' own shapes."""
    op = OPS[name]
    names = tensor_inputs(op)
    node = dsv4_node(name, attrs, names)
    graph_inputs = [helper.make_tensor_value_info(n, _ELEM[inputs[n].numpy().dtype],
                                                  list(inputs[n].shape) if static else [None] * inputs[n].dim())
                    for n in names if inputs[n].dtype != torch.bfloat16]
    weights = [bf16_initializer(n, inputs[n]) for n in names if inputs[n].dtype == torch.bfloat16]
    out_type = {"int64": onnx.TensorProto.INT64, "uint8": onnx.TensorProto.UINT8}.get(op.output_dtypes[0],
                                                                                       onnx.TensorProto.FLOAT)
    outputs = [helper.make_tensor_value_info(n, out_type, [None] * r) for n, r in zip(output_names(op), out_ranks)]
    model = helper.make_model(helper.make_graph([node], name, graph_inputs, outputs, weights),
                              opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=10)
    attach_functions(model)
    onnx.checker.check_model(model, full_check=True)  # schema + shape inference accept the node
    return model


def run_onnx(name: str, attrs: dict, out_ranks: list[int], static: bool = False,
             **inputs: torch.Tensor) -> list[np.ndarray]:
    model = single_node_model(name, inputs, attrs, out_ranks, static)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds(inputs))


def inferred_shapes(name: str, attrs: dict, inputs: dict[str, tuple[np.dtype, list]]) -> list[list]:
    """Output shapes from the registered schema's shape inference, for input (dtype, shape) (ints or dim names)."""
    op = OPS[name]
    node = dsv4_node(name, attrs, list(inputs))
    types = {n: helper.make_tensor_type_proto(_ELEM[t] if t == "bfloat16" else _ELEM[np.dtype(t)], s)
             for n, (t, s) in inputs.items()}
    out = onnx.shape_inference.infer_node_outputs(onnx.defs.get_schema(op.onnx_name, 1, DOMAIN), node, types)
    return [[d.dim_value if d.HasField("dim_value") else d.dim_param for d in out[n].tensor_type.shape.dim]
            for n in output_names(op)]


def check(name: str, attrs: dict, *, exact: bool = False, **inputs: torch.Tensor) -> list[np.ndarray]:
    """ONNX vs torch: bit-exact, or max |diff| <= 1e-5 * max |reference| per output; and the schema's shape
    inference gives the reference's output shapes."""
    want = reference(name, attrs, **inputs)
    shapes = {n: ("bfloat16" if t.dtype == torch.bfloat16 else t.numpy().dtype, list(t.shape))
              for n, t in inputs.items()}
    assert inferred_shapes(name, attrs, shapes) == [list(w.shape) for w in want]
    got = run_onnx(name, attrs, [w.ndim for w in want], **inputs)
    assert_outputs_match(got, want, exact)
    return got


def fp4_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = quant.quantize_fp4(rand(n, k, seed=seed, scale=0.05))
    return q.view(torch.uint8), quant.e8m0_to_float(s)


def experts(fmt: int, e: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked weights [e, n, ...] in format fmt (0 FP4, 1 FP8, 2 float) and their scales."""
    if fmt == 2:
        return rand(e, n, k, seed=seed, scale=0.05), torch.zeros(e, 1, 1)  # unused
    make = fp4_weight if fmt == 0 else fp8_weight
    ws, ss = zip(*(make(n, k, seed + i) for i in range(e)))
    return torch.stack(ws), torch.stack(ss)


# ---- quantisation ops: bit-exact ----------------------------------------------------------------------------
def test_bf16_linear_reads_the_stored_weight_exactly():
    """x = I gives back the bf16 weight as float, bit for bit; a ragged case against a float64 matmul."""
    w = rand(24, 16, seed=1).to(torch.bfloat16)
    np.testing.assert_array_equal(check("bf16_linear", {}, x=torch.eye(16), w=w)[0].T, w.float().numpy())
    x, w = rand(2, 3, 200, seed=2), rand(70, 200, seed=3).to(torch.bfloat16)
    got = check("bf16_linear", {}, x=x, w=w)[0]
    exact = (x.double() @ w.double().T).numpy()  # fp32 summation: within 1e-5 of the largest output
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5 * np.abs(exact).max())


def cache_write_case() -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Two sequences, 5 rows of 3: sequence 0 writes rows 4 and 0 and skips a pick (-1); sequence 1 writes row 2
    and drops a slot past the end (5). The expected cache is written out by hand."""
    cache = torch.arange(30, dtype=torch.float32).view(2, 5, 3)
    rows = -1.0 - torch.arange(18, dtype=torch.float32).view(2, 3, 3)
    slots = torch.tensor([[4, -1, 0], [5, 2, -1]])
    want = cache.numpy().copy()
    want[0, 4], want[0, 0], want[1, 2] = rows[0, 0], rows[0, 2], rows[1, 1]
    return {"cache": cache, "rows": rows, "slots": slots}, want


def test_cache_write_writes_only_the_listed_slots():
    inputs, want = cache_write_case()
    np.testing.assert_array_equal(check("cache_write", {}, exact=True, **inputs)[0], want)


def test_fp8_decode_every_byte():
    """Decoding all 256 bytes (x = I reads the weight back) vs torch's e4m3 view; the NaN bytes 0x7f / 0xff
    would spread through the matmul, so they are checked in the table itself."""
    w = torch.arange(256, dtype=torch.uint8).view(16, 16)
    w[w & 0x7F == 0x7F] = 0
    got = run_onnx("fp8_linear", {"act_quant": False}, [2], x=torch.eye(16), w=w, w_scale=torch.ones(1, 1))[0]
    np.testing.assert_array_equal(got.T, w.view(torch.float8_e4m3fn).float().numpy())
    assert np.isnan(fp8_table()[[0x7F, 0xFF]]).all() and np.isfinite(np.delete(fp8_table(), [0x7F, 0xFF])).all()


@pytest.mark.parametrize("block", [128, 32])
def test_fake_quant_fp8(block):
    x = rand(3, 5, 256, seed=1, scale=3.0)
    x[0, 0, :block] = torch.linspace(-448, 448, block)  # scale exactly 1: round-to-nearest at every binade
    x[0, 0, 1:6] = torch.tensor([7.9, 1.97, 124.3, -15.9, 0.0019])  # round up across a power of two
    x[0, 1, :block] = x[0, 0, :block] * 2.0 ** -5  # the same, scale 2^-5
    x[1, 0, :block] = torch.linspace(-1e-3, 1e-3, block)  # tiny amax: e4m3 subnormals
    x[1, 1, :block] = 0.0  # all zero: amax clamped to 1e-4
    x[1, 2, :block] = 448.0 * 2.0 ** -3  # amax / 448 exactly a power of two (ceil keeps it)
    x[2, 0, :block] = torch.nextafter(x[1, 2, :block], torch.tensor(1e9))  # just above: next power of two
    check("fake_quant_fp8", {"block": block}, exact=True, x=x)


def test_fake_quant_fp8_scale_at_powers_of_two():
    """Block 1: scale = ceil_pow2(|x| / 448) at, just above and just below every power of two in range."""
    base = 448.0 * torch.pow(2.0, torch.arange(-15.0, 119.0))
    x = torch.cat([base, torch.nextafter(base, base * 2), torch.nextafter(base, base / 2), -1.3 * base])
    check("fake_quant_fp8", {"block": 1}, exact=True, x=x.view(-1, 1))


@pytest.mark.parametrize("d", [32, 64, 128])
def test_hadamard_fp4(d):
    """Bit-exact, with enough rows that the bf16 rounding before the FP4 step changes some elements."""
    x = rand(64, d, seed=d)
    x[0] = 0.0
    x[1, :] = torch.linspace(-6, 6, d)
    got = check("hadamard_fp4", {}, exact=True, x=x)[0]
    assert (quant.fake_quant_fp4(quant.hadamard(x), 32).numpy() != got).any()


def test_hadamard_fp4_odd_leading_dims():
    check("hadamard_fp4", {}, exact=True, x=rand(7, 64, seed=3, scale=1e-3))


# ---- linears --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_quant", [False, True])
def test_fp8_linear(act_quant):
    w, s = fp8_weight(200, 256, seed=2)  # N = 200: the last 128-row block is cropped
    check("fp8_linear", {"act_quant": act_quant}, x=rand(2, 3, 256, seed=3), w=w, w_scale=s)


def test_fp8_linear_ragged_k():
    w, s = fp8_weight(64, 200, seed=4)  # K = 200 is no multiple of 128: fine without act_quant
    check("fp8_linear", {"act_quant": False}, x=rand(5, 200, seed=5), w=w, w_scale=s)


@pytest.mark.parametrize("act_quant", [False, True])
def test_fp8_grouped_linear(act_quant):
    w, s = fp8_weight(4 * 48, 128, seed=6)
    check("fp8_grouped_linear", {"act_quant": act_quant}, x=rand(2, 3, 4, 128, seed=7), w=w, w_scale=s)


def moe_inputs(fmt: int, coarse: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """6 tokens, 3 picks each over 5 experts: repeated experts, -1 slots and a token without any expert.
    `coarse`: x and weights on coarse grids (multiples of 1/16 and 1/64), so that every matmul before the
    first rounding is exact in fp32 whatever the summation order."""
    t, d, inter, e, k = 6, 128, 128, 5, 3
    x = rand(t, d, seed=seed + 12)

    def weights(n: int, kk: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not coarse:
            return experts(fmt, e, n, kk, seed)
        w = (rand(e, n, kk, seed=seed) * 3).round().clamp(-6, 6) / 64  # few bits: exact in FP4/FP8
        if fmt == 2:
            return w, torch.zeros(e, 1, 1)
        pack = quant.quantize_fp4 if fmt == 0 else quant.quantize_fp8_blocks
        ws, ss = zip(*(pack(m) for m in w))
        return torch.stack(ws).view(torch.uint8), quant.e8m0_to_float(torch.stack(ss))

    if coarse:
        x = (x * 16).round().clamp(-32, 32) / 16
    w1, s1 = weights(inter, d, seed + 10)
    w3, s3 = weights(inter, d, seed + 20)
    w2, s2 = weights(d, inter, seed + 30)
    indices = torch.tensor([[0, 1, 2], [4, 4, 1], [3, -1, 0], [-1, -1, -1], [2, 2, 2], [1, 3, 4]])
    return dict(x=x, weights=rand(t, k, seed=seed + 11).abs(), indices=indices,
                w1=w1, s1=s1, w3=w3, s3=s3, w2=w2, s2=s2)


@pytest.mark.parametrize("fmt", [0, 1, 2])
def test_moe_experts(fmt):
    attrs = {"fmt": fmt, "swiglu_limit": 0.5 if fmt else 0.0, "act_quant": False, "bf16": False}
    y = check("moe_experts", attrs, **moe_inputs(fmt))[0]
    assert not y[3].any()  # a token without experts gets zeros


def test_moe_float_experts_without_scales():
    """model.Experts passes empty scales for float experts: the body must not touch them. (The torch reference
    indexes them anyway, s1[e], so it runs here with dummy [E, 1, 1] scales.)"""
    inputs = moe_inputs(2)
    attrs = {"fmt": 2, "swiglu_limit": 0.0, "act_quant": False, "bf16": False}
    want = reference("moe_experts", attrs, **inputs)[0]
    empty = torch.zeros(0)
    got = run_onnx("moe_experts", attrs, [2], **{**inputs, "s1": empty, "s3": empty, "s2": empty})[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("fmt", [0, 1, 2])
@pytest.mark.parametrize("act_quant,bf16", [(True, False), (False, True), (True, True)])
def test_moe_experts_rounding(fmt, act_quant, bf16):
    """With bf16 / FP8 rounding inside, ulp-level differences (silu's exp, the down projection's summation
    order) move an element across a rounding boundary now and then, so exactness is asked of nearly all
    elements, not all. Gate/up are exact by construction (coarse inputs), and a missing or misplaced
    rounding would make most elements differ."""
    inputs = moe_inputs(fmt, coarse=True)
    attrs = {"fmt": fmt, "swiglu_limit": 0.5, "act_quant": act_quant, "bf16": bf16}
    want = reference("moe_experts", attrs, **inputs)[0]
    got = run_onnx("moe_experts", attrs, [2], **inputs)[0]
    err = np.abs(got - want) / np.abs(want).max()
    assert (err <= 1e-5).mean() >= 0.99 and err.max() <= 1e-2
    unrounded = reference("moe_experts", {**attrs, "act_quant": False, "bf16": False}, **inputs)[0]
    assert (np.abs(unrounded - want) / np.abs(want).max() > 1e-5).mean() > 0.5  # the rounding matters here


# ---- attention / indexer / compressor ---------------------------------------------------------------------------
@pytest.mark.parametrize("bf16", [False, True])
def test_sparse_attn(bf16):
    b, s, h, d, n, k = 2, 5, 4, 32, 9, 6
    idx = torch.randint(0, n, (b, s, k), generator=torch.Generator().manual_seed(0))
    idx[0, 1, 3:] = -1  # partly empty
    idx[1, 2] = -1  # nothing to attend to: only the sink, output 0
    idx[1, 3] = torch.tensor([2, 2, 2, -1, 5, 5])  # repeated rows count twice
    kv, cmp = split_rows(rand(b, n, d, seed=2), 4)  # rows 4..8 are cmp's
    out = check("sparse_attn", {"kv_rope": 0, "scale": d ** -0.5, "bf16": bf16}, q=rand(b, s, h, d, seed=1),
                kv=kv, cmp=cmp, sink=rand(h, seed=3), idx=idx)[0]
    assert not out[1, 2].any()


@pytest.mark.parametrize("bf16", [False, True])
def test_sparse_attn_blocks(bf16):
    """K = 200: the body's Loop over four 64-pick blocks, with -1 picks scattered, an empty block after valid
    ones and one before any (tensors.attention_blocks; test_ort_kernels shows that this data tells a rounding
    in the wrong place, or none, from the reference's)."""
    out = check("sparse_attn", {"kv_rope": 0, "scale": 40 ** -0.5, "bf16": bf16}, **attention_blocks())[0]
    assert not out[1, 1].any()


@pytest.mark.parametrize("packed", [False, True])
def test_sparse_attn_body_with_static_shapes(packed):
    """Inputs of fixed shape (a static-shape bundle, benchmarks/ort_kernels.py): ORT infers the shapes in both
    branches of the body's If, so the unpacking branch must stay consistent on float rows it never runs (V4's
    widths: the non-RoPE dims whole blocks of 64). bf16 off: at d = 192 the reference's bf16 P rounds differently
    from the body's product order (test_sparse_attn_blocks compares that rounding at d = 40)."""
    inputs = attention_blocks(d=192)
    if packed:
        inputs.update({part: torch.ops.dsv4.pack_kv_fp8(inputs[part], 64) for part in ("kv", "cmp")})
    attrs = {"kv_rope": 64 if packed else 0, "scale": 192 ** -0.5, "bf16": False}
    want = reference("sparse_attn", attrs, **inputs)
    assert_outputs_match(run_onnx("sparse_attn", attrs, [4], static=True, **inputs), want, exact=False)


def test_sparse_attn_without_picks():
    """K = 0: the block Loop runs no iteration, the output is zeros (only the sink in the denominator)."""
    out = check("sparse_attn", {"kv_rope": 0, "scale": 0.5, "bf16": True}, q=rand(1, 2, 3, 8), kv=rand(1, 4, 8),
                cmp=rand(1, 2, 8), sink=rand(3), idx=torch.zeros(1, 2, 0, dtype=torch.int64))[0]
    assert out.shape == (1, 2, 3, 8) and not out.any()


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("topk", [4, 20])  # 20 > N: K = N
def test_indexer_topk(topk, bf16):
    b, s, h, d, n = 2, 4, 3, 16, 10
    # positive q, k, w: no relu zeros, so no ties among visible scores (tie order is unspecified)
    q, kk, w = rand(b, s, h, d, seed=1).abs(), rand(b, n, d, seed=2).abs(), rand(b, s, h, seed=3).abs()
    n_visible = torch.tensor([[10, 7, 2, 0], [1, 3, 10, 6]])  # fewer visible than k, none at all
    picks = check("indexer_topk", {"topk": topk, "bf16": bf16}, exact=True, q=q, k=kk, w=w, n_visible=n_visible)[0]
    assert (picks[0, 3] == -1).all() and (picks[1, 0, 1:] == -1).all()


@pytest.mark.parametrize("bf16", [False, True])
def test_indexer_topk_bf16_scores(bf16):
    """Integer-grid inputs (tensors.indexer_grid): exact up to the bf16 roundings, so the picks must be the
    reference's exactly, bf16 ties included; the data tells the two settings apart on several rows."""
    inputs = indexer_grid()
    attrs = {"topk": 24, "bf16": bf16}
    picks = check("indexer_topk", attrs, exact=True, **inputs)[0]
    assert (reference("indexer_topk", {**attrs, "bf16": not bf16}, **inputs)[0] != picks).any(-1).sum() >= 2


@pytest.mark.parametrize("bf16", [False, True])
def test_indexer_scores(bf16):
    """The scores alone (a tensor-parallel rank's head-partial scores, all-reduced before the top-k): integer-grid
    inputs make every step exact but the bf16 roundings, so the body must give the reference's bits; the data
    tells the two settings apart."""
    inputs = {n: t for n, t in indexer_grid().items() if n != "n_visible"}
    got = check("indexer_scores", {"bf16": bf16}, exact=True, **inputs)[0]
    assert got.shape == (2, 6, 80)
    assert (reference("indexer_scores", {"bf16": not bf16}, **inputs)[0] != got).sum() >= 10


def test_indexer_scores_random():
    q, kk, w = rand(2, 3, 4, 16, seed=1), rand(2, 9, 16, seed=2), rand(2, 3, 4, seed=3)
    check("indexer_scores", {"bf16": False}, q=q, k=kk, w=w)


@pytest.mark.parametrize("overlap", [False, True])
def test_compress_pool(overlap):
    b, length, d, ratio = 2, 24, 8, 4
    c = 2 if overlap else 1
    kv, score = rand(b, length, c * d, seed=1), rand(b, length, c * d, seed=2)
    score[:, 22:] = -torch.inf  # rows holding no token yet
    ends = torch.tensor([[3, 11, 15, 19], [23, -1, 11, -1]])  # 3 < span - 1 with overlap: clamped to span - 1
    out = check("compress_pool", {"ratio": ratio, "overlap": overlap}, kv=kv, score=score, ends=ends)[0]
    assert not out[1, 1].any() and not out[1, 3].any()


# ---- hyper-connections -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("iters", [1, 4])
def test_hc_pre(iters):
    b, s, n, d = 2, 3, 4, 16
    attrs = {"iters": iters, "norm_eps": 1e-6, "hc_eps": 1e-6}
    check("hc_pre", attrs, x=rand(b, s, n, d, seed=1), fn=rand((2 + n) * n, n * d, seed=2, scale=0.1),
          scale=rand(3, seed=3), base=rand((2 + n) * n, seed=4))


@pytest.mark.parametrize("n", [4, 3, 1])
def test_hc_post(n):
    """Bit-exact: the streams summed in order j = 0, 1, ... (a Loop from j = 1; none for one stream)."""
    b, s, d = 2, 3, 16
    check("hc_post", {}, exact=True, f=rand(b, s, d, seed=1), res=rand(b, s, n, d, seed=2),
          post=rand(b, s, n, seed=3), comb=rand(b, s, n, n, seed=4))


def test_shape_inference_keeps_symbolic_dims():
    f, u8, i64 = np.float32, np.uint8, np.int64
    assert inferred_shapes("fp8_linear", {"act_quant": True}, {"x": (f, ["B", "T", 256]), "w": (u8, [200, 256]),
                                                               "w_scale": (f, [2, 2])}) == [["B", "T", 200]]
    topk = {"q": (f, ["B", "S", 4, 64]), "k": (f, ["B", "N", 64]), "w": (f, ["B", "S", 4]),
            "n_visible": (i64, ["B", "S"])}
    assert inferred_shapes("indexer_topk", {"topk": 512, "bf16": True}, topk) == [["B", "S", ""]]  # min(512, N)
    hc = {"x": (f, ["B", "S", 4, "D"]), "fn": (f, [24, "nD"]), "scale": (f, [3]), "base": (f, [24])}
    assert inferred_shapes("hc_pre", {"iters": 20, "norm_eps": 1e-6, "hc_eps": 1e-6}, hc) == [
        ["B", "S", "D"], ["B", "S", 4], ["B", "S", 4, 4]]


def test_attach_functions_is_idempotent_and_checks_the_opset():
    inputs = {"f": torch.zeros(1, 1, 2), "res": torch.zeros(1, 1, 3, 2), "post": torch.zeros(1, 1, 3),
              "comb": torch.zeros(1, 1, 3, 3)}
    model = single_node_model("hc_post", inputs, {}, [4])
    assert len(attach_functions(model).functions) == 1  # already there: not added twice
    model.opset_import[0].version = 21
    with pytest.raises(ValueError, match="opset"):
        attach_functions(model)


@pytest.mark.parametrize("bf16", [False, True])
def test_head_rescale_body_matches_the_reference(bf16):
    """fp32: within 1e-5. bf16: ONNX Runtime's ReduceMean sums in its own order, so a mean within an fp32 ulp of a
    bf16 midpoint may round the other way: then its whole row is one bf16 step off, never more, and rarely."""
    q = rand(3, 1, 8, 128, seed=5) * torch.logspace(-2, 1, 128)
    if not bf16:
        check("head_rescale", {"eps": 1e-6, "bf16": False}, x=q)
        return
    (got,) = run_onnx("head_rescale", {"eps": 1e-6, "bf16": True}, [4], x=q)
    want = ops.head_rescale(q, 1e-6, True).numpy()
    assert differences_within_a_bf16_step(got, want).any(-1).mean() <= 0.25


@pytest.mark.parametrize("shape", [(3, 64), (2, 1, 4, 128), (1, 7, 4096)])
def test_rms_norm_body_matches_the_reference(shape):
    x = rand(*shape, seed=5) * torch.logspace(-2, 2, shape[-1])
    w = rand(shape[-1], seed=6)
    check("rms_norm", {"eps": 1e-6, "bf16": False}, x=x, weight=w)
    # an all-zero row: eps keeps it finite (zeros out)
    (got,) = run_onnx("rms_norm", {"eps": 1e-6, "bf16": False}, [2], x=torch.zeros(2, 64), weight=w[:64])
    assert not got.any()
    # bf16 in and out: ReduceMean's own summation order may move a value one bf16 step, rarely
    (got,) = run_onnx("rms_norm", {"eps": 1e-6, "bf16": True}, [len(shape)], x=x, weight=w)
    assert differences_within_a_bf16_step(got, ops.rms_norm(x, w, 1e-6, True).numpy()).mean() < 0.01


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 4, 192), (2, 3, 128)])
def test_rope_body_matches_the_reference(shape, inverse):
    """Heads [B, S, H, D] and KV rows [B, S, D]; positions up to 65536. Cos and Sin are ONNX Runtime's, not
    torch's: within 1e-5 of the largest value in float, and rounded to bf16 a value may land one bf16 step away
    (its float lay within an fp32 ulp of a rounding midpoint), never further."""
    from dsv4c.graphs.config import preset
    from dsv4c.graphs.model import rope_frequencies

    freqs = rope_frequencies(preset("tiny"), yarn=True)
    x, pos = rand(*shape, seed=3), torch.tensor([[0, 5, 77], [1000, 3, 65536]])
    check("rope", {"inverse": inverse, "bf16": False}, x=x, freqs=freqs, pos=pos)
    (got,) = run_onnx("rope", {"inverse": inverse, "bf16": True}, [len(shape)], x=x, freqs=freqs, pos=pos)
    assert differences_within_a_bf16_step(got, ops.rope(x, freqs, pos, inverse, True).numpy()).mean() < 0.01
    assert np.array_equal(got[..., :shape[-1] - 64], x[..., :shape[-1] - 64].to(torch.bfloat16).float().numpy())


def test_exporting_and_lowering_keep_no_traced_graph_alive(tmp_path):
    """After torch.export and write_onnx_program, with the program dropped, no FX GraphModule is left in the
    process (torch keeps its last trace's nodes for its leak check unless forget_export_trace drops them). Run in a
    fresh interpreter: graphs of other tests must not count."""
    import subprocess
    import sys

    script = f"""
import gc, torch
from dsv4c.graphs.ops.onnx import write_onnx_program
class M(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x @ x.transpose(0, 1)).sum(-1)
x = torch.ones(3, 4)
ep = torch.export.export(M(), (x,), dynamic_shapes=({{0: torch.export.Dim("n", min=2, max=8)}},), strict=False)
write_onnx_program(ep, {str(tmp_path / "m.onnx")!r})
del ep
gc.collect()
print(sum(isinstance(o, torch.fx.GraphModule) for o in gc.get_objects()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "0", out


def test_every_op_has_a_test():
    tested = {"fp8_linear", "bf16_linear", "cache_write", "fp8_grouped_linear", "moe_experts", "fake_quant_fp8",
              "hadamard_fp4", "sparse_attn", "indexer_topk", "indexer_scores", "compress_pool", "hc_pre", "hc_post",
              "rope", "rms_norm", "head_rescale", "pack_kv_fp8", "pack_fp4"}
    # collectives have no ONNX body: their kernels are tested across processes (tests/test_mesh_runtime.py)
    collectives = {name for name, op in OPS.items() if op.collective}
    assert collectives == {"all_reduce", "all_gather"}
    assert set(OPS) == tested | collectives


# ---- a whole program: torch.export -> write_onnx_program -> ORT at two shapes -------------------------------
class Tiny(torch.nn.Module):
    """A few dsv4 ops on a [B, T, 128] input, FP8 weight and a sink as buffers."""

    def __init__(self):
        super().__init__()
        w, s = fp8_weight(128, 128, seed=9)
        self.register_buffer("w", w)
        self.register_buffer("w_scale", s)
        self.register_buffer("sink", rand(2, seed=8))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # rounding ops only on exact inputs: a matmul's last-bit differences before them could flip a step
        # (so no bf16 probabilities in the attention)
        h = ops.fp8_linear(ops.fake_quant_fp8(x, 64), self.w, self.w_scale, True)  # [B, T, 128]
        q = h.view(h.shape[0], h.shape[1], 2, 64)
        kv = h[..., :64]
        return ops.sparse_attn(q, kv, kv[:, :0], self.sink, idx, 0.125, False, 0) + 1.0  # no compressed rows


def test_write_onnx_program_dynamic_shapes(tmp_path):
    model = Tiny().eval()
    batch, seq = torch.export.Dim("batch", max=8), torch.export.Dim("seq", max=64)
    ep = torch.export.export(model, (rand(2, 5, 128), torch.zeros(2, 5, 3, dtype=torch.int64)),
                             dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), strict=False)
    path = tmp_path / "tiny.onnx"
    proto = write_onnx_program(ep, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "tiny.onnx.data"]
    assert {f.name for f in proto.functions} == {"Fp8Linear", "FakeQuantFp8", "SparseAttn"}
    weight = next(i for i in proto.graph.initializer if i.name == "w")  # buffers keep their state-dict names
    assert weight.data_type == onnx.TensorProto.UINT8 and weight.data_location == onnx.TensorProto.EXTERNAL
    onnx.checker.check_model(path, full_check=True)
    session = ort_session(path, threads=2)
    names = [i.name for i in session.get_inputs()]
    for b, t, seed in ((1, 7, 1), (3, 19, 2)):
        x = rand(b, t, 128, seed=seed)
        idx = torch.randint(-1, t, (b, t, 3), generator=torch.Generator().manual_seed(seed))
        want = model(x, idx).numpy()
        got = session.run(None, dict(zip(names, (x.numpy(), idx.numpy()))))[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


class TableLookup(torch.nn.Module):
    """`table[ids]` on a bf16 buffer, as the model's embedding and hash-routing lookups are written."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", rand(4096, 64, seed=3).to(torch.bfloat16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids].float()


def test_table_lookup_keeps_one_copy_of_the_table(tmp_path):
    """The exporter writes `table[ids]` as an identity Transpose of the table + GatherND; ONNX Runtime folds a
    Transpose of an initializer into a second copy of it in every session (265 MB per session for a 129k x 1024
    embedding). The written program reads the table itself, and the lookups are still the table's rows."""
    model = TableLookup().eval()
    ep = torch.export.export(model, (torch.zeros(2, 3, dtype=torch.int64),),
                             dynamic_shapes=({0: torch.export.Dim("b", max=8), 1: torch.export.Dim("t", max=64)},),
                             strict=False)
    proto = write_onnx_program(ep, tmp_path / "lookup.onnx")
    assert not [n for n in proto.graph.node if n.op_type == "Transpose"]
    consumers = [n.op_type for n in proto.graph.node if "table" in n.input]
    assert consumers and "Transpose" not in consumers
    ids = np.array([[0, 4095, 7], [7, 1, 2]], dtype=np.int64)
    got = ort_session(tmp_path / "lookup.onnx").run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, model.table.float().numpy()[ids])


@pytest.mark.slow
def test_tiny_model_matches_torch(tmp_path):
    """The `tiny` preset's prefill program (random weights, plain numerics: no rounding to flip) through
    write_onnx_program, at two batch/length shapes: logits and every cache output."""
    from dsv4c.compiler.export import export_program as torch_export
    from dsv4c.graphs.config import preset
    from dsv4c.graphs.model import DeepseekV4, Numerics

    model = DeepseekV4(preset("tiny"), Numerics.plain()).eval()
    gen = torch.Generator().manual_seed(0)
    for name, b in model.named_buffers():
        if b.dtype == torch.uint8:  # random FP8 / FP4 bytes without the e4m3 NaN codes
            b.copy_(torch.randint(0, 256, b.shape, generator=gen, dtype=torch.int32).to(torch.uint8))
            b[(b & 0x7F) == 0x7F] = 0
        elif b.is_floating_point() and b.numel():
            b.copy_(torch.full(b.shape, 2.0 ** -6) if "scale" in name and b.dim() >= 2 else
                    torch.randn(b.shape, generator=gen) * 0.05)
    max_seq = 64
    write_onnx_program(torch_export(model, "prefill", 2, max_seq), tmp_path / "prefill.onnx")
    session = ort_session(tmp_path / "prefill.onnx", threads=2)
    names = [i.name for i in session.get_inputs()]
    for batch, length in ((1, 9), (2, 20)):
        tokens = torch.randint(2, model.cfg.vocab_size, (batch, length), generator=gen)
        args = (tokens, torch.zeros(batch, dtype=torch.long), torch.full((batch,), length))
        cache = model.new_cache(batch, max_seq)
        with torch.no_grad():
            logits, new_cache = model(*args, cache)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, (*args, *cache))})
        for g, w in zip(got, (logits, *new_cache)):
            w = w.numpy()
            finite = np.isfinite(w)  # score state rows hold -inf where no token is yet
            np.testing.assert_array_equal(g[~finite], w[~finite])
            g, w = g[finite], w[finite]
            assert np.abs(g - w).max(initial=0) <= 1e-5 * max(np.abs(w).max(initial=0), 1e-30)


class _TwoHeads(torch.nn.Module):
    """y = (x @ W) @ P (prefill) or (x @ W) @ D (decode): a shared weight and one of each program's own."""

    def __init__(self, decode: bool):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(64, 32, generator=gen))
        self.register_buffer("p", torch.randn(32, 32, generator=gen))
        self.register_buffer("d", torch.randn(32, 32, generator=gen))
        self.decode = decode

    def forward(self, x):
        return (x @ self.w) @ (self.d if self.decode else self.p)


def test_a_bundles_programs_store_each_weight_once_and_still_run(tmp_path):
    """export_bundle_programs(share=True): decode's initializers that prefill stores refer to prefill's data file
    (never written twice), decode's data file holds only what prefill lacks, and both run as before."""
    from dsv4c.targets.onnx_bundle import export_bundle_programs

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    heads = {name: _TwoHeads(decode=name == "decode") for name in ("prefill", "decode")}
    programs = {name: torch.export.export(m, (x,)) for name, m in heads.items()}
    files = export_bundle_programs(programs, tmp_path, share=True)

    assert (tmp_path / "prefill.onnx.data").stat().st_size == (64 + 32) * 32 * 4  # w and p (d is not used)
    assert (tmp_path / "decode.onnx.data").stat().st_size == 32 * 32 * 4  # only d: w is prefill's
    decode = onnx.load(tmp_path / files["decode"], load_external_data=False)
    w = next(t for t in decode.graph.initializer if t.name == "w")
    assert {e.key: e.value for e in w.external_data}["location"] == "prefill.onnx.data"
    for name, m in heads.items():
        session = ort.InferenceSession(str(tmp_path / files[name]), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0],
                                   m(x).numpy(), rtol=1e-5, atol=1e-5)


def test_a_stored_weight_of_another_shape_is_refused_by_name(tmp_path):
    from dsv4c.graphs.ops.onnx import write_onnx_program

    x = torch.randn(3, 64)
    first = write_onnx_program(torch.export.export(_TwoHeads(False), (x,)), tmp_path / "prefill.onnx")
    stored = {t.name: t for t in first.graph.initializer}
    stored["w"].dims[:] = [32, 64]
    with pytest.raises(ValueError, match="initializer 'w' is FLOAT"):
        write_onnx_program(torch.export.export(_TwoHeads(True), (x,)), tmp_path / "decode.onnx", stored=stored)


# ---- packed cache rows ------------------------------------------------------------------------------------------
def test_pack_bodies_write_the_references_bytes():
    """PackKvFp8 / PackFp4 bodies (codes counted against the sorted format tables, bf16 bits from sign, exponent
    and mantissa: ONNX Runtime has no BitCast) give the reference's bytes exactly, signed zeros and a bf16
    subnormal included."""
    from tensors import packed_rows_case

    x = packed_rows_case()
    check("pack_kv_fp8", {"rope_dim": 64}, exact=True, x=x)
    check("pack_fp4", {}, exact=True, x=x[..., :128])


def test_attention_and_indexer_bodies_read_packed_rows():
    """SparseAttn with kv_rope > 0 and the indexer bodies on narrower (packed FP4) keys unpack the rows (If: only
    that branch runs) and agree with the reference, which reads the same rows."""
    from tensors import attention_blocks, packed_rows_case

    inputs = attention_blocks(d=192)
    check("sparse_attn", {"kv_rope": 64, "scale": 192 ** -0.5, "bf16": True},
          **{**inputs, **{part: torch.ops.dsv4.pack_kv_fp8(inputs[part], 64) for part in ("kv", "cmp")}})
    keys = torch.ops.dsv4.pack_fp4(packed_rows_case(d=128)[:, :, :128])
    q, w = rand(2, 3, 4, 128, seed=1).round(), rand(2, 3, 4, seed=2)  # integer q: exact dot products
    check("indexer_scores", {"bf16": True}, exact=True, q=q, k=keys, w=w)
    check("indexer_topk", {"topk": 5, "bf16": True}, exact=True, q=q, k=keys, w=w,
          n_visible=torch.tensor([[3, 7, 12], [12, 1, 0]]))
