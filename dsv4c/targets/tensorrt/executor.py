"""Runtime side of the TensorRT target.

    emulate=True:  the bundle's ONNX (exactly what TensorRT parses) on ONNX Runtime CPU, each dsv4 plugin node
                   run by the op's reference implementation (its ONNX function body).
    device="cuda": the bundle's ONNX interpreted by torch on the GPU, plugin nodes on the Triton kernels
                   (torch_executor.py): no TensorRT needed.
    emulate=False: the built `.plan` engines through TensorRT's Python API, inputs/outputs as CUDA tensors
                   (torch), the runtime's caches copied in and out per step. Needs tensorrt + a GPU; not
                   executable on the project's machines (README 'TensorRT').
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsv4c.artifact import ArtifactError, Manifest


def load_executor(root: Path, manifest: Manifest, emulate: bool = False, threads: int | None = None,
                  device: str | None = None):
    engine = manifest.engine
    if device is not None:  # the bundle's ONNX on torch, plugin nodes on the Triton kernels: no TensorRT needed
        from dsv4c.targets.tensorrt.torch_executor import TorchExecutor, check_device

        return TorchExecutor(root / "engine", engine["programs"], check_device(device))
    if emulate:
        from dsv4c.graphs.ops.onnx import function_bodies
        from dsv4c.targets.onnx_bundle import EmulatedExecutor
        from dsv4c.targets.tensorrt.target import unmark_plugins

        return EmulatedExecutor(root / "engine", engine["programs"], function_bodies(), unmark_plugins, threads)
    if engine.get("format") != "tensorrt":
        raise ArtifactError(f"{root} is a TensorRT bundle, not a built engine: finish it on a TensorRT machine with "
                            f"`dsv4c build --from-bundle {root}`, or run it here with Engine.load(path, emulate=True)")
    return TensorRTExecutor(root / "engine", engine["plans"])


class TensorRTExecutor:
    def __init__(self, engine_dir: Path, plans: dict[str, str]):
        try:
            import tensorrt as trt
            import torch
        except Exception as e:
            raise ArtifactError(f"this artifact needs TensorRT to run ({e}); install tensorrt matching the "
                                "manifest's toolchain, or load with emulate=True on CPU") from None
        if not torch.cuda.is_available():
            raise ArtifactError("this artifact is a TensorRT engine and needs an NVIDIA GPU")
        from dsv4c.targets.tensorrt import plugins

        plugins.register_all()
        self.torch, self.trt = torch, trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {p: runtime.deserialize_cuda_engine((engine_dir / f).read_bytes()) for p, f in plans.items()}
        self.contexts = {p: e.create_execution_context() for p, e in self.engines.items()}
        self.stream = torch.cuda.Stream()

    def run(self, program: str, tokens, start_pos, n_valid, cache):
        torch, engine, ctx = self.torch, self.engines[program], self.contexts[program]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.OUTPUT]
        keep = []
        for name, value in zip(inputs, [tokens, start_pos, n_valid, *cache]):
            t = torch.from_numpy(np.ascontiguousarray(value)).cuda()
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        results = []
        for name in outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = {self.trt.DataType.FLOAT: torch.float32, self.trt.DataType.INT64: torch.int64}[
                engine.get_tensor_dtype(name)]
            t = torch.empty(shape, dtype=dtype, device="cuda")
            ctx.set_tensor_address(name, t.data_ptr())
            results.append(t)
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {program!r} failed")
        self.stream.synchronize()
        host = [r.cpu().numpy() for r in results]
        return host[0], host[1:]
