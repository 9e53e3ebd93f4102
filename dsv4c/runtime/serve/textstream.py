"""Generated token ids -> streamed (channel, text) deltas with a client's stop strings, then the parsed completion.

The layers, in order: the tokenizer's incremental decoder (ids -> text, whole characters only), the chat
format's CompletionStream (text -> "reasoning" / "content" deltas, markers held back, the DSML tool-call block
kept for the final strict parse), then the client's stop strings on the content (text that may begin a stop
string is held back until the next tokens settle it; a stop string ends the answer and is not returned).

`result()` is the strict parse of everything generated. A model that leaves the V4 format (malformed DSML, a
special string inside its content: any random-weights model does) gets its text back as it streamed, with the
raw remainder appended to the content and no tool calls, rather than an error for the client.

EOS never reaches the channel splitter (a model that stops inside its reasoning would otherwise stream the EOS
string as reasoning); it is added back for the final parse, which uses it to tell finished from cut off.
"""

from __future__ import annotations

import logging

from dsv4c.runtime.chat import EOS, ChatFormatError, CompletionStream, ParsedCompletion, parse_completion
from dsv4c.runtime.chat.encoding import THINK_END

log = logging.getLogger("dsv4c.serve")


class GenerationText:
    def __init__(self, tokenizer, thinking_mode: str, stop: list[str] | tuple[str, ...] = ()):
        self.thinking_mode, self.eos_id = thinking_mode, tokenizer.eos_id
        self.eos = False  # the model ended its turn
        self.decoder = tokenizer.incremental_decoder()
        self.split = CompletionStream(thinking_mode)
        self.stop = [s for s in stop if s]
        self.reasoning, self.content = "", ""  # what has been released so far
        self.held = ""  # content that may be the start of a stop string
        self.stop_hit: str | None = None  # the stop string that ended the answer

    def push(self, token_id: int) -> list[tuple[str, str]]:
        """One generated token (EOS included) -> the deltas it releases."""
        if self.stop_hit is not None or self.eos:
            return []
        if token_id == self.eos_id:
            self.eos = True
            return self.finish()
        return self._release(self.split.feed(self.decoder.push(token_id)), final=False)

    def finish(self) -> list[tuple[str, str]]:
        """Whatever was held back, once generation has ended."""
        if self.stop_hit is not None:
            return []
        return self._release(self.split.feed(self.decoder.flush()), final=True)  # flush: idempotent

    def result(self) -> ParsedCompletion:
        reasoning = self.reasoning if self.thinking_mode == "thinking" else None
        if self.stop_hit is not None:
            return ParsedCompletion(reasoning_content=reasoning, content=self.content, finished=False)
        text = self.split.text
        try:
            return parse_completion(text + EOS if self.eos else text, self.thinking_mode)
        except ChatFormatError as e:
            log.info("the completion is not well-formed V4 output (%s); returned as text", e)
            at = len(self.reasoning)
            if self.thinking_mode == "thinking" and text.startswith(THINK_END, at):
                at += len(THINK_END)
            rest = text[at + len(self.content):]  # what was not streamed: the (malformed) tool-call block
            return ParsedCompletion(reasoning_content=reasoning, content=self.content + rest, finished=self.eos)

    def _release(self, deltas: list[tuple[str, str]], final: bool) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for channel, text in deltas:
            if channel == "content" and self.stop:
                text = self._cut_at_stop(self.held + text, final)
                if self.stop_hit is not None:
                    self._add(out, channel, text)
                    return out
            self._add(out, channel, text)
        if final and self.held:
            self._add(out, "content", self.held)
            self.held = ""
        return out

    def _cut_at_stop(self, text: str, final: bool) -> str:
        """The part of `text` that can be released now; sets stop_hit (and drops the rest) at a stop string."""
        hits = [(at, s) for s in self.stop if (at := text.find(s)) >= 0]
        if hits:
            at, self.stop_hit = min(hits)
            self.held = ""
            return text[:at]
        keep = 0 if final else max(_partial_suffix(text, s) for s in self.stop)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def _add(self, out: list[tuple[str, str]], channel: str, text: str) -> None:
        if not text:
            return
        if channel == "reasoning":
            self.reasoning += text
        else:
            self.content += text
        if out and out[-1][0] == channel:
            out[-1] = (channel, out[-1][1] + text)
        else:
            out.append((channel, text))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[len(text) - n:]):
            return n
    return 0
