"""The validate stage's gate (dsv4c.compiler.validation) must pass correct engines and fail broken ones.

The tiny CPU engine is built once; the reference side of the validation (prompts, steps, the reference's own
sensitivity, the derived gate) is computed once; then each mutant of tests/mutants.py — a bug injected into the
engine's ONNX programs only — is checked against it and must fail with exit 5 naming the first failing
step/row, while the unmodified engine passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import RECIPES, dsv4c_cli, reference_model
from mutants import MUTANTS, mutant_executor

import dsv4c
from dsv4c.compiler.recipe import load_recipe
from dsv4c.compiler.validation import (PERTURBATION, STRICT_COSINE, Gate, ReferenceRun, derive_gate, gate_error,
                                       perturbed_embedding, prompt_lengths, reference_steps)
from dsv4c.graphs.config import preset
from dsv4c.graphs.model import DeepseekV4, Numerics
from dsv4c.runtime import Engine

RECIPE = "recipes/tiny-cpu.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, stage_cache):
    return dsv4c.build(RECIPES / "tiny-cpu.yaml", tmp_path_factory.mktemp("validation") / "tiny-cpu",
                       cache_dir=stage_cache)


@pytest.fixture(scope="module")
def reference(tiny, stage_cache) -> ReferenceRun:
    v = load_recipe(RECIPE).validate
    return ReferenceRun.record(reference_model(stage_cache, Numerics.reference()), v, 2, 4096)


def test_built_engine_passes_the_derived_gate_with_every_layer_type_covered(tiny):
    report = json.loads((tiny / "validation.json").read_text())
    assert report["passed"], report["summary"]
    derivation = report["threshold_derivation"]
    assert derivation["agreement"] == derivation["floor_cosine"] == "derived"
    assert derivation["reference_sensitivity"]["draws"] >= 2
    cov = report["coverage"]
    assert cov["complete"], cov["missing"]
    assert cov["sliding_window"]["wrapped"] and cov["hca"]["entries"] >= 2 and cov["csa"]["topk_bound"]
    assert cov["csa"]["entries_emitted_in_decode"] >= 1 and cov["hca"]["entries_emitted_in_decode"] >= 1
    assert cov["moe_routing"]["hash_layers"] and cov["moe_routing"]["score_layers"]
    manifest = json.loads((tiny / "manifest.json").read_text())["validation"]
    assert manifest["coverage"] == cov and manifest["thresholds"] == report["thresholds"]


def test_unmodified_engine_passes(tiny, reference):
    report = reference.check(Engine.load(tiny))
    assert report["passed"], report["summary"]
    assert report["first_failure"] is None


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_mutant_fails_validation_naming_the_first_failing_row(tiny, reference, mutant, tmp_path):
    engine = Engine.load(tiny)
    engine.executor = mutant_executor(tiny, mutant, tmp_path / mutant)
    report = reference.check(engine)
    assert not report["passed"], f"{mutant} passed: {report['summary']}"
    first = report["first_failure"]
    assert first is not None and first["cosine"] < 1.0
    error = gate_error(report)
    assert error.exit_code == 5
    step = "prefill" if first["step"] == 0 else f"decode step {first['step']}"
    assert f"first failing: {step}, sequence {first['sequence']}" in str(error)


def test_spilled_steps_read_back_as_the_steps_kept_in_memory(reference, stage_cache, tmp_path):
    """validate_engine runs the reference first with its steps on disk (one file a step, a step's cache_in being
    the previous step's cache_out): read back, every step is the one the in-memory record holds."""
    spilled = ReferenceRun.record(reference_model(stage_cache, Numerics.reference()), reference.v, 2, 4096, tmp_path)
    kept, read = list(reference.steps), list(spilled.steps)
    assert len(read) == len(kept)
    assert len(list(tmp_path.iterdir())) == len(kept) + sum(r.step == 0 for r in kept)  # + an empty cache a batch
    for a, b in zip(kept, read):
        assert (a.batch, a.step, a.sequences, a.prompts) == (b.batch, b.step, b.sequences, b.prompts)
        for x, y in [(a.tokens, b.tokens), (a.start, b.start), (a.logits, b.logits),
                     *zip(a.cache_in, b.cache_in), *zip(a.cache_out, b.cache_out)]:
            assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True)
    assert spilled.gate.thresholds() == reference.gate.thresholds()


def test_the_sensitivity_run_scales_only_the_used_rows_by_its_stated_factor():
    """perturbed_embedding: row t of a used token reads embed[t] (widened to FP32) x (1 + 1e-6 N(0, 1)), the noise
    seeded by draw and token (the module doc's definition, computed here on its own); other rows unchanged; the
    model's own lookup back afterwards."""
    model = DeepseekV4(preset("tiny"))
    torch.nn.init.normal_(model.embed)
    used, other = [5, 77], [6, 1000]
    tokens = torch.tensor([used + other])
    plain = model.embed_tokens(tokens)
    with perturbed_embedding(model, used, draw=1):
        got = model.embed_tokens(tokens)
    for k, t in enumerate(used):
        noise = torch.randn(model.cfg.hidden_size, generator=torch.Generator().manual_seed(1_000_003 * 2 + t))
        assert torch.equal(got[0, k], model.embed[t].float() * (1 + PERTURBATION * noise))
        assert not torch.equal(got[0, k], plain[0, k])
    assert torch.equal(got[0, 2:], plain[0, 2:])
    assert "embed_tokens" not in vars(model) and torch.equal(model.embed_tokens(tokens), plain)


def test_prompts_are_sized_so_every_layer_type_works():
    v = load_recipe(RECIPE).validate
    tiny, mini = preset("tiny"), preset("mini-1b")
    # tiny: HCA ratio 128 needs 2 x 128 tokens; the second prompt crosses 256 during its 16 decode steps
    assert prompt_lengths(tiny, v, 4096) == [256, 248]
    # mini-1b: the CSA top-k (128) binds with more than 128 entries: 4 x 129 tokens
    assert prompt_lengths(mini, v, 4096)[0] == 4 * (mini.index_topk + 1)
    # clamped to the context, leaving room for the decode steps
    assert prompt_lengths(tiny, v, 100) == [84, 76]
    assert prompt_lengths(tiny, v.model_copy(update={"prompts": 3}), 4096) == [256, 248, 245]


def test_batches_never_exceed_max_batch_size(tiny, stage_cache):
    model = reference_model(stage_cache, Numerics.plain())
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    steps = list(reference_steps(model, prompts, 1, 2, 64))
    assert [len(s.sequences) for s in steps] == [2, 2, 1, 1]
    assert [s.sequences for s in steps if s.step == 0] == [[0, 1], [2]]


class _Draws:
    def __init__(self, checks):
        self.draws, self.checks = len(checks), checks


def _logit(cos: float, top1: bool = True) -> dict:
    return {"check": "logits", "cosine": cos, "top1_equal": top1, "near_tie": False, "kl": 0.0}


def test_continuous_numerics_get_the_strict_gate():
    v = load_recipe(RECIPE, ["quantization.preset=plain"]).validate
    gate = derive_gate(v, Numerics.plain(), _Draws([[_logit(1 - 1e-12)] * 10, [_logit(1 - 1e-11)] * 10]))
    assert (gate.min_cosine, gate.agreement, gate.floor_cosine) == (STRICT_COSINE, 1.0, STRICT_COSINE)


def test_discontinuous_gate_sits_below_the_references_own_spread():
    v = load_recipe(RECIPE).validate
    draw = [_logit(0.9999)] * 9 + [_logit(0.95, top1=False)]  # the reference agrees on 90 %, worst row 0.95
    deeper = [_logit(0.9999)] * 9 + [_logit(0.9, top1=False)]
    gate = derive_gate(v, Numerics.reference(), _Draws([draw, draw]))
    assert gate.agreement == pytest.approx(1 - 2 * 0.1 - 0.05)
    assert gate.floor_cosine == pytest.approx(0.8)  # 1 - 4 x 0.05, at the cap
    assert derive_gate(v, Numerics.reference(), _Draws([draw, deeper])).floor_cosine == pytest.approx(1 - 4 * 0.1)
    lucky = derive_gate(v, Numerics.reference(), _Draws([[_logit(1.0)] * 10]))  # a draw that flipped nothing
    assert lucky.agreement <= 0.8 and lucky.floor_cosine <= 0.8  # what a correct tiny engine reaches
    written = derive_gate(load_recipe(RECIPE, ["validate.agreement=0.6"]).validate, Numerics.reference(),
                          _Draws([draw]))
    assert written.agreement == 0.6 and written.derivation["agreement"] == "recipe"


def test_a_row_only_one_side_wrote_fails_whatever_its_values():
    import numpy as np

    from dsv4c.compiler.validation import RefStep, cache_checks

    before = np.zeros((1, 4, 3), np.float32)
    ref = before.copy()
    ref[0, 2] = [1, 2, 3]
    got = before.copy()  # the engine did not write row 2
    rec = RefStep(0, 1, [0], [[1]], np.zeros(1, np.int64), np.zeros(1, np.int64), [before], np.zeros((1, 2)), [ref])
    (check,) = cache_checks(rec, [got], ["layers.0.win"])
    assert check["cosine"] == 0.0 and check["row"] == "layers.0.win[2]"
    assert Gate(0.999, True, 0.0, 0.01, 1.0, 0.5).floor(check) == 0.5


def test_batch1_export_keeps_the_batch_dynamic(tiny, stage_cache):
    """max_batch_size 1 used to die in torch.export ("Constraints violated (batch)"): the program exported for a
    batch-1 engine runs batch 1 and matches the model it was exported from."""
    import torch

    from dsv4c.compiler.export import export_program

    model = reference_model(stage_cache, Numerics.reference())
    program = export_program(model, "decode", 1, 64)
    args = (torch.tensor([[5]]), torch.tensor([3]), torch.ones(1, dtype=torch.long), model.new_cache(1, 64))
    with torch.no_grad():
        got, want = program.module()(*args)[0], model(*args)[0]
    assert got.shape == (1, model.cfg.vocab_size) and torch.equal(got, want)


@pytest.mark.slow
def test_batch1_official_checkpoint_without_validate_section_builds(tmp_path, stage_cache):
    """The minimal recipe a user writes for their checkpoint: no `validate:`, batch 1. Exit 0, a correct engine.
    (slow: a full export + lower of its own, ~70 s on 2 idle cores)"""
    checkpoint = next(stage_cache.glob("load/*/checkpoint"), None)
    if checkpoint is None:  # the session has not generated the tiny checkpoint yet
        r = dsv4c_cli("build", RECIPE, "-o", str(tmp_path / "gen"), "--until", "load", cache=stage_cache)
        assert r.returncode == 0, r.stderr
        checkpoint = next(stage_cache.glob("load/*/checkpoint"))
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"name: mine\nmodel: {{checkpoint: {checkpoint}}}\ntarget: {{kind: cpu}}\n"
                      "runtime: {max_batch_size: 1, max_seq_len: 512}\n")
    r = dsv4c_cli("build", str(recipe), "-o", str(tmp_path / "out"), cache=stage_cache)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert report["passed"] and report["batches"] == 2 and report["coverage"]["complete"]
    eng = Engine.load(tmp_path / "out")
    assert len(eng.generate([[5, 6, 7]], max_new_tokens=4, stop_tokens=[])[0]) == 4
