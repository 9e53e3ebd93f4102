"""The CPU target: ONNX programs run by ONNX Runtime, the dsv4 ops by a C++ kernel library compiled here
(falling back to the ops' ONNX function bodies, recorded in the manifest, when no compiler/headers exist)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dsv4c.targets.base import TargetCheck
from dsv4c.targets.cpu.executor import KERNELS

SUPPORTED = {"experts": ("fp4", "fp8"), "dense": ("fp8",), "activations": ("fp8", "none"),
             "kv_cache": ("fp8", "bf16"), "indexer": ("fp4", "bf16")}


class CpuTarget:
    kind = "cpu"

    def check(self, recipe: Any) -> TargetCheck:
        import onnxruntime

        check = TargetCheck(toolchain={"onnxruntime": onnxruntime.__version__})
        q = recipe.quantization
        for group, allowed in SUPPORTED.items():
            value = getattr(q, group)
            if value not in allowed:
                check.problems.append(f"quantization.{group}={value!r} is not supported on cpu "
                                      f"(supported: {', '.join(allowed)})")
        return check

    def lower(self, programs: dict[str, Any], bundle_dir: Path, recipe: Any, meta: dict[str, Any]) -> None:
        from dsv4c.graphs.ops.onnx import export_program

        files = {}
        for name, ep in programs.items():
            export_program(ep, bundle_dir / f"{name}.onnx")
            files[name] = f"{name}.onnx"
        (bundle_dir / "bundle.json").write_text(json.dumps({**meta, "programs": files}, indent=2))

    def build(self, bundle_dir: Path, engine_dir: Path, recipe: Any) -> None:
        meta = json.loads((bundle_dir / "bundle.json").read_text())
        for f in bundle_dir.iterdir():
            if f.name not in ("bundle.json", ".complete"):
                shutil.copy(f, engine_dir / f.name)
        meta["kernels"] = self._kernels(engine_dir)
        (engine_dir / "engine.json").write_text(json.dumps(meta, indent=2))

    @staticmethod
    def _kernels(engine_dir: Path) -> dict[str, str]:
        """Compile (or reuse) the C++ kernels; without them ORT runs the ops' ONNX function bodies."""
        try:
            from dsv4c.targets.cpu.kernels.build import build_kernels

            library = build_kernels()
        except Exception as e:  # no compiler, no headers: a recorded fallback, never a silent one
            return {"implementation": "onnx-function-bodies", "reason": f"{type(e).__name__}: {e}"}
        shutil.copy(library, engine_dir / KERNELS)
        return {"implementation": "cpp", "library": KERNELS}
