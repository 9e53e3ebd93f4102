"""Recipe schema v1: shipped recipes, lock round-trip, extends + --set, and the bad-input corpus.

Expectations are written by hand from the schema's documentation (README / recipe docstring), not read back from
the implementation: exact group formats per preset, the canonical-JSON digest, key paths and file:line positions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from dsv4c.compiler.errors import (EXIT_CODES, AddressInUseError, ArgumentError, BuildError, CheckpointInvalidError,
                                   Dsv4cError, EngineRunError, InfeasibleError, RecipeError, ToolchainError,
                                   ValidationGateError, format_error)
from dsv4c.compiler.recipe import as_recipe, check_model_source, load_recipe, recipe_json_schema
from dsv4c.graphs.config import PRESETS

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SHIPPED = sorted(RECIPES.glob("*.yaml"))

OFFICIAL = {"experts": "fp4", "dense": "fp8", "activations": "fp8", "kv_cache": "fp8", "indexer": "fp4"}
PLAIN = {"experts": "fp4", "dense": "fp8", "activations": "none", "kv_cache": "bf16", "indexer": "bf16"}
GROUPS = tuple(OFFICIAL)
SECTIONS = ("model", "quantization", "target", "runtime", "validate")


def groups(recipe) -> dict[str, str]:
    return {g: getattr(recipe.quantization, g) for g in GROUPS}


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


OK = "name: x\nmodel: {synthetic: {preset: tiny}}\ntarget: {kind: cpu}\n"  # the smallest valid recipe


# ---- shipped recipes ----------------------------------------------------------------------------------------------
def test_the_documented_recipes_are_shipped():
    assert {p.name for p in SHIPPED} >= {"tiny-cpu.yaml", "tiny-plain-cpu.yaml", "flash-h100.yaml", "pro-h200.yaml",
                                         "flash-ascend950.yaml", "flash-ascend910b.yaml", "flash-cpu-mini.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_loads_and_is_named_after_its_file(path):
    r = load_recipe(path)
    assert r.name == path.stem
    assert r.schema_version == 1


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_lock_round_trip_gives_the_same_digest(path, tmp_path):
    r = load_recipe(path)
    lock = tmp_path / "elsewhere" / "recipe.lock.yaml"  # another directory: nothing may stay relative
    lock.parent.mkdir()
    lock.write_text(r.lock_yaml())
    again = load_recipe(lock)
    assert again.digest() == r.digest()
    assert all(again.digest(s) == r.digest(s) for s in SECTIONS)
    assert again.lock_yaml() == r.lock_yaml()


def test_tiny_cpu_is_the_readme_default():
    r = load_recipe(RECIPES / "tiny-cpu.yaml")
    assert (r.model.synthetic.preset, r.model.synthetic.seed, r.model.checkpoint) == ("tiny", 0, None)
    assert r.quantization.preset == "official" and groups(r) == OFFICIAL
    assert r.quantization.on_unsupported == "error"
    assert (r.target.kind, r.target.arch, r.target.soc_version) == ("cpu", None, None)
    assert (r.runtime.max_batch_size, r.runtime.max_seq_len) == (2, 4096)
    v = r.validate
    assert (v.prompts, v.prompt_len, v.decode_steps, v.seed) == (2, None, 16, 0)  # prompt sized from the model
    assert (v.min_cosine, v.require_top1, v.max_kl) == (None, True, 0.01)  # thresholds derived at build time
    assert v.agreement is None and v.floor_cosine is None


def test_tiny_plain_cpu_differs_from_tiny_cpu_only_in_name_numerics_and_tolerance():
    base, plain = load_recipe(RECIPES / "tiny-cpu.yaml"), load_recipe(RECIPES / "tiny-plain-cpu.yaml")
    assert plain.quantization.preset == "plain" and groups(plain) == PLAIN
    for section in ("model", "target", "runtime"):
        assert plain.digest(section) == base.digest(section), section
    # same prompts and gate keys: the gate derived at build time is the strict one for continuous numerics
    assert plain.digest("validate") == base.digest("validate")
    assert plain.digest("quantization") != base.digest("quantization")
    assert plain.digest() != base.digest()


def test_flash_h100_declares_the_fp4_to_fp8_fallback_and_plans_without_weights():
    r = load_recipe(RECIPES / "flash-h100.yaml")
    assert r.model.checkpoint == str((RECIPES.parent / "models" / "DeepSeek-V4-Flash").resolve())
    assert r.model.preset == "v4-flash" and r.model.synthetic is None
    assert r.model.shapes().hidden_size == 4096 and r.model.shapes().n_routed_experts == 256  # no weights read
    assert (r.target.kind, r.target.arch, r.target.device) == ("tensorrt", "sm_90", "H100")
    assert (r.target.devices_per_node, r.target.nodes, r.target.world_size) == (8, 1, 8)
    assert r.quantization.experts == "fp4" and r.quantization.on_unsupported == "fallback"
    assert r.quantization.fallback_for("experts") == "fp8"


def test_pro_h200_is_two_nodes_of_eight():
    r = load_recipe(RECIPES / "pro-h200.yaml")
    assert r.model.preset == "v4-pro" and r.model.shapes().hidden_size == 7168
    t = r.target
    assert (t.kind, t.arch, t.device, t.devices_per_node, t.nodes) == ("tensorrt", "sm_90", "H200", 8, 2)
    p = t.parallel
    assert p.tensor * p.pipeline * p.data == 16 and (p.tensor * p.data) % p.expert == 0
    assert r.quantization.on_unsupported == "fallback"


def test_ascend_recipes():
    a950, a910 = load_recipe(RECIPES / "flash-ascend950.yaml"), load_recipe(RECIPES / "flash-ascend910b.yaml")
    assert (a950.target.kind, a950.target.soc_version, a950.target.arch) == ("cann", "Ascend950", None)
    assert groups(a950) == OFFICIAL and a950.quantization.on_unsupported == "error"
    assert (a910.target.kind, a910.target.soc_version) == ("cann", "Ascend910B")
    assert a910.quantization.on_unsupported == "fallback"
    assert a910.quantization.fallback_for("dense") == "int8"
    assert a910.quantization.fallback_for("experts") in ("int8", "int4")


def test_flash_cpu_mini():
    r = load_recipe(RECIPES / "flash-cpu-mini.yaml")
    assert r.model.synthetic.preset == "mini-1b" and r.target.kind == "cpu"
    assert (r.runtime.max_batch_size, r.runtime.max_seq_len) == (8, 4096)


# ---- lock and digest ----------------------------------------------------------------------------------------------
def test_lock_is_fully_resolved(tmp_path):
    write(tmp_path, "quantization: {preset: plain, experts: fp8}\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\n" + OK, "child.yaml")
    lock = yaml.safe_load(load_recipe(child).lock_yaml())
    assert "extends" not in lock
    assert lock["schema_version"] == 1
    assert lock["quantization"] == {**PLAIN, "experts": "fp8", "preset": "plain", "on_unsupported": "error",
                                    "fallback": None}
    assert lock["runtime"] == {"max_batch_size": 2, "max_seq_len": 4096}
    assert lock["target"]["parallel"] == {"tensor": 1, "expert": 1, "pipeline": 1, "data": 1}
    assert set(lock) == {"schema_version", "name", *SECTIONS}


def test_digest_is_sha256_of_canonical_json():
    r = load_recipe(RECIPES / "tiny-cpu.yaml")
    runtime = json.dumps({"max_seq_len": 4096, "max_batch_size": 2}, sort_keys=True, separators=(",", ":"))
    assert r.digest("runtime") == hashlib.sha256(runtime.encode()).hexdigest()
    whole = json.dumps(yaml.safe_load(r.lock_yaml()), sort_keys=True, separators=(",", ":"))
    assert r.digest() == hashlib.sha256(whole.encode()).hexdigest()
    with pytest.raises(KeyError):
        r.digest("nonsense")


def test_digest_ignores_how_the_recipe_is_written(tmp_path):
    terse = write(tmp_path, OK, "a.yaml")
    verbose = write(tmp_path, "schema_version: 1\nname: x\nmodel:\n  synthetic:\n    seed: 0\n    preset: tiny\n"
                              "quantization: {preset: official, experts: fp4}\ntarget: {kind: cpu, nodes: 1}\n"
                              "runtime: {max_seq_len: 4096}\n", "b.yaml")
    assert load_recipe(terse).digest() == load_recipe(verbose).digest()


# ---- extends and --set --------------------------------------------------------------------------------------------
def test_extends_deep_merges_child_wins_and_paths_are_relative_to_their_file(tmp_path):
    write(tmp_path, "name: base\nmodel: {checkpoint: ../weights, preset: v4-flash}\n"
                    "target: {kind: tensorrt, arch: sm_90, devices_per_node: 8}\n"
                    "runtime: {max_batch_size: 4, max_seq_len: 8192}\n", "shared/base.yaml")
    child = write(tmp_path, "extends: shared/base.yaml\nname: child\ntarget: {arch: sm_100}\n"
                            "runtime: {max_batch_size: 16}\n", "child.yaml")
    r = load_recipe(child)
    assert r.name == "child"
    assert (r.target.kind, r.target.arch, r.target.devices_per_node) == ("tensorrt", "sm_100", 8)
    assert (r.runtime.max_batch_size, r.runtime.max_seq_len) == (16, 8192)
    assert r.model.checkpoint == str((tmp_path / "weights").resolve())  # relative to shared/, not to child.yaml


def test_extends_chain_of_three(tmp_path):
    write(tmp_path, OK + "runtime: {max_batch_size: 3}\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\nruntime: {max_seq_len: 100}\n", "b.yaml")
    r = load_recipe(write(tmp_path, "extends: b.yaml\nname: c\n", "c.yaml"))
    assert (r.name, r.runtime.max_batch_size, r.runtime.max_seq_len) == ("c", 3, 100)


def test_set_overrides_are_yaml_scalars_applied_after_the_merge(tmp_path):
    write(tmp_path, OK + "runtime: {max_batch_size: 3}\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nruntime: {max_batch_size: 5}\n", "child.yaml")
    r = load_recipe(child, ["runtime.max_batch_size=4", "target.kind=tensorrt", "target.arch=sm_100",
                            "validate.require_top1=false", "validate.min_cosine=0.99"])
    assert r.runtime.max_batch_size == 4 and isinstance(r.runtime.max_batch_size, int)
    assert (r.target.kind, r.target.arch) == ("tensorrt", "sm_100")
    assert r.validate.require_top1 is False and r.validate.min_cosine == 0.99


def test_set_quantization_preset_and_explicit_keys_win():
    r = load_recipe(RECIPES / "tiny-cpu.yaml", ["quantization.preset=plain", "quantization.experts=fp8"])
    assert groups(r) == {**PLAIN, "experts": "fp8"}


def test_set_a_mapping_merges_into_the_section():
    r = load_recipe(RECIPES / "tiny-cpu.yaml", ["target={kind: cann, soc_version: Ascend950}"])
    assert (r.target.kind, r.target.soc_version) == ("cann", "Ascend950")


def test_set_checkpoint_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe(RECIPES / "flash-h100.yaml", ["model.checkpoint=weights/flash"])
    assert r.model.checkpoint == str(tmp_path.resolve() / "weights" / "flash")


# ---- recipes given as data (the Python API: dsv4c.build / dsv4c.plan) ----------------------------------------------
def test_a_mapping_is_a_recipe_like_the_file_that_holds_it(tmp_path, monkeypatch):
    text = (RECIPES / "tiny-cpu.yaml").read_text()
    data = yaml.safe_load(text)
    assert as_recipe(data).digest() == load_recipe(RECIPES / "tiny-cpu.yaml").digest()
    assert as_recipe(data, ["runtime.max_batch_size=1"]).runtime.max_batch_size == 1
    assert data == yaml.safe_load(text)  # the caller's mapping is not changed by loading or overriding it
    monkeypatch.chdir(tmp_path)  # extends and a relative checkpoint are relative to the working directory
    r = as_recipe({"extends": str(RECIPES / "flash-h100.yaml"), "name": "mine", "model": {"checkpoint": "w"}})
    assert (r.name, r.model.checkpoint) == ("mine", str(tmp_path.resolve() / "w"))


def test_a_loaded_recipe_is_taken_as_is_or_overridden_into_a_new_one():
    r = load_recipe(RECIPES / "tiny-cpu.yaml")
    assert as_recipe(r) is r
    changed = as_recipe(r, ["target.kind=tensorrt", "target.arch=sm_100"])
    assert (changed.target.kind, changed.target.arch, r.target.kind) == ("tensorrt", "sm_100", "cpu")
    assert as_recipe(str(RECIPES / "tiny-cpu.yaml")).digest() == r.digest()


def test_a_bad_mapping_is_exit_2_naming_the_key():
    with pytest.raises(RecipeError, match=r"^<recipe mapping>: unknown key `target.kindd`; did you mean `target.kind`"):
        as_recipe({"name": "x", "model": {"synthetic": {"preset": "tiny"}}, "target": {"kindd": "cpu"}})
    with pytest.raises(TypeError, match="a path, a mapping of recipe keys or a Recipe"):
        as_recipe(42)


def test_default_parallel_layout_and_explicit_alternatives(tmp_path):
    base = "name: x\nmodel: {preset: v4-pro}\n"
    r = load_recipe(write(tmp_path, base + "target: {kind: tensorrt, arch: sm_90, devices_per_node: 8, nodes: 2}\n"))
    p = r.target.parallel
    assert (p.tensor, p.expert, p.pipeline, p.data) == (8, 8, 2, 1)
    r = load_recipe(write(tmp_path, base + "target: {kind: tensorrt, arch: sm_90, devices_per_node: 8, nodes: 2, "
                                           "parallel: {tensor: 8, data: 2, expert: 16}}\n"))
    p = r.target.parallel
    assert (p.tensor, p.expert, p.pipeline, p.data) == (8, 16, 1, 2)


# ---- the model source: plan without weights, build with them ------------------------------------------------------
def test_preset_only_recipe_plans_but_cannot_build(tmp_path):
    r = load_recipe(write(tmp_path, "name: x\nmodel: {preset: v4-flash}\ntarget: {kind: cpu}\n"))
    assert r.model.shapes().num_hidden_layers == 43
    with pytest.raises(CheckpointInvalidError) as e:
        check_model_source(r)
    assert e.value.exit_code == 7 and "model.checkpoint" in str(e.value)


def test_missing_checkpoint_directory_is_exit_7_naming_the_path(tmp_path):
    r = load_recipe(RECIPES / "flash-h100.yaml", [f"model.checkpoint={tmp_path / 'no-such-dir'}"])  # loads fine
    with pytest.raises(CheckpointInvalidError) as e:
        check_model_source(r)
    assert e.value.exit_code == 7 and str(tmp_path / "no-such-dir") in str(e.value)


def test_checkpoint_config_must_match_the_preset(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(PRESETS["tiny"].to_hf_dict()))
    ok = write(tmp_path, "name: x\nmodel: {checkpoint: ckpt, preset: tiny}\ntarget: {kind: cpu}\n", "ok.yaml")
    check_model_source(load_recipe(ok))
    bad = write(tmp_path, "name: x\nmodel: {checkpoint: ckpt, preset: v4-flash}\ntarget: {kind: cpu}\n")
    with pytest.raises(CheckpointInvalidError) as e:
        check_model_source(load_recipe(bad))
    assert "hidden_size" in format_error(e.value)
    # without a preset the shapes come from the checkpoint itself
    r = load_recipe(write(tmp_path, "name: x\nmodel: {checkpoint: ckpt}\ntarget: {kind: cpu}\n", "c.yaml"))
    assert r.model.shapes() == PRESETS["tiny"]


def test_synthetic_models_need_no_files():
    check_model_source(load_recipe(RECIPES / "tiny-cpu.yaml"))


# ---- the bad-input corpus: RecipeError, exit 2, the key path and where it was written -----------------------------
BAD = {
    # name: (recipe text, --set overrides, substrings the message must contain)
    "yaml syntax (indentation)": ("name: x\n  model: 3\n", [], ["bad.yaml:2:", "YAML syntax error"]),
    "yaml syntax (unclosed flow)": ("name: x\ntarget: {kind: cpu\n", [], ["bad.yaml:", "YAML syntax error", "line 2"]),
    "yaml syntax (tab)": ("name: x\n\tmodel: 3\n", [], ["bad.yaml:2:1", "YAML syntax error"]),
    "unknown key": ("name: x\nmodel: {synthetic: {preset: tiny}}\ntarget:\n  kindd: cpu\n", [],
                    ["bad.yaml:4:3", "target.kindd", "did you mean `target.kind`"]),
    "unknown top-level key": (OK + "runtim: {max_seq_len: 8}\n", [], ["bad.yaml:4:1", "`runtim`",
                                                                      "did you mean `runtime`"]),
    "unknown nested key": (OK + "quantization: {expertz: fp8}\n", [], ["quantization.expertz",
                                                                       "did you mean `quantization.experts`"]),
    "wrong enum": (OK + "quantization:\n  experts: fp5\n", [], ["bad.yaml:5:3", "quantization.experts", "'fp5'",
                                                               "fp4", "w4a16", "int4", "bf16"]),
    "wrong type (int)": (OK + "runtime:\n  max_batch_size: four\n", [], ["bad.yaml:5:3", "runtime.max_batch_size",
                                                                        "integer"]),
    "wrong type (string for int)": (OK + "runtime: {max_seq_len: '4096'}\n", [], ["runtime.max_seq_len", "integer"]),
    "wrong type (bool)": (OK + "validate: {require_top1: maybe}\n", [], ["validate.require_top1", "true or false"]),
    "wrong type (section)": ("name: x\nmodel: {synthetic: {preset: tiny}}\ntarget: cpu\n", [],
                             ["bad.yaml:3:1", "`target`", "mapping"]),
    "unknown target kind": ("name: x\nmodel: {synthetic: {preset: tiny}}\ntarget: {kind: gpu}\n", [],
                            ["target.kind", "'gpu'", "cpu", "tensorrt", "cann"]),
    "tensorrt without arch": ("name: x\nmodel: {synthetic: {preset: tiny}}\ntarget: {kind: tensorrt}\n", [],
                              ["bad.yaml:3:", "target.arch", "tensorrt", "sm_90"]),
    "cann without soc_version": ("name: x\nmodel: {synthetic: {preset: tiny}}\ntarget: {kind: cann}\n", [],
                                 ["target.soc_version", "Ascend910B", "Ascend950"]),
    "cpu with arch": ("name: x\nmodel: {synthetic: {preset: tiny}}\ntarget: {kind: cpu, arch: sm_90}\n", [],
                      ["target.arch", "cpu"]),
    "cpu with soc_version": ("name: x\nmodel: {synthetic: {preset: tiny}}\ntarget: {kind: cpu, "
                             "soc_version: Ascend950}\n", [], ["target.soc_version"]),
    "device does not match arch": ("name: x\nmodel: {synthetic: {preset: tiny}}\ntarget: {kind: tensorrt, "
                                   "arch: sm_100, device: H200}\n", [], ["target.device", "sm_90"]),
    "layout does not cover the devices": ("name: x\nmodel: {synthetic: {preset: tiny}}\ntarget: {kind: tensorrt, "
                                          "arch: sm_90, devices_per_node: 8, parallel: {tensor: 4}}\n", [],
                                          ["target.parallel", "8"]),
    "expert degree does not divide": ("name: x\nmodel: {synthetic: {preset: tiny}}\ntarget: {kind: tensorrt, "
                                      "arch: sm_90, devices_per_node: 8, parallel: {tensor: 8, expert: 3}}\n", [],
                                      ["target.parallel.expert"]),
    "zero devices": ("name: x\nmodel: {synthetic: {preset: tiny}}\ntarget: {kind: cpu, devices_per_node: 0}\n", [],
                     ["target.devices_per_node"]),
    "bad name": ("name: Tiny CPU\nmodel: {synthetic: {preset: tiny}}\ntarget: {kind: cpu}\n", [],
                 ["bad.yaml:1:1", "`name`", "Tiny CPU"]),
    "no name": ("model: {synthetic: {preset: tiny}}\ntarget: {kind: cpu}\n", [], ["`name`", "required"]),
    "no model source": ("name: x\nmodel: {}\ntarget: {kind: cpu}\n", [], ["`model`", "checkpoint", "synthetic"]),
    "two model sources": ("name: x\nmodel: {checkpoint: w, synthetic: {preset: tiny}}\ntarget: {kind: cpu}\n", [],
                          ["model.checkpoint", "model.synthetic"]),
    "unknown model preset": ("name: x\nmodel: {synthetic: {preset: tinyy}}\ntarget: {kind: cpu}\n", [],
                             ["model.synthetic.preset", "'tinyy'", "did you mean tiny"]),
    "max_seq_len zero": (OK + "runtime: {max_seq_len: 0}\n", [], ["runtime.max_seq_len"]),
    "max_seq_len above 1M": (OK + "runtime: {max_seq_len: 2000000}\n", [], ["runtime.max_seq_len", "1048576"]),
    "decode steps longer than the context": (OK + "runtime: {max_seq_len: 10}\n", [],
                                             ["validate.decode_steps", "10"]),
    "gate longer than the context": (OK + "runtime: {max_seq_len: 30}\nvalidate: {prompt_len: 24}\n", [],
                                     ["validate.prompt_len", "30"]),
    "fallback without permission": (OK + "quantization: {fallback: {experts: fp8}}\n", [],
                                    ["quantization.fallback", "on_unsupported"]),
    "future schema": ("schema_version: 2\n" + OK, [], ["bad.yaml:1:1", "schema_version", "reads recipe schema 1"]),
    "duplicate key": (OK + "name: y\n", [], ["bad.yaml:4:1", "duplicate", "`name`"]),
    "empty file": ("", [], ["bad.yaml", "empty"]),
    "not a mapping": ("- name: x\n", [], ["bad.yaml", "mapping"]),
    "bad --set path": (OK, ["runtime.max_batch=4"], ["--set runtime.max_batch=4", "runtime.max_batch",
                                                     "did you mean `runtime.max_batch_size`"]),
    "bad --set top-level": (OK, ["target.kind.x=1"], ["--set target.kind.x=1", "target.kind"]),
    "--set without =": (OK, ["runtime.max_batch_size"], ["--set runtime.max_batch_size", "KEY=VALUE"]),
    "--set bad value": (OK, ["target.kind=gpu"], ["--set target.kind=gpu", "target.kind", "tensorrt"]),
    "--set bad yaml": (OK, ["runtime.max_batch_size=[1"], ["--set runtime.max_batch_size=[1", "YAML"]),
    "--set extends": (OK, ["extends=other.yaml"], ["--set extends=other.yaml", "extends"]),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_recipe_is_exit_2_naming_the_key(case, tmp_path):
    text, overrides, expected = BAD[case]
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text), overrides)
    assert e.value.exit_code == 2
    message = format_error(e.value)
    first = message.splitlines()[0]
    assert "recipe invalid" in first
    for s in expected:
        assert s in message, f"{s!r} not in:\n{message}"


def test_extends_cycle(tmp_path):
    write(tmp_path, "extends: b.yaml\n" + OK, "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "a.yaml")
    assert e.value.exit_code == 2
    assert "cycle" in str(e.value) and "a.yaml" in str(e.value) and "b.yaml:1:1" in str(e.value)


def test_extends_itself(tmp_path):
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(write(tmp_path, "extends: self.yaml\n" + OK, "self.yaml"))


def test_extends_missing_file(tmp_path):
    with pytest.raises(RecipeError, match=r"bad\.yaml:1:1: .*nope\.yaml"):
        load_recipe(write(tmp_path, "extends: nope.yaml\n" + OK))


def test_error_in_a_base_file_points_at_the_base(tmp_path):
    write(tmp_path, "target:\n  kind: cpu\n  archh: sm_90\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nname: x\nmodel: {synthetic: {preset: tiny}}\n", "child.yaml")
    with pytest.raises(RecipeError, match=r"base\.yaml:3:3: unknown key `target\.archh`"):
        load_recipe(child)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_a_typo_is_reported_without_its_cascade(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, "name: x\nmodel: {synthetic: {preset: tiny}}\ntarget: {kindd: cpu}\n"))
    assert "target.kindd" in str(e.value)
    assert not any("target.kind`" in d and "required" in d for d in e.value.details)


# ---- JSON schema --------------------------------------------------------------------------------------------------
def test_json_schema_shape():
    schema = recipe_json_schema()
    json.dumps(schema)  # serialisable
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert set(schema["properties"]) >= {"schema_version", "extends", "name", *SECTIONS}
    assert set(schema["required"]) == {"name", "model", "target"}
    defs = schema["$defs"]

    def section(name: str) -> dict:
        ref = schema["properties"][name].get("$ref") or schema["properties"][name]["anyOf"][0]["$ref"]
        return defs[ref.rsplit("/", 1)[1]]

    target = section("target")
    assert target["additionalProperties"] is False
    assert target["properties"]["kind"]["enum"] == ["cpu", "tensorrt", "cann"]
    assert {"arch", "soc_version", "devices_per_node", "nodes", "parallel"} <= set(target["properties"])
    assert set(GROUPS) | {"preset", "on_unsupported"} <= set(section("quantization")["properties"])
    assert {"checkpoint", "preset", "synthetic"} <= set(section("model")["properties"])
    assert {"max_batch_size", "max_seq_len"} <= set(section("runtime")["properties"])
    assert {"prompts", "min_cosine", "max_kl", "require_top1"} <= set(section("validate")["properties"])
    assert all(d.get("additionalProperties") is False for d in defs.values())


# ---- errors -------------------------------------------------------------------------------------------------------
def test_exit_code_table_and_types():
    assert EXIT_CODES == {0: "ok", 2: "recipe or arguments invalid", 3: "infeasible on the declared target",
                          4: "toolchain missing or mismatched", 5: "validation gate failed", 6: "build error",
                          7: "checkpoint invalid", 8: "address in use or unavailable",
                          9: "engine failed while running"}
    codes = {RecipeError: 2, ArgumentError: 2, InfeasibleError: 3, ToolchainError: 4, ValidationGateError: 5,
             BuildError: 6, CheckpointInvalidError: 7, AddressInUseError: 8, EngineRunError: 9}
    for cls, code in codes.items():
        assert issubclass(cls, Dsv4cError) and cls.exit_code == code


def test_format_error_first_line_names_the_cause_then_details_and_hint():
    e = InfeasibleError("op dsv4.SparseAttn has no tensorrt implementation\nfor sm_100", hint="use sm_90",
                        details=["looked in: plugins/"])
    lines = format_error(e).splitlines()
    assert "infeasible" in lines[0] and "exit 3" in lines[0] and "dsv4.SparseAttn" in lines[0]
    assert lines[1:] == ["  for sm_100", "  looked in: plugins/", "  hint: use sm_90"]
    assert "hint" not in format_error(BuildError("disk full"))


def test_one_wrong_value_gives_one_error(tmp_path):
    # devices_per_node: 0 must not also produce errors about the default parallel layout derived from it
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, "name: x\nmodel: {synthetic: {preset: tiny}}\n"
                                    "target: {kind: cpu, devices_per_node: 0}\n"))
    assert "target.devices_per_node" in str(e.value) and e.value.details == []
