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
    assert {op.onnx_name for op in OPS.values()} <= set(MAPPING)


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
