"""Reference implementations of the CANN bundle's custom nodes, as ONNX functions ONNX Runtime runs on CPU
(`Engine.load(bundle, emulate=True)`), and the in-memory `prepare` that turns a bundle graph into one ONNX Runtime
accepts. The bundle file itself is never changed.

What each function computes (the CANN operator semantics, from the sources named in mapping.py):
  DynamicQuant          x -> bf16 (the kernel reads bf16/fp16) -> per row s = amax / 127 (1 where amax = 0),
                        y = int8(clamp(round_half_even(x / s), -128, 127)), scale = s      ([ops-nn] golden.py)
  DynamicMxQuant        dst FLOAT8_E4M3FN, block 32, scale_alg 1: per 1x32 block s = 2^ceil(log2(amax / 448)),
                        y = e4m3(x / s) (carried as its float value), mxscale = e8m0 bytes [.., K/64, 2]
                        (aclnnDynamicMxQuant.md, scenario 2; an all-zero block gets s = 2^-126, y = 0)
  QuantBatchMatmulV3    int8 x int8^T (transpose_x2) * scale[n] * pertoken_scale[m], bf16 out for dtype 27
  QuantBatchMatmulV3Mx  the same operator with group_size [1, 1, 32] (MX): e4m3 x e4m3^T with e8m0 scales per
                        1x32 block on both sides (prepare routes MX nodes here)
  MoeExpertsInt/Mx      registry.moe_experts with the SoC's weights and activation quantization (per-token INT8
                        or MXFP8) instead of DeepSeek's FP8 one
HcPre / HcPost and the dsv4-domain nodes run the dsv4 function bodies (same semantics; mapping.py), so the
emulation keeps registry.py's rounding points too: SparseAttn's per-block bf16 probabilities and IndexerTopK's bf16
scores (attribute bf16), HadamardFp4's bf16 rotation, HcPost's in-order sum over the streams.

The bodies are built with dsv4c.graphs.ops.onnx_builder, as the dsv4 bodies are, so the rounding steps (FP8 cast,
bf16 cast, pow2 scales, FP4 decode) are bit-identical to theirs. MoeExpertsInt/Mx are the dsv4 MoeExperts graph
(onnx.moe_experts_graph) with two parts swapped: the weight decode (INT8 / INT4 / MXFP4 with e8m0 scales instead of
the shipped FP4 / FP8 blocks) and the activation quantizer (per-token INT8 / MXFP8 instead of FP8 1x128 blocks).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from dsv4c.graphs import quant
from dsv4c.graphs.ops.onnx import function_bodies, moe_experts_graph
from dsv4c.graphs.ops.onnx_builder import (
    ONNX_DOMAIN, Graph, block_scales, blocked_fake_quant, blocks_of, branch, decode_fp4, e8m0_byte, e8m0_value,
    fp8_table, make_function, maybe, round_bf16, round_fp8,
)
from dsv4c.targets.cann.mapping import (
    DOMAIN, DOMAIN_VERSION, DSV4_DOMAIN, DT_BF16, DT_FLOAT8_E4M3FN, DT_INT8, MX_BLOCK, MX_GROUP_SIZE,
)

MX_MIN_AMAX = quant.FP8_MAX * 2.0 ** -126  # MX: smallest amax given a normal scale (all-zero blocks)
INT8_MAX = 127.0  # DynamicQuant's int8 range: [-INT8_MAX - 1, INT8_MAX]


# ---- quantizers (fake: quantize-dequantize, for the fused MoE nodes) ----------------------------------------
def _int8_rows(g: Graph, x: str) -> tuple[str, str]:
    """DynamicQuant's arithmetic: (the int8 values as float, the per-row scale [..., 1])."""
    xb = round_bf16(g, x)
    s = g.Div(g.ReduceMax(g.Abs(xb), g.i64(-1), keepdims=1), g.const(INT8_MAX))
    s = g.Where(g.Equal(s, g.const(0.0)), g.const(1.0), s)
    return g.Clip(g.Round(g.Div(xb, s)), g.const(-INT8_MAX - 1), g.const(INT8_MAX)), s


def _int8_per_token(g: Graph, x: str) -> str:
    """DynamicQuant followed by its dequantization: the activation the int8 GEMM effectively sees."""
    return g.Mul(*_int8_rows(g, x))


def _mx_fp8(g: Graph, x: str) -> str:
    """DynamicMxQuant (scale_alg 1, block 32) followed by its dequantization."""
    return blocked_fake_quant(g, x, g.i64(MX_BLOCK), round_fp8, quant.FP8_MAX, MX_MIN_AMAX)


# ---- the functions ------------------------------------------------------------------------------------------
def _body_dynamic_quant(g: Graph, x):
    q, s = _int8_rows(g, x)
    return [g.Cast(q, to=TensorProto.INT8), g.Squeeze(s, g.i64(-1))]


def _body_dynamic_mx_quant(g: Graph, x):
    blocks = blocks_of(g, x, g.i64(MX_BLOCK))  # [..., K/32, 32]
    p = block_scales(g, blocks, quant.FP8_MAX, MX_MIN_AMAX)  # [..., K/32, 1], exact powers of two
    y = g.Reshape(round_fp8(g, g.Div(blocks, p)), g.Shape(x))
    byte = g.Cast(e8m0_byte(g, p), to=TensorProto.UINT8)
    return [y, g.Reshape(byte, g.Concat(g.Shape(x, end=-1), g.i64(-1, 2), axis=0))]  # [..., K/64, 2]


def _bf16_out(g: Graph, dtype: str, y: str) -> str:
    return maybe(g, g.Cast(g.Equal(dtype, g.const(DT_BF16, np.int64)), to=TensorProto.INT64), round_bf16, y)


def _body_qbmm(g: Graph, x1, x2, scale, pertoken_scale, dtype):
    acc = g.MatMul(g.Cast(x1, to=TensorProto.FLOAT), g.Transpose(g.Cast(x2, to=TensorProto.FLOAT), perm=[1, 0]))
    y = g.Mul(g.Mul(acc, g.Unsqueeze(scale, g.i64(0))), g.Unsqueeze(pertoken_scale, g.i64(-1)))
    return [_bf16_out(g, dtype, y)]


def _mx_expand(g: Graph, byte: str) -> str:
    """e8m0 bytes [R, K/64, 2] -> f32 scale per element [R, K]."""
    value = g.Reshape(e8m0_value(g, byte), g.Concat(g.Shape(byte, end=1), g.i64(-1), axis=0))  # [R, K/32]
    per = g.Expand(g.Unsqueeze(value, g.i64(-1)), g.i64(MX_BLOCK))
    return g.Reshape(per, g.Concat(g.Shape(byte, end=1), g.i64(-1), axis=0))


def _body_qbmm_mx(g: Graph, x1, x2, scale, pertoken_scale, dtype):
    a = g.Mul(x1, _mx_expand(g, pertoken_scale))  # x1: e4m3 values from DynamicMxQuant
    w = g.Mul(g.Gather(g.const(fp8_table()), g.Cast(x2, to=TensorProto.INT32)), _mx_expand(g, scale))
    return [_bf16_out(g, dtype, g.MatMul(a, g.Transpose(w, perm=[1, 0])))]


def _scale_per_element(g: Graph, s: str) -> str:
    """Scales [..., N, K/32] -> [..., N, K]."""
    per = g.Expand(g.Unsqueeze(s, g.i64(-1)), g.i64(MX_BLOCK))
    return g.Reshape(per, g.Concat(g.Shape(s, end=-1), g.i64(-1), axis=0))


def _int4_table() -> np.ndarray:
    """[256, 2]: the two int4 values (two's complement) of every byte, low nibble first."""
    b = np.arange(256)
    nib = np.stack([b & 15, b >> 4], axis=1)
    return np.where(nib >= 8, nib - 16, nib).astype(np.float32)


def _decode_int(bits_attr: str):
    def decode(g: Graph, w: str, s: str) -> str:
        def int8(b: Graph) -> str:
            return b.Mul(b.Cast(w, to=TensorProto.FLOAT), _scale_per_element(b, s))

        def int4(b: Graph) -> str:
            pairs = b.Gather(b.const(_int4_table()), b.Cast(w, to=TensorProto.INT32))  # [..., N, K/2, 2]
            values = b.Reshape(pairs, b.Concat(b.Shape(w, end=-1), b.i64(-1), axis=0))
            return b.Mul(values, _scale_per_element(b, s))

        return branch(g, g.Equal(bits_attr, g.const(4, np.int64)), int4, int8)

    return decode


def _decode_mxfp4(g: Graph, w: str, s: str) -> str:
    return decode_fp4(g, w, e8m0_value(g, s))


def _gathered(decode: Callable[[Graph, str, str], str]):
    """A decoder of stacked expert weights (moe_experts_graph's `decode`) from one of a single expert's."""
    def decode_used(g: Graph, w: str, s: str, used: str) -> str:
        return decode(g, g.Gather(w, used), g.Gather(s, used))

    return decode_used


def _body_moe_int(g: Graph, x, weights, indices, w1, s1, w3, s3, w2, s2, weight_bits, swiglu_limit, act_quant,
                  bf16):
    return [moe_experts_graph(g, x, weights, indices, [(w1, s1), (w3, s3), (w2, s2)],
                              _gathered(_decode_int(weight_bits)), _int8_per_token, swiglu_limit, act_quant, bf16)]


def _body_moe_mx(g: Graph, x, weights, indices, w1, s1, w3, s3, w2, s2, swiglu_limit, act_quant, bf16):
    return [moe_experts_graph(g, x, weights, indices, [(w1, s1), (w3, s3), (w2, s2)], _gathered(_decode_mxfp4),
                              _mx_fp8, swiglu_limit, act_quant, bf16)]


# name -> (body, inputs, outputs, attributes {name: kind})
_FUNCTIONS = {
    "DynamicQuant": (_body_dynamic_quant, ("x",), ("y", "scale"), {}),
    "DynamicMxQuant": (_body_dynamic_mx_quant, ("x",), ("y", "mxscale"), {}),
    "QuantBatchMatmulV3": (_body_qbmm, ("x1", "x2", "scale", "pertoken_scale"), ("y",), {"dtype": "int"}),
    "QuantBatchMatmulV3Mx": (_body_qbmm_mx, ("x1", "x2", "scale", "pertoken_scale"), ("y",), {"dtype": "int"}),
    "MoeExpertsInt": (_body_moe_int, ("x", "weights", "indices", "w1", "s1", "w3", "s3", "w2", "s2"), ("y",),
                      {"weight_bits": "int", "swiglu_limit": "float", "act_quant": "int", "bf16": "int"}),
    "MoeExpertsMx": (_body_moe_mx, ("x", "weights", "indices", "w1", "s1", "w3", "s3", "w2", "s2"), ("y",),
                     {"swiglu_limit": "float", "act_quant": "int", "bf16": "int"}),
}


def reference_function(name: str) -> onnx.FunctionProto:
    body, inputs, outputs, attrs = _FUNCTIONS[name]
    return make_function(DOMAIN, name, list(inputs), list(outputs), attrs, body)


def reference_functions() -> list[onnx.FunctionProto]:
    """The dsv4.cann reference functions and the dsv4 bodies (for HcPre/HcPost and the dsv4-domain nodes)."""
    return [reference_function(n) for n in _FUNCTIONS] + function_bodies()


# ---- prepare: a bundle graph -> what ONNX Runtime runs (in memory) ------------------------------------------
def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _set_attrs(node: onnx.NodeProto, values: dict) -> None:
    del node.attribute[:]
    node.attribute.extend(helper.make_attribute(k, v) for k, v in values.items())


def _expect(node: onnx.NodeProto, attrs: dict, want: dict) -> None:
    """The emulation implements one configuration of an operator; anything else is an error, never a guess."""
    for k, v in want.items():
        got = attrs.get(k)
        got = got.decode() if isinstance(got, bytes) else got
        if got != v:
            raise ValueError(f"node {node.name!r} ({node.op_type}): attribute {k}={got!r}; the CPU emulation "
                             f"implements {k}={v!r} only")


def _only_inputs(node: onnx.NodeProto, keep: tuple[int, ...]) -> None:
    names = list(node.input)
    dropped = [names[i] for i in range(len(names)) if i not in keep and names[i]]
    if dropped:
        raise ValueError(f"node {node.name!r} ({node.op_type}): optional inputs {dropped} are not emulated")
    del node.input[:]
    node.input.extend(names[i] if i < len(names) else "" for i in keep)


def _to_reference(node: onnx.NodeProto) -> None:
    a = _attrs(node)
    if node.op_type == "HcPre":
        node.domain = DSV4_DOMAIN
        _set_attrs(node, {"iters": a["hc_sinkhorn_iters"], "norm_eps": a["norm_eps"], "hc_eps": a["hc_eps"]})
    elif node.op_type == "HcPost":
        node.domain = DSV4_DOMAIN
    elif node.op_type == "DynamicQuant":
        _expect(node, a, {"dst_type": DT_INT8})
        _only_inputs(node, (0,))
        _set_attrs(node, {})
    elif node.op_type == "DynamicMxQuant":
        _expect(node, a, {"axis": -1, "round_mode": "rint", "dst_type": DT_FLOAT8_E4M3FN, "block_size": MX_BLOCK,
                          "scale_alg": 1})
        _set_attrs(node, {})
    elif node.op_type == "QuantBatchMatmulV3":
        _expect(node, a, {"transpose_x1": 0, "transpose_x2": 1})
        if a.get("group_size", 0) == MX_GROUP_SIZE:
            node.op_type = "QuantBatchMatmulV3Mx"
        else:
            _expect(node, a, {"group_size": 0})
        _only_inputs(node, (0, 1, 2, 5))
        _set_attrs(node, {"dtype": a["dtype"]})
    elif node.op_type == "MoeExpertsInt":
        _expect(node, a, {"group_size": MX_BLOCK})
        _set_attrs(node, {k: a[k] for k in ("weight_bits", "swiglu_limit", "act_quant", "bf16")})
    elif node.op_type == "MoeExpertsMx":
        _set_attrs(node, {k: a[k] for k in ("swiglu_limit", "act_quant", "bf16")})
    else:
        raise ValueError(f"node {node.name!r}: {DOMAIN}.{node.op_type} has no CPU reference implementation")


def prepare(model: onnx.ModelProto) -> None:
    """Undo the ATC conventions in memory: explicit `ai.onnx` domains back to the default domain, the
    `cann_kernel` markers dropped, CANN operator nodes pointed at their reference functions."""
    for o in model.opset_import:
        if o.domain == ONNX_DOMAIN:
            o.domain = ""
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    for node in model.graph.node:
        if node.domain == ONNX_DOMAIN:
            node.domain = ""
        elif node.domain == DSV4_DOMAIN:
            _set_attrs(node, {k: v for k, v in _attrs(node).items() if k != "cann_kernel"})
        elif node.domain == DOMAIN:
            _to_reference(node)
