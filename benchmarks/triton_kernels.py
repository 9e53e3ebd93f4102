"""Benchmark the dsv4 Triton kernels (dsv4c.targets.tensorrt.kernels) at DeepSeek-V4-Flash shapes on a GPU.

    python benchmarks/triton_kernels.py [--phase decode|prefill|all] [--only NAME] [--no-reference]

Per kernel and shape: time (triton.testing.do_bench, median), achieved GB/s and TFLOP/s, the roofline bound
for that shape (max(bytes / HBM bandwidth, flops / peak of the unit the kernel uses)) and how close the kernel
gets to it, and the torch reference op (registry.py) timed on the same GPU. Peaks (dense, SXM): H100 3.35 TB/s,
989 TFLOP/s bf16, 1979 FP8; H200 4.8 TB/s, same compute (chosen by device name). Kernels whose dots run in
tf32x3 (three tf32 MMAs for fp32 accuracy) are held to 989 / 2 / 3 TFLOP/s. Bytes are the minimum the op must
move (every input read once, outputs written once; a gather counts its rows once: the gathered rows or
the whole table, whichever is smaller), FLOPs the dots' 2*M*N*K.

Shapes (preset v4-flash): hidden 4096, 64 heads x 512, q_lora 1024, 8 output groups x 1024, window 128,
indexer 64 x 128 with top-512, 256 experts top-6 x 2048, hc_mult 4 with 20 Sinkhorn iterations. Decode: 16
sequences at a 32K context (8192 CSA entries); prefill: one 4096-token prompt.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dsv4c.graphs.ops  # noqa: E402,F401
from dsv4c.graphs.config import preset  # noqa: E402

ops = torch.ops.dsv4
REFERENCE = {name: op.reference for name, op in dsv4c.graphs.ops.OPS.items()}  # plain Python: honours torch.device


@dataclass
class Device:
    name: str
    hbm: float  # bytes / s
    peak: dict[str, float]  # flop / s by unit


def device() -> Device:
    name = torch.cuda.get_device_name(0)
    hbm = 4.8e12 if "H200" in name else 3.35e12
    bf16 = 989e12
    return Device(name, hbm, {"fp8": 1979e12, "bf16": bf16, "tf32x3": bf16 / 2 / 3, "fp32": 67e12})


@dataclass
class Case:
    kernel: str
    shape: str
    run: Callable[[], object]
    reference: Callable[[], object] | None
    bytes: float
    flops: float
    unit: str  # the compute unit the kernel's dots use


def cuda_rand(*shape: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=g) * scale


def fp8_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random FP8 weight bytes [N, K] (finite e4m3 patterns) and power-of-two block scales."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randint(0, 256, (n, k), device="cuda", dtype=torch.uint8, generator=g)
    w = torch.where((w & 0x7F) == 0x7F, w ^ 1, w)  # no NaN patterns
    s = torch.exp2(torch.randint(-10, -4, (math.ceil(n / 128), math.ceil(k / 128)), device="cuda", generator=g).float())
    return w, s


def expert_weights(e: int, n: int, k: int, fmt: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    if fmt == 0:
        w = torch.randint(0, 256, (e, n, k // 2), device="cuda", dtype=torch.uint8, generator=g)
        s = torch.exp2(torch.randint(-10, -4, (e, n, k // 32), device="cuda", generator=g).float())
        return w, s
    w = torch.randint(0, 256, (e, n, k), device="cuda", dtype=torch.uint8, generator=g)
    w = torch.where((w & 0x7F) == 0x7F, w ^ 1, w)
    s = torch.exp2(torch.randint(-10, -4, (e, math.ceil(n / 128), math.ceil(k / 128)), device="cuda",
                                 generator=g).float())
    return w, s


def cases(phase: str) -> list[Case]:
    from dsv4c.targets.tensorrt import kernels as K

    cfg = preset("v4-flash")
    d, h, hd, ql = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    g_out, o_rank, win = cfg.o_groups, cfg.o_lora_rank, cfg.sliding_window
    ih, idim, itopk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    n_exp, topk, inter, n_hc = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.hc_mult
    if phase == "decode":
        b, s, ctx = 16, 1, 32768
    else:
        b, s, ctx = 1, 4096, 4096
    t = b * s
    n_csa = ctx // 4
    out: list[Case] = []
    tag = f"{phase} B{b} S{s}"

    # FP8 linears (W8A8): wq_b (1024 -> 64*512) and wo_b (8*1024 -> 4096)
    for name, k, n in (("wq_b", ql, h * hd), ("wo_b", g_out * o_rank, d)):
        x = cuda_rand(t, k)
        w, sc = fp8_weight(n, k, seed=1)
        out.append(Case("fp8_linear", f"{name} {t}x{k}->{n}", lambda x=x, w=w, sc=sc: K.fp8_linear(x, w, sc, True),
                        lambda x=x, w=w, sc=sc: REFERENCE["fp8_linear"](x, w, sc, True),
                        bytes=t * k * 4 + n * k + sc.numel() * 4 + t * n * 4, flops=2 * t * n * k, unit="bf16"))
    # wo_a: grouped, no activation quant (the reference runs it on dequantised weights)
    kg = h * hd // g_out
    x = cuda_rand(t, g_out, kg)
    w, sc = fp8_weight(g_out * o_rank, kg, seed=2)
    out.append(Case("fp8_grouped_linear", f"wo_a {t}x{g_out}x{kg}->{o_rank}",
                    lambda x=x, w=w, sc=sc: K.fp8_grouped_linear(x, w, sc, False),
                    lambda x=x, w=w, sc=sc: REFERENCE["fp8_grouped_linear"](x, w, sc, False),
                    bytes=x.numel() * 4 + w.numel() + t * g_out * o_rank * 4, flops=2 * t * g_out * o_rank * kg,
                    unit="tf32x3"))

    # sparse attention: window 128 + top-512 CSA picks per query, over [window | new tokens] and the CSA entries
    n_rows = win + s + n_csa
    kk = win + itopk
    q, sink = cuda_rand(b, s, h, hd, scale=0.05), cuda_rand(h)
    kv, cmp = cuda_rand(b, win + s, hd), cuda_rand(b, n_csa, hd)
    g = torch.Generator(device="cuda").manual_seed(3)
    idx = torch.randint(0, n_rows, (b, s, kk), device="cuda", generator=g)
    out.append(Case("sparse_attn", f"{tag} H{h} D{hd} K{kk} N{n_rows}",
                    lambda q=q, kv=kv, cmp=cmp, sink=sink, idx=idx: K.sparse_attn(q, kv, cmp, sink, idx, hd ** -0.5,
                                                                                  True),
                    lambda q=q, kv=kv, cmp=cmp, sink=sink, idx=idx: REFERENCE["sparse_attn"](q, kv, cmp, sink, idx,
                                                                                             hd ** -0.5, True),
                    bytes=2 * q.numel() * 4 + b * s * kk * 8 + min(b * s * kk, b * n_rows) * hd * 4,
                    flops=4 * b * s * h * kk * hd, unit="tf32x3"))

    # indexer: 64 heads x 128 over the CSA keys, top-512
    n_keys = n_csa
    iq, ik, iw = cuda_rand(b, s, ih, idim), cuda_rand(b, n_keys, idim), cuda_rand(b, s, ih, scale=0.1)
    nv = torch.full((b, s), n_keys, device="cuda", dtype=torch.int64)
    out.append(Case("indexer_topk", f"{tag} h{ih} d{idim} N{n_keys} top{itopk}",
                    lambda iq=iq, ik=ik, iw=iw, nv=nv: K.indexer_topk(iq, ik, iw, nv, itopk, True),
                    lambda iq=iq, ik=ik, iw=iw, nv=nv: REFERENCE["indexer_topk"](iq, ik, iw, nv, itopk, True),
                    bytes=iq.numel() * 4 + b * n_keys * idim * 4 + b * s * n_keys * 8 * 2 + b * s * itopk * 8,
                    flops=2 * b * s * ih * n_keys * idim, unit="tf32x3"))

    # compressor: CSA (ratio 4, overlapping windows of 8) and HCA (ratio 128), 512-wide entries
    for ratio, overlap in ((4, True), (128, False)):
        c = 2 if overlap else 1
        span = c * ratio
        length = span + s
        kn = s // ratio + 2
        kv_c, sc_c = cuda_rand(b, length, c * hd), cuda_rand(b, length, c * hd)
        ends = (torch.arange(kn, device="cuda") * ratio + span - 1).clamp(max=length - 1).expand(b, kn).contiguous()
        if phase == "decode":
            ends[:, 1:] = -1
        pool_args = (kv_c, sc_c, ends, ratio, overlap)
        out.append(Case("compress_pool", f"{tag} ratio{ratio} L{length} K{kn} d{hd}",
                        lambda a=pool_args: K.compress_pool(*a), lambda a=pool_args: REFERENCE["compress_pool"](*a),
                        bytes=2 * b * kn * span * hd * 4 + b * kn * hd * 4, flops=0, unit="fp32"))

    # hyper-connections around each sub-layer
    x4 = cuda_rand(b, s, n_hc, d)
    fn, hsc, hb = cuda_rand((2 + n_hc) * n_hc, n_hc * d, scale=0.01), cuda_rand(3), cuda_rand((2 + n_hc) * n_hc)
    iters = cfg.hc_sinkhorn_iters
    out.append(Case("hc_pre", f"{tag} n{n_hc} D{d} iters{iters}",
                    lambda: K.hc_pre(x4, fn, hsc, hb, iters, 1e-6, 1e-6),
                    lambda: REFERENCE["hc_pre"](x4, fn, hsc, hb, iters, 1e-6, 1e-6),
                    bytes=2 * x4.numel() * 4 + fn.numel() * 4 + t * d * 4, flops=2 * t * fn.numel(), unit="tf32x3"))
    f_, post, comb = cuda_rand(b, s, d), cuda_rand(b, s, n_hc), cuda_rand(b, s, n_hc, n_hc)
    out.append(Case("hc_post", f"{tag} n{n_hc} D{d}", lambda: K.hc_post(f_, x4, post, comb),
                    lambda: REFERENCE["hc_post"](f_, x4, post, comb), bytes=(2 * x4.numel() + f_.numel()) * 4,
                    flops=2 * t * n_hc * n_hc * d, unit="fp32"))

    # QAT simulations: KV nope dims (448 = 512 - 64) FP8 in blocks of 64; indexer q Hadamard + FP4
    kvq = cuda_rand(t, hd - cfg.qk_rope_head_dim)
    out.append(Case("fake_quant_fp8", f"{tag} {t}x{hd - cfg.qk_rope_head_dim} block64",
                    lambda: K.fake_quant_fp8(kvq, 64), lambda: REFERENCE["fake_quant_fp8"](kvq, 64),
                    bytes=2 * kvq.numel() * 4, flops=0, unit="fp32"))
    hq = cuda_rand(t, ih, idim)
    out.append(Case("hadamard_fp4", f"{tag} {t}x{ih}x{idim}", lambda: K.hadamard_fp4(hq),
                    lambda: REFERENCE["hadamard_fp4"](hq), bytes=2 * hq.numel() * 4, flops=0, unit="fp32"))

    # routed experts: FP8 (the sm_90 path: lossless FP4 -> FP8 transcode) and FP4 (sm_100's format)
    for fmt in ((1, 0) if phase == "decode" else (1,)):
        xm = cuda_rand(t, d)
        gm = torch.Generator(device="cuda").manual_seed(5)
        picks = torch.stack([torch.randperm(n_exp, device="cuda", generator=gm)[:topk] for _ in range(t)])
        rw = torch.rand(t, topk, device="cuda", generator=gm)
        w1, s1 = expert_weights(n_exp, inter, d, fmt, 6)
        w3, s3 = expert_weights(n_exp, inter, d, fmt, 7)
        w2, s2 = expert_weights(n_exp, d, inter, fmt, 8)
        used = picks.unique().numel()
        wbytes = sum(w.numel() / w.shape[0] + s.numel() * 4 / s.shape[0] for w, s in ((w1, s1), (w3, s3), (w2, s2)))
        args = (xm, rw, picks, w1, s1, w3, s3, w2, s2, fmt, cfg.swiglu_limit, True, True)
        label = f"{tag} {'FP4' if fmt == 0 else 'FP8'} E{n_exp} top{topk} ({used} used) I{inter}"
        out.append(Case("moe_experts", label,
                        lambda args=args: K.moe_experts(*args), lambda args=args: REFERENCE["moe_experts"](*args),
                        bytes=used * wbytes + 2 * t * d * 4 + t * topk * inter * 8, flops=2 * 3 * t * topk * inter * d,
                        unit="bf16"))
    return out


def bench(fn: Callable[[], object], quick: bool = False) -> float:
    """Median milliseconds; a very slow callable (the reference at prefill size) is timed a few times only."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = start.elapsed_time(end)
    if once > 100 or quick:
        return once
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def sweep_attention(dev: Device) -> None:
    """Time sparse_attn's large-head-dim configs (BLOCK_H, BLOCK_DC, warps) at the decode and prefill shapes,
    then keep the one with the best summed relative time for the main table. (BLOCK_K is the reference's
    64-pick softmax block, part of the numerics, not a tuning knob.)"""
    from dsv4c.targets.tensorrt.kernels import attention

    configs = [(16, 128, 8), (16, 512, 8), (16, 128, 4), (16, 64, 4), (16, 64, 8), (32, 128, 8)]
    shapes = [c for phase in ("decode", "prefill") for c in cases(phase) if c.kernel == "sparse_attn"]
    print("| sparse_attn config (BH, DC, warps) | " + " | ".join(c.shape for c in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    times = {}
    for cfg in configs:
        attention.ATTN_CONFIG["large"] = cfg
        try:
            times[cfg] = [bench(c.run) for c in shapes]
        except Exception as e:  # a config that does not compile (shared memory, registers)
            print(f"| {cfg} | failed: {type(e).__name__} |")
            continue
        print(f"| {cfg} | " + " | ".join(f"{t:.4f} ms" for t in times[cfg]) + " |", flush=True)
    best = [min(t[i] for t in times.values()) for i in range(len(shapes))]
    pick = min(times, key=lambda c: sum(t / b for t, b in zip(times[c], best)))
    attention.ATTN_CONFIG["large"] = pick
    print(f"# sparse_attn: using {pick}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=("decode", "prefill", "all"), default="all")
    parser.add_argument("--only", default=None, help="only kernels whose name contains this")
    parser.add_argument("--no-reference", action="store_true", help="skip timing the torch reference ops")
    parser.add_argument("--sweep", action="store_true", help="tune sparse_attn's block config first")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (the kernels' CPU mode is Triton's interpreter)")
        return 2
    dev = device()
    import triton

    print(f"# {dev.name}, torch {torch.__version__}, triton {triton.__version__}; HBM {dev.hbm / 1e12:.2f} TB/s, "
          f"peaks TFLOP/s " + ", ".join(f"{k} {v / 1e12:.0f}" for k, v in dev.peak.items()))
    if args.sweep:
        sweep_attention(dev)
    header = ("| kernel | shape | triton ms | GB/s | TFLOP/s | roofline ms (bound) | % of roofline | torch ms | "
              "speed-up |")
    print(header)
    print("|" + "---|" * 9)
    for phase in (("decode", "prefill") if args.phase == "all" else (args.phase,)):
        for case in cases(phase):
            if args.only and args.only not in case.kernel:
                continue
            ms = bench(case.run)
            t_mem, t_cmp = case.bytes / dev.hbm, case.flops / dev.peak[case.unit]
            roof = max(t_mem, t_cmp) * 1e3
            bound = "memory" if t_mem >= t_cmp else f"{case.unit} compute"
            ref = None
            if not args.no_reference and case.reference is not None:
                with torch.device("cuda"):  # the references allocate with factory defaults
                    ref = bench(case.reference)
            print(f"| {case.kernel} | {case.shape} | {ms:.4f} | {case.bytes / ms / 1e6:.0f} | "
                  f"{case.flops / ms / 1e9:.1f} | {roof:.4f} ({bound}) | {100 * roof / ms:.0f}% | "
                  + (f"{ref:.4f} | {ref / ms:.1f}x |" if ref is not None else "- | - |"), flush=True)
            del case
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
