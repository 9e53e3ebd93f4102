"""The CPU target.

Current engine format: the torch.export programs themselves, serialised with `torch.export.save` (`.pt2`) and
run by the runtime with the dsv4 ops' PyTorch kernels. The ONNX Runtime engine (ONNX `dsv4` domain + C++
kernels, see the README's roadmap) replaces this format; the manifest's `engine.format` says which one an
artifact holds, so the runtime never guesses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dsv4c.targets.base import TargetCheck

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
        import torch

        files = {}
        for name, ep in programs.items():
            torch.export.save(ep, bundle_dir / f"{name}.pt2")
            files[name] = f"{name}.pt2"
        (bundle_dir / "bundle.json").write_text(json.dumps({**meta, "format": "pt2", "programs": files}, indent=2))

    def build(self, bundle_dir: Path, engine_dir: Path, recipe: Any) -> None:
        meta = json.loads((bundle_dir / "bundle.json").read_text())
        for f in bundle_dir.iterdir():
            if f.name not in ("bundle.json", ".complete"):
                shutil.copy(f, engine_dir / f.name)
        meta["kernels"] = {"implementation": "torch-reference"}
        (engine_dir / "engine.json").write_text(json.dumps(meta, indent=2))
