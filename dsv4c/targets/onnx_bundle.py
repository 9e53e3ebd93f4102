"""The ONNX lowering every target shares (CPU, TensorRT, CANN), and the accelerator bundles' CPU emulation.

    export_bundle_programs: exported programs -> `<program>.onnx` + `.onnx.data` at the target's opset. At
        ONNX_OPSET (CPU) each dsv4 node carries its function body, so any ONNX Runtime runs the file. At a vendor
        parser's older opset (TensorRT, CANN) the models go *without* the bodies (a vendor parser must meet the V4
        ops as custom nodes and map them to its plugins / custom operators, never inline a portable body),
        CastLike rewritten to Cast (not in every vendor's operator list; its target type is static here), then a
        target hook rewrites the custom nodes (plugin attributes, CANN operator names).
        With `share`, a program's weights an earlier program stores refer to that program's `.data` file
        (prefill and decode read the same tensors): a bundle holds, writes and reads each weight once.
    emulation_session: the exact bundle file on ONNX Runtime CPU, with reference implementations of the custom
        nodes attached as model-local functions in memory; the weights are read from the bundle's `.data` file.

Everything here works on ModelProtos loaded *without* external data, so a 160 GB bundle is rewritten by
touching only its graph.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import helper

from dsv4c.graphs.ops.onnx import ONNX_OPSET, add_functions, write_onnx_program
from dsv4c.graphs.ops.onnx_builder import ONNX_DOMAIN, STANDARD_DOMAINS
from dsv4c.targets.base import CacheSlot, HostCache, run_bound

NodeHook = Callable[[onnx.ModelProto], None]


def export_bundle_programs(programs: dict[str, Any], bundle_dir: Path, opset: int = ONNX_OPSET,
                           hook: NodeHook | None = None,
                           weights: Callable[[str], Any] | None = None, share: bool = False,
                           rewrite: Callable[[Any], Any] | None = None) -> dict[str, str]:
    """Export each program at `opset`: at ONNX_OPSET with the function bodies, as is; below it (a vendor's opset)
    without them, post-processed and saved in place. `weights`: the values of programs exported without them
    (write_onnx_program). `share`: a program's initializers that an earlier one stores refer to that program's
    data file instead of being written again (prefill and decode read the same weights). `rewrite`: the target's
    change to each program's graph before it is written (write_onnx_program). -> {program: file}."""
    portable = opset == ONNX_OPSET
    if portable and hook is not None:
        raise ValueError("a node hook is for vendor bundles: the portable (ONNX_OPSET) bundle keeps the dsv4 nodes")
    files: dict[str, str] = {}
    stored: dict[str, onnx.TensorProto] = {}  # initializers an earlier program's data file holds
    for name, ep in programs.items():
        path = bundle_dir / f"{name}.onnx"
        model = write_onnx_program(ep, path, opset=opset, with_functions=portable, weights=weights,
                                   stored=stored if share else None, rewrite=rewrite)
        files[name] = path.name
        own = f"{path.name}.data"
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL and _location(t) == own:
                stored.setdefault(t.name, t)
        if portable:
            continue
        _check_opset(model, opset, path)
        model = inline_vendor_native(model)
        castlike_to_cast(model)
        if hook is not None:
            hook(model)
        onnx.save(model, path)  # initializers keep their references into <name>.onnx.data
    return files


def _location(t: onnx.TensorProto) -> str:
    return next(e.value for e in t.external_data if e.key == "location")


def inline_vendor_native(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace each dsv4 node of a `vendor_native` op (registry: a body of operators every vendor runs itself,
    e.g. Bf16Linear = Cast + Transpose + MatMul) with its function body, so the vendor's own layers run it and
    no plugin is needed. Initializers keep their external-data references (the weights are not read)."""
    import onnx.inliner

    from dsv4c.graphs.ops.onnx import DOMAIN, function_body
    from dsv4c.graphs.ops.registry import OPS

    native = {op.onnx_name: op for op in OPS.values() if op.vendor_native}
    used = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN and n.op_type in native})
    if not used:
        return model
    opset = next(o.version for o in model.opset_import if o.domain == "")
    bodies = [function_body(native[t]) for t in used]
    # the bodies are written at ONNX_OPSET; every operator in them has had its current form since opset 16 at the
    # latest (ScatterND-16, Shape-15, Cast / MatMul / Pad / Slice -13), so they are re-declared at the vendor's
    # opset (17 / 18) for the inliner, which refuses mixed versions
    for body in bodies:
        for o in body.opset_import:
            if o.domain == "":
                o.version = opset
    add_functions(model, bodies)
    model = onnx.inliner.inline_selected_functions(model, [(DOMAIN, t) for t in used])
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name in used)]
    del model.functions[:]
    model.functions.extend(kept)
    return model


def initializer_array(tensor: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """An initializer's values, its external data read from `base_dir`. onnx's own reader refuses a data file
    with several hard links ("hardlink attack"), and our artifacts hard-link the stage cache's weight files on
    purpose (one copy on disk); the location must be a plain file name beside the model."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return onnx.numpy_helper.to_array(tensor)
    ref = {e.key: e.value for e in tensor.external_data}
    if Path(ref["location"]).name != ref["location"]:
        raise ValueError(f"initializer {tensor.name!r}: external data location {ref['location']!r} is not a file "
                         "beside the model")
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = onnx.TensorProto.DEFAULT
    inline.raw_data = _read_external(Path(base_dir) / ref["location"], ref)
    return onnx.numpy_helper.to_array(inline)


def _read_external(data_file: Path, ref: dict[str, str]) -> bytes:
    with open(data_file, "rb") as f:
        f.seek(int(ref.get("offset", 0)))
        return f.read(int(ref["length"])) if "length" in ref else f.read()


def _check_opset(model: onnx.ModelProto, opset: int, path: Path) -> None:
    """The exporter quietly keeps a newer opset when it cannot convert down to the one asked for; a target whose
    parser stops at `opset` would then reject the bundle much later, on the machine that has the toolchain."""
    got = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), None)
    if got != opset:
        raise RuntimeError(f"{path.name}: exported at ONNX opset {got}, but the target needs opset {opset} "
                           "(the exporter could not convert this graph down; see the torch.onnx log)")


def castlike_to_cast(model: onnx.ModelProto) -> int:
    """Rewrite CastLike(x, like) to Cast(x, to=dtype(like)) where the dtype is known; returns the count."""
    types = _value_types(model)
    done = 0
    for node in model.graph.node:
        if node.op_type == "CastLike" and node.domain in STANDARD_DOMAINS and node.input[1] in types:
            to = types[node.input[1]]
            del node.input[1:]
            node.op_type = "Cast"
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("to", to))
            done += 1
    return done


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named value the graph declares (inputs, initializers, value_info, Constants)."""
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]
             if v.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    if any(n.op_type == "CastLike" and n.input[1] not in types for n in g.node):
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=False)
        types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info
                      if v.type.HasField("tensor_type")})
    return {k: v for k, v in types.items() if v}


def op_census(model: onnx.ModelProto) -> Counter:
    """(domain, op_type) -> count over the main graph and subgraphs."""
    counts: Counter = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[(node.domain or ONNX_DOMAIN, node.op_type)] += 1
            for a in node.attribute:
                for sub in [a.g] if a.HasField("g") else list(a.graphs):
                    walk(sub)

    walk(model.graph)
    return counts


def standard_op_types(model: onnx.ModelProto) -> set[str]:
    return {op for (domain, op) in op_census(model) if domain == ONNX_DOMAIN}


def custom_nodes(model: onnx.ModelProto, domain: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == domain]


def emulation_session(path: Path, functions: Iterable[onnx.FunctionProto], prepare: NodeHook | None = None,
                      threads: int | None = None, custom_ops_library: str | None = None):
    """An ORT CPU session over the bundle file at `path`: `prepare` undoes target-only node details (plugin
    attributes, vendor op names) in memory, the reference `functions` are attached, and the default opset is
    raised to the function bodies' (opsets 18..22 -> 23 changed no semantics of the ops our graphs use: only new
    element types). Weights come from the `.data` file beside `path`."""
    import onnxruntime as ort

    model = onnx.load(path, load_external_data=False)
    if prepare is not None:
        prepare(model)
    for o in model.opset_import:
        if o.domain in STANDARD_DOMAINS:
            o.version = ONNX_OPSET
    add_functions(model, functions)
    model.ir_version = max(model.ir_version, 10)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    if custom_ops_library:
        options.register_custom_ops_library(custom_ops_library)
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def read_op_list(path: Path) -> set[str]:
    """An operator list kept in the repo: one op type per line, `#` comments (the file names its source)."""
    ops = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ops.add(line)
    return ops


class EmulatedExecutor:
    """Runs a bundle's programs on ONNX Runtime CPU through `emulation_session` (positional I/O, like the CPU
    engine: tokens, start_pos, n_valid, *cache -> logits, *new_cache; host caches, `HostCache`)."""

    def __init__(self, bundle_dir: Path, programs: dict[str, str], slots: Sequence[CacheSlot],
                 functions: list[onnx.FunctionProto], prepare: NodeHook | None = None, threads: int | None = None):
        self.slots = list(slots)
        self.sessions = {name: emulation_session(bundle_dir / rel, functions, prepare, threads)
                         for name, rel in programs.items()}

    def new_cache(self, batch_size: int) -> HostCache:
        return HostCache(self.slots, batch_size)

    def run(self, program: str, tokens: np.ndarray, start_pos: np.ndarray, n_valid: np.ndarray,
            cache: HostCache) -> np.ndarray:
        return run_bound(self.sessions[program], program, (tokens, start_pos, n_valid), cache)
