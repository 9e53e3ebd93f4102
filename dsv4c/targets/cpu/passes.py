"""Graph passes of the CPU engine: rewrites of the ONNX programs that only the dsv4 kernel library can run.

Weight scales (dsv4c.targets.e8m0_scales): the CPU bundle stores the checkpoint's e8m0 bytes and decodes them in
the graph, so that any ONNX Runtime still runs it (ORT's constant folding turns the decode back into float scales
at load); with the library the build drops the decode (`fold_e8m0_decodes`) and the kernels read the bytes
themselves (ops.cc `with_scales`).

bf16 round trips (`fold_bf16_roundings`): the bundle expresses every bf16 rounding of the reference as two ONNX
Runtime nodes, Cast to bfloat16 and Cast back to float. Behind a dsv4 op (the linears' outputs, the attention's,
HcPost's) the kernel can round its own output instead (attribute `round_bf16_out`, ops.cc NodeSetup): one pass
over values it just wrote, not two more nodes for ORT to dispatch. tiny's decode program has 40 such pairs (80 of
the 544 nodes ORT ran per step); without them a step is ~5 % shorter.

The ops' ONNX function bodies know neither the attribute nor byte scales, so a folded engine needs the library:
the executor refuses to run it without (dsv4c.targets.cpu.executor).
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import TensorProto

from dsv4c.targets.e8m0_scales import is_cast

ROUND_ATTRIBUTE = "round_bf16_out"


def fold_bf16_roundings(graph: onnx.GraphProto) -> int:
    """Fold each `dsv4 op -> Cast(bfloat16) -> Cast(float)` into the op (ROUND_ATTRIBUTE=1) where nothing else
    reads the op's output or the bf16 value and neither is a graph output. Returns how many were folded."""
    from dsv4c.graphs.ops.onnx import DOMAIN  # build side only: the executor reads ROUND_ATTRIBUTE without torch

    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    graph_outputs = {o.name for o in graph.output}
    renamed: dict[str, str] = {}  # the float Cast's output -> the op's output
    dropped: set[int] = set()
    for node in graph.node:
        if node.domain != DOMAIN or not node.output or _has_attribute(node, ROUND_ATTRIBUTE):
            continue
        to_bf16 = _only_reader(readers, node.output[0], graph_outputs)
        if to_bf16 is None or not is_cast(to_bf16, TensorProto.BFLOAT16):
            continue
        to_float = _only_reader(readers, to_bf16.output[0], graph_outputs)
        if to_float is None or not is_cast(to_float, TensorProto.FLOAT) or to_float.output[0] in graph_outputs:
            continue
        node.attribute.append(onnx.helper.make_attribute(ROUND_ATTRIBUTE, 1))
        renamed[to_float.output[0]] = node.output[0]
        dropped.update((id(to_bf16), id(to_float)))
    kept = [n for n in graph.node if id(n) not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
    return len(renamed)


def _only_reader(readers: dict[str, list[onnx.NodeProto]], name: str, graph_outputs: set[str]):
    nodes = readers.get(name, [])
    return nodes[0] if len(nodes) == 1 and name not in graph_outputs else None


def _has_attribute(node: onnx.NodeProto, name: str) -> bool:
    return any(a.name == name for a in node.attribute)
