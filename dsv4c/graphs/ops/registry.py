"""The dsv4 custom-op registry: the hot pieces of DeepSeek-V4 as `torch.library` custom ops.

Each op is declared once here with
  * its schema (tensors + static attributes only, so every target can implement it),
  * a plain PyTorch reference implementation (the ground truth every target is tested against),
  * its signature beyond the schema (ONNX output names, output dtypes, non-float inputs) and ONE shape rule,
    which gives the fake (meta) kernel torch.export traces with, ONNX shape inference and the TensorRT
    plugins' output descriptors.
Targets add their own implementation per op name (ONNX function body, C++ ORT kernel, TensorRT plugin, CANN
mapping) in their own packages, each with a table of what it implements (`dsv4c.targets.coverage`); `OPS` is
the list they iterate.

Conventions shared by all ops:
  * activations are float32 tensors; "bf16" attributes round results to bfloat16 where the DeepSeek
    reference stores bfloat16 (computing in fp32 and rounding keeps CPUs on their fast fp32 paths);
  * FP8 weights are uint8 bit patterns of float8_e4m3fn with float32 block scales (128x128);
  * FP4 weights are uint8 bytes holding two e2m1 values (low nibble first) with float32 scales per 1x32;
  * BF16 checkpoint weights (embedding, head, gate, compressor and indexer projections) stay bfloat16 and are
    widened to fp32 inside the op, as the reference holds them in FP32 (spec §5.4): same values, half the
    bytes of a float32 copy;
  * index tensors are int64 and use -1 for "no entry";
  * cache rows are float32, bf16 (values that are bf16), or uint8 rows packed in the deployed formats
    (quant.pack_kv_fp8 / pack_fp4_rows: FP8 KV rows with bf16 RoPE dims, FP4 indexer keys), which the ops that
    read them unpack to exactly the floats the QAT simulation computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from dsv4c.graphs import quant
from dsv4c.graphs.quant import FP4_BLOCK, FP8_BLOCK, ExpertFormat


class DimMath:
    """Arithmetic on dims for the ops' shape rules. `+ - *` apply to dims directly; division and minimum go
    through here, because each user has its own dim type: ints and SymInts (the fake kernels), ONNX shape
    inference (ints, dim names or None for unknown), TensorRT's shape expressions (no Python `min`)."""

    @staticmethod
    def div(a, b):
        return a // b

    @staticmethod
    def min(a, b):
        return min(a, b)


@dataclass(frozen=True)
class OpDef:
    """Everything about one dsv4 op that is not a target's implementation: its schema and reference, and the
    one shape/dtype rule the fake kernel, ONNX shape inference and the TensorRT output descriptors all use."""

    name: str  # torch name: torch.ops.dsv4.<name>
    onnx_name: str  # op type in the ONNX `dsv4` domain
    schema: str
    reference: Callable
    doc: str
    shape: Callable  # (input shapes in tensor-input order, attributes, DimMath) -> output shapes
    attributes: tuple[str, ...] = field(default=())  # static (non-tensor) arguments, in schema order
    outputs: tuple[str, ...] = ("y",)  # output names of the ONNX node
    # "float32" / "int64", or "like:<input>": the dtype of that tensor input (a cache written in its own format)
    output_dtypes: tuple[str, ...] = ("float32",)
    input_dtypes: dict[str, str] = field(default_factory=dict)  # tensor inputs that are not float32 activations
    # a collective (graphs/parallel.py): it talks to other ranks, so it has no ONNX function body; a target runs
    # it through its communication library (torch.distributed on CPU, NCCL, HCCL)
    collective: bool = False
    # its ONNX function body is made of operators every vendor runs natively (Cast, MatMul): TensorRT and CANN
    # bundles get the body inlined instead of a custom node (the CPU keeps the node for its C++ kernel)
    vendor_native: bool = False

    @property
    def overload(self) -> torch._ops.OpOverload:
        return getattr(torch.ops.dsv4, self.name).default

    @property
    def tensor_inputs(self) -> list[str]:
        """Names of the op's Tensor arguments, in schema order (= the ONNX node's inputs)."""
        return [a.name for a in self.overload._schema.arguments if isinstance(a.type, torch.TensorType)]

    def output_shapes(self, shapes, attrs: dict, math: type[DimMath] | DimMath = DimMath) -> list:
        return [list(s) for s in self.shape(shapes, attrs, math)]


OPS: dict[str, OpDef] = {}
_TORCH_DTYPES = {"float32": torch.float32, "int64": torch.int64, "uint8": torch.uint8}
# cache rows the ops read / write: float32, bf16 where the values are bf16, or uint8 rows in a packed format
CACHE_ROWS = "float32|bfloat16|uint8"


def like_input(dtype: str) -> str | None:
    """The tensor input an output dtype "like:<input>" names, else None."""
    return dtype.removeprefix("like:") if dtype.startswith("like:") else None


def _register(name: str, onnx_name: str, schema: str, shape: Callable, attributes: tuple[str, ...] = (),
              **signature):
    """Define `dsv4::name` with the decorated function as its reference kernel; its fake (meta) kernel is the
    shape rule applied to the fake inputs. `signature`: OpDef's outputs / output_dtypes / input_dtypes."""

    def wrap(reference: Callable) -> Callable:
        lib_name = f"dsv4::{name}"
        op = OpDef(name, onnx_name, schema, reference, (reference.__doc__ or "").strip(), shape, attributes,
                   **signature)
        torch.library.define(lib_name, schema)
        torch.library.impl(lib_name, "CompositeExplicitAutograd")(reference)
        torch.library.register_fake(lib_name)(_fake_kernel(op))
        OPS[name] = op
        return reference

    return wrap


def _fake_kernel(op: OpDef) -> Callable:
    def fake(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        attrs = dict(zip(op.attributes, args[len(tensors):]))
        by_name = dict(zip(op.tensor_inputs, tensors))
        dtypes = [by_name[like_input(dt)].dtype if like_input(dt) else _TORCH_DTYPES[dt] for dt in op.output_dtypes]
        outs = [tensors[0].new_empty(shape, dtype=dtype)
                for shape, dtype in zip(op.output_shapes([list(t.shape) for t in tensors], attrs), dtypes)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    return fake


def round_bf16(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    return x.to(torch.bfloat16).float() if enabled else x


# ---- weight decoding (shared by the linear ops) ----------------------------------------------------------
def decode_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 bits [N, K] + f32 scale [ceil(N/128), ceil(K/128)] -> f32 [N, K]. Each byte through a table
    of the 256 e4m3 values (torch's own float8 -> float conversion is 1.7x slower), scales broadcast over their
    blocks (expanded only for a ragged edge)."""
    n, k = w.shape
    values = F.embedding(w.view(torch.uint8).int(), _fp8_table(w.device)).view(n, k)
    if n % FP8_BLOCK or k % FP8_BLOCK:
        return values * scale.repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]
    blocks = values.view(n // FP8_BLOCK, FP8_BLOCK, k // FP8_BLOCK, FP8_BLOCK)
    return (blocks * scale[:, None, :, None]).view(n, k)


def _fp8_table(device: torch.device) -> torch.Tensor:
    """[256, 1]: the e4m3 value of every byte (0x7f / 0xff: NaN)."""
    codes = torch.arange(256, dtype=torch.int32, device=device).to(torch.uint8)
    return codes.view(torch.float8_e4m3fn).float()[:, None]


def decode_fp4(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 packed e2m1 [N, K/2] + f32 scale [N, K/32] -> f32 [N, K]."""
    values = quant.unpack_fp4(w.view(torch.int8))  # [N, K]
    return (values.unflatten(-1, (-1, FP4_BLOCK)) * scale[..., None]).flatten(-2)


def decode_expert(w: torch.Tensor, scale: torch.Tensor, fmt: int) -> torch.Tensor:
    if fmt == ExpertFormat.FP4:
        return decode_fp4(w, scale)
    if fmt == ExpertFormat.FP8:
        return decode_fp8(w, scale)
    return w.float()


def _expert_weight(w: torch.Tensor, scale: torch.Tensor, e: int, fmt: int) -> torch.Tensor:
    """Expert e of stacked weights. Float experts carry no scales (model.Experts passes an empty tensor), so
    the scale is indexed only for the quantised formats."""
    return decode_expert(w[e], scale[e] if fmt != ExpertFormat.FLOAT else scale, fmt)


# ---- quantized linears -----------------------------------------------------------------------------------
@_register("fp8_linear", "Fp8Linear", "(Tensor x, Tensor w, Tensor w_scale, bool act_quant) -> Tensor",
           lambda s, a, m: [[*s[0][:-1], s[1][0]]], ("act_quant",), input_dtypes={"w": "uint8"})
def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, act_quant: bool) -> torch.Tensor:
    """y[..., N] = q(x)[..., K] @ dequant(w)[N, K]^T. Weights FP8 e4m3 with 128x128 e8m0 scales; with
    act_quant, x is quantised to FP8 per token and 128 channels with power-of-two scales first (W8A8)."""
    if act_quant:
        x = quant.fake_quant_fp8(x, FP8_BLOCK)
    return F.linear(x.float(), decode_fp8(w, w_scale))


@_register("fp8_grouped_linear", "Fp8GroupedLinear",
           "(Tensor x, Tensor w, Tensor w_scale, bool act_quant) -> Tensor",
           lambda s, a, m: [[*s[0][:-1], m.div(s[1][0], s[0][-2])]], ("act_quant",), input_dtypes={"w": "uint8"})
def fp8_grouped_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, act_quant: bool) -> torch.Tensor:
    """Grouped low-rank projection (`wo_a`): x [..., G, K], w FP8 [G*R, K] -> y[..., g, :] = x[..., g, :] @ w_g^T."""
    if act_quant:
        x = quant.fake_quant_fp8(x, FP8_BLOCK)
    g, k = x.shape[-2], x.shape[-1]
    wg = decode_fp8(w, w_scale).view(g, -1, k)  # [G, R, K]
    return torch.einsum("...gk,grk->...gr", x.float(), wg)


@_register("bf16_linear", "Bf16Linear", "(Tensor x, Tensor w) -> Tensor",
           lambda s, a, m: [[*s[0][:-1], s[1][0]]], input_dtypes={"w": "bfloat16"}, vendor_native=True)
def bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y[..., N] = x[..., K] @ float(w)[N, K]^T in fp32. w is a BF16 checkpoint weight the reference holds
    and multiplies in FP32 (head, gate, compressor wkv/wgate, indexer weights_proj); the engine keeps it BF16.
    A weight whose FP32 copy would pass WIDEN_ROWS_BYTES is widened a slice of output rows at a time: V4-Flash's
    head (129,280 x 4096) would otherwise add a transient 2.1 GB to the validation's working set. Each output
    element is still one K-long dot product (slicing N leaves the reduction over K as it is)."""
    x = x.float()
    rows = max(1, WIDEN_ROWS_BYTES // (4 * w.shape[-1]))
    if w.shape[0] <= rows:
        return F.linear(x, w.float())
    return torch.cat([F.linear(x, part.float()) for part in w.split(rows)], dim=-1)


WIDEN_ROWS_BYTES = 256 << 20  # the FP32 copy of a BF16 weight the reference holds at once (bf16_linear)


_PACKED_OR_FLOAT = "uint8|float32"  # expert weights: packed bytes (FP4 / FP8) or float


@_register("moe_experts", "MoeExperts",
           "(Tensor x, Tensor weights, Tensor indices, Tensor w1, Tensor s1, Tensor w3, Tensor s3, Tensor w2, "
           "Tensor s2, int fmt, float swiglu_limit, bool act_quant, bool bf16) -> Tensor",
           lambda s, a, m: [s[0]], ("fmt", "swiglu_limit", "act_quant", "bf16"),
           input_dtypes={"indices": "int64", "w1": _PACKED_OR_FLOAT, "w3": _PACKED_OR_FLOAT, "w2": _PACKED_OR_FLOAT})
def moe_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor,
                w3: torch.Tensor, s3: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor, fmt: int,
                swiglu_limit: float, act_quant: bool, bf16: bool) -> torch.Tensor:
    """Routed experts: x [T, D], routing weights [T, k] f32, expert ids [T, k] int64.
    Expert weights stacked [E, ...]: fmt 0 = FP4 (w [E,N,K/2] u8, s [E,N,K/32]), 1 = FP8 (w [E,N,K] u8,
    s [E,N/128,K/128]), 2 = float (w [E,N,K], s unused). Per expert e: g = w1 x, u = w3 x (clamped: u in
    [-L, L], g <= L), h = silu(g) * u * routing_weight (applied BEFORE w2), y = w2 h; out = sum over picks."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(indices).tolist():
        if e < 0:
            continue
        tok, slot = torch.where(indices == e)
        xe = x[tok].float()
        if act_quant:
            xe = quant.fake_quant_fp8(xe, FP8_BLOCK)
        gate = round_bf16(F.linear(xe, _expert_weight(w1, s1, e, fmt)), bf16)
        up = round_bf16(F.linear(xe, _expert_weight(w3, s3, e, fmt)), bf16)
        if swiglu_limit > 0:
            up = up.clamp(-swiglu_limit, swiglu_limit)
            gate = gate.clamp(max=swiglu_limit)
        h = round_bf16(F.silu(gate) * up * weights[tok, slot, None], bf16)
        if act_quant:
            h = quant.fake_quant_fp8(h, FP8_BLOCK)
        y.index_add_(0, tok, round_bf16(F.linear(h, _expert_weight(w2, s2, e, fmt)), bf16))
    return y


# ---- QAT simulations -------------------------------------------------------------------------------------
def _same_shape(s, a, m):
    return [s[0]]


@_register("fake_quant_fp8", "FakeQuantFp8", "(Tensor x, int block) -> Tensor", _same_shape, ("block",))
def fake_quant_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """FP8 e4m3 quantise-dequantise along the last dim in blocks of `block`, power-of-two scales (KV sim)."""
    return quant.fake_quant_fp8(x.float(), block)


@_register("hadamard_fp4", "HadamardFp4", "(Tensor x) -> Tensor", _same_shape)
def hadamard_fp4(x: torch.Tensor) -> torch.Tensor:
    """Indexer QAT: orthonormal Walsh-Hadamard rotation of the last dim, rounded to bf16 (the reference's
    Hadamard takes and returns bf16, spec §3.9.3), then FP4 e2m1 quantise-dequantise in blocks of 32 with
    power-of-two scales."""
    return quant.fake_quant_fp4(round_bf16(quant.hadamard(x.float()), True), FP4_BLOCK)


# ---- packed cache rows -------------------------------------------------------------------------------------------
def _pad8(n, m):
    return m.div(n + 7, 8) * 8


@_register("pack_kv_fp8", "PackKvFp8", "(Tensor x, int rope_dim) -> Tensor",
           lambda s, a, m: [[*s[0][:-1], _pad8(s[0][-1] + a["rope_dim"] + m.div(s[0][-1] - a["rope_dim"],
                                                                                 quant.KV_SCALE_BLOCK), m)]],
           ("rope_dim",), output_dtypes=("uint8",))
def pack_kv_fp8(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """KV rows [..., D] -> the FP8 cache row format [..., kv_row_bytes(D, rope_dim)] uint8 (quant.py): the D -
    rope_dim non-RoPE dims FP8 e4m3 in blocks of 64 with power-of-two scales rounded up (the reference's KV
    simulation, act_quant(kv, 64, ue8m0)), the RoPE dims bf16, then the e8m0 scales. Unpacked, a row is exactly
    the simulation's values."""
    return quant.pack_kv_fp8(x, rope_dim)


@_register("pack_fp4", "PackFp4", "(Tensor x) -> Tensor",
           lambda s, a, m: [[*s[0][:-1], m.div(s[0][-1], 2) + m.div(s[0][-1], FP4_BLOCK)]],
           output_dtypes=("uint8",))
def pack_fp4(x: torch.Tensor) -> torch.Tensor:
    """Rows [..., d] -> the FP4 cache row format [..., d/2 + d/32] uint8 (quant.py): e2m1 in blocks of 32 with
    power-of-two scales rounded up, two values per byte (low nibble first), then the e8m0 scales. The indexer's
    keys come out of hadamard_fp4 already FP4-valued: packing them loses nothing."""
    return quant.pack_fp4_rows(x)


def unpack_rows(rows: torch.Tensor, dim: int, rope_dim: int = 0) -> torch.Tensor:
    """Cache rows as float32 [..., dim]: packed uint8 rows unpacked (FP8 KV rows with `rope_dim` RoPE dims, or FP4
    rows when rope_dim is 0), float / bf16 rows widened."""
    if rows.dtype != torch.uint8:
        return rows.float()
    return quant.unpack_kv_fp8(rows, dim, rope_dim) if rope_dim else quant.unpack_fp4_rows(rows, dim)


# ---- norms and rotations ---------------------------------------------------------------------------------
@_register("rms_norm", "RmsNorm", "(Tensor x, Tensor weight, float eps, bool bf16) -> Tensor", _same_shape,
           ("eps", "bf16"), vendor_native=True)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, bf16: bool) -> torch.Tensor:
    """x [..., D] * rsqrt(mean(x^2 over D) + eps) * weight [D], in fp32 (the reference's RMSNorm on x.float()):
    (x * rsqrt) first, then * weight. With `bf16`, the reference's RMSNorm of a bf16 tensor: x rounded to bf16 on
    the way in, the result on the way out."""
    x = round_bf16(x.float(), bf16)
    return round_bf16(x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight.float(), bf16)


@_register("head_rescale", "HeadRescale", "(Tensor x, float eps, bool bf16) -> Tensor", _same_shape,
           ("eps", "bf16"), vendor_native=True)
def head_rescale(x: torch.Tensor, eps: float, bf16: bool) -> torch.Tensor:
    """Weightless RMS rescale of each row of the last dim: x * rsqrt(mean(x^2) + eps). With `bf16` it runs as the
    reference runs it op by op on bf16 q (spec §3.9.1): the squares, their mean, + eps, rsqrt and the product each
    rounded to bf16, which is not an fp32 RMS rounded once."""
    x = x.float()
    if not bf16:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    mean_sq = round_bf16(round_bf16(x.square(), True).mean(-1, keepdim=True), True)
    return round_bf16(x * round_bf16(torch.rsqrt(round_bf16(mean_sq + eps, True)), True), True)


@_register("rope", "Rope", "(Tensor x, Tensor freqs, Tensor pos, bool inverse, bool bf16) -> Tensor", _same_shape,
           ("inverse", "bf16"), input_dtypes={"pos": "int64"}, vendor_native=True)
def rope(x: torch.Tensor, freqs: torch.Tensor, pos: torch.Tensor, inverse: bool, bf16: bool) -> torch.Tensor:
    """Interleaved (GPT-J) RoPE on the trailing r = 2 len(freqs) dims of x [B, S, ..., D] at positions pos [B, S]:
    pair i = (x[2i], x[2i+1]) of the rotated part turns by angle pos * freqs[i] (an fp32 product, as the
    reference's table), y = (x0 cos - x1 sin, x0 sin + x1 cos), each product and sum rounded on its own (the
    reference's complex product); `inverse` turns by -angle (the reference's conjugate: sin negated). The
    leading D - r dims pass through. With `bf16` the result is rounded to bf16, as every caller stores it."""
    r = 2 * freqs.shape[0]
    angle = pos.float()[..., None] * freqs.float()  # [B, S, r/2]
    while angle.dim() < x.dim():
        angle = angle.unsqueeze(-2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    if inverse:
        sin = -sin
    x = x.float()
    x0, x1 = x[..., -r::2], x[..., -r + 1::2]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    return round_bf16(torch.cat([x[..., :-r], rotated], dim=-1), bf16)


# ---- attention -------------------------------------------------------------------------------------------
ATTN_BLOCK = 64  # picks per online-softmax block, as DeepSeek's sparse_attn kernel


@_register("sparse_attn", "SparseAttn",
           "(Tensor q, Tensor kv, Tensor cmp, Tensor sink, Tensor idx, float scale, bool bf16, int kv_rope) -> Tensor",
           _same_shape, ("scale", "bf16", "kv_rope"),
           input_dtypes={"idx": "int64", "kv": CACHE_ROWS, "cmp": CACHE_ROWS})
def sparse_attn(q: torch.Tensor, kv: torch.Tensor, cmp: torch.Tensor, sink: torch.Tensor, idx: torch.Tensor,
                scale: float, bf16: bool, kv_rope: int) -> torch.Tensor:
    """q [B,S,H,D]; the key (= value) rows in two parts, kv [B,N,D] (window and new tokens) and cmp [B,M,D]
    (compressed entries; M may be 0), both float / bf16 or both packed FP8 rows [B,*,kv_row_bytes(D, kv_rope)]
    uint8 (kv_rope: their RoPE dims; 0 for value rows); sink [H], idx [B,S,K] int64 rows of [kv | cmp]
    (row N + j is cmp's row j; -1 = none). Two parts because the compressed entries are a cache as long as
    the context allows: joining them to the window each step would copy all of it.
    o[b,s,h] = sum_k p_k rows[idx_k] with p = exp(l_k) / (sum_j exp(l_j) + exp(sink_h)), l = scale q.row,
    computed as DeepSeek's kernel does (spec §3.9.2): an online softmax over blocks of 64 picks in idx order;
    per block the unnormalised exp(l - running max) are rounded to bf16 (with `bf16`) before the P.V product,
    the denominator sums them unrounded, and the sink joins the denominator at the end."""
    b, s, h, d = q.shape
    out = torch.empty(b, s, h, d, dtype=torch.float32, device=q.device)
    kvf = torch.cat([unpack_rows(kv, d, kv_rope), unpack_rows(cmp, d, kv_rope)], dim=1)
    for s0 in range(0, s, 64):  # query blocks bound the gathered [B, s, K, D] tensor
        ib = idx[:, s0:s0 + 64]  # [B, s, K]
        qb = q[:, s0:s0 + 64].float()
        run_max = torch.full(qb.shape[:3], float("-inf"), device=q.device)
        denom = torch.zeros(qb.shape[:3], device=q.device)
        acc = torch.zeros_like(qb)
        for k0 in range(0, ib.shape[2], ATTN_BLOCK):
            kb = ib[..., k0:k0 + ATTN_BLOCK]
            rows = torch.gather(kvf, 1, kb.clamp(min=0).flatten(1)[..., None].expand(-1, -1, d))
            rows = rows.view(b, kb.shape[1], kb.shape[2], d)  # [B, s, k, D]
            logits = torch.einsum("bshd,bskd->bshk", qb, rows) * scale
            logits = logits.masked_fill((kb < 0)[:, :, None, :], float("-inf"))
            new_max = torch.maximum(run_max, logits.amax(-1))
            shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))  # no -inf - -inf
            rescale = torch.exp(run_max - shift)
            p = torch.exp(logits - shift[..., None])
            denom = denom * rescale + p.sum(-1)
            acc = acc * rescale[..., None] + torch.einsum("bshk,bskd->bshd", round_bf16(p, bf16), rows)
            run_max = new_max
        shift = torch.where(torch.isfinite(run_max), run_max, torch.zeros_like(run_max))
        denom = denom + torch.exp(sink.float().view(1, 1, h) - shift)
        out[:, s0:s0 + 64] = acc / denom[..., None]
    return out


@_register("indexer_topk", "IndexerTopK",
           "(Tensor q, Tensor k, Tensor w, Tensor n_visible, int topk, bool bf16) -> Tensor",
           lambda s, a, m: [[s[0][0], s[0][1], m.min(a["topk"], s[1][1])]], ("topk", "bf16"),
           output_dtypes=("int64",), input_dtypes={"n_visible": "int64", "k": CACHE_ROWS})
def indexer_topk(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, n_visible: torch.Tensor,
                 topk: int, bf16: bool) -> torch.Tensor:
    """Lightning indexer: q [B,S,h,d], compressed keys k [B,N,d] (or packed FP4 rows, uint8), head weights w [B,S,h] (already scaled),
    n_visible [B,S] = entries each query may see. score[j] = sum_h w_h relu(q_h . k_j); with `bf16` each
    q_h . k_j, each w_h relu(.) and the head sum are rounded to bf16 as the reference's bf16 einsum, product
    and reduction do (spec §3.9.4). Entries j >= n_visible are -inf; returns the top-min(topk, N) entry ids
    [B,S,K] in descending score order, with -1 for picks that are not visible. Equal scores are ordered by
    entry id, lower first (ONNX TopK's rule, which every target kernel follows), so the picks are deterministic
    even when ties straddle the k-th place (the reference's own tie order is CPU torch.topk's, unspecified)."""
    scores = indexer_scores(q, k, w, bf16)  # [B, S, N]
    entry = torch.arange(k.shape[1], device=k.device)
    hidden = entry.view(1, 1, -1) >= n_visible[..., None]
    scores = scores.masked_fill(hidden, float("-inf"))
    # torch.topk leaves the order of ties unspecified; a stable descending sort keeps lower ids first
    picks = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :min(topk, k.shape[1])]
    return torch.where(picks >= n_visible[..., None], torch.full_like(picks, -1), picks)


@_register("indexer_scores", "IndexerScores", "(Tensor q, Tensor k, Tensor w, bool bf16) -> Tensor",
           lambda s, a, m: [[s[0][0], s[0][1], s[1][1]]], ("bf16",), input_dtypes={"k": CACHE_ROWS})
def indexer_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The lightning indexer's scores over the heads it is given: q [B,S,h,d], k [B,N,d] (or packed FP4 rows), w [B,S,h] ->
    score [B,S,N] = sum_h w_h relu(q_h . k_j), rounded to bf16 as indexer_topk does (spec §3.9.4); no mask.
    Under tensor parallelism each rank scores its own heads and the partial scores are all-reduced before the
    top-k (spec §2.5)."""
    keys = unpack_rows(k, q.shape[-1])
    scores = round_bf16(torch.einsum("bshd,bnd->bshn", q.float(), keys), bf16).relu()
    scores = round_bf16(scores * w.float()[..., None], bf16)
    return round_bf16(scores.sum(dim=2), bf16)


# ---- collectives (graphs/parallel.py) ------------------------------------------------------------------------
@_register("all_reduce", "AllReduce", "(Tensor x, int group) -> Tensor", lambda s, a, m: [s[0]], ("group",),
           collective=True)
def all_reduce(x: torch.Tensor, group: int) -> torch.Tensor:
    """Sum of x over the ranks of `group` (parallel.GROUP_TENSOR or GROUP_EXPERT of this rank's mesh), float32."""
    from dsv4c.graphs import parallel

    return parallel.all_reduce(x, group)


@_register("all_gather", "AllGather", "(Tensor x, int group, int size) -> Tensor",
           lambda s, a, m: [[*s[0][:-1], s[0][-1] * a["size"]]], ("group", "size"), collective=True)
def all_gather(x: torch.Tensor, group: int, size: int) -> torch.Tensor:
    """x of the `size` ranks of `group` concatenated along the last dim in rank order (vocabulary-parallel
    logits), float32."""
    from dsv4c.graphs import parallel

    return parallel.all_gather(x, group, size)


# ---- compressor ------------------------------------------------------------------------------------------
@_register("compress_pool", "CompressPool", "(Tensor kv, Tensor score, Tensor ends, int ratio, bool overlap) -> Tensor",
           lambda s, a, m: [[s[0][0], s[2][1], m.div(s[0][2], 2 if a.get("overlap") else 1)]], ("ratio", "overlap"),
           input_dtypes={"ends": "int64"})
def compress_pool(kv: torch.Tensor, score: torch.Tensor, ends: torch.Tensor, ratio: int,
                  overlap: bool) -> torch.Tensor:
    """Gated pooling of raw token rows into compressed entries. kv, score [B, L, c*d] (score already has the
    position bias `ape`; rows that hold no token have score -inf), ends [B, K] = row of each window's last
    token (-1 = no entry). Without overlap (c=1) entry = sum over the window's m rows of softmax_rows(score)
    * kv, per channel. With overlap (c=2, CSA) the candidates are the previous window's rows with channels
    [:d] and the window's own rows with channels [d:] (2m candidates). Returns [B, K, d] (zeros for -1).

    Preconditions (the caller's job; nothing is checked at run time, targets may assume them):
      * c = 2 if overlap else 1, and the last dim of kv and score is c*d (d = compressed entry width);
      * rows are in position order: the span = c*ratio rows ending at row `ends[b, k]` are, oldest first,
        the previous window (overlap only, `ratio` rows) then the window's own `ratio` tokens, in offset
        order (offset p got ape[p]);
      * every entry that is not -1 satisfies span - 1 <= ends[b, k] < L: the whole span lies inside the
        tensor. Smaller values are clamped to span - 1 (reading the wrong rows), not rejected;
      * the window's own `ratio` rows hold real tokens (finite scores); only the previous-window half may be
        padding (score -inf, e.g. before position 0). A channel whose candidates are all -inf gives NaN;
      * kv is finite everywhere, padding rows included (0 * inf would be NaN)."""
    b, _, cd = kv.shape
    c = 2 if overlap else 1
    d = cd // c
    span = c * ratio
    offs = torch.arange(span, device=kv.device) - (span - 1)  # rows e-span+1 .. e
    rows = (ends.clamp(min=span - 1)[..., None] + offs).flatten(1)  # [B, K*span]
    g_kv = torch.gather(kv.float(), 1, rows[..., None].expand(-1, -1, cd)).view(b, -1, span, cd)
    g_sc = torch.gather(score.float(), 1, rows[..., None].expand(-1, -1, cd)).view(b, -1, span, cd)
    if overlap:  # first m rows: previous window, channels [:d]; last m rows: this window, channels [d:]
        g_kv = torch.cat([g_kv[:, :, :ratio, :d], g_kv[:, :, ratio:, d:]], dim=2)
        g_sc = torch.cat([g_sc[:, :, :ratio, :d], g_sc[:, :, ratio:, d:]], dim=2)
    pooled = (g_kv * g_sc.softmax(dim=2)).sum(dim=2)  # [B, K, d]
    return torch.where((ends >= 0)[..., None], pooled, torch.zeros_like(pooled))


# ---- manifold-constrained hyper-connections --------------------------------------------------------------
@_register("hc_pre", "HcPre",
           "(Tensor x, Tensor fn, Tensor scale, Tensor base, int iters, float norm_eps, float hc_eps) "
           "-> (Tensor, Tensor, Tensor)",
           lambda s, a, m: [[*s[0][:2], s[0][3]], s[0][:3], [*s[0][:3], s[0][2]]], ("iters", "norm_eps", "hc_eps"),
           outputs=("y", "post", "comb"), output_dtypes=("float32",) * 3)
def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
           norm_eps: float, hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC pre: x [B,S,n,D] streams, fn [(2+n)n, nD]. mix = (flat(x) @ fn^T) * rsqrt(mean(flat(x)^2) + eps);
    pre = sigmoid(mix[:n]*scale0 + base) + hc_eps; post = 2 sigmoid(mix[n:2n]*scale1 + base);
    comb = Sinkhorn(softmax_rows(mix[2n:]*scale2 + base) + hc_eps) with `iters` row/col passes (first pass
    column only). Returns y = sum_j pre_j x_j [B,S,D], post [B,S,n], comb [B,S,n,n]."""
    b, s, n, d = x.shape
    flat = x.float().flatten(2)
    mix = F.linear(flat, fn.float()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    pre = torch.sigmoid(mix[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = (mix[..., 2 * n:] * scale[2] + base[2 * n:]).view(b, s, n, n)
    comb = comb.softmax(dim=-1) + hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    y = (pre[..., None] * x.float()).sum(dim=2)
    return y, post, comb


@_register("hc_post", "HcPost", "(Tensor f, Tensor res, Tensor post, Tensor comb) -> Tensor",
           lambda s, a, m: [s[1]])
def hc_post(f: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC post: out[:,:,k] = post_k f + sum_j comb[j,k] res_j (comb applied transposed). f [B,S,D],
    res [B,S,n,D], post [B,S,n], comb [B,S,n,n] -> [B,S,n,D]."""
    res, comb = res.float(), comb.float()
    mixed = comb[:, :, 0, :, None] * res[:, :, 0, None, :]
    for j in range(1, res.shape[2]):  # summed over j in order, as the reference's torch.sum (model.py:685)
        mixed = mixed + comb[:, :, j, :, None] * res[:, :, j, None, :]
    return post.float()[..., None] * f.float()[:, :, None, :] + mixed


# ---- cache updates -----------------------------------------------------------------------------------------
@_register("cache_write", "CacheWrite", "(Tensor cache, Tensor rows, Tensor slots) -> Tensor", _same_shape,
           input_dtypes={"slots": "int64", "cache": CACHE_ROWS, "rows": CACHE_ROWS}, output_dtypes=("like:cache",),
           vendor_native=True)
def cache_write(cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [B, N, D] with rows[b, k] written at row slots[b, k] (slots [B, K] int64; a slot outside [0, N),
    e.g. -1, is not written; the written slots of a batch row are distinct). rows come in the cache's dtype
    (float32, or bf16 for rows whose values are bf16: the engine stores those as the reference does). A step's
    cache update as one op: the few rows it writes, instead of a select over every row of the cache (the cache
    grows with the context)."""
    b, n, d = cache.shape
    padded = torch.cat([cache, cache.new_zeros(b, 1, d)], 1)  # row n: where the unwritten picks land
    slot = torch.where((slots >= 0) & (slots < n), slots, n)
    batch = torch.arange(b, device=cache.device)[:, None].expand_as(slot)
    return padded.index_put((batch, slot), rows)[:, :n]
