"""The Python API (dsv4c.build, dsv4c.plan, dsv4c.load): the command line's behaviour without a process.

Failures are the Dsv4cError subclasses whose exit codes the CLI uses (never SystemExit); only the cheap stages run
here (`until="plan"`): the full builds go through the API in the fixtures of test_build_e2e, test_serve,
test_validation and the target tests, and through the command line in test_cli_ux and test_bad_inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import dsv4c
from dsv4c.compiler.errors import ArgumentError, InfeasibleError, RecipeError, ToolchainError
from dsv4c.compiler.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-cpu.yaml"
FLASH = ROOT / "recipes" / "flash-h100.yaml"
FLASH_SHIPPED_BYTES = 159_609_485_896  # the official checkpoint's metadata.total_size (spec §5.6, test_plan.py)


def test_import_dsv4c_is_cheap_and_gives_the_api():
    """`import dsv4c` loads neither torch nor the compiler: each API function imports what it needs when called."""
    script = ("import sys, dsv4c; print(json.dumps({'api': [callable(f) for f in (dsv4c.build, dsv4c.plan, "
              "dsv4c.load)], 'loaded': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'dsv4c', "
              "'click', 'pydantic'))}))")
    done = subprocess.run([sys.executable, "-c", "import json; " + script], capture_output=True, text=True, cwd=ROOT,
                          check=True)
    report = json.loads(done.stdout)
    assert report["api"] == [True, True, True]
    assert report["loaded"] == ["dsv4c", "dsv4c._version"]
    assert dsv4c.__all__ == ["__version__", "build", "plan", "load"]


def test_plan_is_typed_and_gives_the_flash_checkpoint_bytes():
    """The figures `dsv4c plan recipes/flash-h100.yaml --json` prints (test_plan.py checks the same bytes through
    the command line): 8 H100s hold it as a tensor 8 x expert 8 mesh, and the TensorRT target lowers every rank."""
    plan = dsv4c.plan(FLASH)
    assert isinstance(plan, Plan)
    assert plan.weights_bytes_as_shipped == FLASH_SHIPPED_BYTES
    assert (plan.recipe, plan.fits, plan.feasible) == ("flash-h100", True, True)
    assert not plan.build_blockers and not plan.problems
    assert list(plan.to_dict()) == [f for f in Plan.__dataclass_fields__]
    json.dumps(plan.to_dict())  # what --json prints


def test_plan_takes_overrides_and_a_mapping():
    data = yaml.safe_load(TINY.read_text())
    plan = dsv4c.plan(data, ["runtime.max_batch_size=1"])
    assert plan.recipe == "tiny-cpu" and plan.feasible
    assert plan.kv_cache_bytes_all_sequences == plan.kv_cache_bytes_at_max_seq_len  # one sequence


def test_build_until_plan_writes_no_artifact_and_prints_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert dsv4c.build(TINY, out, until="plan", cache_dir=tmp_path / "cache") is None
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert (tmp_path / "cache" / "plan").is_dir()  # the stage markers went to the cache given
    assert capsys.readouterr() == ("", "")  # events="quiet" by default


def test_build_events_are_the_cli_formats(tmp_path, capsys):
    dsv4c.build(TINY, tmp_path / "out", until="resolve", cache_dir=tmp_path / "cache", events="json")
    [event] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (event["event"], event["stage"]) == ("stage", "resolve")


def test_errors_are_raised_with_their_exit_codes_not_exited(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key `runtime.max_batch`") as bad_key:
        dsv4c.build(TINY, tmp_path / "out", ["runtime.max_batch=4"], cache_dir=tmp_path / "cache")
    assert bad_key.value.exit_code == 2
    with pytest.raises(ArgumentError, match=r"until='pack': expected one of resolve, plan, .*package"):
        dsv4c.build(TINY, tmp_path / "out", until="pack")
    no_fallback = yaml.safe_load(FLASH.read_text())  # FP4 experts on sm_90 without the declared FP8 fallback
    del no_fallback["quantization"]["fallback"], no_fallback["quantization"]["on_unsupported"]
    with pytest.raises(InfeasibleError, match="cannot be built for target 'tensorrt'") as infeasible:
        dsv4c.build(no_fallback, tmp_path / "out", until="plan", cache_dir=tmp_path / "cache")
    assert infeasible.value.exit_code == 3
    assert not (tmp_path / "out").exists()


def test_load_raises_the_cli_errors_for_what_is_not_a_usable_artifact(tmp_path):
    with pytest.raises(ArgumentError, match="no manifest.json; not a dsv4c artifact") as not_artifact:
        dsv4c.load(tmp_path)
    assert not_artifact.value.exit_code == 2
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 999}))
    with pytest.raises(ToolchainError, match="manifest schema version 999") as other_version:
        dsv4c.load(tmp_path)
    assert other_version.value.exit_code == 4
