"""One exception type per documented exit code. The first line of every message names the cause."""

from __future__ import annotations

EXIT_CODES = {
    0: "ok",
    2: "recipe invalid",
    3: "infeasible on the declared target",
    4: "toolchain missing or mismatched",
    5: "validation gate failed",
    6: "build error",
    7: "checkpoint invalid",
}


class Dsv4cError(Exception):
    exit_code = 6
    hint: str | None = None

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class RecipeError(Dsv4cError):
    exit_code = 2


class InfeasibleError(Dsv4cError):
    exit_code = 3


class ToolchainError(Dsv4cError):
    exit_code = 4


class ValidationGateError(Dsv4cError):
    exit_code = 5


class BuildError(Dsv4cError):
    exit_code = 6


class CheckpointInvalidError(Dsv4cError):
    exit_code = 7


def format_error(e: Dsv4cError) -> str:
    lines = [f"error: {e}", f"  ({EXIT_CODES[e.exit_code]}, exit {e.exit_code})"]
    if e.hint:
        lines.append(f"  hint: {e.hint}")
    return "\n".join(lines)
