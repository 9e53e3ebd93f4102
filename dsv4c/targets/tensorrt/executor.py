"""Runtime side of the TensorRT target.

    emulate=True:  the bundle's ONNX (exactly what TensorRT parses) on ONNX Runtime CPU, each dsv4 plugin node
                   run by the op's reference implementation (its ONNX function body; the e8m0 weight scales the
                   plugins read decoded for it in the graph).
    device="cuda": the bundle's ONNX interpreted by torch on the GPU, plugin nodes on the Triton kernels
                   (torch_executor.py): no TensorRT needed.
    emulate=False: the built `.plan` engines through TensorRT's Python API, every I/O tensor a CUDA buffer
                   (torch) bound by address. The caches stay on the GPU, double-buffered (an engine's outputs may
                   not alias its inputs): a step reads one set, writes the other, and the two swap; the token
                   inputs and the logits use buffers allocated once. Needs tensorrt + a GPU; not executable on
                   the project's machines (README 'TensorRT').
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from dsv4c.artifact import ArtifactError, Manifest
from dsv4c.targets.base import CacheSlot, cache_slots

if TYPE_CHECKING:  # torch is imported where a GPU path runs, not by every bundle load
    from dsv4c.targets.tensorrt.device_cache import TorchCache


def load_executor(root: Path, manifest: Manifest, emulate: bool = False, threads: int | None = None,
                  device: str | None = None):
    engine = manifest.engine
    if device is not None:  # the bundle's ONNX on torch, plugin nodes on the Triton kernels: no TensorRT needed
        from dsv4c.targets.tensorrt.torch_executor import TorchExecutor, check_device

        return TorchExecutor(root / "engine", engine["programs"], cache_slots(engine), check_device(device))
    if emulate:
        from dsv4c.graphs.ops.onnx import function_bodies
        from dsv4c.targets.onnx_bundle import EmulatedExecutor
        from dsv4c.targets.tensorrt.target import emulation_nodes

        return EmulatedExecutor(root / "engine", engine["programs"], cache_slots(engine), function_bodies(),
                                emulation_nodes, threads)
    if engine.get("format") != "tensorrt":
        raise ArtifactError(f"{root} is a TensorRT bundle, not a built engine: finish it on a TensorRT machine with "
                            f"`dsv4c build --from-bundle {root}`, or run it here with Engine.load(path, emulate=True)")
    return TensorRTExecutor(root / "engine", engine["plans"], cache_slots(engine),
                            int(manifest.runtime["max_batch_size"]), int(engine["vocab_size"]))


def step_bindings(inputs: Sequence[str], outputs: Sequence[str], step_inputs: Sequence, logits,
                  cache: "TorchCache") -> dict:
    """I/O tensor name -> the buffer bound to it for one step: the step inputs (tokens, start_pos, n_valid) and
    the current caches in, the logits and the cache's spare set out (`cache`: a double-buffered TorchCache).
    Every cache address is one the cache allocated; after the step the caller swaps the cache's two sets."""
    values_in, values_out = [*step_inputs, *cache.tensors], [logits, *cache.spare]
    if len(inputs) != len(values_in) or len(outputs) != len(values_out):
        raise ArtifactError(f"the engine has {len(inputs)} inputs and {len(outputs)} outputs, the runtime binds "
                            f"{len(values_in)} and {len(values_out)}; rebuild the engine")
    return {**dict(zip(inputs, values_in)), **dict(zip(outputs, values_out))}


class TensorRTExecutor:
    def __init__(self, engine_dir: Path, plans: dict[str, str], slots: Sequence[CacheSlot], max_batch: int,
                 vocab: int):
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
        self.torch, self.trt, self.slots = torch, trt, list(slots)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {p: runtime.deserialize_cuda_engine((engine_dir / f).read_bytes()) for p, f in plans.items()}
        self.contexts = {p: e.create_execution_context() for p, e in self.engines.items()}
        self.io = {p: self._io_names(e) for p, e in self.engines.items()}
        self.stream = torch.cuda.Stream()
        self.logits = torch.empty((max_batch, vocab), dtype=torch.float32, device="cuda")
        self.staging: list = [None, None, None]  # tokens, start_pos, n_valid: grown to the largest step seen

    def _io_names(self, engine) -> tuple[list[str], list[str]]:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = self.trt.TensorIOMode
        return ([n for n in names if engine.get_tensor_mode(n) == mode.INPUT],
                [n for n in names if engine.get_tensor_mode(n) == mode.OUTPUT])

    def new_cache(self, batch_size: int) -> "TorchCache":
        from dsv4c.targets.tensorrt.device_cache import TorchCache

        return TorchCache(self.slots, batch_size, "cuda", double_buffered=True)

    def run(self, program: str, tokens: np.ndarray, start_pos: np.ndarray, n_valid: np.ndarray,
            cache: "TorchCache") -> np.ndarray:
        ctx = self.contexts[program]
        inputs, outputs = self.io[program]
        step_inputs = [self._stage(i, a) for i, a in enumerate((tokens, start_pos, n_valid))]
        logits = self.logits[:cache.batch_size]
        bindings = step_bindings(inputs, outputs, step_inputs, logits, cache)
        for name in inputs:
            ctx.set_input_shape(name, tuple(bindings[name].shape))
        for name, tensor in bindings.items():
            if name in outputs and tuple(ctx.get_tensor_shape(name)) != tuple(tensor.shape):
                raise ArtifactError(f"{program}: output {name!r} has shape {tuple(ctx.get_tensor_shape(name))}, "
                                    f"its buffer {tuple(tensor.shape)}; rebuild the engine")
            ctx.set_tensor_address(name, tensor.data_ptr())
        self.stream.wait_stream(self.torch.cuda.current_stream())  # the staged inputs are copied on that stream
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {program!r} failed")
        self.stream.synchronize()
        cache.swap()
        return logits.cpu().numpy()

    def _stage(self, index: int, array: np.ndarray):
        """`array` copied into the executor's buffer for step input `index`; a buffer grows (never shrinks) to
        the largest input seen, so steady-state steps allocate nothing."""
        array = np.ascontiguousarray(array)
        buffer = self.staging[index]
        if buffer is None or buffer.numel() < array.size:
            buffer = self.staging[index] = self.torch.empty(array.size, dtype=self.torch.int64, device="cuda")
        view = buffer[:array.size].view(array.shape)
        view.copy_(self.torch.from_numpy(array.astype(np.int64, copy=False)))
        return view
