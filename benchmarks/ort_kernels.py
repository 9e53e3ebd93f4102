"""Per-op decode timings of the dsv4 C++ ONNX Runtime kernels, next to the ops' ONNX function bodies (the same
one-node model on ORT without the library) and the torch reference ops, at the decode shapes of a preset.

    python benchmarks/ort_kernels.py [--preset mini-1b tiny] [--batch 1] [--context 4096] [--threads 2]

Decode step of `batch` sequences with `context` tokens behind them: one new token each; CSA layers see
context/4 compressed entries (the indexer picks index_topk of them), HCA layers context/128. Weights are
random but real-format (FP8 e4m3 + 128x128 pow2 scales, FP4 e2m1 + 1x32 scales), numerics as the reference
recipe (act_quant, bf16). The "weights GB/s" column is packed weight bytes read per call / library time: the
figure to hold against the machine's ~25 GB/s (toolchain-facts §9) for the weight-bound ops.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from dsv4c.graphs import quant
from dsv4c.graphs.config import ModelConfig, preset
from dsv4c.graphs.ops import OPS
from dsv4c.graphs.ops.onnx import (DOMAIN, DOMAIN_VERSION, ONNX_OPSET, attach_functions, attribute_kinds, output_names,
                                   register_schemas, tensor_inputs)
from dsv4c.targets.cpu.kernels.build import build_library, kernel_isa

_ELEM = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.uint8): onnx.TensorProto.UINT8,
         np.dtype(np.int64): onnx.TensorProto.INT64}


@dataclass
class Case:
    label: str  # what the op computes in the model, with its shape
    op: str
    inputs: dict[str, torch.Tensor]
    attrs: dict
    weight_bytes: int = 0  # packed weight bytes one call reads (0: not a weight-bound op)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fp8(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = quant.quantize_fp8_blocks(torch.randn(n, k, generator=_g(seed)) * 0.05)
    return q.view(torch.uint8), quant.e8m0_to_float(s)


def _fp4_stack(e: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random FP4 experts [e, n, k/2] without the cost of quantising: random bytes, pow2 scales."""
    w = torch.randint(0, 256, (e, n, k // 2), generator=_g(seed), dtype=torch.int32).to(torch.uint8)
    s = 2.0 ** torch.randint(-10, -6, (e, n, k // 32), generator=_g(seed + 1)).float()
    return w, s


def cases(cfg: ModelConfig, batch: int, context: int) -> list[Case]:
    b, d, h, hd, win = batch, cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
    g, r, inter = cfg.o_groups, cfg.o_lora_rank, cfg.moe_intermediate_size
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    ih, ihd, topk, n = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, cfg.hc_mult
    n_csa, n_hca = max(context // 4, 1), max(context // 128, 1)
    x = lambda *shape, seed=0: torch.randn(*shape, generator=_g(seed))  # noqa: E731
    out = []
    for name, (rows, cols) in {"wq_b": (h * hd, cfg.q_lora_rank), "wkv": (hd, d), "wo_b": (d, g * r),
                               "shared w1": (inter, d)}.items():
        w, s = _fp8(rows, cols, seed=rows + cols)
        out.append(Case(f"fp8_linear {name} [{b},{cols}]x[{rows},{cols}]", "fp8_linear",
                        {"x": x(b, 1, cols), "w": w, "w_scale": s}, {"act_quant": True}, w.numel() + s.numel() * 4))
    kg = h * hd // g
    w, s = _fp8(g * r, kg, seed=7)
    out.append(Case(f"fp8_grouped_linear wo_a [{b},{g},{kg}]x[{g * r},{kg}]", "fp8_grouped_linear",
                    {"x": x(b, 1, g, kg), "w": w, "w_scale": s}, {"act_quant": False}, w.numel() + s.numel() * 4))
    (w1, s1), (w3, s3), (w2, s2) = _fp4_stack(e, inter, d, 1), _fp4_stack(e, inter, d, 3), _fp4_stack(e, d, inter, 5)
    picks = torch.stack([torch.randperm(e, generator=_g(100 + t))[:k] for t in range(b)])
    used = len(torch.unique(picks))
    per_expert = sum(t[0].numel() + t[1].numel() * 4 for t in ((w1, s1), (w3, s3), (w2, s2))) // e
    out.append(Case(f"moe_experts fp4 E={e} k={k} [{b},{d}] I={inter}", "moe_experts",
                    {"x": x(b, d), "weights": x(b, k).abs(), "indices": picks, "w1": w1, "s1": s1, "w3": w3, "s3": s3,
                     "w2": w2, "s2": s2},
                    {"fmt": 0, "swiglu_limit": cfg.swiglu_limit, "act_quant": True, "bf16": True}, used * per_expert))
    rope = cfg.qk_rope_head_dim
    for kind, n_cmp, picked in (("CSA", n_csa, min(topk, n_csa)), ("HCA", n_hca, n_hca)):
        idx = torch.cat([torch.arange(win).expand(b, 1, win),
                         win + 1 + torch.randperm(n_cmp, generator=_g(3))[:picked].expand(b, 1, picked)], dim=-1)
        # the engine's layout: packed FP8 rows, the window ring + the step's token and the compressed entries apart
        out.append(Case(f"sparse_attn {kind} H={h} D={hd} K={idx.shape[-1]} N={win + 1}+{n_cmp}", "sparse_attn",
                        {"q": x(b, 1, h, hd), "kv": torch.ops.dsv4.pack_kv_fp8(x(b, win + 1, hd, seed=1), rope),
                         "cmp": torch.ops.dsv4.pack_kv_fp8(x(b, n_cmp, hd, seed=4), rope), "sink": x(h, seed=2),
                         "idx": idx}, {"kv_rope": rope, "scale": hd ** -0.5, "bf16": True}))
    out.append(Case(f"indexer_topk h={ih} d={ihd} N={n_csa} top{topk}", "indexer_topk",
                    {"q": x(b, 1, ih, ihd), "k": x(b, n_csa, ihd, seed=1), "w": x(b, 1, ih, seed=2),
                     "n_visible": torch.full((b, 1), n_csa)}, {"topk": topk, "bf16": True}))
    for kind, ratio, overlap in (("CSA", 4, True), ("HCA", 128, False)):
        c = 2 if overlap else 1
        span = c * ratio
        out.append(Case(f"compress_pool {kind} ratio={ratio} [{b},{span + 1},{c * hd}]", "compress_pool",
                        {"kv": x(b, span + 1, c * hd), "score": x(b, span + 1, c * hd, seed=1),
                         "ends": torch.tensor([[span, -1]]).expand(b, 2).contiguous()},
                        {"ratio": ratio, "overlap": overlap}))
    mix = (2 + n) * n
    out.append(Case(f"hc_pre n={n} D={d} iters={cfg.hc_sinkhorn_iters}", "hc_pre",
                    {"x": x(b, 1, n, d), "fn": x(mix, n * d, seed=1) * 0.02, "scale": x(3, seed=2),
                     "base": x(mix, seed=3)},
                    {"iters": cfg.hc_sinkhorn_iters, "norm_eps": cfg.rms_norm_eps, "hc_eps": cfg.hc_eps}))
    out.append(Case(f"hc_post n={n} D={d}", "hc_post",
                    {"f": x(b, 1, d), "res": x(b, 1, n, d, seed=1), "post": x(b, 1, n, seed=2),
                     "comb": x(b, 1, n, n, seed=3).abs()}, {}))
    out.append(Case(f"fake_quant_fp8 kv nope [{b},1,{hd - cfg.qk_rope_head_dim}]", "fake_quant_fp8",
                    {"x": x(b, 1, hd - cfg.qk_rope_head_dim)}, {"block": 64}))
    out.append(Case(f"hadamard_fp4 indexer q [{b},1,{ih},{ihd}]", "hadamard_fp4", {"x": x(b, 1, ih, ihd)}, {}))
    return out


def model_for(case: Case) -> onnx.ModelProto:
    """One dsv4 node carrying its function body: runs the kernel with the library, the body without."""
    op = OPS[case.op]
    names = tensor_inputs(op)
    attrs = {a: int(case.attrs[a]) if kind == "bool" else case.attrs[a] for a, kind in attribute_kinds(op).items()}
    node = helper.make_node(op.onnx_name, names, list(output_names(op)), domain=DOMAIN, **attrs)
    inputs = [helper.make_tensor_value_info(nm, _ELEM[case.inputs[nm].numpy().dtype], list(case.inputs[nm].shape))
              for nm in names]
    out_type = onnx.TensorProto.INT64 if case.op == "indexer_topk" else onnx.TensorProto.FLOAT
    outputs = [helper.make_tensor_value_info(nm, out_type, None) for nm in output_names(op)]
    opsets = [helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
    model = helper.make_model(helper.make_graph([node], case.op, inputs, outputs), ir_version=10, opset_imports=opsets)
    return attach_functions(model)


def timed(fn, min_time: float = 0.3, max_runs: int = 200) -> float:
    """Median seconds per call after a warm-up."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ort_time(model: onnx.ModelProto, feeds: dict[str, np.ndarray], library: str | None, threads: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if library:
        options.register_custom_ops_library(library)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return timed(lambda: session.run(None, feeds))


def torch_time(case: Case, threads: int) -> float:
    """The torch reference op, best of 1 and `threads` threads: on a busy 2-core machine OpenMP's wake-ups can
    cost small ops tens of ms, which says nothing about the op."""
    op = getattr(torch.ops.dsv4, case.op)
    args = [case.inputs[n] for n in tensor_inputs(OPS[case.op])] + [case.attrs[a] for a in OPS[case.op].attributes]
    best = float("inf")
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        with torch.no_grad():
            best = min(best, timed(lambda: op(*args)))
    torch.set_num_threads(threads)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", nargs="+", default=["mini-1b", "tiny"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    register_schemas()
    torch.set_num_threads(args.threads)
    library = str(build_library())
    print(f"library {library} ({kernel_isa(library)} loops), onnxruntime {ort.__version__}, torch {torch.__version__}, "
          f"{args.threads} threads, batch {args.batch}, context {args.context}")
    for name in args.preset:
        cfg = preset(name)
        print(f"\n## {name}: one decode step per op (median ms per call)\n")
        print("| op | library | function body | torch ref | body / library | torch / library | weights GB/s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        total = [0.0, 0.0, 0.0]
        for case in cases(cfg, args.batch, args.context):
            model = model_for(case)
            feeds = {k: v.numpy() for k, v in case.inputs.items()}
            t_ref = torch_time(case, args.threads)
            t_lib, t_body = ort_time(model, feeds, library, args.threads), ort_time(model, feeds, None, args.threads)
            for i, t in enumerate((t_lib, t_body, t_ref)):
                total[i] += t
            gbs = f"{case.weight_bytes / t_lib / 1e9:.1f}" if case.weight_bytes else ""
            print(f"| {case.label} | {t_lib * 1e3:.3f} | {t_body * 1e3:.3f} | {t_ref * 1e3:.3f} | "
                  f"{t_body / t_lib:.1f}x | {t_ref / t_lib:.1f}x | {gbs} |")
        print(f"| **sum of the rows** | {total[0] * 1e3:.3f} | {total[1] * 1e3:.3f} | {total[2] * 1e3:.3f} | "
              f"{total[1] / total[0]:.1f}x | {total[2] / total[0]:.1f}x | |")


if __name__ == "__main__":
    main()
