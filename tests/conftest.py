"""Shared fixtures: one stage cache per test session (the synthetic checkpoint is generated once), the CLI in a
subprocess, and the PyTorch reference model read straight from the build's checkpoint.

A test that needs an artifact builds it with the Python API (`dsv4c.build(RECIPES / ..., out,
cache_dir=stage_cache)`, no process to start); the tests of the command line itself run it with `dsv4c_cli`. Both
share the session's stage cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def dsv4c_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv4c.compiler.cli", *args, "--cache-dir", str(cache)],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="session")
def stage_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stage-cache")


def reference_model(cache: Path, numerics=None, expert_format: str = "fp4"):
    """DeepseekV4 on the synthetic checkpoint a build in `cache` generated (independent of the engine)."""
    from dsv4c.graphs.checkpoint import CheckpointReader
    from dsv4c.graphs.model import load_checkpoint_model

    return load_checkpoint_model(CheckpointReader(next(cache.glob("load/*/checkpoint"))), numerics, expert_format)


def compare_with_reference(session, model, prompts: list[list[int]], steps: int, resync: bool):
    """Prefill + `steps` teacher-forced decode steps on an engine session and on the reference; with `resync`
    every decode step starts the engine from the reference's cache (the engine's step function, see
    dsv4c.compiler.stages.validate_engine for why). Yields (step, engine logits, reference logits)."""
    import torch

    from dsv4c.graphs.cache import host_array

    batch = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for b, p in enumerate(prompts):
        batch[b, : len(p)] = torch.tensor(p)
    pos = torch.tensor([len(p) for p in prompts])
    cache = model.new_cache(len(prompts), session.engine.max_seq_len)
    with torch.no_grad():
        want, cache = model(batch, torch.zeros_like(pos), pos.clone(), cache)
        got = session.prefill(prompts)
        yield 0, got, want.numpy()
        for step in range(1, steps + 1):
            nxt = want.argmax(-1)
            if resync:
                session.cache.from_host([host_array(c) for c in cache])
                session.positions = pos.numpy().copy()
            got = session.decode(nxt.numpy())
            want, cache = model(nxt[:, None], pos, torch.ones_like(pos), cache)
            pos += 1
            yield step, got, want.numpy()


def assert_step_function_agrees(session, model, prompts: list[list[int]], steps: int, *, min_cosine: float,
                                agreement: float, floor: float) -> None:
    """A recipe's per-step gate, computed here independently of the validate stage: every logit row (prefill and
    each resynced decode step) reaches cosine `floor`, and at least `agreement` of them reach `min_cosine` with
    the reference's top-1."""
    rows = []
    for step, got, want in compare_with_reference(session, model, prompts, steps, resync=True):
        cos = cosine(got, want)
        assert cos.min() >= floor, f"step {step}: {cos}"
        rows += [(c >= min_cosine) and (g == w) for c, g, w in zip(cos, got.argmax(-1), want.argmax(-1))]
    assert sum(rows) / len(rows) >= agreement, rows


def cosine(a, b):
    """Row-wise cosine similarity along the last axis (arrays or CPU tensors), in float64."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def flat_cosine(a, b) -> float:
    """Cosine similarity of two tensors taken as flat vectors, in float64."""
    import torch

    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def resident_pages(array) -> int:
    """How many pages of `array` (a memory map, page-aligned) are in this process's resident set
    (/proc/self/pagemap: bit 63 of a page's entry)."""
    import os

    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(array.ctypes.data // page * 8)
        entries = np.frombuffer(f.read(-(-array.nbytes // page) * 8), dtype=np.uint64)
    return int((entries >> np.uint64(63)).sum())


def resident_share(array) -> float:
    """The share of `array`'s pages (a memory map) in this process's resident set."""
    import os

    return resident_pages(array) / -(-array.nbytes // os.sysconf("SC_PAGE_SIZE"))
