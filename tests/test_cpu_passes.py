"""The CPU engine's graph passes (dsv4c.targets.cpu.passes) on hand-made graphs: what is rewritten and what must not
be, and (e8m0 scales) that ONNX Runtime computes the same outputs before and after, with and without the kernel
library. Their effect on real engines (the same logits, bit for bit) is covered by every CPU build's validation
gate and by test_build_e2e.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from dsv4c.graphs.ops.onnx import DOMAIN, DOMAIN_VERSION, ONNX_OPSET, attach_functions
from dsv4c.targets.base import ToolchainMissing
from dsv4c.targets.cpu.executor import folded_for_kernels
from dsv4c.targets.cpu.kernels import build
from dsv4c.targets.cpu.passes import ROUND_ATTRIBUTE, fold_bf16_roundings
from dsv4c.targets.e8m0_scales import (E8M0_TABLE, decode_e8m0_scales, e8m0_codes, fold_e8m0_decodes,
                                      store_scales_e8m0)
from tensors import fp8_weight, rand


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


# ---- weight scales as e8m0 bytes --------------------------------------------------------------------------------
SCALES = np.array([[0.5, 2.0 ** -10], [8.0, 2.0 ** -127]], dtype=np.float32)  # e8m0 codes 126, 117, 130, 0


def scaled_model(scales: np.ndarray, extra_reader: bool = False) -> onnx.ModelProto:
    """x [3, 256] -> Fp8Linear(w [200, 256], scales [2, 2]) (+ the scales times 1 when `extra_reader`: a standard
    node reading them too), with the op's function body."""
    w, _ = fp8_weight(200, 256, seed=1)
    nodes = [helper.make_node("Fp8Linear", ["x", "w", "s"], ["y"], domain=DOMAIN, act_quant=0)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 200])]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["s"], ["s_out"]))
        outputs.append(helper.make_tensor_value_info("s_out", TensorProto.FLOAT, list(scales.shape)))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 256])], outputs,
                          [onnx.numpy_helper.from_array(w.numpy(), "w"), onnx.numpy_helper.from_array(scales, "s")])
    opsets = [helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
    return attach_functions(helper.make_model(g, ir_version=10, opset_imports=opsets))


def stored_e8m0(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    m = ir.serde.deserialize_model(model)
    n = store_scales_e8m0(m.graph)
    return ir.serde.serialize_model(m), n


def run(model: onnx.ModelProto, library: str | None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if library:
        options.register_custom_ops_library(library)
    s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": rand(3, 256, seed=2).numpy()})


@pytest.fixture(scope="module")
def library() -> str:
    try:
        return str(build.build_library())
    except ToolchainMissing as e:
        pytest.skip(f"dsv4 ORT kernel library cannot be built here: {e}")


def test_e8m0_codes_are_the_exponents_of_powers_of_two():
    np.testing.assert_array_equal(e8m0_codes("s", SCALES), [[126, 117], [130, 0]])
    for bad in (np.array([0.75]), np.array([0.0]), np.array([-0.5]), np.array([np.inf], dtype=np.float32)):
        with pytest.raises(ValueError, match="weight scales 'layers.0.s' are not all powers of two"):
            e8m0_codes("layers.0.s", bad)
    many = np.full((2, (1 << 20) + 3), 0.5, dtype=np.float32)  # converted a chunk at a time: the last one too
    assert (e8m0_codes("s", many) == 126).all() and e8m0_codes("s", many).shape == many.shape
    many[1, -1] = 0.75
    with pytest.raises(ValueError):
        e8m0_codes("s", many)


def test_scales_are_stored_as_e8m0_bytes_and_decoded_in_the_graph(library):
    """The bundle's rewrite: the scale initializer becomes its bytes under the same name, a Cast + Gather decodes
    it, and ONNX Runtime without the library (the op's function body) computes what the float scales gave, bit
    for bit. The build's fold then lets the kernel read the bytes: the same output again, one node left."""
    model = scaled_model(SCALES)
    want = run(model, None)[0]
    rewritten, n = stored_e8m0(model)
    assert n == 1
    codes = {t.name: t for t in rewritten.graph.initializer}["s"]
    assert codes.data_type == TensorProto.UINT8
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(codes), [[126, 117], [130, 0]])
    assert [nd.op_type for nd in rewritten.graph.node] == ["Cast", "Gather", "Fp8Linear"]
    assert not folded_for_kernels(rewritten.graph)  # still runs without the library
    np.testing.assert_array_equal(run(rewritten, None)[0], want)
    np.testing.assert_array_equal(run(rewritten, library)[0], run(model, library)[0])
    assert fold_e8m0_decodes(rewritten.graph) == 1
    assert [nd.op_type for nd in rewritten.graph.node] == ["Fp8Linear"]
    assert rewritten.graph.node[0].input[2] == "s" and E8M0_TABLE not in {t.name for t in rewritten.graph.initializer}
    assert folded_for_kernels(rewritten.graph)  # the executor refuses it without the library
    np.testing.assert_array_equal(run(rewritten, library)[0], run(model, library)[0])
    # a runner whose op implementations take float scales (the function body here) gets the decode back
    assert decode_e8m0_scales(rewritten.graph) == 1 and decode_e8m0_scales(rewritten.graph) == 0
    assert [nd.op_type for nd in rewritten.graph.node] == ["Cast", "Gather", "Fp8Linear"]
    assert not folded_for_kernels(rewritten.graph)
    np.testing.assert_array_equal(run(rewritten, None)[0], want)


def test_what_keeps_float_scales_or_its_decode():
    """Scales that are not powers of two stay float; a decode that a standard node reads too stays (ORT runs it),
    the standard node getting the decoded floats, the same values as before."""
    model, n = stored_e8m0(scaled_model(SCALES * 1.5))
    assert n == 0 and [nd.op_type for nd in model.graph.node] == ["Fp8Linear"]
    model = scaled_model(SCALES, extra_reader=True)
    want = run(model, None)
    rewritten, n = stored_e8m0(model)
    assert n == 1
    assert fold_e8m0_decodes(rewritten.graph) == 0
    for got, expected in zip(run(rewritten, None), want):
        np.testing.assert_array_equal(got, expected)


def test_streamed_scales_are_checked_when_written(tmp_path):
    """Scales the checkpoint streams in (lazy until the file is written) are taken as e8m0-exact; one that is not
    fails the write, naming the tensor."""
    m = ir.serde.deserialize_model(scaled_model(SCALES))
    held = m.graph.initializers["s"]
    held.const_value = ir.LazyTensor(lambda: ir.tensor(torch.full((2, 2), 0.75).numpy()), dtype=ir.DataType.FLOAT,
                                     shape=ir.Shape([2, 2]))
    assert store_scales_e8m0(m.graph) == 1
    with pytest.raises(Exception) as failed:  # onnx_ir wraps the reader's error in its own
        ir.save(m, tmp_path / "m.onnx")
    causes, e = [], failed.value
    while e is not None:
        causes.append(str(e))
        e = e.__cause__
    assert any("weight scales 's' are not all powers of two" in c for c in causes)
