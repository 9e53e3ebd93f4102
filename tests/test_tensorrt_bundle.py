"""TensorRT target on a machine without TensorRT: `--until lower` gives a complete bundle whose ONNX is what
TensorRT parses (opset 22, dsv4 plugin nodes, every other op on TensorRT's supported list), the emulated engine
(that exact ONNX on ONNX Runtime with the plugins' reference implementations) matches the PyTorch reference, and
the engine build stops with exit 4 naming what is missing."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from conftest import RECIPES, assert_step_function_agrees, dsv4c_cli, reference_model

import dsv4c
from dsv4c.graphs.model import Numerics
from dsv4c.graphs.ops import OPS
from dsv4c.runtime import Engine
from dsv4c.targets.onnx_bundle import op_census, read_op_list
from dsv4c.targets.tensorrt.target import OPSET, SUPPORTED_OPS_FILE, toolchain

PROMPTS = [torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(5)).tolist() for n in (24, 17)]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, stage_cache):
    return dsv4c.build(RECIPES / "tiny-tensorrt.yaml", tmp_path_factory.mktemp("trt") / "tiny-tensorrt",
                       until="lower", cache_dir=stage_cache)


def programs(bundle):
    meta = json.loads((bundle / "engine" / "bundle.json").read_text())
    return {p: onnx.load(bundle / "engine" / f, load_external_data=False) for p, f in meta["programs"].items()}


def test_bundle_is_complete_and_relocatable(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["kind"] == "bundle" and manifest["target"]["arch"] == "sm_90"
    assert {"group": "experts", "from": "fp4", "to": "fp8"}.items() <= manifest["fallbacks"][0].items()
    meta = manifest["engine"]
    assert meta["build_command"].startswith("dsv4c build --from-bundle")
    assert (bundle / "recipe.lock.yaml").is_file() and (bundle / "config.json").is_file()
    stored = {}
    for f in meta["programs"].values():
        assert (bundle / "engine" / f).is_file()
        model = onnx.load(bundle / "engine" / f, load_external_data=False)
        for init in model.graph.initializer:  # weights are referenced relative to the bundle, never absolute
            ref = {kv.key: kv.value for kv in init.external_data}
            if ref:
                data = bundle / "engine" / ref["location"]
                assert not ref["location"].startswith("/") and data.is_file()
                assert int(ref["offset"]) + int(ref["length"]) <= data.stat().st_size
                stored.setdefault((ref["location"], ref["offset"]), set()).add(f)
    assert any(len(users) == 2 for users in stored.values())  # prefill and decode read one copy of the weights
    assert (bundle / "engine" / "plugins").is_dir()


def test_every_standard_op_is_on_tensorrts_list_and_every_v4_op_is_a_plugin_node(bundle):
    supported = read_op_list(SUPPORTED_OPS_FILE)
    plugin_ops = {op.onnx_name for op in OPS.values()}
    for name, model in programs(bundle).items():
        assert {o.domain: o.version for o in model.opset_import}[""] == OPSET
        assert not model.functions, "TensorRT must meet plugin nodes, not inline function bodies"
        census = op_census(model)
        standard = {op for (domain, op) in census if domain == "ai.onnx"}
        assert standard <= supported, f"{name}: not on TensorRT's list: {sorted(standard - supported)}"
        custom = {(domain, op) for (domain, op) in census if domain != "ai.onnx"}
        assert custom and all(domain == "dsv4" and op in plugin_ops for domain, op in custom), custom
        for node in model.graph.node:
            if node.domain == "dsv4":
                attrs = {a.name: a.s.decode() for a in node.attribute if a.type == onnx.AttributeProto.STRING}
                assert attrs.get("plugin_namespace") == "dsv4" and attrs.get("plugin_version") == "1"


def test_the_plugins_read_the_checkpoints_e8m0_scale_bytes(bundle, stage_cache):
    """Every weight scale a plugin reads is a uint8 initializer holding the e8m0 byte of the reference model's
    (transcoded) scale, with no decode in the graph for the engine build to fold back into float32."""
    from dsv4c.graphs import quant
    from dsv4c.targets.e8m0_scales import E8M0_TABLE, SCALE_INPUTS
    from dsv4c.targets.onnx_bundle import initializer_array

    ref = reference_model(stage_cache, Numerics.reference(), expert_format="fp8").state_dict()
    for name, model in programs(bundle).items():
        inits = {t.name: t for t in model.graph.initializer}
        scales = {n.input[i] for n in model.graph.node for i in SCALE_INPUTS.get(n.op_type, ())}
        assert len(scales) > 20 and E8M0_TABLE not in inits, name
        assert {onnx.TensorProto.DataType.Name(inits[s].data_type) for s in scales} == {"UINT8"}, name
        for scale in ("model.layers.1.attn.wq_b.scale", "model.layers.0.ffn.experts.w2_scale"):
            want = quant.float_to_e8m0(ref[scale.removeprefix("model.")]).view(torch.uint8).numpy()
            assert (initializer_array(inits[scale], bundle / "engine") == want).all(), (name, scale)


def test_emulated_engine_matches_reference(bundle, stage_cache):
    """The exact TensorRT ONNX on ONNX Runtime vs PyTorch (experts transcoded to FP8, as on sm_90): per-step
    agreement gated like recipes/tiny-cpu.yaml (85% of rows cosine >= 0.999 and top-1 equal, all >= 0.9)."""
    eng = Engine.load(bundle, emulate=True)
    ref = reference_model(stage_cache, Numerics.reference(), expert_format="fp8")
    assert_step_function_agrees(eng.session(2), ref, PROMPTS, 16, min_cosine=0.999, agreement=0.85, floor=0.9)


def test_bundle_is_not_runnable_without_emulate(bundle):
    from dsv4c.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="--from-bundle"):
        Engine.load(bundle)


@pytest.mark.skipif(toolchain()["tensorrt"] != "missing", reason="TensorRT is installed here")
def test_engine_build_without_tensorrt_exits_4_and_leaves_nothing(tmp_path, stage_cache, bundle):
    out = tmp_path / "engine"
    r = dsv4c_cli("build", "recipes/tiny-tensorrt.yaml", "-o", str(out), "--events", "quiet", cache=stage_cache)
    assert r.returncode == 4, r.stderr
    assert "tensorrt" in r.stderr.splitlines()[0].lower() and "--until lower" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".*"))
    r = dsv4c_cli("build", "--from-bundle", str(bundle), "-o", str(out), cache=stage_cache)
    assert r.returncode == 4, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".*"))
