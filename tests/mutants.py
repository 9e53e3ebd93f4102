"""Deliberately broken engines for the validation gate's tests: each mutant edits the lowered ONNX programs of a
built CPU artifact (the engine only; the PyTorch reference stays right) and is run through the artifact's own
ONNX Runtime executor. Nodes are found by what the exporter records on them (module scope, source line), and a
mutant that cannot find its nodes raises instead of silently leaving the engine correct.

    mutant_executor(artifact, name, workdir) -> an executor to put in `Engine.executor`
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dsv4c.targets.onnx_bundle import initializer_array

INT64_MAX = 9223372036854775807


# ---- finding nodes --------------------------------------------------------------------------------------------
def _meta(node: onnx.NodeProto, key: str) -> str:
    return next((p.value for p in node.metadata_props if p.key == key), "")


def _scope(node: onnx.NodeProto) -> list[str]:
    text = _meta(node, "pkg.torch.onnx.name_scopes")
    return ast.literal_eval(text) if text else []


def _source(node: onnx.NodeProto) -> str:
    return _meta(node, "pkg.torch.onnx.stack_trace")


def _one(nodes: list[onnx.NodeProto], what: str) -> onnx.NodeProto:
    if len(nodes) != 1:
        raise LookupError(f"mutant: expected one {what}, found {len(nodes)} (did the lowering change?)")
    return nodes[0]


def _find(graph: onnx.GraphProto, op_type: str, module: str, source: str = "", domain: str | None = None,
          direct: bool = True) -> list[onnx.NodeProto]:
    """Nodes of `op_type` exported from `module` (directly in it, or anywhere below with direct=False) whose
    Python stack trace contains `source`."""
    out = []
    for n in graph.node:
        sc = _scope(n)
        inside = (len(sc) >= 2 and sc[-2] == module) if direct else module in sc
        if n.op_type == op_type and inside and source in _source(n) and (domain is None or n.domain == domain):
            out.append(n)
    return out


# ---- editing --------------------------------------------------------------------------------------------------
class Edit:
    def __init__(self, graph: onnx.GraphProto, base_dir: Path):
        self.graph, self.base_dir, self.count = graph, base_dir, 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"mutant_{stem}_{self.count}"

    def const(self, value, dtype=None) -> str:
        name = self.name("const")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def initializer(self, name: str) -> np.ndarray:
        tensor = next(t for t in self.graph.initializer if t.name == name)
        return initializer_array(tensor, self.base_dir)

    def node(self, op: str, *inputs: str, **attrs) -> str:
        out = self.name(op.lower())
        self.graph.node.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def after(self, node: onnx.NodeProto, index: int, transform: Callable[[str], str]) -> None:
        """Route output `index` of `node` through `transform` (new nodes); consumers see the transformed value."""
        original = node.output[index]
        raw = self.name("raw")
        node.output[index] = raw
        result = transform(raw)
        for n in self.graph.node:  # the transform's last node produced `result`: rename it to the original
            for i, o in enumerate(n.output):
                if o == result:
                    n.output[i] = original
        _toposort(self.graph)


def _toposort(graph: onnx.GraphProto) -> None:
    """Appended nodes must come after their inputs' producers (ONNX requires topological order)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise RuntimeError("mutant: graph has a cycle after editing")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


# ---- the mutants (each: Edit, program name -> None) -----------------------------------------------------------
def rope_wrong_dims(e: Edit, program: str, layer: int = 1) -> None:
    """Layer `layer`'s query RoPE rotates the leading rope_dim dims instead of the trailing ones: the Rope node
    sees x with its first r dims moved to the end, and its output is moved back."""
    node = _one(_find(e.graph, "Rope", f"model.layers.{layer}.attn", "ops.rope(q, self.freqs, pos", domain="dsv4"),
                "query Rope")
    r = 2 * e.initializer(node.input[1]).shape[0]
    last = e.const([-1], np.int64)

    def move(x: str, n: int) -> str:  # x[..., n:] followed by x[..., :n] (n < 0: counted from the end)
        head = e.node("Slice", x, e.const([0], np.int64), e.const([n], np.int64), last)
        tail = e.node("Slice", x, e.const([n], np.int64), e.const([INT64_MAX], np.int64), last)
        return e.node("Concat", tail, head, axis=-1)

    node.input[0] = move(node.input[0], r)
    e.after(node, 0, lambda y: move(y, -r))


def window_one_short(e: Edit, program: str) -> None:
    """Every layer's sliding window ends one token early: the oldest window key (index column 0) is dropped."""
    for attn in [n for n in e.graph.node if n.op_type == "SparseAttn"]:
        idx = attn.input[4]
        first = e.node("Slice", idx, e.const([0], np.int64), e.const([1], np.int64), e.const([-1], np.int64))
        none = e.node("Add", e.node("Mul", first, e.const(0, np.int64)), e.const(-1, np.int64))
        rest = e.node("Slice", idx, e.const([1], np.int64), e.const([INT64_MAX], np.int64), e.const([-1], np.int64))
        attn.input[4] = e.node("Concat", none, rest, axis=-1)
    _toposort(e.graph)


def compressor_one_step_late(e: Edit, program: str, layer: int = 2) -> None:
    """Layer `layer`'s KV compressor closes each window one token late: `last = (j + 1) * m` (not `- 1`)."""
    sub = _one(_find(e.graph, "Sub", f"model.layers.{layer}.attn.compressor", "last = (j + 1) * m - 1"),
               "compressor window end")
    sub.input[1] = e.const(0, np.int64)


def indexer_topk_one_short(e: Edit, program: str, layer: int = 1) -> None:
    """Layer `layer`'s indexer returns top-(k-1): its lowest-scoring pick becomes -1."""
    node = _one(_find(e.graph, "IndexerTopK", f"model.layers.{layer}.attn.indexer"), "IndexerTopK")

    def drop_last(picks: str) -> str:
        keep = e.node("Slice", picks, e.const([0], np.int64), e.const([-1], np.int64), e.const([-1], np.int64))
        last = e.node("Slice", picks, e.const([-1], np.int64), e.const([INT64_MAX], np.int64),
                      e.const([-1], np.int64))
        none = e.node("Add", e.node("Mul", last, e.const(0, np.int64)), e.const(-1, np.int64))
        return e.node("Concat", keep, none, axis=-1)
    e.after(node, 0, drop_last)


def experts_swapped(e: Edit, program: str, layer: int = 1, a: int = 0, b: int = 1) -> None:
    """Layer `layer` runs expert `b` where routing picked `a`, and `a` for `b`."""
    moe = _one(_find(e.graph, "MoeExperts", f"model.layers.{layer}.ffn.experts"), "MoeExperts")
    idx = moe.input[2]
    is_a, is_b = e.node("Equal", idx, e.const(a, np.int64)), e.node("Equal", idx, e.const(b, np.int64))
    moe.input[2] = e.node("Where", is_a, e.const(b, np.int64),
                          e.node("Where", is_b, e.const(a, np.int64), idx))
    _toposort(e.graph)


def cache_row_not_written(e: Edit, program: str, cache_index: int = 0, row: int = 3) -> None:
    """Decode: the returned cache keeps its old row `row` of cache tensor `cache_index` (layers.0.win: a window
    slot), whatever the step computed for it. (Selected in float32: ONNX Runtime has no Where for a bf16 cache.)"""
    if program != "decode":
        return
    out, cache_in = e.graph.output[1 + cache_index], e.graph.input[3 + cache_index]
    shape = [d.dim_value for d in cache_in.type.tensor_type.shape.dim]
    mask = np.zeros([1, shape[1]] + [1] * (len(shape) - 2), dtype=bool)
    mask[0, row] = True
    stored = cache_in.type.tensor_type.elem_type
    old, new = (e.node("Cast", name, to=onnx.TensorProto.FLOAT) for name in (cache_in.name, out.name))
    out.name = e.node("Cast", e.node("Where", e.const(mask), old, new), to=stored)


def fp8_activation_scale_2x(e: Edit, program: str, layer: int = 1) -> None:
    """Layer `layer`'s attention output projection (an FP8 linear with activation quantization) dequantises its
    activations with twice their scale: its output doubles."""
    linear = _one(_find(e.graph, "Fp8Linear", f"model.layers.{layer}.attn.wo_b"), "wo_b Fp8Linear")
    if not any(a.name == "act_quant" and a.i == 1 for a in linear.attribute):
        raise LookupError("mutant: wo_b has no activation quantization (plain numerics?)")
    e.after(linear, 0, lambda y: e.node("Mul", y, e.const(np.float32(2.0))))


def sink_dropped(e: Edit, program: str, layer: int = 1) -> None:
    """Layer `layer`'s attention softmax loses its per-head sink term."""
    attn = _one(_find(e.graph, "SparseAttn", f"model.layers.{layer}.attn"), "SparseAttn")
    heads = e.initializer(attn.input[3]).shape
    attn.input[3] = e.const(np.full(heads, -1e30, dtype=np.float32))


def hc_post_comb_swapped(e: Edit, program: str, layer: int = 1) -> None:
    """Layer `layer`'s attention hyper-connection reads its mixing weights as [pre | comb | post] while the
    checkpoint stores [pre | post | comb]: the post weights come from comb's rows and vice versa."""
    pre = _one([n for n in _find(e.graph, "HcPre", f"model.layers.{layer}", domain="dsv4")
                if n.input[1].endswith("hc_attn_fn")], "attention HcPre")
    mix = e.initializer(pre.input[1]).shape[0]  # (2 + n) * n
    n = next(k for k in range(1, 64) if (2 + k) * k == mix)
    perm = list(range(n)) + list(range(n + n * n, 2 * n + n * n)) + list(range(n, n + n * n))
    pre.input[1] = e.const(e.initializer(pre.input[1])[perm])
    pre.input[3] = e.const(e.initializer(pre.input[3])[perm])


MUTANTS: dict[str, Callable[[Edit, str], None]] = {
    "rope_wrong_dims": rope_wrong_dims,
    "window_one_short": window_one_short,
    "compressor_one_step_late": compressor_one_step_late,
    "indexer_topk_one_short": indexer_topk_one_short,
    "experts_swapped": experts_swapped,
    "cache_row_not_written": cache_row_not_written,
    "fp8_activation_scale_2x": fp8_activation_scale_2x,
    "sink_dropped": sink_dropped,
    "hc_post_comb_swapped": hc_post_comb_swapped,
}


def write_mutant(artifact: Path, name: str, workdir: Path) -> tuple[Path, dict[str, str]]:
    """The artifact's engine programs with mutant `name` applied, in `workdir` (weights and kernels linked)."""
    import json

    engine_dir = artifact / "engine"
    info = json.loads((artifact / "manifest.json").read_text())["engine"]
    workdir.mkdir(parents=True, exist_ok=True)
    for f in engine_dir.iterdir():  # copies: ONNX Runtime refuses external data outside the model's directory
        if not f.name.endswith(".onnx"):
            shutil.copy(f, workdir / f.name)
    for program, rel in info["programs"].items():
        model = onnx.load(engine_dir / rel, load_external_data=False)
        MUTANTS[name](Edit(model.graph, engine_dir), program)
        onnx.save(model, workdir / rel)
    return workdir, info["programs"]


def mutant_executor(artifact: Path, name: str, workdir: Path, threads: int | None = None):
    from dsv4c.artifact import read_manifest
    from dsv4c.targets.base import cache_slots
    from dsv4c.targets.cpu.executor import OrtExecutor

    engine_dir, programs = write_mutant(artifact, name, workdir)
    return OrtExecutor(engine_dir, programs, cache_slots(read_manifest(artifact).engine), threads=threads)
