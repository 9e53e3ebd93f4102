"""`dsv4c plan RECIPE`: what a recipe's build and engine need, and whether the declared hardware holds it, before a
byte of weights is read.

Sources of every figure (nothing is loaded, no weights are needed):
  * weights: the official tensor list (`checkpoint.expected_tensors`, the spec §5.6 byte model that gives Flash's
    159,609,485,896 bytes exactly), each quantized linear re-expressed in the recipe's format for its group after
    the target's fallbacks (`FORMAT_BYTES`); plus what dsv4c's own engine holds (the model built on the meta device:
    bf16 tensors kept bf16, weight scales as the target stores them: e8m0 bytes on the CPU and TensorRT,
    float32 on CANN),
    reported beside it.
  * KV cache: the spec §4 layout per layer type (window ring, compressed CSA/HCA entries, indexer keys, compressor
    state) in the recipe's `kv_cache` / `indexer` formats, against a V3.2-style dense MLA cache of the same depth
    (and of V3.2's own 61 layers, the baseline of DeepSeek's "10 % / 7 % at 1M" claim); dsv4c's engine layout
    (`DeepseekV4.cache_spec`: the rows packed in the recipe's FP8 / FP4 formats, float32 compressor state) beside it.
  * activations and custom ops: one prefill chunk traced on the meta device through a model with one layer of
    each kind (transients live within a layer, so it peaks like the whole model): the peak bytes of the tensors
    the forward allocates, and the `dsv4::*` ops it calls, checked against what the target implements. dsv4c's
    engine column adds what the target's runtime allocates beyond that: its kernels' scratch
    (`Target.kernel_scratch`), the caches it holds twice (`Target.cache_copies`) and its sessions' own memory
    (`Target.session_state`: ONNX Runtime's per graph node on the CPU target; not modelled for the others).
  * per device (one rank of the mesh of dsv4c.graphs.parallel: world = tensor x data, pipeline 1): routed experts
    over `parallel.expert`, the tensor-parallel weights of spec §5.3 over `parallel.tensor` (the embedding and the
    head by vocabulary), everything else replicated (the shared expert, wq_a, wkv, compressors, gate, norms, hc);
    the single K=V head makes every rank hold the whole KV cache, and the data replicas of a tensor group run the
    same batch (they exist to spread the experts over more devices), so every rank holds the KV of all
    `max_batch_size` sequences. The dsv4c-graph figure is read off rank 0's own model (`DeepseekV4(shard=...)`).

`fits` when every device of the worst pipeline stage fits in (1 - RESERVE) of its memory and the target supports
the recipe's formats and the mesh's layout suits the model's shapes (else `problems` say what to change). What this
dsv4c cannot build yet (op kernels a target lacks; what a target's check refuses only for a mesh) is listed apart
as `build_blockers`. `feasible` = fits and nothing blocks the build: the verdict and the exit code (0, else 3),
with `hints` that lead to a build that works. A toolchain missing on this machine (`toolchain`) blocks nothing: the
bundle can be built here and finished where the toolchain is.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import weakref
from collections import defaultdict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4c.graphs.config import ModelConfig
from dsv4c.graphs.parallel import TENSOR_SPLIT, Shard, straddling_shards
from dsv4c.graphs.quant import FP8_BLOCK

GIB = 1 << 30
RESERVE = 0.10  # device memory kept free for the runtime: CUDA/CANN context, communication buffers, fragmentation
PREFILL_CHUNK = 256  # tokens per prefill call (dsv4c.runtime.engine.PREFILL_CHUNK): bounds activation memory
V32_LAYERS = 61  # DeepSeek-V3.2: 61 layers, each with an MLA cache (kv_lora_rank 512 + rope 64) and DSA indexer keys

# Device memory (GiB, as the vendor names it) per part. NVIDIA datasheets: H100 SXM 80 GB, H200 141 GB, H20 96 GB,
# H800 80 GB, HGX B200 1,440 GB / 8, HGX B300 2.3 TB / 8, GB200 NVL72 13.4 TB / 72. Huawei: Atlas 800T A2 (Ascend
# 910B) 64 GB per NPU; Ascend 950PR 128 GB HiBL 1.0 (950DT: 144 GB), as announced at Huawei Connect 2025 (reported,
# not a datasheet). `target.device_memory_gib` overrides any of these.
DEVICE_MEMORY_GIB = {"H100": 80, "H200": 141, "H20": 96, "H800": 80, "B200": 180, "B300": 288, "GB200": 186,
                     "Ascend910B": 64, "Ascend950": 128}
DEFAULT_DEVICE = {"sm_90": "H100", "sm_100": "B200"}  # the smallest common part of the SM when none is named

GROUPS = ("routed_experts", "shared_experts", "attention_dense", "indexer", "embedding_head", "mhc", "mtp")
GROUP_TITLES = {"routed_experts": "routed experts", "shared_experts": "shared experts",
                "attention_dense": "attention / dense", "indexer": "indexer", "embedding_head": "embedding / head",
                "mhc": "mHC", "mtp": "MTP (not in the engine)"}


# ---- weight formats ---------------------------------------------------------------------------------------------
def format_bytes(group: str, fmt: str, out: int, inp: int) -> int:
    """Bytes of one [out, inp] linear weight with its scales in `fmt`, as the format stores them."""
    n = out * inp
    if fmt == "fp4":  # e2m1 nibbles + one e8m0 scale per 1x32 (spec §5.2)
        return n // 2 + out * math.ceil(inp / 32)
    if fmt == "fp8":  # e4m3 + one e8m0 scale per 128x128 block (spec §5.2; convert.py's FP4->FP8 transcode, §5.3)
        return n + math.ceil(out / 128) * math.ceil(inp / 128)
    if fmt == "int8" and group == "experts":  # 2 x e2m1 exactly, f32 scale per 1x32 (cann/requant.fp4_to_int8)
        return n + 4 * out * math.ceil(inp / 32)
    if fmt == "int8":  # W8A8, f32 scale per output channel (cann/requant.int8_per_channel)
        return n + 4 * out
    if fmt == "int4":  # f32 scale per 1x32 (cann/requant.int4_per_group)
        return n // 2 + 4 * out * math.ceil(inp / 32)
    if fmt == "w4a16":  # assumed Marlin-style: int4 + bf16 scale per 1x128 group (no dsv4c target implements it)
        return n // 2 + 2 * out * math.ceil(inp / 128)
    if fmt == "bf16":
        return 2 * n
    raise ValueError(f"no byte model for {group} format {fmt!r}")


def group_of(name: str) -> str:
    """Module group of an official tensor name or a dsv4c model buffer name."""
    if name.startswith("mtp."):
        return "mtp"
    if ".ffn.experts." in name:
        return "routed_experts"
    if ".shared_experts." in name:
        return "shared_experts"
    if ".attn.indexer." in name:
        return "indexer"
    if ".hc_" in name or name.startswith(("hc_", "final.hc_")):
        return "mhc"
    if name.split(".")[0] in ("embed", "head", "norm") or name.startswith("final."):
        return "embedding_head"
    return "attention_dense"


def _place(name: str) -> tuple[int | str, bool]:
    """(where the tensor lives: layer index | "first" | "last" | "mtp", tensor-parallel sharded?)."""
    parts = name.split(".")
    if parts[0] == "layers":
        return int(parts[1]), any(name.endswith("." + s) for s in TENSOR_SPLIT)  # the split table of the mesh
    if parts[0] == "mtp":
        return "mtp", False
    if parts[0] == "embed":
        return "first", True
    return "last", parts[0] == "head"


def effective_formats(recipe, fallbacks: list[dict[str, str]]) -> dict[str, str]:
    """The recipe's format per quantization group, with the target's fallbacks applied."""
    formats = {g: getattr(recipe.quantization, g) for g in ("experts", "dense", "activations", "kv_cache", "indexer")}
    formats.update({f["group"]: f["to"] for f in fallbacks if f["group"] in formats})
    return formats


def weight_rows(cfg: ModelConfig, formats: dict[str, str]) -> list[dict[str, Any]]:
    """One row per official tensor (scales folded into their weight): group, place, params, shipped bytes, bytes
    in the recipe's formats."""
    from dsv4c.graphs.checkpoint import expected_tensors

    specs = expected_tensors(cfg)
    rows = []
    for name, spec in specs.items():
        if name.endswith(".scale"):
            continue  # counted with its weight
        scale = specs.get(f"{name[:-len('.weight')]}.scale") if name.endswith(".weight") else None
        group = group_of(name)
        shipped = spec.nbytes + (scale.nbytes if scale else 0)
        params = math.prod(spec.shape) * (2 if spec.dtype == torch.int8 else 1)  # int8 = two FP4 values
        nbytes = shipped
        if scale is not None:  # a quantized linear: re-expressed in its group's format
            out, inp = spec.shape[0], params // spec.shape[0]
            quant_group = "experts" if ".ffn.experts." in name else "dense"  # MTP's experts too
            nbytes = format_bytes(quant_group, formats[quant_group], out, inp)
        where, tp = _place(name)
        rows.append({"group": group, "where": where, "tp": tp, "params": params, "shipped": shipped,
                     "bytes": nbytes})
    return rows


WEIGHT_SCALE = re.compile(r"(\.scale|\.w[123]_scale)$")  # the quantized linears' block scales (graphs.model)


def graph_rows(model: torch.nn.Module, scale_bytes: int = 4) -> list[dict[str, Any]]:
    """What dsv4c's engine holds: the persistent buffers of the meta-device model, as the exported programs keep
    them (packed FP8/FP4 bits as uint8, bf16 tensors as bf16), the weight scales in `scale_bytes` each (the
    target's `scale_bytes`: 1 where it stores the checkpoint's e8m0 bytes, 4 for float32)."""
    rows = []
    for name, t in model.state_dict().items():
        where, tp = _place(name)
        size = scale_bytes if WEIGHT_SCALE.search(name) else t.element_size()
        rows.append({"group": group_of(name), "where": where, "tp": tp, "bytes": t.numel() * size})
    return rows


# ---- KV cache ---------------------------------------------------------------------------------------------------
def kv_entry_bytes(cfg: ModelConfig, fmt: str) -> int:
    """One main KV row (window or compressed entry) of head_dim values."""
    d, rope = cfg.head_dim, cfg.qk_rope_head_dim
    if fmt == "fp8":  # spec §4.2: e4m3 nope dims + bf16 RoPE dims + one e8m0 scale per 64 nope dims, 8-byte aligned
        raw = (d - rope) + 2 * rope + (d - rope) // 64
        return -(-raw // 8) * 8
    return 2 * d  # bf16, the reference's storage dtype (spec §4.1)


def indexer_entry_bytes(cfg: ModelConfig, fmt: str) -> int:
    di = cfg.index_head_dim
    return di // 2 + di // 32 if fmt == "fp4" else 2 * di  # e2m1 + e8m0 per 32 | bf16


def kv_layer_types(cfg: ModelConfig, formats: dict[str, str], max_seq_len: int) -> list[dict[str, Any]]:
    """Per layer type of the main model (the engine runs no MTP): fixed bytes per sequence (window ring, compressor
    state, fp32 as the reference keeps it), bytes per token of context, bytes per sequence at max_seq_len."""
    entry, idx = kv_entry_bytes(cfg, formats["kv_cache"]), indexer_entry_bytes(cfg, formats["indexer"])
    d, di, W = cfg.head_dim, cfg.index_head_dim, cfg.sliding_window
    counts: dict[int, int] = defaultdict(int)
    for ratio in cfg.compress_ratios[: cfg.num_hidden_layers]:
        counts[ratio] += 1
    out = []
    for ratio, n in sorted(counts.items()):
        kind = {0: "sliding_window", 4: "csa"}.get(ratio, "hca")
        c = 2 if ratio == 4 else 1
        fixed = {"window": W * entry}
        per_token = {}
        at_max = dict(fixed)
        if ratio:
            fixed["compressor_state"] = 2 * (c * ratio) * (c * d) * 4  # kv + score, f32
            per_token["compressed"] = entry / ratio
            at_max["compressor_state"] = fixed["compressor_state"]
            at_max["compressed"] = (max_seq_len // ratio) * entry
        if ratio == 4:
            fixed["indexer_state"] = 2 * 8 * (2 * di) * 4
            per_token["indexer"] = idx / 4
            at_max["indexer_state"] = fixed["indexer_state"]
            at_max["indexer"] = (max_seq_len // 4) * idx
        out.append({"type": kind, "ratio": ratio, "layers": n, "fixed_bytes_per_sequence": fixed,
                    "bytes_per_token": per_token, "bytes_per_token_total": sum(per_token.values()),
                    "bytes_at_max_seq_len": at_max, "bytes_at_max_seq_len_total": sum(at_max.values())})
    return out


def dense_mla_bytes_per_token(cfg: ModelConfig, fmt: str) -> int:
    """One layer of a V3.2-style dense MLA cache per token: latent (head_dim wide, V3.2's kv_lora_rank 512) + RoPE
    dims, plus V3.2's DSA indexer key. fp8: V3.2's packed layout (e4m3 latent + one f32 scale per 128 + bf16 RoPE
    = 656 B for 512+64, vLLM fp8_ds_mla; indexer e4m3 + one f32 scale = 132 B); bf16 otherwise."""
    d, rope, di = cfg.head_dim, cfg.qk_rope_head_dim, cfg.index_head_dim
    if fmt == "fp8":
        return (d + 4 * (d // 128) + 2 * rope) + (di + 4 * math.ceil(di / 128))
    return 2 * (d + rope) + 2 * di


def kv_cache_plan(cfg: ModelConfig, formats: dict[str, str], max_seq_len: int, engine_cache) -> dict[str, Any]:
    types = kv_layer_types(cfg, formats, max_seq_len)
    per_token = sum(t["layers"] * t["bytes_per_token_total"] for t in types)
    at_max = sum(t["layers"] * t["bytes_at_max_seq_len_total"] for t in types)
    one_m = 1 << 20
    at_1m = sum(t["layers"] * t["bytes_at_max_seq_len_total"] for t in kv_layer_types(cfg, formats, one_m))
    dense = dense_mla_bytes_per_token(cfg, formats["kv_cache"])
    L = cfg.num_hidden_layers
    baseline = {"layers": L, "bytes_per_token_per_layer": dense, "bytes_per_token": L * dense,
                "bytes_at_max_seq_len": L * dense * max_seq_len, "bytes_at_1m": L * dense * one_m}
    v32 = {"layers": V32_LAYERS, "bytes_at_1m": V32_LAYERS * dense * one_m}
    engine_at_max = sum(e.nbytes for e in engine_cache(max_seq_len))
    # growth per token between two lengths that every ratio divides, read off the engine's own layout
    step = math.lcm(4, *(r for r in cfg.compress_ratios if r))
    engine_bytes = [sum(e.nbytes for e in engine_cache(n * step)) for n in (1, 2)]
    engine_per_token = (engine_bytes[1] - engine_bytes[0]) / step
    return {
        "format": {"kv": formats["kv_cache"], "indexer": formats["indexer"], "compressor_state": "fp32"},
        "layer_types": types,
        "bytes_per_token": per_token,
        "bytes_at_max_seq_len": at_max,
        "dense_mla_baseline": baseline,
        "ratio_to_dense_at_max_seq_len": at_max / baseline["bytes_at_max_seq_len"],
        "at_1m": {"bytes": at_1m, "ratio_to_dense_same_depth": at_1m / baseline["bytes_at_1m"],
                  "ratio_to_v32_61_layers": at_1m / v32["bytes_at_1m"], "v32_bytes": v32["bytes_at_1m"]},
        "dsv4c_engine": {"bytes_per_token": engine_per_token, "bytes_at_max_seq_len": engine_at_max,
                         "dtype": str(engine_cache(1)[0].dtype).replace("torch.", "")},
    }


# ---- tracing one prefill chunk on the meta device ---------------------------------------------------------------
class _Trace(TorchDispatchMode):
    """Records the dsv4 ops a forward calls and every storage it allocates or frees, in order; with `scratch` (a
    target's kernel_scratch) also the memory the kernels hold beside them. The kernels keep their large scratch
    blocks for the next call until the chunk ends (the CPU library's block cache, ops.cc LargeBlocks; torch's
    caching allocator under the TensorRT JIT plugins), so the largest op's scratch so far stays allocated through
    everything after it: the trace holds the running maximum."""

    # A storage is keyed by `untyped_storage()._cdata` (its StorageImpl address): views share it, so a view is
    # not an allocation, and the storage is freed when the last tensor on it is (weakref finalizers count them).
    def __init__(self, external: list[torch.Tensor], scratch: Callable[[str, tuple], int] | None = None):
        super().__init__()
        self.external = {t.untyped_storage()._cdata for t in external}  # inputs and weights: not allocated here
        self.scratch = scratch
        self.ops: set[str] = set()
        self.events: list[tuple[int, int]] = []  # (allocation id, +bytes | -bytes)
        self.live: dict[int, list[int]] = {}  # storage -> [allocation id, bytes, live tensors on it]
        self.scratch_ids: set[int] = set()  # the kernels' scratch among the allocations
        self.scratch_held = 0
        self.next_id = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.name().split("::")[-1] if func.namespace == "dsv4" else None
        needs = self.scratch(op, tuple(args)) if op and self.scratch else 0
        if needs > self.scratch_held:  # live before the op writes its outputs, kept after
            self.next_id += 1
            self.scratch_ids.add(self.next_id)
            self.events.append((self.next_id, needs - self.scratch_held))
            self.scratch_held = needs
        out = func(*args, **(kwargs or {}))
        if op:
            self.ops.add(op)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key in self.external:
            return
        if key not in self.live:
            self.next_id += 1
            self.live[key] = [self.next_id, t.untyped_storage().nbytes(), 0]
            self.events.append((self.next_id, self.live[key][1]))
        self.live[key][2] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[2] -= 1
        if entry[2] == 0:
            self.events.append((entry[0], -entry[1]))
            del self.live[key]

    def allocation_id(self, t: torch.Tensor) -> int | None:
        entry = self.live.get(t.untyped_storage()._cdata)
        return entry[0] if entry else None

    def peak(self, exclude: set[int]) -> int:
        now = peak = 0
        for alloc, delta in self.events:
            if alloc not in exclude:
                now += delta
                peak = max(peak, now)
        return peak


def probe_config(cfg: ModelConfig) -> ModelConfig:
    """One layer of each kind the model has, a hash-routed one first when the model has any."""
    L = cfg.num_hidden_layers
    kinds = list(dict.fromkeys(cfg.compress_ratios[:L]))
    ratios = ([cfg.compress_ratios[0]] if cfg.num_hash_layers else []) + kinds
    return cfg.replace(num_hidden_layers=len(ratios), compress_ratios=tuple(ratios) + cfg.compress_ratios[L:],
                       num_hash_layers=min(cfg.num_hash_layers, 1))


def rank_config(cfg: ModelConfig, tensor: int) -> ModelConfig:
    """The attention heads one tensor-parallel rank computes (the activations it holds); the model itself when
    the heads do not divide (a layout problem reported elsewhere)."""
    from dsv4c.graphs.config import ConfigError

    heads = (cfg.num_attention_heads, cfg.o_groups, cfg.index_n_heads)
    if tensor == 1 or any(h % tensor for h in heads):
        return cfg
    try:
        return cfg.replace(num_attention_heads=heads[0] // tensor, o_groups=heads[1] // tensor,
                           index_n_heads=heads[2] // tensor)
    except ConfigError:  # a shard too small for the FP8 blocks (tiny models): size the whole model's activations
        return cfg


def trace_prefill(cfg: ModelConfig, numerics, expert_format: str, batch: int, seqlen: int,
                  max_seq_len: int, shard: Shard | None = None,
                  scratch: Callable[[str, tuple], int] | None = None) -> tuple[set[str], int, int]:
    """(dsv4 ops called, peak bytes of the tensors the forward allocates, the updated caches excluded: a serving
    engine writes them in place; the same peak with the memory the kernels hold, `scratch` being the target's
    kernel_scratch: _Trace) for one prefill chunk of `seqlen` tokens x `batch` sequences from position 0, on the
    rank `shard` of a mesh (its collectives and head-partial indexer scores among the ops) or, without one, on the
    whole model."""
    from dsv4c.graphs.model import DeepseekV4

    with torch.device("meta"):
        model = DeepseekV4(probe_config(cfg), numerics, expert_format=expert_format, shard=shard)
        cache = tuple(torch.empty(e.shape, dtype=e.dtype) for e in model.cache_spec(batch, max_seq_len))
        tokens = torch.zeros(batch, seqlen, dtype=torch.long)
        start, n_valid = torch.zeros(batch, dtype=torch.long), torch.full((batch,), seqlen, dtype=torch.long)
    trace = _Trace([*model.buffers(), *cache, tokens, start, n_valid], scratch)
    with torch.device("meta"), torch.no_grad(), trace:
        logits, new_cache = model(tokens, start, n_valid, cache)
    updated = {trace.allocation_id(c) for c in new_cache} - {None}
    return trace.ops, trace.peak(exclude=updated | trace.scratch_ids), trace.peak(exclude=updated)


# ---- devices ----------------------------------------------------------------------------------------------------
def device_capacity(target) -> tuple[str, float]:
    """(what the memory belongs to, GiB) for one device of the target."""
    if target.kind == "cpu":
        return "host RAM", host_ram_bytes() / GIB
    name = target.soc_version if target.kind == "cann" else (target.device or DEFAULT_DEVICE[target.arch])
    if target.device_memory_gib is not None:
        return f"{name} (target.device_memory_gib)", target.device_memory_gib
    assumed = " (assumed: set target.device)" if target.kind == "tensorrt" and target.device is None else ""
    return name + assumed, float(DEVICE_MEMORY_GIB[name])


def host_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def stage_ranges(num_layers: int, stages: int) -> list[range]:
    """Contiguous layer ranges, the first stages one layer longer when it does not divide."""
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for s in range(stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def per_device(rows: list[dict[str, Any]], key: str, kv_per_layer: list[int], workspace: int, recipe,
               stages: list[range], presplit: bool = False) -> list[dict[str, int]]:
    """Bytes per device of each pipeline stage: weights (routed experts / expert; the tensor-parallel ones, the
    embedding and the head / tensor; the rest replicated; `presplit`: the rows are already one rank's), the KV of
    its layers for every sequence of the batch (whole on every rank: one K=V head, and data replicas run the same
    batch), workspace."""
    p = recipe.target.parallel
    seqs = recipe.runtime.max_batch_size
    out = []
    for s, layers in enumerate(stages):
        mine = {"first"} if s == 0 else set()
        mine |= {"last"} if s == len(stages) - 1 else set()
        weights = 0
        for r in rows:
            if r["where"] in mine or (isinstance(r["where"], int) and r["where"] in layers):
                split = 1 if presplit else p.expert if r["group"] == "routed_experts" else (p.tensor if r["tp"] else 1)
                weights += math.ceil(r[key] / split)
        kv = seqs * sum(kv_per_layer[i] for i in layers)
        out.append({"stage": s, "layers": f"{layers.start}-{layers.stop - 1}", "weights": weights, "kv_cache": kv,
                    "workspace": workspace, "total": weights + kv + workspace})
    return out


def engine_overheads(formats: dict[str, int], engine: dict[str, int], scale_bytes: int, sessions: int) -> list[str]:
    """What dsv4c's engine holds beyond the recipe's formats on one device (per_device rows of both; `sessions`:
    the target's session_state, part of the engine's workspace)."""
    out = []
    if scale_bytes > 1 and engine["weights"] > formats["weights"]:
        out.append(f"weight scales stored as float32, not e8m0 bytes "
                   f"(+{(engine['weights'] - formats['weights']) / GIB:.1f} GiB)")
    if engine["kv_cache"] > formats["kv_cache"]:
        out.append(f"its runtime holds caches twice, a step writing beside the old values "
                   f"(+{(engine['kv_cache'] - formats['kv_cache']) / GIB:.1f} GiB)")
    scratch = engine["workspace"] - sessions - formats["workspace"]
    if scratch > 0:
        out.append(f"its kernels' scratch (+{scratch / GIB:.1f} GiB)")
    if sessions:
        out.append(f"its runtime's sessions (+{sessions / GIB:.2f} GiB)")
    return out


def layout_problems(cfg: ModelConfig, recipe) -> list[str]:
    """What the mesh cannot do with this model's shapes, before any weight is read: a pipeline (not implemented),
    degrees that do not divide what they shard, FP8 scale blocks a tensor-parallel shard would straddle."""
    p = recipe.target.parallel
    problems = [pipeline_problem(cfg, recipe)] if p.pipeline > 1 else []
    problems += divisibility_problems(cfg, p)
    problems += [f"target.parallel.tensor={p.tensor} splits FP8 scale blocks: {s}; choose a tensor degree whose "
                 f"shards are whole {FP8_BLOCK}-row blocks or lie inside one"
                 for s in straddling_shards(cfg, p.tensor)]
    return problems


def divisibility_problems(cfg: ModelConfig, p) -> list[str]:
    """Degrees that do not divide what they shard: heads, o-groups, index heads and vocabulary by tensor, routed
    experts by expert. (That expert divides the world, tensor * data, is a recipe rule: exit 2 before plan.)"""
    problems = []
    if cfg.n_routed_experts % p.expert:
        problems.append(f"target.parallel.expert={p.expert} does not divide n_routed_experts="
                        f"{cfg.n_routed_experts}; choose a divisor")
    has_csa = 4 in cfg.compress_ratios[:cfg.num_hidden_layers]
    for field in ("num_attention_heads", "o_groups", "vocab_size") + (("index_n_heads",) if has_csa else ()):
        if getattr(cfg, field) % p.tensor:
            problems.append(f"target.parallel.tensor={p.tensor} does not divide {field}={getattr(cfg, field)} "
                            "(tensor parallelism shards it); choose a divisor")
    return problems


def pipeline_problem(cfg: ModelConfig, recipe) -> str:
    """Pipeline stages are not implemented: the devices of the other stages become data replicas of one tensor
    group each, over which the routed experts are spread (the largest degree dividing the world and the experts)."""
    t, p = recipe.target, recipe.target.parallel
    world = t.world_size
    data = world // p.tensor
    expert = max(e for e in range(1, world + 1) if world % e == 0 and cfg.n_routed_experts % e == 0)
    return (f"target.parallel.pipeline={p.pipeline}: pipeline parallelism is not implemented in this dsv4c (its mesh "
            f"is world = tensor x data, every rank runs every layer); use the {world} devices as {data} data "
            f"replicas of tensor {p.tensor} with the routed experts over {expert} ranks: --set "
            f"'target.parallel={{tensor: {p.tensor}, expert: {expert}, pipeline: 1, data: {data}}}'")


def rank_shard(cfg: ModelConfig, recipe) -> Shard | None:
    """Rank 0's shard of the recipe's mesh (every rank holds the same bytes: the splits are even), or None for a
    single device or a layout `layout_problems` refuses."""
    p = recipe.target.parallel
    if p.tensor == p.expert == p.data == 1 or divisibility_problems(cfg, p) or straddling_shards(cfg, p.tensor):
        return None
    return Shard(rank=0, tensor=p.tensor, expert=p.expert, data=p.data)


def memory_problems(worst: dict[str, int], usable: float, what: str, recipe, kv_per_seq: float,
                    kv_growth: float, weights_total: int) -> list[str]:
    """What to change when the worst stage does not fit: which part overflows and the limit that would fit.
    kv_per_seq: that stage's KV bytes per sequence at max_seq_len; kv_growth: its bytes per token of context."""
    if worst["total"] <= usable:
        return []
    rt = recipe.runtime
    need = (f"needs {worst['total'] / GIB:.1f} GiB per device (stage {worst['stage']}: weights "
            f"{worst['weights'] / GIB:.1f} + KV cache {worst['kv_cache'] / GIB:.1f} + workspace "
            f"{worst['workspace'] / GIB:.1f} GiB), {what} has {usable / GIB:.1f} GiB usable "
            f"({1 - RESERVE:.0%} of {usable / (1 - RESERVE) / GIB:.0f} GiB)")
    fixes = []
    room_for_kv = usable - worst["weights"] - worst["workspace"]
    if room_for_kv <= 0:
        fixes.append(f"the weights alone do not fit: add devices (at least {math.ceil(weights_total / usable)} "
                     "of this memory hold the weights; set target.devices_per_node / target.nodes with "
                     "target.parallel.expert and .tensor over them) or use a smaller format for the experts")
    else:
        fit_seqs = int(room_for_kv // kv_per_seq) if kv_per_seq else 0
        if fit_seqs >= 1:
            fixes.append(f"lower runtime.max_batch_size to {fit_seqs} (from {rt.max_batch_size}: every rank holds "
                         "the KV cache of every sequence, one shared K=V head)")
        fixed = kv_per_seq - kv_growth * rt.max_seq_len  # window rings and compressor state
        fit_len = int((room_for_kv / rt.max_batch_size - fixed) // kv_growth) if kv_growth else 0
        if 0 < fit_len < rt.max_seq_len:
            fixes.append(f"or runtime.max_seq_len to {fit_len}")
    return [need + ": " + "; ".join(fixes)]


# ---- ops, toolchain, build peaks ----------------------------------------------------------------------------------
def op_coverage(kind: str, soc: str | None, needed: set[str]) -> list[dict[str, Any]]:
    """Each dsv4 op the graph calls and how the target runs it (the targets' own tables, dsv4c.targets.coverage)."""
    from dsv4c.graphs.ops.registry import OPS
    from dsv4c.targets import coverage

    rows = []
    for name in sorted(needed):
        c = coverage.op_coverage(kind, name, soc)
        rows.append({"op": name, "onnx": OPS[name].onnx_name, "implemented": c.implemented,
                     "implementation": c.implementation})
    return rows


def toolchain_report(kind: str, target_tools: dict[str, str]) -> dict[str, Any]:
    from dsv4c.compiler.pipeline import toolchain_versions

    tools = {**{k: v for k, v in toolchain_versions().items() if k != "dsv4c_sources"}, "c++": cxx_version(),
             **target_tools}
    if kind == "cpu":
        ok, note = True, ("ONNX Runtime present" + ("" if tools["c++"] != "missing" else
                          "; no C++ compiler: the dsv4 ops run as ONNX function bodies (slower, recorded)"))
    elif kind == "tensorrt":
        ok = tools.get("tensorrt") != "missing" and tools.get("cuda_device") != "missing"
        note = "TensorRT and a GPU present" if ok else ("no TensorRT/GPU here: `dsv4c build --until lower` writes the "
                                                        "bundle, `dsv4c build --from-bundle` finishes it on a GPU host")
    else:
        ok = tools.get("atc") != "missing"
        note = "CANN ATC present" if ok else ("no CANN ATC here: `dsv4c build --until lower` writes the bundle "
                                              "(with its ATC command lines) for an Ascend host")
    return {"tools": tools, "can_build_here": ok, "note": note}


def cxx_version() -> str:
    cxx = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if not cxx or not shutil.which(cxx):
        return "missing"
    try:
        first = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "present (version unknown)"
    return first[0] if first else "present"


# the build process without any model: Python, torch, onnx, ONNX Runtime, the exporter's graphs of the two programs
# and the validation's bookkeeping (measured: tiny's build peaks at 0.89 GB with 7 MB of weights)
BUILD_PROCESS_BYTES = 850 << 20


def build_peaks(recipe, shipped_layers: dict[Any, int], graph_rows: list[dict[str, Any]], graph_engine: int,
                engine_cache_at_max: int, reference_workspace: int, engine_workspace: int) -> dict[str, Any]:
    """Host RAM and disk the build needs, from the streamed build's working set (graphs.streamed; README 'Plan').
    `graph_rows`: the graph's tensors (graph_rows), per place; `*_workspace`: the activations of a prefill chunk
    of validation's reference (the whole model, its batch of prompts) and of the engine (trace_prefill)."""
    from dsv4c.compiler.validation import DEQUANT_CACHE_BYTES
    from dsv4c.graphs.ops.registry import WIDEN_ROWS_BYTES
    from dsv4c.graphs.streamed import DEFAULT_BUDGET, READ_CHUNK

    globals_bytes = shipped_layers.get("first", 0) + shipped_layers.get("last", 0)
    largest_layer = max(v for k, v in shipped_layers.items() if k not in ("first", "last"))
    loader = largest_layer + globals_bytes  # the streaming reader: one layer + embedding/head
    per_block: dict[Any, int] = defaultdict(int)
    for r in graph_rows:
        per_block[r["where"]] += r["bytes"]
    graph_globals = per_block.pop("first", 0) + per_block.pop("last", 0)
    blocks = sum(per_block.values())
    # The validation runs the reference first (its steps spilled to disk), then the engine (validation.py
    # validate_engine). Reference: the globals and either every block (they fit the budget: kept, with their
    # decoded weights, bounded) or the one running (streamed, decoded per call), a checkpoint chunk being
    # converted, a BF16 weight's FP32 slice (registry.bf16_linear), a step's caches before and after
    # (validate.prompts sequences at most, at max_seq_len), a prefill chunk's activations. Engine: a CPU engine's
    # weight pages as the validation touches them, which it gives back after each node
    # (executor.drop_weight_pages; an engine built without the kernel library keeps them): at most one block's
    # (its routed experts are one node) or the globals' (the head is one); its sessions' caches and the replayed
    # step's, a chunk's activations. A streamed reference gives its weights back before the engine loads: the
    # peak is the larger phase; a resident one (its blocks fit the budget) stays beside the engine. The
    # lowering's working set (the globals, one block, a chunk) is within the reference's.
    prompts = min(recipe.validate.prompts, recipe.runtime.max_batch_size)
    caches = 4 * prompts * engine_cache_at_max
    streaming = blocks > DEFAULT_BUDGET
    resident = max(per_block.values(), default=0) if streaming else blocks + min(DEQUANT_CACHE_BYTES, 4 * blocks)
    reference = graph_globals + resident + READ_CHUNK + WIDEN_ROWS_BYTES + caches + reference_workspace
    engine_pages = max(max(per_block.values(), default=0), graph_globals)
    engine = (engine_pages + engine_workspace if recipe.target.kind == "cpu" else 0) + caches
    ram = BUILD_PROCESS_BYTES + (max(reference, engine) if streaming else reference + engine)
    copies, engine_links_bundle = _weight_copies(recipe.target.kind)
    synthetic = sum(shipped_layers.values()) if recipe.model.synthetic is not None else 0
    # what each directory holds (its files' sizes, as `ls` shows them); the stored export has no weights
    # the reference's steps spilled by the validation: per step and sequence its logits and cache after the step
    # (and an empty cache per sequence), with its prompt and position (< 64 KiB)
    cfg = recipe.model.shapes()
    rows = recipe.validate.prompts * (recipe.validate.decode_steps + 2)
    spill = rows * (engine_cache_at_max + 4 * cfg.vocab_size + (64 << 10))
    disk = {"synthetic_checkpoint": synthetic, "export": 0, "validation_steps": spill,
            **{stage: copies[stage] * graph_engine for stage in ("lower_bundle", "build_engine", "artifact")}}
    # what the disk holds: the artifact hard-links the engine's files (and the validate stage lays the engine
    # out the same way), a CPU engine hard-links the bundle's, so each inode counts once (dsv4c.files)
    linked = {"artifact": disk["artifact"], "build_engine": disk["build_engine"] if engine_links_bundle else 0}
    unique = sum(disk.values()) - sum(linked.values())
    return {"host_ram_peak_bytes": ram, "streaming_loader_bytes": loader, "disk_peak_bytes": unique,
            # an output on another filesystem than the stage cache cannot link: the artifact is then a copy
            "disk_peak_bytes_output_elsewhere": unique + disk["artifact"],
            "disk": disk, "disk_hard_linked": linked}


def _weight_copies(kind: str) -> tuple[dict[str, int], bool]:
    """How many copies of the weights the target's bundle, engine and artifact hold, and whether its engine
    hard-links the bundle's weight files (the target's own declarations)."""
    from dsv4c.targets.base import ToolchainMissing, get_target

    try:
        target = get_target(kind)
    except ToolchainMissing:  # an unknown kind: plan reports it elsewhere; assume a copy per program
        return {"lower_bundle": 2, "build_engine": 2, "artifact": 2}, False
    return target.weight_copies, target.engine_links_bundle


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


# ---- the plan ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What `dsv4c plan` reports (`make_plan`), with its top-level figures as typed fields; the nested ones stay
    the JSON-able mappings `--json` prints. `to_dict()` is that JSON, key for key."""

    recipe: str
    model: dict[str, Any]
    target: dict[str, Any]
    formats: dict[str, str]
    fallbacks: list[dict[str, str]]
    weights: dict[str, dict[str, Any]]
    weights_bytes: int
    weights_bytes_as_shipped: int
    weights_bytes_dsv4c_graph: int
    kv_cache: dict[str, Any]
    kv_cache_bytes_per_token: float
    kv_cache_bytes_at_max_seq_len: int
    kv_cache_bytes_all_sequences: int
    activation_workspace_bytes: int
    activation_workspace_basis: str
    per_device: dict[str, Any]
    per_device_bytes: int
    build: dict[str, Any]
    ops: list[dict[str, Any]]
    toolchain: dict[str, Any]
    fits: bool
    feasible: bool
    problems: list[str]
    build_blockers: list[str]
    hints: list[str]
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def plan_recipe(recipe) -> Plan:
    return Plan(**make_plan(recipe))


def make_plan(recipe) -> dict[str, Any]:
    """Everything `dsv4c plan` reports for a validated recipe, as JSON-able data (see the module docstring)."""
    from dsv4c.compiler.pipeline import default_cache_dir
    from dsv4c.graphs.model import DeepseekV4, Numerics
    from dsv4c.targets.base import get_target

    cfg = recipe.model.shapes()
    t, rt = recipe.target, recipe.runtime
    target = get_target(t.kind)
    check = target.check(recipe)
    single = target.check(recipe.model_copy(update={"target": t.model_copy(update={
        "devices_per_node": 1, "nodes": 1, "parallel": t.parallel.model_copy(update={
            "tensor": 1, "expert": 1, "pipeline": 1, "data": 1})})}))
    formats = effective_formats(recipe, check.fallbacks)
    graph_format = {"fp8": "fp8", "bf16": "float"}.get(formats["experts"], "fp4")  # int8/int4: requantized later
    numerics = Numerics.for_quantization(recipe.quantization)

    # weights
    rows = weight_rows(cfg, formats)
    shard = rank_shard(cfg, recipe)
    with torch.device("meta"):
        model = DeepseekV4(cfg, numerics, expert_format=graph_format)
        # what one rank's engine holds, read off its own model (None: single device, or a refused layout whose
        # per-device figure falls back to the split formulas)
        rank_model = DeepseekV4(cfg, numerics, expert_format=graph_format, shard=shard) if shard else None
    scale_bytes = target.scale_bytes
    grows = graph_rows(model, scale_bytes)
    groups = {}
    for g in GROUPS:
        mine = [r for r in rows if r["group"] == g]
        groups[g] = {"params": sum(r["params"] for r in mine), "shipped_bytes": sum(r["shipped"] for r in mine),
                     "bytes": sum(r["bytes"] for r in mine),
                     "dsv4c_graph_bytes": sum(r["bytes"] for r in grows if r["group"] == g),
                     "in_engine": g != "mtp"}
    engine_rows = [r for r in rows if r["where"] != "mtp"]
    engine_grows = [r for r in grows if r["where"] != "mtp"]

    # KV cache
    def engine_cache(length: int):
        return model.cache_spec(1, length)

    kv = kv_cache_plan(cfg, formats, rt.max_seq_len, engine_cache)
    per_layer_kv = _per_layer(cfg, kv["layer_types"], "bytes_at_max_seq_len_total")
    per_layer_growth = _per_layer(cfg, kv["layer_types"], "bytes_per_token_total")
    # what the target's runtime holds: some fields twice, where a step writes the new value beside the old one
    engine_per_layer = [sum(e.nbytes * target.cache_copies(e.field) for e in model.cache_spec(1, rt.max_seq_len)
                            if e.name.startswith(f"layers.{i}.")) for i in range(cfg.num_hidden_layers)]

    # activations and ops
    seqs = rt.max_batch_size  # data replicas run the same batch
    chunk = max(2, min(PREFILL_CHUNK, rt.max_seq_len))
    if shard is not None:
        ops, workspace, engine_workspace = trace_prefill(cfg, numerics, graph_format, seqs, chunk, rt.max_seq_len,
                                                         shard, target.kernel_scratch)
    else:
        ops, workspace, engine_workspace = trace_prefill(rank_config(cfg, t.parallel.tensor), numerics,
                                                         graph_format, seqs, chunk, rt.max_seq_len,
                                                         scratch=target.kernel_scratch)
    sessions = target.session_state(cfg.num_hidden_layers)
    engine_workspace += sessions  # the engine's runtime beside its tensors
    coverage = op_coverage(t.kind, t.soc_version, ops)

    # devices
    what, capacity_gib = device_capacity(t)
    usable = capacity_gib * GIB * (1 - RESERVE)
    stages = stage_ranges(cfg.num_hidden_layers, t.parallel.pipeline) if t.parallel.pipeline <= cfg.num_hidden_layers \
        else stage_ranges(cfg.num_hidden_layers, 1)
    stage_devs = per_device(engine_rows, "bytes", per_layer_kv, workspace, recipe, stages)
    if rank_model is not None:
        graph_devs = per_device([r for r in graph_rows(rank_model, scale_bytes) if r["where"] != "mtp"], "bytes",
                                engine_per_layer, engine_workspace, recipe, stages, presplit=True)
    else:
        graph_devs = per_device(engine_grows, "bytes", engine_per_layer, engine_workspace, recipe, stages)
    worst = max(stage_devs, key=lambda s: s["total"])
    worst_graph = max(graph_devs, key=lambda s: s["total"])
    worst_layers = stages[worst["stage"]]

    problems = list(single.problems) + layout_problems(cfg, recipe)
    problems += memory_problems(worst, usable, what, recipe, sum(per_layer_kv[i] for i in worst_layers),
                                sum(per_layer_growth[i] for i in worst_layers), sum(r["bytes"] for r in engine_rows))
    blockers = [p for p in check.problems if p not in single.problems]
    missing_ops = [r["onnx"] for r in coverage if not r["implemented"]]
    if missing_ops:
        blockers.append(f"{len(missing_ops)} of {len(coverage)} dsv4 ops have no {t.kind} implementation in this "
                        f"dsv4c yet: {', '.join(missing_ops)}")
    warnings = []
    if worst_graph["total"] > usable and worst["total"] <= usable:
        room = usable - worst_graph["weights"] - worst_graph["workspace"]
        fit = int(room // (worst_graph["kv_cache"] / seqs)) if room > 0 and worst_graph["kv_cache"] else 0
        warnings.append(f"dsv4c's {t.kind} engine would need {worst_graph['total'] / GIB:.1f} GiB per device, more "
                        f"than the {usable / GIB:.1f} GiB usable (the recipe's formats need "
                        f"{worst['total'] / GIB:.1f}): "
                        + "; ".join(engine_overheads(worst, worst_graph, scale_bytes, sessions))
                        + (f"; runtime.max_batch_size {fit} fits it" if fit >= 1 else ""))
    shipped_layers: dict[Any, int] = defaultdict(int)
    for r in rows:
        shipped_layers[r["where"]] += r["shipped"]
    # validation's reference runs the whole model on its prompts, chunked as the engine prefills
    prompts = min(recipe.validate.prompts, seqs)
    reference_workspace = workspace if shard is None and t.parallel.tensor == 1 and prompts == seqs else \
        trace_prefill(cfg, numerics, graph_format, prompts, chunk, rt.max_seq_len)[1]
    peaks = build_peaks(recipe, shipped_layers, grows, sum(r["bytes"] for r in engine_grows),
                        kv["dsv4c_engine"]["bytes_at_max_seq_len"], reference_workspace, engine_workspace)
    host = host_ram_bytes()
    if peaks["host_ram_peak_bytes"] > host:
        warnings.append(f"the build needs at least {peaks['host_ram_peak_bytes'] / GIB:.1f} GiB of host RAM, this "
                        f"machine has {host / GIB:.1f} GiB: build on a larger host")
    free = _free_bytes(default_cache_dir())
    if peaks["disk_peak_bytes"] > free:
        warnings.append(f"the build needs about {peaks['disk_peak_bytes'] / GIB:.1f} GiB of disk for its stage "
                        f"cache and artifact, {default_cache_dir()} has {free / GIB:.1f} GiB free")

    fits = not problems
    return {
        "recipe": recipe.name,
        "model": {"preset": recipe.model.preset_name, "checkpoint": recipe.model.checkpoint,
                  "layers": cfg.num_hidden_layers, "mtp_layers": cfg.num_nextn_predict_layers,
                  "params": sum(r["params"] for r in rows),
                  "params_excluding_mtp": sum(r["params"] for r in engine_rows)},
        "target": {"kind": t.kind, "arch": t.arch, "soc_version": t.soc_version, "device": what,
                   "device_memory_gib": capacity_gib, "usable_bytes": int(usable), "reserve": RESERVE,
                   "world_size": t.world_size, "parallel": t.parallel.model_dump()},
        "formats": formats,
        "fallbacks": check.fallbacks,
        "weights": groups,
        "weights_bytes": sum(r["bytes"] for r in engine_rows),
        "weights_bytes_as_shipped": sum(r["shipped"] for r in rows),
        "weights_bytes_dsv4c_graph": sum(r["bytes"] for r in engine_grows),
        "kv_cache": kv,
        "kv_cache_bytes_per_token": kv["bytes_per_token"],
        "kv_cache_bytes_at_max_seq_len": kv["bytes_at_max_seq_len"],
        "kv_cache_bytes_all_sequences": kv["bytes_at_max_seq_len"] * rt.max_batch_size,
        "activation_workspace_bytes": workspace,
        "activation_workspace_basis": f"one prefill chunk of {chunk} tokens x {seqs} sequences on one rank of the "
                                      "mesh (its heads, vocabulary and experts), dsv4c graph (float32), traced on "
                                      "the meta device",
        "per_device": {"stages": stage_devs, "worst_stage": worst["stage"], "dsv4c_engine_stages": graph_devs},
        "per_device_bytes": worst["total"],
        "build": peaks,
        "ops": coverage,
        "toolchain": toolchain_report(t.kind, check.toolchain),
        "fits": fits,
        "feasible": fits and not blockers,
        "problems": problems,
        "build_blockers": blockers,
        "hints": build_hints(recipe, blockers) if fits else [],
        "warnings": warnings,
    }


def build_hints(recipe, blockers: list[str]) -> list[str]:
    """What to do about the build blockers of a recipe that fits its hardware: for op kernels a CANN target still
    lacks, the bundle that can be built now."""
    if blockers and recipe.target.kind == "cann":
        return ["`dsv4c build RECIPE --until lower` writes the ATC bundle (with its ATC command lines); the ops "
                "listed above need their AscendC kernels before `atc` can build a runnable .om"]
    return []


def _per_layer(cfg: ModelConfig, types: list[dict[str, Any]], key: str) -> list[float]:
    by_ratio = {t["ratio"]: t[key] for t in types}
    return [by_ratio[cfg.compress_ratios[i]] for i in range(cfg.num_hidden_layers)]


# ---- the human table --------------------------------------------------------------------------------------------
def human_count(n: float) -> str:
    """A parameter count as people write it: 7.41 M, 284.3 B, 1.57 T."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f}"


def human_size(n: float) -> str:
    """Bytes in binary units, as plan's tables print them: 1.50 GiB, 3.00 MiB, 512 B."""
    return f"{n / GIB:,.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):,.2f} MiB" if n >= 1 << 16 else f"{n:,.0f} B"


def render(plan: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    t, m = plan["target"], plan["model"]
    where = t["arch"] or t["soc_version"] or "host"
    console.print(f"[bold]{plan['recipe']}[/bold]: {m['preset'] or m['checkpoint']} ({human_count(m['params'])} "
                  f"params, {m['layers']} layers + {m['mtp_layers']} MTP) on {t['kind']} {where}, "
                  f"{t['world_size']} x {t['device']} ({t['device_memory_gib']:g} GiB), parallel {t['parallel']}")
    if plan["fallbacks"]:
        console.print("fallbacks: " + "; ".join(f"{f['group']} {f['from']} -> {f['to']}" for f in plan["fallbacks"]))

    w = Table(title="weights per module group")
    for col in ("group", "params", "as shipped", "recipe formats", "dsv4c graph"):
        w.add_column(col, justify="left" if col == "group" else "right")
    for g, v in plan["weights"].items():
        w.add_row(GROUP_TITLES[g], human_count(v["params"]), human_size(v["shipped_bytes"]), human_size(v["bytes"]),
                  human_size(v["dsv4c_graph_bytes"]))
    engine = [v for v in plan["weights"].values() if v["in_engine"]]
    w.add_row("[bold]in the engine[/bold]", human_count(sum(v["params"] for v in engine)),
              human_size(sum(v["shipped_bytes"] for v in engine)), human_size(plan["weights_bytes"]),
              human_size(plan["weights_bytes_dsv4c_graph"]))
    console.print(w)

    kv = plan["kv_cache"]
    k = Table(title=f"KV cache per sequence ({kv['format']['kv']} entries, {kv['format']['indexer']} indexer keys, "
                    "fp32 compressor state)")
    for col in ("layer type", "layers", "fixed (window + state)", "per token", "at max_seq_len"):
        k.add_column(col, justify="left" if col == "layer type" else "right")
    for lt in kv["layer_types"]:
        k.add_row(f"{lt['type']} (m={lt['ratio']})", str(lt["layers"]),
                  human_size(sum(lt["fixed_bytes_per_sequence"].values())), f"{lt['bytes_per_token_total']:,.1f} B",
                  human_size(lt["bytes_at_max_seq_len_total"]))
    base = kv["dense_mla_baseline"]
    k.add_row("[bold]total[/bold]", str(m["layers"]), "", f"{kv['bytes_per_token']:,.1f} B",
              human_size(kv["bytes_at_max_seq_len"]))
    k.add_row("dense MLA baseline", str(base["layers"]), "", f"{base['bytes_per_token']:,} B",
              human_size(base["bytes_at_max_seq_len"]))
    k.add_row("dsv4c engine layout", str(m["layers"]), "", f"{kv['dsv4c_engine']['bytes_per_token']:,.1f} B",
              human_size(kv["dsv4c_engine"]["bytes_at_max_seq_len"]))
    console.print(k)
    a = kv["at_1m"]
    console.print(f"at 1M tokens: {human_size(a['bytes'])} per sequence = {a['ratio_to_dense_same_depth']:.1%} of a "
                  f"dense MLA cache of the same depth, {a['ratio_to_v32_61_layers']:.1%} of V3.2's (61 layers)")

    d = Table(title=f"per device ({t['device']}, usable {human_size(t['usable_bytes'])})")
    for col in ("stage", "layers", "weights", "KV cache", "workspace", "total", "dsv4c engine"):
        d.add_column(col, justify="right")
    for s, g in zip(plan["per_device"]["stages"], plan["per_device"]["dsv4c_engine_stages"]):
        d.add_row(str(s["stage"]), s["layers"], human_size(s["weights"]), human_size(s["kv_cache"]),
                  human_size(s["workspace"]), human_size(s["total"]), human_size(g["total"]))
    console.print(d)
    b = plan["build"]
    console.print(f"build: host RAM >= {human_size(b['host_ram_peak_bytes'])} (streaming loader "
                  f"{human_size(b['streaming_loader_bytes'])}), disk ~ {human_size(b['disk_peak_bytes'])} (stage "
                  f"cache + artifact, weights hard-linked between them; "
                  f"{human_size(b['disk_peak_bytes_output_elsewhere'])} with the output on another filesystem)")
    console.print("ops: " + "; ".join(f"{o['onnx']}: [{'green' if o['implemented'] else 'red'}]"
                                      f"{escape(o['implementation'])}[/]" for o in plan["ops"]))
    tc = plan["toolchain"]
    console.print(f"toolchain: {'can' if tc['can_build_here'] else 'cannot'} build here ({tc['note']}); "
                  + ", ".join(f"{k}={v}" for k, v in tc["tools"].items()))
    for label, items, colour in (("build blocker", plan["build_blockers"], "yellow"),
                                 ("warning", plan["warnings"], "yellow"), ("problem", plan["problems"], "red")):
        for item in items:
            console.print(f"[{colour}]{label}:[/{colour}] {escape(item)}")
    for hint in plan["hints"]:
        console.print(f"hint: {escape(hint)}")
    if plan["feasible"]:
        console.print("[green]feasible[/green]")
    elif plan["fits"]:
        console.print("[red]infeasible: the hardware holds it, but this dsv4c cannot build it (build blockers)[/red]")
    else:
        console.print("[red]infeasible on the declared target[/red]")


__all__ = ["Plan", "plan_recipe", "make_plan", "render", "DEVICE_MEMORY_GIB", "RESERVE", "format_bytes",
           "kv_entry_bytes", "indexer_entry_bytes", "dense_mla_bytes_per_token"]
