"""Multi-device engines on one host and across "hosts": the collective kernels, the mesh runtime
(dsv4c.runtime.mesh) against the single-device reference, worker failure, the CLI and the torchrun entry point.

The mesh artifacts are built by `dsv4c.build` from recipes/tiny-plain-cpu-tp2.yaml (tensor 2 x expert 2 on 2
processes) and `--set` variants of it; their validate stage already runs the mesh against the reference (strict
gate). The tiny model on 2 cores: 2 processes per mesh, 4 for TP 2 x EP 2 (`-m slow`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import RECIPES, ROOT, compare_with_reference, cosine, reference_model

# name -> `--set` overrides of tiny-plain-cpu-tp2 (tensor 2, expert 2, data 1 on 2 devices); world = tensor * data
MESHES = {
    "tp2xep2": (),
    "ep2": ("target.parallel.tensor=1", "target.parallel.data=2"),
    "tp2": ("target.parallel.expert=1",),
    "tp2xep2x4": ("target.devices_per_node=4", "target.parallel.data=2"),  # 4 processes
}
PROMPTS = [list(range(5, 155)), list(range(300, 431))]  # 150 + 131 tokens: the window wraps, HCA emits an entry
STEPS = 16


@pytest.fixture(scope="session")
def plain_single(stage_cache, tmp_path_factory) -> Path:
    import dsv4c

    return dsv4c.build(RECIPES / "tiny-plain-cpu.yaml", tmp_path_factory.mktemp("mesh") / "tiny-plain",
                       cache_dir=stage_cache)


@pytest.fixture(scope="session")
def mesh_artifacts(stage_cache, tmp_path_factory):
    """name -> mesh artifact, each built once per session on first use."""
    import dsv4c

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = dsv4c.build(RECIPES / "tiny-plain-cpu-tp2.yaml", tmp_path_factory.mktemp("mesh") / name,
                                     MESHES[name], cache_dir=stage_cache)
        return made[name]

    return get


@pytest.fixture(scope="session")
def plain_reference(plain_single, stage_cache):
    from dsv4c.graphs.model import Numerics

    return reference_model(stage_cache, Numerics.plain())


def worst_cosine(engine, model) -> tuple[float, list[float]]:
    """The worst logit-row cosine over prefill + STEPS decode steps (the engine keeps its own caches), and each
    step's worst."""
    session = engine.session(len(PROMPTS))
    per_step = [float(cosine(got, want).min())
                for _, got, want in compare_with_reference(session, model, PROMPTS, STEPS, resync=False)]
    return min(per_step), per_step


# ---- the collective kernels ----------------------------------------------------------------------------------
def collective_model(path: Path) -> None:
    """x [2, 3] -> AllReduce over the tensor group -> AllGather over the expert group (size 2) -> y [2, 6]."""
    import onnx
    from onnx import helper

    nodes = [helper.make_node("AllReduce", ["x"], ["s"], domain="dsv4", group=0),
             helper.make_node("AllGather", ["s"], ["y"], domain="dsv4", group=1, size=2)]
    graph = helper.make_graph(nodes, "collectives",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("dsv4", 1)],
                              ir_version=10)
    onnx.save(model, path)


def kernel_library() -> Path:
    from dsv4c.targets.base import ToolchainMissing
    from dsv4c.targets.cpu.kernels.build import build_library

    try:
        return build_library()
    except ToolchainMissing as e:
        pytest.skip(f"no C++ toolchain for the kernel library: {e}")


def collective_rank(rank: int, port: int, model: str, library: str, queue) -> None:
    """One rank of a 2-rank mesh (tensor 2, expert 2): runs the collective model on x * (rank + 1)."""
    import torch.distributed as dist
    from datetime import timedelta

    from dsv4c.graphs import parallel
    from dsv4c.targets.base import ort_session
    from dsv4c.targets.cpu.executor import install_collectives

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=60))
        parallel.setup(parallel.Shard(rank, tensor=2, expert=2, data=1))
        session = ort_session(model, custom_ops_library=library)
        install_collectives(Path(library))
        x = np.arange(6, dtype=np.float32).reshape(2, 3) * (rank + 1)
        queue.put((rank, session.run(None, {"x": x})[0]))
    except BaseException as e:  # noqa: BLE001 - the test reports it
        queue.put((rank, f"{type(e).__name__}: {e}"))


def test_collective_kernels_across_two_ranks(tmp_path):
    import multiprocessing as mp

    from dsv4c.runtime.mesh import free_port

    library = kernel_library()
    collective_model(tmp_path / "c.onnx")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=collective_rank, args=(r, port, str(tmp_path / "c.onnx"), str(library), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    summed = x * 1 + x * 2  # ranks 0 and 1 send x * (rank + 1)
    for rank in range(2):
        assert isinstance(results[rank], np.ndarray), results[rank]
        np.testing.assert_array_equal(results[rank], np.concatenate([summed, summed], axis=-1))


def test_collective_kernel_without_callback_fails_naming_the_op(tmp_path):
    """This process never installs the callback: the node must fail, not hang or pass its input through."""
    from dsv4c.targets.base import ort_session

    library = kernel_library()
    collective_model(tmp_path / "c.onnx")
    session = ort_session(tmp_path / "c.onnx", custom_ops_library=str(library))
    with pytest.raises(Exception, match=r"dsv4\.AllReduce: no collective callback is installed"):
        session.run(None, {"x": np.ones((2, 3), np.float32)})


# ---- the mesh against the single-device reference --------------------------------------------------------------
# the recipe's mesh runs in CI; the other layouts build a mesh each (~2-4 min on 2 cores): -m slow
@pytest.mark.parametrize("name", ["tp2xep2", pytest.param("ep2", marks=pytest.mark.slow),
                                  pytest.param("tp2", marks=pytest.mark.slow),
                                  pytest.param("tp2xep2x4", marks=pytest.mark.slow)])
def test_mesh_logits_equal_the_single_device_model(name, mesh_artifacts, plain_reference):
    from dsv4c.artifact import read_manifest
    from dsv4c.runtime import Engine

    path = mesh_artifacts(name)
    mesh = read_manifest(path).engine["mesh"]
    assert mesh["world"] == mesh["tensor"] * mesh["data"] == len(mesh["ranks"])
    assert sorted(p.name for p in (path / "engine").iterdir() if p.is_dir()) == mesh["ranks"]
    with Engine.load(path, threads=2) as engine:
        worst, per_step = worst_cosine(engine, plain_reference)
    assert len(per_step) == STEPS + 1
    assert worst >= 0.9999, per_step


def test_a_mesh_with_a_wrong_shard_fails_the_comparison(mesh_artifacts, plain_reference, tmp_path):
    """The check above can fail: rank 1 running rank 0's shard (its heads, o-groups and vocabulary) instead of
    its own."""
    from dsv4c.artifact import read_manifest, write_manifest
    from dsv4c.runtime import Engine

    broken = tmp_path / "broken"
    shutil.copytree(mesh_artifacts("tp2xep2"), broken)
    shutil.rmtree(broken / "engine" / "rank1")
    shutil.copytree(broken / "engine" / "rank0", broken / "engine" / "rank1")
    data = read_manifest(broken).data
    write_manifest(broken, {k: v for k, v in data.items() if k not in ("schema_version", "outputs")})
    with Engine.load(broken, threads=2) as engine:
        worst, per_step = worst_cosine(engine, plain_reference)
    assert worst < 0.99, per_step


def test_mesh_generate_and_slots_match_the_single_device_engine(mesh_artifacts, plain_single):
    """Engine.load + generate, and the serving path (prefill_slots: take/put of cache rows) give the
    single-device engine's tokens and logits."""
    from dsv4c.runtime import Engine

    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    single = Engine.load(plain_single, threads=1)
    want = single.generate(prompts, max_new_tokens=8)
    s_single = single.session(2)
    want_slot = s_single.prefill_slots([1], [[40, 41, 42, 43]])
    with Engine.load(mesh_artifacts("tp2xep2"), threads=2) as engine:
        assert engine.generate(prompts, max_new_tokens=8) == want
        s = engine.session(2)
        got_slot = s.prefill_slots([1], [[40, 41, 42, 43]])
        assert cosine(got_slot, want_slot).min() >= 0.9999
        np.testing.assert_array_equal(s.positions, [0, 4])
        host = s.cache.to_host()
        want_host = s_single.cache.to_host()
        assert [h.shape for h in host] == [h.shape for h in want_host]


# ---- failures: never a hang ------------------------------------------------------------------------------------
def test_a_killed_worker_fails_the_next_call_quickly(mesh_artifacts):
    from dsv4c.artifact import EngineFailure
    from dsv4c.runtime import Engine

    engine = Engine.load(mesh_artifacts("tp2xep2"), threads=2)
    s = engine.session(2)
    logits = s.prefill([[5, 6, 7], [8, 9]])
    pids = list(engine.executor.pids)
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.perf_counter()
    with pytest.raises(EngineFailure, match=r"rank 1 .*killed by SIGKILL during run; the other 1 worker"):
        s.decode(logits.argmax(-1))
    assert time.perf_counter() - t0 < 10
    time.sleep(0.5)
    assert not any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in pids)
    with pytest.raises(EngineFailure, match="closed"):
        s.decode(logits.argmax(-1))


def _alive(pid: int) -> bool:
    """Running (a zombie awaiting its parent's wait counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_worker_that_cannot_load_fails_engine_load(mesh_artifacts, tmp_path):
    from dsv4c.artifact import ArtifactError
    from dsv4c.runtime import Engine

    broken = tmp_path / "broken"
    shutil.copytree(mesh_artifacts("tp2xep2"), broken)
    (broken / "engine" / "rank1" / "decode.onnx").write_bytes(b"not an onnx file")
    t0 = time.perf_counter()
    with pytest.raises(ArtifactError, match=r"the mesh did not start: rank 1 failed to load"):
        Engine.load(broken, threads=2)
    assert time.perf_counter() - t0 < 60


# ---- the command line ------------------------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv4c.compiler.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_dsv4c_run_on_a_mesh_artifact(mesh_artifacts, plain_single):
    args = ("--tokens", "5,6,7,8", "--max-new-tokens", "8")
    single = run_cli("run", str(plain_single), *args)
    mesh = run_cli("run", str(mesh_artifacts("tp2xep2")), *args)
    assert single.returncode == 0, single.stderr
    assert mesh.returncode == 0, mesh.stderr
    tokens = [line for line in mesh.stdout.splitlines() if line.startswith("tokens:")]
    assert tokens and tokens == [line for line in single.stdout.splitlines() if line.startswith("tokens:")]


def test_dsv4c_run_reports_a_dead_worker_with_exit_9(mesh_artifacts):
    """A worker killed while `dsv4c run` generates: one error line, exit 9, no traceback, no hang."""
    proc = subprocess.Popen([sys.executable, "-m", "dsv4c.compiler.cli", "run", str(mesh_artifacts("tp2xep2")),
                             "--tokens", "5,6,7", "--max-new-tokens", "4000", "--stream"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers = _wait_for_workers(proc.pid, 2, timeout=120)
        proc.stdout.readline()  # the first streamed token: the mesh is generating
        os.kill(workers[-1], signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 9, err
    assert err.startswith("error (engine failed while running, exit 9): mesh worker rank"), err
    assert "Traceback" not in err


def _wait_for_workers(parent: int, n: int, timeout: float) -> list[int]:
    """The pids of the mesh worker processes `parent` started (multiprocessing spawn children)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().split(") ")[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == parent and b"spawn_main" in cmdline:
                found.append(int(stat.parent.name))
        if len(found) >= n:
            return sorted(found)
        time.sleep(0.2)
    raise AssertionError(f"{parent} started no {n} mesh workers in {timeout} s")


# ---- several hosts: torchrun, two "nodes" on this host -----------------------------------------------------------
def test_torchrun_two_nodes(mesh_artifacts, plain_single):
    """`torchrun --nnodes 2 --node-rank 0/1` on 127.0.0.1, one rank per node: rank 0 runs `dsv4c run`, rank 1
    serves; rank 0 prints the single-device engine's tokens."""
    from dsv4c.runtime.mesh import free_port

    torchrun = Path(sys.executable).parent / "torchrun"
    port = free_port()
    args = ("--tokens", "5,6,7,8", "--max-new-tokens", "8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([str(torchrun), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "dsv4c.compiler.cli", "mesh",
                               str(mesh_artifacts("tp2xep2")), "run", *args],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    single = run_cli("run", str(plain_single), *args)
    want = [line for line in single.stdout.splitlines() if line.startswith("tokens:")]
    assert want and [line for line in outs[0][0].splitlines() if line.startswith("tokens:")] == want
    assert "tokens:" not in outs[1][0]  # rank 1 served only


@pytest.mark.slow  # 90 s; CI builds the plain-numerics meshes through the same validate stage (mesh_artifacts)
def test_official_numerics_mesh_passes_its_validation_gate(stage_cache, tmp_path_factory):
    """recipes/tiny-cpu-tp2.yaml (DeepSeek's numerics, tensor 2 x expert 2): the build's validate stage runs the
    mesh against the single-device reference under the derived gate and the build only succeeds if it passes."""
    import json

    import dsv4c

    out = dsv4c.build(RECIPES / "tiny-cpu-tp2.yaml", tmp_path_factory.mktemp("mesh") / "tiny-cpu-tp2",
                      cache_dir=stage_cache)
    validation = json.loads((out / "manifest.json").read_text())["validation"]
    assert validation["passed"] and validation["agreement"] >= validation["thresholds"]["agreement"], validation
    assert sorted(p.name for p in (out / "engine").iterdir() if p.is_dir()) == ["rank0", "rank1"]
