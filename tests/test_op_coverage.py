"""Every dsv4 op of the registry is implemented by every target or has a declared fallback, and each target's
coverage table says what the target itself registers (the tables `plan` reads without importing toolchains)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dsv4c.graphs.ops.registry import OPS
from dsv4c.targets import coverage
from dsv4c.targets.cann.mapping import MAPPING
from dsv4c.targets.cpu.kernels import CPP_KERNELS

KERNELS = Path(__file__).resolve().parents[1] / "dsv4c" / "targets" / "cpu" / "kernels"


@pytest.mark.parametrize("kind", ["cpu", "tensorrt", "cann"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_each_target_implements_or_declares_a_fallback(kind, op):
    c = coverage.op_coverage(kind, op, soc="Ascend950")
    assert c.implemented or c.fallback, f"{kind} has neither an implementation nor a declared fallback for {op}"


def test_cpu_table_is_what_the_kernel_library_registers():
    registered = set(re.findall(r'emplace_back\("(\w+)"', (KERNELS / "ops.cc").read_text()))
    assert registered == CPP_KERNELS


def test_cann_mapping_names_every_op():
    """Every op but the vendor-native ones, which reach ATC as standard operators (inlined, test below)."""
    assert {op.onnx_name for op in OPS.values() if not op.vendor_native} <= set(MAPPING)


def test_vendor_bundles_inline_vendor_native_ops(tmp_path):
    """A program with a Bf16Linear exported for a vendor (opset 18, no function bodies) holds Cast + MatMul in its
    place, on the same external bf16 weight; the CPU bundle keeps the node (its C++ kernel runs it)."""
    import onnx
    import torch

    from dsv4c.graphs.ops.onnx import ONNX_OPSET
    from dsv4c.targets.onnx_bundle import export_bundle_programs

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(512, 256).to(torch.bfloat16))

        def forward(self, x):
            return torch.ops.dsv4.bf16_linear(x, self.w)

    program = torch.export.export(Head(), (torch.randn(2, 256),))
    for opset, where in ((18, "vendor"), (ONNX_OPSET, "cpu")):
        (tmp_path / where).mkdir()
        export_bundle_programs({"p": program}, tmp_path / where, opset)
        model = onnx.load(tmp_path / where / "p.onnx", load_external_data=False)
        types = [n.op_type for n in model.graph.node]
        weight = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.BFLOAT16)
        assert weight.data_location == onnx.TensorProto.EXTERNAL and list(weight.dims) == [512, 256]
        if where == "vendor":
            assert "Bf16Linear" not in types and {"Cast", "MatMul"} <= set(types), types
            assert not [f for f in model.functions if f.name == "Bf16Linear"]
        else:
            assert "Bf16Linear" in types


def test_a_new_op_without_implementations_fails_the_check(monkeypatch):
    """The gate itself: an op only the registry knows is missing on TensorRT and CANN."""
    import dataclasses

    fake = dataclasses.replace(OPS["hc_post"], name="new_op", onnx_name="NewOp")
    monkeypatch.setitem(OPS, "new_op", fake)
    assert coverage.op_coverage("cpu", "new_op").fallback  # the CPU target always has the function body
    for kind in ("tensorrt", "cann"):
        c = coverage.op_coverage(kind, "new_op")
        assert not (c.implemented or c.fallback), kind


def test_tensorrt_collectives_are_the_registrys_collectives():
    """The collectives TensorRT splices in as IDistCollectiveLayers are exactly the registry's collective ops, and
    no collective is also registered as a plugin."""
    from dsv4c.targets.tensorrt.collectives import COLLECTIVES
    from dsv4c.targets.tensorrt.plugins import PLUGIN_OPS

    assert set(COLLECTIVES) == {op.onnx_name for op in OPS.values() if op.collective}
    assert not {name for name, op in OPS.items() if op.collective} & set(PLUGIN_OPS)
