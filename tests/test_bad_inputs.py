"""Bad input through the command line: each case exits with its documented code, the first stderr line names the
cause (file:line:col, key path, file or tensor), and nothing is left behind: no artifact directory, no staging or
temporary directory beside it or in the stage cache. Checkpoint errors must stop in the load stage, before export.

Exit codes (README, `dsv4c --help`): 2 recipe invalid, 7 checkpoint invalid. `--debug` keeps a repro bundle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv4c.compiler.recipe import load_recipe
from dsv4c.graphs.checkpoint import write_synthetic_checkpoint
from dsv4c.graphs.config import preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    """The tiny synthetic model in the official layout, in 4 shards (so one can go missing)."""
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset("tiny"), seed=0,
                                      shard_bytes=2 << 20)


def shards(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("model-*.safetensors"))


def build(tmp_path: Path, recipe_text: str, *extra: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """`dsv4c build` of a recipe written to tmp_path, output under tmp_path/out, a fresh stage cache."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(recipe_text)
    out, cache = tmp_path / "out" / "bad", tmp_path / "cache"
    out.parent.mkdir()
    env = {**os.environ, "DSV4C_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-m", "dsv4c.compiler.cli", "build", str(recipe), "-o", str(out),
                           "--events", "json", *extra], capture_output=True, text=True, cwd=ROOT, env=env)
    return done, out, cache


def assert_clean_failure(done: subprocess.CompletedProcess, out: Path, cache: Path, code: int,
                         cause: str) -> str:
    """Exit code, first stderr line, and nothing left beside the output or half-written in the cache."""
    assert done.returncode == code, done.stderr
    first = done.stderr.splitlines()[0]
    assert first.startswith("error (") and f"exit {code}): " in first, first
    assert re.search(cause, first), first
    assert list(out.parent.iterdir()) == [], "a failed build left something beside the output"
    if cache.exists():  # only completed stage markers: no temporary (dot-named) directories
        leftovers = [p for p in cache.rglob("*") if p.name.startswith(".") and p.name != ".complete"]
        assert leftovers == []
    return first


def stages_run(done: subprocess.CompletedProcess) -> list[str]:
    return [e["stage"] for e in map(json.loads, done.stdout.splitlines()) if e.get("event") == "stage"]


# ---- recipe errors: exit 2 --------------------------------------------------------------------------------------
TINY = "name: bad\nmodel: {synthetic: {preset: tiny}}\n"
RECIPE_CASES = {
    "yaml_syntax": (TINY.replace("}}", "}") + "target: {kind: cpu}\n",
                    r"bad\.yaml:3:\d+: YAML syntax error"),
    "unknown_key": (TINY + "target: {kind: cpu}\nruntime: {max_batch_sise: 2}\n",
                    r"bad\.yaml:4:\d+: unknown key `runtime\.max_batch_sise`; did you mean `runtime\.max_batch_size`"),
    "wrong_enum": (TINY + "target: {kind: cpu}\nquantization: {experts: fp5}\n",
                   r"bad\.yaml:4:\d+: `quantization\.experts`: 'fp5' is not one of fp4 \| fp8"),
    "wrong_type": (TINY + "target: {kind: cpu}\nruntime: {max_batch_size: two}\n",
                   r"bad\.yaml:4:\d+: `runtime\.max_batch_size`: must be an integer \(got 'two'\)"),
    "unknown_target": (TINY + "target: {kind: tpu}\n",
                       r"bad\.yaml:3:\d+: `target\.kind`: 'tpu' is not one of cpu \| tensorrt \| cann"),
}


@pytest.mark.parametrize("case", RECIPE_CASES)
def test_recipe_errors_exit_2_naming_the_key(case, tmp_path):
    text, cause = RECIPE_CASES[case]
    done, out, cache = build(tmp_path, text)
    assert_clean_failure(done, out, cache, 2, cause)
    assert stages_run(done) == []  # refused before any stage


# ---- checkpoint errors: exit 7, in the load stage ----------------------------------------------------------------
def corrupt_missing_shard(ckpt: Path) -> str:
    victim = shards(ckpt)[1]
    victim.unlink()
    return rf"{re.escape(str(victim))}: shard listed in model\.safetensors\.index\.json is missing"


def corrupt_truncated_shard(ckpt: Path) -> str:
    victim = shards(ckpt)[2]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    return rf"{re.escape(str(victim))}: truncated or padded shard"


def corrupt_wrong_dtype(ckpt: Path) -> str:
    victim = shards(ckpt)[0]
    tensors = load_file(victim)
    name = "layers.0.attn_norm.weight"
    assert name in tensors  # the first shard holds layer 0
    tensors[name] = tensors[name].float()
    save_file(tensors, victim, metadata={"format": "pt"})
    return rf"tensor '{re.escape(name)}' in {re.escape(str(victim))}: F32 \[256\], expected BF16 \[256\]"


def corrupt_wrong_shape(ckpt: Path) -> str:
    victim = shards(ckpt)[0]
    tensors = load_file(victim)
    name = "layers.0.attn.attn_sink"
    tensors[name] = torch.zeros(5)  # 4 heads in the tiny preset
    save_file(tensors, victim, metadata={"format": "pt"})
    return rf"tensor '{re.escape(name)}' in {re.escape(str(victim))}: F32 \[5\], expected F32 \[4\]"


def corrupt_pickle_only(ckpt: Path) -> str:
    for f in [*shards(ckpt), ckpt / "model.safetensors.index.json"]:
        f.unlink()
    torch.save({"embed.weight": torch.zeros(2, 2)}, ckpt / "pytorch_model.bin")
    return rf"{re.escape(str(ckpt / 'pytorch_model.bin'))}: pickle checkpoints are refused"


CHECKPOINT_CASES = {"missing_shard": corrupt_missing_shard, "truncated_shard": corrupt_truncated_shard,
                    "wrong_dtype": corrupt_wrong_dtype, "wrong_shape": corrupt_wrong_shape,
                    "pickle_only": corrupt_pickle_only}


def checkpoint_recipe(ckpt: Path) -> str:
    return f"name: bad\nmodel: {{checkpoint: {ckpt}}}\ntarget: {{kind: cpu}}\n"


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_checkpoint_errors_exit_7_in_the_load_stage(case, good_checkpoint, tmp_path):
    ckpt = shutil.copytree(good_checkpoint, tmp_path / "ckpt")
    cause = CHECKPOINT_CASES[case](ckpt)
    done, out, cache = build(tmp_path, checkpoint_recipe(ckpt))
    assert_clean_failure(done, out, cache, 7, cause)
    assert stages_run(done) == ["resolve", "plan"]  # load failed: nothing was quantized or exported


def test_missing_checkpoint_dir_exits_7(tmp_path):
    missing = tmp_path / "nowhere" / "DeepSeek-V4-Flash"
    done, out, cache = build(tmp_path, checkpoint_recipe(missing))
    assert_clean_failure(done, out, cache, 7, rf"{re.escape(str(missing))}: checkpoint directory not found "
                                              r"\(model\.checkpoint\)")
    assert stages_run(done) == ["resolve", "plan"]  # reported when the build reaches the load stage


def test_the_unaltered_checkpoint_passes_the_load_stage(good_checkpoint, tmp_path):
    """The corruptions above are what fails: the same checkpoint and recipe, untouched, load cleanly."""
    done, out, _ = build(tmp_path, checkpoint_recipe(good_checkpoint), "--until", "load")
    assert done.returncode == 0, done.stderr
    assert stages_run(done) == ["resolve", "plan", "load"]


# ---- --debug: the repro bundle --------------------------------------------------------------------------------------
def test_debug_keeps_a_repro_bundle_that_replays_the_failing_stage(good_checkpoint, tmp_path):
    ckpt = shutil.copytree(good_checkpoint, tmp_path / "ckpt")
    cause = corrupt_truncated_shard(ckpt)
    done, out, cache = build(tmp_path, checkpoint_recipe(ckpt), "--debug")
    assert done.returncode == 7
    assert re.search(cause, done.stderr.splitlines()[0])
    path = Path(re.search(r"repro bundle: (\S+)", done.stderr).group(1))
    assert path.parent == out.parent and path.name.startswith("bad.repro-")
    assert not out.exists() and [p.name for p in out.parent.iterdir()] == [path.name]

    lock = load_recipe(path / "recipe.lock.yaml")
    assert lock.digest() == load_recipe(tmp_path / "bad.yaml").digest()  # the resolved recipe, exactly
    info = json.loads((path / "stages.json").read_text())
    assert info["failing_stage"] == "load" and info["exit_code"] == 7
    assert set(info["stage_keys"]) == {"resolve", "plan"} and info["stage_keys"]["resolve"] == lock.digest()
    truncated = shards(ckpt)[2]
    assert info["inputs"]["files"][truncated.name]["bytes"] == truncated.stat().st_size
    assert "CheckpointError" in (path / "traceback.txt").read_text()

    replay = subprocess.run(["sh", str(path / "replay.sh")], capture_output=True, text=True, cwd=tmp_path)
    assert replay.returncode == 7
    progress, error = replay.stderr.split("error (", 1)  # text progress first: resolve and plan from the cache
    assert "cached resolve" in progress and "cached plan" in progress
    assert "error (" + error.splitlines()[0] == done.stderr.splitlines()[0]  # the same failure, same stage
    assert not out.exists()
