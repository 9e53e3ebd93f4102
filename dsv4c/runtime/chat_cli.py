"""`dsv4c chat ARTIFACT`: an interactive terminal chat over an artifact, streamed token by token.

Commands typed at the prompt:
    /think    thinking mode (the default): the model reasons first, shown dimmed, then answers
    /chat     chat (non-thinking) mode
    /reset    forget the conversation
    /exit     quit (also Ctrl-D); Ctrl-C stops the answer being generated

The conversation is re-encoded with the V4 chat encoding every turn (earlier turns' reasoning is dropped by the
encoding's own rules), so the history sent is exactly what `/v1/chat/completions` would send. Model text is shown
with its control characters escaped (a random or hostile model must not drive the terminal), and each reply ends
with its token count and rate.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import click

from dsv4c.runtime.chat import ChatFormatError, encode_messages
from dsv4c.runtime.engine import Engine
from dsv4c.runtime.serve.textstream import GenerationText
from dsv4c.runtime.terminal import escape_controls, rate_line

HELP = "/think thinking mode · /chat chat mode · /reset new conversation · /exit quit"


def run_chat(engine: Engine, read: Callable[[str], str], write: Callable[..., None], *, system: str | None = None,
             thinking_mode: str = "thinking", max_new_tokens: int = 512, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None) -> None:
    """The chat loop: `read(prompt)` returns a line (EOFError ends the chat), `write(text, **style)` prints."""
    tok = engine.tokenizer
    if tok is None:
        raise click.ClickException(f"{engine.root} has no tokenizer/ directory; `dsv4c chat` needs one")
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    write(f"dsv4c chat · {engine.manifest.data.get('name', engine.root.name)} · {HELP}\n", dim=True)
    while True:
        try:
            line = read(f"[{thinking_mode}] > ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line.startswith("/"):
            command = line.split()[0].lower()
            if command in ("/exit", "/quit"):
                return
            if command in ("/think", "/chat"):
                thinking_mode = "thinking" if command == "/think" else "chat"
                write(f"mode: {thinking_mode}\n", dim=True)
            elif command == "/reset":
                messages = messages[:1] if system else []
                write("conversation cleared\n", dim=True)
            else:
                write(f"unknown command {command}; {HELP}\n", fg="yellow")
            continue
        messages.append({"role": "user", "content": line})
        reply = _answer(engine, messages, thinking_mode, write, max_new_tokens, temperature, top_p, seed)
        if reply is None:
            messages.pop()
        else:
            messages.append(reply)


def _answer(engine: Engine, messages: list[dict], thinking_mode: str, write, max_new_tokens: int,
            temperature: float, top_p: float, seed: int | None) -> dict | None:
    """Stream one assistant turn; returns the assistant message for the history (None when it could not run)."""
    try:
        prompt = engine.tokenizer.encode(encode_messages(messages, thinking_mode=thinking_mode))
    except ChatFormatError as e:
        write(f"error: {e}\n", fg="red")
        return None
    room = engine.max_seq_len - len(prompt)
    if room < 1:
        write(f"the conversation is {len(prompt)} tokens, over the model's context of {engine.max_seq_len}; "
              "/reset to start again\n", fg="red")
        return None
    stream = GenerationText(engine.tokenizer, thinking_mode)
    shown, generated, t0 = None, 0, time.perf_counter()
    try:
        for _, token in engine.stream([prompt], min(max_new_tokens, room), temperature, top_p, seed):
            generated += 1
            for channel, text in stream.push(token):
                shown = _show(write, channel, text, shown)
    except KeyboardInterrupt:
        write("\n[stopped]", dim=True)
    for channel, text in stream.finish():
        shown = _show(write, channel, text, shown)
    write("\n")
    write(f"[{rate_line(generated, time.perf_counter() - t0, len(prompt))}]\n", dim=True)
    parsed = stream.result()
    for call in parsed.tool_calls:
        write(escape_controls(f"[tool call] {call.name}({call.arguments})") + "\n", fg="cyan")
    reply: dict = {"role": "assistant", "content": parsed.content or ""}
    if parsed.reasoning_content is not None:
        reply["reasoning_content"] = parsed.reasoning_content
    return reply


def _show(write, channel: str, text: str, shown: str | None) -> str:
    if channel != shown and shown is not None:
        write("\n")
    write(escape_controls(text), dim=channel == "reasoning")
    return channel


def chat_main(engine: Engine, system: str | None, mode: str, max_new_tokens: int, temperature: float, top_p: float,
              seed: int | None) -> None:
    """`dsv4c chat` on a loaded engine (the CLI loads it, so that a bad artifact is reported like any command's)."""
    styled = sys.stdout.isatty()  # input() writes its prompt raw: no escape codes into a pipe

    def write(text: str, **style) -> None:
        click.echo(click.style(text, **style) if (style and styled) else text, nl=False)

    run_chat(engine, lambda prompt: input(click.style(prompt, bold=True) if styled else prompt), write, system=system,
             thinking_mode=mode, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
