"""V4 chat encoding against DeepSeek's official test vectors (byte for byte), the parser against what those vectors
and hand-written completions contain, and encode -> parse round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4c.runtime.chat import (ChatFormatError, CompletionStream, ParsedCompletion, ToolCall, encode_messages,
                                parse_completion, stop_strings)

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "dsv4-encoding"
MODES = {1: "thinking", 2: "thinking", 3: "thinking", 4: "chat"}  # SOURCE.md

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
TC_OPEN, TC_CLOSE = "<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>"
MAX_PREFIX_FIRST_LINE = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"

needs_vectors = pytest.mark.skipif(not VECTORS.is_dir(), reason=f"official vectors not found at {VECTORS}")


def load_case(n: int) -> tuple[list[dict], list[dict] | None, str]:
    data = json.loads((VECTORS / f"input_{n}.json").read_text(encoding="utf-8"))
    messages, tools = (data["messages"], data["tools"]) if isinstance(data, dict) else (data, None)
    with open(VECTORS / f"output_{n}.txt", encoding="utf-8", newline="") as f:
        return messages, tools, f.read()


def assistant_segments(prompt: str) -> list[str]:
    """Each assistant turn of a rendered conversation: the text after <｜Assistant｜> up to and including EOS."""
    segments = []
    for piece in prompt.split(ASSISTANT)[1:]:
        assert EOS in piece
        segments.append(piece[: piece.index(EOS) + len(EOS)])
    return segments


def split_generation_prompt(segment: str) -> tuple[str, str]:
    """(mode, completion): the part of a segment the generation prompt wrote decides how the rest parses."""
    for prefix, mode in (("<think>", "thinking"), ("</think><｜action｜>", "chat"), ("</think>", "chat")):
        if segment.startswith(prefix):
            return mode, segment[len(prefix):]
    raise AssertionError(f"segment starts with neither <think> nor </think>: {segment[:40]!r}")


# ---- the official vectors ------------------------------------------------------------------------------------
@needs_vectors
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_official_vector_byte_for_byte(n):
    messages, tools, want = load_case(n)
    got = encode_messages(messages, tools=tools, thinking_mode=MODES[n])
    assert got == want
    # The vectors end with an assistant turn: there is no generation prompt to add or leave out.
    assert encode_messages(messages, tools=tools, thinking_mode=MODES[n], add_generation_prompt=False) == want


@needs_vectors
def test_parser_recovers_case_1_as_source_md_lists():
    _, _, prompt = load_case(1)
    (mode1, text1), (mode2, text2) = map(split_generation_prompt, assistant_segments(prompt))
    first, last = parse_completion(text1, mode1), parse_completion(text2, mode2)
    assert first.reasoning_content == ("The user wants to know the weather in Beijing. "
                                       "I should use the get_weather tool.")
    assert first.content == ""
    assert first.tool_calls == [ToolCall("get_weather", {"location": "Beijing", "unit": "celsius"})]
    assert last.reasoning_content and "22°C" in last.content and last.tool_calls == []


@needs_vectors
def test_parser_recovers_case_2_last_turn():
    _, _, prompt = load_case(2)
    mode, completion = split_generation_prompt(assistant_segments(prompt)[-1])
    p = parse_completion(completion, mode)
    assert (p.reasoning_content, p.content, p.tool_calls) == (
        "The user asks about the capital of France. It is Paris.", "The capital of France is Paris.", [])


@needs_vectors
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_parser_recovers_every_assistant_turn_of_the_inputs(n):
    """Every assistant turn in the rendered vector parses back to its input message (reasoning only where the
    encoding kept it)."""
    messages, _, prompt = load_case(n)
    expected = [m for m in messages if m["role"] == "assistant"]
    segments = assistant_segments(prompt)
    assert len(segments) == len(expected)
    for msg, segment in zip(expected, segments):
        mode, completion = split_generation_prompt(segment)
        p = parse_completion(completion, mode)
        assert p.finished
        assert p.content == (msg.get("content") or "")
        assert p.reasoning_content == (msg.get("reasoning_content") if mode == "thinking" else None)
        want_calls = [ToolCall(c["function"]["name"], json.loads(c["function"]["arguments"]))
                      for c in msg.get("tool_calls") or []]
        assert p.tool_calls == want_calls


# ---- layout rules, on small hand-written conversations ------------------------------------------------------
def test_generation_prompt_per_mode():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert encode_messages(msgs) == f"{BOS}S{USER}hi{ASSISTANT}<think>"
    assert encode_messages(msgs, thinking_mode="chat") == f"{BOS}S{USER}hi{ASSISTANT}</think>"
    assert encode_messages(msgs, add_generation_prompt=False) == f"{BOS}S{USER}hi"
    assert encode_messages(msgs[1:]) == f"{BOS}{USER}hi{ASSISTANT}<think>"
    # An assistant turn marked wo_eos stays open: the model continues it.
    prefill = msgs + [{"role": "assistant", "content": "Bon", "wo_eos": True}]
    assert encode_messages(prefill, thinking_mode="chat") == f"{BOS}S{USER}hi{ASSISTANT}</think>Bon"


def test_reasoning_effort():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    plain = encode_messages(msgs)
    for effort in (None, "minimal", "low", "medium", "high"):
        assert encode_messages(msgs, reasoning_effort=effort) == plain  # all of them are V4's Think High
    for effort in ("max", "xhigh"):
        text = encode_messages(msgs, reasoning_effort=effort)
        assert text.startswith(BOS + MAX_PREFIX_FIRST_LINE) and text.endswith(f"\n\nS{USER}hi{ASSISTANT}<think>")
        assert text.count("Reasoning Effort") == 1
    assert encode_messages(msgs, thinking_mode="chat", reasoning_effort="max") == \
        encode_messages(msgs, thinking_mode="chat")  # the prefix is a thinking-mode instruction
    with pytest.raises(ChatFormatError, match="reasoning_effort"):
        encode_messages(msgs, reasoning_effort="extreme")
    with pytest.raises(ChatFormatError, match="thinking_mode"):
        encode_messages(msgs, thinking_mode="think")


def test_drop_thinking_of_earlier_turns():
    msgs = [{"role": "user", "content": "a"},
            {"role": "assistant", "reasoning_content": "r1", "content": "A"},
            {"role": "developer", "content": "d"},
            {"role": "user", "content": "b"}]
    # Thinking, default: r1 and the developer turn before the last user turn are dropped.
    assert encode_messages(msgs) == f"{BOS}{USER}a{ASSISTANT}</think>A{EOS}{USER}b{ASSISTANT}<think>"
    # drop_thinking=False keeps both and reopens thinking after every user turn.
    assert encode_messages(msgs, drop_thinking=False) == (
        f"{BOS}{USER}a{ASSISTANT}<think>r1</think>A{EOS}{USER}d{USER}b{ASSISTANT}<think>")
    # Tools anywhere switch dropping off (a tool loop needs its reasoning).
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    with_tools = encode_messages(msgs, tools=[tool])
    assert "<think>r1</think>A" in with_tools and f"{USER}d" in with_tools
    # Chat mode keeps the developer turn and renders no reasoning at all.
    assert encode_messages(msgs, thinking_mode="chat") == (
        f"{BOS}{USER}a{ASSISTANT}</think>A{EOS}{USER}d{USER}b{ASSISTANT}</think>")


def test_tools_without_system_message_make_one():
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
    text = encode_messages([{"role": "user", "content": "x"}], tools=[tool])
    assert text.startswith(BOS + "\n\n## Tools\n\n")
    assert '\n{"name": "f", "description": "d", "parameters": {"type": "object"}}\n' in text
    assert text.endswith(f"invoke tool calls.\n{USER}x{ASSISTANT}<think>")


def test_tool_results_merge_into_one_user_turn_in_call_order():
    calls = [{"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"k": 1}'}},
             {"id": "b", "type": "function", "function": {"name": "g", "arguments": {}}}]
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "b", "content": "B"},
            {"role": "tool", "tool_call_id": "a", "content": "A"},
            {"role": "user", "content": "more"}]
    text = encode_messages(msgs, drop_thinking=False)
    dsml = (f'\n\n{TC_OPEN}\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="k" string="false">1</｜DSML｜parameter>\n'
            f'</｜DSML｜invoke>\n<｜DSML｜invoke name="g">\n\n</｜DSML｜invoke>\n{TC_CLOSE}')
    assert text == (f"{BOS}{USER}q{ASSISTANT}<think>r</think>{dsml}{EOS}"
                    f"{USER}<tool_result>A</tool_result>\n\n<tool_result>B</tool_result>\n\nmore{ASSISTANT}<think>")


def test_latest_reminder_and_task():
    msgs = [{"role": "system", "content": "S"}, {"role": "latest_reminder", "content": "R"},
            {"role": "user", "content": "q", "task": "action"}]
    assert encode_messages(msgs) == f"{BOS}S<｜latest_reminder｜>R{USER}q{ASSISTANT}<think><｜action｜>"
    msgs[-1]["task"] = "title"
    assert encode_messages(msgs, thinking_mode="chat") == f"{BOS}S<｜latest_reminder｜>R{USER}q<｜title｜>"


@pytest.mark.parametrize("bad, match", [
    ([{"role": "wizard", "content": "x"}], r"messages\[0\]: unknown role 'wizard'"),
    ([], "non-empty"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], r"messages\[0\]\.content\[0\].*'image_url'"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\.content must be"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
     r"messages\[0\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
     "must be a JSON object"),
    ([{"role": "developer", "content": ""}], "developer message needs non-empty content"),
    ([{"role": "user", "content": "x", "task": "dance"}], "unknown task 'dance'"),
])
def test_bad_messages_are_named(bad, match):
    with pytest.raises(ChatFormatError, match=match):
        encode_messages(bad)


def test_content_parts_are_concatenated():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert encode_messages(msgs) == f"{BOS}{USER}ab{ASSISTANT}<think>"


# ---- encode -> parse round trips ----------------------------------------------------------------------------
ARGS = {"city": "Zürich", "days": 3, "ratio": 0.25, "metric": True, "none": None, "tags": ["a", "b"],
        "nested": {"k": [1, {"x": "y"}]}, "multi": "line one\nline two <b>", "empty": "", "num_as_text": "42"}


@pytest.mark.parametrize("mode", ["thinking", "chat"])
def test_round_trip_reasoning_content_and_tool_calls(mode):
    calls = [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": json.dumps(ARGS)}},
             {"id": "c2", "type": "function", "function": {"name": "noargs", "arguments": ""}}]
    msgs = [{"role": "user", "content": "go"},
            {"role": "assistant", "reasoning_content": "think\nhard 思考", "content": "Calling now.",
             "tool_calls": calls}]
    text = encode_messages(msgs, thinking_mode=mode)
    prompt = encode_messages(msgs[:1], thinking_mode=mode)
    assert text.startswith(prompt)  # the history is the prompt followed by what the model generated
    p = parse_completion(text[len(prompt):], mode)
    assert p.reasoning_content == ("think\nhard 思考" if mode == "thinking" else None)
    assert p.content == "Calling now."
    assert p.tool_calls == [ToolCall("lookup", ARGS), ToolCall("noargs", {})]
    assert json.loads(p.tool_calls[0].arguments_json) == ARGS
    assert p.finished


def test_round_trip_without_eos_and_cut_off_reasoning():
    p = parse_completion("r</think>answer", "thinking")
    assert (p.reasoning_content, p.content, p.finished) == ("r", "answer", False)
    p = parse_completion("still thinking about i", "thinking")
    assert (p.reasoning_content, p.content, p.tool_calls, p.finished) == ("still thinking about i", "", [], False)
    assert parse_completion("plain" + EOS, "chat") == ParsedCompletion(None, "plain", [], True)


GOOD_CALL = (f'\n\n{TC_OPEN}\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">x'
             f'</｜DSML｜parameter>\n</｜DSML｜invoke>\n{TC_CLOSE}')


@pytest.mark.parametrize("completion, match", [
    (GOOD_CALL.replace("</｜DSML｜invoke>\n", ""), "expected '<｜DSML｜parameter"),
    (GOOD_CALL.replace('string="true"', 'string="yes"'), r"malformed DSML in tool call 'f'"),
    (GOOD_CALL.replace('string="true">x', 'string="false">x'), r"parameter 'a' has string=\"false\" but .* not JSON"),
    (GOOD_CALL.replace("</｜DSML｜parameter>\n", "</｜DSML｜parameter>\n<｜DSML｜parameter name=\"a\" string=\"true\">"
                       "y</｜DSML｜parameter>\n"), "duplicate parameter 'a'"),
    (GOOD_CALL.replace("<｜DSML｜invoke name", "<｜DSML｜call name"), "expected '<｜DSML｜invoke name"),
    (GOOD_CALL[:-8], "unterminated tool_calls block"),
    (GOOD_CALL + "trailing", "unexpected text after the tool calls"),
])
def test_malformed_dsml_raises_with_location(completion, match):
    with pytest.raises(ChatFormatError, match=match) as e:
        parse_completion("r</think>" + completion + EOS, "thinking")
    assert "offset" in str(e.value) or "ends" in str(e.value)


@pytest.mark.parametrize("completion, mode, match", [
    ("answer" + EOS + "more", "chat", "unexpected text after"),
    ("reasoning only" + EOS, "thinking", "never closed its reasoning"),
    ("r" + GOOD_CALL + "</think>" + EOS, "thinking", "tool calls inside the reasoning"),
    ("r</think>a<think>b" + EOS, "thinking", "'<think>' inside content"),
    ("a </think> b" + EOS, "chat", "'</think>' inside content"),
    ("r<｜DSML｜invoke</think>a" + EOS, "thinking", "inside reasoning_content"),
    ("x", "reasoning", "thinking_mode"),
])
def test_malformed_completion_raises(completion, mode, match):
    with pytest.raises(ChatFormatError, match=match):
        parse_completion(completion, mode)


def test_stop_strings_are_eos():
    assert stop_strings("thinking") == [EOS] and stop_strings("chat") == [EOS]


# ---- streaming split ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_completion_stream_matches_whole_parse(chunk):
    completion = "Let me check </thin k>.</think>Sure! " + GOOD_CALL + EOS
    stream = CompletionStream("thinking")
    deltas = []
    for i in range(0, len(completion), chunk):
        deltas += stream.feed(completion[i:i + chunk])
    assert "".join(t for k, t in deltas if k == "reasoning") == "Let me check </thin k>."
    assert "".join(t for k, t in deltas if k == "content") == "Sure! "
    assert stream.in_tool_calls
    assert stream.finish().tool_calls == [ToolCall("f", {"a": "x"})]


def test_completion_stream_holds_back_a_possible_marker():
    stream = CompletionStream("chat")
    assert stream.feed("Hello\n") == [("content", "Hello")]  # "\n" may start the tool-call block
    assert stream.feed("\n<｜DSM") == []
    assert stream.feed("L｜tool_calls>\n") == [] and stream.in_tool_calls
    stream = CompletionStream("chat")
    assert stream.feed("a\nb<｜end") == [("content", "a\nb")]
    assert stream.feed("▁of▁sentence｜>") == [] and stream.finish().content == "a\nb"
