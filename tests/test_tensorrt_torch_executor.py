"""The TensorRT bundle without TensorRT (dsv4c.targets.tensorrt.torch_executor): its ONNX interpreted by torch.

Two independent checks on the tiny bundle: with the plugin nodes on the ops' torch reference, the interpreter
must give ONNX Runtime's results (emulation: the same file, another runtime) to fp32 rounding in plain numerics
and pass the recipe's gate in DeepSeek's numerics; with TRITON_INTERPRET=1 the plugin nodes run the Triton
kernels TensorRT would call, so the kernels must compose into the same model (the end-to-end check that a GPU
runs natively with device="cuda")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RECIPES, ROOT, assert_step_function_agrees, cosine, reference_model

import dsv4c
from dsv4c.artifact import ArtifactError
from dsv4c.graphs.model import Numerics
from dsv4c.runtime import Engine

PROMPTS = [torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(7)).tolist() for n in (21, 9)]


def _bundle(tmp_path_factory, stage_cache, *overrides: str) -> Path:
    return dsv4c.build(RECIPES / "tiny-tensorrt.yaml", tmp_path_factory.mktemp("trt-torch") / "bundle", overrides,
                       until="lower", cache_dir=stage_cache)


@pytest.fixture(scope="module")
def plain_bundle(tmp_path_factory, stage_cache):
    return _bundle(tmp_path_factory, stage_cache, "quantization.preset=plain")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, stage_cache):
    return _bundle(tmp_path_factory, stage_cache)


def _agree_with_emulation(bundle: Path, steps: int) -> list[float]:
    torch_engine, emulated = Engine.load(bundle, device="cpu"), Engine.load(bundle, emulate=True)
    a, b = torch_engine.session(2), emulated.session(2)
    got, want = a.prefill(PROMPTS), b.prefill(PROMPTS)
    cosines = list(cosine(got, want))
    for _ in range(steps):
        nxt = want.argmax(-1)
        got, want = a.decode(nxt), b.decode(nxt)
        cosines += list(cosine(got, want))
        assert (got.argmax(-1) == want.argmax(-1)).all()
    return cosines


def test_interpreter_matches_onnx_runtime_in_plain_numerics(plain_bundle):
    from dsv4c.targets.tensorrt.torch_executor import on_kernels

    # the plugin nodes on the ops' torch reference here (TRITON_INTERPRET, which picks the Triton kernels, once
    # leaked into this file from test_triton_kernels, which pytest imports first)
    assert not on_kernels("cpu"), "TRITON_INTERPRET is set in this process: the Triton kernels would run"
    assert min(_agree_with_emulation(plain_bundle, steps=4)) >= 0.99999


@pytest.mark.slow  # 2 min; CI keeps the plain-numerics comparison and the Triton composition test of this file
def test_interpreter_passes_the_gate_in_deepseek_numerics(bundle, stage_cache):
    model = reference_model(stage_cache, Numerics.reference(), expert_format="fp8")
    assert_step_function_agrees(Engine.load(bundle, device="cpu").session(2), model, PROMPTS, steps=8,
                                min_cosine=0.999, agreement=0.85, floor=0.9)


def test_triton_kernels_compose_into_the_model(plain_bundle):
    """The plugin nodes on the Triton kernels (interpreter on CPU): prefill + 2 decode steps, every logit row
    against ONNX Runtime's emulation. A fresh process: TRITON_INTERPRET must be set before triton is imported."""
    script = ("import sys; sys.path.insert(0, 'tests'); from test_tensorrt_torch_executor import _agree_with_emulation;"
              f"from pathlib import Path; c = _agree_with_emulation(Path({str(plain_bundle)!r}), steps=2);"
              "print(min(c))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.strip().splitlines()[-1]) >= 0.99999


def test_device_is_refused_where_it_means_nothing(plain_bundle, tmp_path):
    with pytest.raises(ArtifactError, match="needs an NVIDIA GPU"):
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        Engine.load(plain_bundle, device="cuda")
    with pytest.raises(ArtifactError, match="device 'tpu'"):
        Engine.load(plain_bundle, device="tpu")


def test_unknown_standard_op_is_named_at_load(plain_bundle, tmp_path):
    import shutil

    import onnx

    copy = tmp_path / "bundle"
    shutil.copytree(plain_bundle, copy)
    path = copy / "engine" / "decode.onnx"
    model = onnx.load(path, load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "Sqrt")
    node.op_type = "Erf"
    onnx.save(model, path)
    with pytest.raises(ArtifactError, match=r"uses ai.onnx.Erf, which the torch executor does not implement"):
        Engine.load(copy, device="cpu")


def test_caches_stay_in_place_across_steps(plain_bundle):
    """The executor owns the session's caches: prefill and decode update the very tensors it allocated (a step
    that took them to the host and back, or let the session hold host arrays, would give new storage), and
    run() returns only the logits."""
    engine = Engine.load(plain_bundle, device="cpu")
    session = engine.session(2)
    tensors = list(session.cache.tensors)
    addresses = [t.data_ptr() for t in tensors]
    empty = session.cache.to_host()
    logits = session.prefill(PROMPTS)
    session.decode(logits.argmax(-1))
    assert all(now is then for now, then in zip(session.cache.tensors, tensors))
    assert [t.data_ptr() for t in session.cache.tensors] == addresses
    assert any(not np.array_equal(a, b) for a, b in zip(empty, session.cache.to_host()))  # written, in place
    one = np.ones(2, dtype=np.int64)
    out = engine.executor.run("decode", np.array([[3], [4]]), session.positions.copy(), one, session.cache)
    assert isinstance(out, np.ndarray) and out.shape == (2, engine.vocab_size)


@pytest.mark.slow  # 50 s; CI keeps TorchCache reset/take/put in test_executor_caches and the in-place test above
def test_slot_reset_and_slot_prefill_match_emulation(plain_bundle):
    """A scheduler's moves (reset a slot, prefill it alone, decode the batch) on the device caches (TorchCache's
    reset / take / put) against the same moves on the emulation's host caches."""
    steps = []
    for engine in (Engine.load(plain_bundle, device="cpu"), Engine.load(plain_bundle, emulate=True)):
        session = engine.session(2)
        first = session.prefill(PROMPTS)
        session.reset(0)
        again = session.prefill_slots([0], [PROMPTS[1][:5]])
        steps.append([first, again, session.decode(np.array([again.argmax(-1)[0], first.argmax(-1)[1]]))])
    for got, want in zip(*steps):
        assert cosine(got, want).min() >= 0.99999
