"""The HTTP surface: an OpenAI- and Anthropic-compatible FastAPI app over one artifact.

    app = create_app(Engine.load("artifacts/tiny-cpu"), max_queue=64)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/chat/completions, POST /v1/messages (stream or not), GET /v1/models, GET /health.
Every request: validate (400 naming the field) -> model check (404) -> V4 chat encoding -> tokenize -> context
check (400 with the limit; a max_tokens beyond the room left is cut to it and ends with "length") -> submit to
the scheduler (429 when its queue is full) -> stream deltas as server-sent events, or wait for the whole
completion. A client that goes away cancels its request, which frees its batch slot. Errors use each protocol's
own error shape; nothing a client sends can take the server down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv4c.runtime.chat import ChatFormatError, ParsedCompletion, encode_messages
from dsv4c.runtime.engine import Engine
from dsv4c.runtime.serve import protocol as P
from dsv4c.runtime.serve.scheduler import (Finished, GenerationRequest, PromptTooLong, QueueFull, Scheduler,
                                           Token)
from dsv4c.runtime.serve.textstream import GenerationText

log = logging.getLogger("dsv4c.serve")

DISCONNECT_POLL_S = 0.5  # how often a waiting request checks whether its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.headers, self.param = status, message, headers, param


@dataclass
class ServerState:
    engine: Engine
    scheduler: Scheduler
    model_name: str
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(engine: Engine, *, model_name: str | None = None, batch_size: int | None = None,
               max_queue: int = 64, request_timeout: float | None = 600.0, max_body_bytes: int = 4 << 20,
               scheduler: Scheduler | None = None, stats_every: float = 0.0) -> FastAPI:
    """An app serving `engine`. The scheduler (one batch of engine.max_batch_size slots unless `batch_size`
    says fewer) starts with the app and stops with it; with `stats_every` > 0 a throughput line goes to stderr
    every that many seconds in which tokens were generated."""
    if engine.tokenizer is None:
        raise ValueError(f"{engine.root}: the artifact has no tokenizer/ directory; the server needs one to "
                         "encode chats (rebuild from a checkpoint that ships tokenizer.json)")
    sched = scheduler or Scheduler(engine, batch_size=batch_size, max_queue=max_queue,
                                   request_timeout=request_timeout)
    state = ServerState(engine, sched, model_name or engine.manifest.data.get("name") or engine.root.name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sched.start()
        stats = asyncio.create_task(_throughput_log(sched, stats_every)) if stats_every > 0 else None
        try:
            yield
        finally:
            if stats is not None:
                stats.cancel()
            await asyncio.to_thread(sched.stop)

    app = FastAPI(title="dsv4c", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.dsv4c = state
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": state.model_name, "max_batch_size": sched.batch_size,
                "max_seq_len": engine.max_seq_len, "active": sched.active, "waiting": len(sched.waiting),
                "max_queue": sched.max_queue, "stats": dict(sched.stats)}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        if "anthropic-version" in request.headers:  # the Anthropic SDK's models.list
            return {"data": [{"type": "model", "id": state.model_name, "display_name": state.model_name,
                              "created_at": _iso(state.created)}],
                    "has_more": False, "first_id": state.model_name, "last_id": state.model_name}
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "dsv4c", "max_model_len": engine.max_seq_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        _check_model(state, body.model)
        gen = _start(state, request, messages=body.v4_messages(), tools=body.v4_tools(),
                     thinking_mode=body.thinking_mode(), effort=body.reasoning_effort,
                     max_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
                     top_p=body.top_p, seed=body.seed, stop=body.stop or [])
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _sse(openai_stream(gen, state.model_name, include_usage))
        return JSONResponse(await openai_response(gen, state.model_name))

    @app.post("/v1/messages")
    async def messages(body: P.MessagesRequest, request: Request):
        _check_model(state, body.model)
        effort = body.output_config.effort if body.output_config else None
        gen = _start(state, request, messages=body.v4_messages(), tools=body.v4_tools(),
                     thinking_mode=body.thinking_mode(), effort=effort, max_tokens=body.max_tokens,
                     temperature=body.temperature, top_p=body.top_p, seed=None, stop=body.stop_sequences or [])
        if body.stream:
            return _sse(anthropic_stream(gen, state.model_name))
        return JSONResponse(await anthropic_response(gen, state.model_name))

    return app


# ---- one generation, seen from the event loop --------------------------------------------------------------------
class Generation:
    """A submitted request: its token events arrive from the scheduler thread on an asyncio queue and are turned
    into (channel, text) deltas by a GenerationText; once `deltas()` is exhausted, `result()` is the parsed
    completion and `finish_reason` its OpenAI finish reason."""

    def __init__(self, state: ServerState, http: Request, prompt: list[int], thinking_mode: str,
                 stop: list[str], request: GenerationRequest):
        self.http, self.prompt_tokens, self.completion_tokens = http, len(prompt), 0
        self.text = GenerationText(state.engine.tokenizer, thinking_mode, stop)
        self.events: asyncio.Queue = asyncio.Queue()
        self.finish_reason: str | None = None  # stop | length | tool_calls (set by result())
        self._finished: str | None = None  # the scheduler's reason: stop | length
        loop, events = asyncio.get_running_loop(), self.events  # (the callback must not hold on to self)
        self.job = state.scheduler.submit(request, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        # A response dropped before its body ever ran (client gone at once) never reaches deltas()' finally:
        # cancelling when this object is collected still frees the slot.
        weakref.finalize(self, self.job.cancel)

    async def deltas(self) -> AsyncIterator[tuple[str, str]]:
        """("reasoning" | "content", text) in generation order; raises ApiError on timeout or engine failure."""
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_POLL_S
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    ev = None
                if loop.time() >= next_check:  # tokens or not: a client that left must not keep its slot
                    next_check = loop.time() + DISCONNECT_POLL_S
                    if await self.http.is_disconnected():
                        raise ApiError(499, "the client disconnected")
                if ev is None:
                    continue
                if isinstance(ev, Token):
                    self.completion_tokens += 1
                    for d in self.text.push(ev.id):
                        yield d
                    if self.text.stop_hit is not None:  # a stop string: the rest is not wanted
                        self.job.cancel()
                        self._finished = "stop"
                        break
                else:
                    assert isinstance(ev, Finished)
                    if ev.reason == "timeout":
                        raise ApiError(504, "the request ran past the server's per-request timeout of "
                                            f"{self.job.scheduler.request_timeout} s")
                    if ev.reason == "error":
                        raise ApiError(500, ev.error or "engine failure")
                    if ev.reason == "cancelled":  # not by us: the scheduler is shutting down
                        raise ApiError(503, "the server is shutting down")
                    self._finished = ev.reason
                    break
            for d in self.text.finish():
                yield d
        finally:
            self.job.cancel()  # no-op once finished; frees the slot when the client went away mid-stream

    def result(self) -> ParsedCompletion:
        parsed = self.text.result()
        self.finish_reason = "tool_calls" if parsed.tool_calls else self._finished
        return parsed

    @property
    def stop_sequence(self) -> str | None:
        return self.text.stop_hit


def _start(state: ServerState, http: Request, *, messages: list[dict], tools: list[dict] | None,
           thinking_mode: str, effort: str | None, max_tokens: int | None, temperature: float, top_p: float,
           seed: int | None, stop: list[str]) -> Generation:
    try:
        text = encode_messages(messages, tools=tools, thinking_mode=thinking_mode, reasoning_effort=effort,
                               add_generation_prompt=True)
    except ChatFormatError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None
    prompt = state.engine.tokenizer.encode(text)
    try:
        state.scheduler.check_prompt(len(prompt))
    except PromptTooLong as e:
        raise ApiError(400, str(e), param="messages") from None
    room = state.engine.max_seq_len - len(prompt)
    request = GenerationRequest(prompt, max_tokens=min(max_tokens or room, room), temperature=temperature,
                                top_p=top_p, seed=seed, stop_tokens=frozenset({state.engine.eos_id}))
    try:
        return Generation(state, http, prompt, thinking_mode, stop, request)
    except QueueFull as e:
        raise ApiError(429, str(e), headers={"Retry-After": "1"}) from None


def _check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise ApiError(404, f"model {model!r} not found; this server serves {state.model_name!r} (GET /v1/models)",
                       param="model")


# ---- OpenAI Chat Completions -------------------------------------------------------------------------------------
def _tool_calls_out(parsed: ParsedCompletion) -> list[P.ToolCallOut]:
    return [P.ToolCallOut(id=f"call_{uuid.uuid4().hex[:24]}", function=P.FunctionCallOut(
        name=c.name, arguments=json.dumps(c.arguments, ensure_ascii=False))) for c in parsed.tool_calls]


def _usage(gen: Generation) -> P.Usage:
    return P.Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                   total_tokens=gen.prompt_tokens + gen.completion_tokens)


async def openai_response(gen: Generation, model: str) -> dict:
    async for _ in gen.deltas():
        pass
    parsed = gen.result()
    message = P.AssistantMessage(content=parsed.content if parsed.content or not parsed.tool_calls else None,
                                 reasoning_content=parsed.reasoning_content,
                                 tool_calls=_tool_calls_out(parsed) or None)
    return P.ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model,
                            choices=[P.Choice(message=message, finish_reason=gen.finish_reason)],
                            usage=_usage(gen)).model_dump(exclude_none=True)


async def openai_stream(gen: Generation, model: str, include_usage: bool) -> AsyncIterator[str]:
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: P.Delta, finish: str | None = None) -> str:
        c = P.ChatCompletionChunk(id=cid, created=created, model=model,
                                  choices=[P.ChunkChoice(delta=delta, finish_reason=finish)]).model_dump(
            exclude={"usage"})
        c["choices"][0]["delta"] = delta.model_dump(exclude_none=True)  # absent, not null, like OpenAI
        return _data(c)

    try:
        yield chunk(P.Delta(role="assistant", content=""))
        async for channel, text in gen.deltas():
            yield chunk(P.Delta(reasoning_content=text) if channel == "reasoning" else P.Delta(content=text))
        parsed = gen.result()
        calls = _tool_calls_out(parsed)
        if calls:
            yield chunk(P.Delta(tool_calls=[P.ToolCallDelta(index=i, id=c.id, function=c.function)
                                            for i, c in enumerate(calls)]))
        yield chunk(P.Delta(), gen.finish_reason)
        if include_usage:
            usage = P.ChatCompletionChunk(id=cid, created=created, model=model, choices=[], usage=_usage(gen))
            yield _data(usage.model_dump(exclude_none=True))
        yield "data: [DONE]\n\n"
    except ApiError as e:  # headers are gone: report in-band, as OpenAI does
        yield _data({"error": {"message": e.message, "type": _openai_type(e.status), "param": e.param,
                               "code": e.status}})


# ---- Anthropic Messages ------------------------------------------------------------------------------------------
ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _anthropic_stop(gen: Generation) -> str:
    return "stop_sequence" if gen.stop_sequence is not None else ANTHROPIC_STOP[gen.finish_reason]


def _tool_use_blocks(parsed: ParsedCompletion) -> list[dict]:
    return [{"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": c.name, "input": c.arguments}
            for c in parsed.tool_calls]


async def anthropic_response(gen: Generation, model: str) -> dict:
    async for _ in gen.deltas():
        pass
    parsed = gen.result()
    blocks: list[dict] = []
    if parsed.reasoning_content:
        blocks.append({"type": "thinking", "thinking": parsed.reasoning_content, "signature": ""})
    if parsed.content:
        blocks.append({"type": "text", "text": parsed.content})
    blocks += _tool_use_blocks(parsed)
    return P.AnthropicResponse(id=f"msg_{uuid.uuid4().hex}", model=model, content=blocks,
                               stop_reason=_anthropic_stop(gen), stop_sequence=gen.stop_sequence,
                               usage=P.AnthropicUsage(input_tokens=gen.prompt_tokens,
                                                      output_tokens=gen.completion_tokens)).model_dump()


async def anthropic_stream(gen: Generation, model: str) -> AsyncIterator[str]:
    start = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": model,
             "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": 0}}
    index, open_kind = -1, None  # the content block being streamed

    def event(name: str, data: dict) -> str:
        return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        yield event("message_start", {"type": "message_start", "message": start})
        async for channel, text in gen.deltas():
            kind = "thinking" if channel == "reasoning" else "text"
            if kind != open_kind:
                if open_kind is not None:
                    yield event("content_block_stop", {"type": "content_block_stop", "index": index})
                index, open_kind = index + 1, kind
                block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else \
                    {"type": "text", "text": ""}
                yield event("content_block_start", {"type": "content_block_start", "index": index,
                                                    "content_block": block})
            delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" else \
                {"type": "text_delta", "text": text}
            yield event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        if open_kind is not None:
            yield event("content_block_stop", {"type": "content_block_stop", "index": index})
        parsed = gen.result()
        for block in _tool_use_blocks(parsed):
            index += 1
            yield event("content_block_start", {"type": "content_block_start", "index": index,
                                                "content_block": block | {"input": {}}})
            yield event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}})
            yield event("content_block_stop", {"type": "content_block_stop", "index": index})
        yield event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": _anthropic_stop(gen),
                                                "stop_sequence": gen.stop_sequence},
                                      "usage": {"output_tokens": gen.completion_tokens}})
        yield event("message_stop", {"type": "message_stop"})
    except ApiError as e:
        yield event("error", {"type": "error", "error": {"type": _anthropic_type(e.status), "message": e.message}})


# ---- plumbing ---------------------------------------------------------------------------------------------------
def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _sse(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _openai_type(status: int) -> str:
    return {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error", 504: "timeout_error"}.get(status, "server_error" if status >= 500
                                                                else "invalid_request_error")


def _anthropic_type(status: int) -> str:
    return {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large",
            429: "rate_limit_error", 504: "timeout_error"}.get(status, "api_error" if status >= 500
                                                                else "invalid_request_error")


def error_response(path: str, status: int, message: str, headers: dict[str, str] | None = None,
                   param: str | None = None) -> JSONResponse:
    """The error in the shape of the protocol the path belongs to (OpenAI's names the offending field in
    `param`, as its own API does)."""
    if path.startswith("/v1/messages"):
        body: dict[str, Any] = {"type": "error", "error": {"type": _anthropic_type(status), "message": message}}
    else:
        body = {"error": {"message": message, "type": _openai_type(status), "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") == "json_invalid":
            problems.append(f"invalid JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}")
        elif not loc and err.get("type") == "missing":
            problems.append("the request needs a JSON body")
        elif not loc and err.get("type") in ("model_attributes_type", "dict_type"):
            problems.append("the request body must be a JSON object, sent as Content-Type: application/json")
        else:
            problems.append(f"{loc or 'body'}: {err.get('msg')}")
    return "; ".join(dict.fromkeys(problems)) or "invalid request"


def _validation_param(exc: RequestValidationError) -> str | None:
    """The first offending field as a dotted path (`messages.0.role`), None for a body that is not JSON."""
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if loc:
            return loc
    return None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(request.url.path, 400, _validation_message(exc), param=_validation_param(exc))

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return error_response(request.url.path, exc.status, exc.message, exc.headers, param=exc.param)

    @app.exception_handler(P.ProtocolError)
    async def _protocol(request: Request, exc: P.ProtocolError):
        return error_response(request.url.path, 400, str(exc), param=exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        return error_response(request.url.path, exc.status_code, str(message), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}: {exc}")


class BodyLimit:
    """ASGI middleware: reject request bodies over `limit` bytes with 413 before the app parses them (by the
    declared Content-Length, and by counting what arrives for chunked uploads)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                return await self._reject(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send):
        response = error_response(scope.get("path", ""), 413,
                                  f"request body over the server's limit of {self.limit} bytes")
        await response(scope, receive, send)


async def _throughput_log(sched: Scheduler, every: float) -> None:
    """Every `every` seconds in which tokens were generated: one line on stderr with the rate, the slots in use,
    the queue and the requests finished, like the periodic stats line of other servers."""
    import sys

    last, t_last = sched.stats["tokens"], time.perf_counter()
    while True:
        await asyncio.sleep(every)
        now, tokens = time.perf_counter(), sched.stats["tokens"]
        if tokens != last:
            print(f"throughput: {tokens - last} tokens in {now - t_last:.1f} s ({(tokens - last) / (now - t_last):.1f} "
                  f"tokens/s), {sched.active}/{sched.batch_size} slots busy, {len(sched.waiting)} waiting, "
                  f"{sched.stats['completed']} requests completed", file=sys.stderr, flush=True)
        last, t_last = tokens, now


def bind_socket(host: str, port: int):
    """The listening socket, bound before the server starts: a port in use is reported by the CLI as its own
    error (exit 8) rather than as uvicorn's startup failure, and there is no window for another process to take
    the port between the check and the bind."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse a port in TIME_WAIT
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def banner(engine: Engine, model_name: str, batch_size: int, host: str, port: int) -> str:
    kernels = (engine.manifest.engine.get("kernels") or {}).get("implementation")
    target = engine.manifest.target + (f", {kernels} kernels" if kernels else "")
    return (f"dsv4c serve: model {model_name!r} ({target}), batch {batch_size}, context {engine.max_seq_len} "
            f"tokens, listening on http://{host}:{port}\n"
            "  OpenAI POST /v1/chat/completions · Anthropic POST /v1/messages · GET /v1/models · GET /health\n"
            "  thinking is off unless a request asks for it (OpenAI reasoning_effort or chat_template_kwargs "
            "{\"thinking\": true}; Anthropic thinking {\"type\": \"enabled\"})")


def serve_main(engine: Engine, sock, *, model_name: str | None, batch_size: int | None, max_queue: int,
               request_timeout: float | None, stats_every: float = 30.0, log_level: str = "info") -> None:
    """`dsv4c serve`: serve `engine` on the bound socket `sock` with uvicorn until interrupted."""
    import sys

    import uvicorn

    app = create_app(engine, model_name=model_name, batch_size=batch_size, max_queue=max_queue,
                     request_timeout=request_timeout, stats_every=stats_every)
    state = app.state.dsv4c
    host, port = sock.getsockname()[:2]
    print(banner(engine, state.model_name, state.scheduler.batch_size, host, port), file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
