"""End to end on the CPU target: `dsv4c build` of the tiny recipes -> ONNX Runtime engine -> prefill + decode
against the PyTorch reference (the same checkpoint through DeepseekV4 directly), greedy generation, caching."""

from __future__ import annotations

import ctypes
import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (RECIPES, assert_step_function_agrees, compare_with_reference, cosine, dsv4c_cli,
                      reference_model, resident_share)

import dsv4c
from dsv4c import heap
from dsv4c.compiler.errors import ToolchainError
from dsv4c.compiler.pipeline import STAGES
from dsv4c.graphs.model import Numerics
from dsv4c.runtime import Engine
from dsv4c.targets.cpu.target import CpuTarget
from dsv4c.targets.cpu.executor import SMALL_MODEL_BYTES, library_function, mapped_initializers, program_threads


def build(recipe: str, out, cache, *extra: str):
    """`dsv4c build` on the command line, for the tests that read its events (one JSON line per stage)."""
    r = dsv4c_cli("build", f"recipes/{recipe}.yaml", "-o", str(out), "--events", "json", *extra, cache=cache)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def stage_status(events) -> dict[str, str]:
    """Each stage's status, after checking that the events name every stage run exactly once, in pipeline order
    (lazy stages included: quantize and export report in their own slot whenever they run)."""
    reported = [(e["stage"], e["status"]) for e in events if e.get("event") == "stage"]
    assert [s for s, _ in reported] == list(STAGES[: len(reported)]), reported
    return dict(reported)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, stage_cache):
    return dsv4c.build(RECIPES / "tiny-plain-cpu.yaml", tmp_path_factory.mktemp("e2e") / "tiny-plain-cpu",
                       cache_dir=stage_cache)


@pytest.fixture(scope="module")
def official(tmp_path_factory, stage_cache):
    out = tmp_path_factory.mktemp("e2e") / "tiny-cpu"
    return out, build("tiny-cpu", out, stage_cache)


PROMPTS = [torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(3)).tolist() for n in (40, 23)]


def test_plain_engine_matches_reference_free_running(plain, stage_cache):
    """Continuous numerics: the engine on its own caches tracks the reference to fp32 rounding."""
    eng = Engine.load(plain)
    assert eng.manifest.data["validation"]["passed"]
    ref = reference_model(stage_cache, Numerics.plain())
    for step, got, want in compare_with_reference(eng.session(2), ref, PROMPTS, 16, resync=False):
        assert cosine(got, want).min() >= 0.9999, f"step {step}"
        assert np.array_equal(got.argmax(-1), want.argmax(-1)), f"step {step}"


def test_plain_generate_greedy_equals_reference_greedy(plain, stage_cache):
    eng, ref = Engine.load(plain), reference_model(stage_cache, Numerics.plain())
    prompt = [5, 17, 99, 3, 250, 7]
    tokens = eng.generate([prompt], max_new_tokens=10, temperature=0.0, stop_tokens=[])[0]
    cache, want = ref.new_cache(1, eng.max_seq_len), []
    with torch.no_grad():
        logits, cache = ref(torch.tensor([prompt]), torch.zeros(1, dtype=torch.long), torch.tensor([len(prompt)]),
                            cache)
        for i in range(10):
            want.append(int(logits.argmax(-1)))
            logits, cache = ref(torch.tensor([[want[-1]]]), torch.tensor([len(prompt) + i]),
                                torch.ones(1, dtype=torch.long), cache)
    assert tokens == want


def test_official_engine_step_function_matches_reference(official, stage_cache):
    """DeepSeek's numerics (FP8 activations, FP8 KV, FP4 indexer, bf16), per-step agreement gated like the recipe
    (tiny-cpu.yaml: 85% of rows at cosine 0.999 + top-1, every row >= 0.9; the comment there has the figures)."""
    out, _ = official
    eng = Engine.load(out)
    report = eng.manifest.data["validation"]
    assert report["passed"] and report["min_cosine"] >= 0.9
    ref = reference_model(stage_cache, Numerics.reference())
    assert_step_function_agrees(eng.session(2), ref, PROMPTS, 16, min_cosine=0.999, agreement=0.85, floor=0.9)


def test_manifest_cache_dtypes_are_what_the_engine_stores(official):
    """engine.cache[].dtype equals the element type of the program's cache inputs, and a session's caches are
    allocated in it."""
    import onnx

    out, _ = official
    eng = Engine.load(out)
    model = onnx.load(out / "engine" / eng.manifest.engine["programs"]["decode"], load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights][3:]  # after tokens, start_pos, n_valid
    stored = [onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name for i in inputs]
    assert [c["dtype"] for c in eng.manifest.engine["cache"]] == stored
    assert [a.dtype.name for a in eng.session(1).cache.to_host()] == stored


def test_decode_updates_every_cache_but_the_window_ring_in_place(official):
    """The decode program writes the compressed entries, indexer keys and compressor state rings into their own
    buffers (a one-token step touches one row of each): only the window ring, which the attention reads beside
    the step's token, goes through a spare buffer. The prefill program re-reads the state in position order."""
    import onnx

    from dsv4c.targets.cpu.executor import updated_in_place

    out, _ = official
    eng = Engine.load(out)
    names = [c["name"] for c in eng.manifest.engine["cache"]]
    assert any(n.endswith("_state_kv") for n in names)
    flags = {}
    for program in ("decode", "prefill"):
        graph = onnx.load(out / "engine" / eng.manifest.engine["programs"][program], load_external_data=False).graph
        flags[program] = dict(zip(names, updated_in_place(graph)))
    assert [n for n, f in flags["decode"].items() if not f] == [n for n in names if n.endswith(".win")]
    assert [n for n, f in flags["prefill"].items() if f] == [n for n in names if n.endswith((".cmp", ".idx"))]


def test_prefill_hands_its_workspace_back_and_decode_keeps_its_own(official):
    """ONNX Runtime keeps its arena at the largest run's size: prefill runs (a chunk's activations) ask it to
    shrink back afterwards, decode steps (small, every token) keep theirs (benchmarks/build_memory.py measures
    the engine's resident memory)."""
    out, _ = official
    executor = Engine.load(out).executor
    shrink = "memory.enable_memory_arena_shrinkage"
    assert executor.run_options["prefill"].get_run_config_entry(shrink) == "cpu:0"
    assert executor.run_options["decode"] is None


def test_a_small_models_decode_runs_on_one_thread_its_prefill_on_all(official):
    """A small model's decode step is kernel calls of microseconds that run inline: a second thread would only
    spin (dsv4c.targets.cpu.executor.SMALL_MODEL_BYTES). Prefill, and a large model's decode, get the threads
    asked for."""
    out, _ = official
    executor = Engine.load(out, threads=2).executor
    assert sum(m.nbytes for m in executor.mapped) < SMALL_MODEL_BYTES
    assert executor.threads == {"decode": 1, "prefill": 2}
    assert executor.sessions["decode"].get_session_options().intra_op_num_threads == 1
    assert executor.sessions["prefill"].get_session_options().intra_op_num_threads == 2
    assert program_threads("decode", 2, SMALL_MODEL_BYTES) == 2
    assert program_threads("decode", None, SMALL_MODEL_BYTES) is None


def test_neither_program_plans_buffer_reuse(official):
    """ORT's planned reuse of buffers costs more than it saves on a decode step's intermediates of a few KB
    (dsv4c.targets.cpu.executor: tiny 5 % per step), and holds more at once on a prefill chunk than allocating
    each output does (mini-1b, 8 x 256 tokens: peak RSS 1,802 vs 1,560 MiB)."""
    out, _ = official
    sessions = Engine.load(out).executor.sessions
    assert not sessions["decode"].get_session_options().enable_mem_reuse
    assert not sessions["prefill"].get_session_options().enable_mem_reuse


@pytest.mark.skipif(heap._LIBC is None or not Path("/proc/self/status").is_file(), reason="glibc on Linux only")
def test_a_prefill_leaves_the_engines_resident_memory_where_it_was(official):
    """What a prefill chunk needed is not held while the engine decodes: the kernels' large scratch blocks (kept
    for reuse within the prefill) are unmapped, malloc's heap, which keeps freed blocks resident, is trimmed, and
    ORT's arena, which would keep the chunk's activations, shrinks back. Tiny, 2 x 256 tokens: 2.1 MB held
    without the unmap, 20 MB without the trim, 21 MB without the shrink (mini-1b, 8 x 512 tokens: 440 MiB
    without the trim)."""
    out, _ = official
    engine = Engine.load(out)

    def rss_anon() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("RssAnon:"))

    rng = np.random.default_rng(0)
    session = engine.session(2)
    session.prefill(rng.integers(2, engine.vocab_size, (2, 256)))  # ORT sets its kernels up on the first run
    for _ in range(2):
        before = rss_anon()
        session.prefill(rng.integers(2, engine.vocab_size, (2, 256)))
        after = rss_anon()
        assert after - before < 1 << 20
        engine.executor.release_scratch()  # both again: nothing left to give back
        heap.trim_heap()
        assert after - rss_anon() < 1 << 20


@pytest.mark.skipif(not Path("/proc/self/pagemap").is_file(), reason="Linux only")
def test_an_engine_told_to_gives_its_weight_pages_back_and_computes_the_same(official):
    """The build's validation runs the whole engine once to check it; the weight pages it reads need not stay in
    the process's resident set, where at depth they made the build's peak. Told to (`drop_weight_pages`), every
    op kind of the engine computes the same logits, and its weights file is mostly not resident after the run
    (tests/test_ort_kernels.py checks the pages of one node exactly; here Gather's embedding rows stay, and Linux
    maps up to 64 KiB of cached pages around each fault, which holds whole neighbours of tiny's 32 KiB
    weights: 27 % of the pages stay, where a serving engine keeps all of them)."""
    out, _ = official
    tokens = np.random.default_rng(0).integers(2, 1000, (2, 200))
    results, resident = [], []
    for drop in (False, True):
        engine = Engine.load(out)
        assert not drop or engine.executor.drop_weight_pages()
        session = engine.session(2)
        steps = [session.prefill(tokens)]
        for _ in range(3):
            steps.append(session.decode(np.asarray(steps[-1]).argmax(-1)))
        results.append(np.stack([np.asarray(s) for s in steps]))
        [weights] = engine.executor.mapped
        resident.append(resident_share(weights))
    np.testing.assert_array_equal(results[1], results[0])
    kept, dropped = resident
    assert kept > 0.5 and dropped < kept / 3


def test_the_bf16_round_trips_behind_dsv4_ops_are_folded_and_need_the_library(official, tmp_path):
    """The CPU build folds each `dsv4 op -> Cast(bf16) -> Cast(float)` into the op (dsv4c.targets.cpu.passes; the
    validation gate of this build ran the folded engine). A folded engine without its kernel library would run
    the ops' function bodies, which know nothing of the rounding: the executor refuses it, naming the library."""
    import shutil

    import onnx

    out, _ = official
    engine = json.loads((out / "engine" / "engine.json").read_text())
    assert engine["graph_passes"]["bf16_roundings_folded"]["decode"] > 0
    decode = onnx.load(str(out / "engine" / engine["programs"]["decode"]), load_external_data=False)
    producer = {o: n for n in decode.graph.node for o in n.output}
    behind_ops = [n for n in decode.graph.node if n.op_type == "Cast" and n.input[0] in producer
                  and producer[n.input[0]].domain == "dsv4"]
    assert not [n for n in behind_ops if n.attribute[0].i == onnx.TensorProto.BFLOAT16]
    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("libdsv4_ops.so"))
    with pytest.raises(ToolchainError, match="built for the dsv4 kernel library .libdsv4_ops.so.") as missing:
        dsv4c.load(bare)
    assert missing.value.exit_code == 4


def test_the_engine_keeps_the_checkpoints_e8m0_scale_bytes(official, stage_cache):
    """Weight scales stay the checkpoint's e8m0 bytes in the CPU engine (dsv4c.targets.e8m0_scales): every scale a
    linear or the experts read is a uint8 initializer holding the exponent byte of the reference model's scale,
    read by the kernel itself (no decode left in the engine's programs)."""
    import onnx
    import onnx.numpy_helper

    from dsv4c.graphs import quant
    from dsv4c.targets.e8m0_scales import E8M0_TABLE, SCALE_INPUTS

    out, _ = official
    engine = json.loads((out / "engine" / "engine.json").read_text())
    assert engine["graph_passes"]["e8m0_decodes_folded"]["decode"] > 0
    decode = onnx.load(str(out / "engine" / engine["programs"]["decode"]), load_external_data=False)
    inits = {t.name: t for t in decode.graph.initializer}
    scales = {n.input[i] for n in decode.graph.node for i in SCALE_INPUTS.get(n.op_type, ())}
    assert len(scales) > 20 and E8M0_TABLE not in inits
    assert {onnx.TensorProto.DataType.Name(inits[s].data_type) for s in scales} == {"UINT8"}
    values, _maps = mapped_initializers({"decode": decode}, out / "engine")
    ref = reference_model(stage_cache).state_dict()
    for name in ("model.layers.1.attn.wq_b.scale", "model.layers.0.ffn.experts.w2_scale"):
        want = quant.float_to_e8m0(ref[name.removeprefix("model.")]).view(torch.uint8).numpy()
        external = values["decode"].get(name)  # big ones in the weights file, small ones inline
        got = external.numpy() if external is not None else onnx.numpy_helper.to_array(inits[name])
        np.testing.assert_array_equal(got, want)


def test_the_cpu_runtime_runs_without_importing_torch(official):
    """The thin runtime: loading a CPU engine and running it needs ONNX Runtime and numpy, not torch (whose import
    alone costs ~0.9 s and ~190 MB of resident memory)."""
    import subprocess
    import sys

    out, _ = official
    script = ("import sys, dsv4c; e = dsv4c.load(sys.argv[1]); s = e.session(1); s.prefill([[5, 6, 7]]); "
              "s.decode([8]); print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


def test_the_engines_programs_name_no_path_of_the_machine_that_built_them(official):
    """The exporter's per-node stack traces name dsv4c's files relative to the package's directory: the same
    recipe built from another checkout gives the same programs."""
    out, _ = official
    checkout = str(Path(dsv4c.__file__).resolve().parents[1]).encode()
    for path in (out / "engine").glob("*.onnx"):
        program = path.read_bytes()
        assert checkout not in program, f"{path.name} names {checkout.decode()}"
        assert b'File "dsv4c/graphs/model.py", line' in program  # the traces are there (tests/mutants.py)


def test_the_programs_share_one_map_of_the_weights(official):
    """Prefill and decode read the same weights file; the engine maps it once for both (two maps would count
    every page both programs touch twice in the process's resident set)."""

    out, _ = official
    data = {p.name for p in (out / "engine").glob("*.data")}
    assert data

    def maps() -> int:
        return sum(Path(line.split()[-1]).name in data for line in Path("/proc/self/maps").read_text().splitlines()
                   if line.split()[-1].startswith(str(out)))

    before = maps()
    eng = Engine.load(out)
    session = eng.session(1)
    session.decode(np.asarray(session.prefill([PROMPTS[0]])).argmax(-1))
    assert maps() - before == len(data)
    eng.close()


def test_a_steps_logits_stay_what_they_were_after_later_steps(official):
    """The executor keeps its ONNX Runtime bindings between steps; the logits a step returns are the caller's, not
    a view of a buffer the next step overwrites."""
    out, _ = official
    session = Engine.load(out).session(2)
    returned, copies = [], []
    logits = session.prefill(PROMPTS)
    for _ in range(4):
        logits = session.decode(np.asarray(logits).argmax(-1))
        returned.append(logits)
        copies.append(np.array(logits, copy=True))
    assert all(np.array_equal(r, c) for r, c in zip(returned, copies))
    assert not np.array_equal(copies[0], copies[2])  # the steps do differ


def test_rebuild_is_a_cache_hit_for_every_stage(official, stage_cache):
    out, first = official
    assert stage_status(first)["lower"] == "done" or stage_status(first)["lower"] == "cached"
    status = stage_status(build("tiny-cpu", out, stage_cache))
    assert status == {s: "cached" for s in STAGES}, status


def test_a_rebuild_that_only_revalidates_reports_quantize_once(official, stage_cache, tmp_path):
    """Another validation seed: quantize is "cached" (a build with its key ran it), then validate needs the model.
    quantize used to be reported a second time, "done", after build."""
    status = stage_status(build("tiny-cpu", tmp_path / "v", stage_cache, "--set", "validate.seed=1"))
    assert status == {**{s: "cached" for s in STAGES}, "resolve": "done", "plan": "done", "validate": "done",
                      "package": "done"}, status


def test_changing_only_the_target_reruns_only_target_stages(official, stage_cache, tmp_path):
    """Same model and formats on TensorRT sm_100 (FP4 native): load/quantize/export are reused."""
    status = stage_status(build("tiny-cpu", tmp_path / "trt", stage_cache, "--set", "target.kind=tensorrt",
                                "--set", "target.arch=sm_100", "--until", "lower"))
    assert status["load"] == status["quantize"] == "cached", status
    assert status["lower"] == "done", status
    # the bundle ships each weight once, as plan sizes it
    plan = dsv4c.plan(RECIPES / "tiny-cpu.yaml", ["target.kind=tensorrt", "target.arch=sm_100"])
    assert weight_file_bytes(tmp_path / "trt") == pytest.approx(plan.build["disk"]["lower_bundle"], rel=0.02)


def test_another_checkpoint_of_the_same_shapes_reuses_the_exported_programs(official, stage_cache, tmp_path):
    """The programs are traced without weights: a checkpoint with other values and the same shapes loads and
    lowers anew but reuses the stored export."""
    status = stage_status(build("tiny-cpu", tmp_path / "seed", stage_cache, "--set", "model.synthetic.seed=9",
                                "--until", "lower"))
    assert (status["load"], status["export"], status["lower"]) == ("done", "cached", "done"), status
    first, other = (next(d.rglob("prefill.onnx.data")) for d in (official[0], tmp_path / "seed"))
    assert not filecmp.cmp(first, other, shallow=False)  # the bundle holds the new checkpoint's weights


def weight_file_bytes(root) -> int:
    return sum(f.stat().st_size for f in root.rglob("*.onnx.data"))


def test_plan_sizes_the_artifacts_weights(official):
    """plan's artifact figure against the weight files on disk (one copy: decode reads prefill.onnx.data; the
    estimate once counted a copy per program, 2x the 1.56 GB of the mini-1b artifact)."""
    out, _ = official
    plan = dsv4c.plan(RECIPES / "tiny-cpu.yaml")
    assert weight_file_bytes(out) == pytest.approx(plan.build["disk"]["artifact"], rel=0.02)


def test_plan_sizes_the_caches_and_the_kernel_scratch_the_engine_holds(official):
    """plan's engine column against what the CPU engine allocates for a full prefill chunk at max batch: its
    caches as the executor holds them (the window ring and the compressor state twice: a step writes them beside
    the old values), and the kernels' scratch, which the library counts itself (dsv4_scratch_high_water). The
    sessions' own memory, the rest of the engine's workspace, is held against the engine's RSS in
    test_plan_sizes_the_sessions_of_the_engine."""
    out, _ = official
    plan = dsv4c.plan(RECIPES / "tiny-cpu.yaml")
    formats, engine_plan = plan.per_device["stages"][0], plan.per_device["dsv4c_engine_stages"][0]
    engine = Engine.load(out)
    high_water = library_function(engine.executor.library, "dsv4_scratch_high_water", [ctypes.c_int])
    high_water.restype = ctypes.c_int64
    session = engine.session(engine.max_batch_size)
    high_water(1)
    rng = np.random.default_rng(0)
    session.decode(np.asarray(session.prefill(rng.integers(2, engine.vocab_size, (engine.max_batch_size, 256))))
                   .argmax(-1))
    held = sum(a.nbytes for a in [*session.cache.arrays, *(s for s in session.cache.spares or () if s is not None)])
    assert engine_plan["kv_cache"] == held > formats["kv_cache"]
    # the workspace also counts ONNX Runtime's sessions (CpuTarget.session_state), which are not kernel scratch
    sessions = CpuTarget().session_state(plan.model["layers"])
    scratch, declared = high_water(0), engine_plan["workspace"] - formats["workspace"] - sessions
    assert 0.8 * declared <= scratch <= declared, (scratch, declared)


def test_plan_sizes_the_sessions_of_the_engine(official):
    """CpuTarget.session_state (plan's engine workspace beyond activations and kernel scratch) against a fresh
    process's growth when it loads the engine (ONNX Runtime imported first: the library is not the engine; the
    weights are mapped, not read, so their pages are not in it): within 30 %. Set from mini-1b's width (43 / 50
    / 63 MB at 2 / 4 / 8 layers); tiny's 4 layers have every layer kind (54 MB when it was set, 1.10x)."""
    out, _ = official
    script = ("import onnxruntime, numpy\n"
              "def rss():\n"
              "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmRSS:'))\n"
              "before = rss()\n"
              "from dsv4c.runtime import Engine\n"
              f"engine = Engine.load({str(out)!r})\n"
              "print(rss() - before)\n")
    import subprocess
    import sys

    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
                .stdout.split()[-1])
    declared = CpuTarget().session_state(dsv4c.plan(RECIPES / "tiny-cpu.yaml").model["layers"])
    assert 0.7 * declared <= grown <= 1.3 * declared, (grown, declared)


def test_bad_recipe_key_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {synthetic: {preset: tiny}}\ntarget: {kindd: cpu}\n")
    r = dsv4c_cli("build", str(bad), "-o", str(tmp_path / "out"), cache=tmp_path / "c")
    assert r.returncode == 2
    assert "target.kindd" in r.stderr and "did you mean `target.kind`" in r.stderr
    assert not (tmp_path / "out").exists()


# ---- one copy of the weights on disk (dsv4c.files) ----------------------------------------------------------------
def engine_weights(root) -> dict[str, object]:
    """name -> os.stat of each weight file (*.onnx.data) under `root`."""
    return {f.name: f.stat() for f in root.rglob("*.onnx.data")}


def stage_dir(cache, out, stage: str):
    return cache / stage / json.loads((out / "manifest.json").read_text())["stage_keys"][stage]


def test_the_artifact_and_the_stage_cache_hold_one_copy_of_the_weights(official, stage_cache):
    """The lowered bundle, the built engine and the artifact's engine are one inode per weight file (the build
    used to copy the bundle into the engine and the engine into the artifact: three copies), and plan counts the
    disk that way."""
    out, _ = official
    bundle, engine, artifact = (engine_weights(stage_dir(stage_cache, out, "lower")),
                                engine_weights(stage_dir(stage_cache, out, "build")), engine_weights(out / "engine"))
    assert artifact and artifact.keys() == engine.keys() == bundle.keys()
    for name, st in artifact.items():
        assert st.st_ino == engine[name].st_ino == bundle[name].st_ino, name
        assert st.st_nlink >= 3, name
    unique = sum({(st.st_dev, st.st_ino): st.st_size for d in (bundle, engine, artifact) for st in d.values()}.values())
    b = dsv4c.plan(RECIPES / "tiny-cpu.yaml").build
    held = sum(b["disk"][s] - b["disk_hard_linked"].get(s, 0) for s in ("lower_bundle", "build_engine", "artifact"))
    assert unique == pytest.approx(held, rel=0.02)
    assert b["disk_peak_bytes_output_elsewhere"] - b["disk_peak_bytes"] == b["disk"]["artifact"]


def test_validation_runs_the_engine_through_hard_links(official, stage_cache, tmp_path, monkeypatch):
    """The validate stage lays the engine out as its artifact with links to the build stage's files (it used to
    copy the whole engine into a staging directory first); the reference's steps are spilled beside it while the
    engine runs (within plan's figure) and removed after. Its engine gives its weight pages back as it goes (see
    test_an_engine_told_to_gives_its_weight_pages_back_and_computes_the_same)."""
    import dsv4c.compiler.stages as stages

    from dsv4c.compiler.validation import ReferenceRun

    seen, spilled, resident = {}, [], []

    def spy(artifact, *args, **kwargs):
        seen.update(engine_weights(artifact / "engine"))
        return validate_engine(artifact, *args, **kwargs)

    def check(run, engine):  # the reference's steps are on disk while the engine runs
        spilled.extend(f.stat().st_size for d in layout.glob(".reference-*") for f in d.iterdir())
        report = reference_check(run, engine)
        [weights] = engine.executor.mapped
        resident.append(resident_share(weights))
        return report

    validate_engine, reference_check = stages.validate_engine, ReferenceRun.check
    monkeypatch.setattr(stages, "validate_engine", spy)
    monkeypatch.setattr(ReferenceRun, "check", check)
    layout = stage_cache / "build"
    out = dsv4c.build(RECIPES / "tiny-cpu.yaml", tmp_path / "v", ["validate.seed=2"], cache_dir=stage_cache)
    engine = engine_weights(stage_dir(stage_cache, out, "build"))
    assert seen and {n: st.st_ino for n, st in seen.items()} == {n: st.st_ino for n, st in engine.items()}
    assert not list(layout.glob(".*.validate")) and not list(layout.glob(".reference-*"))  # removed after
    assert spilled and sum(spilled) <= dsv4c.plan(RECIPES / "tiny-cpu.yaml").build["disk"]["validation_steps"]
    assert resident and resident[0] < 1 / 3, resident


def test_where_hard_links_fail_the_build_copies_and_says_so(official, stage_cache, tmp_path, monkeypatch, capsys):
    """A filesystem that refuses links (the output on another disk than the cache): the validate stage and the
    artifact copy the engine instead, each says so in the build's events, and the artifact is the same engine."""
    import errno
    import os

    from dsv4c.artifact import read_manifest

    def refuse(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))

    monkeypatch.setattr(os, "link", refuse)
    capsys.readouterr()
    out = dsv4c.build(RECIPES / "tiny-cpu.yaml", tmp_path / "copied", ["validate.seed=3"], cache_dir=stage_cache,
                      events="json")
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    notes = [e["message"] for e in events if e["event"] == "note"]
    assert len(notes) == 2, notes  # the validate stage's layout, then the artifact
    assert all("copied" in n and "hard-linked" in n and "cross-device" in n.lower() for n in notes), notes
    read_manifest(out, verify=True)
    engine_dir = stage_dir(stage_cache, out, "build")
    for name, st in engine_weights(out / "engine").items():
        assert st.st_ino != (engine_dir / name).stat().st_ino and st.st_nlink == 1
        assert filecmp.cmp(out / "engine" / name, engine_dir / name, shallow=False)
    linked, _ = official
    prompt = [[5, 17, 99, 3]]
    assert Engine.load(out).generate(prompt, 6) == Engine.load(linked).generate(prompt, 6)


def test_the_cpu_engine_copies_the_bundle_where_links_fail(official, stage_cache, tmp_path, monkeypatch, caplog):
    """The CPU target's build hard-links the bundle's files into the engine; refused a link it copies and warns."""
    import errno
    import logging
    import os

    from dsv4c.targets.cpu.target import CpuTarget

    out, _ = official
    bundle = stage_dir(stage_cache, out, "lower")
    linked = tmp_path / "linked"
    linked.mkdir()
    CpuTarget().build(bundle, linked, None)
    assert {n: st.st_ino for n, st in engine_weights(linked).items()} == \
        {n: st.st_ino for n, st in engine_weights(bundle).items()}

    def refuse(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))

    monkeypatch.setattr(os, "link", refuse)
    copied = tmp_path / "copied"
    copied.mkdir()
    with caplog.at_level(logging.WARNING, logger="dsv4c.files"):
        CpuTarget().build(bundle, copied, None)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "copied" in caplog.text
    names = sorted(p.name for p in bundle.iterdir() if p.name not in ("bundle.json", ".complete"))
    assert names and sorted(p.name for p in copied.iterdir() if p.name not in ("engine.json", "libdsv4_ops.so")) \
        == names
    for name in names:
        assert (copied / name).stat().st_ino != (bundle / name).stat().st_ino
        if not name.endswith(".onnx"):  # the programs themselves are rewritten by the graph passes
            assert filecmp.cmp(copied / name, bundle / name, shallow=False)
