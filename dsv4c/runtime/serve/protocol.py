"""Request and response models of the two wire protocols the server speaks, and their mapping onto V4 chat
messages (the shape `dsv4c.runtime.chat.encode_messages` takes: OpenAI-style dicts plus `reasoning_content`).

* OpenAI Chat Completions (`POST /v1/chat/completions`), with DeepSeek's extensions: `reasoning_content` on
  assistant messages and deltas, `thinking: {"type": "enabled"|"disabled"}` and `reasoning_effort`.
* Anthropic Messages (`POST /v1/messages`): thinking / text / tool_use / tool_result content blocks,
  `thinking: {"type": "enabled"|"disabled"}` and `output_config: {"effort": ...}`.

Thinking is off by default in both, as a plain OpenAI client and Anthropic's own API expect (the answer in
`content`). It is on when asked: OpenAI `reasoning_effort`, `chat_template_kwargs: {"thinking": true}` (vLLM's
convention; `enable_thinking` is read too) or `thinking: {"type": "enabled"}`; Anthropic `thinking: {"type":
"enabled"}` (or "adaptive"). An explicit `thinking` object wins over the other two. Efforts are the chat encoding's
(`REASONING_EFFORTS`: minimal..high -> V4's Think High, xhigh/max -> Think Max). Anthropic's `budget_tokens`
is accepted and not enforced: V4 has no thinking budget, max_tokens bounds reasoning and answer together.

Unknown request fields are ignored (clients send many optional ones); fields we read are type-checked and a
violation is a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dsv4c.runtime.chat import REASONING_EFFORTS

MAX_STOP_STRINGS = 16


class ProtocolError(ValueError):
    """A request that parses but cannot be served as asked (HTTP 400, message names the field, `param` too)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _check_effort(effort: str | None) -> str | None:
    if effort is not None and effort not in REASONING_EFFORTS:
        raise ValueError(f"unknown effort {effort!r}; use one of {', '.join(REASONING_EFFORTS)}")
    return effort


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Thinking(_In):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=0)


# ---- OpenAI Chat Completions ------------------------------------------------------------------------------------
class TextPart(_In):
    type: Literal["text"]
    text: str


class FunctionCall(_In):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(_In):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_In):
    role: Literal["system", "developer", "user", "assistant", "tool", "latest_reminder"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionSpec(_In):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(_In):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(_In):
    type: Literal["function"]
    function: dict[str, str]


class StreamOptions(_In):
    include_usage: bool = False


class ChatCompletionRequest(_In):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    reasoning_effort: str | None = None
    thinking: Thinking | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} non-empty strings")
        return stops

    @field_validator("reasoning_effort")
    @classmethod
    def _effort(cls, v):
        return _check_effort(v)

    def thinking_mode(self) -> str:
        """Off unless asked for: the thinking object, else chat_template_kwargs, else a reasoning_effort."""
        if self.thinking is not None:
            return "chat" if self.thinking.type == "disabled" else "thinking"
        kwargs = self.chat_template_kwargs or {}
        for key in ("thinking", "enable_thinking"):
            if key in kwargs:
                if not isinstance(kwargs[key], bool):
                    raise ProtocolError(f"chat_template_kwargs.{key}: must be true or false",
                                        param=f"chat_template_kwargs.{key}")
                return "thinking" if kwargs[key] else "chat"
        return "thinking" if self.reasoning_effort is not None else "chat"

    def v4_messages(self) -> list[dict[str, Any]]:
        out = []
        for i, m in enumerate(self.messages):
            msg: dict[str, Any] = {"role": m.role, "content": _join_text(m.content)}
            if m.reasoning_content is not None:
                msg["reasoning_content"] = m.reasoning_content
            if m.tool_calls:
                for j, c in enumerate(m.tool_calls):
                    _json_object(c.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments")
                msg["tool_calls"] = [{"id": c.id or f"call_{i}_{j}", "type": "function",
                                      "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                     for j, c in enumerate(m.tool_calls)]
            if m.role == "tool":
                if m.tool_call_id is None:
                    raise ProtocolError(f"messages[{i}]: a tool message needs tool_call_id",
                                        param=f"messages.{i}.tool_call_id")
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        return out

    def v4_tools(self) -> list[dict[str, Any]] | None:
        """The tools the prompt offers: none for tool_choice "none"; only the named one for a named choice.
        "required" and a named choice are not enforced by constrained decoding: the model is offered the
        tool(s) and may still answer in text."""
        if not self.tools or self.tool_choice == "none":
            return None
        tools = [t.model_dump(exclude_none=True) for t in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.get("name")
            tools = [t for t in tools if t["function"]["name"] == name]
            if not tools:
                raise ProtocolError(f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
        return tools


def _join_text(content: str | list[TextPart] | None) -> str | None:
    if content is None or isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def _json_object(text: str, field: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"{field}: not valid JSON ({e})", param=field) from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{field}: must be a JSON object", param=field)
    return value


# ---- Anthropic Messages -----------------------------------------------------------------------------------------
class TextBlock(_In):
    type: Literal["text"]
    text: str


class ThinkingBlock(_In):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_In):
    type: Literal["redacted_thinking"]
    data: str


class ToolUseBlock(_In):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_In):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False


Block = TextBlock | ThinkingBlock | RedactedThinkingBlock | ToolUseBlock | ToolResultBlock


class AnthropicMessage(_In):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class AnthropicTool(_In):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]


class AnthropicToolChoice(_In):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class OutputConfig(_In):
    effort: str | None = None

    @field_validator("effort")
    @classmethod
    def _effort(cls, v):
        return _check_effort(v)


class MessagesRequest(_In):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP_STRINGS)
    stream: bool = False
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None

    def thinking_mode(self) -> str:
        """Off unless `thinking` is enabled (or adaptive), as in Anthropic's API."""
        return "thinking" if self.thinking is not None and self.thinking.type != "disabled" else "chat"

    def v4_messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.system is not None:
            out.append({"role": "system", "content": self.system if isinstance(self.system, str)
                        else "".join(b.text for b in self.system)})
        for i, m in enumerate(self.messages):
            blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
            if m.role == "user":
                out += _user_blocks(blocks)
            else:
                out.append(_assistant_blocks(blocks))
        return out

    def v4_tools(self) -> list[dict[str, Any]] | None:
        """Like ChatCompletionRequest.v4_tools: "any" and a named tool are offered, not enforced."""
        if not self.tools or (self.tool_choice is not None and self.tool_choice.type == "none"):
            return None
        tools = [{"type": "function", "function": {"name": t.name, **({"description": t.description}
                                                                      if t.description else {}),
                                                   "parameters": t.input_schema}} for t in self.tools]
        if self.tool_choice is not None and self.tool_choice.type == "tool":
            tools = [t for t in tools if t["function"]["name"] == self.tool_choice.name]
            if not tools:
                raise ProtocolError(f"tool_choice names tool {self.tool_choice.name!r}, which is not in tools",
                                    param="tool_choice")
        return tools


def _user_blocks(blocks: list) -> list[dict[str, Any]]:
    """Tool results become `tool` messages (V4 merges them into the user turn), text becomes a user message."""
    out: list[dict[str, Any]] = []
    text = []
    for b in blocks:
        if isinstance(b, ToolResultBlock):
            content = b.content if not isinstance(b.content, list) else "".join(t.text for t in b.content)
            out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": content or ""})
        elif isinstance(b, TextBlock):
            text.append(b.text)
        else:
            raise ProtocolError(f"a user message cannot carry a {b.type!r} block", param="messages")
    if text or not out:
        out.append({"role": "user", "content": "".join(text)})
    return out


def _assistant_blocks(blocks: list) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": ""}
    for b in blocks:
        if isinstance(b, ThinkingBlock):
            msg["reasoning_content"] = msg.get("reasoning_content", "") + b.thinking
        elif isinstance(b, TextBlock):
            msg["content"] += b.text
        elif isinstance(b, ToolUseBlock):
            msg.setdefault("tool_calls", []).append({"id": b.id, "type": "function", "function": {
                "name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
        elif isinstance(b, RedactedThinkingBlock):
            continue  # opaque to us: nothing to re-encode
        else:
            raise ProtocolError(f"an assistant message cannot carry a {b.type!r} block", param="messages")
    return msg


# ---- responses --------------------------------------------------------------------------------------------------
class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(_Out):
    name: str
    arguments: str


class ToolCallOut(_Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class Choice(_Out):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: None = None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ToolCallDelta(_Out):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class Delta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(_Out):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class AnthropicUsage(_Out):
    input_tokens: int
    output_tokens: int


class AnthropicResponse(_Out):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]  # thinking / text / tool_use blocks, in that order
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: AnthropicUsage
