"""Building ONNX function bodies with standard ops: a small graph builder and the number-format steps.

Both sets of model-local ONNX functions dsv4c writes are built here: the dsv4 ops' bodies
(dsv4c.graphs.ops.onnx) and the CANN operators' CPU references (dsv4c.targets.cann.reference). Sharing the
rounding steps (FP8 / e2m1 / bf16 casts, power-of-two scales, weight decoding) keeps both bit-identical to
each other and to dsv4c.graphs.quant; why each step is written the way it is (what ONNX Runtime's CPU kernels
round exactly) is said in dsv4c.graphs.ops.onnx's module doc.

    g = Graph()
    y = g.MatMul(x, g.Transpose(w, perm=[1, 0]))   # appends a node, returns its output name
    fn = make_function("dsv4", "MyOp", ["x", "w"], ["y"], {}, lambda g, x, w: [...])
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from dsv4c.graphs import quant

ONNX_OPSET = 23  # default-domain opset the function bodies are written against (and exported models use)
ONNX_DOMAIN = "ai.onnx"  # the default domain spelled out ("" means the same); ATC needs it explicit
STANDARD_DOMAINS = ("", ONNX_DOMAIN)

Builder = Callable[["Graph", str], str]  # a step of a body: (graph, value) -> value


class Graph:
    """Nodes of one function body or subgraph. `g.MatMul(a, b)` appends a node and returns its output name
    (a list with `_outputs=n`). Names come from a counter shared with subgraphs, so they never collide."""

    def __init__(self, counter: itertools.count | None = None):
        self.counter = counter or itertools.count()
        self.nodes: list[onnx.NodeProto] = []

    def fresh(self) -> str:
        return f"_v{next(self.counter)}"

    def __getattr__(self, op_type: str) -> Callable:
        if not op_type[:1].isupper():
            raise AttributeError(op_type)

        def make(*inputs: str, _outputs: int = 1, **attrs):
            outs = [self.fresh() for _ in range(_outputs)]
            self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
            return outs[0] if _outputs == 1 else outs

        return make

    def const(self, value, dtype=np.float32) -> str:
        return self.Constant(value=numpy_helper.from_array(np.asarray(value, dtype)))

    def i64(self, *values: int) -> str:
        """1-D int64 constant (axes, shapes, starts ...)."""
        return self.const(list(values), np.int64)

    def attr(self, name: str, kind: str) -> str:
        """A scalar tensor holding the function's attribute `name` (int64 for int/bool, float32 for float)."""
        ref = AttributeProto(name="value_float" if kind == "float" else "value_int", ref_attr_name=name,
                             type=AttributeProto.FLOAT if kind == "float" else AttributeProto.INT)
        out = self.fresh()
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(ref)
        self.nodes.append(node)
        return out

    def sub(self) -> "Graph":
        return Graph(self.counter)

    def graph(self, outputs: list[tuple[str, int]], inputs: list[tuple[str, int, list | None]] = ()) -> onnx.GraphProto:
        """Close a subgraph: outputs are (value, elem type), each copied so the subgraph produces it; inputs
        are (name, elem type, shape) — ORT's Loop wants the shapes of its body's inputs (rank at least)."""
        outs = [(self.Identity(v), t) for v, t in outputs]
        return helper.make_graph(self.nodes, "body", [helper.make_tensor_value_info(*i) for i in inputs],
                                 [helper.make_tensor_value_info(n, t, None) for n, t in outs])


def make_function(domain: str, name: str, inputs: list[str], outputs: list[str], attributes: dict[str, str],
                  body: Callable[..., list[str]], doc: str | None = None) -> onnx.FunctionProto:
    """The model-local function `domain.name` whose nodes `body(g, *inputs, **attributes)` builds: `attributes`
    maps each attribute to its kind ('bool' | 'int' | 'float'), and the body gets it as a scalar tensor."""
    g = Graph()
    values = body(g, *inputs, **{a: g.attr(a, kind) for a, kind in attributes.items()})
    nodes = g.nodes + [helper.make_node("Identity", [v], [o]) for v, o in zip(values, outputs)]
    return helper.make_function(domain, name, list(inputs), list(outputs), nodes,
                                [helper.make_opsetid("", ONNX_OPSET)], attributes=list(attributes), doc_string=doc)


# ---- control flow -------------------------------------------------------------------------------------------
def branch(g: Graph, flag: str, then: Callable[[Graph], str], otherwise: Callable[[Graph], str],
           elem: int = TensorProto.FLOAT) -> str:
    """If(flag != 0): run only the chosen builder (the other branch may not even be shape-valid)."""
    cond = g.Cast(flag, to=TensorProto.BOOL)
    branches = []
    for build in (then, otherwise):
        s = g.sub()
        branches.append(s.graph([(build(s), elem)]))
    return g.If(cond, then_branch=branches[0], else_branch=branches[1])


def maybe(g: Graph, flag: str, fn: Builder, x: str) -> str:
    """fn(x) if flag else x."""
    return branch(g, flag, lambda s: fn(s, x), lambda s: x)


def round_bf16_where(g: Graph, flag: str, x: str) -> str:
    """round_bf16(x) if flag else x, selected by Where instead of If: both are computed, and a body inlined into a
    TensorRT or CANN bundle (registry.vendor_native) keeps no control flow."""
    return g.Where(g.Cast(flag, to=TensorProto.BOOL), round_bf16(g, x), x)


# ---- weight decoding ----------------------------------------------------------------------------------------
def fp8_table() -> np.ndarray:
    """float32 value of every e4m3fn byte (incl. NaN at 0x7f/0xff), decoded by torch: bit-exact."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def fp4_table() -> np.ndarray:
    """[256, 2]: the two e2m1 values of every byte, low nibble first (quant.unpack_fp4's order)."""
    return quant.unpack_fp4(torch.arange(256, dtype=torch.uint8)[:, None]).numpy()


def decode_fp8(g: Graph, w: str, s: str) -> str:
    """uint8 e4m3 bits [..., N, K] * f32 scales [..., ceil(N/128), ceil(K/128)] -> f32 [..., N, K]."""
    block = quant.FP8_BLOCK
    values = g.Gather(g.const(fp8_table()), g.Cast(w, to=TensorProto.INT32))
    blocks = g.Expand(g.Unsqueeze(s, g.i64(-3, -1)), g.i64(1, block, 1, block))  # [..., nb, 128, kb, 128]
    full = g.Reshape(blocks, g.Concat(g.Shape(s, end=-2), g.Mul(g.Shape(s, start=-2), g.i64(block)), axis=0))
    scale = g.Slice(full, g.i64(0, 0), g.Shape(w, start=-2), g.i64(-2, -1))  # crop the padded last blocks
    return g.Mul(values, scale)


def decode_fp4(g: Graph, w: str, s: str) -> str:
    """uint8 packed e2m1 [..., N, K/2] * f32 scales [..., N, K/32] -> f32 [..., N, K]."""
    pairs = g.Gather(g.const(fp4_table()), g.Cast(w, to=TensorProto.INT32))  # [..., N, K/2, 2]
    values = g.Reshape(pairs, g.Concat(g.Shape(w, end=-1), g.i64(-1), axis=0))
    scale = g.Expand(g.Unsqueeze(s, g.i64(-1)), g.i64(quant.FP4_BLOCK))  # [..., N, K/32, 32]
    scale = g.Reshape(scale, g.Concat(g.Shape(s, end=-1), g.i64(-1), axis=0))
    return g.Mul(values, scale)


def e8m0_value(g: Graph, byte: str) -> str:
    """e8m0 scale bytes -> f32 2^(byte - bias), exactly (`Pow(2, integer)` is exact in ORT)."""
    return g.Pow(g.const(2.0), g.Sub(g.Cast(byte, to=TensorProto.FLOAT), g.const(float(quant.E8M0_BIAS))))


# ---- rounding and fake quantization -------------------------------------------------------------------------
def ceil_pow2(g: Graph, v: str) -> str:
    """Smallest power of two >= v (v > 0 finite), exactly: a log2 estimate fixed by one step each way."""
    e = g.Ceil(g.Mul(g.Log(v), g.const(1 / math.log(2))))
    p = g.Pow(g.const(2.0), e)  # exact for integer exponents
    p = g.Where(g.Less(p, v), g.Mul(p, g.const(2.0)), p)
    half = g.Mul(p, g.const(0.5))
    return g.Where(g.GreaterOrEqual(half, v), half, p)


def blocked_fake_quant(g: Graph, x: str, block: str, quantize: Builder, qmax: float, amax_min: float) -> str:
    """Fake-quant along the last dim in blocks (`block`: an int64 [1] value): scale = ceil_pow2(max(amax,
    amax_min) / qmax) per block, y = quantize(x / scale) * scale (quant.fake_quant_fp8 / fake_quant_fp4)."""
    xb = blocks_of(g, x, block)
    scale = block_scales(g, xb, qmax, amax_min)
    return g.Reshape(g.Mul(quantize(g, g.Div(xb, scale)), scale), g.Shape(x))


def blocks_of(g: Graph, x: str, block: str) -> str:
    """x [..., K] -> [..., K/block, block] (`block`: an int64 [1] value)."""
    return g.Reshape(x, g.Concat(g.Shape(x, end=-1), g.i64(-1), block, axis=0))


def block_scales(g: Graph, xb: str, qmax: float, amax_min: float) -> str:
    """quant.block_scales: ceil_pow2(max(amax, amax_min) / qmax) per block of the last dim, kept as a dim of 1."""
    amax = g.Max(g.ReduceMax(g.Abs(xb), g.i64(-1), keepdims=1), g.const(amax_min))
    return ceil_pow2(g, g.Div(amax, g.const(qmax)))


def round_fp8(g: Graph, x: str) -> str:
    """Clamp to ±448, round to e4m3fn (half-to-even) and back."""
    x = g.Clip(x, g.const(-quant.FP8_MAX), g.const(quant.FP8_MAX))
    return g.Cast(g.Cast(x, to=TensorProto.FLOAT8E4M3FN, saturate=1), to=TensorProto.FLOAT)


def round_e2m1(g: Graph, x: str) -> str:
    """quant.fake_quant_fp4's e2m1 rounding: |x| clamped to 6 rounded half-to-even on the grid (step .5 / 1 / 2),
    sign kept (also of -0.0: 1/x < 0 tells it apart)."""
    mag = g.Min(g.Abs(x), g.const(quant.FP4_MAX))
    step = g.Where(g.Less(mag, g.const(2.0)), g.const(0.5),
                   g.Where(g.Less(mag, g.const(4.0)), g.const(1.0), g.const(2.0)))
    q = g.Min(g.Mul(g.Round(g.Div(mag, step)), step), g.const(quant.FP4_MAX))
    return g.Where(negative(g, x), g.Neg(q), q)


def negative(g: Graph, v: str) -> str:
    """v < 0, -0.0 included (1 / -0.0 = -inf): the sign bit."""
    return g.Less(g.Reciprocal(v), g.const(0.0))


def round_bf16(g: Graph, x: str) -> str:
    """Round to bf16 (half-to-even) and back to f32."""
    return g.Cast(g.Cast(x, to=TensorProto.BFLOAT16), to=TensorProto.FLOAT)


def fake_quant_fp8(g: Graph, x: str, block: str | None = None) -> str:
    """quant.fake_quant_fp8: e4m3 in blocks of `block` (default FP8_BLOCK) along the last dim."""
    block = block or g.i64(quant.FP8_BLOCK)
    return blocked_fake_quant(g, x, block, round_fp8, quant.FP8_MAX, 1e-4)


def fake_quant_fp4(g: Graph, x: str) -> str:
    """quant.fake_quant_fp4: e2m1 in blocks of FP4_BLOCK along the last dim."""
    return blocked_fake_quant(g, x, g.i64(quant.FP4_BLOCK), round_e2m1, quant.FP4_MAX, quant.FP4_MAX * 2.0 ** -126)


# ---- arithmetic ---------------------------------------------------------------------------------------------
def silu(g: Graph, x: str) -> str:
    """x / (1 + exp(-x)), torch's formula: agrees with F.silu on ~96% of floats (ORT's x * Sigmoid(x),
    an approximation, on ~40%), so rounding that follows flips less often."""
    return g.Div(x, g.Add(g.Exp(g.Neg(x)), g.const(1.0)))


def linear(g: Graph, x: str, w: str) -> str:
    """F.linear without bias: x [..., K] @ w[..., N, K]^T."""
    return g.MatMul(x, g.Transpose(w, perm=[1, 0]))


# ---- packed cache rows (quant.pack_kv_fp8 / pack_fp4_rows) ------------------------------------------------------
# ONNX Runtime has no BitCast, so the bodies take bytes apart and put them together arithmetically: a byte's value
# by table (e4m3, e2m1), a bf16's from its sign, exponent and mantissa fields, and a value's code by counting the
# sorted table entries below it (exact: every packed value is on the format's grid already).
def _code_of(g: Graph, x: str, rounding: Builder, magnitudes: np.ndarray, sign_bit: int) -> str:
    """The code (int64) of x rounded to a format's grid: sign_bit if x is negative (a value that rounds to zero
    keeps its sign, as torch's casts do) + the index of the rounded |x| among the format's sorted non-negative
    magnitudes (= how many of them are smaller)."""
    below = g.Less(g.const(magnitudes), g.Unsqueeze(g.Abs(rounding(g, x)), g.i64(-1)))
    index = g.ReduceSum(g.Cast(below, to=TensorProto.INT64), g.i64(-1), keepdims=0)
    return g.Add(index, g.Where(negative(g, x), g.const(sign_bit, np.int64), g.const(0, np.int64)))


def e8m0_byte(g: Graph, scale: str) -> str:
    """A power-of-two scale's e8m0 byte (int64): log2 rounded to the integer it is, plus the bias."""
    e = g.Round(g.Mul(g.Log(scale), g.const(1 / math.log(2))))
    return g.Cast(g.Add(e, g.const(float(quant.E8M0_BIAS))), to=TensorProto.INT64)


def _bf16_bits(g: Graph, x: str) -> str:
    """The 16 bits (int64) of round_bf16(x): sign << 15 | exponent << 7 | mantissa (subnormals: exponent 0, mantissa
    |v| / 2^-133; infinities 0x7f80; NaN 0x7fc0)."""
    v = round_bf16(g, x)
    mag = g.Abs(v)
    p = g.Pow(g.const(2.0), g.Floor(g.Mul(g.Log(mag), g.const(1 / math.log(2)))))  # 2^floor(log2), fixed below
    p = g.Where(g.Greater(p, mag), g.Mul(p, g.const(0.5)), p)
    p = g.Where(g.LessOrEqual(g.Mul(p, g.const(2.0)), mag), g.Mul(p, g.const(2.0)), p)
    normal = g.GreaterOrEqual(mag, g.const(2.0 ** -126))
    exponent = g.Where(normal, g.Add(g.Round(g.Mul(g.Log(p), g.const(1 / math.log(2)))), g.const(127.0)),
                       g.const(0.0))
    mantissa = g.Where(normal, g.Mul(g.Sub(g.Div(mag, p), g.const(1.0)), g.const(128.0)),
                       g.Div(mag, g.const(2.0 ** -133)))
    bits = g.Add(g.Mul(exponent, g.const(128.0)), mantissa)
    bits = g.Where(g.IsInf(mag), g.const(float(0x7F80)), bits)
    bits = g.Where(g.IsNaN(v), g.const(float(0x7FC0)), bits)
    bits = g.Add(bits, g.Where(negative(g, v), g.const(float(0x8000)), g.const(0.0)))  # NaN: 1/NaN < 0 is false
    return g.Cast(bits, to=TensorProto.INT64)


def _bf16_from_bytes(g: Graph, lo: str, hi: str) -> str:
    """float32 value of the bf16 whose little-endian bytes are lo, hi (uint8)."""
    lo, hi = g.Cast(lo, to=TensorProto.FLOAT), g.Cast(hi, to=TensorProto.FLOAT)
    negative = g.GreaterOrEqual(hi, g.const(128.0))
    top = g.Sub(hi, g.Where(negative, g.const(128.0), g.const(0.0)))  # exponent's upper 7 bits
    low_exp = g.Floor(g.Div(lo, g.const(128.0)))
    exponent = g.Add(g.Mul(top, g.const(2.0)), low_exp)
    mantissa = g.Sub(lo, g.Mul(low_exp, g.const(128.0)))
    normal = g.Mul(g.Add(mantissa, g.const(128.0)), g.Pow(g.const(2.0), g.Sub(exponent, g.const(134.0))))
    value = g.Where(g.Equal(exponent, g.const(0.0)), g.Mul(mantissa, g.const(2.0 ** -133)), normal)
    special = g.Where(g.Equal(mantissa, g.const(0.0)), g.const(np.inf), g.const(np.nan))
    value = g.Where(g.Equal(exponent, g.const(255.0)), special, value)
    return g.Where(negative, g.Neg(value), value)


def _flat_last2(g: Graph, x: str) -> str:
    return g.Reshape(x, g.Concat(g.Shape(x, end=-2), g.i64(-1), axis=0))


def pack_kv_fp8(g: Graph, x: str, rope: str) -> str:
    """quant.pack_kv_fp8: x [..., D] float, rope an int64 scalar -> uint8 [..., kv_row_bytes(D, rope)]."""
    d = g.Shape(x, start=-1)
    r = g.Unsqueeze(rope, g.i64(0))
    nope = g.Sub(d, r)
    xb = blocks_of(g, g.Slice(x, g.i64(0), nope, g.i64(-1)), g.i64(quant.KV_SCALE_BLOCK))  # [..., n/64, 64]
    scale = block_scales(g, xb, quant.FP8_MAX, 1e-4)
    positive = fp8_table()[:0x7F]  # codes 0x00 .. 0x7e: the non-negative values in increasing order
    codes = _flat_last2(g, _code_of(g, g.Div(xb, scale), round_fp8, positive, 0x80))
    bits = _bf16_bits(g, g.Slice(x, nope, d, g.i64(-1)))  # [..., r]
    hi = g.Div(bits, g.const(256, np.int64))
    lo = g.Sub(bits, g.Mul(hi, g.const(256, np.int64)))
    rope_bytes = _flat_last2(g, g.Concat(g.Unsqueeze(lo, g.i64(-1)), g.Unsqueeze(hi, g.i64(-1)), axis=-1))
    scales = g.Squeeze(e8m0_byte(g, scale), g.i64(-1))
    used = g.Add(g.Add(nope, g.Mul(r, g.i64(2))), g.Div(nope, g.i64(quant.KV_SCALE_BLOCK)))
    pad = g.Sub(g.Mul(g.Div(g.Add(used, g.i64(7)), g.i64(8)), g.i64(8)), used)
    zeros = g.Expand(g.const(0, np.int64), g.Concat(g.Shape(x, end=-1), pad, axis=0))
    return g.Cast(g.Concat(codes, rope_bytes, scales, zeros, axis=-1), to=TensorProto.UINT8)


def unpack_kv_fp8(g: Graph, rows: str, d: str, rope: str) -> str:
    """quant.unpack_kv_fp8: uint8 rows [..., bytes], d an int64 [1], rope an int64 scalar -> float [..., d]."""
    rows = g.Cast(rows, to=TensorProto.UINT8)  # a no-op on packed rows; keeps an untaken If branch well-typed
    r = g.Unsqueeze(rope, g.i64(0))
    nope = g.Sub(d, r)
    rope_end = g.Add(nope, g.Mul(r, g.i64(2)))
    codes = g.Gather(g.const(fp8_table()), g.Cast(g.Slice(rows, g.i64(0), nope, g.i64(-1)), to=TensorProto.INT32))
    # the scale bytes by Gather, not Slice: on float rows (the untaken If branch, rope 0) that Slice would be empty,
    # and static shape inference would reject the Mul below; Gather's indices are not checked until it runs
    scale_end = g.Add(rope_end, g.Div(nope, g.i64(quant.KV_SCALE_BLOCK)))
    scale_at = g.Range(g.Squeeze(rope_end, g.i64(0)), g.Squeeze(scale_end, g.i64(0)), g.const(1, np.int64))
    scale_bytes = g.Gather(rows, scale_at, axis=-1)
    values = g.Mul(blocks_of(g, codes, g.i64(quant.KV_SCALE_BLOCK)), g.Unsqueeze(e8m0_value(g, scale_bytes), g.i64(-1)))
    lo = g.Slice(rows, nope, rope_end, g.i64(-1), g.i64(2))
    hi = g.Slice(rows, g.Add(nope, g.i64(1)), rope_end, g.i64(-1), g.i64(2))
    return g.Concat(_flat_last2(g, values), _bf16_from_bytes(g, lo, hi), axis=-1)


def pack_fp4_rows(g: Graph, x: str) -> str:
    """quant.pack_fp4_rows: x [..., d] float -> uint8 [..., d/2 + d/32]."""
    xb = blocks_of(g, x, g.i64(quant.FP4_BLOCK))
    scale = block_scales(g, xb, quant.FP4_MAX, quant.FP4_MAX * 2.0 ** -126)
    codes = _code_of(g, g.Div(xb, scale), round_e2m1, np.array([0, .5, 1, 1.5, 2, 3, 4, 6], np.float32), 8)
    pairs = g.Reshape(codes, g.Concat(g.Shape(x, end=-1), g.i64(-1, 2), axis=0))  # [..., d/2, 2]
    low = g.Squeeze(g.Slice(pairs, g.i64(0), g.i64(1), g.i64(-1)), g.i64(-1))
    high = g.Squeeze(g.Slice(pairs, g.i64(1), g.i64(2), g.i64(-1)), g.i64(-1))
    packed = g.Add(low, g.Mul(high, g.const(16, np.int64)))
    scales = g.Squeeze(e8m0_byte(g, scale), g.i64(-1))
    return g.Cast(g.Concat(packed, scales, axis=-1), to=TensorProto.UINT8)


def unpack_fp4_rows(g: Graph, rows: str, d: str) -> str:
    """quant.unpack_fp4_rows: uint8 rows [..., d/2 + d/32], d an int64 [1] -> float [..., d]."""
    rows = g.Cast(rows, to=TensorProto.UINT8)  # as unpack_kv_fp8
    half = g.Div(d, g.i64(2))
    packed = g.Slice(rows, g.i64(0), half, g.i64(-1))
    scales = g.Slice(rows, half, g.Add(half, g.Div(d, g.i64(quant.FP4_BLOCK))), g.i64(-1))
    return decode_fp4(g, packed, e8m0_value(g, scales))
