"""Bounded load test of `dsv4c serve` on localhost: N concurrent streaming clients (the real `openai` package)
for a fixed time, once with continuous batching and once one request at a time (--max-batch 1), same artifact.

    python benchmarks/serve_load.py artifacts/tiny-cpu-b8 --clients 64 --duration 30

Each client sends streaming chat completions back to back until the time is up; a 429 (queue full: intended
back-pressure) makes it wait the Retry-After the server sends and retry; anything else is an error. Requests accepted before the deadline
run to completion (the drain), so "accepted == completed" is checked, and throughput is every completed token
over the whole run, drain included. The server runs as `dsv4c serve` in a subprocess, as a user would start it.

Reports, per configuration: accepted / completed requests, 429s, errors (must be 0), completion tokens, tokens/s,
tokens per engine step (from /health), p50/p95 request latency and time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import openai

TOPICS = ["a lighthouse", "the sea", "a quiet town", "trains", "a garden", "winter", "a library", "the moon"]


@dataclass
class Tally:
    accepted: int = 0
    completed: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)
    tokens: int = 0
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)


async def one_client(api: openai.AsyncOpenAI, model: str, i: int, deadline: float, max_tokens: int,
                     tally: Tally) -> None:
    n = 0
    while time.monotonic() < deadline:
        n += 1
        t0 = time.monotonic()
        try:
            stream = await api.chat.completions.create(
                model=model, max_tokens=max_tokens, temperature=0.7, seed=i * 1000 + n, stream=True,
                stream_options={"include_usage": True}, extra_body={"thinking": {"type": "disabled"}},
                messages=[{"role": "user", "content": f"Client {i}, request {n}: a short story about "
                                                      f"{TOPICS[(i + n) % len(TOPICS)]}."}])
        except openai.RateLimitError as e:  # back-pressure: wait as the server asks (Retry-After), then retry
            tally.rejected += 1
            await asyncio.sleep(float(e.response.headers.get("retry-after", 1)))
            continue
        except Exception as e:  # noqa: BLE001 - every other failure is counted and shown
            tally.errors.append(f"submit: {type(e).__name__}: {e}")
            continue
        tally.accepted += 1
        first, usage = None, None
        try:
            async for chunk in stream:
                if first is None and chunk.choices and (chunk.choices[0].delta.content or getattr(
                        chunk.choices[0].delta, "reasoning_content", None)):
                    first = time.monotonic()
                if chunk.usage is not None:
                    usage = chunk.usage
        except Exception as e:  # noqa: BLE001
            tally.errors.append(f"stream: {type(e).__name__}: {e}")
            continue
        if usage is None:
            tally.errors.append("stream ended without usage")
            continue
        tally.completed += 1
        tally.tokens += usage.completion_tokens
        tally.latency.append(time.monotonic() - t0)
        if first is not None:
            tally.ttft.append(first - t0)


async def load(url: str, model: str, clients: int, duration: float, max_tokens: int) -> tuple[Tally, float]:
    api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900,
                             http_client=openai.DefaultAsyncHttpxClient(
                                 limits=httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients)))
    tally = Tally()
    start = time.monotonic()
    await asyncio.gather(*(one_client(api, model, i, start + duration, max_tokens, tally) for i in range(clients)))
    wall = time.monotonic() - start
    await api.close()
    return tally, wall


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(artifact: Path, batch: int, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "dsv4c.compiler.cli", "serve", str(artifact), "--port", str(port),
                               "--max-batch", str(batch), "--max-queue", str(args.max_queue)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise SystemExit(f"dsv4c serve exited: {server.stderr.read().decode()}")
            try:
                info = httpx.get(f"{url}/health", timeout=1).json()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise SystemExit("dsv4c serve did not come up in 120 s") from None
                time.sleep(0.2)
        tally, wall = asyncio.run(load(url, info["model"], args.clients, args.duration, args.max_tokens))
        stats = httpx.get(f"{url}/health", timeout=5).json()["stats"]
    finally:
        server.terminate()
        server.wait(30)
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return {"max_batch": batch, "accepted": tally.accepted, "completed": tally.completed,
            "rejected_429": tally.rejected, "errors": len(tally.errors), "error_samples": tally.errors[:5],
            "tokens": tally.tokens, "wall_s": round(wall, 1), "tokens_per_s": round(tally.tokens / wall, 1),
            "tokens_per_step": round(stats["tokens"] / max(stats["steps"], 1), 2),
            "latency_p50_s": round(pct(tally.latency, 50), 2), "latency_p95_s": round(pct(tally.latency, 95), 2),
            "ttft_p50_s": round(pct(tally.ttft, 50), 2), "server_stats": stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds during which clients send requests")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-queue", type=int, default=32, help="server queue bound (429 beyond it)")
    ap.add_argument("--batches", default="", help="comma-separated max batch sizes (default: the artifact's, 1)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    full = int(manifest["runtime"]["max_batch_size"])
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [full, 1]
    results = []
    for b in batches:
        print(f"max batch {b}: {args.clients} clients x {args.duration:.0f} s ...", file=sys.stderr, flush=True)
        results.append(run_config(args.artifact, b, args))
    cols = ["max_batch", "accepted", "completed", "rejected_429", "errors", "tokens", "wall_s", "tokens_per_s",
            "tokens_per_step", "latency_p50_s", "latency_p95_s", "ttft_p50_s"]
    print(f"\n{args.artifact.name}: {args.clients} streaming clients, {args.duration:.0f} s, max_tokens "
          f"{args.max_tokens}, queue {args.max_queue}")
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(str(r[c]) for c in cols))
    if len(results) >= 2 and results[-1]["tokens_per_s"]:
        print(f"continuous batching (max batch {results[0]['max_batch']}) vs one at a time: "
              f"{results[0]['tokens_per_s'] / results[-1]['tokens_per_s']:.2f}x tokens/s")
    for r in results:
        if r["errors"]:
            print(f"max batch {r['max_batch']}: {r['errors']} errors, e.g. {r['error_samples']}")
        if r["accepted"] != r["completed"]:
            print(f"max batch {r['max_batch']}: {r['accepted'] - r['completed']} accepted requests did not complete")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    bad = any(r["errors"] or r["accepted"] != r["completed"] for r in results)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
