"""Peak memory of reading an official-format checkpoint layer by layer, as the build does.

Writes a synthetic checkpoint of a real-layout model (default `rss-bench`, defined below: the real per-head
shapes and vocabulary, 16 layers whose weights outweigh the embedding/head), then reads it in a fresh
subprocess with CheckpointReader.read_globals() + iter_layers(), and samples /proc/self/status meanwhile:
RssAnon (tensors the reader handed out or keeps) and RssFile (shard pages mapped by safetensors). The claim
under test: the reader never holds more than one layer plus the embedding/head.

    python benchmarks/checkpoint_rss.py                      # rss-bench in a temp dir, removed afterwards
    python benchmarks/checkpoint_rss.py --preset mini-1b --dir /tmp/mini1b --keep

Linux only (/proc). No test asserts these figures; they are reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MB = 1 << 20


def bench_config():
    from dsv4c.graphs.config import preset

    # mini-1b's shapes (head_dim 512, rope 64, window 128, vocab 129280, CSA/HCA 4/128) with 16 layers of
    # 64 experts x 1024: each layer ~120 MB on disk, 16 of them ~1.9 GB, next to 0.53 GB of embedding + head.
    return preset("mini-1b").replace(
        num_hidden_layers=16, compress_ratios=(0, 0) + (4, 128) * 7 + (0,), n_routed_experts=64,
        moe_intermediate_size=1024)


def proc_status() -> dict[str, int]:
    """RSS parts of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Peak RssAnon / RssFile / VmRSS, sampled every millisecond (VmHWM only tracks their sum)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.running = True

    def run(self):
        while self.running:
            s = proc_status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s[k])
            time.sleep(0.001)


def measure(path: str, drop_each_layer: bool) -> dict:
    """Runs in the subprocess: read the checkpoint as the build does, report memory per layer."""
    import torch  # noqa: F401  (imported before the baseline: its own footprint is not the reader's)

    from dsv4c.graphs.checkpoint import CheckpointReader, global_tensors, layer_tensors, layer_prefixes, \
        mtp_extra_tensors

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def consume(tensors) -> None:
        """Touch every page, as loading them into a model does (safetensors hands out lazily paged views).
        One byte per 4 KiB: summing all bytes would upcast to int64 and measure that temporary instead."""
        for t in tensors.values():
            t.reshape(-1).view(torch.uint8)[::4096].sum()

    reader = CheckpointReader(path)
    cfg = reader.config
    baseline = proc_status()
    sampler = Sampler()
    sampler.start()
    globals_ = reader.read_globals()
    consume(globals_)
    rows = []
    for prefix, tensors in reader.iter_layers():
        consume(tensors)
        rows.append({"layer": prefix, "bytes": nbytes(tensors), **{k: v - baseline.get(k, 0)
                                                                   for k, v in proc_status().items()}})
        if drop_each_layer:
            del tensors  # otherwise the loop variable keeps this layer alive while the next one is read
    sampler.running = False
    sampler.join()
    layer_sizes = []
    for p, layer in layer_prefixes(cfg):
        specs = layer_tensors(cfg, p, layer)
        if p.startswith("mtp."):
            specs.update(mtp_extra_tensors(cfg, p))
        layer_sizes.append(sum(s.nbytes for s in specs.values()))
    return {"rows": rows, "globals_bytes": nbytes(globals_), "max_layer_bytes": max(layer_sizes),
            "total_bytes": sum(s.nbytes for s in global_tensors(cfg).values()) + sum(layer_sizes),
            "peak": {k: v - baseline[k] for k, v in sampler.peak.items()},
            "hwm": proc_status()["VmHWM"] - baseline["VmRSS"]}


def run_subprocess(path: Path, drop_each_layer: bool) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import checkpoint_rss as b; "
            f"print(json.dumps(b.measure({str(path)!r}, {drop_each_layer})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(result: dict, title: str) -> None:
    g, layer = result["globals_bytes"], result["max_layer_bytes"]
    print(f"\n{title}")
    print(f"{'layer':<12}{'layer MB':>10}{'RSS MB':>10}{'anon MB':>10}{'file MB':>10}   (after reading it, over the "
          f"baseline)")
    for r in result["rows"]:
        print(f"{r['layer']:<12}{r['bytes'] / MB:>10.1f}{r['VmRSS'] / MB:>10.1f}{r['RssAnon'] / MB:>10.1f}"
              f"{r['RssFile'] / MB:>10.1f}")
    p = result["peak"]
    print(f"checkpoint {result['total_bytes'] / MB:.0f} MB; embedding+head+globals {g / MB:.0f} MB; largest layer "
          f"{layer / MB:.1f} MB; one layer + globals = {(g + layer) / MB:.0f} MB")
    print(f"peak over baseline: RSS {p['VmRSS'] / MB:.0f} MB (VmHWM {result['hwm'] / MB:.0f} MB; peaks of the parts: "
          f"anon {p['RssAnon'] / MB:.0f} MB, file-backed {p['RssFile'] / MB:.0f} MB) = "
          f"{(p['VmRSS'] - g) / layer:.2f} layers + globals")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="rss-bench", help="rss-bench (defined here) or a dsv4c preset name")
    ap.add_argument("--dir", help="checkpoint directory (written if it holds none)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint written in a temp dir")
    ap.add_argument("--shard-mb", type=int, default=256, help="shard size when writing (default 256 MB)")
    args = ap.parse_args()

    from dsv4c.graphs.checkpoint import write_synthetic_checkpoint
    from dsv4c.graphs.config import preset

    cfg = bench_config() if args.preset == "rss-bench" else preset(args.preset)
    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="dsv4c-rss-", dir="/tmp")
    path = Path(args.dir or tmp.name) / "checkpoint"
    try:
        if not (path / "model.safetensors.index.json").is_file():
            t = time.time()
            write_synthetic_checkpoint(path, cfg, seed=0, shard_bytes=args.shard_mb * MB)
            print(f"wrote {args.preset} to {path} in {time.time() - t:.0f} s")
        for drop in (False, True):
            how = ("loop body deletes each layer's dict" if drop else
                   "plain `for _, tensors in reader.iter_layers()` (as stages.py does)")
            report(run_subprocess(path, drop), f"{args.preset}: read_globals() + iter_layers(), {how}")
    finally:
        if tmp is not None and not args.keep:
            tmp.cleanup()


if __name__ == "__main__":
    main()
