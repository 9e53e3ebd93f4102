"""Continuous batching: one background thread owns a Session with one slot per concurrent sequence.

Each scheduler step is at most two engine calls:

    prefill   the slots still reading their prompt, as a sub-batch of just those slots: the next <= prefill_chunk
              prompt tokens each; a slot whose prompt is done samples its first token
    decode    every slot with a sampled token to feed, in one shared step over the whole batch (idle slots have
              n_valid 0 and keep their state); each samples its next token

so a newcomer's prompt is read chunk by chunk *between* the decode steps of the sequences already running (they
keep streaming while a long prompt is read) and costs only its own tokens, and every running sequence shares each
decode step. Between steps the scheduler drops finished / cancelled / timed-out jobs (their slots are reset) and
admits queued requests into free slots. The waiting queue is bounded: a request that finds every slot busy and
max_queue requests already waiting is refused (`submit` raises QueueFull; the server answers 429).

Events go to each job's `on_event` callback from the scheduler thread: Token(id) for every sampled token, then
exactly one Finished(reason) with reason "stop" (a stop token), "length" (max_tokens or the context), "cancelled",
"timeout" or "error". The callback must be quick and must not raise (the server hands events to its event loop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dsv4c.runtime.engine import PREFILL_CHUNK, Engine
from dsv4c.runtime.sampling import sample

log = logging.getLogger("dsv4c.serve")


class QueueFull(RuntimeError):
    """The waiting queue holds max_queue requests already (HTTP 429)."""


class PromptTooLong(ValueError):
    """The prompt leaves no room to generate within the artifact's max_seq_len (HTTP 400)."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: list[int]  # token ids, BOS included
    max_tokens: int  # new tokens at most (the context end may stop it earlier)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_tokens: frozenset[int] = frozenset()  # empty: the engine's eos id
    timeout: float | None = None  # seconds from submit to the last token (queue wait included)


@dataclass(frozen=True)
class Token:
    id: int


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length | cancelled | timeout | error
    error: str | None = None


Event = Token | Finished


@dataclass(eq=False)
class Job:
    """A submitted request and its progress; `cancel()` is safe from any thread at any time."""

    request: GenerationRequest
    on_event: Callable[[Event], None]
    scheduler: "Scheduler"
    deadline: float | None
    rng: np.random.Generator
    submitted: float = field(default_factory=time.monotonic)
    slot: int | None = None
    prompt_done: int = 0  # prompt tokens already prefilled
    next_token: int | None = None  # sampled, not yet fed to the engine
    generated: int = 0
    finish_reason: str | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        self.scheduler._cancel(self)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    def __init__(self, engine: Engine, batch_size: int | None = None, max_queue: int = 64,
                 request_timeout: float | None = 600.0, prefill_chunk: int = PREFILL_CHUNK):
        self.engine = engine
        self.batch_size = batch_size or engine.max_batch_size
        self.max_queue, self.request_timeout, self.prefill_chunk = max_queue, request_timeout, prefill_chunk
        self.session = engine.session(self.batch_size)
        self.slots: list[Job | None] = [None] * self.batch_size
        self.waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = {"steps": 0, "tokens": 0, "completed": 0, "rejected": 0, "cancelled": 0, "timeout": 0,
                      "error": 0}

    # ---- the caller's side ------------------------------------------------------------------------------------
    def check_prompt(self, prompt_len: int) -> None:
        limit = self.engine.max_seq_len
        if prompt_len >= limit:
            raise PromptTooLong(f"the prompt is {prompt_len} tokens; this model's context is {limit} tokens "
                                f"(max_seq_len), which must hold the prompt plus at least one generated token")

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> Job:
        """Queue a request; raises QueueFull when max_queue requests are already waiting, PromptTooLong when the
        prompt cannot fit, ValueError on an empty prompt or max_tokens < 1."""
        if not request.prompt:
            raise ValueError("empty prompt")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        self.check_prompt(len(request.prompt))
        timeout = request.timeout if request.timeout is not None else self.request_timeout
        job = Job(request, on_event, self, deadline=None if timeout is None else time.monotonic() + timeout,
                  rng=np.random.default_rng(request.seed))
        with self._cond:
            if self._stopping:
                raise RuntimeError("the scheduler is shut down")
            free = self.batch_size - self.active  # slots the next step will fill from the queue
            if len(self.waiting) >= self.max_queue + free:
                self.stats["rejected"] += 1
                raise QueueFull(f"all {self.batch_size} slots are busy and {len(self.waiting) - free} requests are "
                                f"already waiting (the server's max queue is {self.max_queue}); retry later")
            self.waiting.append(job)
            self._cond.notify()
        return job

    def _cancel(self, job: Job) -> None:
        with self._cond:
            if job.finished or job.cancelled:
                return
            job.cancelled = True
            if job.slot is None and job in self.waiting:  # never started: finish it right here
                self.waiting.remove(job)
                self._finish(job, "cancelled")
            self._cond.notify()

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._run, name="dsv4c-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish every queued and running job as cancelled and join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            for job in [*self.waiting, *filter(None, self.slots)]:
                self._finish(job, "cancelled")
            self.waiting.clear()
            self.slots = [None] * self.batch_size

    @property
    def active(self) -> int:
        return sum(j is not None for j in self.slots)

    # ---- the scheduler thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.waiting and self.active == 0:
                    self._cond.wait()
                if self._stopping:
                    return
                self._retire_and_admit()
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - one bad step must not kill the server
                log.exception("engine step failed; failing the running requests")
                with self._cond:
                    for slot, job in enumerate(self.slots):
                        if job is not None:
                            self._finish(job, "error", f"engine step failed: {type(e).__name__}: {e}")
                            self._free(slot)

    def _retire_and_admit(self) -> None:
        """(under the lock) Free the slots of cancelled / timed-out jobs, drop expired waiters, fill free slots."""
        now = time.monotonic()
        for slot, job in enumerate(self.slots):
            if job is not None and (job.cancelled or _expired(job, now)):
                self._finish(job, "cancelled" if job.cancelled else "timeout")
                self._free(slot)
        for job in [j for j in self.waiting if _expired(j, now)]:
            self.waiting.remove(job)
            self._finish(job, "timeout")
        for slot in range(self.batch_size):
            if self.slots[slot] is None and self.waiting:
                job = self.waiting.popleft()
                job.slot = slot
                self.slots[slot] = job
                self.session.reset(slot)

    def _step(self) -> None:
        """Prefill the next prompt chunk of every newcomer (a sub-batch of just those slots), then one shared
        decode step for every slot that has a sampled token to feed (newcomers that just finished their prompt
        included)."""
        prefilling = [(slot, job) for slot, job in enumerate(self.slots)
                      if job is not None and job.prompt_done < len(job.request.prompt)]
        if prefilling:
            chunks = []
            for _, job in prefilling:
                chunks.append(job.request.prompt[job.prompt_done:job.prompt_done + self.prefill_chunk])
                job.prompt_done += len(chunks[-1])
            logits = self.session.prefill_slots([slot for slot, _ in prefilling], chunks)  # [n, vocab]
            self.stats["steps"] += 1
            self._advance([(job, logits[i:i + 1]) for i, (_, job) in enumerate(prefilling)
                           if job.prompt_done == len(job.request.prompt)])
        decoding = [(slot, job) for slot, job in enumerate(self.slots)
                    if job is not None and job.next_token is not None]
        if decoding:
            ids = np.zeros(self.batch_size, dtype=np.int64)
            active = np.zeros(self.batch_size, dtype=bool)
            for slot, job in decoding:
                ids[slot], active[slot], job.next_token = job.next_token, True, None
            logits = self.session.decode(ids, active=active)  # [B, vocab]; idle slots keep their state
            self.stats["steps"] += 1
            self._advance([(job, logits[slot:slot + 1]) for slot, job in decoding])

    def _advance(self, ready: list[tuple[Job, np.ndarray]]) -> None:
        """Sample each job's next token from its logits [1, vocab], emit it, and finish or keep the job."""
        with self._cond:
            for job, logits in ready:
                if job.finished or job.slot is None:
                    continue
                token = self._sample(job, logits)
                job.generated += 1
                self.stats["tokens"] += 1
                _emit(job, Token(token))
                stops = job.request.stop_tokens or {self.engine.eos_id}
                reason = ("stop" if token in stops
                          else "length" if job.generated >= job.request.max_tokens
                          or self.session.positions[job.slot] >= self.engine.max_seq_len else None)
                if reason:
                    slot = job.slot
                    self._finish(job, reason)
                    self._free(slot)
                else:
                    job.next_token = token

    def _sample(self, job: Job, logits: np.ndarray) -> int:
        """logits [1, vocab] of the job's next token -> the token (the job's own temperature, top-p and rng)."""
        req = job.request
        return int(sample(logits, req.temperature, req.top_p, job.rng)[0])

    def _finish(self, job: Job, reason: str, error: str | None = None) -> None:
        if job.finished:
            return
        job.finish_reason = reason
        self.stats["completed" if reason in ("stop", "length") else reason] += 1
        _emit(job, Finished(reason, error))

    def _free(self, slot: int) -> None:
        job = self.slots[slot]
        if job is not None:
            job.slot = None
        self.slots[slot] = None


def _emit(job: Job, event: Event) -> None:
    try:
        job.on_event(event)
    except Exception:  # noqa: BLE001 - a consumer's bug must not stop the scheduler
        log.exception("on_event callback failed")


def _expired(job: Job, now: float) -> bool:
    return job.deadline is not None and now > job.deadline
