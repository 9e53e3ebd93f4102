"""CPU engine throughput next to transformers' DeepseekV4ForCausalLM on the same checkpoint, in one run.

    python benchmarks/decode_cpu.py                     # tiny and mini-1b (~0.9B, real per-head shapes)
    python benchmarks/decode_cpu.py --presets tiny --batches 1,8 --prompt 64 --steps 16

For each preset the artifact is built with `dsv4c build` (stage cache: DSV4C_CACHE_DIR), then, at each batch size,
prefill (equal-length prompts, so transformers can batch them) and greedy decode are timed on both. The last
column is the memory-bandwidth bound of decode: tokens/s if every step only streamed the weights it must read
(dense weights + the routed experts a batch of that size touches, packed as stored) at this machine's measured
copy bandwidth.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"tiny": "recipes/tiny-cpu.yaml", "mini-1b": "recipes/flash-cpu-mini.yaml"}


def build(preset: str, max_batch: int, out_root: Path) -> Path:
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


def decode_bytes(cfg, batch: int) -> float:
    """Weight bytes one decode step must read: everything except the routed experts (embedding: one row per
    token) plus the expected number of distinct routed experts `batch` tokens select per layer."""
    from dsv4c.graphs.checkpoint import expected_tensors

    dense, expert = 0, 0
    for name, spec in expected_tensors(cfg).items():
        if name.startswith("mtp."):
            continue  # the MTP block is not run by plain decode
        if ".ffn.experts." in name:
            expert += spec.nbytes
        elif name == "embed.weight":
            dense += batch * spec.nbytes / spec.shape[0]
        else:
            dense += spec.nbytes
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = e * (1 - (1 - k / e) ** batch)
    return dense + expert * touched / e


def time_engine(engine, prompts: np.ndarray, steps: int) -> tuple[float, float]:
    session = engine.session(len(prompts))
    t0 = time.perf_counter()
    logits = session.prefill(prompts)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = session.decode(logits.argmax(-1))
    return prefill, (time.perf_counter() - t0) / steps


def time_transformers(model, prompts: np.ndarray, steps: int) -> tuple[float, float]:
    with torch.no_grad():
        ids = torch.from_numpy(prompts)
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - t0
        cache, nxt, pos = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), prompts.shape[1]
        t0 = time.perf_counter()
        for i in range(steps):
            out = model(nxt, past_key_values=cache, position_ids=torch.full_like(nxt, pos + i), use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return prefill, (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,mini-1b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dsv4c.graphs.transformers_oracle import load_transformers_model
    from dsv4c.runtime import Engine

    batches = [int(b) for b in args.batches.split(",")]
    bandwidth = copy_bandwidth()
    rows = []
    for preset in args.presets.split(","):
        artifact = build(preset, max(batches), args.out)
        engine = Engine.load(artifact, threads=args.threads)
        checkpoint = Path(engine.manifest.data["inputs"]["checkpoint"])
        hf = load_transformers_model(checkpoint)
        kernels = engine.manifest.engine.get("kernels", {}).get("implementation", "?")
        for batch in batches:
            rng = np.random.default_rng(0)
            prompts = rng.integers(2, engine.vocab_size, (batch, args.prompt)).astype(np.int64)
            e_pre, e_dec = time_engine(engine, prompts, args.steps)
            h_pre, h_dec = time_transformers(hf, prompts, args.steps)
            bound = batch * bandwidth / decode_bytes(hf_config_of(engine), batch)
            rows.append((preset, kernels, batch, batch * args.prompt / e_pre, batch * args.prompt / h_pre,
                         batch / e_dec, batch / h_dec, h_dec / e_dec, bound))
    print(f"\nthreads {args.threads}, prompt {args.prompt}, decode steps {args.steps}, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    head = ("preset", "kernels", "batch", "prefill tok/s", "hf prefill tok/s", "decode tok/s", "hf decode tok/s",
            "decode speedup", "bandwidth bound tok/s")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(f"{r[0]} | {r[1]} | {r[2]} | {r[3]:.0f} | {r[4]:.0f} | {r[5]:.1f} | {r[6]:.1f} | {r[7]:.2f}x | {r[8]:.0f}")


def hf_config_of(engine):
    from dsv4c.graphs.config import ModelConfig

    return ModelConfig.from_json_file(engine.root / "config.json")


if __name__ == "__main__":
    main()
