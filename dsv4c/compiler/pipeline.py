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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from dsv4c._version import __version__ as DSV4C_VERSION
from dsv4c.compiler.errors import BuildError, CheckpointInvalidError, Dsv4cError, InfeasibleError, ToolchainError

STAGES = ("resolve", "plan", "load", "quantize", "export", "lower", "build", "validate", "package")
CACHE_MODES = ("readwrite", "readonly", "off", "redo")
EVENT_MODES = ("text", "json", "quiet")
StageFunction = Callable[["Build"], "str | None"]  # runs one stage; returns "cached" on a cache hit


def default_cache_dir() -> Path:
    return Path(os.environ.get("DSV4C_CACHE_DIR", Path.home() / ".cache" / "dsv4c" / "stages"))


def toolchain_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "dsv4c": DSV4C_VERSION}


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class Events:
    """Progress to the terminal (rich) or JSON lines on stdout (`--events json`) for CI."""

    mode: str = "text"  # one of EVENT_MODES
    log: list[dict[str, Any]] = field(default_factory=list)
    _line_open: bool = False  # a progress line is on the terminal, to be cleared before the next line

    def emit(self, **event: Any) -> None:
        self.log.append(event)
        self.end_progress()
        if self.mode == "json":
            print(json.dumps(event, sort_keys=True), flush=True)
        elif self.mode == "text" and event.get("event") == "stage":
            from rich.console import Console

            status = event["status"]
            colour = {"cached": "cyan", "done": "green", "skipped": "dim"}.get(status, "white")
            extra = f" {event['seconds']:.1f}s" if "seconds" in event else ""
            Console(stderr=True).print(f"[{colour}]{status:>7}[/{colour}] {event['stage']}{extra}")

    def progress(self, stage: str, seconds: float, written: int | None, activity: str | None = None) -> None:
        """A stage still running (text mode only: `--events json` keeps its one event per stage)."""
        if self.mode != "text":
            return
        line = (f"running {stage}: {seconds:.0f} s" + (f" ({activity})" if activity else "")
                + (f", {human_bytes(written)} written" if written else ""))
        if sys.stderr.isatty():  # one line rewritten in place; the stage's own line replaces it
            sys.stderr.write(f"\r\033[2K{line}")
            self._line_open = True
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def end_progress(self) -> None:
        if self._line_open:
            self._line_open = False
            sys.stderr.write("\r\033[2K")
            sys.stderr.flush()


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def dir_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it is gone: a stage may rename its output while we count)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


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
    filling: list[Path] = field(default_factory=list)  # directories stages are writing now (progress counts them)
    deferred: set[str] = field(default_factory=set)  # lazy stages whose event waits for `materialised`
    ran_lazy: set[str] = field(default_factory=set)  # lazy stages that have materialised
    activity: list[str] = field(default_factory=list)  # what a stage is doing for a later one (progress shows it)

    @property
    def staging(self) -> Path:
        """Where the artifact is assembled before it is renamed into place (removed when a build fails)."""
        return self.out_dir.parent / f".{self.out_dir.name}.tmp"

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
                self._fill(fill, tmp)
            except BaseException:  # a failed stage leaves no temporary directory behind
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return tmp
        final = self.cache_dir / stage / key
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
        try:
            self._fill(fill, tmp)
            (tmp / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    @contextmanager
    def doing(self, what: str) -> Iterator[None]:
        """Name the work in progress (a lazy stage materialising inside `lower`) for the progress line."""
        self.activity.append(what)
        try:
            yield
        finally:
            self.activity.pop()

    def _fill(self, fill: Callable[[Path], None], tmp: Path) -> None:
        self.filling.append(tmp)
        try:
            fill(tmp)
        finally:
            self.filling.remove(tmp)


# Stages with no stored output of their own: resolve/plan are cheap pure functions of the recipe, quantize is a
# deterministic function of its key materialised in memory only when a later stage misses (export is stored
# for models small enough, see stages.STORE_EXPORT_MAX_BYTES, else it too materialises lazily). They report
# "cached" when a build with the same key has completed them before (a marker under the cache dir). A lazy stage
# (quantize, export) that has to run reports once: "done" when it materialises (`materialised`), or "skipped"
# at the end when no later stage needed it.
MARKER_STAGES = ("resolve", "plan", "quantize")


LAZY_STAGES = ("quantize", "export")
PROGRESS_AFTER_S = 2.0  # a stage quicker than this prints no progress line
PROGRESS_EVERY_S = {True: 0.5, False: 10.0}  # seconds between progress lines: terminal (rewritten) | pipe or file


def run_stage(build: Build, name: str, fn: Callable[[Build], str | None]) -> None:
    """Run one stage, timing it and emitting an event. fn returns "cached" on a cache hit. A lazy stage that did
    not run yet reports once, when it materialises (or as "skipped" when nothing needed it, see `execute`)."""
    t0 = time.perf_counter()
    with _ticker(build, name, t0):
        status = fn(build) or "done"
    if name in MARKER_STAGES and status == "done" and build.keys.get(name):
        status = _marker(build, name, build.keys[name])
    if name in LAZY_STAGES and status == "done" and name not in build.ran_lazy:
        build.deferred.add(name)
        return
    build.events.emit(event="stage", stage=name, status=status, key=build.keys.get(name),
                      seconds=round(time.perf_counter() - t0, 3))


def materialised(build: Build, name: str, seconds: float) -> None:
    """A lazy stage (quantize, export) actually ran, because a later stage needed its output."""
    build.ran_lazy.add(name)
    build.deferred.discard(name)
    build.events.emit(event="stage", stage=name, status="done", key=build.keys.get(name), seconds=round(seconds, 3))


class _ticker:
    """While a stage runs: a progress line (stage, elapsed, bytes its output directory holds so far) from a
    daemon thread, so a 50 s `lower` is not silent. Rewritten in place on a terminal, plain lines in a log."""

    def __init__(self, build: Build, stage: str, t0: float):
        import threading

        self.build, self.stage, self.t0 = build, stage, t0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.every = float(os.environ.get("DSV4C_PROGRESS_EVERY_S", PROGRESS_EVERY_S[sys.stderr.isatty()]))

    def __enter__(self) -> "_ticker":
        if self.build.events.mode == "text":
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        self.build.events.end_progress()

    def _run(self) -> None:
        wait = max(PROGRESS_AFTER_S, self.every)
        while not self.stop.wait(wait):
            written = sum(dir_bytes(p) for p in list(self.build.filling))
            activity = self.build.activity[-1] if self.build.activity else None
            self.build.events.progress(self.stage, time.perf_counter() - self.t0, written, activity)
            wait = self.every


def _marker(build: Build, stage: str, key: str) -> str:
    path = build.cache_dir / stage / key / ".complete"
    if build.cache_mode in ("readwrite", "readonly") and path.is_file():
        return "cached"
    if build.cache_mode in ("readwrite", "redo"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    return "done"


def execute(build: Build, stages: Mapping[str, StageFunction]) -> Path | None:
    """Run `stages` (dsv4c.compiler.stages.STAGE_FUNCTIONS: passed in, because the stages build on this module)
    up to `build.until`; returns the artifact directory (None when no stage up to there writes one). On failure
    nothing is left beside the output; with `build.debug` a repro bundle is (its path is in the error's details)."""
    last = STAGES.index(build.until)
    name = STAGES[0]
    try:
        for name in STAGES[: last + 1]:
            run_stage(build, name, stages[name])
        for lazy in sorted(build.deferred, key=STAGES.index):  # nothing later needed its output
            build.events.emit(event="stage", stage=lazy, status="skipped", key=build.keys.get(lazy), seconds=0.0)
    except (KeyboardInterrupt, SystemExit):
        shutil.rmtree(build.staging, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(build.staging, ignore_errors=True)
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


__all__ = ["Build", "Events", "STAGES", "CACHE_MODES", "EVENT_MODES", "StageFunction", "execute", "digest",
           "toolchain_versions", "default_cache_dir", "BuildError", "CheckpointInvalidError", "InfeasibleError",
           "ToolchainError"]
