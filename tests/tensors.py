"""Test inputs and comparisons shared by the op tests (torch reference, ONNX bodies, C++ kernels, quant)."""

from __future__ import annotations

import math

import numpy as np
import torch

from dsv4c.graphs import quant


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def fp8_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real FP8 weights: uint8 e4m3 bits [n, k], float32 power-of-two 128x128 block scales."""
    q, s = quant.quantize_fp8_blocks(rand(n, k, seed=seed, scale=0.05))
    return q.view(torch.uint8), quant.e8m0_to_float(s)


def e4m3_value(byte: int) -> float:
    """float8_e4m3fn by its definition (spec §3): sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
    subnormal; S.1111.111 is NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 15, byte & 7
    if exp == 15 and man == 7:
        return math.nan
    if exp == 0:
        return sign * man / 8 * 2.0 ** -6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def assert_outputs_match(got: list[np.ndarray], want: list[np.ndarray], exact: bool) -> None:
    """Bit-exact, or max |diff| <= 1e-5 * max |reference| per output; shapes and dtypes always equal."""
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if exact:
            np.testing.assert_array_equal(g, w)
        else:
            assert np.abs(g - w).max(initial=0) <= 1e-5 * max(np.abs(w).max(initial=0), 1e-30)
