"""Runtime side of the CANN target.

    emulate=True:  the bundle's ONNX (exactly what ATC reads) on ONNX Runtime CPU: the CANN operator nodes run
                   their reference implementations (reference.py), the dsv4 nodes the dsv4 function bodies.
    emulate=False: the built `.om` models through pyACL (the `acl` module of the CANN toolkit). Device memory is
                   allocated once: the caches per session (`AclCache`, double-buffered: a model's outputs may not
                   alias its inputs), the logits and token buffers per executor. A step copies the tokens in and
                   the logits out; the real shapes of the inputs are set on the dataset (the models have dynamic
                   batch / prompt length ranges). Written against the documented pyACL API (acl.init,
                   acl.rt.set_device, acl.rt.malloc / memcpy, acl.mdl.load_from_file, datasets, acl.mdl.execute);
                   not executable on the project's machines (no NPU, no CANN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dsv4c.artifact import ArtifactError, Manifest
from dsv4c.targets.base import CacheSlot, cache_slots, check_host_arrays, numpy_dtype

ACL_FLOAT, ACL_INT64, ACL_BF16, ACL_FORMAT_ND = 0, 9, 27, 2  # aclDataType / aclFormat enum values
ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEMCPY_HOST_TO_DEVICE, ACL_MEMCPY_DEVICE_TO_HOST, ACL_MEMCPY_DEVICE_TO_DEVICE = 1, 2, 3  # aclrtMemcpyKind
_ACL_DTYPES = {"float32": ACL_FLOAT, "int64": ACL_INT64, "bfloat16": ACL_BF16}


def load_executor(root: Path, manifest: Manifest, emulate: bool = False, threads: int | None = None):
    engine = manifest.engine
    if emulate:
        if engine.get("format") != "onnx":
            raise ArtifactError(f"{root} is a built CANN engine (.om); emulation runs the bundle: load the "
                                "`dsv4c build --until lower` output with emulate=True")
        from dsv4c.targets.cann.reference import prepare, reference_functions
        from dsv4c.targets.onnx_bundle import EmulatedExecutor

        return EmulatedExecutor(root / "engine", engine["programs"], cache_slots(engine), reference_functions(),
                                prepare, threads)
    if engine.get("format") != "om":
        raise ArtifactError(f"{root} is a CANN bundle, not a built engine: build the .om models on an Ascend host "
                            f"(`bash {root}/engine/build_om.sh` or `dsv4c build --from-bundle {root}`), or run "
                            "the bundle here with Engine.load(path, emulate=True)")
    return AclExecutor(root / "engine", engine["models"], cache_slots(engine), int(manifest.runtime["max_batch_size"]),
                       int(engine["vocab_size"]))


def _check(ret: int, what: str) -> None:
    if ret != 0:
        raise RuntimeError(f"{what} failed with ACL error {ret}")


class AclExecutor:
    """One `.om` per program, loaded on device 0 (DSV4C_NPU_DEVICE overrides); positional I/O as the other
    executors: tokens, start_pos, n_valid, *cache -> logits, *new_cache."""

    def __init__(self, engine_dir: Path, models: dict[str, str], slots: Sequence[CacheSlot], max_batch: int,
                 vocab: int):
        try:
            import acl
        except ImportError as e:
            raise ArtifactError(f"this artifact is a CANN .om engine and needs pyACL (the `acl` module of the CANN "
                                f"toolkit: source <toolkit>/set_env.sh) and an Ascend NPU ({e}); on other machines "
                                "run the bundle with Engine.load(path, emulate=True)") from None
        import os

        unsupported = sorted({s.dtype for s in slots} - set(_ACL_DTYPES))
        if unsupported:
            raise ArtifactError(f"cache dtypes {unsupported} are not bound by this executor (it binds "
                                f"{sorted(_ACL_DTYPES)}); rebuild the engine")
        self.acl, self.device, self.slots = acl, int(os.environ.get("DSV4C_NPU_DEVICE", "0")), list(slots)
        ret = acl.init()
        if ret not in (0, 100002):  # 100002: ACL_ERROR_REPEAT_INITIALIZE (another user in this process)
            _check(ret, "acl.init")
        _check(acl.rt.set_device(self.device), "acl.rt.set_device")
        self.models = {}
        for program, rel in models.items():
            model_id, ret = acl.mdl.load_from_file(str(engine_dir / rel))
            _check(ret, f"acl.mdl.load_from_file({rel})")
            desc = acl.mdl.create_desc()
            _check(acl.mdl.get_desc(desc, model_id), "acl.mdl.get_desc")
            self.models[program] = (model_id, desc)
        # output buffers hold the largest batch (what the models report, at least max_batch rows): logits [B, V]
        # f32, then the caches [B, *shape]
        self.row_bytes = [int(np.prod(s.shape)) * numpy_dtype(s.dtype).itemsize for s in self.slots]
        largest = [max_batch * vocab * 4] + [max_batch * r for r in self.row_bytes]
        reported = [max((acl.mdl.get_output_size_by_index(desc, i) for _, desc in self.models.values()), default=0)
                    for i in range(len(largest))]
        self.output_bytes = [max(ours, theirs) for ours, theirs in zip(largest, reported)]
        self.logits = self.malloc(self.output_bytes[0])
        self.fill_rows = [self.upload(np.full(s.shape, s.fill, dtype=numpy_dtype(s.dtype))) for s in self.slots]
        self.staging: list[tuple[int, int]] = [(0, 0)] * 3  # tokens, start_pos, n_valid: (address, bytes)

    def new_cache(self, batch_size: int) -> "AclCache":
        return AclCache(self, batch_size)

    def run(self, program: str, tokens: np.ndarray, start_pos: np.ndarray, n_valid: np.ndarray,
            cache: "AclCache") -> np.ndarray:
        acl = self.acl
        model_id, desc = self.models[program]
        step = [np.ascontiguousarray(a, dtype=np.int64) for a in (tokens, start_pos, n_valid)]
        b = cache.batch_size
        inputs = [(self._stage(i, a), a.nbytes, ACL_INT64, a.shape) for i, a in enumerate(step)]
        inputs += [(address, b * row, _ACL_DTYPES[s.dtype], (b, *s.shape))
                   for address, row, s in zip(cache.current, self.row_bytes, self.slots)]
        outputs = [self.logits, *cache.spare]
        if len(inputs) != acl.mdl.get_num_inputs(desc) or len(outputs) != acl.mdl.get_num_outputs(desc):
            raise ArtifactError(f"{program}.om has {acl.mdl.get_num_inputs(desc)} inputs and "
                                f"{acl.mdl.get_num_outputs(desc)} outputs, the runtime binds {len(inputs)} and "
                                f"{len(outputs)}; rebuild the engine")
        in_ds, out_ds, owned = acl.mdl.create_dataset(), acl.mdl.create_dataset(), []  # descriptors only
        try:
            for i, (address, size, dtype, shape) in enumerate(inputs):
                self._add_buffer(in_ds, address, size, owned)
                tdesc = acl.create_tensor_desc(dtype, list(shape), ACL_FORMAT_ND)
                owned.append(("desc", tdesc))
                in_ds, ret = acl.mdl.set_dataset_tensor_desc(in_ds, tdesc, i)  # the real shape of a range input
                _check(ret, "acl.mdl.set_dataset_tensor_desc")
            for address, size in zip(outputs, self.output_bytes):
                self._add_buffer(out_ds, address, size, owned)
            _check(acl.mdl.execute(model_id, in_ds, out_ds), f"acl.mdl.execute({program})")
            tdesc = acl.mdl.get_dataset_tensor_desc(out_ds, 0)
            dims = [acl.get_tensor_desc_dim_v2(tdesc, j)[0] for j in range(acl.get_tensor_desc_num_dims(tdesc))]
            logits = np.empty(dims, dtype=np.float32)
            _check(acl.rt.memcpy(logits.ctypes.data, logits.nbytes, self.logits, logits.nbytes,
                                 ACL_MEMCPY_DEVICE_TO_HOST), "acl.rt.memcpy (logits)")
        finally:
            for kind, handle in reversed(owned):
                (acl.destroy_tensor_desc if kind == "desc" else acl.destroy_data_buffer)(handle)
            acl.mdl.destroy_dataset(in_ds)
            acl.mdl.destroy_dataset(out_ds)
        cache.swap()
        return logits

    def malloc(self, size: int) -> int:
        address, ret = self.acl.rt.malloc(max(size, 1), ACL_MEM_MALLOC_HUGE_FIRST)
        _check(ret, "acl.rt.malloc")
        return address

    def upload(self, array: np.ndarray, address: int | None = None) -> int:
        """`array` copied to `address` (a new allocation of its size when None); -> the address."""
        address = self.malloc(array.nbytes) if address is None else address
        _check(self.acl.rt.memcpy(address, array.nbytes, array.ctypes.data, array.nbytes, ACL_MEMCPY_HOST_TO_DEVICE),
               "acl.rt.memcpy (host to device)")
        return address

    def copy_rows(self, dst: int, dst_rows: Sequence[int], src: int, src_rows: Sequence[int], row: int) -> None:
        for d, s in zip(dst_rows, src_rows):
            _check(self.acl.rt.memcpy(dst + d * row, row, src + s * row, row, ACL_MEMCPY_DEVICE_TO_DEVICE),
                   "acl.rt.memcpy (device to device)")

    def _stage(self, index: int, array: np.ndarray) -> int:
        """`array` copied into the device buffer for step input `index`, grown (never shrunk) to the largest
        input seen: steady-state steps allocate nothing."""
        address, size = self.staging[index]
        if size < array.nbytes:
            if address:
                self.acl.rt.free(address)
            address, size = self.malloc(array.nbytes), array.nbytes
            self.staging[index] = (address, size)
        return self.upload(array, address)

    def _add_buffer(self, dataset, address: int, size: int, owned: list) -> None:
        buf = self.acl.create_data_buffer(address, size)
        owned.append(("buffer", buf))
        _, ret = self.acl.mdl.add_dataset_buffer(dataset, buf)
        _check(ret, "acl.mdl.add_dataset_buffer")

    def __del__(self):
        acl = getattr(self, "acl", None)
        for address in [getattr(self, "logits", 0), *getattr(self, "fill_rows", []),
                        *(a for a, _ in getattr(self, "staging", []))]:
            if address:
                acl.rt.free(address)
        for model_id, desc in getattr(self, "models", {}).values():
            acl.mdl.destroy_desc(desc)
            acl.mdl.unload(model_id)


class AclCache:
    """A session's caches in NPU memory: `current` (read by the next step) and `spare` (written by it), one
    device buffer per cache tensor in each, sized like the models' outputs; rows are sequences."""

    def __init__(self, executor: AclExecutor, batch_size: int):
        self.executor, self.batch_size = executor, batch_size
        self.current = [executor.malloc(size) for size in executor.output_bytes[1:]]
        self.spare = [executor.malloc(size) for size in executor.output_bytes[1:]]
        for slot in range(batch_size):
            self.reset(slot)

    def swap(self) -> None:
        self.current, self.spare = self.spare, self.current

    def reset(self, slot: int) -> None:
        ex = self.executor
        for address, fill, row in zip(self.current, ex.fill_rows, ex.row_bytes):
            ex.copy_rows(address, [slot], fill, [0], row)

    def take(self, slots: np.ndarray) -> "AclCache":
        part = AclCache(self.executor, len(slots))
        for mine, theirs, row in zip(self.current, part.current, self.executor.row_bytes):
            self.executor.copy_rows(theirs, range(len(slots)), mine, [int(s) for s in slots], row)
        return part

    def put(self, slots: np.ndarray, part: "AclCache") -> None:
        for mine, theirs, row in zip(self.current, part.current, self.executor.row_bytes):
            self.executor.copy_rows(mine, [int(s) for s in slots], theirs, range(len(slots)), row)

    def to_host(self) -> list[np.ndarray]:
        ex, out = self.executor, []
        for address, s in zip(self.current, ex.slots):
            host = np.empty((self.batch_size, *s.shape), dtype=numpy_dtype(s.dtype))
            _check(ex.acl.rt.memcpy(host.ctypes.data, host.nbytes, address, host.nbytes, ACL_MEMCPY_DEVICE_TO_HOST),
                   "acl.rt.memcpy (device to host)")
            out.append(host)
        return out

    def from_host(self, arrays: Sequence[np.ndarray]) -> None:
        ex = self.executor
        check_host_arrays(ex.slots, self.batch_size, arrays)
        for address, value, s in zip(self.current, arrays, ex.slots):
            ex.upload(np.ascontiguousarray(value, dtype=numpy_dtype(s.dtype)), address)

    def __del__(self):
        for address in [*getattr(self, "current", []), *getattr(self, "spare", [])]:
            self.executor.acl.rt.free(address)
