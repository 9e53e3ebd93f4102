"""The TensorRT bundle on a GPU without TensorRT (torch executor + Triton plugin kernels) beside torch eager of
the same graph, with the HBM bandwidth bound, in one run.

    python benchmarks/gpu_decode.py                          # mini-1b on cuda, batch 1 and 16
    python benchmarks/gpu_decode.py --presets tiny --device cpu --steps 2 --prompt 16   # smoke run, no GPU

Per preset: `dsv4c build <recipe> --set target.kind=tensorrt ... --until lower` writes the bundle (stage cache:
DSV4C_CACHE_DIR); `Engine.load(bundle, device=...)` runs it; the eager baseline is dsv4c's PyTorch model
(graphs/model.py, the ops' torch references) on the same device with the same checkpoint. Prefill is timed on
equal-length prompts, decode as greedy steps. The bound is decode tokens/s if a step only streamed the weights it
must read in their shipped formats (dense + the routed experts the batch touches) at the measured device copy
bandwidth. The 2-layer V4-Flash-shaped model of issue #18 needs a build that streams weights (issue #13): today's
lower stage holds the whole model as float32.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from decode_cpu import decode_bytes, time_engine  # noqa: E402  (shared with the CPU table)

RECIPES = {"tiny": "recipes/tiny-tensorrt.yaml", "mini-1b": "recipes/flash-cpu-mini.yaml"}
TRT_TARGET = ["target.kind=tensorrt", "target.arch=sm_90", "target.device=H100",
              "quantization.on_unsupported=fallback", "quantization.fallback.experts=fp8"]


def build_bundle(preset: str, max_batch: int, out_root: Path) -> Path:
    out = out_root / f"{preset}-trt"
    sets = [f"runtime.max_batch_size={max_batch}"] + (TRT_TARGET if preset != "tiny" else [])
    cmd = [sys.executable, "-m", "dsv4c.compiler.cli", "build", RECIPES[preset], "-o", str(out), "--events", "quiet",
           "--until", "lower", *[a for s in sets for a in ("--set", s)]]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of 5."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = max(best, 2 * nbytes / (time.perf_counter() - t0))
    return best


@torch.no_grad()
def time_eager(model, prompts: np.ndarray, steps: int, max_seq_len: int, device: str) -> tuple[float, float]:
    b, n = prompts.shape
    cache = tuple(c.to(device) for c in model.new_cache(b, max_seq_len))
    tokens = torch.from_numpy(prompts).to(device)
    zeros, lengths = torch.zeros(b, dtype=torch.long, device=device), torch.full((b,), n, device=device)
    sync(device)
    t0 = time.perf_counter()
    logits, cache = model(tokens, zeros, lengths, cache)
    sync(device)
    prefill = time.perf_counter() - t0
    pos, one = lengths.clone(), torch.ones(b, dtype=torch.long, device=device)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, cache = model(logits.argmax(-1)[:, None], pos, one, cache)
        pos += 1
    sync(device)
    return prefill, (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="mini-1b")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench-gpu")
    args = ap.parse_args()
    from dsv4c.graphs.checkpoint import CheckpointReader
    from dsv4c.graphs.config import ModelConfig
    from dsv4c.graphs.model import Numerics, load_checkpoint_model
    from dsv4c.runtime import Engine

    batches = [int(b) for b in args.batches.split(",")]
    bandwidth = copy_bandwidth(args.device, 1 << (30 if args.device == "cuda" else 26))
    rows = []
    for preset in args.presets.split(","):
        bundle = build_bundle(preset, max(batches), args.out)
        engine = Engine.load(bundle, device=args.device)
        cfg = ModelConfig.from_json_file(bundle / "config.json")
        checkpoint = Path(engine.manifest.data["inputs"]["checkpoint"])
        eager = load_checkpoint_model(CheckpointReader(checkpoint), Numerics.reference(), "fp8").to(args.device)
        for batch in batches:
            prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, (batch, args.prompt)).astype(np.int64)
            e_pre, e_dec = time_engine(engine, prompts, args.steps, lambda: sync(args.device))
            t_pre, t_dec = time_eager(eager, prompts, args.steps, engine.max_seq_len, args.device)
            bound = batch * bandwidth / decode_bytes(cfg, batch, engine.cache_slots, args.prompt + args.steps // 2)
            rows.append((preset, batch, batch * args.prompt / e_pre, batch * args.prompt / t_pre, batch / e_dec,
                         batch / t_dec, bound))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{name}, prompt {args.prompt}, decode steps {args.steps}, copy bandwidth {bandwidth / 1e9:.0f} GB/s\n")
    head = ("preset", "batch", "prefill tok/s (Triton)", "prefill tok/s (eager)", "decode tok/s (Triton)",
            "decode tok/s (eager)", "HBM bound tok/s")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(f"{r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.0f}")


if __name__ == "__main__":
    main()
