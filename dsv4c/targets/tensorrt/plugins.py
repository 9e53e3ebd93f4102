"""TensorRT plugins for the dsv4 ops: `tensorrt.plugin` (Quickly Deployable Plugins, TensorRT 10.8+) registrations
whose implementations are the project's Triton kernels (dsv4c.targets.tensorrt.kernels).

How TensorRT meets them. The bundle's ONNX carries each dsv4 op as a node of op type `OpDef.onnx_name` (domain
"dsv4") with attributes `plugin_namespace="dsv4"` and `plugin_version="1"` (target.mark_plugins). TensorRT's
ONNX parser has no importer for those op types, so its fallback plugin importer looks the node up in the plugin
registry by (op type, plugin_version, plugin_namespace) — the ONNX domain plays no part; without the
attribute the namespace would be "" — and passes as plugin fields the node attributes whose names the plugin
declares. `@trtp.register("dsv4::<OnnxName>")` registers exactly that creator (QDP creators are version "1"),
declaring the op's own attributes (bool/int -> `int`, since ONNX stores bools as INT; float -> `float`) and
the op's tensor inputs in schema order (= the node's inputs).

Per op:
  * register   output descriptors from `output_shapes` (the ops' fake kernels, in shape expressions);
  * aot_impl   for the single-kernel ops: the Triton kernel compiled to PTX with TensorRT's calling
               convention (input pointers, int32 scalars, output pointers; attributes and static dims
               are compile-time constants), so the engine runs without Python;
  * impl       JIT fallback for every op: the launcher on TensorRT's stream (needs Python + torch at run time).
  indexer_topk (score kernel + top-k over packed keys) and moe_experts (routing glue + two grouped GEMMs) are
  multi-kernel and JIT only; pack_kv_fp8 / pack_fp4 (the packed cache rows' writers) are torch glue, JIT only.

Verified here: module imports without TensorRT, `output_shapes` equals every op's fake kernel, every AOT
kernel spec compiles for sm_90 and its PTX has exactly TensorRT's parameter list (after dropping Triton's two
trailing scratch pointers, which are unused when their sizes are 0). On a GPU: the stripped PTX launched
through the CUDA driver the way TensorRT launches an AOT plugin gives the reference results. The registrations
and every aot_impl (called with shape expressions, its grid and extra args evaluated) pass tensorrt.plugin's
own checks: NVIDIA's pure-Python package (from the tensorrt-cu12-bindings wheel) over a fake `tensorrt` core
where its sources are available, and tests/trt_plugin_api.py's re-statement of its rules everywhere. NOT
verified (no TensorRT library anywhere we can run): the parser's attribute-to-field conversion (ONNX INT ->
INT64 field, FLOAT -> FLOAT64 field), the engine build.
Deliberately no `from __future__ import annotations`: tensorrt.plugin validates the annotation objects.
"""

import math
import operator
import re
from dataclasses import dataclass
from functools import reduce
from typing import Any, Callable, Sequence

PLUGIN_NAMESPACE = "dsv4"
# What this target implements (dsv4c.targets.coverage reads these without importing TensorRT): every op has a
# JIT plugin (`_register`); the single-kernel ones also an AOT kernel. tests/test_triton_kernels.py checks both
# against what `_register` registers.
PLUGIN_OPS = ("fp8_linear", "fp8_grouped_linear", "moe_experts", "fake_quant_fp8", "hadamard_fp4", "sparse_attn",
              "indexer_topk", "indexer_scores", "compress_pool", "hc_pre", "hc_post", "pack_kv_fp8", "pack_fp4")
AOT_OPS = ("fp8_linear", "fp8_grouped_linear", "fake_quant_fp8", "hadamard_fp4", "sparse_attn", "indexer_scores",
           "compress_pool", "hc_pre", "hc_post")
TORCH_GLUE_OPS = ("pack_kv_fp8", "pack_fp4")  # JIT plugins whose launcher is torch ops, not a Triton kernel
# The collectives (all_reduce, all_gather) are no plugins: the engine build splices TensorRT's own
# IDistCollectiveLayer (NCCL) in their place (collectives.py).
GEMM_TACTICS = {1: (16, 32), 2: (64, 128)}  # (BLOCK_M, BLOCK_N): decode-shaped / prefill-shaped
# x, w (e4m3 bits), w_scale: the bundle's e8m0 bytes, or float32 (independently, `*`), y
FP8_LINEAR_TYPES = "FP32, UINT8, UINT8*FP32, FP32"


def plugin_id(op_name: str) -> str:
    from dsv4c.graphs.ops.registry import OPS

    return f"{PLUGIN_NAMESPACE}::{OPS[op_name].onnx_name}"


# ---- output descriptors: ints or TensorRT shape expressions -------------------------------------------------
def output_shapes(op: str, shapes: Sequence[Sequence[Any]], attrs: dict, minimum: Callable = min) -> list[tuple]:
    """Output shapes of `op` from its input shapes (in tensor-input order), by the op's own shape rule
    (registry.OpDef.shape), as tuples of the same kind of dims (ints here, ShapeExpr inside TensorRT: they support
    + - * //). `minimum` is min / trtp.min."""
    from dsv4c.graphs.ops.registry import OPS

    if op not in PLUGIN_OPS:
        raise KeyError(f"no TensorRT plugin for op {op!r}")
    return [tuple(s) for s in OPS[op].output_shapes(shapes, attrs, _ShapeExprMath(minimum))]


class _ShapeExprMath:
    """DimMath over TensorRT shape expressions: // is theirs, min is trtp.min (Python's min cannot compare them)."""

    def __init__(self, minimum: Callable):
        self.min = minimum

    @staticmethod
    def div(a: Any, b: Any) -> Any:
        return a // b


def output_dtypes(op: str) -> list[str]:
    from dsv4c.graphs.ops.registry import OPS

    return list(OPS[op].output_dtypes)


# ---- AOT kernels: what TensorRT launches ---------------------------------------------------------------------
@dataclass
class AotKernel:
    fn: Any  # the @triton.jit kernel
    signature: dict[str, str]  # every parameter: "*fp32" / "*u8" / "*i64" / "i32" / "constexpr"
    constexprs: dict[str, Any]
    grid: tuple  # ints or shape expressions
    scalars: list  # the int32 arguments, in kernel order (TensorRT's "extra args")
    num_warps: int = 4
    n_inputs: int = 0
    n_outputs: int = 1


def _static(dim: Any, what: str) -> int:
    """A dim that must be known when the engine is built (it becomes a compile-time constant)."""
    if isinstance(dim, int):
        return dim
    if getattr(dim, "is_constant", False):
        return int(dim.constant_value())
    raise ValueError(f"{what} must be a static dimension for the AOT kernel (it is compiled into the PTX)")


def _prod(dims: Sequence[Any]) -> Any:
    return reduce(operator.mul, dims)  # starts from the first dim: shape expressions have no __rmul__


def _ceil_div(a: Any, b: Any, cdiv: Callable) -> Any:
    """ceil(a / b) for a grid size. tensorrt.plugin's cdiv (like its min / max) raises ValueError when both
    arguments are ints ("Both arguments cannot be 'int's", plugin/_top_level.py), so static sizes (a compile-time
    dim, the 1 row of a 1-D input) are divided here and only shape expressions go to `cdiv`."""
    if isinstance(a, int) and isinstance(b, int):
        return -(-a // b)
    return cdiv(a, b)


def aot_kernel(op: str, shapes: Sequence[Sequence[Any]], attrs: dict, cdiv: Callable, tactic: int = 1,
               bf16_inputs: Sequence[int] = (), e8m0_scales: bool = False) -> AotKernel:
    """The kernel, its constants, grid and int32 scalars for one op instance. Mirrors the launchers in
    dsv4c.targets.tensorrt.kernels (same kernels, same block choices); `cdiv` is triton.cdiv or trtp.cdiv
    (shape expressions), applied through _ceil_div. `bf16_inputs`: positions of inputs that come as bf16 (cache
    rows; the kernels widen what they load), typed *bf16 in the signature. `e8m0_scales`: the FP8 linears' weight
    scales come as e8m0 bytes (the bundle's format; *u8, decoded in the kernel), else float32."""
    from dsv4c.graphs.quant import kv_row_bytes
    from dsv4c.targets.tensorrt.kernels import attention, compressor, fp8_gemm, hyper_connections, indexer, quant
    from dsv4c.targets.tensorrt.kernels.common import next_pow2

    def ceil_div(a: Any, b: Any) -> Any:
        return _ceil_div(a, b, cdiv)

    def sig(ptrs_in: list[tuple[str, str]], ints: list[str], ptrs_out: list[tuple[str, str]], consts: dict) -> dict:
        ptrs_in = [(n, "bf16" if i in bf16_inputs else t) for i, (n, t) in enumerate(ptrs_in)]
        out = {n: f"*{t}" for n, t in ptrs_in} | {n: "i32" for n in ints} | {n: f"*{t}" for n, t in ptrs_out}
        return out | {n: "constexpr" for n in consts}

    if op == "fake_quant_fp8":
        k, block = shapes[0][-1], attrs["block"]
        rows = _prod(shapes[0][:-1]) if len(shapes[0]) > 1 else 1
        c = dict(BLOCK=block, BLOCK_P=next_pow2(block), BLOCK_R=quant.FAKE_QUANT_ROWS)
        return AotKernel(quant.fake_quant_fp8_kernel, sig([("x_ptr", "fp32")], ["R", "K"], [("y_ptr", "fp32")], c),
                         c, (ceil_div(rows, quant.FAKE_QUANT_ROWS), k // block, 1), [rows, k], n_inputs=1)
    if op == "hadamard_fp4":
        d = _static(shapes[0][-1], "hadamard_fp4: last dim of x")
        rows = _prod(shapes[0][:-1]) if len(shapes[0]) > 1 else 1
        c = dict(D=d, LOG2_D=int(math.log2(d)), SCALE=d ** -0.5, BLOCK_R=quant.HADAMARD_ROWS)
        return AotKernel(quant.hadamard_fp4_kernel, sig([("x_ptr", "fp32")], ["R"], [("y_ptr", "fp32")], c), c,
                         (ceil_div(rows, quant.HADAMARD_ROWS), 1, 1), [rows], n_inputs=1)
    if op in ("fp8_linear", "fp8_grouped_linear"):
        x, w = shapes[0], shapes[1]
        k = x[-1]
        g = x[-2] if op == "fp8_grouped_linear" else 1
        n = w[0] // g if op == "fp8_grouped_linear" else w[0]
        lead = x[:-2] if op == "fp8_grouped_linear" else x[:-1]
        m = _prod(lead) if lead else 1
        bm, bn = GEMM_TACTICS[tactic]
        c = dict(ACT_QUANT=bool(attrs["act_quant"]), LOWP_DOT=True, PRECISION="tf32x3",
                 BLOCK_M=bm, BLOCK_N=bn, E8M0=e8m0_scales)
        s = sig([("x_ptr", "fp32"), ("w_ptr", "u8"), ("ws_ptr", "u8" if e8m0_scales else "fp32")], ["M", "N", "K", "G"],
                [("y_ptr", "fp32")], c)
        return AotKernel(fp8_gemm.fp8_gemm_kernel, s, c, (ceil_div(m, bm), ceil_div(n, bn), g), [m, n, k, g],
                         n_inputs=3)
    if op == "sparse_attn":
        b, s_, h, d = shapes[0]
        d = _static(d, "sparse_attn: head dim of q")
        bh, bk, bd, dc, warps = attention.attn_blocks(d)
        rope = int(attrs.get("kv_rope", 0))  # > 0: packed FP8 rows (uint8)
        c = dict(D=d, SCALE=float(attrs["scale"]), BF16=bool(attrs["bf16"]), PRECISION="tf32x3", BLOCK_H=bh,
                 BLOCK_K=bk, BLOCK_D=bd, BLOCK_DC=dc, ROPE=rope, ROW_BYTES=kv_row_bytes(d, rope) if rope else 0)
        rows = "u8" if rope else "fp32"
        s = sig([("q_ptr", "fp32"), ("kv_ptr", rows), ("cmp_ptr", rows), ("sink_ptr", "fp32"), ("idx_ptr", "i64")],
                ["S", "H", "N", "M", "K"], [("o_ptr", "fp32")], c)
        return AotKernel(attention.sparse_attn_kernel, s, c, (b * s_, ceil_div(h, bh), 1),
                         [s_, h, shapes[1][1], shapes[2][1], shapes[4][2]], num_warps=warps, n_inputs=5)
    if op == "indexer_scores":
        b, s_, h, d = shapes[0]
        h = _static(h, "indexer_scores: head count of q")
        d = _static(d, "indexer_scores: head dim of q")
        bs, bh, bn, bd = indexer.indexer_blocks(h, d)
        packed = _static(shapes[1][2], "indexer_scores: last dim of k") != d  # packed FP4 rows are narrower
        c = dict(D=d, BF16=bool(attrs["bf16"]), PRECISION="tf32x3", BLOCK_S=bs, BLOCK_H=bh, BLOCK_N=bn, BLOCK_D=bd,
                 PACKED=packed)
        s = sig([("q_ptr", "fp32"), ("k_ptr", "u8" if packed else "fp32"), ("w_ptr", "fp32")], ["S", "H", "N"],
                [("out_ptr", "fp32")], c)
        n = shapes[1][1]
        return AotKernel(indexer.indexer_scores_kernel, s, c, (b, ceil_div(s_, bs), ceil_div(n, bn)), [s_, h, n],
                         n_inputs=3)
    if op == "compress_pool":
        b, length, cd = shapes[0]
        cc = 2 if attrs["overlap"] else 1
        d = _static(cd, "compress_pool: last dim of kv") // cc
        block_d = min(128, next_pow2(d))
        c = dict(RATIO=attrs["ratio"], C=cc, SPAN_P=next_pow2(cc * attrs["ratio"]), BLOCK_D=block_d)
        s = sig([("kv_ptr", "fp32"), ("score_ptr", "fp32"), ("ends_ptr", "i64")], ["L", "KN", "D"],
                [("out_ptr", "fp32")], c)
        kn = shapes[2][1]
        return AotKernel(compressor.compress_pool_kernel, s, c, (b * kn, ceil_div(d, block_d), 1), [length, kn, d],
                         n_inputs=3)
    if op == "hc_pre":
        b, s_, n, d = shapes[0]
        n = _static(n, "hc_pre: stream count n")
        c = dict(NS=n, ITERS=attrs["iters"], NORM_EPS=float(attrs["norm_eps"]), HC_EPS=float(attrs["hc_eps"]),
                 PRECISION="tf32x3", NP=max(16, n), NN=n * n,
                 **hyper_connections.HC_PRE_BLOCKS)
        s = sig([("x_ptr", "fp32"), ("fn_ptr", "fp32"), ("scale_ptr", "fp32"), ("base_ptr", "fp32")], ["T", "D"],
                [("y_ptr", "fp32"), ("post_ptr", "fp32"), ("comb_ptr", "fp32")], c)
        return AotKernel(hyper_connections.hc_pre_kernel, s, c,
                         (ceil_div(b * s_, hyper_connections.HC_PRE_BLOCKS["BLOCK_T"]), 1, 1), [b * s_, d], n_inputs=4,
                         n_outputs=3)
    if op == "hc_post":
        b, s_, n, d = shapes[1]
        n = _static(n, "hc_post: stream count n")
        block_d = 256
        c = dict(NS=n, NP=next_pow2(n), BLOCK_D=block_d)
        s = sig([("f_ptr", "fp32"), ("res_ptr", "fp32"), ("post_ptr", "fp32"), ("comb_ptr", "fp32")], ["T", "D"],
                [("out_ptr", "fp32")], c)
        return AotKernel(hyper_connections.hc_post_kernel, s, c, (b * s_, ceil_div(d, block_d), 1), [b * s_, d],
                         n_inputs=4)
    raise KeyError(f"op {op!r} has no AOT kernel (JIT only): {', '.join(AOT_OPS)} do")


def compile_aot(spec: AotKernel, target: Any = None) -> tuple[str, str, int]:
    """triton.compile the spec -> (kernel name, PTX with TensorRT's parameter list, dynamic shared bytes)."""
    import triton
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(spec.fn, spec.signature, constexprs=spec.constexprs), target=target)
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        if getattr(compiled.metadata, scratch, 0):
            raise RuntimeError(f"{compiled.metadata.name}: needs {scratch}={getattr(compiled.metadata, scratch)}, "
                               "which a TensorRT AOT plugin cannot provide")
    n_params = sum(1 for t in spec.signature.values() if t != "constexpr")
    return compiled.metadata.name, strip_hidden_params(compiled.asm["ptx"], compiled.metadata.name, n_params), \
        compiled.metadata.shared


def strip_hidden_params(ptx: str, name: str, n_params: int) -> str:
    """Triton >= 3.3 appends two pointer parameters (global / profile scratch) to every kernel; TensorRT passes
    only inputs, extra args and outputs. Drop the trailing ones if the body never reads them."""
    head = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if head is None:
        raise ValueError(f"kernel {name} not found in the PTX")
    params = [p.strip() for p in head.group(1).split(",") if p.strip()]
    extra = params[n_params:]
    for p in extra:
        pname = p.split()[-1]
        if ptx.count(pname) > 1:
            raise ValueError(f"{name}: hidden parameter {pname} is used by the kernel; cannot launch it from TensorRT")
    kept = ",\n\t".join(params[:n_params])
    return ptx[:head.start(1)] + "\n\t" + kept + "\n" + ptx[head.end(1):]


# ---- registration ----------------------------------------------------------------------------------------------
_REGISTERED = False


def register_all() -> None:
    """Register every dsv4 plugin with TensorRT (idempotent). Raises ToolchainMissing without tensorrt."""
    global _REGISTERED
    if _REGISTERED:
        return
    from dsv4c.targets.base import ToolchainMissing

    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except Exception as e:  # ImportError, or the bindings wheel without libnvinfer
        raise ToolchainMissing(f"the dsv4 TensorRT plugins need the `tensorrt` Python package (10.9+, with "
                               f"tensorrt.plugin) and its libraries; importing it failed: {e}") from None
    _register(trt, trtp)
    _REGISTERED = True


def _register(trt: Any, trtp: Any) -> None:  # noqa: C901  (one block per op, on purpose)
    from typing import List, Tuple

    import torch

    from dsv4c.graphs.ops.registry import OPS
    from dsv4c.targets.tensorrt.kernels import LAUNCHERS

    TD, T = trtp.TensorDesc, trtp.Tensor
    dtypes = {"float32": trt.float32, "int64": trt.int64, "uint8": trt.uint8}

    def desc(op: str, inputs: list, attrs: dict):
        shapes = [list(t.shape_expr) for t in inputs]
        outs = [trtp.from_shape_expr(tuple(s), dtype=dtypes[dt])
                for s, dt in zip(output_shapes(op, shapes, attrs, minimum=trtp.min), output_dtypes(op))]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def jit(op: str, inputs: list, attrs: dict, outputs, stream: int) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            args = [torch.as_tensor(t, device="cuda") for t in inputs]
            kinds = {a.name: str(a.type) for a in OPS[op].overload._schema.arguments}
            values = [bool(attrs[a]) if kinds[a] == "bool" else attrs[a] for a in OPS[op].attributes]
            result = LAUNCHERS[op](*args, *values)
            for out, value in zip(outputs, result if isinstance(result, tuple) else (result,)):
                torch.as_tensor(out, device="cuda").copy_(value.reshape(tuple(out.shape)))

    def aot(op: str, inputs: list, attrs: dict, tactic: int):
        bf16 = [i for i, t in enumerate(inputs) if t.dtype == trt.bfloat16]
        e8m0 = op in ("fp8_linear", "fp8_grouped_linear") and inputs[2].dtype == trt.uint8
        spec = aot_kernel(op, [list(t.shape_expr) for t in inputs], attrs, trtp.cdiv, tactic or 1, bf16, e8m0)
        name, ptx, shared = compile_aot(spec)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y, launch.grid_z = (trtp.ShapeExpr(v) if isinstance(v, int) else v
                                                       for v in spec.grid)
        launch.block_x = spec.num_warps * 32
        launch.shared_mem = shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in spec.scalars])
        return name.encode(), ptx.encode(), launch, extra

    # AOT plugins exist from the TensorRT release that added QuickPluginCreationRequest (10.9);
    # older ones get the JIT implementations only
    aot_enabled = hasattr(trt, "QuickPluginCreationRequest") and hasattr(trtp, "aot_impl")
    AotOut = Tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymExprs] if aot_enabled else None
    aot_impl = trtp.aot_impl if aot_enabled else (lambda plugin: (lambda fn: fn))

    # fp8_linear ---------------------------------------------------------------------------------------------
    @trtp.register(plugin_id("fp8_linear"))
    def _(x: TD, w: TD, w_scale: TD, act_quant: int) -> TD:
        return desc("fp8_linear", [x, w, w_scale], dict(act_quant=act_quant))

    @trtp.autotune(plugin_id("fp8_linear"))
    def _(x: TD, w: TD, w_scale: TD, act_quant: int, outputs: Tuple[TD]) -> List[trtp.AutoTuneCombination]:
        combo = trtp.AutoTuneCombination(FP8_LINEAR_TYPES, "LINEAR")
        combo.tactics(list(GEMM_TACTICS))
        return [combo]

    @trtp.impl(plugin_id("fp8_linear"))
    def _(x: T, w: T, w_scale: T, act_quant: int, outputs: Tuple[T], stream: int, tactic: int) -> None:
        jit("fp8_linear", [x, w, w_scale], dict(act_quant=act_quant), outputs, stream)

    @aot_impl(plugin_id("fp8_linear"))
    def _(x: TD, w: TD, w_scale: TD, act_quant: int, outputs: Tuple[TD], tactic: int) -> AotOut:
        return aot("fp8_linear", [x, w, w_scale], dict(act_quant=act_quant), tactic)

    # fp8_grouped_linear -------------------------------------------------------------------------------------
    @trtp.register(plugin_id("fp8_grouped_linear"))
    def _(x: TD, w: TD, w_scale: TD, act_quant: int) -> TD:
        return desc("fp8_grouped_linear", [x, w, w_scale], dict(act_quant=act_quant))

    @trtp.autotune(plugin_id("fp8_grouped_linear"))
    def _(x: TD, w: TD, w_scale: TD, act_quant: int, outputs: Tuple[TD]) -> List[trtp.AutoTuneCombination]:
        combo = trtp.AutoTuneCombination(FP8_LINEAR_TYPES, "LINEAR")
        combo.tactics(list(GEMM_TACTICS))
        return [combo]

    @trtp.impl(plugin_id("fp8_grouped_linear"))
    def _(x: T, w: T, w_scale: T, act_quant: int, outputs: Tuple[T], stream: int, tactic: int) -> None:
        jit("fp8_grouped_linear", [x, w, w_scale], dict(act_quant=act_quant), outputs, stream)

    @aot_impl(plugin_id("fp8_grouped_linear"))
    def _(x: TD, w: TD, w_scale: TD, act_quant: int, outputs: Tuple[TD], tactic: int) -> AotOut:
        return aot("fp8_grouped_linear", [x, w, w_scale], dict(act_quant=act_quant), tactic)

    # moe_experts (JIT only) -----------------------------------------------------------------------------------
    @trtp.register(plugin_id("moe_experts"))
    def _(x: TD, weights: TD, indices: TD, w1: TD, s1: TD, w3: TD, s3: TD, w2: TD, s2: TD, fmt: int,
          swiglu_limit: float, act_quant: int, bf16: int) -> TD:
        return desc("moe_experts", [x], {})

    @trtp.impl(plugin_id("moe_experts"))
    def _(x: T, weights: T, indices: T, w1: T, s1: T, w3: T, s3: T, w2: T, s2: T, fmt: int, swiglu_limit: float,
          act_quant: int, bf16: int, outputs: Tuple[T], stream: int) -> None:
        jit("moe_experts", [x, weights, indices, w1, s1, w3, s3, w2, s2],
            dict(fmt=fmt, swiglu_limit=swiglu_limit, act_quant=act_quant, bf16=bf16), outputs, stream)

    # fake_quant_fp8 -------------------------------------------------------------------------------------------
    @trtp.register(plugin_id("fake_quant_fp8"))
    def _(x: TD, block: int) -> TD:
        return desc("fake_quant_fp8", [x], dict(block=block))

    @trtp.impl(plugin_id("fake_quant_fp8"))
    def _(x: T, block: int, outputs: Tuple[T], stream: int) -> None:
        jit("fake_quant_fp8", [x], dict(block=block), outputs, stream)

    @aot_impl(plugin_id("fake_quant_fp8"))
    def _(x: TD, block: int, outputs: Tuple[TD], tactic: int) -> AotOut:
        return aot("fake_quant_fp8", [x], dict(block=block), tactic)

    # hadamard_fp4 ---------------------------------------------------------------------------------------------
    @trtp.register(plugin_id("hadamard_fp4"))
    def _(x: TD) -> TD:
        return desc("hadamard_fp4", [x], {})

    @trtp.impl(plugin_id("hadamard_fp4"))
    def _(x: T, outputs: Tuple[T], stream: int) -> None:
        jit("hadamard_fp4", [x], {}, outputs, stream)

    @aot_impl(plugin_id("hadamard_fp4"))
    def _(x: TD, outputs: Tuple[TD], tactic: int) -> AotOut:
        return aot("hadamard_fp4", [x], {}, tactic)

    # pack_kv_fp8, pack_fp4 (JIT only) ----------------------------------------------------------------------------
    @trtp.register(plugin_id("pack_kv_fp8"))
    def _(x: TD, rope_dim: int) -> TD:
        return desc("pack_kv_fp8", [x], dict(rope_dim=rope_dim))

    @trtp.impl(plugin_id("pack_kv_fp8"))
    def _(x: T, rope_dim: int, outputs: Tuple[T], stream: int) -> None:
        jit("pack_kv_fp8", [x], dict(rope_dim=rope_dim), outputs, stream)

    @trtp.register(plugin_id("pack_fp4"))
    def _(x: TD) -> TD:
        return desc("pack_fp4", [x], {})

    @trtp.impl(plugin_id("pack_fp4"))
    def _(x: T, outputs: Tuple[T], stream: int) -> None:
        jit("pack_fp4", [x], {}, outputs, stream)

    # sparse_attn ----------------------------------------------------------------------------------------------
    @trtp.register(plugin_id("sparse_attn"))
    def _(q: TD, kv: TD, cmp: TD, sink: TD, idx: TD, scale: float, bf16: int, kv_rope: int) -> TD:
        return desc("sparse_attn", [q, kv, cmp, sink, idx], dict(scale=scale, bf16=bf16, kv_rope=kv_rope))

    @trtp.impl(plugin_id("sparse_attn"))
    def _(q: T, kv: T, cmp: T, sink: T, idx: T, scale: float, bf16: int, kv_rope: int, outputs: Tuple[T],
          stream: int) -> None:
        jit("sparse_attn", [q, kv, cmp, sink, idx], dict(scale=scale, bf16=bf16, kv_rope=kv_rope), outputs, stream)

    @aot_impl(plugin_id("sparse_attn"))
    def _(q: TD, kv: TD, cmp: TD, sink: TD, idx: TD, scale: float, bf16: int, kv_rope: int, outputs: Tuple[TD],
          tactic: int) -> AotOut:
        return aot("sparse_attn", [q, kv, cmp, sink, idx], dict(scale=scale, bf16=bf16, kv_rope=kv_rope), tactic)

    # indexer_topk (JIT only) ----------------------------------------------------------------------------------
    @trtp.register(plugin_id("indexer_topk"))
    def _(q: TD, k: TD, w: TD, n_visible: TD, topk: int, bf16: int) -> TD:
        return desc("indexer_topk", [q, k, w, n_visible], dict(topk=topk, bf16=bf16))

    @trtp.impl(plugin_id("indexer_topk"))
    def _(q: T, k: T, w: T, n_visible: T, topk: int, bf16: int, outputs: Tuple[T], stream: int) -> None:
        jit("indexer_topk", [q, k, w, n_visible], dict(topk=topk, bf16=bf16), outputs, stream)

    # indexer_scores -------------------------------------------------------------------------------------------
    @trtp.register(plugin_id("indexer_scores"))
    def _(q: TD, k: TD, w: TD, bf16: int) -> TD:
        return desc("indexer_scores", [q, k, w], dict(bf16=bf16))

    @trtp.impl(plugin_id("indexer_scores"))
    def _(q: T, k: T, w: T, bf16: int, outputs: Tuple[T], stream: int) -> None:
        jit("indexer_scores", [q, k, w], dict(bf16=bf16), outputs, stream)

    @aot_impl(plugin_id("indexer_scores"))
    def _(q: TD, k: TD, w: TD, bf16: int, outputs: Tuple[TD], tactic: int) -> AotOut:
        return aot("indexer_scores", [q, k, w], dict(bf16=bf16), tactic)

    # compress_pool --------------------------------------------------------------------------------------------
    @trtp.register(plugin_id("compress_pool"))
    def _(kv: TD, score: TD, ends: TD, ratio: int, overlap: int) -> TD:
        return desc("compress_pool", [kv, score, ends], dict(ratio=ratio, overlap=overlap))

    @trtp.impl(plugin_id("compress_pool"))
    def _(kv: T, score: T, ends: T, ratio: int, overlap: int, outputs: Tuple[T], stream: int) -> None:
        jit("compress_pool", [kv, score, ends], dict(ratio=ratio, overlap=overlap), outputs, stream)

    @aot_impl(plugin_id("compress_pool"))
    def _(kv: TD, score: TD, ends: TD, ratio: int, overlap: int, outputs: Tuple[TD], tactic: int) -> AotOut:
        return aot("compress_pool", [kv, score, ends], dict(ratio=ratio, overlap=overlap), tactic)

    # hc_pre ---------------------------------------------------------------------------------------------------
    @trtp.register(plugin_id("hc_pre"))
    def _(x: TD, fn: TD, scale: TD, base: TD, iters: int, norm_eps: float, hc_eps: float) -> Tuple[TD, TD, TD]:
        return desc("hc_pre", [x, fn, scale, base], {})

    @trtp.impl(plugin_id("hc_pre"))
    def _(x: T, fn: T, scale: T, base: T, iters: int, norm_eps: float, hc_eps: float, outputs: Tuple[T],
          stream: int) -> None:
        jit("hc_pre", [x, fn, scale, base], dict(iters=iters, norm_eps=norm_eps, hc_eps=hc_eps), outputs, stream)

    @aot_impl(plugin_id("hc_pre"))
    def _(x: TD, fn: TD, scale: TD, base: TD, iters: int, norm_eps: float, hc_eps: float, outputs: Tuple[TD],
          tactic: int) -> AotOut:
        return aot("hc_pre", [x, fn, scale, base], dict(iters=iters, norm_eps=norm_eps, hc_eps=hc_eps), tactic)

    # hc_post --------------------------------------------------------------------------------------------------
    @trtp.register(plugin_id("hc_post"))
    def _(f: TD, res: TD, post: TD, comb: TD) -> TD:
        return desc("hc_post", [f, res, post, comb], {})

    @trtp.impl(plugin_id("hc_post"))
    def _(f: T, res: T, post: T, comb: T, outputs: Tuple[T], stream: int) -> None:
        jit("hc_post", [f, res, post, comb], {}, outputs, stream)

    @aot_impl(plugin_id("hc_post"))
    def _(f: TD, res: TD, post: TD, comb: TD, outputs: Tuple[TD], tactic: int) -> AotOut:
        return aot("hc_post", [f, res, post, comb], {}, tactic)
