"""Runtime side of the CPU target: the artifact's ONNX programs on ONNX Runtime, with the dsv4 C++ kernel
library when the artifact carries one (else ORT inlines the ops' ONNX function bodies).

A rank of a multi-device engine (dsv4c.runtime.mesh) is the same executor on the rank's engine directory, plus
`connect_collectives`: the library's AllReduce / AllGather kernels call back into Python, where torch.distributed
(gloo, graphs/parallel.py) exchanges the buffers with the other ranks."""

from __future__ import annotations

import ctypes
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from dsv4c.artifact import ArtifactError, Manifest
from dsv4c.heap import trim_heap
from dsv4c.targets.base import CacheSlot, HostCache, cache_slots, ort_session, run_bound

if TYPE_CHECKING:
    import onnxruntime

KERNELS = "libdsv4_ops.so"


class OrtExecutor:
    """Positional I/O: tokens, start_pos, n_valid, *cache -> logits, *new_cache; the caches are host arrays
    (`HostCache`) bound to the sessions' inputs and outputs (IOBinding). A cache that only its CacheWrite node
    reads (the compressed entries and indexer keys, which grow with the context; in decode the compressor state
    too) is updated in place: its output is bound to its own input buffer and the kernel writes the step's rows
    only. The others are written into the cache's spare buffers, which then become the cache."""

    def __init__(self, engine_dir: Path, programs: dict[str, str], slots: Sequence[CacheSlot],
                 threads: int | None = None):
        import onnx

        self.slots = list(slots)
        library = engine_dir / KERNELS
        self.kernels = library.is_file()
        self.library = library
        self.sessions = {}
        models = {name: onnx.load(str(engine_dir / rel), load_external_data=False) for name, rel in programs.items()}
        if not self.kernels and any(folded_for_kernels(m.graph) for m in models.values()):
            raise ArtifactError(f"{engine_dir}: the engine's programs were built for the dsv4 kernel library "
                                f"({KERNELS}), which is missing there; restore it or rebuild the artifact")
        # the programs share one weights file: mapped once here, every session reads the same pages
        weights, self.mapped = mapped_initializers(models, engine_dir)
        self.threads = {name: program_threads(name, threads, sum(m.nbytes for m in self.mapped)) for name in programs}
        # no planned buffer reuse (ORT's enable_mem_reuse) in either program. On a decode step's intermediates, a
        # few KB per token, it costs more than it saves (benchmarks/decode_ab.py --reuse-buffers, per step: tiny
        # 0.95 vs 1.00 ms at batch 1, 2.74 vs 2.84 at batch 8; mini-1b 28.4 vs 29.0 and 81.8 vs 83.1); on a prefill
        # chunk it holds more at once than allocating each output does, in the same time (mini-1b, 8 x 256 tokens:
        # the engine's peak RSS 1,560 vs 1,802 MiB, ORT's blocks over 1 MiB at once 307 vs 526 MiB; 5.45 vs 5.39 s)
        for name, model in models.items():
            kernels = str(library) if self.kernels else None
            drop_node_metadata(model)
            self.sessions[name] = ort_session(model.SerializeToString(), custom_ops_library=kernels,
                                              threads=self.threads[name], initializers=weights[name],
                                              reuse_buffers=False, data_dir=engine_dir)
        # without the library ORT runs CacheWrite's function body, which has no in-place path
        self.in_place = {n: updated_in_place(m.graph) if self.kernels else [False] * len(self.slots)
                         for n, m in models.items()}
        self.run_options = {name: release_workspace_after() if name == "prefill" else None for name in programs}
        self.release_scratch = library_function(library, "dsv4_release_scratch", []) if self.kernels else None
        del models
        trim_heap()  # the parsed programs' memory (mini-1b width, 8 layers: 15 MB that malloc would keep)

    def connect_collectives(self) -> None:
        """Run this engine's collective nodes on torch.distributed: the caller has initialised the process group
        and `parallel.setup` the rank's groups. Collectives have no ONNX function body, so they need the library."""
        if not self.kernels:
            raise ArtifactError(f"{self.library.parent}: a multi-device engine needs the dsv4 kernel library "
                                f"({KERNELS}) for its collectives; rebuild on a machine with a C++ compiler")
        install_collectives(self.library)

    def drop_weight_pages(self) -> bool:
        """From now on, give each node's weight pages back after it ran (the kernel library's
        dsv4_drop_weight_pages over this executor's weights maps): the build's validation runs the whole engine to
        check it and would otherwise hold every weight page it read, so its peak would grow with the model's depth.
        The page cache keeps them (a later read is a minor fault). A serving engine keeps its pages. False where
        there is no library, or one built before it had this function: then nothing changes."""
        drop = library_function(self.library, "dsv4_drop_weight_pages",
                                [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]) if self.kernels else None
        if drop is None or not self.mapped:
            return False
        n = len(self.mapped)
        starts = (ctypes.c_size_t * n)(*(m.ctypes.data for m in self.mapped))
        sizes = (ctypes.c_size_t * n)(*(m.nbytes for m in self.mapped))
        drop(starts, sizes, n)
        return True

    def new_cache(self, batch_size: int) -> HostCache:
        return HostCache(self.slots, batch_size)

    def run(self, program: str, tokens: np.ndarray, start_pos: np.ndarray, n_valid: np.ndarray,
            cache: HostCache) -> np.ndarray:
        logits = run_bound(self.sessions[program], program, (tokens, start_pos, n_valid), cache,
                           self.in_place[program], self.run_options[program])
        if program == "prefill":  # a decoding engine need not hold what a prefill chunk's work needed
            if self.release_scratch is not None:
                self.release_scratch()  # the kernels' large scratch blocks, kept for reuse within the prefill
            # the smaller ones come from malloc's heap, which keeps them once freed (before either, mini-1b after
            # 512 tokens x 8 sequences held 1,404 MiB where it needs 962; the trim takes ~15 ms)
            trim_heap()
        return logits


# Below this many bytes of weights a decode step is a few hundred kernel calls of a few microseconds each, which
# the kernels run inline (ops.cc: inline_work): a second thread only spins between them, and a spinning worker
# leaves background work no core but the main thread's. tiny (6 MB), batch 1 / 2 / 8, 2 threads vs 1: mean step
# 1.30 / 2.32 / 3.59 vs 1.05 / 1.40 / 3.11 ms (5-15 % of steps 4 ms late, one scheduler tick). flash-cpu-mini
# (1 GB) splits its work: 26.9 ms per step with 2 threads, 45.5 with 1.
SMALL_MODEL_BYTES = 64 << 20


def program_threads(program: str, threads: int | None, weight_bytes: int) -> int | None:
    """Intra-op threads of a program's session: `threads` (None: ONNX Runtime's default, one per core), except one
    for the decode program of a model smaller than SMALL_MODEL_BYTES."""
    if program == "decode" and weight_bytes < SMALL_MODEL_BYTES:
        return 1
    return threads


def library_function(library: Path, name: str, argtypes: list):
    """The kernel library's function `name` (returning nothing), or None for a library built before it had one.
    ctypes loads the library by the path ORT loaded it from: one copy."""
    function = getattr(ctypes.CDLL(str(library)), name, None)
    if function is not None:
        function.argtypes, function.restype = argtypes, None
    return function


def release_workspace_after() -> onnxruntime.RunOptions:
    """RunOptions that hand ORT's arena memory back after the run. ORT keeps its arena at the largest size a run
    needed: after one prefill chunk (its activations for chunk x batch tokens) the engine would hold that
    workspace for good while it decodes, in mini-1b's engine at batch 8 1.2 GB more than the decode steps need.
    A prefill chunk is long enough that growing it again costs nothing measurable (mini-1b, 600 tokens of 8
    sequences: 13.6 s either way)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def folded_for_kernels(graph) -> bool:
    """Whether a graph pass of the kernel library (dsv4c.targets.cpu.passes) rewrote this program: its nodes then
    mean more than their ONNX function bodies say."""
    from dsv4c.targets.cpu.passes import ROUND_ATTRIBUTE
    from dsv4c.targets.e8m0_scales import reads_e8m0_scales

    return any(a.name == ROUND_ATTRIBUTE for node in graph.node for a in node.attribute) or reads_e8m0_scales(graph)


def drop_node_metadata(model) -> None:
    """Clear the exporter's per-node and per-value metadata (each node's FX node, module scope and stack trace;
    tests/mutants.py finds nodes by them) before ONNX Runtime parses the program: it keeps every node's entries
    for the session's life (mini-1b's width, 8 layers: 11 MB of the engine's resident heap, 3.7 of the prefill
    program's 4.3 MB)."""
    for graph in (model.graph, *model.functions):
        for node in graph.node:
            del node.metadata_props[:]
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        del value.metadata_props[:]


def updated_in_place(graph) -> list[bool]:
    """Per cache (inputs after tokens, start_pos, n_valid; outputs after the logits): whether its new value can be
    written into its own buffer. True when the output comes from a CacheWrite of that input and nothing else
    reads the input: no node can see the rows the step writes before they are meant to be there. (A ring the
    attention also reads beside the new tokens, or state re-gathered into a new order, is not.)"""
    weights = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in weights][3:]
    readers: dict[str, list] = {}
    producer = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node
    flags = []
    for name, out in zip(inputs, [o.name for o in graph.output][1:]):
        node = producer.get(out)
        flags.append(node is not None and node.op_type == "CacheWrite" and node.input[0] == name
                     and readers.get(name) == [node])
    return flags


def mapped_initializers(programs: dict, engine_dir: Path) -> tuple[dict[str, dict], list[np.ndarray]]:
    """Per program (name -> its ModelProto, loaded without external data), its external-data initializers as
    OrtValues over one read-only memory map per weights file, shared by all programs; and the maps, which the
    OrtValues do not keep alive. Left to itself, each ORT session maps the file on its own: the prefill and decode
    programs then count every page they both touch twice in the process's resident set."""
    import onnxruntime as ort
    from onnx.external_data_helper import uses_external_data

    files: dict[Path, np.memmap] = {}
    values: dict[str, dict] = {}
    for program, model in programs.items():
        values[program] = {}
        for init in model.graph.initializer:
            if not uses_external_data(init):
                continue
            info = {e.key: e.value for e in init.external_data}
            file = engine_dir / info["location"]
            if file not in files:
                files[file] = np.memmap(file, dtype=np.uint8, mode="r")
            values[program][init.name] = _tensor_value(files[file], int(info.get("offset", 0)), init, ort)
    return values, list(files.values())


def _tensor_value(data: np.ndarray, offset: int, init, ort):
    import onnx

    bf16 = init.data_type == onnx.TensorProto.BFLOAT16
    dtype = np.dtype(np.uint16 if bf16 else onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
    array = data[offset:offset + dtype.itemsize * math.prod(init.dims)].view(dtype).reshape(tuple(init.dims))
    if bf16:  # numpy has no bfloat16: the bits, typed by ORT
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, init.data_type)
    return ort.OrtValue.ortvalue_from_numpy(array)


def load_executor(root: Path, manifest: Manifest, emulate: bool = False, threads: int | None = None,
                  engine_dir: Path | None = None) -> OrtExecutor:
    """`engine_dir`: where the engine files are (default `root/engine`; a mesh rank's `engine/rank<r>`)."""
    fmt = manifest.engine.get("format")
    if fmt != "onnx":
        raise ArtifactError(f"{root}: engine format {fmt!r} is not runnable by this dsv4c (expected 'onnx'); "
                            "rebuild the artifact")
    _check_toolchain(manifest)
    return OrtExecutor(engine_dir or root / "engine", manifest.engine["programs"], cache_slots(manifest.engine),
                       threads)


def _check_toolchain(manifest: Manifest) -> None:
    import onnxruntime

    built_with = manifest.data.get("toolchain", {}).get("onnxruntime")
    have = onnxruntime.__version__
    if built_with and built_with.split(".")[:2] != have.split(".")[:2]:
        raise ArtifactError(f"artifact was built for onnxruntime {built_with}, this machine has {have}; "
                            f"install onnxruntime=={built_with} or rebuild the artifact here")


# ---- collectives: the kernel library's callback into torch.distributed -------------------------------------------
# (op, group, size, x, y, x's shape, x's rank, error buffer, its length) -> 0 or non-zero; see ops.cc "collectives"
COLLECTIVE_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int32, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.c_void_p,
                                 ctypes.c_size_t)
ALL_REDUCE, ALL_GATHER = 0, 1  # ops.cc kCollectiveAllReduce / kCollectiveAllGather
_installed: dict[str, object] = {}  # library path -> its callback: kept alive while the library may call it


def _float_view(address: int, shape: tuple[int, ...]):
    """A torch tensor over `prod(shape)` float32s at `address` (no copy)."""
    import torch

    n = math.prod(shape)
    if n == 0:  # ORT may hand an empty tensor a null pointer
        return torch.empty(shape, dtype=torch.float32)
    array = np.ctypeslib.as_array((ctypes.c_float * n).from_address(address))
    return torch.from_numpy(array).view(shape)


def _collective(op: int, group: int, size: int, x_ptr: int | None, y_ptr: int | None, shape_ptr, rank: int,
                error: int | None, error_len: int) -> int:
    """Called by the AllReduce / AllGather kernels (ORT's thread; ctypes takes the GIL). The torch implementation
    returns a new tensor, copied into ORT's output buffer. Any exception becomes the kernel's error message (an
    exception must not cross back into C)."""
    try:
        from dsv4c.graphs import parallel

        shape = tuple(int(shape_ptr[i]) for i in range(rank))
        x = _float_view(x_ptr or 0, shape)
        if op == ALL_REDUCE:
            y = parallel.all_reduce(x, group)
        elif op == ALL_GATHER:
            y = parallel.all_gather(x, group, size)
        else:
            raise ValueError(f"unknown collective {op}")
        _float_view(y_ptr or 0, tuple(y.shape)).copy_(y)
        return 0
    except BaseException as e:  # noqa: BLE001 - reported through the kernel, which fails the ORT run
        message = f"{type(e).__name__}: {e}".encode(errors="replace")[:max(int(error_len), 0)]
        if error:
            ctypes.memmove(error, message, len(message))
        return 1


def install_collectives(library: Path) -> None:
    """Point the kernel library's collectives at torch.distributed, in this process. ctypes loads the library by
    the path ORT loaded it from, so both share one copy (dlopen returns the loaded object) and one callback."""
    key = str(Path(library).resolve())
    if key in _installed:
        return
    callback = COLLECTIVE_FN(_collective)
    lib = ctypes.CDLL(str(library))
    lib.dsv4_set_collective.argtypes = [COLLECTIVE_FN]
    lib.dsv4_set_collective.restype = None
    lib.dsv4_set_collective(callback)
    _installed[key] = (lib, callback)
