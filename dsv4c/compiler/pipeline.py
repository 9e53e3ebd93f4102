"""The build pipeline: declared stages, run by one runner that owns the order, the cache, laziness and events.

    resolve -> plan -> load -> quantize -> export -> lower -> build -> validate -> package

What each stage computes is in `dsv4c.compiler.stages`, which declares the stages as `Stage` records (name, the
stages it runs after, how it runs) and hands them to `execute`; this module runs them and never imports that one.

Each stage has a key: a sha256 over what determines its output (the recipe sections it reads, the digests of
its inputs, the dsv4c and toolchain versions). Stages whose output lives on disk (load's synthetic checkpoint,
lower's bundle, build's engine files, validate's report) are stored under the cache directory by key and
reused when the key matches; in-memory stages (quantize, export) run only when a stage that needs them misses.
Every stage is reported once, in pipeline order. The artifact is assembled in a directory beside the output and
renamed into place at the end (`staged_output`), so a failed build leaves nothing behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

from dsv4c._version import __version__ as DSV4C_VERSION
from dsv4c.compiler.errors import BuildError, CheckpointInvalidError, Dsv4cError, InfeasibleError, ToolchainError
from dsv4c.heap import trim_heap

if TYPE_CHECKING:
    from torch.export import ExportedProgram

    from dsv4c.compiler.recipe import Recipe
    from dsv4c.graphs.checkpoint import CheckpointReader
    from dsv4c.graphs.model import DeepseekV4
    from dsv4c.targets.base import Target, TargetCheck

STAGES = ("resolve", "plan", "load", "quantize", "export", "lower", "build", "validate", "package")
CACHE_MODES = ("readwrite", "readonly", "off", "redo")
EVENT_MODES = ("text", "json", "quiet")
Status = Literal["done", "cached", "skipped"]  # what a stage's event reports


@dataclass(frozen=True)
class Stage:
    """One stage of the build, declared as data: `execute` checks the declarations, then walks them in order."""

    name: str
    after: tuple[str, ...]  # the stages whose outputs this one reads (they run first; a lazy one via `Build.need`)
    run: Callable[["Build"], Status]  # sets build.keys[name] and its fields of build.outputs; "cached" on a hit
    stored: bool = True  # False: no output on disk of its own; a marker under the cache records that its key ran
    lazy: bool = False  # `run` only keys it: `materialise` does the work, once a later stage needs the output
    materialise: Callable[["Build"], None] | None = None


@dataclass
class Outputs:
    """What the stages have produced, each field set by the stage named in its comment (None before it runs)."""

    lock: str | None = None  # resolve: the resolved recipe as YAML (the artifact's recipe.lock.yaml)
    toolchain: dict[str, str] | None = None  # resolve, plan adds the target's tools: versions, in keys and manifest
    target: Target | None = None  # plan: the target that lowers and builds
    check: TargetCheck | None = None  # plan: the target's verdict on the recipe (fallbacks it applies, tools)
    checkpoint: Path | None = None  # load: the verified official-format checkpoint directory
    reader: CheckpointReader | None = None  # load: its config and tensors
    model: DeepseekV4 | None = None  # quantize (lazy): the PyTorch model in the engine's weight formats
    programs: dict[str, ExportedProgram] | None = None  # export (lazy): the torch.export programs by name
    bundle: Path | None = None  # lower: the target's bundle (in the stage cache)
    engine_dir: Path | None = None  # build: the engine files (in the stage cache)
    engine_info: dict[str, Any] | None = None  # build: the engine's engine.json
    validation: dict[str, Any] | None = None  # validate: the report (validation.json)
    artifact: Path | None = None  # lower (`--until lower`: the bundle) or package (the engine): the output


def default_cache_dir() -> Path:
    return Path(os.environ.get("DSV4C_CACHE_DIR", Path.home() / ".cache" / "dsv4c" / "stages"))


def toolchain_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "dsv4c": DSV4C_VERSION, "dsv4c_sources": sources_digest()}


@functools.cache
def sources_digest() -> str:
    """Content hash of dsv4c's own Python sources: part of the export, lower and build stage keys, so a changed
    graph or lowering never reuses programs or bundles a different dsv4c stored (the version string alone does
    not move between commits)."""
    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:20]


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

    def note(self, message: str) -> None:
        """Something the user should know that is not a stage's outcome (e.g. a file copied where a hard link
        was meant to share it): a line on stderr in text mode, an event in JSON mode, kept in `log` always."""
        self.log.append({"event": "note", "message": message})
        self.end_progress()
        if self.mode == "json":
            print(json.dumps({"event": "note", "message": message}, sort_keys=True), flush=True)
        elif self.mode == "text":
            sys.stderr.write(f"   note {message}\n")
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
    """Bytes of the files under `path`, a file hard-linked several times counted once (the stage cache's engine
    links its bundle's weights: dsv4c.files); 0 when it is gone (a stage may rename its output while we count)."""
    sizes: dict[tuple[int, int], int] = {}
    for root, _, files in os.walk(path):
        for f in files:
            try:
                st = os.stat(os.path.join(root, f))
            except OSError:
                continue
            sizes[(st.st_dev, st.st_ino)] = st.st_size
    return sum(sizes.values())


@dataclass
class Build:
    """One `dsv4c build`: its inputs, what the stages produced (`outputs`, `keys`) and the runner's bookkeeping."""

    recipe: Recipe
    out_dir: Path
    cache_dir: Path
    cache_mode: str = "readwrite"
    events: Events = field(default_factory=Events)
    until: str = "package"
    debug: bool = False
    outputs: Outputs = field(default_factory=Outputs)
    keys: dict[str, str] = field(default_factory=dict)
    stages: dict[str, Stage] = field(default_factory=dict)  # the declarations `execute` runs, by name
    filling: list[Path] = field(default_factory=list)  # directories stages are writing now (progress counts them)
    activity: list[str] = field(default_factory=list)  # what a stage is doing for a later one (progress shows it)
    finished: dict[str, tuple[Status, float]] = field(default_factory=dict)  # stage -> its event's status, seconds
    pending: set[str] = field(default_factory=set)  # lazy stages keyed but not run: their event waits
    materialised: set[str] = field(default_factory=set)  # lazy stages whose work has run
    reported: int = 0  # how many stages, in pipeline order, have had their event
    readers: list[str] = field(default_factory=list)  # the stage running now, then any lazy one materialising
    needed_seconds: float = 0.0  # what the innermost materialisation spent on the lazy stages it needed

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

    def reuse_or_make(self, stage: str, key: str, make: Callable[[Path], None]) -> tuple[Path, Status]:
        """The output `stage` stored under `key` ("cached"), else `make(dir)` run now and stored ("done")."""
        stored = self.cached_dir(stage, key)
        if stored is not None:
            return stored, "cached"
        return self.store_dir(stage, key, make), "done"

    # -- laziness --------------------------------------------------------------------------------------------
    def need(self, stage: str) -> None:
        """The running stage reads the output of lazy `stage`: do its work now, the first time. Its event, held
        back until now, says "done"; one that already said "cached" (its output could be had cheaply) stays so."""
        reader = self.readers[-1]
        if stage not in self.stages[reader].after:  # the declarations are what `execute` checked the order by
            raise RuntimeError(f"stage {reader!r} reads {stage!r}, which its `after` does not declare")
        if stage in self.materialised:
            return
        outer_needed, self.needed_seconds = self.needed_seconds, 0.0
        t0 = time.perf_counter()
        self.readers.append(stage)
        try:
            with self.doing(stage):
                self.stages[stage].materialise(self)
        finally:
            self.readers.pop()
        seconds = time.perf_counter() - t0
        own = seconds - self.needed_seconds  # export's event times the export, not the quantize it needed first
        self.needed_seconds = outer_needed + seconds
        self.materialised.add(stage)
        if stage in self.pending:
            self.pending.discard(stage)
            _finish(self, stage, "done", own)

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


@contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """An empty directory beside `out_dir` to assemble an artifact in, renamed into place (replacing what was
    there) when the block ends and removed when it raises: the only way anything reaches an output path, so a
    failed or interrupted build leaves nothing at or beside it."""
    staging = out_dir.parent / f".{out_dir.name}.tmp"
    if staging.exists():  # left by a build that was killed
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


PROGRESS_AFTER_S = 2.0  # a stage quicker than this prints no progress line
PROGRESS_EVERY_S = {True: 0.5, False: 10.0}  # seconds between progress lines: terminal (rewritten) | pipe or file


def check_pipeline(stages: Sequence[Stage]) -> None:
    """The declarations `execute` relies on: the stages of STAGES in that order (the events' order, `--until`'s
    choices), each declared after stages that come before it, and a lazy stage with the work it defers."""
    names = tuple(s.name for s in stages)
    if names != STAGES:
        raise ValueError(f"the pipeline's stages are {names}, expected {STAGES}")
    for i, stage in enumerate(stages):
        later = [p for p in stage.after if p not in names[:i]]
        if later:
            raise ValueError(f"stage {stage.name!r} is declared after {later}, which do not run before it")
        if stage.lazy != (stage.materialise is not None):
            raise ValueError(f"stage {stage.name!r}: a lazy stage needs a `materialise`, and only a lazy one has one")


def execute(build: Build, stages: Sequence[Stage]) -> Path | None:
    """Run `stages` (dsv4c.compiler.stages.PIPELINE: handed in, because the stages build on this module) up to
    `build.until`; returns the artifact directory (None when no stage up to there writes one). On failure
    nothing is left beside the output; with `build.debug` a repro bundle is (its path is in the error's details)."""
    check_pipeline(stages)
    build.stages = {s.name: s for s in stages}
    name = STAGES[0]
    notes = _NoteHandler(build.events)
    files_log = logging.getLogger("dsv4c.files")  # link_tree's warnings (a copy where a link failed)
    files_log.addHandler(notes)
    try:
        for stage in stages[: STAGES.index(build.until) + 1]:
            name = stage.name
            run_stage(build, stage)
        for lazy in sorted(build.pending, key=STAGES.index):  # nothing later needed its output
            build.pending.discard(lazy)
            _finish(build, lazy, "skipped", 0.0)
    except Exception as e:  # (an interrupt passes through: `staged_output` has removed what it staged)
        _report_finished(build, drop_pending=True)  # what completed before the failure, still in order
        # an unexpected failure inside a stage is a build error (exit 6)
        error = e if isinstance(e, Dsv4cError) else BuildError(f"{type(e).__name__}: {e}")
        if build.debug:
            bundle = write_repro_bundle(build, name, e)
            error.details.append(f"repro bundle: {bundle} (replay the stage: sh {bundle / 'replay.sh'})")
        if error is e:
            raise
        raise error from e
    finally:
        files_log.removeHandler(notes)
    return build.outputs.artifact


class _NoteHandler(logging.Handler):
    """Warnings logged by the code a stage calls become `Events.note` lines of the build (text, JSON or the log
    only when quiet: then the record also reaches the application's own logging)."""

    def __init__(self, events: Events):
        super().__init__(logging.WARNING)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        self.events.note(record.getMessage())


def run_stage(build: Build, stage: Stage) -> None:
    """Run one stage, timed, with a progress line while it runs. A stage without stored output reports "cached"
    when a build with its key completed it before (a marker under the cache dir). A lazy stage that would have to
    run reports once its fate is known: "done" when a later stage needs it, "skipped" at the end when none did."""
    t0 = time.perf_counter()
    build.readers.append(stage.name)
    try:
        with _ticker(build, stage.name, t0):
            status = stage.run(build)
    finally:
        build.readers.pop()
        # what a stage freed goes back to the system before the next one runs: malloc keeps freed blocks under its
        # mmap threshold (measured: packaging held 0.36 GB of validation's freed memory at 8 layers, 0.53 at
        # V4-Flash width)
        trim_heap()
    if not stage.stored and status == "done":
        status = _marker(build, stage.name, build.keys[stage.name])
    if stage.lazy and status == "done" and stage.name not in build.materialised:
        build.pending.add(stage.name)
        return
    _finish(build, stage.name, status, time.perf_counter() - t0)


def _finish(build: Build, stage: str, status: Status, seconds: float) -> None:
    build.finished[stage] = (status, seconds)
    _report_finished(build)


def _report_finished(build: Build, drop_pending: bool = False) -> None:
    """Emit the events of finished stages in pipeline order: a stage's event waits for those of the stages before
    it, so a lazy stage still pending holds back the later ones until it is done (or, after a failure, dropped:
    it never ran)."""
    while build.reported < len(STAGES):
        name = STAGES[build.reported]
        if name in build.finished:
            status, seconds = build.finished[name]
            build.events.emit(event="stage", stage=name, status=status, key=build.keys.get(name),
                              seconds=round(seconds, 3))
        elif not (drop_pending and name in build.pending):
            return
        build.reported += 1


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


def _marker(build: Build, stage: str, key: str) -> Status:
    path = build.cache_dir / stage / key / ".complete"
    if build.cache_mode in ("readwrite", "readonly") and path.is_file():
        return "cached"
    if build.cache_mode in ("readwrite", "redo"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    return "done"


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
    on_disk = {k: str(getattr(build.outputs, k)) for k in ("checkpoint", "bundle", "engine_dir")
               if getattr(build.outputs, k) is not None}
    (bundle / "stages.json").write_text(json.dumps({
        "failing_stage": stage, "error": f"{type(error).__name__}: {error}",
        "exit_code": getattr(error, "exit_code", BuildError.exit_code),
        "stage_keys": build.keys, "recipe_sha256": build.recipe.digest(), "inputs": _input_fingerprints(build),
        "stage_outputs": on_disk, "toolchain": build.outputs.toolchain, "events": build.events.log,
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


__all__ = ["Build", "Events", "Outputs", "Stage", "Status", "STAGES", "CACHE_MODES", "EVENT_MODES", "execute",
           "check_pipeline", "staged_output", "digest",
           "toolchain_versions", "default_cache_dir", "BuildError", "CheckpointInvalidError", "InfeasibleError",
           "ToolchainError"]
