"""The TensorRT bundle on a GPU without TensorRT: its ONNX graph interpreted node by node with torch, each dsv4
plugin node run by the Triton kernel TensorRT would call (dsv4c.targets.tensorrt.kernels).

This is a real executor for users who have a GPU and the dsv4c venv but no TensorRT, and the end-to-end check
that the plugin kernels compose into a correct model: it runs exactly the bundle TensorRT parses, weights from
its `.onnx.data`, and differs from a TensorRT engine only in who runs the standard ONNX nodes (torch here,
TensorRT's layers there).

    Engine.load(bundle, device="cuda")     # the plugin nodes -> Triton kernels on the GPU
    Engine.load(bundle, device="cpu")      # the plugin nodes -> the ops' torch reference (checks this file)

The interpreter covers the standard operators the bundle uses (`STANDARD_OPS`); a node outside them is refused
at load time, naming it. Semantics follow the ONNX operator specs where torch differs: integer Div truncates,
Mod follows `fmod`, TopK orders ties lower index first, Cast to float8 saturates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from dsv4c.artifact import ArtifactError
from dsv4c.graphs.cache import from_host
from dsv4c.graphs.ops.onnx import DOMAIN
from dsv4c.targets.base import CacheSlot
from dsv4c.targets.tensorrt.device_cache import TorchCache

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn,
}


# ---- standard operators -------------------------------------------------------------------------------------
def _axes(node_attrs: dict, inputs: list, index: int) -> list[int] | None:
    """Axes from the input at `index` (opset >= 13/18) or the `axes` attribute (older opsets)."""
    if len(inputs) > index and inputs[index] is not None:
        return [int(a) for a in inputs[index].tolist()]
    return node_attrs.get("axes")


def _reduce(fn: Callable) -> Callable:
    def op(a, x, axes=None):
        dims = _axes(a, [x, axes], 1)
        keep = bool(a.get("keepdims", 1))
        if not dims:
            if a.get("noop_with_empty_axes", 0):
                return x
            dims = list(range(x.dim()))
        return fn(x, dim=dims, keepdim=keep)
    return op


def _reshape(a, x, shape):
    shape = [int(s) for s in shape.tolist()]
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _slice(a, x, starts, ends, axes=None, steps=None):
    axes = axes.tolist() if axes is not None else list(range(len(starts)))
    steps = steps.tolist() if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts.tolist(), ends.tolist(), axes, steps):
        if step <= 0:
            raise NotImplementedError("Slice with a negative step")
        n = x.shape[axis]
        start = max(0, min(n, start + n if start < 0 else start))
        end = max(0, min(n, end + n if end < 0 else end))
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def _div(a, x, y):
    if x.dtype.is_floating_point:
        return x / y
    return torch.div(x, y, rounding_mode="trunc")


def _mod(a, x, y):
    return torch.fmod(x, y) if a.get("fmod", 0) else torch.remainder(x, y)


def _cast(a, x):
    dtype = _ONNX_DTYPES[a["to"]]
    if dtype == torch.float8_e4m3fn and a.get("saturate", 1):
        x = x.float().clamp(-448.0, 448.0)
    if x.dtype.is_floating_point and not dtype.is_floating_point and dtype != torch.bool:
        x = x.trunc()
    return x.to(dtype)


def _topk(a, x, k):
    axis, k = a.get("axis", -1), int(k.reshape(-1)[0])
    largest = bool(a.get("largest", 1))
    # ONNX: equal values keep the lower index first; a stable sort guarantees it on every device
    order = torch.sort(x, dim=axis, descending=largest, stable=True).indices.narrow(axis, 0, k)
    return torch.gather(x, axis, order), order


def _pad(a, x, pads, value=None, axes=None):
    """Pad, constant mode, pads [begin_0 .. begin_n, end_0 .. end_n] over every axis (our bodies give no axes)."""
    if a.get("mode", "constant") != "constant" or axes is not None:
        raise NotImplementedError("Pad: only constant mode over all axes is interpreted")
    p, n = [int(v) for v in pads.tolist()], x.dim()
    flat = [v for d in reversed(range(n)) for v in (p[d], p[n + d])]  # torch: last axis first
    return torch.nn.functional.pad(x, flat, value=0.0 if value is None else float(value.item()))


def _scatter_nd(a, data, indices, updates):
    """ScatterND without reduction: a copy of data with updates written at the index tuples (last write wins)."""
    if a.get("reduction", "none") != "none":
        raise NotImplementedError("ScatterND: only reduction='none' is interpreted")
    k = indices.shape[-1]
    index = indices.long().reshape(-1, k)
    out = data.clone()
    out[tuple(index.t())] = updates.reshape(index.shape[0], *data.shape[k:]).to(data.dtype)
    return out


def _gather_nd(a, data, indices):
    b = a.get("batch_dims", 0)
    if b:
        raise NotImplementedError("GatherND with batch_dims")
    idx = indices.long()
    flat_idx = tuple(idx[..., i] for i in range(idx.shape[-1]))
    return data[flat_idx]


def _gemm(a, x, w, c=None):
    x = x.transpose(0, 1) if a.get("transA", 0) else x
    w = w.transpose(0, 1) if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (x @ w)
    return y if c is None else y + a.get("beta", 1.0) * c


def _shape(a, x):
    dims = list(x.shape)
    start, end = a.get("start", 0), a.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64, device=x.device)


def _constant(a):
    if "value" in a:
        return a["value"]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32), ("value_int", torch.int64),
                       ("value_ints", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    raise NotImplementedError(f"Constant with attributes {sorted(a)}")


def _clip(a, x, lo=None, hi=None):
    return x.clamp(min=lo, max=hi)


def _unsqueeze(a, x, axes=None):
    dims = sorted(d + x.dim() + len(_axes(a, [x, axes], 1)) if d < 0 else d for d in _axes(a, [x, axes], 1))
    for d in dims:
        x = x.unsqueeze(d)
    return x


def _squeeze(a, x, axes=None):
    dims = _axes(a, [x, axes], 1)
    return x.squeeze() if dims is None else x.squeeze(tuple(dims))


def _variadic(fn: Callable) -> Callable:
    def op(a, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return op


STANDARD_OPS: dict[str, Callable[..., Any]] = {
    "Add": lambda a, x, y: x + y, "Sub": lambda a, x, y: x - y, "Mul": lambda a, x, y: x * y, "Div": _div,
    "Mod": _mod, "Pow": lambda a, x, y: torch.pow(x, y), "Neg": lambda a, x: -x,
    "Reciprocal": lambda a, x: 1.0 / x, "Sqrt": lambda a, x: torch.sqrt(x), "Cos": lambda a, x: torch.cos(x),
    "Sin": lambda a, x: torch.sin(x), "Exp": lambda a, x: torch.exp(x), "Sigmoid": lambda a, x: torch.sigmoid(x),
    "Softplus": lambda a, x: torch.nn.functional.softplus(x), "Relu": lambda a, x: torch.relu(x),
    "Abs": lambda a, x: x.abs(), "Floor": lambda a, x: x.floor(), "Log": lambda a, x: torch.log(x),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Clip": _clip,
    "Equal": lambda a, x, y: x == y, "Less": lambda a, x, y: x < y, "Greater": lambda a, x, y: x > y,
    "GreaterOrEqual": lambda a, x, y: x >= y, "LessOrEqual": lambda a, x, y: x <= y,
    "And": lambda a, x, y: x & y, "Or": lambda a, x, y: x | y, "Not": lambda a, x: ~x,
    "Where": lambda a, c, x, y: torch.where(c, x, y), "Cast": _cast, "Identity": lambda a, x: x,
    "Constant": _constant, "Shape": _shape, "Reshape": _reshape, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Transpose": lambda a, x: x.permute(a.get("perm", list(range(x.dim()))[::-1])),
    "Concat": lambda a, *xs: torch.cat(xs, dim=a["axis"]), "Slice": _slice,
    "Expand": lambda a, x, shape: x * torch.ones(shape.tolist(), dtype=x.dtype, device=x.device)
    if x.dtype != torch.bool else x.expand(torch.broadcast_shapes(x.shape, tuple(shape.tolist()))),
    "Range": lambda a, start, limit, delta: torch.arange(start.item(), limit.item(), delta.item(),
                                                         dtype=start.dtype, device=start.device),
    "Gather": lambda a, x, i: torch.index_select(x, a.get("axis", 0), i.reshape(-1).long()).reshape(
        *x.shape[:a.get("axis", 0) % x.dim()], *i.shape, *x.shape[a.get("axis", 0) % x.dim() + 1:]),
    "GatherElements": lambda a, x, i: torch.gather(x, a.get("axis", 0), i.long()), "GatherND": _gather_nd,
    "MatMul": lambda a, x, y: x @ y, "Gemm": _gemm, "TopK": _topk, "Pad": _pad, "ScatterND": _scatter_nd,
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(lambda x, dim, keepdim: torch.amax(x, dim=dim, keepdim=keepdim)),
}


def _tensor(array: np.ndarray) -> torch.Tensor:
    """numpy -> torch; onnx gives bfloat16 initializers as ml_dtypes arrays, which torch cannot take directly."""
    return from_host(np.array(array))  # a writable copy: the reader's buffer is read-only


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if attr.type == onnx.AttributeProto.TENSOR:
            value = _tensor(numpy_helper.to_array(value))
        elif isinstance(value, bytes):
            value = value.decode()
        out[attr.name] = value
    return out


# ---- plugin nodes -------------------------------------------------------------------------------------------
def plugin_implementations(device: str) -> dict[str, Callable]:
    """op type -> callable(*tensor inputs, *attributes) for every dsv4 op: the Triton launchers on a GPU (or
    under TRITON_INTERPRET=1), else the registry's torch reference. The collectives are the registry's on either
    path: they reach the other ranks through torch.distributed (the process groups parallel.setup made)."""
    from dsv4c.graphs.ops.registry import OPS

    reference = {op.onnx_name: getattr(torch.ops.dsv4, name) for name, op in OPS.items()}
    if on_kernels(device):
        from dsv4c.targets.tensorrt.kernels import LAUNCHERS

        # vendor-native ops never reach a bundle as nodes (inlined at lowering); the reference stands in for them
        return {op.onnx_name: reference[op.onnx_name] if op.collective or op.vendor_native else LAUNCHERS[name]
                for name, op in OPS.items()}
    return reference


def on_kernels(device: str) -> bool:
    """Whether the plugin nodes run on the Triton kernels (which read the bundle's e8m0 weight scales as bytes),
    not on the ops' torch reference (which takes float scales)."""
    import os

    return device == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _plugin_attributes(op_type: str, attrs: dict[str, Any]) -> list[Any]:
    """The node's attributes in schema order, as the op's Python types (ONNX stores bools as ints)."""
    from dsv4c.graphs.ops.registry import OPS

    op = next(o for o in OPS.values() if o.onnx_name == op_type)
    kinds = dict(arg.split()[::-1] for arg in op.schema.split("->")[0].strip("( )").split(", "))
    cast = {"bool": bool, "int": int, "float": float}
    return [cast[kinds[name]](attrs[name]) for name in op.attributes]


# ---- the executor ----------------------------------------------------------------------------------------------
class Program:
    """One ONNX program ready to interpret: initializers as device tensors, nodes with parsed attributes."""

    def __init__(self, path: Path, device: str, plugins: dict[str, Callable]):
        from dsv4c.targets.e8m0_scales import decode_e8m0_scales
        from dsv4c.targets.onnx_bundle import initializer_array

        model = onnx.load(path, load_external_data=False)  # the .onnx.data beside it is hard-linked: read it here
        if not on_kernels(device):
            decode_e8m0_scales(model.graph)  # the reference takes float scales
        self.device = device
        self.weights = {t.name: _tensor(initializer_array(t, path.parent)).to(device) for t in model.graph.initializer}
        self.inputs = [i.name for i in model.graph.input if i.name not in self.weights]
        self.outputs = [o.name for o in model.graph.output]
        self.nodes = []
        for node in model.graph.node:
            attrs = _attributes(node)
            if node.domain == DOMAIN:
                if node.op_type not in plugins:
                    raise ArtifactError(f"{path}: plugin node {node.name!r} ({node.op_type}) has no implementation")
                fn, args = plugins[node.op_type], _plugin_attributes(node.op_type, attrs)
                self.nodes.append((node, lambda a, *xs, fn=fn, args=args: fn(*xs, *args)))
            elif node.op_type in STANDARD_OPS:
                self.nodes.append((node, STANDARD_OPS[node.op_type]))
            else:
                raise ArtifactError(f"{path}: node {node.name!r} uses {node.domain or 'ai.onnx'}.{node.op_type}, "
                                    "which the torch executor does not implement")
        self.attrs = [_attributes(node) for node, _ in self.nodes]

    def __call__(self, *values: torch.Tensor) -> list[torch.Tensor]:
        env: dict[str, Any] = dict(self.weights)
        env.update(zip(self.inputs, values))
        for (node, fn), attrs in zip(self.nodes, self.attrs):
            args = [env[n] if n else None for n in node.input]
            out = fn(attrs, *args)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for name, value in zip(node.output, outs):
                if isinstance(value, torch.Tensor) and value.device.type != self.device and value.dim() > 0:
                    value = value.to(self.device)
                env[name] = value
        return [env[n] for n in self.outputs]


class TorchExecutor:
    """Positional I/O like every executor (tokens, start_pos, n_valid, *cache -> logits, *new_cache). The caches
    stay on the device (`TorchCache`, allocated once per session): a step uploads the tokens, writes the new
    caches over the old ones in place and brings back only the logits."""

    def __init__(self, bundle_dir: Path, programs: dict[str, str], slots: Sequence[CacheSlot], device: str):
        if device == "cuda" and not torch.cuda.is_available():
            raise ArtifactError("device='cuda' needs an NVIDIA GPU and the CUDA build of torch; use emulate=True "
                                "to run the bundle on CPU")
        plugins = plugin_implementations(device)
        self.device, self.slots = device, list(slots)
        self.programs = {name: Program(bundle_dir / rel, device, plugins) for name, rel in programs.items()}

    def new_cache(self, batch_size: int) -> TorchCache:
        return TorchCache(self.slots, batch_size, self.device)

    def run(self, program: str, tokens: np.ndarray, start_pos: np.ndarray, n_valid: np.ndarray,
            cache: TorchCache) -> np.ndarray:
        upload = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        with torch.no_grad():
            logits, *new_cache = self.programs[program](upload(tokens), upload(start_pos), upload(n_valid),
                                                        *cache.tensors)
            cache.write(new_cache)
        return logits.float().cpu().numpy()


def check_device(device: str | None) -> str:
    if device not in ("cuda", "cpu"):
        raise ArtifactError(f"device {device!r}: the TensorRT bundle runs on device='cuda' (or 'cpu' to check)")
    return device


