"""Strict parser of V4 completions back into reasoning / content / tool calls, whole or as a stream.

A completion is what the model generated after the generation prompt (which already holds "<think>" in thinking
mode or "</think>" in chat mode):

    thinking:  reasoning "</think>" content [TOOL CALLS] [EOS]
    chat:      content [TOOL CALLS] [EOS]
    TOOL CALLS = "\\n\\n<｜DSML｜tool_calls>\\n" (invoke "\\n")* "</｜DSML｜tool_calls>"
    invoke     = '<｜DSML｜invoke name="NAME">\\n' (parameter "\\n")* "</｜DSML｜invoke>"
    parameter  = '<｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>'

(An invoke without parameters is written with an empty line: '<｜DSML｜invoke name="f">\\n\\n</｜DSML｜invoke>'.)
A completion without EOS was cut off (max_tokens): a cut inside the reasoning parses as reasoning only; a cut
inside the tool-call block is an error, like any other malformed DSML. Special strings inside reasoning or content
mean the model left the format, which is also an error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from dsv4c.runtime.chat.encoding import (BOS, DSML, EOS, THINK_END, THINK_START, TOOL_CALLS_END, TOOL_CALLS_START,
                                         ChatFormatError, check_thinking_mode, to_json)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        """The arguments as the JSON object string OpenAI's `function.arguments` carries."""
        return to_json(self.arguments)


@dataclass
class ParsedCompletion:
    reasoning_content: str | None  # None in chat mode
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    finished: bool = True  # the completion ended with EOS (False: it was cut off)


_INVOKE = re.compile(f'<{DSML}invoke name="([^"\\n]*)">\n')
_PARAMETER = re.compile(f'<{DSML}parameter name="([^"\\n]*)" string="(true|false)">(.*?)</{DSML}parameter>\n', re.S)
_INVOKE_END = f"</{DSML}invoke>\n"
_FORBIDDEN = (BOS, EOS, THINK_START, THINK_END, DSML)


def _where(text: str, pos: int) -> str:
    return f"at offset {pos} (near {text[pos:pos + 60]!r})"


def _parse_tool_calls(text: str, pos: int) -> list[ToolCall]:
    """Parse the DSML block whose opening tag ends at `pos`; it must run to the end of `text`."""
    calls: list[ToolCall] = []
    while not text.startswith(TOOL_CALLS_END, pos):
        invoke = _INVOKE.match(text, pos)
        if invoke is None:
            if not text[pos:] or TOOL_CALLS_END.startswith(text[pos:]):
                raise ChatFormatError(f"unterminated tool_calls block: the text ends {_where(text, pos)} before "
                                      f"{TOOL_CALLS_END!r}")
            raise ChatFormatError(f"malformed DSML {_where(text, pos)}: expected '<{DSML}invoke name=\"...\">' "
                                  f"followed by a newline, or {TOOL_CALLS_END!r}")
        name, pos = invoke.group(1), invoke.end()
        arguments: dict[str, Any] = {}
        while (param := _PARAMETER.match(text, pos)) is not None:
            key, is_string, raw = param.groups()
            if key in arguments:
                raise ChatFormatError(f"tool call {name!r}: duplicate parameter {key!r} {_where(text, pos)}")
            if is_string == "true":
                arguments[key] = raw
            else:
                try:
                    arguments[key] = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise ChatFormatError(f"tool call {name!r}: parameter {key!r} has string=\"false\" but its value "
                                          f"is not JSON ({e}) {_where(text, pos)}") from None
            pos = param.end()
        if not arguments and text.startswith("\n" + _INVOKE_END, pos):
            pos += 1  # the empty line of an invoke without parameters
        if not text.startswith(_INVOKE_END, pos):
            raise ChatFormatError(f"malformed DSML in tool call {name!r} {_where(text, pos)}: expected "
                                  f"'<{DSML}parameter name=\"...\" string=\"true|false\">...</{DSML}parameter>' "
                                  f"or {_INVOKE_END!r}")
        pos += len(_INVOKE_END)
        calls.append(ToolCall(name, arguments))
    pos += len(TOOL_CALLS_END)
    if pos != len(text):
        raise ChatFormatError(f"unexpected text after the tool calls {_where(text, pos)}")
    return calls


def parse_completion(text: str, thinking_mode: str = "thinking") -> ParsedCompletion:
    """Split a completion (the text generated after the generation prompt, EOS at the end or not) into reasoning,
    content and tool calls; raise ChatFormatError, naming what is wrong and where, if it is not V4 output."""
    check_thinking_mode(thinking_mode)
    end = text.find(EOS)
    finished = end >= 0
    if finished and end + len(EOS) != len(text):
        raise ChatFormatError(f"unexpected text after {EOS} {_where(text, end + len(EOS))}")
    body = text[:end] if finished else text

    reasoning, pos = None, 0
    if thinking_mode == "thinking":
        think_end, calls_at = body.find(THINK_END), body.find(TOOL_CALLS_START)
        if calls_at >= 0 and (think_end < 0 or calls_at < think_end):
            raise ChatFormatError(f"tool calls inside the reasoning (before {THINK_END}) {_where(body, calls_at)}")
        if think_end < 0:
            if finished:
                raise ChatFormatError(f"thinking-mode completion ended with {EOS} but never closed its reasoning "
                                      f"with {THINK_END}")
            _check_clean(body, "reasoning_content")
            return ParsedCompletion(reasoning_content=body, content="", finished=False)  # cut off while thinking
        reasoning, pos = body[:think_end], think_end + len(THINK_END)
        _check_clean(reasoning, "reasoning_content")

    calls_at = body.find(TOOL_CALLS_START, pos)
    content = body[pos:] if calls_at < 0 else body[pos:calls_at]
    _check_clean(content, "content")
    calls = [] if calls_at < 0 else _parse_tool_calls(body, calls_at + len(TOOL_CALLS_START))
    return ParsedCompletion(reasoning_content=reasoning, content=content, tool_calls=calls, finished=finished)


def _check_clean(text: str, what: str) -> None:
    for token in _FORBIDDEN:
        if (at := text.find(token)) >= 0:
            raise ChatFormatError(f"special string {token!r} inside {what} at offset {at} (malformed output)")


class CompletionStream:
    """Incremental split of a completion into reasoning and content deltas, for streaming responses.

    feed(text_delta) returns [("reasoning" | "content", text), ...]; text that may be the start of "</think>", of
    the tool-call block or of EOS is held back until it is decided. Nothing is streamed from the tool-call block:
    `in_tool_calls` turns True when it starts, and finish() parses the whole completion strictly (tool calls
    included), so the streamed deltas always concatenate to its reasoning_content / content.
    """

    def __init__(self, thinking_mode: str = "thinking"):
        check_thinking_mode(thinking_mode)
        self.thinking_mode = thinking_mode
        self.text = ""
        self._phase = "reasoning" if thinking_mode == "thinking" else "content"
        self._done = 0  # chars of self.text already streamed or consumed as markers

    @property
    def in_tool_calls(self) -> bool:
        return self._phase == "tool_calls"

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self.text += delta
        out: list[tuple[str, str]] = []
        while self._phase in ("reasoning", "content"):
            markers = (THINK_END,) if self._phase == "reasoning" else (EOS, TOOL_CALLS_START)
            hits = [(at, m) for m in markers if (at := self.text.find(m, self._done)) >= 0]
            if not hits:
                safe = len(self.text) - max(_partial_suffix(self.text, self._done, m) for m in markers)
                self._emit(out, safe)
                break
            at, marker = min(hits)
            self._emit(out, at)
            self._done = at + len(marker)
            self._phase = {THINK_END: "content", EOS: "done", TOOL_CALLS_START: "tool_calls"}[marker]
        return out

    def _emit(self, out: list[tuple[str, str]], upto: int) -> None:
        if upto > self._done:
            out.append((self._phase, self.text[self._done:upto]))
            self._done = upto

    def finish(self) -> ParsedCompletion:
        """The strict parse of everything fed (raises ChatFormatError like parse_completion)."""
        return parse_completion(self.text, self.thinking_mode)


def _partial_suffix(text: str, start: int, marker: str) -> int:
    """Length of the longest tail of text[start:] that is a proper prefix of marker (could still become it)."""
    for n in range(min(len(marker) - 1, len(text) - start), 0, -1):
        if marker.startswith(text[len(text) - n:]):
            return n
    return 0
