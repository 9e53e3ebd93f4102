"""The CPU engine's graph passes (dsv4c.targets.cpu.passes) on hand-made graphs: what is folded and what must not
be. Their effect on real engines (the same logits, bit for bit) is covered by every CPU build's validation gate
and by test_build_e2e.py."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from dsv4c.graphs.ops.onnx import DOMAIN
from dsv4c.targets.cpu.passes import ROUND_ATTRIBUTE, fold_bf16_roundings


def cast(src: str, dst: str, to: int) -> onnx.NodeProto:
    return helper.make_node("Cast", [src], [dst], to=to)


def graph(nodes: list[onnx.NodeProto], outputs: list[str]) -> onnx.GraphProto:
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                             [helper.make_tensor_value_info(o, TensorProto.FLOAT, [4]) for o in outputs])


def linear(out: str = "y") -> onnx.NodeProto:
    return helper.make_node("Fp8Linear", ["x", "w", "s"], [out], domain=DOMAIN, act_quant=0)


def test_a_round_trip_behind_a_dsv4_op_is_folded_into_it():
    g = graph([linear(), cast("y", "y16", TensorProto.BFLOAT16), cast("y16", "y32", TensorProto.FLOAT),
               helper.make_node("Relu", ["y32"], ["out"])], ["out"])
    assert fold_bf16_roundings(g) == 1
    assert [n.op_type for n in g.node] == ["Fp8Linear", "Relu"]
    assert g.node[1].input[0] == "y"  # the reader now reads the op's (rounded) output
    assert [(a.name, a.i) for a in g.node[0].attribute if a.name == ROUND_ATTRIBUTE] == [(ROUND_ATTRIBUTE, 1)]
    assert fold_bf16_roundings(g) == 0  # nothing left to fold


def test_what_must_stay_a_cast_pair():
    pair = [cast("y", "y16", TensorProto.BFLOAT16), cast("y16", "y32", TensorProto.FLOAT)]
    cases = {
        "the op's unrounded output is read too": ([linear(), *pair, helper.make_node("Add", ["y32", "y"], ["out"])],
                                                  ["out"]),
        "the bf16 value is read too": ([linear(), *pair, helper.make_node("Cast", ["y16"], ["z"], to=1),
                                        helper.make_node("Add", ["y32", "z"], ["out"])], ["out"]),
        "the rounded value is a graph output": ([linear(), *pair], ["y32"]),
        "the op's output is a graph output": ([linear(), *pair, helper.make_node("Relu", ["y32"], ["out"])],
                                              ["out", "y"]),
        "a standard op's output": ([helper.make_node("Relu", ["x"], ["y"]), *pair,
                                    helper.make_node("Relu", ["y32"], ["out"])], ["out"]),
        "a cast to float16, not bfloat16": ([linear(), cast("y", "y16", TensorProto.FLOAT16),
                                             cast("y16", "y32", TensorProto.FLOAT),
                                             helper.make_node("Relu", ["y32"], ["out"])], ["out"]),
    }
    for why, (nodes, outputs) in cases.items():
        g = graph(nodes, outputs)
        before = [n.op_type for n in g.node]
        assert fold_bf16_roundings(g) == 0, why
        assert [n.op_type for n in g.node] == before, why
