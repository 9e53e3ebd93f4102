"""Decode cost per token against context length on the CPU engine (DeepSeek-V4's sparse-attention promise: a
step reads the window, the top-k compressed entries and the indexer keys, so its cost should grow slowly).

    python benchmarks/decode_context.py                          # tiny at 1k, 4k, 16k tokens of context
    python benchmarks/decode_context.py --preset mini-1b --contexts 1024,16384
    python benchmarks/decode_context.py --preset mini-1b --llama-cpp $LLAMA --png context.png

The preset's recipe is built with max_seq_len above the longest context (stage cache: DSV4C_CACHE_DIR); for each
context length a batch-1 session prefills that many tokens, then `--rounds` rounds each time `--steps` greedy
decode steps on every session in turn (a shared machine's speed drifts by 20-30 % within minutes: rounds that
visit every context compare them at the same moments). The table gives each context's median ms per token and the
median over rounds of its ratio to the shortest context; `--csv FILE` also writes it as CSV. With
`--llama-cpp` (as in decode_cpu.py; benchmarks/llama_cpp.md) llama.cpp's decode of the same checkpoint is timed
beside it at each context (`llama-bench -p 0 -n STEPS -d CONTEXT`). `--png FILE` plots ms per token against
context for both (needs matplotlib, the `bench` extra: `.venv/bin/pip install -e ".[bench]"`; without it the plot is
skipped with a note).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_cpu import convert_gguf, llama_bench, llama_cpp_tree  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"tiny": "recipes/tiny-cpu.yaml", "mini-1b": "recipes/flash-cpu-mini.yaml"}


def build(preset: str, max_seq_len: int, out_root: Path) -> Path:
    out = out_root / f"{preset}-{max_seq_len}"
    cmd = [sys.executable, "-m", "dsv4c.compiler.cli", "build", RECIPES[preset], "-o", str(out), "--events", "quiet",
           "--set", f"runtime.max_seq_len={max_seq_len}"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def decode_rounds(engine, contexts: list[int], steps: int, rounds: int, seed: int = 0) -> dict[int, list[float]]:
    """ms per decode step at each context, one figure a round: a batch-1 session per context, prefilled once
    with random tokens and stepped once untimed, then `rounds` rounds that time `steps` greedy steps on each
    session in turn (each round adds `steps` tokens to every context)."""
    rng = np.random.default_rng(seed)
    sessions, tokens = {}, {}
    for context in contexts:
        sessions[context] = engine.session(1)
        logits = sessions[context].prefill(rng.integers(10, engine.vocab_size, size=(1, context)))
        tokens[context] = sessions[context].decode(logits.argmax(-1)).argmax(-1)  # warms the decode program
    ms = {context: [] for context in contexts}
    for _ in range(rounds):
        for context in contexts:
            token, t0 = tokens[context], time.perf_counter()
            for _ in range(steps):
                token = sessions[context].decode(token).argmax(-1)
            ms[context].append((time.perf_counter() - t0) / steps * 1e3)
            tokens[context] = token
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(RECIPES))
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of --steps timed steps at every context")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--png", type=Path, help="plot of ms per token against context (matplotlib)")
    ap.add_argument("--llama-cpp", help="llama.cpp source tree with llama-bench built (default: $DSV4C_LLAMA_CPP)")
    ap.add_argument("--llama-cpp-python", default=sys.executable, help="interpreter for the GGUF conversion")
    ap.add_argument("--llama-reps", type=int, default=3, help="llama-bench repetitions (it reports the mean)")
    args = ap.parse_args()
    from dsv4c.runtime import Engine

    contexts = sorted(int(c) for c in args.contexts.split(","))
    longest = contexts[-1] + args.rounds * args.steps + 1
    max_seq_len = 1 << longest.bit_length()  # a power of two every compress ratio divides
    llama = llama_cpp_tree(args.llama_cpp)
    engine = Engine.load(build(args.preset, max_seq_len, args.out), threads=args.threads)
    gguf = None
    if llama:
        checkpoint = Path(engine.manifest.data["inputs"]["checkpoint"])
        gguf = convert_gguf(llama[0], checkpoint, args.out, args.llama_cpp_python)
    ms = decode_rounds(engine, contexts, args.steps, args.rounds)
    rows = []
    for context in contexts:
        ratios = [m / m0 for m, m0 in zip(ms[context], ms[contexts[0]])]
        row = {"context": context, "ms_per_token": round(float(np.median(ms[context])), 3),
               "vs_shortest": round(float(np.median(ratios)), 2)}
        if gguf:
            _, tok_s, _ = llama_bench(llama[1], gguf, 0, args.steps, args.threads, args.llama_reps, depth=context)
            row["llama_cpp_ms_per_token"] = round(1e3 / tok_s, 3)
        rows.append(row)
    for r in rows:
        if gguf:
            r["llama_cpp_vs_shortest"] = round(r["llama_cpp_ms_per_token"] / rows[0]["llama_cpp_ms_per_token"], 2)
    print(f"\n{args.preset}, batch 1, {args.threads} threads, max_seq_len {max_seq_len}, {args.rounds} rounds of "
          f"{args.steps} steps (dsv4c: medians of the rounds; the ratio: the median of each round's)\n")
    for context in contexts:
        print(f"dsv4c at {context}: {', '.join(f'{m:.2f}' for m in ms[context])} ms per token")
    if gguf:
        print("context | dsv4c ms/token | x shortest | llama.cpp ms/token | x shortest\n--- | --- | --- | --- | ---")
        for r in rows:
            print(f"{r['context']} | {r['ms_per_token']:.2f} | {r['vs_shortest']:.2f}x | "
                  f"{r['llama_cpp_ms_per_token']:.2f} | {r['llama_cpp_vs_shortest']:.2f}x")
    else:
        print("context | decode ms/token | x shortest\n--- | --- | ---")
        for r in rows:
            print(f"{r['context']} | {r['ms_per_token']:.2f} | {r['vs_shortest']:.2f}x")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if args.png:
        plot(rows, args.png, f"{args.preset}, batch 1, {args.threads} threads")


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"note: no plot written to {path}: matplotlib is not installed (pip install -e \".[bench]\")",
              file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["context"] for r in rows]
    ax.plot(x, [r["ms_per_token"] for r in rows], "o-", label="dsv4c")
    if "llama_cpp_ms_per_token" in rows[0]:
        ax.plot(x, [r["llama_cpp_ms_per_token"] for r in rows], "s-", label="llama.cpp")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(c) for c in x])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode ms per token")
    ax.set_ylim(0, 1.15 * max(v for r in rows for k, v in r.items() if k.endswith("ms_per_token")))
    ax.set_title(title)
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")

if __name__ == "__main__":
    main()
