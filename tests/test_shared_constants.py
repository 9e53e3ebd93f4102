"""Constants the C++ kernels cannot import from Python agree with the Python ones (read from the source).

dsv4c.graphs.quant is the one source of the expert formats (ExpertFormat, the MoeExperts `fmt` attribute) and
of the FP8 / FP4 block sizes; kernels.h repeats them as named C++ constants, and a mismatch would make the C++
MoeExperts kernel decode one format as another.
"""

from __future__ import annotations

import re
from pathlib import Path

from dsv4c.graphs.quant import FP4_BLOCK, FP8_BLOCK, ExpertFormat

KERNELS_H = Path(__file__).resolve().parents[1] / "dsv4c/targets/cpu/kernels/kernels.h"
CPP_EXPERT_FORMATS = {"kFp4": ExpertFormat.FP4, "kFp8": ExpertFormat.FP8, "kF32": ExpertFormat.FLOAT}


def cpp_enum(source: str, name: str) -> dict[str, int]:
    """The enumerators of `enum name ... { a = 1, b = 2 }` (each with an explicit value)."""
    body = re.search(rf"enum\s+{name}\b[^{{]*\{{([^}}]*)\}}", source)
    assert body, f"enum {name} not found"
    return {k: int(v) for k, v in re.findall(r"(\w+)\s*=\s*(-?\d+)", body.group(1))}


def cpp_constant(source: str, name: str) -> int:
    found = re.search(rf"constexpr\s+\w+\s+{name}\s*=\s*(-?\d+)\s*;", source)
    assert found, f"constexpr {name} not found"
    return int(found.group(1))


def test_cpp_expert_formats_are_python_expert_formats():
    cpp = cpp_enum(KERNELS_H.read_text(), "WeightFormat")
    assert cpp == {k: int(v) for k, v in CPP_EXPERT_FORMATS.items()}


def test_cpp_block_sizes_are_python_block_sizes():
    source = KERNELS_H.read_text()
    assert (cpp_constant(source, "kFp8Block"), cpp_constant(source, "kFp4Block")) == (FP8_BLOCK, FP4_BLOCK)


def test_the_parsers_read_what_is_written():
    source = "enum E : int32_t { kA = 0, kB = 1 };\nconstexpr int64_t kBlock = 128;  // note\n"
    assert cpp_enum(source, "E") == {"kA": 0, "kB": 1}
    assert cpp_constant(source, "kBlock") == 128
