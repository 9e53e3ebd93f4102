"""Decode cost per token against context length on the CPU engine (DeepSeek-V4's sparse-attention promise: a
step reads the window, the top-k compressed entries and the indexer keys, so its cost should grow slowly).

    python benchmarks/decode_context.py                          # tiny at 1k, 4k, 16k tokens of context
    python benchmarks/decode_context.py --preset mini-1b --contexts 1024,16384

The preset's recipe is built with max_seq_len above the longest context (stage cache: DSV4C_CACHE_DIR); for each
context length a batch-1 session prefills that many tokens, then `--steps` greedy decode steps are timed. The
table gives ms per token and the ratio to the shortest context; `--csv FILE` also writes it as CSV.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"tiny": "recipes/tiny-cpu.yaml", "mini-1b": "recipes/flash-cpu-mini.yaml"}


def build(preset: str, max_seq_len: int, out_root: Path) -> Path:
    out = out_root / f"{preset}-{max_seq_len}"
    cmd = [sys.executable, "-m", "dsv4c.compiler.cli", "build", RECIPES[preset], "-o", str(out), "--events", "quiet",
           "--set", f"runtime.max_seq_len={max_seq_len}"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def decode_ms(engine, context: int, steps: int, seed: int = 0) -> float:
    """ms per decode step after prefilling `context` random tokens (batch 1, greedy)."""
    rng = np.random.default_rng(seed)
    session = engine.session(1)
    logits = session.prefill(rng.integers(10, engine.vocab_size, size=(1, context)))
    token = logits.argmax(-1)
    session.decode(token)  # first step after a prefill: warm the decode program
    t0 = time.perf_counter()
    for _ in range(steps):
        token = session.decode(token).argmax(-1)
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(RECIPES))
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    ap.add_argument("--csv", type=Path)
    args = ap.parse_args()
    from dsv4c.runtime import Engine

    contexts = sorted(int(c) for c in args.contexts.split(","))
    max_seq_len = 1 << (contexts[-1] + args.steps + 1).bit_length()  # a power of two every compress ratio divides
    engine = Engine.load(build(args.preset, max_seq_len, args.out), threads=args.threads)
    rows = []
    for context in contexts:
        ms = decode_ms(engine, context, args.steps)
        rows.append({"context": context, "ms_per_token": round(ms, 3), "vs_shortest": 0.0})
    for r in rows:
        r["vs_shortest"] = round(r["ms_per_token"] / rows[0]["ms_per_token"], 2)
    print(f"\n{args.preset}, batch 1, {args.threads} threads, max_seq_len {max_seq_len}, {args.steps} steps\n")
    print("context | decode ms/token | x shortest\n--- | --- | ---")
    for r in rows:
        print(f"{r['context']} | {r['ms_per_token']:.2f} | {r['vs_shortest']:.2f}x")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
