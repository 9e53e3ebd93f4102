"""The interface every target implements; targets are peers and never import the compiler's stages.

A target answers four questions for a recipe:
  * `check(recipe)`: can it build this here (formats, ops, toolchain)? -> problems, fallbacks it will apply
  * `lower(programs, bundle_dir, recipe, meta)`: exported programs -> a self-contained bundle (ONNX + op
    impls + `bundle.json` carrying `meta`: cache layout, vocab size, eos id)
  * `build(bundle_dir, engine_dir, recipe)`: bundle -> engine files + `engine.json` (what the runtime needs),
    or ToolchainMissing naming what is absent
  * `dsv4c.targets.<kind>.executor.load_executor(root, manifest, emulate)`: the runtime side
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


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

    def check(self, recipe: Any) -> TargetCheck: ...

    def lower(self, programs: dict[str, Any], bundle_dir: Path, recipe: Any, meta: dict[str, Any]) -> None: ...

    def build(self, bundle_dir: Path, engine_dir: Path, recipe: Any) -> None: ...


class Executor(Protocol):
    def run(self, program: str, tokens: np.ndarray, start_pos: np.ndarray, n_valid: np.ndarray,
            cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]: ...


TARGETS = {"cpu": "dsv4c.targets.cpu.target:CpuTarget", "tensorrt": "dsv4c.targets.tensorrt.target:TensorRTTarget",
           "cann": "dsv4c.targets.cann.target:CannTarget"}


def get_target(kind: str) -> Target:
    """The target for a recipe's `target.kind` (targets are peers: each lives in dsv4c.targets.<kind>)."""
    import importlib

    if kind not in TARGETS:
        raise ToolchainMissing(f"target {kind!r} is not available in this dsv4c (available: {', '.join(TARGETS)})")
    module, cls = TARGETS[kind].split(":")
    return getattr(importlib.import_module(module), cls)()
