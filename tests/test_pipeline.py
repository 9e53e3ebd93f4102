"""The runner, `pipeline.execute`: every stage is reported exactly once and in pipeline order, whichever stages hit
the cache and whenever a lazy stage (quantize, export) turns out to be needed; the declarations are checked
before anything runs; a stage may read a lazy stage only when it declares it in `after`.

The pipeline here is the real one (`stages.PIPELINE`: names, `after`, lazy and stored flags) with each stage's
work replaced by a line that says whether it hit the cache and which lazy stages it reads, so each case picks
exactly the situation it checks in milliseconds. The real stages' events are checked end to end by
test_cli_ux (a cold build) and test_build_e2e (a cached rebuild, a rebuild that only re-validates).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dsv4c import heap
from dsv4c.compiler.pipeline import STAGES, Build, Events, Stage, check_pipeline, execute
from dsv4c.compiler.stages import PIPELINE


def toy_pipeline(hits: set[str] = frozenset(), reads: dict[str, tuple[str, ...]] | None = None) -> tuple[Stage, ...]:
    """PIPELINE with trivial work: a stored stage in `hits` reports a cache hit, and `reads[stage]` are the lazy
    stages its work needs (export's materialisation reads quantize unless its programs are stored: a hit)."""
    reads = {"lower": ("export",), "validate": ("quantize",), **(reads or {})}

    def run(name: str):
        def stage_run(build: Build) -> str:
            build.keys[name] = f"key-of-{name}"
            hit = name in hits and build.stages[name].stored
            if not hit:  # a miss does the stage's work, which may read lazy stages
                for lazy in reads.get(name, ()):
                    build.need(lazy)
            return "cached" if hit else "done"
        return stage_run

    def materialise(name: str):
        def work(build: Build) -> None:
            if name == "export" and "export" not in hits:  # not stored: export the quantized model
                build.need("quantize")
        return work

    return tuple(dataclasses.replace(s, run=run(s.name), materialise=materialise(s.name) if s.lazy else None)
                 for s in PIPELINE)


def events(cache: Path, stages: tuple[Stage, ...], until: str = "package") -> list[tuple[str, str]]:
    build = Build(recipe=None, out_dir=cache.parent / "out", cache_dir=cache, events=Events("quiet"), until=until)
    execute(build, stages)
    return [(e["stage"], e["status"]) for e in build.events.log]


def test_a_cold_build_and_its_cached_rebuild_report_each_stage_once_in_order(tmp_path):
    cold = events(tmp_path, toy_pipeline())
    assert cold == [(s, "done") for s in STAGES]  # quantize and export ran for lower, reported in their own slots
    rebuild = events(tmp_path, toy_pipeline(hits=set(STAGES)))
    assert rebuild == [(s, "cached") for s in STAGES]  # resolve, plan, quantize by their markers


def test_a_lazy_stage_reported_cached_is_not_reported_again_when_a_later_stage_needs_it(tmp_path):
    """A rebuild that only re-validates: quantize's marker says "cached", then validate needs the model. It used
    to report quantize a second time ("done"), after build."""
    events(tmp_path, toy_pipeline())
    revalidate = events(tmp_path, toy_pipeline(hits=set(STAGES) - {"validate", "package"}))
    assert revalidate == [(s, "done" if s in ("validate", "package") else "cached") for s in STAGES]


def test_a_lazy_stage_no_later_stage_needs_is_skipped_in_its_own_slot(tmp_path):
    """Programs too large to store: export is keyed but never run when lower is cached. Its "skipped" used to come
    at the end of the build, after package; it comes before lower, which waits for it."""
    events(tmp_path, toy_pipeline())
    large = events(tmp_path, toy_pipeline(hits=set(STAGES) - {"export", "validate", "package"}))
    status = dict(large)
    assert [s for s, _ in large] == list(STAGES), large
    assert (status["quantize"], status["export"], status["lower"], status["validate"]) == (
        "cached", "skipped", "cached", "done")


def test_until_a_lazy_stage_reports_it_skipped(tmp_path):
    assert events(tmp_path, toy_pipeline(), until="export") == [
        ("resolve", "done"), ("plan", "done"), ("load", "done"), ("quantize", "skipped"), ("export", "skipped")]


def test_a_failure_reports_what_finished_and_nothing_after(tmp_path):
    stages = list(toy_pipeline())
    stages[STAGES.index("build")] = dataclasses.replace(stages[STAGES.index("build")], run=_fail)
    build = Build(recipe=None, out_dir=tmp_path / "out", cache_dir=tmp_path, events=Events("quiet"))
    with pytest.raises(Exception, match="engine build failed"):
        execute(build, tuple(stages))
    assert [(e["stage"], e["status"]) for e in build.events.log] == [(s, "done") for s in STAGES[:6]]


def _fail(build: Build) -> str:
    raise RuntimeError("engine build failed")


def test_reading_a_lazy_stage_needs_declaring_it(tmp_path):
    stages = list(toy_pipeline(reads={"package": ("export",)}))  # package does not declare export
    build = Build(recipe=None, out_dir=tmp_path / "out", cache_dir=tmp_path, events=Events("quiet"))
    with pytest.raises(Exception, match="stage 'package' reads 'export', which its `after` does not declare"):
        execute(build, tuple(stages))


def test_the_declarations_are_checked_before_anything_runs():
    check_pipeline(PIPELINE)
    early = dataclasses.replace(PIPELINE[2], after=("lower",))  # load declared after a later stage
    with pytest.raises(ValueError, match=r"stage 'load' is declared after \['lower'\]"):
        check_pipeline((*PIPELINE[:2], early, *PIPELINE[3:]))
    with pytest.raises(ValueError, match="expected"):
        check_pipeline(PIPELINE[::-1])
    with pytest.raises(ValueError, match="materialise"):
        check_pipeline((*PIPELINE[:3], dataclasses.replace(PIPELINE[3], materialise=None), *PIPELINE[4:]))


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(heap._LIBC is None or not Path("/proc/self/status").is_file(), reason="glibc on Linux only")
def test_what_a_stage_freed_is_given_back_before_the_next_stage_runs(tmp_path):
    """malloc keeps the memory of blocks under its mmap threshold once they are freed unless trimmed: the next
    stage would start with the last one's freed working set still resident."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    block, seen = 64 << 10, {}
    kept = []

    def lower_frees_256_mb(build: Build) -> str:
        blocks = [libc.malloc(block) for _ in range(4096)]
        kept.append(libc.malloc(block))  # above them: the heap's top cannot shrink past it by itself
        for p in blocks:
            ctypes.memset(p, 1, block)
        seen["held"] = _rss_anon()
        for p in blocks:
            libc.free(p)
        seen["freed"] = _rss_anon()
        build.keys["lower"] = "key"
        return "done"

    def build_measures(build: Build) -> str:
        seen["next stage"] = _rss_anon()
        build.keys["build"] = "key"
        return "done"

    stages = list(toy_pipeline(reads={"lower": ()}))
    for name, run in (("lower", lower_frees_256_mb), ("build", build_measures)):
        stages[STAGES.index(name)] = dataclasses.replace(stages[STAGES.index(name)], run=run)
    try:
        events(tmp_path / "cache", tuple(stages), until="build")
    finally:
        for p in kept:
            libc.free(p)
    assert seen["freed"] > seen["held"] - (64 << 20)  # free() alone gave (almost) nothing back
    assert seen["next stage"] < seen["freed"] - (200 << 20)
