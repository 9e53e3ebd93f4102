"""DeepSeek-V4 prompt encoding: OpenAI-style messages -> the exact prompt text the model was trained on.

V4 ships no Jinja template; its format (reproduced byte for byte from the official test vectors) is:

    BOS [max-effort prefix] system [+ "\\n\\n" tools block] [<｜latest_reminder｜>reminder]
    <｜User｜>user text<｜Assistant｜><think>reasoning</think>answer<｜end▁of▁sentence｜>
    <｜User｜><tool_result>...</tool_result><｜Assistant｜><think>        <- generation prompt, thinking mode
                                                  ...<｜Assistant｜></think> <- generation prompt, chat mode

Rules that are easy to get wrong:
* The `<think>` / `</think>` after `<｜Assistant｜>` belongs to the *transition* from a user turn, not to the
  assistant turn: a kept assistant turn renders `reasoning</think>answer`, a dropped one renders `answer` after a
  transition that already closed thinking (`</think>`).
* drop_thinking (default) removes reasoning of assistant turns before the last user/developer turn, and the
  developer turns before it, but only in thinking mode and only when no message carries tools (a tool loop needs
  its earlier reasoning).
* There is no tool role: tool results become `<tool_result>...</tool_result>` blocks of a user turn, ordered like
  the calls of the assistant turn before them; consecutive user/tool messages merge into one turn joined by "\\n\\n".
* Tool calls are DSML: "\\n\\n<｜DSML｜tool_calls>\\n" + invokes + "\\n</｜DSML｜tool_calls>" right after the
  content; string arguments are written raw with string="true", everything else as JSON with string="false".
* A user message with a `task` (DeepSeek's internal quick-instruction tasks, e.g. "action") is followed by its
  task token instead of the normal generation prompt, and the assistant turn answering it has no thinking part.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

# ---- the special strings (exactly the V4 tokenizer's) -------------------------------------------------------
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"  # one token; DSML tags are "<" + DSML + "invoke ..." etc.
TASK_TOKENS: dict[str, str] = {
    "action": "<｜action｜>", "query": "<｜query｜>", "authority": "<｜authority｜>", "domain": "<｜domain｜>",
    "title": "<｜title｜>", "read_url": "<｜read_url｜>",
}
EXTRACTED_URL = "<｜extracted_url｜>"  # in the V4 vocabulary (documented by DeepSeek), unused by the encoder

# Every special string the encoder can emit or the parser looks for, in the order the synthetic tokenizer
# numbers them (BOS = 0 and EOS = 1, as in the real vocabulary).
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, USER, ASSISTANT, LATEST_REMINDER, THINK_START, THINK_END, DSML,
                                   *TASK_TOKENS.values(), EXTRACTED_URL)

TOOL_CALLS_BLOCK = "tool_calls"
TOOL_CALLS_START = f"\n\n<{DSML}{TOOL_CALLS_BLOCK}>\n"  # what the model writes after its content to call tools
TOOL_CALLS_END = f"</{DSML}{TOOL_CALLS_BLOCK}>"

THINKING_MODES = ("thinking", "chat")

# Reasoning effort. V4 has three regimes: non-think (thinking_mode="chat"), Think High (thinking, no prefix) and
# Think Max (thinking + the prefix below at the very start of the prompt). OpenAI-style names collapse onto them
# the way DeepSeek's own serving does: minimal/low/medium/high -> high, xhigh/max -> max.
REASONING_EFFORTS: dict[str, str] = {"minimal": "high", "low": "high", "medium": "high", "high": "high",
                                     "xhigh": "max", "max": "max"}
REASONING_EFFORT_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

TOOLS_BLOCK_TEMPLATE = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

{{schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""
RESPONSE_FORMAT_TEMPLATE = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"

ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")


class ChatFormatError(ValueError):
    """Messages the V4 format cannot express, or a completion that is not well-formed V4 output (malformed DSML)."""


def stop_strings(thinking_mode: str = "thinking") -> list[str]:
    """Strings that end an assistant turn. In both modes the model closes its turn with EOS (also after tool calls),
    so a server stops on EOS (token id `Tokenizer.eos_id`) and passes the text, EOS included or not, to
    `parse_completion`."""
    check_thinking_mode(thinking_mode)
    return [EOS]


def check_thinking_mode(thinking_mode: str) -> None:
    if thinking_mode not in THINKING_MODES:
        raise ChatFormatError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")


def normalize_reasoning_effort(reasoning_effort: str | None) -> str | None:
    """None -> None (Think High); OpenAI/Anthropic effort names -> "high" or "max" (see REASONING_EFFORTS)."""
    if reasoning_effort is None:
        return None
    try:
        return REASONING_EFFORTS[reasoning_effort]
    except (KeyError, TypeError):
        raise ChatFormatError(f"reasoning_effort must be one of {sorted(REASONING_EFFORTS)} or None, got "
                              f"{reasoning_effort!r} (use thinking_mode='chat' for no reasoning)") from None


def to_json(value: Any) -> str:
    """JSON as V4 writes it: json.dumps defaults (", " / ": ") with non-ASCII kept; lone surrogates fall back to
    escapes rather than failing."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True)


# ---- normalised turns ---------------------------------------------------------------------------------------
@dataclass
class _Turn:
    """One message after validation; user turns carry blocks (text or tool results) instead of content."""

    role: str
    content: str = ""
    reasoning: str = ""
    tool_calls: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)  # (name, arguments, call id)
    tools: list[dict[str, Any]] = field(default_factory=list)  # function schemas
    response_format: Any = None
    blocks: list[tuple[str, str, str]] = field(default_factory=list)  # (kind "text"|"tool_result", text, call id)
    task: str | None = None
    wo_eos: bool = False  # an assistant turn left open (the model continues it)


def _text(content: Any, where: str) -> str:
    """Message content as text: a string, None, or a list of OpenAI text parts (concatenated)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ChatFormatError(f"{where}.content[{j}]: only text parts are supported, got {kind!r}")
            parts.append(part["text"])
        return "".join(parts)
    raise ChatFormatError(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}")


def _tool_schemas(tools: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI tools ({"type": "function", "function": {...}}) -> the function schemas V4 lists, key order kept."""
    if not isinstance(tools, list):
        raise ChatFormatError(f"{where} must be a list of tools, got {type(tools).__name__}")
    out = []
    for j, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatFormatError(f"{where}[{j}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        out.append(fn)
    return out


def _call_arguments(raw: Any, where: str) -> dict[str, Any]:
    """OpenAI tool-call arguments (a JSON object string, or already a dict) -> dict."""
    if isinstance(raw, dict):
        return raw
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ChatFormatError(f"{where}.function.arguments is not valid JSON ({e}): {raw[:80]!r}") from None
        if isinstance(value, dict):
            return value
    raise ChatFormatError(f"{where}.function.arguments must be a JSON object, got {raw!r:.80}")


def _tool_calls(calls: Any, where: str) -> list[tuple[str, dict[str, Any], str]]:
    if not isinstance(calls, list):
        raise ChatFormatError(f"{where} must be a list, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatFormatError(f"{where}[{j}] must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
        out.append((fn["name"], _call_arguments(fn.get("arguments"), f"{where}[{j}]"), call.get("id") or ""))
    return out


def _turns(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[_Turn]:
    """Validate messages and merge tool results (and consecutive user messages) into user turns."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list of message dicts")
    turns: list[_Turn] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ChatFormatError(f"{where} must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"{where}: unknown role {role!r}; expected one of {ROLES}")
        task = m.get("task")
        if task is not None and task not in TASK_TOKENS:
            raise ChatFormatError(f"{where}: unknown task {task!r}; expected one of {sorted(TASK_TOKENS)}")
        text = _text(m.get("content"), where)
        if role in ("user", "tool"):
            block = ("text", text, "") if role == "user" else ("tool_result", text, m.get("tool_call_id") or "")
            prev = turns[-1] if turns else None
            # A user message merges into the user turn before it unless that turn ends in a task; a tool result
            # always does. As in DeepSeek's encoder, a merged message's own task is not carried over.
            if prev is not None and prev.role == "user" and (role == "tool" or prev.task is None):
                prev.blocks.append(block)
            else:
                turns.append(_Turn("user", blocks=[block], task=task if role == "user" else None))
            continue
        turn = _Turn(role, content=text, task=task, wo_eos=bool(m.get("wo_eos", False)),
                     response_format=m.get("response_format"))
        if m.get("tools"):
            turn.tools = _tool_schemas(m["tools"], f"{where}.tools")
        if role == "assistant":
            turn.reasoning = m.get("reasoning_content") or ""
            if not isinstance(turn.reasoning, str):
                raise ChatFormatError(f"{where}.reasoning_content must be a string, "
                                      f"got {type(turn.reasoning).__name__}")
            if m.get("tool_calls"):
                turn.tool_calls = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "developer" and not text:
            raise ChatFormatError(f"{where}: a developer message needs non-empty content")
        turns.append(turn)
    if tools:
        schemas = _tool_schemas(tools, "tools")
        if turns[0].role == "system":
            turns[0].tools = turns[0].tools + schemas
        else:  # no system message: one holding only the tools goes first
            turns.insert(0, _Turn("system", tools=schemas))
    _order_tool_results(turns)
    return turns


def _order_tool_results(turns: list[_Turn]) -> None:
    """Tool results of a user turn follow the call order of the latest assistant turn with calls (results with an
    unknown id sort first, keeping their order); text blocks keep their positions."""
    order: dict[str, int] = {}
    for turn in turns:
        if turn.role == "assistant" and turn.tool_calls:
            order = {call_id: k for k, (_, _, call_id) in enumerate(turn.tool_calls) if call_id}
        elif turn.role == "user" and order:
            results = [b for b in turn.blocks if b[0] == "tool_result"]
            if len(results) > 1:
                ordered = iter(sorted(results, key=lambda b: order.get(b[2], 0)))
                turn.blocks = [next(ordered) if b[0] == "tool_result" else b for b in turn.blocks]


def _drop_old_thinking(turns: list[_Turn]) -> list[_Turn]:
    """Before the last user/developer turn: assistant turns lose their reasoning, developer turns are dropped."""
    last = _last_user_index(turns)
    kept = []
    for i, turn in enumerate(turns):
        if i < last and turn.role == "developer":
            continue
        if i < last and turn.role == "assistant":
            turn = copy.copy(turn)
            turn.reasoning = ""
        kept.append(turn)
    return kept


def _last_user_index(turns: list[_Turn]) -> int:
    return max((i for i, t in enumerate(turns) if t.role in ("user", "developer")), default=-1)


# ---- rendering ----------------------------------------------------------------------------------------------
def render_tools(schemas: list[dict[str, Any]]) -> str:
    """The "## Tools" block of a system/developer turn: DSML instructions, then one JSON schema per line."""
    return TOOLS_BLOCK_TEMPLATE.replace("{schemas}", "\n".join(to_json(s) for s in schemas))


def render_tool_calls(calls: list[tuple[str, dict[str, Any]]]) -> str:
    """DSML for (name, arguments) calls, with the leading "\\n\\n" that separates it from the content."""
    invokes = []
    for name, arguments in calls:
        params = [f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
                  f'{value if isinstance(value, str) else to_json(value)}</{DSML}parameter>'
                  for key, value in arguments.items()]
        invokes.append(f'<{DSML}invoke name="{name}">\n' + "\n".join(params) + f"\n</{DSML}invoke>")
    return f"\n\n<{DSML}{TOOL_CALLS_BLOCK}>\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_END}"


def _render_body(turn: _Turn, keep_reasoning: bool) -> str:
    if turn.role in ("system", "developer"):
        text = turn.content
        if turn.tools:
            text += "\n\n" + render_tools(turn.tools)
        if turn.response_format is not None:
            text += "\n\n" + RESPONSE_FORMAT_TEMPLATE.format(schema=to_json(turn.response_format))
        return text if turn.role == "system" else USER + text
    if turn.role == "user":
        return USER + "\n\n".join(text if kind == "text" else f"<tool_result>{text}</tool_result>"
                                  for kind, text, _ in turn.blocks)
    if turn.role == "latest_reminder":
        return LATEST_REMINDER + turn.content
    # assistant
    thinking = turn.reasoning + THINK_END if keep_reasoning else ""
    calls = render_tool_calls([(name, args) for name, args, _ in turn.tool_calls]) if turn.tool_calls else ""
    return thinking + turn.content + calls + ("" if turn.wo_eos else EOS)


def _transition(turn: _Turn, thinking: bool, opens_thinking: bool) -> str:
    """What follows a turn that hands over to the assistant: its task token(s), or the assistant prefix with the
    thinking switch (<think> opens reasoning; </think> means answer directly)."""
    if turn.task is not None:
        token = TASK_TOKENS[turn.task]
        if turn.task != "action":
            return token
        return ASSISTANT + (THINK_START if thinking else THINK_END) + token
    if turn.role in ("user", "developer"):
        return ASSISTANT + (THINK_START if opens_thinking else THINK_END)
    return ""


def encode_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    thinking_mode: str = "thinking", reasoning_effort: str | None = None,
                    add_generation_prompt: bool = True, drop_thinking: bool = True) -> str:
    """Encode a conversation as the V4 prompt text (BOS included, as text).

    messages: OpenAI-style dicts, roles system / developer / user / assistant / tool / latest_reminder. Assistant
      messages may carry `reasoning_content` and `tool_calls` (OpenAI shape, arguments a JSON string or a dict);
      tool messages `tool_call_id`; system/developer messages `tools` and `response_format`; user messages `task`
      (DeepSeek's internal quick-instruction tasks: action/query/authority/domain/title/read_url); an assistant
      message with `wo_eos: True` is left open for the model to continue.
    tools: OpenAI tool list; attached to the first message if it is a system message, otherwise a system message
      holding only the tools is put first.
    thinking_mode: "thinking" (reasoning in <think>...</think>) or "chat" (non-think: answer right after </think>).
    reasoning_effort: None or one of REASONING_EFFORTS; "max"/"xhigh" put the Think-Max prefix at the start of the
      prompt (thinking mode only), every other level is V4's default Think High and changes nothing.
    add_generation_prompt: end with the assistant prefix the model continues from ("<｜Assistant｜><think>" or
      "<｜Assistant｜></think>", or the task tokens) when the conversation ends with a user/developer/tool turn.
      A conversation ending with an assistant turn is rendered complete either way.
    drop_thinking: DeepSeek's default; see the module docstring.
    """
    check_thinking_mode(thinking_mode)
    effort = normalize_reasoning_effort(reasoning_effort)
    thinking = thinking_mode == "thinking"
    turns = _turns(messages, tools)
    drop = drop_thinking and not any(t.tools for t in turns)
    if thinking and drop:
        turns = _drop_old_thinking(turns)
    last_user = _last_user_index(turns)

    prompt = [BOS]
    if thinking and effort == "max":
        prompt.append(REASONING_EFFORT_MAX_PREFIX)
    for i, turn in enumerate(turns):
        # Reasoning survives in the turns after the last user turn, or everywhere when nothing is dropped.
        recent = not drop or i > last_user
        prev_task = i > 0 and turns[i - 1].task is not None
        prompt.append(_render_body(turn, keep_reasoning=thinking and recent and not prev_task))
        nxt = turns[i + 1] if i + 1 < len(turns) else None
        if nxt is not None and nxt.role not in ("assistant", "latest_reminder"):
            continue  # the next turn is not the assistant's: no hand-over here
        if nxt is None and not add_generation_prompt:
            continue
        prompt.append(_transition(turn, thinking, opens_thinking=thinking and (not drop or i >= last_user)))
    return "".join(prompt)
