"""`dsv4c` command line: build, plan, run, inspect, schema.

Exit codes: 0 ok · 2 recipe invalid · 3 infeasible on the declared target · 4 toolchain missing or mismatched ·
5 validation gate failed · 6 build error · 7 checkpoint invalid.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dsv4c.compiler.errors import EXIT_CODES, Dsv4cError, format_error

EXIT_HELP = "\n".join(f"  {code}  {meaning}" for code, meaning in sorted(EXIT_CODES.items()))


def _fail(e: Exception, debug: bool = False) -> None:
    if isinstance(e, Dsv4cError):
        click.echo(format_error(e), err=True)
        if debug:
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        sys.exit(e.exit_code)
    raise e


@click.group(epilog=f"\b\nExit codes:\n{EXIT_HELP}")
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
    from dsv4c.compiler.pipeline import Build, Events, default_cache_dir, execute
    from dsv4c.compiler.recipe import load_recipe

    try:
        r = load_recipe(recipe, list(overrides))
        out = (output or Path("artifacts") / r.name).resolve()
        b = Build(recipe=r, out_dir=out, cache_dir=(cache_dir or default_cache_dir()).resolve(),
                  cache_mode=cache_mode, events=Events(events), until=until, debug=debug)
        artifact = execute(b)
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
    from dsv4c.compiler.errors import InfeasibleError
    from dsv4c.compiler.plan import make_plan, render
    from dsv4c.compiler.recipe import load_recipe

    try:
        result = make_plan(load_recipe(recipe, list(overrides)))
    except Exception as e:  # noqa: BLE001 - _fail re-raises anything that is not ours
        _fail(e)
        return
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        render(result)
    if not result["feasible"]:
        _fail(plan_verdict(result))


def plan_verdict(result: dict) -> InfeasibleError:
    """The exit-3 error of an infeasible plan: what does not fit first, else what blocks the build."""
    from dsv4c.compiler.errors import InfeasibleError

    name = result["recipe"]
    if result["problems"]:
        first, *rest = result["problems"]
        cause = f"recipe {name!r} does not fit its declared target: {first}"
    else:
        first, *rest = result["build_blockers"]
        cause = f"recipe {name!r} fits its declared target, but this dsv4c cannot build it: {first}"
    return InfeasibleError(cause, details=rest, hint="; ".join(result["hints"]) or None)


def _build_from_bundle(bundle: Path, output: Path | None, debug: bool) -> None:
    from dsv4c.compiler.stages import build_from_bundle

    try:
        name = json.loads((bundle / "manifest.json").read_text())["name"]
        out = build_from_bundle(bundle, (output or Path("artifacts") / name).resolve())
    except Exception as e:  # noqa: BLE001 - _fail re-raises anything that is not ours
        _fail(e, debug)
        return
    click.echo(f"artifact: {out}", err=True)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--prompt", help="Text prompt (needs the artifact's tokenizer).")
@click.option("--tokens", help="Comma-separated prompt token ids.")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@click.option("--emulate", is_flag=True, help="Run a TensorRT/CANN bundle or engine on ONNX Runtime CPU.")
def run(artifact: Path, prompt: str | None, tokens: str | None, max_new_tokens: int, temperature: float,
        top_p: float, seed: int | None, stream: bool, emulate: bool) -> None:
    """Generate from ARTIFACT for one prompt."""
    from dsv4c.artifact import ArtifactError
    from dsv4c.runtime import Engine

    if (prompt is None) == (tokens is None):
        raise click.UsageError("give exactly one of --prompt or --tokens")
    try:
        eng = Engine.load(artifact, emulate=emulate)
    except ArtifactError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(4)
    tok = eng.tokenizer
    if prompt is not None:
        if tok is None:
            raise click.UsageError(f"{artifact} has no tokenizer; use --tokens")
        ids = [tok.bos_id] + tok.encode(prompt)
    else:
        ids = [int(t) for t in tokens.split(",") if t.strip()]
    decoder = tok.incremental_decoder() if (tok is not None and stream) else None
    out = []
    for _, t in eng.stream([ids], max_new_tokens, temperature, top_p, seed):
        out.append(t)
        if stream:
            click.echo(decoder.push(t) if decoder else f"{t} ", nl=False)
    if stream:
        click.echo(decoder.flush() if decoder else "")
    elif tok is not None and prompt is not None:
        click.echo(tok.decode(out))
    else:
        click.echo(",".join(map(str, out)))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def inspect(artifact: Path, as_json: bool) -> None:
    """Show what ARTIFACT holds: target, recipe, toolchain, fallbacks, validation."""
    from dsv4c.runtime.engine import engine_info

    info = engine_info(artifact)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{artifact}", show_header=False)
    t.add_row("name", info.get("name", ""))
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


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--model-name", help="Model id clients send (default: the artifact's name).")
@click.option("--max-batch", "batch_size", type=click.IntRange(min=1), help="Sequences decoded together "
              "(default and maximum: the artifact's runtime.max_batch_size).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=0),
              help="Requests waiting for a slot before the server answers 429.")
@click.option("--request-timeout", default=600.0, show_default=True, help="Seconds per request, queue included.")
@click.option("--threads", type=int, help="Engine threads (default: the runtime's choice).")
@click.option("--emulate", is_flag=True, help="Run a TensorRT/CANN artifact on ONNX Runtime CPU.")
def serve(artifact: Path, host: str, port: int, model_name: str | None, batch_size: int | None, max_queue: int,
          request_timeout: float, threads: int | None, emulate: bool) -> None:
    """Serve ARTIFACT over OpenAI- and Anthropic-compatible HTTP APIs."""
    from dsv4c.runtime.serve.app import serve_main

    serve_main(artifact, host, port, model_name, batch_size, max_queue, request_timeout, threads, emulate)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--system", help="System prompt.")
@click.option("--mode", type=click.Choice(["thinking", "chat"]), default="thinking", show_default=True,
              help="Starting mode (switch with /think and /chat).")
@click.option("--max-new-tokens", default=512, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--threads", type=int, help="Engine threads (default: the runtime's choice).")
def chat(artifact: Path, system: str | None, mode: str, max_new_tokens: int, temperature: float, top_p: float,
         seed: int | None, threads: int | None) -> None:
    """Chat with ARTIFACT in the terminal (streamed; /think, /chat, /reset, /exit)."""
    from dsv4c.runtime.chat_cli import chat_main

    chat_main(artifact, system, mode, max_new_tokens, temperature, top_p, seed, threads)

if __name__ == "__main__":
    main()
