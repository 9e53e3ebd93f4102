"""Plugin definitions that tensorrt.plugin must refuse (tests/test_triton_kernels.py). No
`from __future__ import annotations`: the package validates annotation objects, not strings."""

from typing import Tuple


def bad_registrations(t) -> list:
    """register() functions that break its rules, for the API object `t`."""

    def tensor_after_attribute(x: t.TensorDesc, block: int, y: t.TensorDesc) -> t.TensorDesc:
        return x

    def attribute_named_outputs(x: t.TensorDesc, outputs: int) -> t.TensorDesc:
        return x

    def list_attribute(x: t.TensorDesc, blocks: list) -> t.TensorDesc:
        return x

    return [tensor_after_attribute, attribute_named_outputs, list_attribute]


def good_registration(t):
    def plugin(x: t.TensorDesc, block: int) -> t.TensorDesc:
        return x

    return plugin


def bad_implementations(t) -> list:
    """(decorator name, function) pairs that break the impl / aot_impl rules for good_registration's plugin."""

    def impl_without_stream(x: t.Tensor, block: int, outputs: Tuple[t.Tensor]) -> None:
        pass

    def aot_with_attribute_retyped(x: t.TensorDesc, block: float, outputs: Tuple[t.TensorDesc],
                                   tactic: int) -> Tuple[bytes, bytes, t.KernelLaunchParams, t.SymExprs]:
        pass

    def aot_returning_three(x: t.TensorDesc, block: int, outputs: Tuple[t.TensorDesc],
                            tactic: int) -> Tuple[bytes, bytes, t.KernelLaunchParams]:
        pass

    return [("impl", impl_without_stream), ("aot_impl", aot_with_attribute_retyped),
            ("aot_impl", aot_returning_three)]
