"""Model text on a terminal: generated text is untrusted bytes, and a control character (ESC starting a cursor or
title sequence, a bell, a carriage return overwriting the line) must not act on the user's terminal."""

from __future__ import annotations

import re

# C0 controls except newline and tab, DEL, and the C1 range (which some terminals also obey as escape introducers)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """`text` with every control character other than newline and tab written as a visible `\\xNN` escape."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def rate_line(new_tokens: int, seconds: float, prompt_tokens: int | None = None) -> str:
    """`12 tokens in 0.41 s (29.3 tokens/s)`, with the prompt's length when given."""
    rate = new_tokens / seconds if seconds > 0 else 0.0
    prompt = f", prompt {prompt_tokens} tokens" if prompt_tokens is not None else ""
    return f"{new_tokens} tokens in {seconds:.2f} s ({rate:.1f} tokens/s){prompt}"
