"""How each dsv4 op reaches an Ascend NPU: the CANN operators (names, inputs, attributes) the CANN bundle uses,
and, for the V4 ops no public CANN operator implements with our contract, the nearest one and what differs.

Two kinds of custom nodes appear in a CANN bundle (ONNX opset 18, what ATC parses):

  * domain `dsv4.cann`: the node's op type IS a CANN (GE IR) operator type and its attributes carry the IR's
    attribute names, so the ONNX parser plugin the bundle ships (`cann_plugin/dsv4c_onnx_plugin.cpp`) maps it
    with `AutoMappingByOpFn` (attributes copied by name). Two of them are dsv4c's own (`MoeExpertsInt`,
    `MoeExpertsMx`): their AscendC kernels do not exist yet (`KERNEL_TBD`).
  * domain `dsv4`: V4 ops kept with the dsv4 contract (registry.py) and a `cann_kernel="TBD"` attribute:
    there is no public CANN operator with that contract; `MAPPING[op].nearest` says which CANN operator comes
    closest and what would have to change to use it.

ATC names a custom node `<domain>::<opset of that domain>::<op type>` (Ascend/parser parser/onnx/onnx_parser.cc,
OnnxModelParser::ConstructOriType), and refuses nodes with an empty domain when the model imports more than one
opset (error E16005). The bundle therefore gives every standard node the explicit domain `ai.onnx`.

Sources (read 2026-11; public repositories):
  [ops-nn]   hicann/ops-nn: quant/dynamic_quant/op_graph/dynamic_quant_proto.h (+ tests/assets/golden.py),
             quant/dynamic_mx_quant/docs/aclnnDynamicMxQuant.md, matmul/quant_batch_matmul_v3/op_graph/
             quant_batch_matmul_v3_proto.h
  [recipes]  hicann/cann-recipes-infer: ops/ascendc/src/hc_pre/op_host/hc_pre_def.cpp, .../hc_post/op_host/
             hc_post_def.cpp, ops/ascendc/examples/test_npu_hc_pre.py (golden), ops/ascendc/docs/
             custom-npu_{sparse_attn_sharedkv,lightning_indexer,quant_lightning_indexer,compressor,
             kv_compress_epilog,indexer_compress_epilog}.md, docs/models/deepseek-v4/
             deepseek_v4_ascendc_operator_guide.md
  [torchair] Ascend/torchair: python/torchair/_ge_concrete_graph/ge_converter/custom/{quantmatmul,
             npu_dynamic_quant,npu_dynamic_mx_quant}.py (torch_npu op -> GE IR op and attribute names)
  [parser]   Ascend/parser: parser/onnx/onnx_parser.cc (how ATC keys ONNX nodes), subgraph_adapter/ (only `If`)
  [hccl]     cann/hccl: src/common/op_graph/ops_proto_hccl.h (GE IR HcomAllReduce: x -> y, attrs reduction,
             group, fusion, fusion_id; HcomAllGather: x -> y, attrs rank_size, group, fusion, fusion_id); HCCL's
             Python API reference (hiascend, hcclpython allreduce / allgather / create_group: AllGather orders the
             ranks' inputs by rank id and concatenates them along the first dim; a group is a name <= 128 bytes
             created with its world rank ids before use); cann/tensorflow tf_adapter/ops/hccl/hccl_ops.cc
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv4c.graphs.ops.onnx import DOMAIN as DSV4_DOMAIN
from dsv4c.graphs.ops.onnx import DOMAIN_VERSION as DSV4_DOMAIN_VERSION

DOMAIN = "dsv4.cann"  # nodes whose op type is a CANN operator (or a dsv4c-defined one for CANN)
DOMAIN_VERSION = 1
CUSTOM_DOMAIN_VERSIONS = {DOMAIN: DOMAIN_VERSION, DSV4_DOMAIN: DSV4_DOMAIN_VERSION}  # the bundle's custom opsets
KERNEL_TBD = "TBD"  # value of the `cann_kernel` attribute on nodes no public AscendC kernel implements

# GE data type enum values used in attributes (GE DataType / aclDataType; [ops-nn] DynamicQuant `dst_type`,
# aclnnDynamicMxQuant `dstType`: 36 = FLOAT8_E4M3FN; QuantBatchMatmulV3 `dtype`: 0 f32, 27 bf16)
DT_FLOAT, DT_INT8, DT_BF16, DT_FLOAT8_E4M3FN = 0, 2, 27, 36
MX_BLOCK = 32  # MX quantization block along K ([ops-nn] QuantBatchMatmulV3: mx group sizes [1, 1, 32])
MX_GROUP_SIZE = (1 << 32) | (1 << 16) | MX_BLOCK  # group_size bits 32-47 m, 16-31 n, 0-15 k


@dataclass(frozen=True)
class CannOp:
    """A node type in domain `dsv4.cann`: inputs/outputs in IR order (absent optional input = "")."""

    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: tuple[str, ...]
    package: str  # where the kernel comes from on the Ascend host
    source: str
    kernel: str = "public"  # "public" or KERNEL_TBD


CANN_OPS: dict[str, CannOp] = {op.op_type: op for op in (
    CannOp("DynamicQuant", ("x", "smooth_scales", "group_index"), ("y", "scale"), ("dst_type",),
           "CANN built-in opp (ops-nn)", "[ops-nn] quant/dynamic_quant/op_graph/dynamic_quant_proto.h"),
    CannOp("DynamicMxQuant", ("x",), ("y", "mxscale"), ("axis", "round_mode", "dst_type", "block_size", "scale_alg"),
           "CANN built-in opp (ops-nn), Ascend 950 only",
           "[ops-nn] quant/dynamic_mx_quant/docs/aclnnDynamicMxQuant.md; attribute names: [torchair] "
           "npu_dynamic_mx_quant.py"),
    CannOp("QuantBatchMatmulV3", ("x1", "x2", "scale", "offset", "bias", "pertoken_scale"), ("y",),
           ("dtype", "transpose_x1", "transpose_x2", "group_size"), "CANN built-in opp (ops-nn)",
           "[ops-nn] matmul/quant_batch_matmul_v3/op_graph/quant_batch_matmul_v3_proto.h"),
    CannOp("HcPre", ("x", "hc_fn", "hc_scale", "hc_base"), ("y", "post", "comb_frag"),
           ("hc_mult", "hc_sinkhorn_iters", "norm_eps", "hc_eps"), "cann-recipes-infer custom op package (.run)",
           "[recipes] ops/ascendc/src/hc_pre/op_host/hc_pre_def.cpp"),
    CannOp("HcPost", ("x", "residual", "post", "comb"), ("y",), (), "cann-recipes-infer custom op package (.run)",
           "[recipes] ops/ascendc/src/hc_post/op_host/hc_post_def.cpp"),
    CannOp("HcomAllReduce", ("x",), ("y",), ("reduction", "group", "fusion", "fusion_id"),
           "CANN built-in (HCCL)", "[hccl] ops_proto_hccl.h HcomAllReduce"),
    CannOp("HcomAllGather", ("x",), ("y",), ("rank_size", "group", "fusion", "fusion_id"),
           "CANN built-in (HCCL)", "[hccl] ops_proto_hccl.h HcomAllGather"),
    CannOp("MoeExpertsInt", ("x", "weights", "indices", "w1", "s1", "w3", "s3", "w2", "s2"), ("y",),
           ("weight_bits", "group_size", "swiglu_limit", "act_quant", "bf16"), "dsv4c (AscendC kernel TBD)",
           "dsv4c.targets.cann.reference (semantics); dsv4c.targets.cann.requant (weights)", KERNEL_TBD),
    CannOp("MoeExpertsMx", ("x", "weights", "indices", "w1", "s1", "w3", "s3", "w2", "s2"), ("y",),
           ("swiglu_limit", "act_quant", "bf16"), "dsv4c (AscendC kernel TBD)",
           "dsv4c.targets.cann.reference (semantics)", KERNEL_TBD),
)}


@dataclass(frozen=True)
class Mapping:
    """How one dsv4 op is lowered for CANN, per SoC."""

    dsv4_op: str  # ONNX op type in domain dsv4
    ascend950: str
    ascend910b: str
    status: str  # "public": CANN operators with our contract exist | "tbd": kernel to be written
    nearest: str = ""  # for "tbd": the closest public CANN operator and what differs
    attr_map: dict[str, str] = field(default_factory=dict)  # dsv4 attribute -> CANN attribute (renamed ops)
    source: str = ""


MAPPING: dict[str, Mapping] = {m.dsv4_op: m for m in (
    Mapping("Fp8Linear",
            "act_quant=1: DynamicMxQuant(block 32, scale_alg 1) -> QuantBatchMatmulV3 MX (weights MXFP8: the FP8 "
            "bits with each 128x128 pow2 scale repeated per 1x32 block, exact); act_quant=0: MatMul on the "
            "exactly dequantized bf16 weight",
            "act_quant=1: DynamicQuant (per-token int8) -> QuantBatchMatmulV3 (int8 x int8, per-channel f32 weight "
            "scale, per-token scale, bf16 out; weights requantized FP8 -> INT8 per output channel, lossy); "
            "act_quant=0: MatMul on the exactly dequantized bf16 weight",
            "public", source="[ops-nn] DynamicQuant / DynamicMxQuant / QuantBatchMatmulV3 protos; [torchair] "
            "quantmatmul.py (torch_npu.npu_quant_matmul -> QuantBatchMatmulV3/V4)"),
    Mapping("Fp8GroupedLinear",
            "act_quant=0 (wo_a, as DeepSeek runs it): batched MatMul over the groups on the exactly dequantized "
            "bf16 weight; act_quant=1: one Fp8Linear lowering per group",
            "same as Ascend 950 (bf16 weights are exact: e4m3 x pow2 fits bf16)", "public",
            source="standard ONNX MatMul (no grouped A16W8 FP8 kernel is public)"),
    Mapping("HcPre", "HcPre (iters -> hc_sinkhorn_iters, hc_mult = n)", "HcPre", "public",
            attr_map={"iters": "hc_sinkhorn_iters", "norm_eps": "norm_eps", "hc_eps": "hc_eps"},
            source="[recipes] hc_pre_def.cpp; golden test_npu_hc_pre.py = registry.hc_pre (same split, "
            "first pass column-only, iters-1 row/col passes). Kernel shape limits: hc_mult 4, hc_mix 24, "
            "d 4096 / 7168"),
    Mapping("HcPost", "HcPost", "HcPost", "public",
            source="[recipes] hc_post_def.cpp: out = post*x + sum_j comb[j,k] residual_j (= registry.hc_post, "
            "which sums j = 0..n-1 in order as DeepSeek's torch.sum; the kernel's order is not documented, a "
            "last-bit difference); kernel shape limits: hc 4, d 4096"),
    Mapping("MoeExperts", "MoeExpertsMx: MXFP4 experts (the shipped FP4 bytes and e8m0 1x32 scales, exact), "
            "activations MXFP8 (DynamicMxQuant semantics)",
            "MoeExpertsInt: INT8 experts (2 x e2m1 with scale s/2 per 1x32, exact) or INT4 (per-1x32 absmax/7, "
            "lossy), activations per-token INT8 (DynamicQuant semantics)", "tbd",
            nearest="no single CANN operator; the cann-recipes-infer V4 MoE is a chain MoeInitRoutingV2 -> "
            "GroupedMatmul (+ custom dequant_swiglu_clamp_quant for the V4 clamp) -> GroupedMatmul -> "
            "MoeFinalizeRoutingV2 that needs the routing to be materialised as sorted token lists",
            source="[recipes] ops/ascendc/docs/custom-npu_dequant_swiglu_clamp_quant.md, models/deepseek_v4"),
    Mapping("SparseAttn", "dsv4 SparseAttn (kernel TBD)", "dsv4 SparseAttn (kernel TBD)", "tbd",
            nearest="SparseAttnSharedKV (+ AICPU SparseAttnSharedKVMetadata): takes the window KV (ori_kv) and the "
            "compressed KV (cmp_kv) as separate paged caches with block tables, masks the window with a band "
            "(ori_win_left 127) and picks compressed rows with int32 cmp_sparse_indices (K = 512, D = 512); ours "
            "also takes the window rows (ring + the step's tokens) and the compressed rows as two inputs, contiguous, "
            "with explicit int64 indices into both (row N + j = compressed row j) and any D. Numerics to keep "
            "(attribute bf16, spec §3.9.2): an online softmax over 64-pick blocks in index order, each block's "
            "unnormalised probabilities rounded to bf16 before P.V, the denominator unrounded, the sink last",
            source="[recipes] ops/ascendc/docs/custom-npu_sparse_attn_sharedkv.md"),
    Mapping("IndexerTopK", "dsv4 IndexerTopK (kernel TBD)", "dsv4 IndexerTopK (kernel TBD)", "tbd",
            nearest="LightningIndexer / QuantLightningIndexer (cmp_ratio, sparse_mode 3 gives V4's staircase "
            "mask): paged keys (PA_BSND, block_size <= 1024), int32 indices [B, S, N2, sparse_count], tie order "
            "unspecified; ours: contiguous keys, per-query n_visible, lower entry id first among ties, int64 "
            "with -1 for hidden picks, and (attribute bf16, spec §3.9.4) each dot product, weighted relu and the "
            "head sum rounded to bf16 (bf16 scores tie often, so the tie rule decides picks)",
            source="[recipes] ops/ascendc/docs/custom-npu_lightning_indexer.md, "
            "custom-npu_quant_lightning_indexer.md"),
    Mapping("CompressPool", "dsv4 CompressPool (kernel TBD)", "dsv4 CompressPool (kernel TBD)", "tbd",
            nearest="Compressor: fuses the wkv/wgate projections, the paged state cache update, the gated "
            "softmax pooling, RMSNorm and RoPE; ours is only the pooling over already projected rows (the "
            "projections, norm and RoPE are separate nodes)",
            source="[recipes] ops/ascendc/docs/custom-npu_compressor.md"),
    Mapping("FakeQuantFp8", "dsv4 FakeQuantFp8 (kernel TBD)", "dsv4 FakeQuantFp8 (kernel TBD)", "tbd",
            nearest="KvCompressEpilog (Ascend 950 only): quantizes the nope dims to FP8 with 64-element e8m0 "
            "scales and scatters them into an FP8 cache; ours is the reference's quantize-dequantize QAT "
            "simulation (the cache stays in float)",
            source="[recipes] ops/ascendc/docs/custom-npu_kv_compress_epilog.md"),
    Mapping("AllReduce", "HcomAllReduce (reduction \"sum\", group: this rank's HCCL group of its tensor / expert "
            "group, fusion 0)", "same as Ascend 950", "public",
            attr_map={"group": "group"},
            source="[hccl] ops_proto_hccl.h HcomAllReduce; the group (a name the runtime creates from the mesh's "
            "rank ids, bundle.json hccl_groups) replaces the IR's group kind"),
    Mapping("AllGather", "Transpose (last dim first) -> HcomAllGather (rank_size = size, group) -> Transpose back: "
            "HCCL concatenates along the first dim, the IR along the last", "same as Ascend 950", "public",
            attr_map={"size": "rank_size", "group": "group"},
            source="[hccl] ops_proto_hccl.h HcomAllGather; HCCL allgather: inputs ordered by rank id, "
            "concatenated along dim 0"),
    Mapping("IndexerScores", "dsv4 IndexerScores (kernel TBD)", "dsv4 IndexerScores (kernel TBD)", "tbd",
            nearest="LightningIndexer / QuantLightningIndexer compute the same head-weighted relu scores but fuse "
            "the top-k and return only indices (int32, paged keys); a tensor-parallel rank needs its heads' "
            "float scores [B, S, N] before the all-reduce, each dot product, weighted relu and head sum rounded "
            "to bf16 with attribute bf16 (spec §3.9.4), unmasked",
            source="[recipes] ops/ascendc/docs/custom-npu_lightning_indexer.md; spec §2.5 (scores all-reduced "
            "before the top-k)"),
    Mapping("HadamardFp4", "dsv4 HadamardFp4 (kernel TBD)", "dsv4 HadamardFp4 (kernel TBD)", "tbd",
            nearest="none: the cann-recipes-infer indexer rotates with a matmul against a Hadamard matrix and "
            "quantizes to FP8/INT8 (IndexerCompressEpilog, QuantLightningIndexer), not FP4; ours rounds the "
            "rotation to bf16 before the FP4 simulation (spec §3.9.3)",
            source="[recipes] ops/ascendc/docs/custom-npu_indexer_compress_epilog.md"),
    Mapping("PackKvFp8", "dsv4 PackKvFp8 (kernel TBD)", "dsv4 PackKvFp8 (kernel TBD)", "tbd",
            nearest="KvCompressEpilog (cann-recipes-infer) writes compressed KV into an FP8 cache; not checked "
            "to match quant.pack_kv_fp8's row byte for byte (e4m3 non-RoPE dims, bf16 RoPE dims, one e8m0 "
            "scale per 64 dims, rows padded to 8 bytes), which SparseAttn here reads",
            source="[recipes] ops/ascendc/docs/custom-npu_kv_compress_epilog.md; spec §4.2"),
    Mapping("PackFp4", "dsv4 PackFp4 (kernel TBD)", "dsv4 PackFp4 (kernel TBD)", "tbd",
            nearest="none: the cann-recipes-infer indexer keeps FP8/INT8 keys (IndexerCompressEpilog), not FP4 "
            "rows of e2m1 pairs + e8m0 scales (quant.pack_fp4_rows)",
            source="[recipes] ops/ascendc/docs/custom-npu_indexer_compress_epilog.md"),
)}


def plugin_source(node_types: list[tuple[str, str]]) -> str:
    """C++ source of the ONNX parser plugin that lets ATC read the bundle's custom nodes: one
    REGISTER_CUSTOM_OP per (domain, op type), attributes copied by name (AutoMappingByOpFn). Compiled into the
    custom op package's framework/onnx_plugin on the Ascend host; not compiled here (no CANN headers)."""
    lines = [
        "// Generated by dsv4c (dsv4c.targets.cann.mapping.plugin_source). Build it into the custom op package",
        "// (framework/onnx_plugin) that also provides the kernels; see the dsv4c README, section CANN.",
        "// ATC keys ONNX nodes as <domain>::<domain opset>::<op type> (Ascend/parser onnx_parser.cc).",
        "// dsv4-domain types map to Dsv4<OpType> operators whose AscendC kernels are TBD (README, CANN).",
        "// Open item: ONNX 1.12 (ATC's parser) has no FP8/E8M0 tensor types; the bundle stores FP8 weights and",
        "// e8m0 scales as uint8 bytes, which the QuantBatchMatmulV3 MX inputs must see as DT_FLOAT8_E4M3FN /",
        "// DT_FLOAT8_E8M0 (e.g. a Bitcast inserted by a ParseOpToGraphFn); not done here.",
        '#include "register/register.h"',
        "",
        "namespace domi {",
    ]
    for domain, op_type in sorted(set(node_types)):
        ge_type = op_type if domain == DOMAIN else f"Dsv4{op_type}"
        origin = f"{domain}::{CUSTOM_DOMAIN_VERSIONS[domain]}::{op_type}"
        lines += [f'REGISTER_CUSTOM_OP("{ge_type}")', "    .FrameworkType(ONNX)",
                  f'    .OriginOpType("{origin}")', "    .ParseParamsByOperatorFn(AutoMappingByOpFn);", ""]
    lines.append("}  // namespace domi")
    return "\n".join(lines) + "\n"


def mapping_table() -> list[dict[str, str]]:
    """The mapping as rows (bundle.json `cann_mapping`, README)."""
    return [{"dsv4_op": m.dsv4_op, "Ascend950": m.ascend950, "Ascend910B": m.ascend910b, "status": m.status,
             "nearest_public_op": m.nearest, "source": m.source} for m in MAPPING.values()]
