"""Runtime side of the CPU target: the artifact's ONNX programs on ONNX Runtime, with the dsv4 C++ kernel
library when the artifact carries one (else ORT inlines the ops' ONNX function bodies)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dsv4c.artifact import ArtifactError, Manifest
from dsv4c.targets.base import CacheSlot, HostCache, cache_slots

KERNELS = "libdsv4_ops.so"


class OrtExecutor:
    """Positional I/O: tokens, start_pos, n_valid, *cache -> logits, *new_cache; the caches are host arrays
    (`HostCache`), replaced by the ones ORT returns."""

    def __init__(self, engine_dir: Path, programs: dict[str, str], slots: Sequence[CacheSlot],
                 threads: int | None = None):
        from dsv4c.graphs.ops.onnx import ort_session

        self.slots = list(slots)
        library = engine_dir / KERNELS
        self.kernels = library.is_file()
        self.sessions = {}
        for name, rel in programs.items():
            self.sessions[name] = ort_session(engine_dir / rel, custom_ops_library=str(library) if self.kernels else None,
                                              threads=threads)
        self.inputs = {n: [i.name for i in s.get_inputs()] for n, s in self.sessions.items()}

    def new_cache(self, batch_size: int) -> HostCache:
        return HostCache(self.slots, batch_size)

    def run(self, program: str, tokens: np.ndarray, start_pos: np.ndarray, n_valid: np.ndarray,
            cache: HostCache) -> np.ndarray:
        values = [tokens, start_pos, n_valid, *cache.arrays]
        names = self.inputs[program]
        if len(names) != len(values):
            raise ArtifactError(f"program {program!r} expects {len(names)} inputs, the runtime has {len(values)}")
        logits, *new_cache = self.sessions[program].run(None, dict(zip(names, values)))
        cache.replace(new_cache)
        return logits


def load_executor(root: Path, manifest: Manifest, emulate: bool = False, threads: int | None = None):
    fmt = manifest.engine.get("format")
    if fmt != "onnx":
        raise ArtifactError(f"{root}: engine format {fmt!r} is not runnable by this dsv4c (expected 'onnx'); "
                            "rebuild the artifact")
    _check_toolchain(manifest)
    return OrtExecutor(root / "engine", manifest.engine["programs"], cache_slots(manifest.engine), threads)


def _check_toolchain(manifest: Manifest) -> None:
    import onnxruntime

    built_with = manifest.data.get("toolchain", {}).get("onnxruntime")
    have = onnxruntime.__version__
    if built_with and built_with.split(".")[:2] != have.split(".")[:2]:
        raise ArtifactError(f"artifact was built for onnxruntime {built_with}, this machine has {have}; "
                            f"install onnxruntime=={built_with} or rebuild the artifact here")
