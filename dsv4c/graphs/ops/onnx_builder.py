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
    shape = g.Shape(x)
    xb = g.Reshape(x, g.Concat(g.Shape(x, end=-1), g.i64(-1), block, axis=0))
    amax = g.Max(g.ReduceMax(g.Abs(xb), g.i64(-1), keepdims=1), g.const(amax_min))
    scale = ceil_pow2(g, g.Div(amax, g.const(qmax)))
    return g.Reshape(g.Mul(quantize(g, g.Div(xb, scale)), scale), shape)


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
    negative = g.Or(g.Less(x, g.const(0.0)), g.Less(g.Reciprocal(x), g.const(0.0)))
    return g.Where(negative, g.Neg(q), q)


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
