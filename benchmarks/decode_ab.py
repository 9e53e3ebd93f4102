"""Steady-state decode of two or more CPU artifacts, interleaved in one process: an A/B that a noisy machine
cannot tilt (each round runs every artifact once, back to back; the table gives the median and best round).

    python benchmarks/decode_ab.py new=artifacts/tiny-cpu base=/tmp/old/tiny --batch 1
    python benchmarks/decode_ab.py new=A base=B --batch 8 --rounds 7 --prompt 200 --steps 32

Each round: a fresh session of `--batch` sequences prefills `--prompt` random tokens, runs two decode steps
untimed (ORT sets its decode session up on the first), then times `--steps` greedy steps. The runtime is this
checkout's; the artifacts bring their own graphs and kernel library, so an artifact built by an older dsv4c
(of the same artifact format) measures that dsv4c's engine. `--functional LABEL` runs that artifact the way the
CPU runtime did before it bound caches in place (ONNX Runtime `session.run` with the caches as feeds, the new
caches as returned copies; float32 caches only, numpy feeds cannot hold bf16), to compare with a landing from
before that change, runtime included:

    python benchmarks/decode_ab.py base=/tmp/old/mini-1b new=artifacts/bench/mini-1b --functional base

`--reuse-buffers LABEL` loads that artifact's sessions with ONNX Runtime's planned buffer reuse, which the
runtime turned off for decode (dsv4c/targets/cpu/executor.py): the same artifact twice measures that change.

    python benchmarks/decode_ab.py new=artifacts/bench/tiny base=artifacts/bench/tiny --reuse-buffers base
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", metavar="LABEL=PATH")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=200)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--functional", action="append", default=[], metavar="LABEL",
                    help="run LABEL's artifact with the previous runtime's session.run (repeatable)")
    ap.add_argument("--reuse-buffers", action="append", default=[], metavar="LABEL",
                    help="load LABEL's decode session with ORT's planned buffer reuse, as before (repeatable)")
    args = ap.parse_args()
    from dsv4c.runtime import Engine

    engines = {}
    for item in args.artifacts:
        label, _, path = item.partition("=")
        if not path:
            ap.error(f"{item!r}: expected LABEL=PATH")
        with planned_buffer_reuse(label in args.reuse_buffers):
            engines[label] = Engine.load(path, threads=args.threads)
        if label in args.functional:
            engines[label].executor.run = functional_run(engines[label].executor)
    ms = {label: [] for label in engines}
    rng = np.random.default_rng(0)
    for _ in range(args.rounds):
        for label, engine in engines.items():
            session = engine.session(args.batch)
            logits = session.prefill(rng.integers(10, engine.vocab_size, size=(args.batch, args.prompt)))
            for _ in range(2):
                logits = session.decode(logits.argmax(-1))
            t0 = time.perf_counter()
            for _ in range(args.steps):
                logits = session.decode(logits.argmax(-1))
            ms[label].append((time.perf_counter() - t0) / args.steps * 1e3)
    first = statistics.median(next(iter(ms.values())))
    print(f"\nbatch {args.batch}, {args.threads} threads, prompt {args.prompt}, {args.steps} steps, "
          f"{args.rounds} rounds\n")
    print("artifact | median ms/step | decode tok/s | best ms/step | vs first\n--- | --- | --- | --- | ---")
    for label, values in ms.items():
        med = statistics.median(values)
        print(f"{label} | {med:.2f} | {args.batch * 1e3 / med:.1f} | {min(values):.2f} | {first / med:.2f}x")


@contextmanager
def planned_buffer_reuse(on: bool):
    """Sessions the CPU executor makes meanwhile plan ORT's buffer reuse, whatever it asks for (when `on`)."""
    from dsv4c.targets.cpu import executor

    made = executor.ort_session
    if on:
        executor.ort_session = lambda *args, **kw: made(*args, **{**kw, "reuse_buffers": True})
    try:
        yield
    finally:
        executor.ort_session = made


def functional_run(executor):
    """The CPU executor's run before IOBinding: caches fed as numpy arrays, the returned copies put in."""
    names = {program: [i.name for i in s.get_inputs()] for program, s in executor.sessions.items()}

    def run(program, tokens, start_pos, n_valid, cache):
        values = [tokens, start_pos, n_valid, *cache.arrays]
        logits, *new_cache = executor.sessions[program].run(None, dict(zip(names[program], values)))
        cache.replace(new_cache)
        return logits

    return run


if __name__ == "__main__":
    main()
