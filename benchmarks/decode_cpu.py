"""CPU engine throughput next to llama.cpp and transformers' DeepseekV4ForCausalLM on the same checkpoint, in one run.

    python benchmarks/decode_cpu.py                     # tiny and mini-1b (~0.9B, real per-head shapes)
    python benchmarks/decode_cpu.py --presets tiny --batches 1,8 --prompt 64 --steps 16
    python benchmarks/decode_cpu.py --presets tiny --batches 1 --prompt 200 --steps 32 --llama-cpp LLAMA_CPP_DIR

For each preset the artifact is built with `dsv4c build` (stage cache: DSV4C_CACHE_DIR), then, at each batch size,
prefill (equal-length prompts, so transformers can batch them) and greedy decode are timed on both (the first
decode step after the prefill is run untimed on both: ONNX Runtime sets its decode session up on that run). dsv4c's
figures are the mean of `--reps` runs after a warm-up run; at batch 1 beside llama.cpp, dsv4c and llama-bench
instead run in `--rounds` alternating rounds (one run each) and the table gives each side's median and the
median of the rounds' ratios (a shared machine's speed drifts by 20-30 % within minutes: runs taken minutes apart
compared the machine with itself); transformers runs once (its mini-1b batch-8 decode takes minutes). The last
columns are the memory-bandwidth bound of decode: tokens/s if every step only streamed the bytes it must read
(dense weights + the routed experts a batch of that size touches, packed as stored, one row per token of the tables
looked up by token id, and the cache rows a step reads at the timed steps' mean context) at this machine's measured
copy bandwidth, and dsv4c's decode as a share of it.

llama.cpp (`--llama-cpp`, or DSV4C_LLAMA_CPP): the llama.cpp source tree with its tools built (vendor/llama.cpp of
the llama-cpp-python sdist, `build/bin/llama-bench`; benchmarks/llama_cpp.md says how). The same checkpoint the
artifact was built from (its manifest's inputs.checkpoint, tokenizer included) is converted to GGUF with the tree's
convert_hf_to_gguf.py (through benchmarks/llama_cpp_convert.py: FP8 -> Q8_0, FP4 experts -> MXFP4), then
llama-bench times prefill of the prompt (`-p PROMPT -n 0`) and decode after it (`-p 0 -n STEPS -d PROMPT`) with the
same thread count, at batch 1 only (llama-bench runs one sequence; other batch rows show "-").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"tiny": "recipes/tiny-cpu.yaml", "mini-1b": "recipes/flash-cpu-mini.yaml"}


def build(preset: str, max_batch: int, out_root: Path) -> Path:
    """Build the preset's recipe with room for `max_batch` sequences, never below the recipe's own
    runtime.max_batch_size (its validation prompts run as one batch: mini-1b's two refuse max_batch_size 1)."""
    import yaml

    recipe = yaml.safe_load((ROOT / RECIPES[preset]).read_text())
    max_batch = max(max_batch, int((recipe.get("runtime") or {}).get("max_batch_size", 1)))
    out = out_root / preset
    cmd = [sys.executable, "-m", "dsv4c.compiler.cli", "build", RECIPES[preset], "-o", str(out), "--events", "quiet",
           "--set", f"runtime.max_batch_size={max_batch}"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def copy_bandwidth(nbytes: int = 1 << 28) -> float:
    """Bytes/s of a large numpy copy (read + write counted), best of 5: the machine's streaming bandwidth."""
    src, dst = np.ones(nbytes // 8), np.empty(nbytes // 8)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * nbytes / (time.perf_counter() - t0))
    return best


def decode_bytes(cfg, batch: int, slots=(), context: int = 0) -> float:
    """Bytes one decode step of `batch` sequences must read: the weights (everything except the routed experts, and
    of the tables looked up by token id, the embedding and the hash layers' tid2eid, one row per token) plus the
    expected number of distinct routed experts `batch` tokens select per layer; with the engine's cache `slots`
    (Engine.cache_slots), also the cache rows a step at `context` tokens reads (cache_read_bytes)."""
    from dsv4c.graphs.checkpoint import expected_tensors

    dense, expert = 0, 0
    for name, spec in expected_tensors(cfg).items():
        if name.startswith("mtp."):
            continue  # the MTP block is not run by plain decode
        if ".ffn.experts." in name:
            expert += spec.nbytes
        elif name == "embed.weight" or name.endswith(".ffn.gate.tid2eid"):
            dense += batch * spec.nbytes / spec.shape[0]
        else:
            dense += spec.nbytes
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = e * (1 - (1 - k / e) ** batch)
    return dense + expert * touched / e + batch * cache_read_bytes(cfg, slots, context)


def cache_read_bytes(cfg, slots, context: int) -> float:
    """Cache bytes one sequence's decode step reads at `context` tokens (cache.py's layout): the sliding window's
    rows; of the compressed entries (one per `ratio` tokens) all of an HCA layer's, the indexer's top-k of a CSA
    layer's, whose indexer keys it reads all of; the compressor states whole."""
    from dsv4c.targets.base import numpy_dtype

    total = 0.0
    for slot in slots:  # named layers.<i>.<field> (cache.py)
        _, layer, field = slot.name.split(".")
        row = np.prod(slot.shape[1:]) * np.dtype(numpy_dtype(slot.dtype)).itemsize
        ratio = cfg.compress_ratios[int(layer)]
        if field == "win":  # a ring of the last shape[0] rows
            rows = context
        elif field == "cmp":
            rows = context // ratio if ratio != 4 else min(context // ratio, cfg.index_topk)
        elif field == "idx":
            rows = context // 4
        else:
            rows = slot.shape[0]
        total += min(rows, slot.shape[0]) * row
    return total


def time_engine(engine, prompts: np.ndarray, steps: int,
                sync: Callable[[], None] = lambda: None) -> tuple[float, float]:
    """Seconds of the prefill and per decode step; `sync` waits for a device's queued work (gpu_decode.py)."""
    session = engine.session(len(prompts))
    t0 = time.perf_counter()
    logits = session.prefill(prompts)
    sync()
    prefill = time.perf_counter() - t0
    logits = session.decode(logits.argmax(-1))  # untimed: the first decode run sets up ORT's decode session
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = session.decode(logits.argmax(-1))
    sync()
    return prefill, (time.perf_counter() - t0) / steps


def time_engine_mean(engine, prompts: np.ndarray, steps: int, reps: int) -> tuple[float, float]:
    """time_engine's (prefill, per decode step) as the mean of `reps` runs after one warm-up run: the figure
    llama-bench reports for itself (a single run on a shared machine moved mini-1b's batch-8 decode by 15 %)."""
    time_engine(engine, prompts, steps)
    runs = [time_engine(engine, prompts, steps) for _ in range(reps)]
    return float(np.mean([r[0] for r in runs])), float(np.mean([r[1] for r in runs]))


def time_transformers(model, prompts: np.ndarray, steps: int) -> tuple[float, float]:
    with torch.no_grad():
        ids = torch.from_numpy(prompts)
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - t0
        cache, nxt, pos = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), prompts.shape[1]
        out = model(nxt, past_key_values=cache, position_ids=torch.full_like(nxt, pos), use_cache=True)  # untimed,
        cache, nxt, pos = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), pos + 1  # as dsv4c's
        t0 = time.perf_counter()
        for i in range(steps):
            out = model(nxt, past_key_values=cache, position_ids=torch.full_like(nxt, pos + i), use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return prefill, (time.perf_counter() - t0) / steps


def llama_cpp_tree(arg: str | None) -> tuple[Path, Path] | None:
    """(source tree, llama-bench binary) from --llama-cpp / DSV4C_LLAMA_CPP, or None (with a note) when unset."""
    arg = arg or os.environ.get("DSV4C_LLAMA_CPP")
    if not arg:
        print("note: llama.cpp columns skipped (pass --llama-cpp DIR or set DSV4C_LLAMA_CPP; see "
              "benchmarks/llama_cpp.md)", file=sys.stderr)
        return None
    tree = Path(arg).resolve()
    if not (tree / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"--llama-cpp {tree}: no convert_hf_to_gguf.py there; pass the llama.cpp source tree "
                 "(vendor/llama.cpp of the llama-cpp-python sdist) with its tools built under build/")
    for rel in ("build/bin/llama-bench", "build/bin/Release/llama-bench", "bin/llama-bench"):
        if (tree / rel).is_file():
            return tree, tree / rel
    sys.exit(f"--llama-cpp {tree}: llama-bench is not built (cmake --build build --target llama-bench)")


def convert_gguf(tree: Path, checkpoint: Path, out_root: Path, python: str) -> Path:
    """GGUF of `checkpoint` (cached by checkpoint path: stage-cache paths are content-addressed)."""
    key = hashlib.sha1(str(checkpoint.resolve()).encode()).hexdigest()[:16]
    out = out_root / "gguf" / f"{checkpoint.parent.name}-{key}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    cmd = [python, str(ROOT / "benchmarks" / "llama_cpp_convert.py"), str(tree), str(checkpoint), "--outfile", str(tmp)]
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"GGUF conversion of {checkpoint} failed (exit {rc}); log: {log}\n"
                 + "".join(log.read_text().splitlines(keepends=True)[-15:]))
    tmp.rename(out)
    return out


def llama_bench(binary: Path, gguf: Path, prompt: int, steps: int, threads: int, reps: int,
                depth: int | None = None) -> tuple[float, float, str]:
    """(prefill tok/s of `prompt` tokens, decode tok/s of `steps` tokens after a `depth`-token context (default
    `prompt`), build). prompt 0: no prefill run (its tok/s is 0)."""
    def run(*args: str) -> dict:
        cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", str(reps), "-o", "json", *args]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
        (row,) = json.loads(res.stdout)
        return row

    pre = run("-p", str(prompt), "-n", "0") if prompt else {"avg_ts": 0.0}
    dec = run("-p", "0", "-n", str(steps), "-d", str(prompt if depth is None else depth))
    build_info = (f"{pre.get('build_commit', '?')} ({pre.get('build_number', '?')}), {pre.get('cpu_info', '')}, "
                  f"prefill {pre['avg_ts']:.0f} ± {pre.get('stddev_ts', 0):.0f}, "
                  f"decode {dec['avg_ts']:.1f} ± {dec.get('stddev_ts', 0):.1f} tok/s over {reps} runs")
    return pre["avg_ts"], dec["avg_ts"], build_info


def interleaved(engine, prompts: np.ndarray, llama_bench_binary: Path, gguf: Path, args) -> tuple:
    """dsv4c and llama.cpp at batch 1 in `--rounds` alternating rounds (one llama-bench run, then one dsv4c run),
    after a warm-up run of dsv4c: (dsv4c prefill s, decode s per step, llama.cpp prefill tok/s, decode tok/s, the
    median of the rounds' decode ratios, note). The medians of each side and of the per-round ratios: a shared
    machine's speed drifts by 20-30 % within minutes, and a ratio of two runs taken minutes apart measured that."""
    time_engine(engine, prompts, args.steps)
    e_runs, l_runs = [], []
    for _ in range(args.rounds):
        l_runs.append(llama_bench(llama_bench_binary, gguf, args.prompt, args.steps, args.threads, 1))
        e_runs.append(time_engine(engine, prompts, args.steps))
    ratios = [1 / e[1] / l[1] for e, l in zip(e_runs, l_runs)]
    med = np.median
    info = (f"{l_runs[0][2].split(', prefill')[0]}, {args.rounds} rounds alternating with dsv4c: prefill "
            f"{med([l[0] for l in l_runs]):.0f} (runs {', '.join(f'{l[0]:.0f}' for l in l_runs)}), decode "
            f"{med([l[1] for l in l_runs]):.1f} tok/s (runs {', '.join(f'{l[1]:.1f}' for l in l_runs)}); dsv4c "
            f"decode {', '.join(f'{1 / e[1]:.1f}' for e in e_runs)}; ratios {', '.join(f'{r:.2f}' for r in ratios)}")
    return (float(med([e[0] for e in e_runs])), float(med([e[1] for e in e_runs])),
            float(med([l[0] for l in l_runs])), float(med([l[1] for l in l_runs])), float(med(ratios)), info)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,mini-1b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    ap.add_argument("--llama-cpp", help="llama.cpp source tree with llama-bench built (default: $DSV4C_LLAMA_CPP; "
                                        "unset: llama.cpp columns skipped)")
    ap.add_argument("--llama-cpp-python", default=sys.executable,
                    help="Python for llama.cpp's converter (needs torch, transformers, safetensors, numpy; gguf-py "
                         "comes from the tree)")
    ap.add_argument("--reps", type=int, default=3, help="dsv4c runs after a warm-up run, their mean reported "
                    "(rows without llama.cpp)")
    ap.add_argument("--rounds", type=int, default=5, help="batch 1 with llama.cpp: alternating rounds of one "
                    "llama-bench run and one dsv4c run, medians reported")
    args = ap.parse_args()
    llama = llama_cpp_tree(args.llama_cpp)
    torch.set_num_threads(args.threads)
    from dsv4c.graphs.transformers_oracle import load_transformers_model
    from dsv4c.runtime import Engine

    batches = [int(b) for b in args.batches.split(",")]
    bandwidth = copy_bandwidth()
    rows, notes = [], []
    for preset in args.presets.split(","):
        artifact = build(preset, max(batches), args.out)
        engine = Engine.load(artifact, threads=args.threads)
        checkpoint = Path(engine.manifest.data["inputs"]["checkpoint"])
        hf = load_transformers_model(checkpoint)
        kernels = engine.manifest.engine.get("kernels", {}).get("implementation", "?")
        gguf = convert_gguf(llama[0], checkpoint, args.out, args.llama_cpp_python) \
            if llama is not None and 1 in batches else None
        for batch in batches:
            rng = np.random.default_rng(0)
            prompts = rng.integers(2, engine.vocab_size, (batch, args.prompt)).astype(np.int64)
            lp = ld = ratio = None
            if batch == 1 and gguf is not None:
                try:
                    e_pre, e_dec, lp, ld, ratio, info = interleaved(engine, prompts, llama[1], gguf, args)
                    notes.append(f"{preset}: llama.cpp {info}, {gguf.name} ({gguf.stat().st_size / 1e6:.1f} MB)")
                except RuntimeError as e:
                    notes.append(f"{preset}: llama.cpp failed: {e}")
            if ld is None:
                e_pre, e_dec = time_engine_mean(engine, prompts, args.steps, args.reps)
            h_pre, h_dec = time_transformers(hf, prompts, args.steps)
            context = args.prompt + args.steps // 2  # the timed steps' mean context
            bound = batch * bandwidth / decode_bytes(hf_config_of(engine), batch, engine.cache_slots, context)
            rows.append((preset, kernels, batch, batch * args.prompt / e_pre, lp, batch * args.prompt / h_pre,
                         batch / e_dec, ld, batch / h_dec, h_dec / e_dec, ratio, bound))
    paired = f"; batch 1 beside llama.cpp: medians of {args.rounds} alternating rounds" if llama is not None else ""
    print(f"\nthreads {args.threads}, prompt {args.prompt}, decode steps {args.steps}, dsv4c the mean of {args.reps} "
          f"runs after a warm-up{paired}, copy bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    head = ("preset", "kernels", "batch", "prefill tok/s", "llama.cpp prefill tok/s", "hf prefill tok/s",
            "decode tok/s", "llama.cpp decode tok/s", "hf decode tok/s", "decode speedup", "vs llama.cpp",
            "bandwidth bound tok/s", "of bound")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))

    def opt(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in rows:
        print(f"{r[0]} | {r[1]} | {r[2]} | {r[3]:.0f} | {opt(r[4], '.0f')} | {r[5]:.0f} | {r[6]:.1f} | "
              f"{opt(r[7], '.1f')} | {r[8]:.1f} | {r[9]:.2f}x | {opt(r[10], '.2f')}{'' if r[10] is None else 'x'} | "
              f"{r[11]:.0f} | {100 * r[6] / r[11]:.0f} %")
    for n in notes:
        print(f"\n{n}")


def hf_config_of(engine):
    from dsv4c.graphs.config import ModelConfig

    return ModelConfig.from_json_file(engine.root / "config.json")


if __name__ == "__main__":
    main()
