"""Runtime side of the CANN target.

    emulate=True:  the bundle's ONNX (exactly what ATC reads) on ONNX Runtime CPU: the CANN operator nodes run
                   their reference implementations (reference.py), the dsv4 nodes the dsv4 function bodies.
    emulate=False: the built `.om` models through pyACL (the `acl` module of the CANN toolkit): inputs copied to
                   the NPU with their real shapes set on the dataset (the models have dynamic batch / prompt
                   length ranges), outputs sized for the largest batch, copied back. Written against the
                   documented pyACL API (acl.init, acl.rt.set_device, acl.mdl.load_from_file, datasets,
                   acl.mdl.execute); not executable on the project's machines (no NPU, no CANN).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsv4c.artifact import ArtifactError, Manifest

ACL_FLOAT, ACL_INT64, ACL_FORMAT_ND = 0, 9, 2  # aclDataType / aclFormat enum values
ACL_MEM_MALLOC_HUGE_FIRST, ACL_MEMCPY_HOST_TO_DEVICE, ACL_MEMCPY_DEVICE_TO_HOST = 0, 1, 2
_NUMPY = {ACL_FLOAT: np.float32, ACL_INT64: np.int64}


def load_executor(root: Path, manifest: Manifest, emulate: bool = False, threads: int | None = None):
    engine = manifest.engine
    if emulate:
        if engine.get("format") != "onnx":
            raise ArtifactError(f"{root} is a built CANN engine (.om); emulation runs the bundle: load the "
                                "`dsv4c build --until lower` output with emulate=True")
        from dsv4c.targets.cann.reference import prepare, reference_functions
        from dsv4c.targets.onnx_bundle import EmulatedExecutor

        return EmulatedExecutor(root / "engine", engine["programs"], reference_functions(), prepare, threads)
    if engine.get("format") != "om":
        raise ArtifactError(f"{root} is a CANN bundle, not a built engine: build the .om models on an Ascend host "
                            f"(`bash {root}/engine/build_om.sh` or `dsv4c build --from-bundle {root}`), or run "
                            "the bundle here with Engine.load(path, emulate=True)")
    return AclExecutor(root / "engine", engine["models"], engine["cache"], int(manifest.runtime["max_batch_size"]),
                       int(engine["vocab_size"]))


def _check(ret: int, what: str) -> None:
    if ret != 0:
        raise RuntimeError(f"{what} failed with ACL error {ret}")


class AclExecutor:
    """One `.om` per program, loaded on device 0 (DSV4C_NPU_DEVICE overrides); positional I/O as the other
    executors: tokens, start_pos, n_valid, *cache -> logits, *new_cache."""

    def __init__(self, engine_dir: Path, models: dict[str, str], cache: list[dict], max_batch: int, vocab: int):
        try:
            import acl
        except ImportError as e:
            raise ArtifactError(f"this artifact is a CANN .om engine and needs pyACL (the `acl` module of the CANN "
                                f"toolkit: source <toolkit>/set_env.sh) and an Ascend NPU ({e}); on other machines "
                                "run the bundle with Engine.load(path, emulate=True)") from None
        import os

        self.acl, self.device = acl, int(os.environ.get("DSV4C_NPU_DEVICE", "0"))
        ret = acl.init()
        if ret not in (0, 100002):  # 100002: ACL_ERROR_REPEAT_INITIALIZE (another user in this process)
            _check(ret, "acl.init")
        _check(acl.rt.set_device(self.device), "acl.rt.set_device")
        # output byte sizes at the largest batch: logits [B, V] f32, then the caches [B, *shape] f32
        self.max_out = [max_batch * vocab * 4] + [max_batch * 4 * int(np.prod(c["shape"])) for c in cache]
        self.models = {}
        for program, rel in models.items():
            model_id, ret = acl.mdl.load_from_file(str(engine_dir / rel))
            _check(ret, f"acl.mdl.load_from_file({rel})")
            desc = acl.mdl.create_desc()
            _check(acl.mdl.get_desc(desc, model_id), "acl.mdl.get_desc")
            self.models[program] = (model_id, desc)

    def run(self, program: str, tokens, start_pos, n_valid, cache):
        acl = self.acl
        model_id, desc = self.models[program]
        inputs = [np.ascontiguousarray(a) for a in (tokens, start_pos, n_valid, *cache)]
        if len(inputs) != acl.mdl.get_num_inputs(desc):
            raise ArtifactError(f"{program}.om has {acl.mdl.get_num_inputs(desc)} inputs, the runtime passes "
                                f"{len(inputs)}; rebuild the engine")
        in_ds, out_ds, owned = acl.mdl.create_dataset(), acl.mdl.create_dataset(), []
        try:
            for i, a in enumerate(inputs):
                dev = self._device_buffer(in_ds, a.nbytes, owned)
                _check(acl.rt.memcpy(dev, a.nbytes, a.ctypes.data, a.nbytes, ACL_MEMCPY_HOST_TO_DEVICE),
                       "acl.rt.memcpy (input)")
                dtype = ACL_INT64 if a.dtype == np.int64 else ACL_FLOAT
                tdesc = acl.create_tensor_desc(dtype, list(a.shape), ACL_FORMAT_ND)
                owned.append(("desc", tdesc))
                in_ds, ret = acl.mdl.set_dataset_tensor_desc(in_ds, tdesc, i)  # the real shape of a range input
                _check(ret, "acl.mdl.set_dataset_tensor_desc")
            out_ptrs = []
            for i in range(acl.mdl.get_num_outputs(desc)):
                size = max(acl.mdl.get_output_size_by_index(desc, i), self.max_out[i] if i < len(self.max_out) else 0)
                out_ptrs.append((self._device_buffer(out_ds, size, owned), size))
            _check(acl.mdl.execute(model_id, in_ds, out_ds), f"acl.mdl.execute({program})")
            outputs = []
            for i, (dev, _) in enumerate(out_ptrs):
                tdesc = acl.mdl.get_dataset_tensor_desc(out_ds, i)
                dims = [acl.get_tensor_desc_dim_v2(tdesc, j)[0] for j in range(acl.get_tensor_desc_num_dims(tdesc))]
                host = np.empty(dims, dtype=_NUMPY.get(acl.get_tensor_desc_type(tdesc), np.float32))
                _check(acl.rt.memcpy(host.ctypes.data, host.nbytes, dev, host.nbytes, ACL_MEMCPY_DEVICE_TO_HOST),
                       "acl.rt.memcpy (output)")
                outputs.append(host)
        finally:
            for kind, handle in reversed(owned):
                if kind == "desc":
                    acl.destroy_tensor_desc(handle)
                elif kind == "buffer":
                    acl.destroy_data_buffer(handle)
                else:
                    acl.rt.free(handle)
            acl.mdl.destroy_dataset(in_ds)
            acl.mdl.destroy_dataset(out_ds)
        return outputs[0], outputs[1:]

    def _device_buffer(self, dataset, size: int, owned: list) -> int:
        acl = self.acl
        dev, ret = acl.rt.malloc(max(size, 1), ACL_MEM_MALLOC_HUGE_FIRST)
        _check(ret, "acl.rt.malloc")
        owned.append(("memory", dev))
        buf = acl.create_data_buffer(dev, size)
        owned.append(("buffer", buf))
        _, ret = acl.mdl.add_dataset_buffer(dataset, buf)
        _check(ret, "acl.mdl.add_dataset_buffer")
        return dev

    def __del__(self):
        acl = getattr(self, "acl", None)
        for model_id, desc in getattr(self, "models", {}).values():
            acl.mdl.destroy_desc(desc)
            acl.mdl.unload(model_id)
