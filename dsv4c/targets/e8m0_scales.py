"""Weight scales as e8m0 bytes in the ONNX programs: the passes the CPU and TensorRT targets share.

The checkpoint ships every FP8 and FP4 block scale as one e8m0 byte (2^(e-127)); the exported programs hold
them as float32. A bundle stores the bytes again (`store_scales_e8m0`: a routed expert's FP4 weights read 15 %
fewer bytes, 0.53 instead of 0.63 per weight) and decodes them in the graph, `bytes -> Cast(int64) ->
Gather(E8M0_TABLE)`, so that any ONNX runtime still runs it. Where the dsv4 nodes' kernels read the bytes
themselves (the CPU kernel library, ops.cc `with_scales`; the TensorRT plugins' Triton kernels), the decode is
dropped (`fold_e8m0_decodes`) and the nodes read the bytes; `decode_e8m0_scales` puts it back in memory for a
runner whose implementations take float scales (ONNX function bodies, the ops' torch reference).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

SCALE_INPUTS = {"Fp8Linear": (2,), "Fp8GroupedLinear": (2,), "MoeExperts": (4, 6, 8)}  # weight scale positions
E8M0_TABLE = "dsv4c.e8m0_values"  # float32 [256]: 2^(code-127) for every e8m0 byte, NaN for 0xFF


def store_scales_e8m0(graph: Any) -> int:
    """(onnx_ir graph, before it is written) Store each float32 initializer that a dsv4 node reads as weight scales
    (SCALE_INPUTS) as its e8m0 bytes under the same name, decoded in the graph by `Cast(int64) -> Gather` from
    E8M0_TABLE; its readers read the decoded floats. Values the exporter holds are checked now (a scale that is not
    a power of two stays float); values the checkpoint streams in (graphs.streamed, e8m0 there) are checked as
    they are written. Empty scales (float experts) stay. Returns how many tensors are stored as bytes."""
    import onnx_ir as ir

    from dsv4c.graphs.ops.onnx import DOMAIN

    first = next(iter(graph), None)
    table, stored = None, 0
    for node in list(graph):
        if node.domain != DOMAIN:
            continue
        for i in SCALE_INPUTS.get(node.op_type, ()):
            value = node.inputs[i] if i < len(node.inputs) else None
            if value is None or not value.is_initializer() or value.dtype != ir.DataType.FLOAT:
                continue  # not a stored float tensor, or already decoded for an earlier reader
            codes = None if math.prod(value.shape.dims) == 0 else _codes(value.name, value.const_value)
            if codes is None:
                continue
            if table is None:
                table = _table_value(graph)
            _store_as_e8m0(graph, value, codes, table, first)
            stored += 1
    return stored


E8M0_CHUNK = 1 << 20  # scales converted at a time: a real-width expert stack holds 67M (268 MB as float32)


def e8m0_codes(name: str, scales: np.ndarray) -> np.ndarray:
    """Float32 powers of two in [2^-127, 2^127] -> their e8m0 bytes; anything else is refused, naming the tensor.
    Read off the float's bits a chunk at a time: a normal power of two is its exponent field over a zero
    mantissa (the code itself), 2^-127 the one subnormal; working copies stay a few MB whatever the tensor."""
    from dsv4c.graphs.quant import E8M0_BIAS

    bits = np.ascontiguousarray(scales, dtype=np.float32).reshape(-1).view(np.uint32)
    codes = np.empty(bits.shape, dtype=np.uint8)
    for start in range(0, bits.size, E8M0_CHUNK):
        chunk = bits[start:start + E8M0_CHUNK]
        exponent = chunk >> 23  # the sign bit makes it >= 256
        subnormal = chunk == 0x00400000  # 2^-127
        if not (subnormal | ((chunk & 0x7FFFFF) == 0) & (exponent >= 1) & (exponent <= 2 * E8M0_BIAS)).all():
            raise ValueError(f"weight scales {name!r} are not all powers of two in [2^-127, 2^127]: they cannot be "
                             "stored as e8m0 bytes (the checkpoint's scale format)")
        codes[start:start + E8M0_CHUNK] = np.where(subnormal, 0, exponent)
    return codes.reshape(np.shape(scales))


def e8m0_values() -> np.ndarray:
    import torch

    from dsv4c.graphs.quant import e8m0_to_float

    values = np.full(256, np.nan, dtype=np.float32)  # 0xFF: NaN
    values[:255] = e8m0_to_float(torch.arange(255, dtype=torch.uint8)).numpy()
    return values


def _codes(name: str, held: Any) -> Any:
    """The e8m0 bytes of the scales `held`: converted as the file is written when the checkpoint streams them in
    (e8m0 there; checked then), now when the exporter holds them; None for held values that are not all powers of
    two (they stay float)."""
    import onnx_ir as ir

    if isinstance(held, ir.LazyTensor):
        return ir.LazyTensor(lambda: ir.tensor(e8m0_codes(name, held.numpy()), name=name), dtype=ir.DataType.UINT8,
                             shape=held.shape, name=name)
    try:
        return ir.tensor(e8m0_codes(name, held.numpy()), name=name)
    except ValueError:
        return None


def _table_value(graph: Any) -> Any:
    import onnx_ir as ir

    table = ir.Value(name=E8M0_TABLE, shape=ir.Shape([256]), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(e8m0_values(), name=E8M0_TABLE))
    graph.register_initializer(table)
    return table


def _store_as_e8m0(graph: Any, value: Any, codes_tensor: Any, table: Any, first: Any) -> None:
    import onnx_ir as ir

    name, shape = value.name, value.shape
    decoded = ir.Value(name=f"{name}.decoded", shape=shape, type=ir.TensorType(ir.DataType.FLOAT))
    value.replace_all_uses_with(decoded)
    graph.initializers.pop(name)
    codes = ir.Value(name=name, shape=shape, type=ir.TensorType(ir.DataType.UINT8), const_value=codes_tensor)
    graph.register_initializer(codes)
    index = ir.Value(name=f"{name}.codes", shape=shape, type=ir.TensorType(ir.DataType.INT64))
    cast = ir.Node("", "Cast", [codes], [ir.AttrInt64("to", ir.DataType.INT64)], outputs=[index],
                   name=f"{name}/e8m0_codes")
    gather = ir.Node("", "Gather", [table, index], outputs=[decoded], name=f"{name}/e8m0_decode")
    if first is None:
        graph.extend([cast, gather])
    else:
        graph.insert_before(first, [cast, gather])


def fold_e8m0_decodes(graph: onnx.GraphProto) -> int:
    """Let the dsv4 nodes read e8m0 scale bytes themselves (their kernels decode them): each `bytes -> Cast(int64) ->
    Gather(E8M0_TABLE)` that only dsv4 nodes read, at their scale inputs, is removed and they read the bytes.
    Returns how many decodes were folded."""
    from dsv4c.graphs.ops.onnx import DOMAIN

    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    producer = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            readers[name].append((node, i))
        for name in node.output:
            producer[name] = node
    graph_outputs = {o.name for o in graph.output}
    codes_dtype = {t.name: t.data_type for t in graph.initializer}
    dropped: set[int] = set()
    for gather in graph.node:
        if gather.op_type != "Gather" or gather.domain not in ("", "ai.onnx") or list(gather.input[:1]) != [E8M0_TABLE]:
            continue
        cast = producer.get(gather.input[1])
        if cast is None or not is_cast(cast, TensorProto.INT64) or len(readers[cast.output[0]]) != 1:
            continue
        codes, decoded = cast.input[0], gather.output[0]
        uses = readers[decoded]
        if codes_dtype.get(codes) != TensorProto.UINT8 or decoded in graph_outputs or not uses or not all(
                n.domain == DOMAIN and i in SCALE_INPUTS.get(n.op_type, ()) for n, i in uses):
            continue
        for node, i in uses:
            node.input[i] = codes
        dropped.update((id(cast), id(gather)))
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    if not any(E8M0_TABLE in n.input for n in graph.node):
        kept_inits = [t for t in graph.initializer if t.name != E8M0_TABLE]
        del graph.initializer[:]
        graph.initializer.extend(kept_inits)
    return len(dropped) // 2


def reads_e8m0_scales(graph: onnx.GraphProto) -> bool:
    """Whether a dsv4 node reads uint8 initializers as its scales (fold_e8m0_decodes ran): only kernels that
    decode them can run it."""
    uint8 = {t.name for t in graph.initializer if t.data_type == TensorProto.UINT8}
    return any(node.input[i] in uint8 for node in graph.node for i in SCALE_INPUTS.get(node.op_type, ())
               if i < len(node.input))


def decode_e8m0_scales(graph: onnx.GraphProto) -> int:
    """The inverse of `fold_e8m0_decodes`, for runners whose dsv4 implementations take float scales: each uint8
    initializer a dsv4 node reads at a scale input gets its `Cast(int64) -> Gather(E8M0_TABLE)` decode back (one
    per tensor, placed first) and its readers read the floats. Returns how many tensors are decoded."""
    from onnx import helper, numpy_helper

    uint8 = {t.name for t in graph.initializer if t.data_type == TensorProto.UINT8}
    decoded: dict[str, str] = {}
    for node in graph.node:
        for i in SCALE_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] in uint8:
                decoded.setdefault(node.input[i], f"{node.input[i]}.decoded")
                node.input[i] = decoded[node.input[i]]
    if not decoded:
        return 0
    decodes = []
    for codes, floats in decoded.items():
        decodes += [helper.make_node("Cast", [codes], [f"{codes}.codes"], to=TensorProto.INT64,
                                     name=f"{codes}/e8m0_codes"),
                    helper.make_node("Gather", [E8M0_TABLE, f"{codes}.codes"], [floats], name=f"{codes}/e8m0_decode")]
    nodes = decodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    if E8M0_TABLE not in {t.name for t in graph.initializer}:
        graph.initializer.append(numpy_helper.from_array(e8m0_values(), E8M0_TABLE))
    return len(decoded)


def is_cast(node: onnx.NodeProto, to: int) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type == "Cast" and any(
        a.name == "to" and a.i == to for a in node.attribute)
