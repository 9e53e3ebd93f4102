"""dsv4c: compile DeepSeek-V4 checkpoints into deployable engines.

The Python API, which the `dsv4c build` and `dsv4c plan` commands are thin layers over:

    artifact = dsv4c.build("recipes/tiny-cpu.yaml", overrides=["runtime.max_batch_size=1"])
    plan = dsv4c.plan("recipes/flash-h100.yaml")      # plan.feasible, plan.weights_bytes, plan.to_dict()
    engine = dsv4c.load(artifact)                       # engine.generate([[5, 6, 7]], max_new_tokens=8)

A failure raises a `dsv4c.compiler.errors.Dsv4cError` subclass, whose `exit_code` is the one the command line
exits with; nothing here exits the process. Each function imports the compiler or the runtime when called, so
`import dsv4c` stays cheap (no torch).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv4c._version import __version__

if TYPE_CHECKING:
    from dsv4c.compiler.plan import Plan
    from dsv4c.compiler.recipe import RecipeSource
    from dsv4c.runtime.engine import Engine

__all__ = ["__version__", "build", "plan", "load"]


def build(recipe: RecipeSource, out: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (), *,
          until: str | None = None, cache_dir: str | os.PathLike[str] | None = None, cache_mode: str = "readwrite",
          events: str = "quiet", debug: bool = False) -> Path | None:
    """Build `recipe` (a recipe file, a mapping of recipe keys or a loaded Recipe; `overrides` as `--set`
    KEY=VALUE) into the artifact directory `out` (default artifacts/NAME) and return its absolute path.

    until: stop after this stage (default: package, the whole build). Only two stages write an artifact: lower
    (`until="lower"`: the target's bundle) and package (the engine); stopped after any other, the build returns
    None. cache_dir: the stage cache (default
    $DSV4C_CACHE_DIR or ~/.cache/dsv4c/stages), shared with the command line; cache_mode: readwrite, readonly, off
    or redo. events: text (progress on stderr), json (one line per stage on stdout) or quiet. debug: on failure,
    keep a repro bundle beside `out` (named in the error's details)."""
    from dsv4c.compiler.pipeline import CACHE_MODES, EVENT_MODES, STAGES, Build, Events, default_cache_dir, execute
    from dsv4c.compiler.recipe import as_recipe
    from dsv4c.compiler.stages import PIPELINE

    until = until or STAGES[-1]
    _check_choice("until", until, STAGES)
    _check_choice("cache_mode", cache_mode, CACHE_MODES)
    _check_choice("events", events, EVENT_MODES)
    resolved = as_recipe(recipe, overrides)
    job = Build(recipe=resolved, out_dir=Path(out or Path("artifacts") / resolved.name).resolve(),
                cache_dir=Path(cache_dir or default_cache_dir()).resolve(), cache_mode=cache_mode,
                events=Events(events), until=until, debug=debug)
    return execute(job, PIPELINE)


def plan(recipe: RecipeSource, overrides: Sequence[str] = ()) -> Plan:
    """What building `recipe` needs (weights, KV cache, memory per device, ops, toolchain) and whether its declared
    hardware holds it, without reading weights: what `dsv4c plan` prints. An infeasible plan is returned, not
    raised (`plan.feasible`, `plan.problems`, `plan.build_blockers`, `plan.hints`)."""
    from dsv4c.compiler.plan import plan_recipe
    from dsv4c.compiler.recipe import as_recipe

    return plan_recipe(as_recipe(recipe, overrides))


def load(path: str | os.PathLike[str], **kwargs: Any) -> Engine:
    """The engine of the artifact at `path` (keyword arguments go to `dsv4c.runtime.Engine.load`: emulate, threads,
    ...). Not an artifact: ArgumentError (exit 2); built for another target, schema or dsv4c version:
    ToolchainError (exit 4)."""
    from dsv4c.artifact import ArtifactError
    from dsv4c.compiler.errors import from_artifact_error
    from dsv4c.runtime.engine import Engine

    try:
        return Engine.load(Path(path), **kwargs)
    except ArtifactError as e:
        raise from_artifact_error(e) from e


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        from dsv4c.compiler.errors import ArgumentError

        raise ArgumentError(f"{name}={value!r}: expected one of {', '.join(choices)}")
