"""`dsv4c conformance` on the recording of DeepSeek's official inference code (tiny-c, FORMAT.md beside it):
the graph conforms, and reverting any one of the spec's five BF16 rounding points (§3.9), in the test only,
makes the command fail on the check that owns it. The thresholds are FORMAT.md's, not ours."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dsv4c.graphs.model as model_module
from dsv4c.compiler.cli import main
from dsv4c.graphs import quant
from dsv4c.graphs.conformance import TopkAgreement, bf16_ulp

RECORDING = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "dsv4-conformance" / "tiny-c"
pytestmark = pytest.mark.skipif(not RECORDING.is_dir(), reason="needs ../shared/testdata/dsv4-conformance")
CONTRACT = {"attn_reference_topk": {"within_1ulp", "median_row_rel_err", "max_row_rel_err", "passed"},
            "topk": {"rows_same_set_modulo_ties", "picks", "passed"},
            "ffn": {"within_1ulp", "median_row_rel_err", "experts_same_set", "passed"},
            "hc": {"within_1ulp", "passed"}, "mtp_in": {"within_1ulp", "passed"},
            "logits": {"within_1ulp", "max_row_rel_err", "passed"}}


def conformance(*args: str):
    result = CliRunner().invoke(main, ["conformance", *args])
    return result.exit_code, result.output


def test_graph_conforms_to_the_official_code():
    code, out = conformance(str(RECORDING), "--json")
    report = json.loads(out)
    assert code == 0 and report["passed"] is True, out
    assert set(report) == {"passed", "checks"}
    assert set(report["checks"]) == {"attn", *CONTRACT}
    for name, keys in CONTRACT.items():
        assert set(report["checks"][name]) == keys, name
        assert all(0 <= v <= 1 for k, v in report["checks"][name].items() if k != "passed")
    c = report["checks"]  # FORMAT.md's "conforms" table
    assert c["attn_reference_topk"]["within_1ulp"] >= 0.90 and c["attn_reference_topk"]["median_row_rel_err"] <= 1e-3
    assert c["topk"]["rows_same_set_modulo_ties"] >= 0.999
    assert c["ffn"]["within_1ulp"] >= 0.999 and c["ffn"]["experts_same_set"] >= 0.999
    assert c["hc"]["within_1ulp"] >= 0.9999 and c["mtp_in"]["within_1ulp"] >= 0.9999
    assert c["logits"]["within_1ulp"] >= 0.99 and c["logits"]["max_row_rel_err"] <= 1e-3


class _OpsWith:
    """torch.ops.dsv4 with some ops replaced: the graph calls ops through model.ops, so a test can swap one."""

    def __init__(self, **replaced):
        self.replaced = replaced

    def __getattr__(self, name):
        return self.replaced.get(name) or getattr(torch.ops.dsv4, name)


def _q_rescale_in_fp32(q, eps, num):
    """§3.9.1 reverted: an fp32 RMS rounded once."""
    return model_module._rnd(q * torch.rsqrt(q.square().mean(-1, keepdim=True) + eps), num)


def _hadamard_unrounded(x):
    """§3.9.3 reverted: FP4 simulation straight on the fp32 Hadamard output."""
    return quant.fake_quant_fp4(quant.hadamard(x.float()), 32)


REVERTS = {
    "q_rescale_fp32": (lambda mp: mp.setattr(model_module, "head_rescale", _q_rescale_in_fp32), "attn_reference_topk"),
    "attention_probabilities_fp32": (lambda mp: mp.setattr(model_module, "ops", _OpsWith(
        sparse_attn=lambda q, kv, cmp, sink, idx, scale, bf16, kv_rope: torch.ops.dsv4.sparse_attn(
            q, kv, cmp, sink, idx, scale, False, kv_rope))),
        "attn_reference_topk"),
    "hadamard_unrounded": (lambda mp: mp.setattr(model_module, "ops", _OpsWith(hadamard_fp4=_hadamard_unrounded)), "topk"),
    "indexer_scores_fp32": (lambda mp: mp.setattr(model_module, "ops", _OpsWith(
        indexer_topk=lambda q, k, w, n, topk, bf16: torch.ops.dsv4.indexer_topk(q, k, w, n, topk, False))), "topk"),
    # §3.9.5 reverted: the top-k over the whole padded row of cache slots, not the end_pos // 4 that exist
    "topk_over_padded_row": (lambda mp: mp.setattr(model_module, "ops", _OpsWith(
        indexer_topk=lambda q, k, w, n, topk, bf16: torch.ops.dsv4.indexer_topk(
            q, k, w, torch.full_like(n, k.shape[1]), topk, bf16))), "topk"),
}


@pytest.mark.parametrize("revert", sorted(REVERTS))
def test_reverting_a_precision_point_fails_the_command(revert, monkeypatch):
    apply, owner = REVERTS[revert]
    apply(monkeypatch)
    code, out = conformance(str(RECORDING), "--json")
    report = json.loads(out.split("error (")[0])
    assert code == 5 and report["passed"] is False
    assert report["checks"][owner]["passed"] is False, report["checks"][owner]
    assert "the graph does not conform" in out and owner in out.split("failed:")[1]


def test_text_report_and_bad_directories(tmp_path):
    code, out = conformance(str(RECORDING))
    assert code == 0 and out.rstrip().endswith("conforms") and "attn|topk" in out
    code, out = conformance(str(tmp_path))
    assert code == 7 and "conformance.npz: not found" in out and "Traceback" not in out
    np.savez(tmp_path / "conformance.npz", prompts=np.zeros((1, 4), np.int64))
    code, out = conformance(str(tmp_path))
    assert code == 7 and "key 'meta' missing" in out


def test_ulp_and_topk_metrics_by_hand():
    """FORMAT.md: ulp(r) = 2^(floor(log2|r|) - 7), 2^-133 at 0; sets compared modulo ties at the k-th score."""
    assert bf16_ulp(np.array([1.0, 1.5, -3.0, 0.0, 2.0 ** -10])).tolist() == [2 ** -7, 2 ** -7, 2 ** -6, 2 ** -133,
                                                                              2 ** -17]
    scores = np.array([[[5.0, 1.0, 1.0, 0.5, -math.inf]]])
    t = TopkAgreement()
    t.add(np.array([[[0, 2]]]), np.array([[[0, 1]]]), scores)  # 1 and 2 tie at the k-th score: same modulo ties
    t.add(np.array([[[0, 3]]]), np.array([[[0, 1]]]), scores)  # 3 scores 0.5 < 1: a real difference
    t.add(np.array([[[1, 0]]]), np.array([[[0, 1]]]), scores)  # same set, other order
    f = t.figures()
    assert (f["rows_same_set"], f["rows_same_set_modulo_ties"], f["rows_same_order"]) == (1 / 3, 2 / 3, 0.0)
    assert f["picks"] == 4 / 6
