"""The IR's collectives in a rank's TensorRT engine: TensorRT's IDistCollectiveLayer (NCCL).

A rank's bundle keeps `dsv4::AllReduce` / `dsv4::AllGather` as ONNX nodes (attributes `group`, `size`: the IR's,
graphs/parallel.py), so the bundle is the IR the other targets see and the emulation can run it. TensorRT's ONNX
parser has no importer for a collective (the distributed-collective layer is reachable only through the network
API: `INetworkDefinition.add_dist_collective`, TensorRT 10.16+ / 11), and a plugin would have to carry its own
NCCL. So the engine build parses a *cut* form of the program and splices the layers in afterwards:

  cut_collectives    (ONNX, runs anywhere) each collective node removed; the tensor it reads becomes a graph
                     output, the tensor it writes a graph input of the same type and shape (the exporter's
                     value_info, dynamic dims kept symbolic);
  splice_collectives (TensorRT network, after parsing) per cut: the read tensor is unmarked as an output and fed
                     to an IDistCollectiveLayer over the rank's group (the group's global ranks, from the mesh in
                     bundle.json: parallel.Shard.group_ranks), every layer input that read the placeholder input is
                     re-pointed at the layer's output, and the placeholder is removed. AllReduce is ALL_REDUCE with
                     SUM; the IR's AllGather concatenates along the last dim and TensorRT's ALL_GATHER along the
                     first, so the layer gathers the tensor with its last axis moved to the front and moves it back.

At run time every rank's execution context needs the NCCL communicator of the world
(`IExecutionContext.set_communicator`, an `ncclComm_t` capsule); the layers name their groups by global rank.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import onnx

from dsv4c.graphs.ops.onnx import DOMAIN

# ONNX op type of each IR collective -> TensorRT's CollectiveOperation member that implements it.
COLLECTIVES = {"AllReduce": "ALL_REDUCE", "AllGather": "ALL_GATHER"}


@dataclass(frozen=True)
class Cut:
    """One collective taken out of a program: what the engine build puts back as an IDistCollectiveLayer."""

    node: str  # the ONNX node's name (the layer gets it)
    op_type: str  # AllReduce | AllGather
    group: int  # parallel.GROUP_TENSOR / GROUP_EXPERT
    size: int  # ranks in the group (AllGather's `size`; for AllReduce the mesh's group size, filled by the caller)
    source: str  # the tensor the collective reads: a graph output of the cut form
    result: str  # the tensor it writes: a graph input of the cut form
    rank: int  # number of dims of both
    source_is_output: bool = False  # the program already returns the source: it stays an output after the splice

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def collective_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in COLLECTIVES]


def cut_collectives(model: onnx.ModelProto, group_sizes: dict[int, int]) -> list[Cut]:
    """Rewrite `model` (loaded without its external data) in place into the form TensorRT's parser accepts (see
    the module doc) and return the cuts in graph order. `group_sizes`: ranks per group kind of this mesh."""
    g = model.graph
    infos = {v.name: v for v in [*g.value_info, *g.input, *g.output]}
    results = {o for n in collective_nodes(model) for o in n.output}
    cuts = []
    for node in collective_nodes(model):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        (source,), (result,) = node.input, node.output
        if source in results:
            raise ValueError(f"{node.name}: reads another collective's output directly; the cut form cannot "
                             "express that (the IR never does it)")
        if source not in infos:
            raise ValueError(f"{node.name}: no type/shape for its input {source!r} in the program (value_info)")
        group = int(attrs["group"])
        size = int(attrs.get("size", group_sizes[group]))
        if size != group_sizes[group]:
            raise ValueError(f"{node.name}: gathers {size} ranks, but the mesh's group {group} has "
                             f"{group_sizes[group]}")
        src_type = infos[source].type.tensor_type
        rank = len(src_type.shape.dim)
        is_output = source in {o.name for o in g.output}
        cuts.append(Cut(node.name, node.op_type, group, size, source, result, rank, is_output))
        if result in infos:
            placeholder = copy.deepcopy(infos[result])
        else:  # the result's shape from the source's: same, or the last dim times the group for a gather
            placeholder = copy.deepcopy(infos[source])
            placeholder.name = result
            if node.op_type == "AllGather":
                last = placeholder.type.tensor_type.shape.dim[-1]
                if last.HasField("dim_value"):
                    last.dim_value *= size
                else:
                    last.dim_param = f"{result}_gathered"
        placeholder.type.tensor_type.elem_type = onnx.TensorProto.FLOAT  # collectives compute in float32
        g.input.append(placeholder)
        if not is_output:
            g.output.append(copy.deepcopy(infos[source]))
    cut_results = {c.result for c in cuts}
    cut_nodes = {c.node for c in cuts}
    kept = [n for n in g.node if n.name not in cut_nodes]
    del g.node[:]
    g.node.extend(kept)
    keep_info = [v for v in g.value_info if v.name not in cut_results]
    del g.value_info[:]
    g.value_info.extend(keep_info)
    return cuts


def splice_collectives(trt: Any, network: Any, cuts: list[Cut], groups: dict[int, list[int]]) -> None:
    """Put each cut back into a parsed TensorRT `network` as an IDistCollectiveLayer over `groups[cut.group]`
    (global ranks; see the module doc). `trt` is the tensorrt module."""
    if cuts and not hasattr(network, "add_dist_collective"):
        raise RuntimeError(f"TensorRT {getattr(trt, '__version__', '?')} has no distributed-collective layer "
                           "(INetworkDefinition.add_dist_collective: TensorRT 10.16+ / 11): it cannot build a "
                           "tensor/expert-parallel rank")
    for cut in cuts:
        ranks = [int(r) for r in groups[cut.group]]
        if len(ranks) != cut.size:
            raise ValueError(f"{cut.node}: group {cut.group} has {len(ranks)} ranks, the program expects {cut.size}")
        outputs = {network.get_output(i).name: network.get_output(i) for i in range(network.num_outputs)}
        inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
        x, placeholder = outputs[cut.source], inputs[cut.result]
        if not cut.source_is_output:
            network.unmark_output(x)
        y = _add_collective(trt, network, x, cut, ranks)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            for j in range(layer.num_inputs):
                t = layer.get_input(j)
                if t is not None and t.name == cut.result:
                    layer.set_input(j, y)
        was_output = placeholder.is_network_output
        if was_output:
            network.unmark_output(placeholder)
        network.remove_tensor(placeholder)
        y.name = cut.result  # the name the ONNX program gave the collective's output
        if was_output:
            network.mark_output(y)


def _add_collective(trt: Any, network: Any, x: Any, cut: Cut, ranks: list[int]) -> Any:
    op = getattr(trt.CollectiveOperation, COLLECTIVES[cut.op_type])
    if cut.op_type == "AllReduce":
        layer = network.add_dist_collective(x, op, trt.ReduceOperation.SUM, -1, ranks)
        layer.num_ranks = len(ranks)  # before get_output: it sizes the output
        layer.name = cut.node
        return layer.get_output(0)
    # ALL_GATHER concatenates along dim 0 in group order; the IR gathers along the last dim
    n = cut.rank
    front = network.add_shuffle(x)
    front.first_transpose = (n - 1, *range(n - 1))
    front.name = f"{cut.node}.last_to_front"
    layer = network.add_dist_collective(front.get_output(0), op, trt.ReduceOperation.NONE, -1, ranks)
    layer.num_ranks = len(ranks)
    layer.name = cut.node
    back = network.add_shuffle(layer.get_output(0))
    back.first_transpose = (*range(1, n), 0)
    back.name = f"{cut.node}.front_to_last"
    return back.get_output(0)


def mesh_groups(mesh: dict[str, Any], rank: int) -> dict[int, list[int]]:
    """{group kind: the global ranks of `rank`'s group} under a bundle's mesh (bundle.json "mesh")."""
    from dsv4c.graphs.parallel import GROUP_NAMES, Shard

    shard = Shard(rank=rank, tensor=mesh["tensor"], expert=mesh["expert"], data=mesh["data"])
    return {g: list(shard.group_ranks(g)) for g in GROUP_NAMES}
