"""One exception type per documented exit code.

Every `dsv4c` failure the user can act on is a `Dsv4cError` subclass: its class fixes the process exit code,
its message's first line names the cause (the key path, file, tensor or op that is wrong), `details` add context
lines and `hint` says what to do. `format_error` renders all of that for the terminal; the CLI exits with
`e.exit_code`. Anything else escaping a stage is wrapped in `BuildError` by the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

# The exit-code contract, shared by `dsv4c --help` and the README (keep them in sync with this table).
EXIT_CODES: dict[int, str] = {
    0: "ok",
    2: "recipe or arguments invalid",
    3: "infeasible on the declared target",
    4: "toolchain missing or mismatched",
    5: "validation gate failed",
    6: "build error",
    7: "checkpoint invalid",
    8: "address in use or unavailable",
    9: "engine failed while running",
}


class Dsv4cError(Exception):
    """Base class. Raise a subclass: the subclass decides the exit code."""

    exit_code: ClassVar[int] = 6  # an unclassified failure is reported as a build error
    label: ClassVar[str | None] = None  # the meaning shown, when narrower than the exit code's (code 2: two kinds)
    hint: str | None = None  # class-level default; an instance may carry its own

    def __init__(self, message: str, hint: str | None = None, details: Sequence[str] = ()):
        super().__init__(message)
        if hint is not None:
            self.hint = hint
        self.details: list[str] = list(details)

    @property
    def meaning(self) -> str:
        return self.label or EXIT_CODES[self.exit_code]


class RecipeError(Dsv4cError):
    """The recipe (or a `--set` override) is invalid: syntax, unknown key, wrong type or value, `extends` cycle."""

    exit_code = 2
    label = "recipe invalid"
    hint = "`dsv4c schema` prints every recipe key with its allowed values"


class ArgumentError(Dsv4cError):
    """A command-line argument is invalid (a token id outside the vocabulary, a prompt longer than the context, a
    directory that is not an artifact): the same exit code as a bad recipe, without the recipe's hint."""

    exit_code = 2
    label = "arguments invalid"


class InfeasibleError(Dsv4cError):
    """The recipe is valid but the declared target cannot build or run it (format, op, memory, layout)."""

    exit_code = 3


class ToolchainError(Dsv4cError):
    """A compiler/runtime toolchain the target needs is missing or has the wrong version."""

    exit_code = 4


class ValidationGateError(Dsv4cError):
    """The built engine does not match the PyTorch reference within the recipe's `validate` thresholds."""

    exit_code = 5


class BuildError(Dsv4cError):
    """A stage failed for a reason that is none of the above (a bug, a full disk, an interrupted write)."""

    exit_code = 6


class CheckpointInvalidError(Dsv4cError):
    """The checkpoint is missing, incomplete, or not in the official DeepSeek-V4 format."""

    exit_code = 7


class AddressInUseError(Dsv4cError):
    """`dsv4c serve` cannot listen on the address asked for (another process holds the port, or the host is not
    one of this machine's addresses)."""

    exit_code = 8


class EngineRunError(Dsv4cError):
    """A loaded engine stopped working mid-run: a worker process of a multi-device engine died or failed."""

    exit_code = 9
    hint = "the message names the rank; run again (the artifact is fine if it loaded)"


ERROR_TYPES: dict[int, type[Dsv4cError]] = {
    cls.exit_code: cls
    for cls in (RecipeError, InfeasibleError, ToolchainError, ValidationGateError, BuildError, CheckpointInvalidError,
                AddressInUseError, EngineRunError)
}


def from_artifact_error(e: Exception) -> Exception:
    """An artifact problem (dsv4c.artifact) as the error the command line reports: not an artifact -> exit 2;
    built for another target, schema or dsv4c version -> exit 4; an engine that failed while running (a dead
    mesh worker) -> exit 9. Any other exception is returned as it is."""
    from dsv4c.artifact import ArtifactError, EngineFailure, NotAnArtifact

    if isinstance(e, EngineFailure):
        return EngineRunError(str(e))
    if isinstance(e, NotAnArtifact):
        return ArgumentError(str(e))
    if isinstance(e, ArtifactError):
        return ToolchainError(str(e))
    return e


def format_error(e: Dsv4cError) -> str:
    """`error (<meaning>, exit N): <cause>` on the first line, then the message's further lines, the details and
    the hint, each indented so the first line stands out."""
    first, *rest = str(e).splitlines() or [type(e).__name__]
    lines = [f"error ({e.meaning}, exit {e.exit_code}): {first}"]
    lines += [f"  {line}" for line in (*rest, *getattr(e, "details", ()))]
    if e.hint:
        lines.append(f"  hint: {e.hint}")
    return "\n".join(lines)
