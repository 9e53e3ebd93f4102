"""`dsv4c` command line: build, plan, run, inspect, schema, serve, chat, doctor.

Exit codes: 0 ok · 2 recipe or arguments invalid · 3 infeasible on the declared target · 4 toolchain missing or
mismatched · 5 validation gate failed · 6 build error · 7 checkpoint invalid · 8 address in use or
unavailable.

Every user error is one line `error (<meaning>, exit N): <cause>` (then indented details and a hint) on stderr,
whatever the command and whichever layer found it (click's option parsing included); a traceback means a bug
(or `--debug`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

import dsv4c
from dsv4c.artifact import EngineFailure
from dsv4c.compiler.errors import EXIT_CODES, ArgumentError, Dsv4cError, format_error, from_artifact_error

if TYPE_CHECKING:
    from dsv4c.compiler.plan import Plan

EXIT_HELP = "\n".join(f"  {code}  {meaning}" for code, meaning in sorted(EXIT_CODES.items()))


def _fail(e: Exception, debug: bool = False) -> NoReturn:
    if isinstance(e, Dsv4cError):
        click.echo(format_error(e), err=True)
        if debug:
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        sys.exit(e.exit_code)
    raise e


class Dsv4cGroup(click.Group):
    """Runs click in non-standalone mode so that its own errors (a bad option value, a missing argument) are
    reported in dsv4c's one error style and exit code, like every other user error."""

    def main(self, *args: Any, **kwargs: Any) -> NoReturn:
        kwargs["standalone_mode"] = False
        kwargs.setdefault("prog_name", "dsv4c")  # also under `python -m dsv4c.compiler.cli`: hints name the command
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.Abort:  # Ctrl-C outside a command's own handling
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            where = e.ctx.command_path if getattr(e, "ctx", None) else "dsv4c"
            _fail(ArgumentError(e.format_message(), hint=f"`{where} --help` lists the arguments"))
        except Dsv4cError as e:
            _fail(e)
        except EngineFailure as e:  # a multi-device engine's worker died mid-command (run, chat, serve)
            _fail(from_artifact_error(e))
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=Dsv4cGroup, epilog=f"\b\nExit codes:\n{EXIT_HELP}")
@click.version_option(package_name="dsv4c")
def main() -> None:
    """Compile DeepSeek-V4 checkpoints into deployable engines (CPU, TensorRT, CANN)."""


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path), required=False)
@click.option("--from-bundle", "from_bundle", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Finish a `--until lower` bundle (e.g. TensorRT .plan build on an NVIDIA machine).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Artifact directory (default artifacts/NAME).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. runtime.max_batch_size=4.")
@click.option("--until", type=click.Choice(["resolve", "plan", "load", "quantize", "export", "lower", "build",
                                            "validate", "package"]), default="package", help="Stop after this stage.")
@click.option("--cache", "cache_mode", type=click.Choice(["readwrite", "readonly", "off", "redo"]),
              default="readwrite", show_default=True, help="Stage cache policy.")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Stage cache (default ~/.cache/dsv4c/stages).")
@click.option("--events", type=click.Choice(["text", "json", "quiet"]), default="text", help="Progress format.")
@click.option("--debug", is_flag=True, help="On failure: show the traceback and keep a repro bundle beside the output.")
def build(recipe: Path | None, from_bundle: Path | None, output: Path | None, overrides: tuple[str, ...],
          until: str, cache_mode: str, cache_dir: Path | None, events: str, debug: bool) -> None:
    """Build RECIPE into an artifact directory (or finish a bundle with --from-bundle)."""
    if (recipe is None) == (from_bundle is None):
        raise click.UsageError("give exactly one of RECIPE or --from-bundle DIR")
    if from_bundle is not None:
        _build_from_bundle(from_bundle, output, debug)
        return
    try:
        artifact = dsv4c.build(recipe, output, overrides, until=until, cache_dir=cache_dir, cache_mode=cache_mode,
                               events=events, debug=debug)
    except Exception as e:  # noqa: BLE001 - _fail re-raises anything that is not ours
        _fail(e, debug)
        return
    if artifact is not None:
        if events == "json":
            print(json.dumps({"event": "artifact", "path": str(artifact)}))
        elif events == "text":
            click.echo(f"artifact: {artifact}", err=True)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. target.nodes=2.")
def plan(recipe: Path, as_json: bool, overrides: tuple[str, ...]) -> None:
    """What building RECIPE needs (weights, KV cache, memory per device, ops, toolchain), without loading weights.

    Exits 0 when the recipe fits its declared hardware and this dsv4c can build it, 3 when not (the problems and
    hints say what to change)."""
    from dsv4c.compiler.plan import render

    try:
        result = dsv4c.plan(recipe, overrides)
    except Exception as e:  # noqa: BLE001 - _fail re-raises anything that is not ours
        _fail(e)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        render(result.to_dict())
    if not result.feasible:
        _fail(plan_verdict(result))


def plan_verdict(result: Plan) -> Dsv4cError:
    """The exit-3 error of an infeasible plan: what does not fit first, else what blocks the build."""
    from dsv4c.compiler.errors import InfeasibleError

    if result.problems:
        first, *rest = result.problems
        cause = f"recipe {result.recipe!r} does not fit its declared target: {first}"
    else:
        first, *rest = result.build_blockers
        cause = f"recipe {result.recipe!r} fits its declared target, but this dsv4c cannot build it: {first}"
    return InfeasibleError(cause, details=rest, hint="; ".join(result.hints) or None)


def _build_from_bundle(bundle: Path, output: Path | None, debug: bool) -> None:
    from dsv4c.artifact import read_manifest
    from dsv4c.compiler.stages import build_from_bundle

    try:
        name = read_manifest(bundle).data["name"]
        out = build_from_bundle(bundle, (output or Path("artifacts") / name).resolve())
    except Exception as e:  # noqa: BLE001 - _fail re-raises anything that is not ours
        _fail(from_artifact_error(e), debug)
    click.echo(f"artifact: {out}", err=True)


# ---- run -----------------------------------------------------------------------------------------------------------
@main.command()
@click.argument("artifact", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--prompt", help="Text prompt (needs the artifact's tokenizer).")
@click.option("--tokens", help="Comma-separated prompt token ids.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--seed", type=int, default=None)
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@click.option("--emulate", is_flag=True, help="Run a TensorRT/CANN bundle or engine on ONNX Runtime CPU.")
def run(artifact: Path, prompt: str | None, tokens: str | None, max_new_tokens: int, temperature: float,
        top_p: float, seed: int | None, stream: bool, emulate: bool) -> None:
    """Generate from ARTIFACT for one prompt.

    Prints `tokens: <ids>` and, when the artifact has a tokenizer, `text: <text>` (special tokens left out,
    control characters escaped) on stdout; the token count and rate on stderr."""
    import time

    from dsv4c.runtime.terminal import rate_line

    if (prompt is None) == (tokens is None):
        raise click.UsageError("give exactly one of --prompt or --tokens")
    eng = dsv4c.load(artifact, emulate=emulate)
    ids = prompt_ids(eng, artifact, prompt, tokens)
    t0 = time.perf_counter()
    out = _generate(eng, ids, max_new_tokens, temperature, top_p, seed, stream)
    click.echo(rate_line(len(out), time.perf_counter() - t0, len(ids)), err=True)


def prompt_ids(eng, artifact: Path, prompt: str | None, tokens: str | None) -> list[int]:
    """The prompt as token ids, checked against the vocabulary and the context (exit 2 naming what is wrong)."""
    tok = eng.tokenizer
    if prompt is not None:
        if tok is None:
            raise ArgumentError(f"{artifact} has no tokenizer, so --prompt cannot be encoded; give --tokens")
        ids = [tok.bos_id] + tok.encode(prompt)
    else:
        ids = _parse_tokens(tokens or "")
        bad = [t for t in ids if not 0 <= t < eng.vocab_size]
        if bad:
            raise ArgumentError(f"--tokens: token id {bad[0]} is outside the vocabulary (0..{eng.vocab_size - 1})")
    if len(ids) >= eng.max_seq_len:
        raise ArgumentError(f"the prompt is {len(ids)} tokens; {artifact} was built for a context of "
                            f"{eng.max_seq_len} (runtime.max_seq_len), which must leave room for one new token",
                            hint="shorten the prompt or rebuild with --set runtime.max_seq_len=N")
    return ids


def _parse_tokens(text: str) -> list[int]:
    ids = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        try:
            ids.append(int(piece))
        except ValueError:
            raise ArgumentError(f"--tokens: {piece!r} is not a token id (give comma-separated integers, "
                                "e.g. --tokens 5,6,7)") from None
    if not ids:
        raise ArgumentError("--tokens: no token ids given (e.g. --tokens 5,6,7)")
    return ids


def _generate(eng, ids: list[int], max_new_tokens: int, temperature: float, top_p: float, seed: int | None,
              stream: bool) -> list[int]:
    """Generate and print: streamed (text when there is a tokenizer, else ids) or both labelled lines at the end."""
    from dsv4c.runtime.terminal import escape_controls

    tok = eng.tokenizer
    decoder = tok.incremental_decoder(skip_special_tokens=True) if (tok is not None and stream) else None
    if stream:
        click.echo("text: " if decoder else "tokens: ", nl=False)
    out: list[int] = []
    for _, t in eng.stream([ids], max_new_tokens, temperature, top_p, seed):
        if stream:
            click.echo(escape_controls(decoder.push(t)) if decoder else ("," if out else "") + str(t), nl=False)
        out.append(t)
    if stream:
        click.echo(escape_controls(decoder.flush()) if decoder else "")
        return out
    click.echo("tokens: " + ",".join(map(str, out)))
    if tok is not None:
        click.echo("text: " + escape_controls(tok.decode(out, skip_special_tokens=True)))
    return out


# ---- inspect -------------------------------------------------------------------------------------------------------
@main.command()
@click.argument("artifact", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Strict JSON (non-finite numbers as strings) on stdout.")
def inspect(artifact: Path, as_json: bool) -> None:
    """Show what ARTIFACT holds: kind, model size, target, recipe, toolchain, fallbacks, validation."""
    from dsv4c.runtime.engine import engine_info

    try:
        info = engine_info(artifact)
    except Exception as e:  # noqa: BLE001 - _fail re-raises anything that is not ours
        _fail(from_artifact_error(e))
    info["size"] = artifact_size(artifact)
    if as_json:
        click.echo(json.dumps(strict_json(info), indent=2, allow_nan=False))
        return
    _inspect_table(artifact, info)


def artifact_size(root: Path) -> dict[str, Any]:
    """Parameters of the model (from its config.json: all, and without the MTP layers the engine does not run) and
    bytes on disk (the engine files, the whole artifact)."""
    size: dict[str, Any] = {"engine_bytes": _dir_bytes(root / "engine"), "artifact_bytes": _dir_bytes(root)}
    if (root / "config.json").is_file():
        from dsv4c.graphs.checkpoint import expected_tensors
        from dsv4c.graphs.config import ModelConfig

        import math

        specs = expected_tensors(ModelConfig.from_json_file(root / "config.json"))
        params = {n: math.prod(s.shape) * (2 if str(s.dtype) == "torch.int8" else 1)  # int8 = two FP4 values
                  for n, s in specs.items() if not n.endswith(".scale")}
        size["params"] = sum(params.values())
        size["params_in_engine"] = sum(v for n, v in params.items() if not n.startswith("mtp."))
    return size


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def strict_json(value: Any) -> Any:
    """`value` with non-finite floats as the strings Python's float() reads back ("-Infinity", "NaN"): the
    manifest's cache fill values are -inf, which json.dumps would write as the non-JSON token -Infinity."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return value


def _inspect_table(artifact: Path, info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from dsv4c.compiler.plan import human_count, human_size

    size = info["size"]
    t = Table(title=f"{artifact}", show_header=False)
    t.add_row("name", info.get("name", ""))
    kind = info.get("kind", "?")
    t.add_row("kind", kind + (" (runnable engine)" if kind == "engine" else
                              " (finish it with `dsv4c build --from-bundle`, or `dsv4c run --emulate` it)"))
    if "params" in size:
        in_engine = human_count(size["params_in_engine"])
        t.add_row("model", f"{human_count(size['params'])} params ({in_engine} in the engine, MTP excluded)")
    t.add_row("size", f"engine {human_size(size['engine_bytes'])}, artifact {human_size(size['artifact_bytes'])}")
    t.add_row("target", json.dumps(info["target"]))
    t.add_row("runtime", json.dumps(info["runtime"]))
    t.add_row("experts", str(info["engine"].get("expert_format")))
    t.add_row("kernels", json.dumps(info["engine"].get("kernels")))
    t.add_row("fallbacks", json.dumps(info.get("fallbacks")))
    t.add_row("validation", json.dumps(info.get("validation")))
    t.add_row("toolchain", json.dumps(info.get("toolchain")))
    Console().print(t)


@main.command()
def schema() -> None:
    """Print the recipe JSON Schema."""
    from dsv4c.compiler.recipe import recipe_json_schema

    click.echo(json.dumps(recipe_json_schema(), indent=2))


# ---- serve, chat, doctor -------------------------------------------------------------------------------------------
@main.command()
@click.argument("artifact", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--model-name", help="Model id clients send (default: the artifact's name).")
@click.option("--max-batch", "batch_size", type=click.IntRange(min=1), help="Sequences decoded together "
              "(default and maximum: the artifact's runtime.max_batch_size).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=0),
              help="Requests waiting for a slot before the server answers 429.")
@click.option("--request-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds per request, queue included.")
@click.option("--threads", type=click.IntRange(min=1), help="Engine threads (default: the runtime's choice).")
@click.option("--stats-every", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between throughput lines on stderr (0: none).")
@click.option("--emulate", is_flag=True, help="Run a TensorRT/CANN artifact on ONNX Runtime CPU.")
def serve(artifact: Path, host: str, port: int, model_name: str | None, batch_size: int | None, max_queue: int,
          request_timeout: float, threads: int | None, stats_every: float, emulate: bool) -> None:
    """Serve ARTIFACT over OpenAI- and Anthropic-compatible HTTP APIs.

    Thinking is off unless a request asks for it (OpenAI: `reasoning_effort`, or `chat_template_kwargs:
    {"thinking": true}`, or `thinking: {"type": "enabled"}`; Anthropic: `thinking: {"type": "enabled"}`)."""
    from dsv4c.runtime.serve.app import bind_socket, serve_main

    eng = dsv4c.load(artifact, emulate=emulate, threads=threads)
    if eng.tokenizer is None:
        raise ArgumentError(f"{artifact} has no tokenizer/ directory; `dsv4c serve` needs one to encode chats")
    if batch_size is not None and batch_size > eng.max_batch_size:
        raise ArgumentError(f"--max-batch {batch_size}: {artifact} was built for at most {eng.max_batch_size} "
                            "sequences (runtime.max_batch_size)",
                            hint=f"rebuild with --set runtime.max_batch_size={batch_size}")
    try:
        sock = bind_socket(host, port)
    except OSError as e:
        import errno

        from dsv4c.compiler.errors import AddressInUseError

        hint = ("another process holds the port: choose another with --port" if e.errno == errno.EADDRINUSE else
                "--host must name an address of this machine (127.0.0.1, 0.0.0.0 for all)")
        raise AddressInUseError(f"cannot listen on {host}:{port}: {e.strerror or e}", hint=hint) from None
    serve_main(eng, sock, model_name=model_name, batch_size=batch_size, max_queue=max_queue,
               request_timeout=request_timeout, stats_every=stats_every)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--system", help="System prompt.")
@click.option("--mode", type=click.Choice(["thinking", "chat"]), default="thinking", show_default=True,
              help="Starting mode (switch with /think and /chat).")
@click.option("--max-new-tokens", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--seed", type=int, default=None)
@click.option("--threads", type=click.IntRange(min=1), help="Engine threads (default: the runtime's choice).")
@click.option("--emulate", is_flag=True, help="Run a TensorRT/CANN bundle or engine on ONNX Runtime CPU.")
def chat(artifact: Path, system: str | None, mode: str, max_new_tokens: int, temperature: float, top_p: float,
         seed: int | None, threads: int | None, emulate: bool) -> None:
    """Chat with ARTIFACT in the terminal (streamed; /think, /chat, /reset, /exit)."""
    from dsv4c.runtime.chat_cli import chat_main

    eng = dsv4c.load(artifact, emulate=emulate, threads=threads)
    if eng.tokenizer is None:
        raise ArgumentError(f"{artifact} has no tokenizer/ directory; `dsv4c chat` needs one")
    chat_main(eng, system, mode, max_new_tokens, temperature, top_p, seed)


MESH_COMMANDS = ("run", "chat", "serve")  # what rank 0 of a torchrun mesh can run


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("artifact", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def mesh(artifact: Path, command: tuple[str, ...]) -> None:
    """One rank of a multi-device ARTIFACT under torchrun (every node runs the same line): rank 0 runs COMMAND on
    ARTIFACT (`run --tokens 5,6,7`, `chat`, `serve --port 8000`; the artifact is not repeated), the other ranks
    serve it until rank 0 is done.

    \b
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank N --master-addr HOST --master-port PORT \\
        -m dsv4c.compiler.cli mesh ARTIFACT run --tokens 5,6,7"""
    from dsv4c.artifact import ArtifactError
    from dsv4c.runtime.mesh import broadcast_close, init_torchrun, serve, shutdown_torchrun

    if not command or command[0] not in MESH_COMMANDS:
        raise click.UsageError(f"give rank 0's command after the artifact: one of {', '.join(MESH_COMMANDS)} "
                               "with its options (e.g. run --tokens 5,6,7)")
    try:
        rank = init_torchrun()
    except ArtifactError as e:
        _fail(ArgumentError(str(e)))
    try:
        if rank != 0:
            serve(artifact)
            return
        try:
            main.main([command[0], str(artifact), *command[1:]])  # its Engine.load drives the mesh
        except SystemExit as e:
            if e.code:
                broadcast_close()  # a failed load never built the driver that would tell the others
            raise
    except ArtifactError as e:
        _fail(from_artifact_error(e))
    finally:
        shutdown_torchrun()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="The report as JSON on stdout.")
def doctor(as_json: bool) -> None:
    """What this machine can do: toolchain, CPU kernel library, GPU / TensorRT / CANN, caches, and what each
    missing piece disables. Exits 0: a missing optional piece is reported, not an error."""
    from dsv4c.compiler.doctor import diagnose, render

    report = diagnose()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        render(report)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the verdict and figures as JSON on stdout.")
def conformance(directory: Path, as_json: bool) -> None:
    """Check the graph's numerics against a recording of DeepSeek's official code, component by component.

    DIRECTORY holds ckpt/ (official-format checkpoint) and conformance.npz (the reference's tensors at every
    component boundary). Exits 0 when every check conforms, 5 when one does not."""
    from dsv4c.compiler.errors import CheckpointInvalidError, ValidationGateError
    from dsv4c.graphs.checkpoint import CheckpointError
    from dsv4c.graphs.conformance import RecordingError, format_report, run_conformance

    try:
        report = run_conformance(directory)
    except (RecordingError, CheckpointError) as e:
        _fail(CheckpointInvalidError(str(e)))
        return
    if as_json:
        click.echo(json.dumps({"passed": report["passed"], "checks": report["checks"]}, indent=2))
    else:
        click.echo(format_report(report))
    if not report["passed"]:
        failed = [name for name, c in report["checks"].items() if c.get("passed") is False]
        _fail(ValidationGateError(f"{directory}: the graph does not conform to the recording "
                                  f"(failed: {', '.join(failed)})"))


if __name__ == "__main__":
    main()
