"""Which dsv4 op each target implements, and how: one table per target, read here without importing any
toolchain (TensorRT, CANN), so `plan` can say it on any machine.

    cpu       the C++ ORT kernel library (targets/cpu/kernels: CPP_KERNELS), else the op's ONNX function body
              (a declared fallback: same numerics, slower; recorded in the manifest)
    vendor_native ops (registry: bodies of standard operators, e.g. Bf16Linear) are inlined into the TensorRT
              and CANN bundles (onnx_bundle.inline_vendor_native), so those targets run them as their own layers
    tensorrt  a tensorrt.plugin registration per op (targets/tensorrt/plugins.py: PLUGIN_OPS; AOT_OPS also
              have an ahead-of-time kernel); the collectives become TensorRT's IDistCollectiveLayer (NCCL) at
              engine build (targets/tensorrt/collectives.py: COLLECTIVES)
    cann      targets/cann/mapping.py: MAPPING (public CANN operators, HCCL's HcomAllReduce / HcomAllGather for the
              collectives, or the nearest operator and an AscendC kernel still to write)

tests/test_op_coverage.py enumerates the registry and fails when a target neither implements an op nor declares
how it falls back, and checks each table against the target's own registrations.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Coverage:
    op: str
    implemented: bool  # runs on the target as built today
    implementation: str  # how, in words
    fallback: bool = False  # runs through a declared fallback (slower, or a kernel still to write)


def op_coverage(kind: str, op: str, soc: str | None = None) -> Coverage:
    from dsv4c.graphs.ops.registry import OPS

    onnx_name = OPS[op].onnx_name
    if kind in ("tensorrt", "cann") and OPS[op].vendor_native:  # onnx_bundle.inline_vendor_native
        body = ", ".join(_body_ops(op))
        return Coverage(op, True, f"inlined as standard ONNX ({body}): {_VENDOR[kind]}'s own layers")
    if kind == "cpu":
        from dsv4c.targets.cpu.kernels import CPP_KERNELS

        if onnx_name in CPP_KERNELS:
            return Coverage(op, True, "C++ ORT kernel")
        return Coverage(op, True, "ONNX function body", fallback=True)
    if kind == "tensorrt":
        from dsv4c.targets.tensorrt.collectives import COLLECTIVES
        from dsv4c.targets.tensorrt.plugins import AOT_OPS, PLUGIN_OPS, TORCH_GLUE_OPS

        if onnx_name in COLLECTIVES:
            return Coverage(op, True, "TensorRT IDistCollectiveLayer (NCCL), spliced in at engine build")
        if op in TORCH_GLUE_OPS:
            return Coverage(op, True, "TensorRT plugin (torch ops, JIT)")
        if op in PLUGIN_OPS:
            return Coverage(op, True, "TensorRT plugin (Triton, " + ("AOT + JIT)" if op in AOT_OPS else "JIT)"))
        return Coverage(op, False, "no TensorRT plugin")
    if kind == "cann":
        from dsv4c.targets.cann.mapping import MAPPING

        m = MAPPING.get(onnx_name)
        if m is None:
            return Coverage(op, False, "no CANN mapping")
        if m.status == "public":
            return Coverage(op, True, m.ascend950 if soc == "Ascend950" else m.ascend910b)
        return Coverage(op, False, "mapped, AscendC kernel TBD", fallback=True)
    raise KeyError(f"unknown target kind {kind!r}")


_VENDOR = {"tensorrt": "TensorRT", "cann": "ATC"}


def _body_ops(op: str) -> list[str]:
    """The standard operators of an op's ONNX function body, in order of first use."""
    from dsv4c.graphs.ops.onnx import function_body
    from dsv4c.graphs.ops.registry import OPS

    return list(dict.fromkeys(n.op_type for n in function_body(OPS[op]).node if n.op_type != "Identity"))
