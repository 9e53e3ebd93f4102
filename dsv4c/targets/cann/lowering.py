"""A program's ONNX (opset 18, dsv4 nodes, shipped FP8/FP4 weights) -> the CANN bundle program for one SoC.

Per dsv4 node (mapping.MAPPING says why):
  Fp8Linear  act_quant=1   -> Reshape [-1, K] -> DynamicQuant | DynamicMxQuant -> QuantBatchMatmulV3 -> Reshape
             act_quant=0   -> MatMul with the exactly dequantized bf16 weight (stored transposed, [K, N])
  Fp8GroupedLinear         -> act_quant=0: batched MatMul over groups (bf16 weight [G, K, R]);
                              act_quant=1: the Fp8Linear lowering per group, concatenated
  MoeExperts               -> MoeExpertsMx (950) | MoeExpertsInt (910B), kernel TBD
  HcPre / HcPost           -> the CANN custom operators of the same name (attributes renamed)
  AllReduce / AllGather    -> HCCL's HcomAllReduce (sum) / Transpose + HcomAllGather + Transpose (HCCL gathers along
                              dim 0, the IR along the last), over the HCCL group the mesh gives this rank's tensor /
                              expert group (`groups`, named in bundle.json `hccl_groups`)
  others                   -> kept in domain dsv4 with cann_kernel="TBD" and every attribute of the dsv4 contract
                              (registry.py; e.g. SparseAttn / IndexerTopK bf16), checked: a future kernel and the
                              emulation read them
Weights are converted by requant.py (errors accumulated per group) and the program's external data file is
rewritten by streaming: untouched weights are copied byte for byte, so memory stays bounded by the largest
single tensor, not the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from dsv4c.graphs.ops.onnx_builder import ONNX_DOMAIN, STANDARD_DOMAINS
from dsv4c.graphs.quant import FP8_BLOCK, ExpertFormat
from dsv4c.targets.cann import requant
from dsv4c.targets.cann.mapping import (
    CUSTOM_DOMAIN_VERSIONS, DOMAIN, DSV4_DOMAIN, DT_BF16, DT_FLOAT8_E4M3FN, DT_INT8, KERNEL_TBD, MX_BLOCK,
    MX_GROUP_SIZE,
)

OPSET = 18  # ATC parses ONNX opsets 11..18 (hiascend ATC guide); torch's exporter writes 18 natively
SOCS = ("Ascend950", "Ascend910B")
INLINE_MAX_BYTES = 1024  # smaller initializers stay inside the .onnx (as the exporter does)
UNSUPPORTED_CONTROL_FLOW = ("Loop", "Scan")  # ATC's ONNX parser adapts only `If` subgraphs (Ascend/parser)


class Rewriter:
    """Builds the new node list of one program; reads initializers lazily (from the .data file when external)."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path, soc: str, expert_bits: int,
                 stats: requant.ErrorStats, groups: dict[int, tuple[str, int]] | None = None):
        self.model, self.base_dir, self.soc, self.expert_bits, self.stats = model, base_dir, soc, expert_bits, stats
        self.groups = groups or {}  # group kind -> (HCCL group name, ranks in it)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.new_inits: dict[str, TensorProto] = {}
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0
        self._shapes = self._infer_shapes() if any(n.op_type == "Fp8GroupedLinear" for n in model.graph.node) else {}

    def _infer_shapes(self) -> dict:
        """Value shapes of the graph as exported (before any node is rewritten)."""
        from dsv4c.graphs.ops.onnx import register_schemas

        register_schemas()
        g = onnx.shape_inference.infer_shapes(self.model).graph
        return {v.name: v for v in [*g.input, *g.value_info, *g.output]}

    # -- helpers --------------------------------------------------------------------------------------------
    def group_count(self, node: onnx.NodeProto) -> int:
        """G of a grouped linear: the inferred (static) dim -2 of its input [..., G, K]."""
        v = self._shapes.get(node.input[0])
        dims = v.type.tensor_type.shape.dim if v is not None else []
        if len(dims) < 2 or not dims[-2].HasField("dim_value"):
            raise ValueError(f"node {node.name!r}: cannot infer the group count of {node.input[0]!r}")
        return dims[-2].dim_value

    def weight(self, node: onnx.NodeProto, index: int) -> np.ndarray:
        name = node.input[index]
        if name not in self.inits:
            raise ValueError(f"node {node.name!r} ({node.op_type}): input {index} {name!r} is not an initializer; "
                             "the CANN lowering converts weights ahead of time and needs them constant")
        return numpy_helper.to_array(self.inits[name], base_dir=str(self.base_dir)).copy()

    def add(self, name: str, array: np.ndarray, bf16_bits: bool = False) -> str:
        if bf16_bits:
            t = helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, array.tobytes(), raw=True)
        else:
            t = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.new_inits[name] = t
        return name

    def i64(self, *values: int) -> str:
        name = "cann.const.i64." + "_".join(str(v).replace("-", "m") for v in values)
        if name not in self.new_inits:
            self.add(name, np.array(values, np.int64))
        return name

    def emit(self, op: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = ONNX_DOMAIN,
             hint: str = "", **attrs) -> list[str]:
        self._count += 1
        base = f"cann/{hint or op}/{self._count}"
        outs = outputs if isinstance(outputs, list) else [f"{base}:{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=base, domain=domain, **attrs))
        return outs

    # -- quantized linear -----------------------------------------------------------------------------------
    def quant_linear(self, x2d: str, bits: np.ndarray, scale: np.ndarray, wname: str, hint: str,
                     original: str | None = None) -> str:
        """y [M, N] = act-quant(x2d [M, K]) @ W^T in the SoC's W8A8 format (bf16 out). `original`: the
        initializer already holding `bits` (MXFP8 keeps the e4m3 bytes as they are)."""
        ref = requant.decode_fp8(bits, scale)
        if self.soc == "Ascend950":
            mx = requant.fp8_to_mxfp8(bits, scale, wname)
            self.stats.add("dense", "MXFP8 (e4m3, e8m0 per 1x32)", wname, ref, requant.decode_mxfp8(bits, mx))
            w = original or self.add(f"{wname}.mxfp8", bits)
            s = self.add(f"{wname}.mxfp8_scale", mx)
            q, qs = self.emit("DynamicMxQuant", [x2d], 2, DOMAIN, hint, axis=-1, round_mode="rint",
                              dst_type=DT_FLOAT8_E4M3FN, block_size=MX_BLOCK, scale_alg=1)
            group = MX_GROUP_SIZE
        else:
            q8, s8 = requant.int8_per_channel(ref)
            self.stats.add("dense", "INT8 per output channel", wname, ref,
                           torch.from_numpy(q8).float() * torch.from_numpy(s8)[:, None])
            w = self.add(f"{wname}.int8", q8)
            s = self.add(f"{wname}.int8_scale", s8)
            q, qs = self.emit("DynamicQuant", [x2d], 2, DOMAIN, hint, dst_type=DT_INT8)
            group = 0
        return self.emit("QuantBatchMatmulV3", [q, w, s, "", "", qs], 1, DOMAIN, hint, dtype=DT_BF16,
                         transpose_x1=0, transpose_x2=1, group_size=group)[0]

    def bf16_weight(self, ref, wname: str, suffix: str, transposed):
        self.stats.add("dense_bf16", "bf16 (exact dequantization)", wname, ref, ref.to(torch.bfloat16).float())
        return self.add(f"{wname}.{suffix}", requant.bf16_exact(transposed, wname), bf16_bits=True)

    def flatten(self, x: str, k: int, hint: str) -> str:
        return self.emit("Reshape", [x, self.i64(-1, k)], 1, hint=hint)[0]

    def unflatten(self, y2d: str, like: str, last: int, out: str, hint: str) -> None:
        lead = self.emit("Slice", [self.emit("Shape", [like], 1, hint=hint)[0], self.i64(0), self.i64(-1)], 1,
                         hint=hint)[0]
        shape = self.emit("Concat", [lead, self.i64(last)], 1, hint=hint, axis=0)[0]
        self.emit("Reshape", [y2d, shape], [out], hint=hint)

    # -- per dsv4 op ----------------------------------------------------------------------------------------
    def fp8_linear(self, node: onnx.NodeProto) -> None:
        bits, scale = self.weight(node, 1), self.weight(node, 2)
        n, k = bits.shape
        wname, act_quant = node.input[1], _attrs(node)["act_quant"]
        if not act_quant:
            ref = requant.decode_fp8(bits, scale)
            w = self.bf16_weight(ref, wname, "bf16_t", ref.t().contiguous())
            wf = self.emit("Cast", [w], 1, hint="Fp8Linear", to=TensorProto.FLOAT)[0]
            self.emit("MatMul", [node.input[0], wf], [node.output[0]], hint="Fp8Linear")
            return
        y2d = self.quant_linear(self.flatten(node.input[0], k, "Fp8Linear"), bits, scale, wname, "Fp8Linear",
                                original=wname)
        self.unflatten(y2d, node.input[0], n, node.output[0], "Fp8Linear")

    def fp8_grouped_linear(self, node: onnx.NodeProto) -> None:
        bits, scale = self.weight(node, 1), self.weight(node, 2)
        wname, act_quant = node.input[1], _attrs(node)["act_quant"]
        groups = self.group_count(node)
        rows, k = bits.shape[0] // groups, bits.shape[1]
        x = node.input[0]  # [..., G, K]
        if not act_quant:
            ref = requant.decode_fp8(bits, scale)
            w = self.bf16_weight(ref, wname, "bf16_gkr", ref.view(groups, rows, k).transpose(1, 2).contiguous())
            wf = self.emit("Cast", [w], 1, hint="Fp8GroupedLinear", to=TensorProto.FLOAT)[0]
            x1 = self.emit("Unsqueeze", [x, self.i64(-2)], 1, hint="Fp8GroupedLinear")[0]  # [..., G, 1, K]
            y = self.emit("MatMul", [x1, wf], 1, hint="Fp8GroupedLinear")[0]  # [..., G, 1, R]
            self.emit("Squeeze", [y, self.i64(-2)], [node.output[0]], hint="Fp8GroupedLinear")
            return
        if rows % FP8_BLOCK:
            raise ValueError(f"{wname}: group rows {rows} are not a multiple of 128 (the FP8 block rows)")
        outs, blocks = [], rows // FP8_BLOCK
        for gi in range(groups):  # group gi: weight rows gi*R .. (gi+1)*R and their 128-row scale blocks
            xg = self.emit("Gather", [x, self.i64(gi)], 1, hint="Fp8GroupedLinear", axis=-2)[0]  # [..., 1, K]
            y2d = self.quant_linear(self.flatten(xg, k, "Fp8GroupedLinear"), bits[gi * rows:(gi + 1) * rows],
                                    scale[gi * blocks:(gi + 1) * blocks], f"{wname}.g{gi}", "Fp8GroupedLinear")
            out = f"cann/{wname}/group{gi}"
            self.unflatten(y2d, xg, rows, out, "Fp8GroupedLinear")  # [..., 1, R]
            outs.append(out)
        self.emit("Concat", outs, [node.output[0]], hint="Fp8GroupedLinear", axis=-2)

    def moe_experts(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        if a["fmt"] != ExpertFormat.FP4:
            raise ValueError(f"node {node.name!r}: MoeExperts fmt={a['fmt']}; the CANN lowering converts the "
                             "shipped FP4 experts (fmt 0) only")
        inputs = list(node.input[:3])
        for wi, si in ((3, 4), (5, 6), (7, 8)):
            packed, scale = self.weight(node, wi), self.weight(node, si)
            wname, ref = node.input[wi], requant.decode_fp4(packed, scale)
            if self.soc == "Ascend950":
                e8 = requant.to_e8m0(scale, node.input[si])
                self.stats.add("experts", "MXFP4 (shipped e2m1, e8m0 per 1x32)", wname, ref,
                               requant.decode_fp4(packed, requant.from_e8m0(e8).numpy()))
                inputs += [wname, self.add(f"{node.input[si]}.e8m0", e8)]
            elif self.expert_bits == 8:
                q, s = requant.fp4_to_int8(packed, scale)
                self.stats.add("experts", "INT8 (2 x e2m1, scale/2 per 1x32)", wname, ref, requant.decode_int(q, s, 8))
                inputs += [self.add(f"{wname}.int8", q), self.add(f"{node.input[si]}.int8", s)]
            else:
                q, s = requant.int4_per_group(ref)
                self.stats.add("experts", "INT4 (absmax/7 per 1x32)", wname, ref, requant.decode_int(q, s, 4))
                inputs += [self.add(f"{wname}.int4", q), self.add(f"{node.input[si]}.int4", s)]
        common = dict(swiglu_limit=a["swiglu_limit"], act_quant=a["act_quant"], bf16=a["bf16"], cann_kernel=KERNEL_TBD)
        if self.soc == "Ascend950":
            self.emit("MoeExpertsMx", inputs, [node.output[0]], DOMAIN, **common)
        else:
            self.emit("MoeExpertsInt", inputs, [node.output[0]], DOMAIN, weight_bits=self.expert_bits,
                      group_size=MX_BLOCK, **common)

    def hc_pre(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        rows = self.inits[node.input[1]].dims[0] if node.input[1] in self.inits else None
        if rows is None:
            raise ValueError(f"node {node.name!r}: HcPre's hc_fn must be an initializer (hc_mult comes from its shape)")
        n = int(round((-2 + (4 + 4 * rows) ** 0.5) / 2))  # rows = (2 + n) n
        self.emit("HcPre", list(node.input), list(node.output), DOMAIN, hc_mult=n, hc_sinkhorn_iters=a["iters"],
                  norm_eps=a["norm_eps"], hc_eps=a["hc_eps"])

    def hc_post(self, node: onnx.NodeProto) -> None:
        self.emit("HcPost", list(node.input), list(node.output), DOMAIN)

    def _group(self, node: onnx.NodeProto) -> tuple[str, int]:
        kind = _attrs(node)["group"]
        if kind not in self.groups:
            raise ValueError(f"node {node.name!r} ({node.op_type}): a collective over group {kind}, but the lowering "
                             "was given no HCCL group for it (a mesh rank's program needs the mesh)")
        return self.groups[kind]

    def all_reduce(self, node: onnx.NodeProto) -> None:
        name, _ = self._group(node)
        self.emit("HcomAllReduce", list(node.input), list(node.output), DOMAIN, reduction="sum", group=name,
                  fusion=0, fusion_id=-1)

    def all_gather(self, node: onnx.NodeProto) -> None:
        name, size = self._group(node)
        if _attrs(node)["size"] != size:
            raise ValueError(f"node {node.name!r}: gathers {_attrs(node)['size']} ranks, HCCL group {name} has {size}")
        infos = {v.name: v for v in [*self.model.graph.input, *self.model.graph.value_info, *self.model.graph.output]}
        if node.input[0] not in infos:
            raise ValueError(f"node {node.name!r}: the rank of its input {node.input[0]!r} is unknown (no value_info)")
        n = len(infos[node.input[0]].type.tensor_type.shape.dim)
        front = self.emit("Transpose", [node.input[0]], 1, hint="AllGather", perm=[n - 1, *range(n - 1)])[0]
        gathered = self.emit("HcomAllGather", [front], 1, DOMAIN, hint="AllGather", rank_size=size, group=name,
                             fusion=0, fusion_id=-1)[0]
        self.emit("Transpose", [gathered], list(node.output), hint="AllGather", perm=[*range(1, n), 0])

    def keep_tbd(self, node: onnx.NodeProto) -> None:
        missing = [a for a in _contract_attributes(node.op_type) if a not in _attrs(node)]
        if missing:
            raise ValueError(f"node {node.name!r} ({node.op_type}): attributes {missing} of the dsv4 contract are "
                             "missing (exported before the op gained them?); re-export the program")
        node.attribute.append(helper.make_attribute("cann_kernel", KERNEL_TBD))
        self.nodes.append(node)


REWRITES = {"Fp8Linear": Rewriter.fp8_linear, "Fp8GroupedLinear": Rewriter.fp8_grouped_linear,
            "MoeExperts": Rewriter.moe_experts, "HcPre": Rewriter.hc_pre, "HcPost": Rewriter.hc_post,
            "AllReduce": Rewriter.all_reduce, "AllGather": Rewriter.all_gather}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _contract_attributes(op_type: str) -> tuple[str, ...]:
    """The attributes registry.py gives the dsv4 op `op_type` (none for an op type it does not know)."""
    from dsv4c.graphs.ops.registry import OPS

    return next((op.attributes for op in OPS.values() if op.onnx_name == op_type), ())


def lower_program(path: Path, soc: str, expert_bits: int, stats: requant.ErrorStats,
                  groups: dict[int, tuple[str, int]] | None = None) -> onnx.ModelProto:
    """Rewrite `path` (and its `.data` file) in place for `soc`; returns the new model (graph only). `groups`: for
    a mesh rank's program, {group kind: (HCCL group name, ranks)} of its collectives (hccl_groups)."""
    if soc not in SOCS:
        raise ValueError(f"soc_version {soc!r}: the CANN lowering knows {', '.join(SOCS)}")
    model = onnx.load(path, load_external_data=False)
    opset = {o.domain: o.version for o in model.opset_import}.get("", None)
    if opset != OPSET:
        raise ValueError(f"{path.name}: exported at ONNX opset {opset}, the CANN bundle needs {OPSET}")
    loops = [n.op_type for n in model.graph.node if n.op_type in UNSUPPORTED_CONTROL_FLOW]
    if loops:
        raise ValueError(f"{path.name}: {sorted(set(loops))} nodes; ATC's ONNX parser handles only If subgraphs")
    rw = Rewriter(model, path.parent, soc, expert_bits, stats, groups)
    for node in model.graph.node:
        if node.domain == DSV4_DOMAIN:
            REWRITES.get(node.op_type, Rewriter.keep_tbd)(rw, node)
        else:
            if node.domain in STANDARD_DOMAINS:
                node.domain = ONNX_DOMAIN
            rw.nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(rw.nodes)
    _set_opsets(model)
    _rewrite_initializers(model, path, rw.new_inits)
    return model


def _set_opsets(model: onnx.ModelProto) -> None:
    used = {n.domain for n in model.graph.node}
    keep = [helper.make_opsetid(ONNX_DOMAIN, OPSET)]
    keep += [helper.make_opsetid(d, version) for d, version in CUSTOM_DOMAIN_VERSIONS.items() if d in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def _rewrite_initializers(model: onnx.ModelProto, path: Path, new: dict[str, TensorProto]) -> None:
    """Keep the initializers the new graph reads, add the new ones, write `<file>.data` afresh (streamed)."""
    used = {i for n in model.graph.node for i in n.input}
    old = [t for t in model.graph.initializer if t.name in used and t.name not in new]
    data_name = path.name + ".data"
    old_data = path.parent / data_name
    tmp = path.parent / (data_name + ".tmp")
    final: list[TensorProto] = []
    offset = 0
    with open(tmp, "wb") as out, (open(old_data, "rb") if old_data.exists() else _NoFile()) as src:
        for t in old + [new[k] for k in sorted(new) if k in used]:
            raw = _raw_bytes(t, src)
            fresh = TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims))
            if len(raw) <= INLINE_MAX_BYTES:
                fresh.raw_data = raw
            else:
                out.write(raw)
                fresh.data_location = TensorProto.EXTERNAL
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    fresh.external_data.add(key=k, value=v)
                offset += len(raw)
            final.append(fresh)
    os.replace(tmp, old_data)
    del model.graph.initializer[:]
    model.graph.initializer.extend(final)
    onnx.save(model, path)


def _raw_bytes(t: TensorProto, src) -> bytes:
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        src.seek(int(info.get("offset", 0)))
        return src.read(int(info["length"]))
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()  # typed fields (e.g. int64 constants)


class _NoFile:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def hccl_groups(mesh: dict, rank: int) -> dict[int, tuple[str, list[int]]]:
    """{group kind: (HCCL group name, its world rank ids)} for `rank` of a bundle's mesh (parallel.Shard). HCCL
    names groups (<= 128 bytes) and creates them from rank ids before use; every rank of a group derives the same
    name from its first rank."""
    from dsv4c.graphs.parallel import GROUP_NAMES, Shard

    shard = Shard(rank=rank, tensor=mesh["tensor"], expert=mesh["expert"], data=mesh["data"])
    out = {}
    for kind, label in GROUP_NAMES.items():
        ranks = list(shard.group_ranks(kind))
        out[kind] = (f"dsv4c_{label}_{ranks[0]}_{len(ranks)}", ranks)
    return out
