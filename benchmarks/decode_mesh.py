"""Decode throughput of the tiny model as one process and as multi-device meshes on this host, in one run.

    python benchmarks/decode_mesh.py                      # 1, 2 (TP 2 x EP 2) and 4 (TP 2 x EP 2 x data 2) processes
    python benchmarks/decode_mesh.py --steps 32 --batch 1 --threads 2

Each artifact is built with `dsv4c.build` (stage cache: DSV4C_CACHE_DIR) from recipes/tiny-cpu.yaml and
recipes/tiny-cpu-tp2.yaml (+ `--set` for 4 processes), then greedy decode after a 64-token prompt is timed with
`threads` split between the processes. On a 2-core machine more processes are slower: the tiny model's step is
dominated by per-step overhead and every collective is a round trip between processes that share the cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
CASES = {1: ("tiny-cpu.yaml", ()), 2: ("tiny-cpu-tp2.yaml", ()),
         4: ("tiny-cpu-tp2.yaml", ("target.devices_per_node=4", "target.parallel.data=2"))}


def decode_rate(artifact: Path, batch: int, prompt: int, steps: int, threads: int) -> float:
    from dsv4c.runtime import Engine

    with Engine.load(artifact, threads=threads) as engine:
        s = engine.session(batch)
        logits = s.prefill([list(range(5, 5 + prompt))] * batch)
        nxt = logits.argmax(-1)
        logits = s.decode(nxt)  # first step outside the timing (allocations, thread pools)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = s.decode(logits.argmax(-1))
        return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    import dsv4c

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench-mesh")
    args = parser.parse_args()
    print(f"{'processes':>9}  {'decode tok/s':>12}")
    for n in (int(p) for p in args.processes.split(",")):
        recipe, overrides = CASES[n]
        artifact = dsv4c.build(ROOT / "recipes" / recipe, args.out / f"p{n}", overrides)
        rate = decode_rate(artifact, args.batch, args.prompt, args.steps, args.threads)
        print(f"{n:>9}  {rate:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
