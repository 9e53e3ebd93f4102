"""The interface every target implements; targets are peers and never import the compiler's stages.

A target answers four questions for a recipe:
  * `check(recipe)`: can it build this here (formats, ops, toolchain)? -> problems, fallbacks it will apply
  * `lower(programs, bundle_dir, recipe, meta)`: exported programs -> a self-contained bundle (ONNX + op
    impls + `bundle.json` carrying `meta`: cache layout, vocab size, eos id)
  * `build(bundle_dir, engine_dir, recipe)`: bundle -> engine files + `engine.json` (what the runtime needs),
    or ToolchainMissing naming what is absent
  * `dsv4c.targets.<kind>.executor.load_executor(root, manifest, emulate)`: the runtime side, an `Executor`

An executor owns the caches, in its own memory (host arrays for ONNX Runtime CPU, device buffers for the
accelerators): `new_cache(batch_size)` allocates one handle per session, once; `run` reads and updates it in
place, so a step moves only tokens in and logits out. Host copies of a cache (`to_host` / `from_host`) are for
validation and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

from dsv4c.artifact import ArtifactError

if TYPE_CHECKING:
    import onnxruntime


class ToolchainMissing(RuntimeError):
    """The toolchain a build step needs is absent or mismatched; the message names it and how to get it."""


@dataclass
class TargetCheck:
    problems: list[str] = field(default_factory=list)  # fatal: the recipe cannot be built for this target
    fallbacks: list[dict[str, str]] = field(default_factory=list)  # applied substitutions, recorded in manifest
    toolchain: dict[str, str] = field(default_factory=dict)  # tool -> version ("missing" when absent)


class Target(Protocol):
    kind: str
    # copies of the weights in the bundle (`lower`), the engine (`build`) and the artifact: what `plan` sizes disk by
    weight_copies: dict[str, int]
    # True when `build` hard-links the bundle's weight files into the engine (no new copy on disk); the artifact
    # always hard-links the engine's (dsv4c.files), so `plan` counts each inode once
    engine_links_bundle: bool
    # bytes per weight scale in the engine: 1 where it keeps the checkpoint's e8m0 bytes, 4 for float32 (`plan`)
    scale_bytes: int

    def cache_copies(self, field: str) -> int:
        """How many buffers of a cache field (CacheEntry.field) the target's runtime holds per session: 2 where a
        step writes the field's new value beside the old one (`plan` sizes the engine by it)."""

    def kernel_scratch(self, op: str, args: tuple) -> int:
        """Bytes the target's kernel for dsv4 op `op` holds beyond its outputs while it runs, for the op's
        arguments `args` (meta tensors and attributes, in schema order): `plan` counts them in the workspace."""

    def session_state(self, layers: int) -> int:
        """Bytes the target's runtime holds for an engine of `layers` transformer layers beyond its weights,
        caches, activations and kernel scratch (sessions, code): `plan` counts them in the engine's workspace."""

    def check(self, recipe: Any) -> TargetCheck: ...

    def lower(self, programs: dict[str, Any], bundle_dir: Path, recipe: Any, meta: dict[str, Any],
              weights: Callable[[str], Any] | None = None) -> None:
        """The exported programs -> the target's bundle in `bundle_dir`. `weights` (initializer name -> tensor)
        supplies the values of programs exported without them (compiler.export.weightless_model)."""

    def build(self, bundle_dir: Path, engine_dir: Path, recipe: Any) -> None: ...


@dataclass(frozen=True)
class CacheSlot:
    """One cache tensor of the engine, as the manifest's `engine.cache` records it."""
    name: str
    shape: tuple[int, ...]  # per sequence (no batch dim)
    fill: float
    dtype: str = "float32"  # what the engine stores; manifests before dtype was recorded: float32

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> "CacheSlot":
        return cls(entry["name"], tuple(entry["shape"]), float(entry["fill"]), entry.get("dtype", "float32"))


def cache_slots(engine: dict[str, Any]) -> list[CacheSlot]:
    """The cache layout of a manifest's `engine` section."""
    return [CacheSlot.from_manifest(c) for c in engine["cache"]]


class Cache(Protocol):
    """The caches of `batch_size` sequences, held by the executor that made them. Slot indices are rows of the
    batch; every method works in the executor's memory except `to_host` / `from_host`."""
    batch_size: int

    def reset(self, slot: int) -> None: ...  # that sequence's caches back to their fill

    def take(self, slots: np.ndarray) -> "Cache": ...  # a new handle with a copy of these sequences

    def put(self, slots: np.ndarray, part: "Cache") -> None: ...  # `part` (from take) written back to the slots

    def to_host(self) -> list[np.ndarray]: ...  # copies, in manifest order, [batch, *shape] each

    def from_host(self, arrays: Sequence[np.ndarray]) -> None: ...  # overwrite every tensor with these values


class Executor(Protocol):
    def new_cache(self, batch_size: int) -> Cache: ...

    def run(self, program: str, tokens: np.ndarray, start_pos: np.ndarray, n_valid: np.ndarray,
            cache: Cache) -> np.ndarray: ...  # -> logits; `cache` is updated in place


def check_host_arrays(slots: Sequence[CacheSlot], batch_size: int, arrays: Sequence[np.ndarray]) -> None:
    """`from_host` input has one [batch_size, *shape] array per slot (a broadcast would hide a wrong batch)."""
    want = [(batch_size, *s.shape) for s in slots]
    got = [tuple(np.shape(a)) for a in arrays]
    if got != want:
        raise ValueError(f"from_host: cache arrays of shapes {got}, the cache holds {want}")


class HostCache:
    """Caches as numpy arrays in host memory: the executors on ONNX Runtime CPU (the CPU engine and the
    emulation of accelerator bundles), whose sessions take and return host arrays. `run` either puts in the
    arrays ORT returns (`replace`) or has ORT write into the cache's own buffers (`spare` / `swap`): no copy."""

    def __init__(self, slots: Sequence[CacheSlot], batch_size: int, arrays: list[np.ndarray] | None = None):
        self.slots, self.batch_size = list(slots), batch_size
        self.spares: list[np.ndarray | None] | None = None
        self.bindings: dict[tuple, Any] = {}  # run_bound's IOBindings, by the buffers they bind
        self.arrays = arrays if arrays is not None else [
            np.full((batch_size, *s.shape), s.fill, dtype=numpy_dtype(s.dtype)) for s in self.slots]

    def replace(self, arrays: list[np.ndarray]) -> None:
        self.arrays = list(arrays)
        self.bindings.clear()  # they hold the old buffers

    def spare(self, i: int) -> np.ndarray:
        """A second buffer for cache i, for an executor that writes the step's new value beside the old one."""
        if self.spares is None:
            self.spares = [None] * len(self.arrays)
        mine = self.arrays[i]
        if self.spares[i] is None or self.spares[i].shape != mine.shape or self.spares[i].dtype != mine.dtype:
            self.spares[i] = np.empty_like(mine)
        return self.spares[i]

    def swap(self, i: int) -> None:
        """The spare buffer of cache i, now written, becomes the cache."""
        self.arrays[i], self.spares[i] = self.spares[i], self.arrays[i]

    def reset(self, slot: int) -> None:
        for spec, array in zip(self.slots, self.arrays):
            array[slot] = spec.fill

    def take(self, slots: np.ndarray) -> "HostCache":
        return HostCache(self.slots, len(slots), [a[slots] for a in self.arrays])

    def put(self, slots: np.ndarray, part: "HostCache") -> None:
        for whole, piece in zip(self.arrays, part.arrays):
            whole[slots] = piece

    def to_host(self) -> list[np.ndarray]:
        return [a.copy() for a in self.arrays]

    def from_host(self, arrays: Sequence[np.ndarray]) -> None:
        check_host_arrays(self.slots, self.batch_size, arrays)
        for mine, value in zip(self.arrays, arrays):
            np.copyto(mine, value)


def run_bound(session, program: str, steps: Sequence[np.ndarray], cache: HostCache,
              in_place: Sequence[bool] | None = None, run_options=None) -> np.ndarray:
    """One run of an ONNX Runtime session with positional I/O (tokens, start_pos, n_valid, *cache -> logits,
    *new_cache), the caches bound in place (IOBinding: bf16 caches, which ORT's numpy feeds cannot take, and no
    copy of what it returns). Cache i's output is written into its own buffer where in_place[i] (the caller
    knows nothing else reads it), else into the cache's spare buffer, swapped in afterwards. `run_options`: ORT
    RunOptions for this run (None: the defaults)."""
    in_place = in_place if in_place is not None else [False] * len(cache.arrays)
    targets = [array if in_place[i] else cache.spare(i) for i, array in enumerate(cache.arrays)]
    # binding 2 x 19 caches costs ~0.25 ms (tiny's whole step is ~1.0): a binding is kept per set of buffers (the
    # spare swaps make two in steady state) and only the step's inputs are bound anew. Keyed by the buffers'
    # ids (reading 38 data pointers cost ~45 us a step): the entry holds the buffers, so no other array can take
    # one of those ids while it exists; `HostCache.replace` drops the entries
    key = (id(session), *map(id, cache.arrays), *map(id, targets))
    if key not in cache.bindings:
        if len(cache.bindings) >= 8:  # buffers replaced: forget the old sets
            cache.bindings.clear()
        cache.bindings[key] = _new_binding(session, program, len(steps), cache, targets)
    io, step_names, logits, _buffers = cache.bindings[key]
    steps = [np.ascontiguousarray(v) for v in steps]  # alive until the run returns
    for name, value in zip(step_names, steps):
        io.bind_cpu_input(name, value)
    session.run_with_iobinding(io, run_options)
    # ORT wrote into `logits` (the binding's own buffer: the next run writes there again), or, where the program
    # does not say its vocabulary size, into a buffer of its own
    logits = logits.copy() if logits is not None else io.get_outputs()[0].numpy().copy()
    for i, done in enumerate(in_place):
        if not done:
            cache.swap(i)
    return logits


def _new_binding(session, program: str, n_steps: int, cache: HostCache, targets: list[np.ndarray]):
    """An IOBinding of the caches (inputs) and their targets (outputs), the names of the step inputs, the
    logits' buffer (None when the program's logits have no static vocabulary size) and the bound buffers."""
    names, outputs = [i.name for i in session.get_inputs()], session.get_outputs()
    if len(names) != n_steps + len(cache.arrays):
        raise ArtifactError(f"program {program!r} expects {len(names)} inputs, the runtime has "
                            f"{n_steps + len(cache.arrays)}")
    io = session.io_binding()
    vocab = outputs[0].shape[-1]
    logits = np.empty((cache.batch_size, vocab), np.float32) if isinstance(vocab, int) else None
    if logits is not None:
        _bind(io.bind_output, outputs[0].name, logits)
    else:
        io.bind_output(outputs[0].name, "cpu")
    for name, array, out, target in zip(names[n_steps:], cache.arrays, outputs[1:], targets):
        _bind(io.bind_input, name, array)
        _bind(io.bind_output, out.name, target)
    return io, names[:n_steps], logits, (list(cache.arrays), targets)


def _bind(bind, name: str, array: np.ndarray) -> None:
    # IOBinding takes numpy dtypes, or ONNX's type number for bf16 (ml_dtypes' type is not numpy's)
    element_type = 16 if array.dtype.name == "bfloat16" else array.dtype  # onnx.TensorProto.BFLOAT16
    bind(name, "cpu", 0, element_type, list(array.shape), array.ctypes.data)


def ort_session(model: str | Path | bytes, *, custom_ops_library: str | None = None, threads: int | None = None,
                initializers: dict | None = None, reuse_buffers: bool = True,
                data_dir: str | Path | None = None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session over the program at `model` (a path, or its serialized bytes with `data_dir`,
    where its external weights' files are). With `custom_ops_library` its dsv4 kernels run the dsv4 nodes;
    without, ORT inlines the model-local function bodies. `initializers` (name -> OrtValue) replace the model's
    own: ORT uses their memory as it is (the caller keeps them alive as long as the session). `reuse_buffers`:
    ORT's planned reuse of one node's output buffer for a later node's (SessionOptions.enable_mem_reuse)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # one node at a time, in ORT's topological order: the ranks of a mesh run the same graph, so each meets the
    # collective nodes in the same order (parallel execution could start two collectives in different orders)
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if custom_ops_library:
        options.register_custom_ops_library(str(custom_ops_library))
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.enable_mem_reuse = reuse_buffers
    if data_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_dir))
    for name, value in (initializers or {}).items():
        options.add_initializer(name, value)
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":  # numpy has none; ml_dtypes' (onnx depends on it) indexes and copies like any other
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(name)
    except TypeError:
        raise ValueError(f"cache dtype {name!r} has no numpy equivalent; this executor cannot hold it") from None


TARGETS = {"cpu": "dsv4c.targets.cpu.target:CpuTarget", "tensorrt": "dsv4c.targets.tensorrt.target:TensorRTTarget",
           "cann": "dsv4c.targets.cann.target:CannTarget"}


def get_target(kind: str) -> Target:
    """The target for a recipe's `target.kind` (targets are peers: each lives in dsv4c.targets.<kind>)."""
    import importlib

    if kind not in TARGETS:
        raise ToolchainMissing(f"target {kind!r} is not available in this dsv4c (available: {', '.join(TARGETS)})")
    module, cls = TARGETS[kind].split(":")
    return getattr(importlib.import_module(module), cls)()
