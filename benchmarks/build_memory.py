"""Build memory and disk against depth: the table of issue 13's "Done when", as far as today's code goes.

For one model shape (`bench_config`, defined below: mini-1b's 1024-wide layers, an 8k vocabulary, CSA and HCA
layers alternating, so every added pair of layers is the same ~120 MB on disk) at 2, 4 and 8 layers it

  1. writes an official-format synthetic checkpoint (in a subprocess: the writer's own peak RSS is reported too),
  2. builds it for the CPU target with `dsv4c build --events json` in a subprocess with a fresh stage cache,
     sampling that process's RSS (/proc/PID/status VmRSS every 20 ms; the exact peak from wait4's ru_maxrss) and
     splitting the samples by stage with the stage events (a stage's window ends at its event; quantize and
     export run inside lower and report when they finish),
  3. counts the bytes of checkpoint, artifact, and stage cache + artifact (a hard-linked file counted once, and as
     `ls` would count it),
  4. loads the engine in a fresh subprocess and runs the workload `dsv4c plan` sizes a device for (max batch,
     one full prefill chunk each, then decode): its peak RSS growth, and its growth after the run, against
     `dsv4c plan`'s per-device figure for the same recipe (the recipe's formats, and this dsv4c's engine); and
     that peak with the embedding pages the workload's prompts did not read (/proc/self/pagemap), which `plan`
     counts (a server's prompts come to read every row).

and prints one table with issue 13's measured baseline beside it, then the 8-layer build's peak RSS per stage.

    python benchmarks/build_memory.py                     # 2,4,8 layers in a temp dir, removed afterwards
    python benchmarks/build_memory.py --layers 2,8 --dir /tmp/bm --keep

Linux only (/proc, wait4). About 10 minutes on 2 cores. No test asserts these figures; they are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MB = 1e6
ROOT = Path(__file__).resolve().parents[1]
# issue 13, measured before any of its work: two official-format checkpoints of identical 1024-wide layers
BASELINE = {2: "1.23 GB", 8: "2.69 GB"}
BASELINE_NOTE = "issue 13 baseline: peak RSS 1.23 GB at 2 layers, 2.69 GB at 8 (+243 MB per 60 MB layer); " \
                "artifact 1.10x the checkpoint"
RUNTIME = {"max_batch_size": 2, "max_seq_len": 1024}  # the validation prompts (516 + 504 tokens) fit


VOCAB = 8192
REUSE_CHECKPOINTS = False  # --reuse-checkpoints: a checkpoint left in --dir by an earlier run is built again


def flash_config():
    """V4-Flash's exact per-layer shapes (hidden 4096, 64 heads x 512, q_lora 1024, 256 experts x 2048, the real
    vocabulary) at 2 layers, a CSA (ratio 4, with its indexer) and an HCA (128) one, plus its MTP block."""
    from dsv4c.graphs.config import preset

    return preset("v4-flash").replace(num_hidden_layers=2, compress_ratios=(4, 128, 0), num_hash_layers=1).validate()


def bench_config(layers: int):
    """mini-1b's layer shapes (hidden 1024, 16 heads x 512, q/o LoRA 256, 48 experts x 512: ~60 MB a layer on
    disk) with `layers` layers alternating CSA (ratio 4) and HCA (128), one hash-routed layer at every depth,
    and an 8,192-token vocabulary: mini-1b's 129,280 puts ~1 GB of float32 embedding + head (and ~4 GB of
    build peak at 2 layers) in front of the per-layer growth this measures, and triples the validation time."""
    from dsv4c.graphs.config import preset

    if layers % 2:
        raise SystemExit(f"--layers: {layers} is odd; the layers come in CSA + HCA pairs")
    return preset("mini-1b").replace(num_hidden_layers=layers, compress_ratios=(4, 128) * (layers // 2) + (0,),
                                     num_hash_layers=1, vocab_size=VOCAB).validate()


# ---- subprocess entry points -------------------------------------------------------------------------------------
def write_checkpoint(layers: int, out: str) -> dict:
    """layers 0: the real-width Flash (`flash_config`)."""
    import resource

    from dsv4c.graphs.checkpoint import write_synthetic_checkpoint

    t0 = time.perf_counter()
    write_synthetic_checkpoint(out, bench_config(layers) if layers else flash_config(), seed=0)
    return {"seconds": time.perf_counter() - t0,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def engine_rss(artifact: str) -> dict:
    """The engine under the workload `dsv4c plan` sizes a device for: the recipe's max_batch_size sequences, one
    full prefill chunk each, then two decode steps; twice, as a server takes its next batch (the first prefill
    reaches its activations' peak before it has touched the later layers' weights). Its peak RSS growth (VmHWM)
    against the RSS before loading, and the growth after (anonymous and file pages: the engine's mapped
    weights)."""
    import numpy as np
    import onnxruntime  # noqa: F401  (imported before the baseline: the library is not the engine)

    from dsv4c.runtime import Engine
    from dsv4c.runtime.engine import PREFILL_CHUNK

    before = proc_status(os.getpid())
    eng = Engine.load(artifact)
    rng = np.random.default_rng(0)
    for _ in range(2):
        s = eng.session(eng.max_batch_size)
        logits = s.prefill(rng.integers(2, eng.vocab_size, (eng.max_batch_size, PREFILL_CHUNK)))
        for _ in range(2):
            logits = s.decode(np.asarray(logits).argmax(-1))
        del s
    after = proc_status(os.getpid())
    table, unread = unread_embedding(eng, Path(artifact) / "engine")
    return {k: after[k] - before[k] for k in ("VmRSS", "RssAnon", "RssFile")} | {
        "peak": after["VmHWM"] - before["VmRSS"], "batch": eng.max_batch_size, "tokens": PREFILL_CHUNK,
        "embedding": table, "embedding_unread": unread}


def unread_embedding(eng, engine_dir: Path) -> tuple[int, int]:
    """(bytes of the embedding table, bytes of its pages this process has not mapped in). The engine maps its
    weights file; a row is read from it, and its pages become resident, when a prompt first holds that token.
    `plan` counts the table whole (a server's prompts come to cover the vocabulary); this workload's 2 x 512
    random tokens read a few of its rows (0.8 % of 129,280 at the real vocabulary). Pages from /proc/self/pagemap
    (bit 63: present in this process's page table)."""
    import struct

    import onnx

    model = onnx.load(str(engine_dir / "decode.onnx"), load_external_data=False)
    init = next(i for i in model.graph.initializer if i.name == "model.embed")
    info = {e.key: e.value for e in init.external_data}
    (mapped,) = [m for m in eng.executor.mapped if Path(m.filename).name == info["location"]]
    start, size = mapped.ctypes.data + int(info.get("offset", 0)), int(info["length"])
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = start // page, (start + size - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = f.read((last - first + 1) * 8)
    present = sum(1 for (e,) in struct.iter_unpack("<Q", entries) if e >> 63)
    return size, max(0, size - present * page)


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def run_json(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.splitlines()[-1])


# ---- the build, sampled ------------------------------------------------------------------------------------------
def sampled_build(recipe: Path, out: Path, cache: Path) -> dict:
    """`dsv4c build` in a subprocess: its peak RSS (wait4) and, from 20 ms samples, the peak within each stage."""
    proc = subprocess.Popen([sys.executable, "-m", "dsv4c.compiler.cli", "build", str(recipe), "-o", str(out),
                             "--cache-dir", str(cache), "--events", "json"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, int, int]] = []
    events: list[tuple[float, dict]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                st = proc_status(proc.pid)
                samples.append((time.perf_counter(), st["VmRSS"], st["RssAnon"]))
            except (OSError, KeyError):  # exited (a zombie has no VmRSS)
                pass
            time.sleep(0.02)

    def read_events() -> None:
        for line in proc.stdout:
            try:
                events.append((time.perf_counter(), json.loads(line)))
            except json.JSONDecodeError:
                pass

    t0 = time.perf_counter()
    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read_events, daemon=True)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    for t in threads:
        t.join()
    stderr = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"dsv4c build {recipe} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    stages, start = {}, t0
    for t, e in events:
        if e.get("event") == "stage":
            window = [(rss, anon) for ts, rss, anon in samples if start <= ts <= t]
            stages[e["stage"]] = {"status": e["status"], "seconds": e["seconds"],
                                  "peak_rss": max((w[0] for w in window), default=0),
                                  "peak_anon": max((w[1] for w in window), default=0)}
            start = t
    # RSS counts the checkpoint's and the engine's mapped file pages as the build touches them (clean page cache
    # the kernel can drop); the anonymous part is what the build itself holds
    return {"peak_rss": usage.ru_maxrss * 1024, "peak_anon": max((a for _, _, a in samples), default=0),
            "seconds": time.perf_counter() - t0, "stages": stages,
            "notes": [e["message"] for _, e in events if e.get("event") == "note"]}


def tree_bytes(*roots: Path) -> tuple[int, int]:
    """(bytes counting each inode once, bytes counting every path) of the files under `roots`."""
    unique, apparent = {}, 0
    for root in roots:
        for f in root.rglob("*"):
            if f.is_file() and not f.is_symlink():
                st = f.stat()
                unique[(st.st_dev, st.st_ino)] = st.st_size
                apparent += st.st_size
    return sum(unique.values()), apparent


def measure(layers: int, work: Path) -> dict:
    """One depth of the bench shape; layers 0: the real-width 2-layer Flash."""
    import dsv4c

    tag = f"{layers}l" if layers else "flash-2l"
    ckpt, cache, out = work / f"ckpt-{tag}", work / f"cache-{tag}", work / f"artifact-{tag}"
    reuse = REUSE_CHECKPOINTS and (ckpt / "model.safetensors.index.json").is_file()
    written = {"seconds": 0.0, "peak_rss": 0} if reuse else run_json("--write-checkpoint", str(layers), str(ckpt))
    shutil.rmtree(cache, ignore_errors=True)  # a fresh stage cache: every stage runs
    shutil.rmtree(out, ignore_errors=True)
    recipe = work / f"bm-{tag}.yaml"
    recipe.write_text(json.dumps({"name": f"bm-{tag}", "model": {"checkpoint": str(ckpt)},
                                  "quantization": {"preset": "official"}, "target": {"kind": "cpu"},
                                  "runtime": RUNTIME}))
    built = sampled_build(recipe, out, cache)
    plan = dsv4c.plan(recipe)
    disk_unique, disk_apparent = tree_bytes(cache, out)
    from dsv4c.graphs.checkpoint import CheckpointReader

    sizes = CheckpointReader(ckpt).sizes()
    largest_layer = max(sum(v for k, v in sizes.items() if k.startswith(p + "."))
                        for p in {".".join(k.split(".")[:2]) for k in sizes if k.startswith(("layers.", "mtp."))})
    return {
        "layers": layers, "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")),
        "largest_layer_bytes": largest_layer,
        "write": written, "build": built, "artifact_bytes": tree_bytes(out)[1],
        "disk_unique": disk_unique, "disk_apparent": disk_apparent,
        # the checkpoint is the user's input, not the build's: what the build adds is cache + artifact
        "engine": run_json("--engine-rss", str(out)),
        "plan": {"per_device": plan.per_device_bytes,
                 "per_device_dsv4c_engine": max(s["total"] for s in plan.per_device["dsv4c_engine_stages"]),
                 "host_ram": plan.build["host_ram_peak_bytes"], "disk": plan.build["disk_peak_bytes"],
                 "artifact": plan.build["disk"]["artifact"]},
    }


def mb(n: float) -> str:
    return f"{n / MB:,.0f} MB"


def full_vocabulary(e: dict, p: dict) -> str:
    """The engine's peak with the embedding rows the workload did not read, which a server's prompts come to read
    and `plan` counts: the figure to hold against plan's."""
    if "embedding_unread" not in e:
        return "embedding pages not measured"
    full = e["peak"] + e["embedding_unread"]
    return (f"with the {mb(e['embedding_unread'])} of the {mb(e['embedding'])} embedding its prompts did not read "
            f"{mb(full)}, {full / p['per_device_dsv4c_engine']:.2f}x plan")


def report(rows: list[dict]) -> None:
    flash = [r for r in rows if r["layers"] == 0]
    rows = [r for r in rows if r["layers"]]
    head = ("layers", "checkpoint", "build peak RSS", "(anon)", "plan RAM", "baseline", "artifact", "artifact/ckpt",
            "cache+artifact disk", "(paths)", "plan disk", "engine peak", "(after)", "plan/device", "plan engine",
            "writer peak")
    table = [head]
    for r in rows:
        table.append((str(r["layers"]), mb(r["checkpoint_bytes"]), mb(r["build"]["peak_rss"]),
                      mb(r["build"]["peak_anon"]), mb(r["plan"]["host_ram"]), BASELINE.get(r["layers"], "-"),
                      mb(r["artifact_bytes"]),
                      f"{r['artifact_bytes'] / r['checkpoint_bytes']:.2f}x", mb(r["disk_unique"]),
                      mb(r["disk_apparent"]), mb(r["plan"]["disk"]),
                      mb(r["engine"]["peak"]), mb(r["engine"]["VmRSS"]), mb(r["plan"]["per_device"]),
                      mb(r["plan"]["per_device_dsv4c_engine"]),
                      mb(r["write"]["peak_rss"]) if r["write"]["peak_rss"] else "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print(BASELINE_NOTE)
    for r in flash:
        limit = r["largest_layer_bytes"] + 4 * 2**30
        b, p = r["build"], r["plan"]
        print(f"\nreal-width V4-Flash, 2 layers + MTP ({mb(r['checkpoint_bytes'])} checkpoint, largest layer "
              f"{mb(r['largest_layer_bytes'])}), built for the CPU target in {b['seconds']:.0f} s; synthetic writer "
              f"peak {mb(r['write']['peak_rss']) if r['write']['peak_rss'] else 'not measured (reused)'}:")
        print(f"  build peak RSS {mb(b['peak_rss'])} (anonymous {mb(b['peak_anon'])}) against one layer + 4 GiB = "
              f"{mb(limit)}: {'within' if b['peak_rss'] <= limit else 'OVER'}")
        for what, got, planned in (("peak RSS", b["peak_rss"], p["host_ram"]), ("disk", r["disk_unique"], p["disk"]),
                                   ("artifact", r["artifact_bytes"], p["artifact"])):
            print(f"  plan's {what}: {mb(planned)} against {mb(got)} measured ({planned / got - 1:+.1%})")
        e = r["engine"]
        print(f"  engine peak RSS {mb(e['peak'])} ({e['batch']} x {e['tokens']} tokens of prefill, then decode), "
              f"{mb(e['VmRSS'])} after (anonymous {mb(e['RssAnon'])}); plan per device "
              f"{mb(p['per_device_dsv4c_engine'])} (peak {e['peak'] / p['per_device_dsv4c_engine']:.2f}x; "
              f"{full_vocabulary(e, p)})")
        for stage, st in b["stages"].items():
            print(f"  {stage:>9} {st['status']:>7} {st['seconds']:7.1f} s  {mb(st['peak_rss']):>10} "
                  f"(anon {mb(st['peak_anon'])})")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        per_layer = (b["build"]["peak_rss"] - a["build"]["peak_rss"]) / (b["layers"] - a["layers"])
        layer_disk = (b["checkpoint_bytes"] - a["checkpoint_bytes"]) / (b["layers"] - a["layers"])
        print(f"build peak RSS grows {mb(per_layer)} per {mb(layer_disk)} layer; "
              f"{b['layers']} vs {a['layers']} layers: {b['build']['peak_rss'] / a['build']['peak_rss']:.2f}x "
              f"(issue 13's goal: flat within 25 %, i.e. <= 1.25x)")
    if not rows:  # `--layers "" --flash`: the real-width build only, reported above
        return
    deep = rows[-1]
    print(f"\npeak RSS per stage, {deep['layers']} layers (20 ms samples; quantize and export run inside lower):")
    for stage, s in deep["build"]["stages"].items():
        print(f"  {stage:>9} {s['status']:>7} {s['seconds']:7.1f} s  {mb(s['peak_rss']):>10} (anon "
              f"{mb(s['peak_anon'])})")
    for r in rows:
        if r["build"]["notes"]:
            print(f"notes ({r['layers']} layers): " + " | ".join(r["build"]["notes"]))
        e = r["engine"]
        print(f"engine, {r['layers']} layers, {e['batch']} x {e['tokens']} tokens of prefill then decode: peak RSS "
              f"{mb(e['peak'])} ({e['peak'] / r['plan']['per_device_dsv4c_engine']:.2f}x plan; "
              f"{full_vocabulary(e, r['plan'])}), after "
              f"{mb(e['VmRSS'])} (anonymous {mb(e['RssAnon'])}, file pages {mb(e['RssFile'])}); plan: "
              f"{mb(r['plan']['per_device'])} in the recipe's formats, "
              f"{mb(r['plan']['per_device_dsv4c_engine'])} for today's engine; plan host RAM "
              f"{mb(r['plan']['host_ram'])}, disk {mb(r['plan']['disk'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="2,4,8", help="comma-separated depths (even)")
    ap.add_argument("--dir", help="work directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints, caches and artifacts")
    ap.add_argument("--flash", action="store_true", help="also build the real-width 2-layer V4-Flash (~11 GB of "
                    "checkpoint, ~30 GB of disk in all, about an hour on 2 cores)")
    ap.add_argument("--json", help="also write the measurements to this file")
    ap.add_argument("--reuse-checkpoints", action="store_true", help="build the checkpoints an earlier run left "
                    "in --dir instead of writing them again (the writer's peak is then not measured)")
    ap.add_argument("--write-checkpoint", nargs=2, metavar=("LAYERS", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--engine-rss", metavar="ARTIFACT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_checkpoint:
        print(json.dumps(write_checkpoint(int(args.write_checkpoint[0]), args.write_checkpoint[1])))
        return
    if args.engine_rss:
        print(json.dumps(engine_rss(args.engine_rss)))
        return
    global REUSE_CHECKPOINTS
    REUSE_CHECKPOINTS = args.reuse_checkpoints
    layers = [int(x) for x in args.layers.split(",") if x]
    for n in layers:
        bench_config(n)  # an odd depth is refused before minutes of work
    layers += [0] if args.flash else []
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="dsv4c-build-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in layers:
            t0 = time.perf_counter()
            rows.append(measure(n, work))
            print(f"[{n or 'flash 2'} layers measured in {time.perf_counter() - t0:.0f} s]", file=sys.stderr,
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    report(rows)


if __name__ == "__main__":
    main()
