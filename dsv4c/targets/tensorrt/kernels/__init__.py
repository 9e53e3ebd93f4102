"""Triton kernels for the dsv4 custom ops (the TensorRT plugins' implementations).

One module per kernel family; each exposes a launcher named like its op, taking the op's arguments
(dsv4c/graphs/ops/registry.py), bf16 attributes included, and returning what the torch reference returns,
down to its bf16 rounding points (spec §3.9):

    quant.py               fake_quant_fp8, hadamard_fp4                    1 kernel each
                           pack_kv_fp8, pack_fp4                           torch glue (no kernel yet)
    fp8_gemm.py            fp8_linear, fp8_grouped_linear                  1 kernel (act quant fused)
    attention.py           sparse_attn                                     1 kernel (64-pick online softmax + sink)
    compressor.py          compress_pool                                   1 kernel
    indexer.py             indexer_topk                                    score kernel + torch.topk on packed keys
    hyper_connections.py   hc_pre (Sinkhorn fused), hc_post                1 kernel each
    moe.py                 moe_experts                                     routing glue + 2 grouped-GEMM kernels

Launchers take CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before this package was imported
(see common.py). `LAUNCHERS` maps op name -> launcher.
"""

from __future__ import annotations

from dsv4c.targets.tensorrt.kernels.common import DEVICE, INTERPRET, KernelInputError
from dsv4c.targets.tensorrt.kernels.attention import sparse_attn
from dsv4c.targets.tensorrt.kernels.compressor import compress_pool
from dsv4c.targets.tensorrt.kernels.fp8_gemm import fp8_grouped_linear, fp8_linear
from dsv4c.targets.tensorrt.kernels.hyper_connections import hc_post, hc_pre
from dsv4c.targets.tensorrt.kernels.indexer import indexer_scores, indexer_topk
from dsv4c.targets.tensorrt.kernels.moe import moe_experts
from dsv4c.targets.tensorrt.kernels.quant import fake_quant_fp8, hadamard_fp4, pack_fp4, pack_kv_fp8

LAUNCHERS = {
    "fp8_linear": fp8_linear,
    "fp8_grouped_linear": fp8_grouped_linear,
    "moe_experts": moe_experts,
    "fake_quant_fp8": fake_quant_fp8,
    "hadamard_fp4": hadamard_fp4,
    "pack_kv_fp8": pack_kv_fp8,
    "pack_fp4": pack_fp4,
    "sparse_attn": sparse_attn,
    "indexer_topk": indexer_topk,
    "indexer_scores": indexer_scores,
    "compress_pool": compress_pool,
    "hc_pre": hc_pre,
    "hc_post": hc_post,
}

__all__ = ["DEVICE", "INTERPRET", "KernelInputError", "LAUNCHERS", *LAUNCHERS]
