"""The build pipeline: named stages with content-addressed caching, `--until`, events, atomic output.

    resolve -> plan -> load -> quantize -> export -> lower -> build -> validate -> package

Each stage has a key: a sha256 over what determines its output (the recipe sections it reads, the digests of
its inputs, the dsv4c and toolchain versions). Stages whose output lives on disk (load's synthetic checkpoint,
lower's bundle, build's engine files, validate's report) are stored under the cache directory by key and
reused when the key matches; in-memory stages (quantize, export) run only when a stage that needs them misses.
The artifact is assembled in a temporary directory beside the output and renamed into place at the end, so a
failed build leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import dsv4c
from dsv4c.compiler.errors import BuildError, CheckpointInvalidError, Dsv4cError, InfeasibleError, ToolchainError

STAGES = ("resolve", "plan", "load", "quantize", "export", "lower", "build", "validate", "package")
CACHE_MODES = ("readwrite", "readonly", "off", "redo")


def default_cache_dir() -> Path:
    return Path(os.environ.get("DSV4C_CACHE_DIR", Path.home() / ".cache" / "dsv4c" / "stages"))


def toolchain_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "dsv4c": dsv4c.__version__}


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class Events:
    """Progress to the terminal (rich) or JSON lines on stdout (`--events json`) for CI."""

    mode: str = "text"  # text | json | quiet
    log: list[dict[str, Any]] = field(default_factory=list)

    def emit(self, **event: Any) -> None:
        self.log.append(event)
        if self.mode == "json":
            print(json.dumps(event, sort_keys=True), flush=True)
        elif self.mode == "text" and event.get("event") == "stage":
            from rich.console import Console

            status = event["status"]
            colour = {"cached": "cyan", "done": "green", "skipped": "dim"}.get(status, "white")
            extra = f" {event['seconds']:.1f}s" if "seconds" in event else ""
            Console(stderr=True).print(f"[{colour}]{status:>7}[/{colour}] {event['stage']}{extra}")


@dataclass
class Build:
    recipe: Any  # dsv4c.compiler.recipe.Recipe
    out_dir: Path
    cache_dir: Path
    cache_mode: str = "readwrite"
    events: Events = field(default_factory=Events)
    until: str = "package"
    debug: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    # -- cache helpers ---------------------------------------------------------------------------------------
    def cached_dir(self, stage: str, key: str) -> Path | None:
        path = self.cache_dir / stage / key
        if self.cache_mode in ("readwrite", "readonly") and (path / ".complete").is_file():
            return path
        return None

    def store_dir(self, stage: str, key: str, fill: Callable[[Path], None]) -> Path:
        """Run `fill(tmp)` and keep the result under the cache (unless caching is off / readonly)."""
        if self.cache_mode in ("off", "readonly"):
            tmp = Path(tempfile.mkdtemp(prefix=f"dsv4c-{stage}-"))
            try:
                fill(tmp)
            except BaseException:  # a failed stage leaves no temporary directory behind
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return tmp
        final = self.cache_dir / stage / key
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
        try:
            fill(tmp)
            (tmp / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final


# Stages with no stored output of their own: resolve/plan are cheap pure functions of the recipe, quantize is a
# deterministic function of its key materialised in memory only when a later stage misses (export is stored
# for models small enough, see stages.STORE_EXPORT_MAX_BYTES, else it too materialises lazily). They report
# "cached" when a build with the same key has completed them before (a marker under the cache dir), and a lazy
# stage that materialises later emits its own "done" event then (`materialised`).
MARKER_STAGES = ("resolve", "plan", "quantize")


def run_stage(build: Build, name: str, fn: Callable[[Build], str | None]) -> None:
    """Run one stage, timing it and emitting an event. fn returns "cached" on a cache hit."""
    t0 = time.perf_counter()
    status = fn(build) or "done"
    if name in MARKER_STAGES and status == "done" and build.keys.get(name):
        status = _marker(build, name, build.keys[name])
    build.events.emit(event="stage", stage=name, status=status, key=build.keys.get(name),
                      seconds=round(time.perf_counter() - t0, 3))


def materialised(build: Build, name: str, seconds: float) -> None:
    """A lazy stage (quantize, export) actually ran, because a later stage needed its output."""
    build.events.emit(event="stage", stage=name, status="done", key=build.keys.get(name), seconds=round(seconds, 3))


def _marker(build: Build, stage: str, key: str) -> str:
    path = build.cache_dir / stage / key / ".complete"
    if build.cache_mode in ("readwrite", "readonly") and path.is_file():
        return "cached"
    if build.cache_mode in ("readwrite", "redo"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    return "done"


def execute(build: Build) -> Path | None:
    """Run the stages up to `build.until`; returns the artifact directory (None when stopped early). On failure
    nothing is left beside the output; with `build.debug` a repro bundle is (its path is in the error's details)."""
    from dsv4c.compiler import stages

    last = STAGES.index(build.until)
    name = STAGES[0]
    try:
        for name in STAGES[: last + 1]:
            run_stage(build, name, getattr(stages, f"stage_{name}"))
    except (KeyboardInterrupt, SystemExit):
        shutil.rmtree(stages._staging(build), ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(stages._staging(build), ignore_errors=True)
        # an unexpected failure inside a stage is a build error (exit 6)
        error = e if isinstance(e, Dsv4cError) else BuildError(f"{type(e).__name__}: {e}")
        if build.debug:
            bundle = write_repro_bundle(build, name, e)
            error.details.append(f"repro bundle: {bundle} (replay the stage: sh {bundle / 'replay.sh'})")
        if error is e:
            raise
        raise error from e
    return build.state.get("artifact")


def write_repro_bundle(build: Build, stage: str, error: BaseException) -> Path:
    """`--debug`: a directory beside the output with what it takes to reproduce the failed stage: the resolved
    recipe, the stage keys and input fingerprints, the traceback, the stage outputs already on disk (the bundle
    whose engine build failed, ...) and the command that replays the stage (earlier stages come from the cache)."""
    import shlex
    import traceback

    out = build.out_dir
    bundle = out.parent / f"{out.name}.repro-{time.strftime('%Y%m%d-%H%M%S')}"
    bundle.mkdir(parents=True, exist_ok=True)
    (bundle / "recipe.lock.yaml").write_text(build.recipe.lock_yaml())
    (bundle / "traceback.txt").write_text("".join(traceback.format_exception(error)))
    argv = [sys.executable, "-m", "dsv4c.compiler.cli", "build", str(bundle / "recipe.lock.yaml"), "--until", stage,
            "-o", str(out), "--cache-dir", str(build.cache_dir), "--cache", build.cache_mode, "--debug"]
    (bundle / "replay.sh").write_text(f"#!/bin/sh\n# replays stage {stage!r} of {build.recipe.name}\n"
                                      f"exec {shlex.join(argv)}\n")
    on_disk = {k: str(build.state[k]) for k in ("checkpoint", "bundle", "engine_dir") if k in build.state}
    (bundle / "stages.json").write_text(json.dumps({
        "failing_stage": stage, "error": f"{type(error).__name__}: {error}",
        "exit_code": getattr(error, "exit_code", BuildError.exit_code),
        "stage_keys": build.keys, "recipe_sha256": build.recipe.digest(), "inputs": _input_fingerprints(build),
        "stage_outputs": on_disk, "toolchain": build.state.get("toolchain"), "events": build.events.log,
        "replay": shlex.join(argv)}, indent=2, default=str))
    return bundle


def _input_fingerprints(build: Build) -> dict[str, Any]:
    """What the load stage's key is made of: synthetic seed/preset, or the checkpoint's files (name, size, mtime;
    sha256 of the small JSON files). Hashing a 160 GB checkpoint is left to `sha256sum`."""
    model = build.recipe.model
    if model.synthetic is not None:
        return {"synthetic": model.synthetic.model_dump()}
    path = Path(model.checkpoint or "")
    if not path.is_dir():
        return {"checkpoint": str(path), "exists": False}
    files = {}
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        entry: dict[str, Any] = {"bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
        if f.suffix == ".json":
            entry["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
        files[f.name] = entry
    return {"checkpoint": str(path), "files": files}


__all__ = ["Build", "Events", "STAGES", "CACHE_MODES", "execute", "digest", "toolchain_versions",
           "default_cache_dir", "BuildError", "CheckpointInvalidError", "InfeasibleError", "ToolchainError"]
