"""A mesh rank's TensorRT bundle (no TensorRT here): `lower` writes the rank's programs with their collectives as
`dsv4` nodes and the mesh, rank and groups in bundle.json; the engine build's cut form is what TensorRT's parser
accepts (no collective left, each one's input a graph output and its output a graph input of the exported type and
shape); splicing the collectives back as IDistCollectiveLayers is checked against a stand-in of the TensorRT
network API that evaluates the layers it is given, with the operator semantics TensorRT documents (ALL_REDUCE
sums, ALL_GATHER concatenates along the first dim in group order). Not checked here: TensorRT itself."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import RECIPES

from dsv4c.graphs.ops.onnx import DOMAIN
from dsv4c.targets.onnx_bundle import op_census, read_op_list
from dsv4c.targets.tensorrt.collectives import COLLECTIVES, Cut, cut_collectives, mesh_groups, splice_collectives
from dsv4c.targets.tensorrt.target import SUPPORTED_OPS_FILE, TensorRTTarget

MESH = {"world": 4, "tensor": 2, "expert": 4, "data": 2, "devices_per_node": 4, "nodes": 1, "backend": "nccl",
        "ranks": 4}
RANK = 3  # tensor group {2, 3}, expert group {0, 1, 2, 3}: the two kinds of group differ


@pytest.fixture(scope="module")
def rank_bundle(tmp_path_factory):
    """Rank 3's bundle of the tiny model on a tensor 2 x data 2 mesh with experts over all 4 ranks, lowered the way
    the build's lower stage lowers each rank (zero weights: this checks structure, not numerics)."""
    import torch

    from dsv4c.compiler.export import export_program
    from dsv4c.compiler.recipe import load_recipe
    from dsv4c.graphs.model import DeepseekV4, Numerics
    from dsv4c.graphs.parallel import Shard

    recipe = load_recipe(RECIPES / "tiny-tensorrt.yaml", ["target.devices_per_node=4",
                                                          "target.parallel={tensor: 2, expert: 4, data: 2}"])
    cfg = recipe.model.shapes()
    shard = Shard(rank=RANK, tensor=2, expert=4, data=2)
    with torch.no_grad():
        model = DeepseekV4(cfg, Numerics.reference(), "fp8", shard=shard)
    programs = {p: export_program(model, p, 2, 64) for p in ("prefill", "decode")}
    out = tmp_path_factory.mktemp("trt-mesh") / f"rank{RANK}"
    TensorRTTarget().lower(programs, out, recipe, {"cache": [], "mesh": MESH, "rank": RANK})
    return out


def load(bundle, program):
    meta = json.loads((bundle / "bundle.json").read_text())
    return meta, onnx.load(bundle / meta["programs"][program], load_external_data=False)


def test_mesh_groups_are_the_shards_groups():
    assert mesh_groups(MESH, RANK) == {0: [2, 3], 1: [0, 1, 2, 3]}
    assert mesh_groups(MESH, 0) == {0: [0, 1], 1: [0, 1, 2, 3]}


def test_rank_bundle_records_the_mesh_and_keeps_the_collectives(rank_bundle):
    meta, decode = load(rank_bundle, "decode")
    assert meta["mesh"] == MESH and meta["rank"] == RANK
    assert meta["groups"] == {"0": [2, 3], "1": [0, 1, 2, 3]}
    census = {op: n for (domain, op), n in op_census(decode).items() if domain == DOMAIN}
    assert census["AllReduce"] > 0 and census["AllGather"] == 1 and census["IndexerScores"] > 0
    recorded = meta["collectives"]["decode"]
    assert len(recorded) == census["AllReduce"] + census["AllGather"]
    assert {c["group"] for c in recorded} == {0, 1}  # attention / vocabulary over tensor, experts over expert
    assert all(c["size"] == 2 for c in recorded if c["op"] == "AllGather")
    # the collectives are no plugins; IndexerScores is one (Triton kernel)
    assert "dsv4::IndexerScores" in meta["plugins"]
    assert not {"dsv4::AllReduce", "dsv4::AllGather"} & set(meta["plugins"])
    for n in decode.graph.node:
        names = {a.name for a in n.attribute}
        if n.domain == DOMAIN:
            assert ("plugin_namespace" in names) == (n.op_type not in COLLECTIVES), n.op_type


@pytest.mark.parametrize("program", ["prefill", "decode"])
def test_cut_form_is_what_the_parser_accepts(rank_bundle, program):
    meta, model = load(rank_bundle, program)
    original = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    infos = {v.name: v for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    cuts = cut_collectives(model, {0: 2, 1: 4})
    assert [c.node for c in cuts] == [c["node"] for c in meta["collectives"][program]]
    # no collective left, every other node untouched and in order
    assert [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node] == \
        [o for o in original if o[0] not in COLLECTIVES]
    supported = read_op_list(SUPPORTED_OPS_FILE)
    for n in model.graph.node:
        assert n.domain == DOMAIN or n.op_type in supported, n.op_type
    inputs = {v.name: v for v in model.graph.input}
    outputs = {v.name for v in model.graph.output}
    for c in cuts:
        assert c.source in outputs and c.result in inputs
        src_dims = infos[c.source].type.tensor_type.shape.dim
        dims = inputs[c.result].type.tensor_type.shape.dim
        assert inputs[c.result].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert len(dims) == len(src_dims) == c.rank
        if c.op_type == "AllGather" and src_dims[-1].HasField("dim_value"):
            assert dims[-1].dim_value == 2 * src_dims[-1].dim_value
        assert c.size == (2 if c.group == 0 else 4)
    # a collective's output is read only through its placeholder: nothing else produces that name
    produced = {o for n in model.graph.node for o in n.output}
    assert not produced & {c.result for c in cuts}


def test_cut_refuses_a_gather_the_mesh_does_not_have(rank_bundle):
    _, model = load(rank_bundle, "decode")
    with pytest.raises(ValueError, match="gathers 2 ranks, but the mesh's group 0 has 4"):
        cut_collectives(model, {0: 4, 1: 4})


# ---- a stand-in of the TensorRT network API, evaluated -------------------------------------------------------
class Tensor:
    def __init__(self, name, producer=None):
        self.name, self.producer = name, producer
        self.is_network_input = self.is_network_output = False


class Layer:
    def __init__(self, kind, inputs, **params):
        self.kind, self.inputs, self.params, self.name = kind, list(inputs), params, ""
        self.first_transpose, self.num_ranks = None, 1
        self.output = Tensor(f"{kind}_out", self)

    num_inputs = property(lambda self: len(self.inputs))

    def get_input(self, i):
        return self.inputs[i]

    def set_input(self, i, t):
        self.inputs[i] = t

    def get_output(self, i):
        assert i == 0
        return self.output


class Network:
    def __init__(self):
        self.inputs, self.outputs, self.layers = [], [], []

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))
    num_layers = property(lambda self: len(self.layers))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]

    def get_layer(self, i):
        return self.layers[i]

    def add_input(self, name):
        t = Tensor(name)
        t.is_network_input = True
        self.inputs.append(t)
        return t

    def add(self, kind, inputs, **params):
        layer = Layer(kind, inputs, **params)
        self.layers.append(layer)
        return layer

    def add_shuffle(self, x):
        return self.add("shuffle", [x])

    def add_dist_collective(self, x, op, reduce_op, root, groups):
        return self.add("collective", [x], op=op, reduce=reduce_op, root=root, groups=list(groups))

    def mark_output(self, t):
        t.is_network_output = True
        self.outputs.append(t)

    def unmark_output(self, t):
        t.is_network_output = False
        self.outputs.remove(t)

    def remove_tensor(self, t):
        assert t.is_network_input and not t.is_network_output
        assert not any(t in layer.inputs for layer in self.layers), "removed while still read"
        self.inputs.remove(t)


TRT = SimpleNamespace(__version__="stand-in",
                      CollectiveOperation=SimpleNamespace(ALL_REDUCE="ALL_REDUCE", ALL_GATHER="ALL_GATHER"),
                      ReduceOperation=SimpleNamespace(SUM="SUM", NONE="NONE"))


def evaluate(t: Tensor, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Per rank: the value of `t`, a collective combining the ranks' values as TensorRT documents."""
    if t.producer is None:
        return [f[t.name] for f in feeds]
    layer = t.producer
    (x,) = [evaluate(i, feeds) for i in layer.inputs]
    if layer.kind == "identity":
        return x
    if layer.kind == "shuffle":
        return [np.transpose(v, layer.first_transpose) for v in x]
    assert layer.num_ranks == len(layer.params["groups"]) == len(feeds)
    if layer.params["op"] == "ALL_REDUCE":
        assert layer.params["reduce"] == "SUM"
        return [sum(x)] * len(x)
    assert layer.params["op"] == "ALL_GATHER" and layer.params["reduce"] == "NONE"
    return [np.concatenate(x, axis=0)] * len(x)


def parsed_cut_form(net: Network, cut: Cut):
    """What the parser makes of a cut program: the source a layer output marked as an output, the placeholder an
    input read by a consumer whose output is the program's output."""
    src = net.add("identity", [net.add_input("x")]).get_output(0)
    src.name = cut.source
    net.mark_output(src)
    consumer = net.add("identity", [net.add_input(cut.result)])
    net.mark_output(consumer.get_output(0))
    return consumer


@pytest.mark.parametrize("op_type", ["AllReduce", "AllGather"])
def test_splice_puts_the_collective_back_with_the_irs_semantics(op_type):
    cut = Cut("node_c", op_type, 0, 2, "s", "r", 3)
    net = Network()
    consumer = parsed_cut_form(net, cut)
    splice_collectives(TRT, net, [cut], {0: [2, 3], 1: [0, 1, 2, 3]})
    assert [t.name for t in net.inputs] == ["x"]  # the placeholder is gone
    assert [t.name for t in net.outputs] == ["identity_out"]  # the source is no output any more
    collective = next(layer for layer in net.layers if layer.kind == "collective")
    assert collective.name == "node_c" and collective.params["groups"] == [2, 3] and collective.num_ranks == 2
    assert consumer.get_input(0).name == "r"  # the collective's output took the program's name
    g = np.random.default_rng(0)
    feeds = [{"x": g.standard_normal((2, 3, 5)).astype(np.float32)} for _ in range(2)]
    got = evaluate(net.outputs[0], feeds)
    want = (feeds[0]["x"] + feeds[1]["x"] if op_type == "AllReduce"
            else np.concatenate([feeds[0]["x"], feeds[1]["x"]], axis=-1))  # the IR: last dim, rank order
    for v in got:
        np.testing.assert_array_equal(v, want)


def test_splice_keeps_a_collective_output_that_is_a_program_output():
    cut = Cut("node_c", "AllGather", 0, 2, "s", "logits", 2)
    net = Network()
    src = net.add("identity", [net.add_input("x")]).get_output(0)
    src.name = "s"
    net.mark_output(src)
    net.mark_output(net.add_input("logits"))  # an ONNX graph output read straight off the collective
    splice_collectives(TRT, net, [cut], {0: [0, 1]})
    assert [t.name for t in net.outputs] == ["logits"] and net.outputs[0].producer.kind == "shuffle"
    feeds = [{"x": np.arange(6, dtype=np.float32).reshape(2, 3) + 10 * r} for r in range(2)]
    np.testing.assert_array_equal(evaluate(net.outputs[0], feeds)[0],
                                  np.concatenate([feeds[0]["x"], feeds[1]["x"]], axis=-1))


def test_splice_keeps_a_source_the_program_itself_returns():
    cut = Cut("node_c", "AllReduce", 0, 2, "s", "r", 3, source_is_output=True)
    net = Network()
    parsed_cut_form(net, cut)
    splice_collectives(TRT, net, [cut], {0: [0, 1]})
    assert sorted(t.name for t in net.outputs) == ["identity_out", "s"]


def test_cut_records_a_source_that_is_already_an_output():
    vi = onnx.helper.make_tensor_value_info
    node = onnx.helper.make_node("AllReduce", ["x"], ["y"], name="ar", domain=DOMAIN, group=0)
    f32 = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["a"], ["x"]), node], "g", [vi("a", f32, ["b", 4])],
                                   [vi("x", f32, ["b", 4]), vi("y", f32, ["b", 4])])
    model = onnx.helper.make_model(graph)
    [cut] = cut_collectives(model, {0: 2})
    assert cut.source_is_output and [o.name for o in model.graph.output] == ["x", "y"]
    assert [i.name for i in model.graph.input] == ["a", "y"]


def test_splice_refuses_a_tensorrt_without_the_layer():
    class Before1016:  # a TensorRT network API from before the distributed-collective layer (10.16)
        def __init__(self, net):
            self.net = net

        def __getattr__(self, name):
            if name == "add_dist_collective":
                raise AttributeError(name)
            return getattr(self.net, name)

    net = Network()
    cut = Cut("node_c", "AllReduce", 0, 2, "s", "r", 2)
    parsed_cut_form(net, cut)
    with pytest.raises(RuntimeError, match="no distributed-collective layer"):
        splice_collectives(TRT, Before1016(net), [cut], {0: [0, 1]})


# ---- the rank bundles compute the model: two processes, collectives over gloo ------------------------------------
_RANK_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np, torch.distributed as dist
from dsv4c.graphs import parallel
from dsv4c.targets.base import CacheSlot
from dsv4c.targets.tensorrt.torch_executor import TorchExecutor

root, rank = Path(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=2)
parallel.setup(parallel.Shard(rank=rank, tensor=2, expert=2, data=1))
meta = json.loads((root / f"rank{rank}" / "bundle.json").read_text())
ex = TorchExecutor(root / f"rank{rank}", meta["programs"], [CacheSlot.from_manifest(c) for c in meta["cache"]], "cpu")
f = np.load(root / "feeds.npz")
cache = ex.new_cache(2)
out = [ex.run("prefill", f["tokens"], np.zeros(2, np.int64), f["lengths"], cache)]
for step, tok in enumerate(f["decode"]):
    out.append(ex.run("decode", tok[:, None], f["lengths"] + step, np.ones(2, np.int64), cache))
np.save(root / f"logits{rank}.npy", np.stack(out))
dist.destroy_process_group()
"""


@pytest.mark.slow  # ~4 min on 2 cores: a synthetic checkpoint, two rank exports, two processes
def test_two_rank_bundles_give_the_single_device_logits(tmp_path, stage_cache):
    """The exact ONNX each rank's TensorRT bundle holds (plugin nodes on the ops' torch reference, collectives over
    torch.distributed/gloo as the IR defines them), run as ranks 0 and 1 of tensor 2 x expert 2, gives the
    single-device model's logits (plain numerics: cosine >= 0.9999 on every row, prefill of two unequal prompts
    and 3 decode steps). What it leaves to TensorRT: the NCCL layers that replace the collectives."""
    import subprocess
    import sys

    import torch

    import dsv4c
    from dsv4c.compiler.export import export_program
    from dsv4c.compiler.recipe import load_recipe
    from dsv4c.graphs.checkpoint import CheckpointReader
    from dsv4c.graphs.model import Numerics, load_checkpoint_model
    from dsv4c.graphs.parallel import Shard

    overrides = ["quantization.preset=plain", "target.devices_per_node=2"]
    dsv4c.build(RECIPES / "tiny-tensorrt.yaml", tmp_path / "x", overrides, until="load", cache_dir=stage_cache)
    reader = CheckpointReader(next(stage_cache.glob("load/*/checkpoint")))
    recipe = load_recipe(RECIPES / "tiny-tensorrt.yaml", overrides)
    max_len, lengths = 64, np.array([13, 6])
    single = load_checkpoint_model(reader, Numerics.plain(), "fp8")
    cache = single.new_cache(2, max_len)
    slots = [{"name": e.name, "shape": list(e.shape[1:]), "fill": e.fill, "dtype": "float32"}
             for e in single.cache_spec(1, max_len)]
    tokens = np.zeros((2, 13), np.int64)
    g = torch.Generator().manual_seed(3)
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.randint(2, 1024, (n,), generator=g).numpy()
    with torch.no_grad():  # the single-device reference, feeding its own greedy picks
        logits, cache = single(torch.from_numpy(tokens), torch.zeros(2, dtype=torch.long),
                               torch.from_numpy(lengths), cache)
        want, decode = [logits], []
        for step in range(3):
            decode.append(want[-1].argmax(-1).numpy())
            logits, cache = single(torch.from_numpy(decode[-1][:, None]), torch.from_numpy(lengths + step),
                                   torch.ones(2, dtype=torch.long), cache)
            want.append(logits)
    np.savez(tmp_path / "feeds.npz", tokens=tokens, lengths=lengths, decode=np.stack(decode))
    mesh = {"world": 2, "tensor": 2, "expert": 2, "data": 1, "devices_per_node": 2, "nodes": 1, "backend": "gloo",
            "ranks": 2}
    for rank in range(2):
        model = load_checkpoint_model(reader, Numerics.plain(), "fp8", Shard(rank=rank, tensor=2, expert=2))
        programs = {p: export_program(model, p, 2, max_len) for p in ("prefill", "decode")}
        TensorRTTarget().lower(programs, tmp_path / f"rank{rank}", recipe, {"cache": slots, "mesh": mesh,
                                                                            "rank": rank})
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(tmp_path), str(r)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    want = torch.stack(want).numpy()
    for rank in range(2):
        got = np.load(tmp_path / f"logits{rank}.npy")
        assert got.shape == want.shape
        cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
        assert cos.min() >= 0.9999, cos
