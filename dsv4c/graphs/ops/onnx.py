"""The dsv4 custom ops in ONNX: schemas, function-body fallbacks, exporter translations, ORT sessions.

Every op in `OPS` becomes a node of type `OpDef.onnx_name` in domain `dsv4` (version 1). Its inputs are the
schema's Tensor arguments in schema order, its attributes the non-tensor arguments under the same names
(bool -> INT 0/1, int -> INT, float -> FLOAT); one output `y`, except `HcPre` (y, post, comb).

A model carries, next to the custom nodes, a model-local ONNX function per op used (`attach_functions`):
ONNX Runtime runs a custom-op library's kernel when one is registered and otherwise inlines the function
body, so one file serves both. The bodies implement the reference semantics of registry.py with standard
ONNX ops, built with onnx_builder (shared with the CANN reference functions); what ORT 1.32 (CPU) supports
shaped them:
  * FP8 / FP4 weight bytes are decoded with a 256-entry lookup table (a `Constant` inside the body; a
    Cast uint8 -> FLOAT8E4M3FN converts the number instead of reinterpreting the bits, and ORT has no
    `BitCast`). The tables are built from torch's own decoding, so decoding is bit-exact.
  * fake-quant rounds with `Cast(FLOAT8E4M3FN, saturate=1)` and back (ORT rounds half-to-even, bit-exact
    with torch's cast incl. subnormals), bf16 rounding with `Cast(BFLOAT16)` (round-half-to-even too) and
    e2m1 with `Round` on the step grid (half-to-even). Power-of-two scales are 2^ceil(log2(v)) from a
    log estimate corrected by one step each way; `Pow(2, integer)` is exact in ORT.
  * attribute-dependent work (act_quant, bf16, fmt) sits in `If` branches, so an unused path is neither
    run nor shape-checked at run time; Sinkhorn iterations, Hadamard butterflies, the attention's 64-pick
    online-softmax blocks and hc_post's in-order stream sum are `Loop`s whose trip counts come from an
    attribute or a shape (never from data).
  * ORT's `Sigmoid` is an approximation; silu is written x / (1 + Exp(-x)) as torch does, so the bf16 /
    FP8 rounding after it flips less often (exactness after transcendental functions is not possible).
Fake-quant ops, Hadamard and hc_post are bit-exact with torch; the others match to float rounding (~1e-7
relative), except that a bf16 rounding right after a matmul or exp (attention probabilities, indexer scores)
lands on the other side of a rounding boundary now and then. Top-k ties (equal visible scores) are ordered
lower entry id first on both sides: ONNX TopK's rule, which the torch reference follows with a stable sort;
see `_body_indexer_topk`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from onnx.defs import OpSchema

from dsv4c.graphs.ops.onnx_builder import (
    ONNX_OPSET, Builder, Graph, branch, decode_fp4, decode_fp8, fake_quant_fp4, fake_quant_fp8, linear,
    make_function, maybe, pack_fp4_rows, pack_kv_fp8, round_bf16, round_bf16_where, silu, unpack_fp4_rows,
    unpack_kv_fp8,
)
from dsv4c.graphs.ops.registry import ATTN_BLOCK, OPS, DimMath, OpDef, like_input
from dsv4c.graphs.quant import ExpertFormat

__all__ = ["DOMAIN", "DOMAIN_VERSION", "ONNX_OPSET", "add_functions", "attach_functions", "attribute_kinds",
           "function_bodies", "function_body", "moe_experts_graph", "output_names", "register_schemas",
           "tensor_inputs", "translation_table", "write_onnx_program"]

DOMAIN = "dsv4"
DOMAIN_VERSION = 1

_FLOAT, _U8, _I64, _BF16 = "tensor(float)", "tensor(uint8)", "tensor(int64)", "tensor(bfloat16)"
# TW, TK: type constraints (an output "like:<input>" takes its input's constraint, so the same type)
_ONNX_TYPES = {"float32": _FLOAT, "uint8": _U8, "int64": _I64, "bfloat16": _BF16, "uint8|float32": "TW",
               "float32|bfloat16|uint8": "TK"}
_CONSTRAINTS = {"TW": ([_U8, _FLOAT], "expert weights: packed bytes or float"),
                "TK": ([_FLOAT, _BF16, _U8], "cache rows: float, bf16 where the values are bf16, or packed bytes")}
_ATTR_TYPES = {"bool": OpSchema.AttrType.INT, "int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT}


# ---- op signatures ---------------------------------------------------------------------------------------
def tensor_inputs(op: OpDef) -> list[str]:
    """Names of the op's Tensor arguments, in schema order (= the ONNX node's inputs)."""
    return op.tensor_inputs


def attribute_kinds(op: OpDef) -> dict[str, str]:
    """Non-tensor arguments -> 'bool' | 'int' | 'float' (= the ONNX node's attributes)."""
    kinds = {}
    for a in op.overload._schema.arguments:
        if not isinstance(a.type, torch.TensorType):
            kinds[a.name] = str(a.type)
    assert tuple(kinds) == op.attributes, f"{op.name}: schema attributes {tuple(kinds)} != {op.attributes}"
    return kinds


def output_names(op: OpDef) -> tuple[str, ...]:
    return op.outputs


# ---- schemas ---------------------------------------------------------------------------------------------
def register_schemas() -> None:
    """Register an ONNX OpSchema (with shape inference) for every dsv4 op. Idempotent.

    The exporter refuses custom nodes without a schema, and onnx.checker / shape inference use it."""
    for op in OPS.values():
        if onnx.defs.has(op.onnx_name, DOMAIN):
            continue
        types = {n: _ONNX_TYPES[t] for n, t in op.input_dtypes.items()}
        inputs = [OpSchema.FormalParameter(n, types.get(n, _FLOAT)) for n in tensor_inputs(op)]
        outputs = [OpSchema.FormalParameter(n, types[like_input(t)] if like_input(t) else _ONNX_TYPES[t])
                   for n, t in zip(output_names(op), op.output_dtypes)]
        constraints = [(c, *_CONSTRAINTS[c]) for c in sorted(set(types.values()) & set(_CONSTRAINTS))]
        attrs = [OpSchema.Attribute(n, _ATTR_TYPES[k], f"{k} argument `{n}`") for n, k in attribute_kinds(op).items()]
        schema = OpSchema(op.onnx_name, DOMAIN, DOMAIN_VERSION, op.doc, inputs=inputs, outputs=outputs,
                          type_constraints=constraints, attributes=attrs)
        schema.set_type_and_shape_inference_function(_shape_inference(op))
        onnx.defs.register_schema(schema)


def _input_dims(ctx, i: int) -> list[int | str | None] | None:
    """An input's dims (int, dim name, or None when unknown); None when even the rank is unknown."""
    t = ctx.get_input_type(i)
    if t is None or not t.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim]


def _shape_inference(op: OpDef) -> Callable:
    """Output shapes of `op` from its input shapes (symbolic dims pass through; unknowns stay unknown)."""
    names = tensor_inputs(op)

    def elem_type(ctx, dtype: str) -> int:
        if like_input(dtype):  # the input's element type (float when shape inference does not know it)
            t = ctx.get_input_type(names.index(like_input(dtype)))
            return t.tensor_type.elem_type if t is not None and t.tensor_type.elem_type else TensorProto.FLOAT
        return {"int64": TensorProto.INT64, "uint8": TensorProto.UINT8}.get(dtype, TensorProto.FLOAT)

    def infer(ctx) -> None:
        elems = [elem_type(ctx, t) for t in op.output_dtypes]
        shapes = [_input_dims(ctx, i) for i in range(ctx.get_num_inputs())]
        attrs = {}
        for name in op.attributes:
            a = ctx.get_attribute(name)
            if a is not None:
                attrs[name] = helper.get_attribute_value(a)
        try:
            outs = op.output_shapes(shapes, attrs, _InferredDims)
        except (TypeError, IndexError, KeyError, ValueError):  # unknown rank or attribute: element type only
            outs = [None] * len(output_names(op))
        for i, (dims, elem) in enumerate(zip(outs, elems)):
            ctx.set_output_type(i, helper.make_tensor_type_proto(elem, dims))

    return infer


class _InferredDims(DimMath):
    """Dims as ONNX shape inference has them: ints, dim names or None; anything not two ints is unknown."""

    @staticmethod
    def div(a, b):
        return a // b if isinstance(a, int) and isinstance(b, int) and b else None

    @staticmethod
    def min(a, b):
        return min(a, b) if isinstance(a, int) and isinstance(b, int) else None


# ---- shared pieces of the bodies ---------------------------------------------------------------------------
def _hadamard(g: Graph, x: str) -> str:
    """quant.hadamard: log2(d) butterfly stages (a+b, a-b) in a Loop, then * d**-0.5 — the same fp32
    operations in the same order as the reference, so the result is bit-exact."""
    shape = g.Shape(x)
    d = g.Shape(x, start=-1)  # [1]
    rows = g.Reshape(x, g.Concat(g.i64(-1), d, axis=0))  # [R, d]
    one = g.i64(1)
    body = g.sub()
    it, cond_in, y_in, h_in = body.fresh(), body.fresh(), body.fresh(), body.fresh()
    pairs = body.Reshape(y_in, body.Concat(body.i64(-1), body.Div(d, body.Mul(h_in, body.i64(2))),
                                           body.i64(2), h_in, axis=0))  # [R, d/2h, 2, h]
    a = body.Slice(pairs, body.i64(0), body.i64(1), body.i64(2))
    b = body.Slice(pairs, body.i64(1), body.i64(2), body.i64(2))
    y_out = body.Reshape(body.Concat(body.Add(a, b), body.Sub(a, b), axis=2), body.Concat(body.i64(-1), d, axis=0))
    h_out = body.Mul(h_in, body.i64(2))
    cond_out = body.Squeeze(body.Less(h_out, d), body.i64(0))
    loop_body = body.graph([(cond_out, TensorProto.BOOL), (y_out, TensorProto.FLOAT), (h_out, TensorProto.INT64)],
                           [(it, TensorProto.INT64, []), (cond_in, TensorProto.BOOL, []),
                            (y_in, TensorProto.FLOAT, [None, None]), (h_in, TensorProto.INT64, [1])])
    start = g.Squeeze(g.Less(one, d), g.i64(0))
    y, _ = g.Loop("", start, rows, one, body=loop_body, _outputs=2)
    # torch multiplies by the double d**-0.5 rounded to float32
    norm = g.Cast(g.Pow(g.Cast(d, to=TensorProto.DOUBLE), g.const(-0.5, np.float64)), to=TensorProto.FLOAT)
    return g.Mul(g.Reshape(y, shape), norm)


# ---- the bodies: one builder per op, (graph, inputs by name, attributes by name) -> outputs ---------------
def _body_fp8_linear(g: Graph, x, w, w_scale, act_quant):
    xq = maybe(g, act_quant, fake_quant_fp8, x)
    return [linear(g, xq, decode_fp8(g, w, w_scale))]


def _body_bf16_linear(g: Graph, x, w):
    return [linear(g, x, g.Cast(w, to=TensorProto.FLOAT))]


def _body_cache_write(g: Graph, cache, rows, slots):
    """registry.cache_write with operators TensorRT and ATC both parse: a dump row is padded on (row N), slots
    outside [0, N) are sent there, ScatterND writes every pick, and the dump row is sliced off."""
    zero = g.const(0, np.int64)
    n = g.Shape(cache, start=1, end=2)  # [1]
    padded = g.Pad(cache, g.i64(0, 0, 0, 0, 1, 0))  # zeros of the cache's own type
    outside = g.Or(g.Less(slots, zero), g.GreaterOrEqual(slots, n))
    slot = g.Where(outside, n, slots)  # [B, K]
    batch = g.Range(zero, g.Squeeze(g.Shape(cache, end=1), g.i64(0)), g.const(1, np.int64))  # [B]
    batch = g.Expand(g.Unsqueeze(batch, g.i64(1)), g.Shape(slots))  # [B, K]
    index = g.Concat(g.Unsqueeze(batch, g.i64(-1)), g.Unsqueeze(slot, g.i64(-1)), axis=-1)  # [B, K, 2]
    written = g.ScatterND(padded, index, rows)
    return [g.Slice(written, g.i64(0), n, g.i64(1))]


def _body_fp8_grouped_linear(g: Graph, x, w, w_scale, act_quant):
    xq = maybe(g, act_quant, fake_quant_fp8, x)  # [..., G, K]
    groups, k = g.Shape(x, start=-2, end=-1), g.Shape(x, start=-1)
    wg = g.Reshape(decode_fp8(g, w, w_scale), g.Concat(groups, g.i64(-1), k, axis=0))  # [G, R, K]
    y = g.MatMul(g.Unsqueeze(xq, g.i64(-2)), g.Transpose(wg, perm=[0, 2, 1]))  # [..., G, 1, R]
    return [g.Squeeze(y, g.i64(-2))]


ExpertDecoder = Callable[[Graph, str, str, str], str]  # (graph, stacked w, stacked s, used ids) -> f32 weights


def _decode_experts(g: Graph, w: str, s: str, used: str, fmt: str) -> str:
    """Experts `used` of stacked weights by format (quant.ExpertFormat). Scales are read only in their branch:
    float experts have none, and their scale input may be empty."""
    def fp4(b: Graph) -> str:
        return decode_fp4(b, b.Gather(w, used), b.Gather(s, used))

    def fp8(b: Graph) -> str:
        return decode_fp8(b, b.Gather(w, used), b.Gather(s, used))

    def dense(b: Graph) -> str:
        return b.Cast(b.Gather(w, used), to=TensorProto.FLOAT)

    is_fp4 = g.Equal(fmt, g.const(ExpertFormat.FP4, np.int64))
    is_fp8 = g.Equal(fmt, g.const(ExpertFormat.FP8, np.int64))
    return branch(g, is_fp4, fp4, lambda b: branch(b, is_fp8, fp8, dense))


def moe_experts_graph(g: Graph, x: str, weights: str, indices: str, experts: list[tuple[str, str]],
                      decode: ExpertDecoder, quantize_activation: Builder, swiglu_limit: str, act_quant: str,
                      bf16: str) -> str:
    """registry.moe_experts with standard ops; `experts` are the (weight, scale) inputs of w1, w3, w2, `decode`
    turns the used experts' stored weights into f32 and `quantize_activation` is the activation fake-quant
    applied with `act_quant` (the dsv4 body: the shipped formats and FP8 blocks; the CANN references: the SoC's
    weight formats and activation quantizers).

    Exact without a data-dependent loop. Each of the P = T*k picks is computed on its own (as the
    reference does: a repeated expert contributes twice, each rounded on its own), but the matmuls are
    dense over the E' distinct experts used: gate/up [E', T, I] once per token, down [E', P, D], then the
    pick's own expert row is gathered. Only the used experts' weights are decoded."""
    flat = g.Reshape(indices, g.i64(-1))  # [P]
    valid = g.GreaterOrEqual(flat, g.const(0, np.int64))
    used, _, local, _ = g.Unique(g.Max(flat, g.const(0, np.int64)), sorted=1, _outputs=4)  # local: [P] -> E'
    w1, w3, w2 = (decode(g, w, s, used) for w, s in experts)
    xq = maybe(g, act_quant, quantize_activation, x)  # [T, D]
    gate_all, up_all = (maybe(g, bf16, round_bf16, g.MatMul(xq, g.Transpose(e, perm=[0, 2, 1]))) for e in (w1, w3))
    # pick p = (token t, slot j) reads row [local[p], t] of the [E', T, I] results
    tokens = g.Range(g.const(0, np.int64), g.Squeeze(g.Shape(x, end=1), g.i64(0)), g.const(1, np.int64))
    tok = g.Reshape(g.Expand(g.Unsqueeze(tokens, g.i64(1)), g.Shape(indices)), g.i64(-1))  # [P]
    at = g.Concat(g.Unsqueeze(local, g.i64(1)), g.Unsqueeze(tok, g.i64(1)), axis=1)  # [P, 2]
    gate, up = g.GatherND(gate_all, at), g.GatherND(up_all, at)  # [P, I]
    limit = g.Where(g.Greater(swiglu_limit, g.const(0.0)), swiglu_limit, g.const(np.inf))
    up = g.Clip(up, g.Neg(limit), limit)
    gate = g.Min(gate, limit)
    h = g.Mul(g.Mul(silu(g, gate), up), g.Reshape(weights, g.i64(-1, 1)))
    h = maybe(g, act_quant, quantize_activation, maybe(g, bf16, round_bf16, h))
    down_all = g.MatMul(h, g.Transpose(w2, perm=[0, 2, 1]))  # [E', P, D]
    picks = g.Range(g.const(0, np.int64), g.Squeeze(g.Shape(flat), g.i64(0)), g.const(1, np.int64))
    down = g.GatherND(down_all, g.Concat(g.Unsqueeze(local, g.i64(1)), g.Unsqueeze(picks, g.i64(1)), axis=1))
    down = g.Where(g.Unsqueeze(valid, g.i64(1)), maybe(g, bf16, round_bf16, down), g.const(0.0))  # [P, D]
    per_slot = g.Reshape(down, g.Concat(g.Shape(indices), g.i64(-1), axis=0))  # [T, k, D]
    return g.ReduceSum(per_slot, g.i64(1), keepdims=0)


def _body_moe_experts(g: Graph, x, weights, indices, w1, s1, w3, s3, w2, s2, fmt, swiglu_limit, act_quant, bf16):
    def decode(b: Graph, w: str, s: str, used: str) -> str:
        return _decode_experts(b, w, s, used, fmt)

    return [moe_experts_graph(g, x, weights, indices, [(w1, s1), (w3, s3), (w2, s2)], decode, fake_quant_fp8,
                              swiglu_limit, act_quant, bf16)]


def _body_fake_quant_fp8(g: Graph, x, block):
    return [fake_quant_fp8(g, x, g.Unsqueeze(block, g.i64(0)))]


def _body_hadamard_fp4(g: Graph, x):
    return [fake_quant_fp4(g, round_bf16(g, _hadamard(g, x)))]  # the reference's Hadamard returns bf16


def _body_pack_kv_fp8(g: Graph, x, rope_dim):
    return [pack_kv_fp8(g, x, rope_dim)]


def _body_pack_fp4(g: Graph, x):
    return [pack_fp4_rows(g, x)]


def _cache_rows(g: Graph, rows: str, packed: str, unpack: Callable[[Graph], str]) -> str:
    """Cache rows as float: `unpack` where `packed` (a flag) says they are packed bytes, else widened (If: only the
    chosen branch runs)."""
    return branch(g, packed, unpack, lambda b: b.Cast(rows, to=TensorProto.FLOAT))


def _finite_or_zero(g: Graph, x: str) -> str:
    """x where finite, else 0: the softmax shift that never computes -inf - -inf (registry.sparse_attn)."""
    finite = g.Not(g.Or(g.IsInf(x), g.IsNaN(x)))
    return g.Where(finite, x, g.const(0.0))


def _body_rms_norm(g: Graph, x, weight, eps, bf16):
    """registry.rms_norm: the reference's operations in its order, x * (1 / sqrt(mean(x * x) + eps)) * weight."""
    x = round_bf16_where(g, bf16, x)
    mean_sq = g.ReduceMean(g.Mul(x, x), g.i64(-1), keepdims=1)
    return [round_bf16_where(g, bf16, g.Mul(g.Mul(x, g.Reciprocal(g.Sqrt(g.Add(mean_sq, eps)))), weight))]


def _body_head_rescale(g: Graph, x, eps, bf16):
    """registry.head_rescale: each step rounded to bf16 with `bf16`."""
    def rnd(v: str) -> str:
        return round_bf16_where(g, bf16, v)

    mean_sq = rnd(g.ReduceMean(rnd(g.Mul(x, x)), g.i64(-1), keepdims=1))
    return [rnd(g.Mul(x, rnd(g.Reciprocal(g.Sqrt(rnd(g.Add(mean_sq, eps)))))))]


def _body_rope(g: Graph, x, freqs, pos, inverse, bf16):
    """registry.rope: x viewed as [B, S, M, D] (M = the dims between, 1 if none), its trailing r dims as r/2 pairs
    [B, S, M, r/2, 2]; the same fp32 products and sums as the reference. The flags select with Where, not If
    (round_bf16_where: no control flow in a vendor bundle)."""
    d, half, lead = g.Shape(x, start=-1), g.Shape(freqs), g.Shape(x, end=2)  # [1], [1], [B, S]
    r = g.Mul(half, g.i64(2))
    rows = g.Reshape(x, g.Concat(lead, g.i64(-1), d, axis=0))  # [B, S, M, D]
    keep, split = g.Slice(rows, g.i64(0), g.Sub(d, r), g.i64(3)), g.Sub(d, r)
    pairs = g.Reshape(g.Slice(rows, split, d, g.i64(3)), g.Concat(lead, g.i64(-1), half, g.i64(2), axis=0))
    x0 = g.Slice(pairs, g.i64(0), g.i64(1), g.i64(4))  # [B, S, M, r/2, 1]
    x1 = g.Slice(pairs, g.i64(1), g.i64(2), g.i64(4))
    angle = g.Unsqueeze(g.Mul(g.Unsqueeze(g.Cast(pos, to=TensorProto.FLOAT), g.i64(-1)), freqs), g.i64(2, 4))
    sign = g.Where(g.Cast(inverse, to=TensorProto.BOOL), g.const(-1.0), g.const(1.0))  # -sin: exact
    cos, sin = g.Cos(angle), g.Mul(g.Sin(angle), sign)  # [B, S, 1, r/2, 1]
    y0 = g.Sub(g.Mul(x0, cos), g.Mul(x1, sin))
    y1 = g.Add(g.Mul(x0, sin), g.Mul(x1, cos))
    rotated = g.Reshape(g.Concat(y0, y1, axis=-1), g.Concat(lead, g.i64(-1), r, axis=0))
    y = g.Reshape(g.Concat(keep, rotated, axis=3), g.Shape(x))
    return [round_bf16_where(g, bf16, y)]


def _body_sparse_attn(g: Graph, q, kv, cmp, sink, idx, scale, bf16, kv_rope):
    """registry.sparse_attn's online softmax: idx padded with -1 picks to whole blocks of ATTN_BLOCK, then a Loop
    over the blocks (in idx order) carrying the running max, the denominator and the accumulator [B,S,H,D]; per
    block the picked rows are gathered (-1 -> row 0, masked to -inf) and P is rounded to bf16 (with `bf16`)
    for the P.V product only. After the loop the sink joins the denominator against the final max. The body
    joins the two parts of the rows (the library's kernel reads them where they are)."""
    d = g.Shape(q, start=-1)
    kv = g.Concat(kv, cmp, axis=1)
    kv = _cache_rows(g, kv, kv_rope, lambda b: unpack_kv_fp8(b, kv, d, kv_rope))  # packed when kv_rope > 0
    zero, block = g.const(0, np.int64), g.i64(ATTN_BLOCK)
    k = g.Shape(idx, start=2)  # [1]
    blocks = g.Div(g.Add(k, g.i64(ATTN_BLOCK - 1)), block)
    padding = g.Concat(g.i64(0, 0, 0, 0, 0), g.Sub(g.Mul(blocks, block), k), axis=0)
    padded = g.Pad(idx, padding, g.const(-1, np.int64))
    picks = g.Reshape(padded, g.Concat(g.Shape(idx, end=2), blocks, block, axis=0))  # [B,S,nb,64]
    heads = g.Shape(q, end=3)  # [B,S,H]

    body = g.sub()
    it, cond, max_in, denom_in, acc_in = (body.fresh() for _ in range(5))
    ids = body.Gather(picks, it, axis=2)  # [B,S,64]
    rows = body.GatherND(kv, body.Unsqueeze(body.Max(ids, zero), body.i64(-1)), batch_dims=1)  # [B,S,64,D]
    logits = body.Mul(body.MatMul(q, body.Transpose(rows, perm=[0, 1, 3, 2])), scale)  # [B,S,H,64]
    logits = body.Where(body.Unsqueeze(body.GreaterOrEqual(ids, zero), body.i64(2)), logits, body.const(-np.inf))
    new_max = body.Max(max_in, body.ReduceMax(logits, body.i64(-1), keepdims=0))
    shift = _finite_or_zero(body, new_max)
    rescale = body.Exp(body.Sub(max_in, shift))
    p = body.Exp(body.Sub(logits, body.Unsqueeze(shift, body.i64(-1))))
    denom = body.Add(body.Mul(denom_in, rescale), body.ReduceSum(p, body.i64(-1), keepdims=0))  # unrounded p
    pv = body.MatMul(maybe(body, bf16, round_bf16, p), rows)
    acc = body.Add(body.Mul(acc_in, body.Unsqueeze(rescale, body.i64(-1))), pv)
    loop_body = body.graph([(cond, TensorProto.BOOL), (new_max, TensorProto.FLOAT), (denom, TensorProto.FLOAT),
                            (acc, TensorProto.FLOAT)],
                           [(it, TensorProto.INT64, []), (cond, TensorProto.BOOL, []),
                            (max_in, TensorProto.FLOAT, [None] * 3), (denom_in, TensorProto.FLOAT, [None] * 3),
                            (acc_in, TensorProto.FLOAT, [None] * 4)])
    start = (g.Expand(g.const(-np.inf), heads), g.Expand(g.const(0.0), heads), g.Expand(g.const(0.0), g.Shape(q)))
    run_max, denom, acc = g.Loop(g.Squeeze(blocks, g.i64(0)), g.const(True, np.bool_), *start, body=loop_body,
                                 _outputs=3)
    sink_term = g.Exp(g.Sub(g.Reshape(sink, g.i64(1, 1, -1)), _finite_or_zero(g, run_max)))
    return [g.Div(acc, g.Unsqueeze(g.Add(denom, sink_term), g.i64(-1)))]


def _body_indexer_scores(g: Graph, q, k, w, bf16):
    def rounded(x: str) -> str:
        return maybe(g, bf16, round_bf16, x)

    d = g.Shape(q, start=-1)
    packed = g.Squeeze(g.Not(g.Equal(g.Shape(k, start=-1), d)), g.i64(0))  # packed FP4 rows are narrower than d
    k = _cache_rows(g, k, packed, lambda b: unpack_fp4_rows(b, k, d))
    scores = g.Relu(rounded(g.MatMul(q, g.Unsqueeze(g.Transpose(k, perm=[0, 2, 1]), g.i64(1)))))  # [B,S,h,N]
    return [rounded(g.ReduceSum(rounded(g.Mul(scores, g.Unsqueeze(w, g.i64(-1)))), g.i64(2), keepdims=0))]


def _body_indexer_topk(g: Graph, q, k, w, n_visible, topk, bf16):
    """With `bf16` the dot products, the weighted relus and the head sum are each rounded to bf16 (the
    reference's bf16 einsum, product and reduction). ONNX TopK puts the lower index first among equal scores
    (relu zeros are common once q and k are FP4, and bf16 scores tie often), the rule the torch reference
    implements with a stable descending sort: picks agree exactly, ties included, even when they straddle the
    k-th place."""
    [scores] = _body_indexer_scores(g, q, k, w, bf16)  # [B,S,N]
    n = g.Shape(k, start=1, end=2)
    entry = g.Range(g.const(0, np.int64), g.Squeeze(n, g.i64(0)), g.const(1, np.int64))
    visible = g.Unsqueeze(n_visible, g.i64(-1))
    scores = g.Where(g.GreaterOrEqual(entry, visible), g.const(-np.inf), scores)
    _, picks = g.TopK(scores, g.Min(n, g.Unsqueeze(topk, g.i64(0))), axis=-1, largest=1, sorted=1, _outputs=2)
    # picks of hidden (-inf) entries tie in an order backends disagree on: they all become -1
    return [g.Where(g.GreaterOrEqual(picks, visible), g.const(-1, np.int64), picks)]


def _body_compress_pool(g: Graph, kv, score, ends, ratio, overlap):
    c = g.Add(overlap, g.const(1, np.int64))
    span = g.Mul(ratio, c)
    last = g.Max(ends, g.Sub(span, g.const(1, np.int64)))
    offsets = g.Range(g.Sub(g.const(1, np.int64), span), g.const(1, np.int64), g.const(1, np.int64))
    rows = g.Unsqueeze(g.Add(g.Unsqueeze(last, g.i64(-1)), offsets), g.i64(-1))  # [B,K,span,1]
    d = g.Div(g.Shape(kv, start=2), g.Unsqueeze(c, g.i64(0)))  # [1]
    prev = g.Unsqueeze(g.Mul(ratio, overlap), g.i64(0))  # rows from the previous window: m with overlap, else 0
    d_prev = g.Mul(d, g.Unsqueeze(overlap, g.i64(0)))

    def candidates(t: str) -> str:
        """[B,K,span,c*d] -> [B,K,c*m,d]: previous window's rows with channels [:d], own rows [d:]."""
        gathered = g.GatherND(t, rows, batch_dims=1)
        older = g.Slice(gathered, g.i64(0, 0), g.Concat(prev, d, axis=0), g.i64(2, 3))
        own = g.Slice(gathered, g.Concat(prev, d_prev, axis=0), g.i64(2 ** 62, 2 ** 62), g.i64(2, 3))
        return g.Concat(older, own, axis=2)

    weights = g.Softmax(candidates(score), axis=2)
    pooled = g.ReduceSum(g.Mul(candidates(kv), weights), g.i64(2), keepdims=0)  # [B,K,d]
    return [g.Where(g.Unsqueeze(g.GreaterOrEqual(ends, g.const(0, np.int64)), g.i64(-1)), pooled, g.const(0.0))]


def _body_hc_pre(g: Graph, x, fn, scale, base, iters, norm_eps, hc_eps):
    bs, n = g.Shape(x, end=2), g.Shape(x, start=2, end=3)
    flat = g.Reshape(x, g.Concat(bs, g.i64(-1), axis=0))  # [B,S,nD]
    rms = g.Reciprocal(g.Sqrt(g.Add(g.ReduceMean(g.Mul(flat, flat), g.i64(-1), keepdims=1), norm_eps)))
    mix = g.Mul(linear(g, flat, fn), rms)  # [B,S,(2+n)n]
    two_n = g.Mul(n, g.i64(2))

    def part(start: str, end: str, i: int) -> str:
        sl = g.Slice(mix, start, end, g.i64(-1))
        return g.Add(g.Mul(sl, g.Gather(scale, g.const(i, np.int64))), g.Slice(base, start, end, g.i64(0)))

    pre = g.Add(g.Sigmoid(part(g.i64(0), n, 0)), hc_eps)
    post = g.Mul(g.const(2.0), g.Sigmoid(part(n, two_n, 1)))
    comb = g.Reshape(part(two_n, g.i64(2 ** 62), 2), g.Concat(bs, n, n, axis=0))
    comb = g.Add(g.Softmax(comb, axis=-1), hc_eps)
    comb = g.Div(comb, g.Add(g.ReduceSum(comb, g.i64(-2), keepdims=1), hc_eps))
    # iters - 1 further row/column passes
    body = g.sub()
    it, cond, c_in = body.fresh(), body.fresh(), body.fresh()
    c = body.Div(c_in, body.Add(body.ReduceSum(c_in, body.i64(-1), keepdims=1), hc_eps))
    c = body.Div(c, body.Add(body.ReduceSum(c, body.i64(-2), keepdims=1), hc_eps))
    loop_body = body.graph([(cond, TensorProto.BOOL), (c, TensorProto.FLOAT)],
                           [(it, TensorProto.INT64, []), (cond, TensorProto.BOOL, []),
                            (c_in, TensorProto.FLOAT, [None] * 4)])
    trips = g.Max(g.Sub(iters, g.const(1, np.int64)), g.const(0, np.int64))
    comb = g.Loop(trips, g.const(True, np.bool_), comb, body=loop_body)
    y = g.ReduceSum(g.Mul(g.Unsqueeze(pre, g.i64(-1)), x), g.i64(2), keepdims=0)
    return [y, post, comb]


def _body_hc_post(g: Graph, f, res, post, comb):
    """sum_j comb[j,k] res_j summed over j = 0, 1, ... in order, each product and sum rounded on its own as
    registry.hc_post (a MatMul would sum in its own order, with FMAs): the first term, then a Loop over j >= 1."""
    def term(b: Graph, j: str) -> str:  # [B,S,k,D] = comb[:, :, j, k] res[:, :, j]
        return b.Mul(b.Unsqueeze(b.Gather(comb, j, axis=2), b.i64(-1)), b.Unsqueeze(b.Gather(res, j, axis=2), b.i64(2)))

    body = g.sub()
    it, cond, mixed_in = body.fresh(), body.fresh(), body.fresh()
    mixed_out = body.Add(mixed_in, term(body, body.Add(it, body.const(1, np.int64))))
    loop_body = body.graph([(cond, TensorProto.BOOL), (mixed_out, TensorProto.FLOAT)],
                           [(it, TensorProto.INT64, []), (cond, TensorProto.BOOL, []),
                            (mixed_in, TensorProto.FLOAT, [None] * 4)])
    streams = g.Squeeze(g.Shape(res, start=2, end=3), g.i64(0))
    trips = g.Sub(streams, g.const(1, np.int64))
    mixed = g.Loop(trips, g.const(True, np.bool_), term(g, g.const(0, np.int64)), body=loop_body)
    return [g.Add(g.Mul(g.Unsqueeze(post, g.i64(-1)), g.Unsqueeze(f, g.i64(2))), mixed)]


_BODIES: dict[str, Callable[..., list[str]]] = {
    "fp8_linear": _body_fp8_linear,
    "bf16_linear": _body_bf16_linear,
    "cache_write": _body_cache_write,
    "fp8_grouped_linear": _body_fp8_grouped_linear,
    "moe_experts": _body_moe_experts,
    "fake_quant_fp8": _body_fake_quant_fp8,
    "hadamard_fp4": _body_hadamard_fp4,
    "rms_norm": _body_rms_norm,
    "head_rescale": _body_head_rescale,
    "rope": _body_rope,
    "sparse_attn": _body_sparse_attn,
    "pack_kv_fp8": _body_pack_kv_fp8,
    "pack_fp4": _body_pack_fp4,
    "indexer_topk": _body_indexer_topk,
    "indexer_scores": _body_indexer_scores,
    "compress_pool": _body_compress_pool,
    "hc_pre": _body_hc_pre,
    "hc_post": _body_hc_post,
}


def function_body(op: OpDef) -> onnx.FunctionProto:
    """The model-local function `dsv4.<onnx_name>` implementing `op` with standard ONNX ops."""
    return make_function(DOMAIN, op.onnx_name, tensor_inputs(op), list(output_names(op)), attribute_kinds(op),
                         _BODIES[op.name], doc=op.doc)


def function_bodies() -> list[onnx.FunctionProto]:
    """One model-local function per dsv4 op (domain dsv4, the op's ONNX name); collectives have none (they
    talk to other ranks: a target's kernel runs them)."""
    return [function_body(op) for op in OPS.values() if not op.collective]


# ---- models: attach bodies, export, run --------------------------------------------------------------------
def _used_op_types(graph: onnx.GraphProto) -> set[str]:
    """dsv4 op types used by a graph, its subgraphs included."""
    used = set()
    for node in graph.node:
        if node.domain == DOMAIN:
            used.add(node.op_type)
        for a in node.attribute:
            for sub in [a.g] if a.HasField("g") else list(a.graphs):
                used |= _used_op_types(sub)
    return used


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add (in place, and return) the function bodies of the dsv4 ops the model uses, and the dsv4 opset
    import. The model's default-domain opset must be ONNX_OPSET (the bodies are written against it)."""
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", ONNX_OPSET) != ONNX_OPSET:
        raise ValueError(f"model uses ONNX opset {opsets['']}, the dsv4 function bodies need {ONNX_OPSET}")
    if "" not in opsets:
        model.opset_import.append(helper.make_opsetid("", ONNX_OPSET))
    used = _used_op_types(model.graph)
    for f in model.functions:  # dsv4 nodes inside the exporter's own functions count too
        used |= _used_op_types(helper.make_graph(f.node, f.name, [], []))
    have = {(f.domain, f.name) for f in model.functions}
    by_name = {op.onnx_name: op for op in OPS.values()}
    add_functions(model, [function_body(by_name[t]) for t in sorted(used)
                          if t in by_name and not by_name[t].collective and (DOMAIN, t) not in have])
    return model


def add_functions(model: onnx.ModelProto, functions: Iterable[onnx.FunctionProto]) -> None:
    """Add (in place) the `functions` the model does not define yet as model-local functions, and the dsv4 opset
    import their nodes' callers need; the dsv4 bodies (attach_functions) and a target's reference functions
    (targets.onnx_bundle.emulation_session) are attached the same way."""
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    model.ir_version = max(model.ir_version, 8)  # model-local functions need IR 8
    have = {(f.domain, f.name) for f in model.functions}
    model.functions.extend(f for f in functions if (f.domain, f.name) not in have)


def translation_table() -> dict[torch._ops.OpOverload, Callable]:
    """custom_translation_table for torch.onnx.export(dynamo=True): each torch.ops.dsv4.* overload -> one
    dsv4 node. The exporter calls the translation with the FX node's arguments (ONNX values for tensors,
    Python values for the rest)."""
    import onnxscript

    register_schemas()
    opset = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)
    return {op.overload: _translation(op, getattr(opset, op.onnx_name)) for op in OPS.values()}


def _translation(op: OpDef, onnx_op) -> Callable:
    names = [a.name for a in op.overload._schema.arguments]
    kinds = attribute_kinds(op)
    casts = {"bool": int, "int": int, "float": float}

    def translate(*args, **kwargs):
        bound = dict(zip(names, args), **kwargs)
        inputs = [bound[n] for n in names if n not in kinds]
        attrs = {n: casts[k](bound[n]) for n, k in kinds.items()}
        return onnx_op(*inputs, **attrs)

    translate.__name__ = f"dsv4_{op.name}"
    return translate


def write_onnx_program(ep: torch.export.ExportedProgram, path: str | Path, *,
                       external_data: bool = True, opset: int = ONNX_OPSET,
                       with_functions: bool = True,
                       weights: Callable[[str], torch.Tensor] | None = None,
                       stored: dict[str, onnx.TensorProto] | None = None,
                       rewrite: Callable[[Any], Any] | None = None) -> onnx.ModelProto:
    """Lower an exported program to ONNX: dsv4 ops become dsv4 nodes (+ their function bodies), the rest
    goes through torch's exporter at ONNX_OPSET without the optimizer (which would fold small packed
    weights into float). Saved at `path`, weights in one `<file>.data` beside it when `external_data`.

    Returns the saved ModelProto; with external data its initializers are references (not loaded).
    What comes out (torch 2.13 / onnxscript 0.7.2):
      * inputs: the user inputs under their FX placeholder names (the forward's argument names, a nested
        tuple flattened as `cache_0`, `cache_1` ...); outputs are named after the FX nodes producing them
        (`select`, `where_2` ...): rely on positions, not on output names;
      * dynamic dims are named by the exporter's symbols (`s77`, `s27`), not by the torch.export Dim names;
      * parameters and buffers become initializers named by the exported module's state-dict paths
        (`model.layers.0.hc_attn_fn` under compiler.export's StepProgram wrapper),
        dtypes kept (uint8 stays uint8); only the larger ones go to the `.data` file, small ones stay
        inline; past 2 GB the weights go external even with external_data=False.
    `opset` below ONNX_OPSET is for toolchains that parse older opsets (TensorRT, CANN ATC); such models get no
    function bodies (the bodies are written against ONNX_OPSET), i.e. `with_functions` must be False.
    `weights` (initializer name -> tensor) supplies the values of a program exported without them (its state on
    the meta device, graphs.streamed): each is asked for while the data file is written, one at a time, so the
    weights go from the checkpoint into the file without the whole model ever being held.
    `stored` (initializer name -> an external-data TensorProto of an earlier program beside `path`): those
    initializers are not written again but refer to that file (the programs of a bundle are exported from one
    model, so a name is one buffer: prefill and decode share every weight, written and read from disk once).
    `rewrite(graph)`: a target's change to the onnx_ir graph before it is saved (its initializers' values still
    lazy where `weights` supplies them), e.g. the e8m0 scales of the CPU and TensorRT bundles
    (dsv4c.targets.e8m0_scales)."""
    if with_functions and opset != ONNX_OPSET:
        raise ValueError(f"function bodies need ONNX opset {ONNX_OPSET}; export at {opset} with_functions=False")
    import logging
    import warnings

    import onnx_ir as ir

    register_schemas()
    # torch's exporter logs a warning per absent torchvision op and a treespec deprecation: noise for our users
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(ep, dynamo=True, custom_translation_table=translation_table(), optimize=False,
                                    opset_version=opset, verbose=False)
    forget_export_trace()
    model = program.model
    relative_source_paths(model)
    drop_identity_transposes(model.graph)
    _stream_initializers(model.graph, weights)
    if rewrite is not None:
        rewrite(model.graph)
    shared = _take_stored(model.graph, stored or {})
    used = {n.op_type for n in model.graph.all_nodes() if n.domain == DOMAIN} if with_functions else set()
    # subgraphs (e.g. from torch.cond) are walked by all_nodes(); local functions of the exporter too
    for fn in list(model.functions.values()) if with_functions else []:
        used |= {n.op_type for n in fn.all_nodes() if n.domain == DOMAIN}
    by_name = {op.onnx_name: op for op in OPS.values()}
    for op_type in sorted(t for t in used if not by_name[t].collective):
        fn = ir.serde.deserialize_function(function_body(by_name[op_type]))
        model.functions[fn.identifier()] = fn
    model.opset_imports[DOMAIN] = DOMAIN_VERSION
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path, external_data=external_data)
    saved = onnx.load(path, load_external_data=False)
    own_data = path.with_name(f"{path.name}.data")
    if own_data.is_file() and own_data.stat().st_size == 0:  # every weight is an earlier program's: no file
        own_data.unlink()
    if shared:
        saved.graph.initializer.extend(shared)
        onnx.save(saved, path)
    return saved


def forget_export_trace() -> None:
    """Drop torch's reference to the graph of its last export trace. Non-strict torch.export (and the ONNX
    exporter's decomposition, which traces again) records every fake tensor's FX node in a module-level map for its
    leak check (torch.fx.experimental.proxy_tensor, torch 2.13) and clears it only at the next trace: the last
    traced graph, its nodes and their fake values stayed alive after the lowering (a GraphModule of 27.7k nodes at
    8 layers of mini-1b's shapes)."""
    from torch.fx.experimental import proxy_tensor

    getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", {}).clear()


def _take_stored(graph, stored: dict[str, onnx.TensorProto]) -> list[onnx.TensorProto]:
    """Remove from `graph` the initializers `stored` holds (checked to have the same element type and shape) and
    return the references to add to the saved model in their place."""
    taken = []
    for name in [n for n in graph.initializers if n in stored]:
        value, ref = graph.initializers[name], stored[name]
        if (ref.data_type, tuple(ref.dims)) != (value.dtype.value, tuple(value.shape)):
            raise ValueError(f"initializer {name!r} is {value.dtype} {tuple(value.shape)} here but "
                             f"{onnx.TensorProto.DataType.Name(ref.data_type)} {tuple(ref.dims)} in the program "
                             "storing it")
        graph.initializers.pop(name)
        taken.append(ref)
    return taken


def _stream_initializers(graph, weights: Callable[[str], torch.Tensor] | None) -> None:
    """Point each initializer the exporter left without values (meta tensors) at `weights`, evaluated lazily when
    the file is written; a program without weights and no source is refused, naming the first tensor."""
    import onnx_ir as ir

    for name, value in graph.initializers.items():
        held = value.const_value
        if getattr(getattr(held, "raw", None), "device", None) != torch.device("meta"):
            continue
        if weights is None:
            raise ValueError(f"initializer {name!r} has no values (the program was exported on the meta device) "
                             "and no `weights` source was given")
        value.const_value = ir.LazyTensor(_weight_reader(name, held, weights), dtype=held.dtype, shape=held.shape,
                                          name=name)


def _weight_reader(name: str, placeholder, weights: Callable[[str], torch.Tensor]) -> Callable:
    expected = (placeholder.raw.dtype, tuple(placeholder.raw.shape))

    def read():
        t = weights(name)
        if (t.dtype, tuple(t.shape)) != expected:
            raise ValueError(f"weights source gave {name!r} as {t.dtype} {tuple(t.shape)}; the program declares "
                             f"{expected[0]} {expected[1]}")
        return type(placeholder)(t.contiguous(), name=name)  # the exporter's own torch-backed tensor type
    return read


STACK_TRACE = "pkg.torch.onnx.stack_trace"
_SOURCE_ROOT = str(Path(__file__).resolve().parents[3]) + os.sep  # the directory holding the dsv4c package


def relative_source_paths(model) -> None:
    """The exporter's per-node stack traces (metadata `pkg.torch.onnx.stack_trace`, which tests/mutants.py reads
    to find nodes by their source line) name files by absolute path: the same recipe built from two checkouts
    gave different programs. Paths under the directory holding dsv4c become relative to it."""
    for graph in (model.graph, *model.functions.values()):
        for node in graph.all_nodes():
            trace = node.metadata_props.get(STACK_TRACE)
            if trace and _SOURCE_ROOT in trace:
                node.metadata_props[STACK_TRACE] = trace.replace(_SOURCE_ROOT, "")


def drop_identity_transposes(graph) -> int:
    """Remove Transpose nodes whose perm is the identity (their uses read the input instead). The exporter
    lowers `table[ids]` (aten.index) to Transpose(perm=[0, 1]) + GatherND; on an initializer, ONNX Runtime's
    constant folding then materialises the transposed copy: a second embedding table (265 MB at a 129k
    vocabulary) held by every session. Returns how many were removed."""
    import onnx_ir as ir

    removed = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        perm = node.attributes.get("perm")
        if perm is None or list(perm.value) != list(range(len(perm.value))):
            continue
        if node.outputs[0].is_graph_output():
            continue
        ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
        graph.remove(node, safe=True)
        removed += 1
    return removed
