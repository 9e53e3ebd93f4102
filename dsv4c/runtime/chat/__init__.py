"""DeepSeek-V4 chat format: `encode_messages` (messages -> prompt text) and `parse_completion` (generated text ->
reasoning / content / tool calls). A turn ends with EOS (`stop_strings`)."""

from dsv4c.runtime.chat.encoding import (BOS, EOS, REASONING_EFFORTS, SPECIAL_TOKENS, THINKING_MODES, ChatFormatError,
                                         encode_messages, normalize_reasoning_effort, stop_strings)
from dsv4c.runtime.chat.parser import CompletionStream, ParsedCompletion, ToolCall, parse_completion

__all__ = ["encode_messages", "parse_completion", "ParsedCompletion", "ToolCall", "ChatFormatError", "stop_strings",
           "CompletionStream", "normalize_reasoning_effort", "REASONING_EFFORTS", "THINKING_MODES", "SPECIAL_TOKENS",
           "BOS", "EOS"]
