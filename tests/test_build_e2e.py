"""End to end: `dsv4c build` of the tiny recipe -> Engine -> prefill + decode against the PyTorch reference
(the same checkpoint through DeepseekV4 directly), greedy generation, and stage caching."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv4c.graphs.checkpoint import CheckpointReader
from dsv4c.graphs.model import DeepseekV4, Numerics, load_official
from dsv4c.runtime import Engine

ROOT = Path(__file__).resolve().parents[1]


def dsv4c(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv4c.compiler.cli", *args, "--cache-dir", str(cache)],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    out, cache = tmp / "tiny-cpu", tmp / "cache"
    r = dsv4c("build", "recipes/tiny-cpu.yaml", "-o", str(out), "--events", "json", cache=cache)
    assert r.returncode == 0, r.stderr
    return out, cache, [json.loads(line) for line in r.stdout.splitlines()]


def reference(cache: Path) -> DeepseekV4:
    ckpt = next(cache.glob("load/*/checkpoint"))
    reader = CheckpointReader(ckpt)
    model = DeepseekV4(reader.config, Numerics.reference())
    load_official(model, reader.read_globals())
    for _, t in reader.iter_layers():
        load_official(model, t)
    return model.eval()


def test_engine_matches_reference_batch_of_unequal_prompts(built):
    out, cache, _ = built
    eng, ref = Engine.load(out), reference(cache)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 1024, (n,), generator=gen).tolist() for n in (40, 23)]
    s = eng.session(batch_size=2)
    got = s.prefill(prompts)
    batch = torch.zeros(2, 40, dtype=torch.long)
    for b, p in enumerate(prompts):
        batch[b, : len(p)] = torch.tensor(p)
    rc = ref.new_cache(2, eng.max_seq_len)
    pos = torch.tensor([40, 23])
    with torch.no_grad():
        want, rc = ref(batch, torch.zeros(2, dtype=torch.long), pos, rc)
        for step in range(17):
            cos = torch.nn.functional.cosine_similarity(torch.from_numpy(got).double(), want.double(), dim=-1)
            assert cos.min() >= 0.999, f"step {step}: cosine {cos.tolist()}"
            assert np.array_equal(got.argmax(-1), want.argmax(-1).numpy())
            nxt = want.argmax(-1)
            want, rc = ref(nxt[:, None], pos, torch.ones(2, dtype=torch.long), rc)
            got = s.decode(nxt.numpy())
            pos += 1


def test_generate_greedy_equals_reference_greedy(built):
    out, cache, _ = built
    eng, ref = Engine.load(out), reference(cache)
    prompt = [5, 17, 99, 3, 250, 7]
    tokens = eng.generate([prompt], max_new_tokens=10, temperature=0.0, stop_tokens=[])[0]
    rc, want = ref.new_cache(1, eng.max_seq_len), []
    with torch.no_grad():
        logits, rc = ref(torch.tensor([prompt]), torch.zeros(1, dtype=torch.long), torch.tensor([len(prompt)]), rc)
        for i in range(10):
            want.append(int(logits.argmax(-1)))
            logits, rc = ref(torch.tensor([[want[-1]]]), torch.tensor([len(prompt) + i]), torch.ones(1, dtype=torch.long), rc)
    assert tokens == want


def test_rebuild_is_a_cache_hit_for_every_stored_stage(built):
    out, cache, first = built
    assert any(e.get("status") == "done" for e in first if e.get("stage") == "lower")
    r = dsv4c("build", "recipes/tiny-cpu.yaml", "-o", str(out), "--events", "json", cache=cache)
    assert r.returncode == 0, r.stderr
    status = {e["stage"]: e["status"] for e in map(json.loads, r.stdout.splitlines()) if e.get("event") == "stage"}
    assert all(status[s] == "cached" for s in ("load", "lower", "build", "validate")), status


def test_bad_recipe_key_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {synthetic: {preset: tiny}}\ntarget: {kindd: cpu}\n")
    r = dsv4c("build", str(bad), "-o", str(tmp_path / "out"), cache=tmp_path / "c")
    assert r.returncode == 2
    assert "target.kindd" in r.stderr and "did you mean `target.kind`" in r.stderr
    assert not (tmp_path / "out").exists()
