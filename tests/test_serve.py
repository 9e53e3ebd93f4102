"""`dsv4c serve` end to end: uvicorn on a free localhost port over a tiny artifact, driven by the real `openai`
and `anthropic` client packages; the scheduler against one-at-a-time generation; `dsv4c chat`.

The tiny model has random weights, so its text is gibberish: tests compare what the server returns with an
independent run of the engine on a hand-written V4 prompt (greedy generation is deterministic), and check the
protocol (shapes, event order, usage, finish reasons, status codes). The tool-call round trip needs a model that
writes DSML, so there the scheduler's sampler is replaced by a script of the official encoding vector's
completion tokens (`ScriptedScheduler`): the engine still runs every step, and the tokens still go through the
tokenizer, the V4 parser and the HTTP stack. The prompts are checked against the official vector's text.

Artifact: $DSV4C_TEST_ARTIFACT when set (a tiny-cpu build with a tokenizer), else a tiny-cpu build in the session
stage cache (shared with test_build_e2e).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import anthropic
import httpx
import numpy as np
import openai
import pytest
import uvicorn

import dsv4c
from conftest import RECIPES
from dsv4c.runtime import Engine
from dsv4c.runtime.serve.app import create_app
from dsv4c.runtime.serve.scheduler import GenerationRequest, Scheduler, Token

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "dsv4-encoding"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
BODY_LIMIT = 256 << 10


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tmp_path_factory, stage_cache) -> Path:
    if os.environ.get("DSV4C_TEST_ARTIFACT"):
        return Path(os.environ["DSV4C_TEST_ARTIFACT"])
    return dsv4c.build(RECIPES / "tiny-cpu.yaml", tmp_path_factory.mktemp("serve") / "tiny-cpu", cache_dir=stage_cache)


@pytest.fixture(scope="module")
def engine(artifact) -> Engine:
    eng = Engine.load(artifact)
    assert eng.tokenizer is not None, f"{artifact} has no tokenizer"
    return eng


@contextmanager
def running(app):
    """uvicorn serving `app` in a thread on a free port (the socket is bound first: no port race)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def server(engine):
    with running(create_app(engine, max_queue=8, request_timeout=120, max_body_bytes=BODY_LIMIT)) as url:
        yield url


@pytest.fixture(scope="module")
def model(engine) -> str:
    return engine.manifest.data["name"]


def oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def ant(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=60)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def reference(engine: Engine, prompt_text: str, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new tokens) of the engine alone on a hand-written prompt."""
    ids = engine.tokenizer.encode(prompt_text)
    return ids, engine.generate([ids], max_new_tokens=max_new_tokens, temperature=0.0)[0]


def text_of(engine: Engine, tokens: list[int]) -> str:
    return engine.tokenizer.decode([t for t in tokens if t != engine.eos_id])


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]
PROMPT_CHAT = f"{BOS}You are terse.{USER}Hello there{ASSISTANT}</think>"  # V4 chat mode (encoding vector 2/4)
PROMPT_THINK = f"{BOS}You are terse.{USER}Hello there{ASSISTANT}<think>"  # V4 thinking mode


# ---- the scheduler alone ----------------------------------------------------------------------------------------
def run_jobs(scheduler: Scheduler, requests: list[GenerationRequest], timeout: float = 60) -> list[tuple[list, str]]:
    results = [([], None) for _ in requests]
    done = threading.Semaphore(0)

    def collect(i):
        def on_event(ev):
            if isinstance(ev, Token):
                results[i][0].append(ev.id)
            else:
                results[i] = (results[i][0], ev.reason)
                done.release()
        return on_event

    for i, r in enumerate(requests):
        scheduler.submit(r, collect(i))
    for _ in requests:
        assert done.acquire(timeout=timeout)
    return results


def test_continuous_batching_matches_one_at_a_time(engine):
    """More requests than slots, prompts of different lengths prefilled in small chunks between decode steps:
    every sequence gets exactly the tokens it gets alone (greedy and seeded sampling)."""
    rng = np.random.default_rng(3)
    prompts = [[0, *rng.integers(20, engine.vocab_size, n).tolist()] for n in (5, 40, 3, 17)]
    requests = [GenerationRequest(p, max_tokens=6 + i, temperature=0.8 if i % 2 else 0.0, seed=11 + i)
                for i, p in enumerate(prompts)]
    scheduler = Scheduler(engine, max_queue=8, prefill_chunk=8).start()
    try:
        got = run_jobs(scheduler, requests)
    finally:
        scheduler.stop()
    for r, (tokens, reason) in zip(requests, got):
        want = engine.generate([r.prompt], max_new_tokens=r.max_tokens, temperature=r.temperature, seed=r.seed)[0]
        assert tokens == want
        assert reason == ("stop" if want[-1] == engine.eos_id else "length")
    assert scheduler.stats["completed"] == 4 and scheduler.stats["steps"] < sum(len(t) for t, _ in got) + 10


def test_scheduler_rejects_bad_requests(engine):
    scheduler = Scheduler(engine, max_queue=1)  # not started: nothing is admitted
    with pytest.raises(ValueError, match="max_seq_len"):
        scheduler.submit(GenerationRequest([1] * engine.max_seq_len, max_tokens=1), lambda ev: None)
    with pytest.raises(ValueError, match="max_tokens"):
        scheduler.submit(GenerationRequest([1, 2], max_tokens=0), lambda ev: None)
    from dsv4c.runtime.serve.scheduler import QueueFull

    for _ in range(scheduler.batch_size + 1):  # one per free slot, then one queue place
        scheduler.submit(GenerationRequest([1, 2], max_tokens=1), lambda ev: None)
    with pytest.raises(QueueFull, match="max queue is 1"):
        scheduler.submit(GenerationRequest([1, 2], max_tokens=1), lambda ev: None)


# ---- OpenAI ------------------------------------------------------------------------------------------------------
def test_models_and_health(server, model, engine):
    assert [m.id for m in oai(server).models.list()] == [model]
    assert [m.id for m in ant(server).models.list()] == [model]
    h = health(server)
    assert h["status"] == "ok" and h["max_batch_size"] == engine.max_batch_size
    assert h["max_seq_len"] == engine.max_seq_len


def test_openai_chat_mode_non_stream(server, model, engine):
    """Chat mode is the default: a plain OpenAI client gets the answer in `content`."""
    ids, want = reference(engine, PROMPT_CHAT, 8)
    r = oai(server).chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.message.content == text_of(engine, want)
    assert getattr(choice.message, "reasoning_content", None) is None
    assert choice.finish_reason == ("stop" if want[-1] == engine.eos_id else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))
    assert r.usage.total_tokens == len(ids) + len(want)


def test_openai_thinking_stream(server, model, engine):
    """Thinking, asked for the vLLM way: reasoning deltas first, then content; one finish chunk; usage last."""
    ids, want = reference(engine, PROMPT_THINK, 12)
    stream = oai(server).chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"chat_template_kwargs": {"thinking": True}})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    kinds, reasoning, content = [], "", ""
    for c in chunks[1:-2]:
        d = c.choices[0].delta
        assert c.choices[0].finish_reason is None
        if getattr(d, "reasoning_content", None):
            kinds.append("r")
            reasoning += d.reasoning_content
        if d.content:
            kinds.append("c")
            content += d.content
    assert kinds == sorted(kinds, key="rc".index), "reasoning must come before content"
    text = text_of(engine, want)
    want_reasoning, marker, want_content = text.partition("</think>")
    assert (reasoning, content) == (want_reasoning, want_content)
    assert chunks[-2].choices[0].finish_reason == ("stop" if want[-1] == engine.eos_id else "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(ids)
    assert chunks[-1].usage.completion_tokens == len(want)


def test_openai_reasoning_effort_max_adds_prefix(server, model, engine):
    """Think Max puts DeepSeek's effort prefix after BOS: the prompt grows by exactly its tokens."""
    from dsv4c.runtime.chat.encoding import REASONING_EFFORT_MAX_PREFIX

    client = oai(server)
    high = client.chat.completions.create(model=model, messages=CHAT, max_tokens=1, reasoning_effort="high")
    top = client.chat.completions.create(model=model, messages=CHAT, max_tokens=1, reasoning_effort="max")
    want = len(engine.tokenizer.encode(PROMPT_THINK.replace(BOS, BOS + REASONING_EFFORT_MAX_PREFIX)))
    assert high.usage.prompt_tokens == len(engine.tokenizer.encode(PROMPT_THINK))
    assert top.usage.prompt_tokens == want


def test_openai_stop_string(server, model, engine):
    """A stop string ends the answer where it first occurs in the content and is not returned."""
    _, want = reference(engine, PROMPT_CHAT, 10)
    text = text_of(engine, want)
    stop = text[3:5] if len(text) >= 5 else None
    if not stop or not stop.strip():
        pytest.skip("the greedy text is too short for a stop string")
    r = oai(server).chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0, stop=[stop],
                                            extra_body={"thinking": {"type": "disabled"}})
    assert r.choices[0].message.content == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_openai_thinking_switches(server, model, engine):
    """Each way of asking for thinking gives the thinking prompt; an explicit `thinking` object wins."""
    think, chat = len(engine.tokenizer.encode(PROMPT_THINK)), len(engine.tokenizer.encode(PROMPT_CHAT))
    cases = [({}, chat), ({"reasoning_effort": "high"}, think), ({"chat_template_kwargs": {"thinking": True}}, think),
             ({"chat_template_kwargs": {"enable_thinking": False}}, chat),
             ({"thinking": {"type": "enabled"}}, think),
             ({"reasoning_effort": "high", "thinking": {"type": "disabled"}}, chat)]
    for extra, prompt_tokens in cases:
        r = oai(server).chat.completions.create(model=model, messages=CHAT, max_tokens=1, extra_body=extra)
        assert r.usage.prompt_tokens == prompt_tokens, extra


# ---- Anthropic ---------------------------------------------------------------------------------------------------
def test_anthropic_default_is_no_thinking(server, model, engine):
    """As in Anthropic's API: without `thinking`, no thinking block, the chat-mode prompt."""
    ids, want = reference(engine, PROMPT_CHAT, 6)
    m = ant(server).messages.create(model=model, max_tokens=6, system="You are terse.",
                                    messages=[{"role": "user", "content": "Hello there"}],
                                    extra_body={"temperature": 0})
    assert m.usage.input_tokens == len(ids)
    assert [b.type for b in m.content] == (["text"] if text_of(engine, want) else [])
    assert "".join(b.text for b in m.content) == text_of(engine, want)


def test_anthropic_thinking_non_stream(server, model, engine):
    ids, want = reference(engine, PROMPT_THINK, 8)
    m = ant(server).messages.create(model=model, max_tokens=8, system="You are terse.",
                                    messages=[{"role": "user", "content": "Hello there"}],
                                    thinking={"type": "enabled", "budget_tokens": 1024},
                                    extra_body={"temperature": 0})  # this SDK has no temperature argument
    reasoning, _, content = text_of(engine, want).partition("</think>")
    blocks = [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in m.content]
    assert blocks == [("thinking", reasoning)] + ([("text", content)] if content else [])
    assert m.stop_reason == ("end_turn" if want[-1] == engine.eos_id else "max_tokens")
    assert (m.usage.input_tokens, m.usage.output_tokens) == (len(ids), len(want))


def test_anthropic_chat_stream_events(server, model, engine):
    ids, want = reference(engine, PROMPT_CHAT, 8)
    client = ant(server)
    with client.messages.stream(model=model, max_tokens=8, system="You are terse.",
                                messages=[{"role": "user", "content": "Hello there"}],
                                thinking={"type": "disabled"}, extra_body={"temperature": 0}) as s:
        events = [e.type for e in s if e.type in ("message_start", "content_block_start", "content_block_delta",
                                                  "content_block_stop", "message_delta", "message_stop")]
        final = s.get_final_message()
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    body = events[1:-2]
    assert body[0] == "content_block_start" and body[-1] == "content_block_stop"
    assert set(body[1:-1]) == {"content_block_delta"}
    assert [b.type for b in final.content] == ["text"] and final.content[0].text == text_of(engine, want)
    assert final.usage.output_tokens == len(want) and final.usage.input_tokens == len(ids)


# ---- tool calls: the official vector 1 conversation -------------------------------------------------------------
class ScriptedScheduler(Scheduler):
    """Test-only: the engine runs every step as usual, but the sampled token is replaced by the next token of a
    scripted completion (so a random-weights model 'writes' DSML); prompts are recorded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scripts: deque[list[int]] = deque()
        self.prompts: list[list[int]] = []
        self._assigned: dict[int, list[int]] = {}

    def submit(self, request, on_event):
        job = super().submit(request, on_event)
        self.prompts.append(list(request.prompt))
        self._assigned[id(job)] = self.scripts.popleft()
        return job

    def _sample(self, job, logits):
        return self._assigned[id(job)][job.generated]  # job.generated: tokens sampled so far


@pytest.fixture(scope="module")
def vector1():
    data = json.loads((VECTORS / "input_1.json").read_text())
    text = (VECTORS / "output_1.txt").read_text()
    think = f"{ASSISTANT}<think>"
    first = text.index(think) + len(think)  # the first assistant turn's generation prompt ends here
    completion_end = text.index(EOS, first) + len(EOS)
    second = text.index(think, completion_end) + len(think)
    return {"tools": data["tools"], "messages": data["messages"], "prompt1": text[:first],
            "completion1": text[first:completion_end], "prompt2": text[:second]}


@pytest.fixture(scope="module")
def scripted(engine):
    scheduler = ScriptedScheduler(engine, max_queue=4)
    with running(create_app(engine, scheduler=scheduler)) as url:
        yield url, scheduler


@pytest.mark.parametrize("stream", [False, True])
def test_openai_tool_call_round_trip(scripted, vector1, model, engine, stream):
    url, scheduler = scripted
    tok = engine.tokenizer
    client = oai(url)
    scheduler.scripts.append(tok.encode(vector1["completion1"]))
    kwargs = dict(model=model, messages=vector1["messages"][:2], tools=vector1["tools"], tool_choice="auto",
                  extra_body={"thinking": {"type": "enabled"}})
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        content = "".join(d.content or "" for d in deltas)
        calls = [tc for d in deltas for tc in (d.tool_calls or [])]
        finish = chunks[-1].choices[0].finish_reason
        assert [tc.index for tc in calls] == [0]
    else:
        r = client.chat.completions.create(**kwargs)
        reasoning, content = r.choices[0].message.reasoning_content, r.choices[0].message.content
        calls, finish = r.choices[0].message.tool_calls, r.choices[0].finish_reason
    assert tok.decode(scheduler.prompts[-1]) == vector1["prompt1"]
    assert reasoning == vector1["messages"][2]["reasoning_content"]
    assert not content
    assert finish == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [("get_weather", {"location": "Beijing", "unit": "celsius"})]
    assert calls[0].id.startswith("call_")

    # round trip: our assistant message and the tool's result go back in; the prompt is the vector's
    scheduler.scripts.append(tok.encode("Got the weather.</think>Sunny, 22°C." + EOS))
    assistant = {"role": "assistant", "content": content, "reasoning_content": reasoning,
                 "tool_calls": [{"id": c.id, "type": "function",
                                 "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                for c in calls]}
    tool = {"role": "tool", "tool_call_id": calls[0].id, "content": vector1["messages"][3]["content"]}
    r2 = client.chat.completions.create(**{**kwargs, "messages": [*kwargs["messages"], assistant, tool]})
    assert tok.decode(scheduler.prompts[-1]) == vector1["prompt2"]
    assert r2.choices[0].message.reasoning_content == "Got the weather."
    assert r2.choices[0].message.content == "Sunny, 22°C." and r2.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_tool_use_round_trip(scripted, vector1, model, engine, stream):
    url, scheduler = scripted
    tok = engine.tokenizer
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in vector1["tools"]]
    system, user = vector1["messages"][0]["content"], vector1["messages"][1]["content"]
    kwargs = dict(model=model, max_tokens=200, system=system, tools=tools, thinking={"type": "enabled",
                                                                                     "budget_tokens": 1024})
    client = ant(url)
    scheduler.scripts.append(tok.encode(vector1["completion1"]))
    messages = [{"role": "user", "content": user}]
    if stream:
        with client.messages.stream(**kwargs, messages=messages) as s:
            m = s.get_final_message()
    else:
        m = client.messages.create(**kwargs, messages=messages)
    assert tok.decode(scheduler.prompts[-1]) == vector1["prompt1"]
    assert [b.type for b in m.content] == ["thinking", "tool_use"]
    assert m.content[0].thinking == vector1["messages"][2]["reasoning_content"]
    assert (m.content[1].name, m.content[1].input) == ("get_weather", {"location": "Beijing", "unit": "celsius"})
    assert m.stop_reason == "tool_use"

    scheduler.scripts.append(tok.encode("Got it.</think>Sunny." + EOS))
    messages += [{"role": "assistant", "content": [b.model_dump() for b in m.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": m.content[1].id,
                                               "content": vector1["messages"][3]["content"]}]}]
    m2 = client.messages.create(**kwargs, messages=messages)
    assert tok.decode(scheduler.prompts[-1]) == vector1["prompt2"]
    assert [(b.type, getattr(b, "thinking", None) or b.text) for b in m2.content] == \
        [("thinking", "Got it."), ("text", "Sunny.")]
    assert m2.stop_reason == "end_turn"


# ---- malformed requests ------------------------------------------------------------------------------------------
def test_malformed_requests_get_clear_4xx(server, model, engine):
    chat, msgs = f"{server}/v1/chat/completions", f"{server}/v1/messages"
    ok = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    cases = [
        (chat, b'{"model": "x", "messages": [', 400, "invalid JSON"),
        (chat, b'', 400, "JSON body"),
        (chat, {**ok, "messages": "hi"}, 400, "messages"),
        (chat, {**ok, "temperature": "hot"}, 400, "temperature"),
        (chat, {**ok, "model": "gpt-4o"}, 404, "gpt-4o"),
        (chat, {**ok, "max_tokens": -5}, 400, "max_tokens"),
        (chat, {**ok, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        (chat, {**ok, "reasoning_effort": "ultra"}, 400, "reasoning_effort"),
        (chat, {**ok, "messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "f", "arguments": "{not json"}}]}]}, 400, "arguments"),
        (chat, {**ok, "messages": [{"role": "user", "content": "x" * (BODY_LIMIT + 10)}]}, 413, "limit"),
        (chat, {**ok, "messages": [{"role": "user", "content": "hello " * (engine.max_seq_len + 100)}]}, 400,
         str(engine.max_seq_len)),
        (msgs, {"model": model, "messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens"),
        (msgs, {"model": model, "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, 400,
         "max_tokens"),
        (f"{server}/v1/nothing", {}, 404, "no route"),
    ]
    params = {"temperature": "temperature", "gpt-4o": "model", "role": "messages.0.role",
              "reasoning_effort": "reasoning_effort"}  # OpenAI's `param` names the field, as OpenAI's API does
    for url, body, status, needle in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}) \
            if isinstance(body, bytes) else httpx.post(url, json=body)
        assert r.status_code == status, (body if isinstance(body, bytes) else str(body)[:200], r.text)
        err = r.json()["error"]
        assert needle in err["message"], err
        if url == chat and needle in params:
            assert err["param"] == params[needle], err
        if url == msgs:
            assert r.json()["type"] == "error" and err["type"] == "invalid_request_error"
    r = httpx.post(chat, content=json.dumps(ok).encode())  # no Content-Type
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oai(server).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    with pytest.raises(anthropic.NotFoundError):
        ant(server).messages.create(model="claude-x", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert health(server)["status"] == "ok"


# ---- queue, cancellation, timeouts --------------------------------------------------------------------------------
class PacedScheduler(Scheduler):
    """Test-only: a generation that lasts as long as its max_tokens says, at >= `step_delay` s per token. The
    engine runs every step and the token is still sampled from its logits, but the end-of-sentence token is never
    picked (the random tiny model writes it after ~30 greedy tokens, and a sampled reply may write it at once),
    so tests of what happens *while* a request runs do not depend on how fast this machine decodes."""

    def __init__(self, *args, step_delay: float = 0.02, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_delay = step_delay

    def _sample(self, job, logits):
        time.sleep(self.step_delay)
        logits = logits.copy()
        logits[..., self.engine.eos_id] = -np.inf
        return super()._sample(job, logits)


def test_paced_scheduler_runs_to_max_tokens(engine):
    """The pacing the next tests rely on: 50 tokens take >= 1 s and end by length, not by a stop token."""
    scheduler = PacedScheduler(engine, batch_size=1)
    request = GenerationRequest(prompt=engine.tokenizer.encode(PROMPT_CHAT), max_tokens=50, temperature=0.0)
    scheduler.start()
    try:
        start = time.monotonic()
        [(tokens, reason)] = run_jobs(scheduler, [request])
    finally:
        scheduler.stop()
    assert len(tokens) == 50 and reason == "length" and engine.eos_id not in tokens
    assert time.monotonic() - start >= 50 * scheduler.step_delay


def test_queue_full_429_and_disconnect_frees_slot(engine, model):
    """One slot, one queue place: a third request gets 429; a client that goes away frees its slot."""
    scheduler = PacedScheduler(engine, batch_size=1, max_queue=1)
    with running(create_app(engine, scheduler=scheduler)) as url:
        client = oai(url)
        long = dict(model=model, messages=CHAT, max_tokens=300, temperature=0, stream=True)
        a = client.chat.completions.create(**long)
        next(iter(a))  # A holds the slot (>= 6 s of paced tokens if nobody stops it)
        b = client.chat.completions.create(**long)
        wait_until(lambda: health(url)["waiting"] == 1, what="B queued")
        with pytest.raises(openai.RateLimitError, match="max queue is 1"):
            client.chat.completions.create(model=model, messages=CHAT, max_tokens=1)
        a.close()  # the client goes away: its slot goes to B
        wait_until(lambda: (h := health(url))["active"] == 1 and h["waiting"] == 0
                   and h["stats"]["cancelled"] == 1, what="A cancelled, B admitted")
        assert next(iter(b)).choices[0].delta is not None
        b.close()
        wait_until(lambda: health(url)["active"] == 0, what="B cancelled")
        # a non-streaming client that gives up is noticed too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", timeout=1.0,
                       json={"model": model, "messages": CHAT, "max_tokens": 300})
        wait_until(lambda: (h := health(url))["stats"]["cancelled"] == 3 and h["active"] == 0, timeout=5,
                   what="non-stream request cancelled")


def test_request_timeout_is_504(engine, model):
    scheduler = PacedScheduler(engine, batch_size=1, request_timeout=0.5)  # 300 tokens: >= 6 s
    with running(create_app(engine, scheduler=scheduler)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": CHAT, "max_tokens": 300},
                       timeout=30)
        assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
        assert health(url)["stats"]["timeout"] == 1


# ---- dsv4c chat ---------------------------------------------------------------------------------------------------
def test_chat_cli_streams_and_switches_modes(engine):
    from dsv4c.runtime.chat_cli import run_chat
    from dsv4c.runtime.terminal import escape_controls  # the model's control characters are shown escaped

    lines = iter(["Hello there", "/chat", "Hello there", "/bogus", "/exit", "never read"])
    out: list[tuple[str, bool]] = []
    run_chat(engine, lambda prompt: next(lines), lambda text, **style: out.append((text, bool(style.get("dim")))),
             system="You are terse.", max_new_tokens=6)
    assert next(lines) == "never read"  # /exit ended the loop
    printed = "".join(t for t, _ in out)
    assert "mode: chat" in printed and "unknown command /bogus" in printed
    # turn 1 (thinking) reasoning is shown dimmed; turn 2 (chat) sees turn 1 in its prompt
    _, want1 = reference(engine, PROMPT_THINK, 6)
    reasoning1, _, content1 = text_of(engine, want1).partition("</think>")
    assert reasoning1 and escape_controls(reasoning1) in "".join(t for t, dim in out if dim)
    # turn 2 (chat mode) continues the conversation: turn 1's answer without its reasoning, V4 chat mode
    history = f"{BOS}You are terse.{USER}Hello there{ASSISTANT}</think>{content1}{EOS}"
    _, want2 = reference(engine, f"{history}{USER}Hello there{ASSISTANT}</think>", 6)
    assert escape_controls(text_of(engine, want2)) in "".join(t for t, dim in out if not dim)


def test_dsv4c_serve_command(artifact, model):
    """`dsv4c serve` as a user starts it (a subprocess), then a request and a clean shutdown."""
    import signal
    import subprocess
    import sys

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "dsv4c.compiler.cli", "serve", str(artifact), "--port",
                             str(port), "--max-queue", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _up(url) or proc.poll() is not None, timeout=60, what="dsv4c serve")
        assert proc.poll() is None, proc.stdout.read().decode()
        r = oai(url).chat.completions.create(model=model, messages=CHAT, max_tokens=2)
        assert r.usage.completion_tokens <= 2
    finally:
        proc.terminate()
        code = proc.wait(20)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal (exit status -15)
    assert code in (0, -signal.SIGTERM) and b"Finished server process" in proc.stdout.read()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
