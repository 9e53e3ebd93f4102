"""`dsv4c plan`: weights, KV cache, per-device memory and feasibility, checked against hand calculations.

References, none of them read back from dsv4c.compiler.plan:
  * the official checkpoint sizes (spec §5.6): Flash 159,609,485,896 bytes (metadata.total_size of the index),
    Pro 864,704,792,696 bytes; a byte model of the spec's tensor tables (§2, §5.1-5.2) written out below must
    reproduce both exactly before it is trusted for the post-fallback figures (FP4 experts -> FP8, §5.3);
  * parameter counts of spec §1.1 (Flash 284.3B + 6.6B MTP, Pro 1573B + 25.8B MTP);
  * the cache layout of spec §4 (window ring, CSA/HCA entries, indexer keys, fp32 compressor state) with the FP8
    entry of §4.2 (448 e4m3 + 64 bf16 RoPE + 7 e8m0 scales + 1 pad = 584 B) and vLLM's BF16 figures (9.62 GiB
    per sequence at 1M for V4-Pro vs 83.9 GiB for a V3.2-style stack);
  * DeepSeek's claim (§4.2, via HF-BLOG/VLLM-B): V4 KV at 1M = 10 % (Pro) / 7 % (Flash) of V3.2's.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4c.compiler.plan import make_plan
from dsv4c.compiler.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
GIB = 1 << 30
ONE_M = 1 << 20

FLASH = dict(D=4096, L=43, H=64, q=1024, og=8, ol=1024, E=256, I=2048, hash=3, ratios=(0, 0) + (4, 128) * 20 + (4,))
PRO = dict(D=7168, L=61, H=128, q=1536, og=16, ol=1024, E=384, I=3072, hash=3, ratios=(128, 128) + (4, 128) * 29 + (4,))
V, HD, IH, ID, TOPK_EXPERTS, HC = 129280, 512, 64, 128, 6, 4  # shared by both models


# ---- the spec's byte model, by hand ------------------------------------------------------------------------------
def fp8(out: int, inp: int) -> int:  # e4m3 + one e8m0 per 128x128 block
    return out * inp + math.ceil(out / 128) * math.ceil(inp / 128)


def fp4(out: int, inp: int) -> int:  # two e2m1 per byte + one e8m0 per 1x32
    return out * inp // 2 + out * inp // 32


def routed_experts(m: dict, fmt) -> int:
    return m["E"] * (2 * fmt(m["I"], m["D"]) + fmt(m["D"], m["I"]))


def layer_bytes(m: dict, ratio: int, hash_routed: bool) -> int:
    D, H, mix = m["D"], m["H"], (2 + HC) * HC
    n = 2 * (mix * HC * D * 4 + mix * 4 + 3 * 4)  # hc_{attn,ffn}_{fn,base,scale}, fp32
    n += 2 * D * 2 + H * 4  # attn_norm, ffn_norm (bf16), attn_sink (fp32)
    n += fp8(m["q"], D) + m["q"] * 2 + fp8(H * HD, m["q"]) + fp8(HD, D) + HD * 2  # wq_a, q_norm, wq_b, wkv, kv_norm
    n += fp8(m["og"] * m["ol"], H * HD // m["og"]) + fp8(D, m["og"] * m["ol"])  # wo_a, wo_b
    if ratio:  # compressor: ape fp32 [m, c*d], wkv/wgate bf16 [c*d, D], norm bf16 [d]
        c = 2 if ratio == 4 else 1
        n += ratio * c * HD * 4 + 2 * c * HD * D * 2 + HD * 2
    if ratio == 4:  # indexer: wq_b fp8, weights_proj bf16, its own compressor (d = 128, m = 4, overlap)
        n += fp8(IH * ID, m["q"]) + IH * D * 2 + 4 * 2 * ID * 4 + 2 * 2 * ID * D * 2 + ID * 2
    n += m["E"] * D * 2 + (V * TOPK_EXPERTS * 8 if hash_routed else m["E"] * 4)  # gate; tid2eid int64 | bias fp32
    n += 2 * fp8(m["I"], D) + fp8(D, m["I"])  # shared expert
    return n + routed_experts(m, fp4)


def mtp_bytes(m: dict) -> int:  # one sliding-window block + e_proj, h_proj, 3 norms, its hc_head
    D = m["D"]
    return layer_bytes(m, 0, False) + 2 * fp8(D, D) + 3 * D * 2 + HC * HC * D * 4 + HC * 4 + 4


def checkpoint_bytes(m: dict) -> int:
    D = m["D"]
    globals_ = 2 * V * D * 2 + D * 2 + HC * HC * D * 4 + HC * 4 + 4  # embed, head, norm, hc_head_*
    layers = sum(layer_bytes(m, r, i < m["hash"]) for i, r in enumerate(m["ratios"][: m["L"]]))
    return globals_ + layers + mtp_bytes(m)


def engine_bytes_fp8_experts(m: dict) -> int:
    """What the engine holds after the sm_90 fallback: no MTP, routed experts transcoded FP4 -> FP8."""
    return checkpoint_bytes(m) - mtp_bytes(m) - m["L"] * routed_experts(m, fp4) + m["L"] * routed_experts(m, fp8)


def test_the_hand_byte_model_reproduces_the_official_checkpoints():
    assert checkpoint_bytes(FLASH) == 159_609_485_896
    assert checkpoint_bytes(PRO) == 864_704_792_696


# ---- plans ---------------------------------------------------------------------------------------------------------
def plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv4c.compiler.cli", "plan", *args], capture_output=True,
                          text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def flash():
    """`dsv4c plan recipes/flash-h100.yaml --json`, through the command line: it fits its 8 H100s as a tensor 8 x
    expert 8 mesh and every op it needs has a TensorRT implementation (the collectives as NCCL layers): exit 0."""
    done = plan_cli(str(RECIPES / "flash-h100.yaml"), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def pro():
    return make_plan(load_recipe(RECIPES / "pro-h200.yaml"))


def test_flash_weights_match_the_official_checkpoint_and_the_fp8_transcode(flash):
    assert flash["weights_bytes_as_shipped"] == pytest.approx(159_609_485_896, rel=0.01)
    assert flash["weights_bytes_as_shipped"] == 159_609_485_896  # the byte model is exact (spec §5.6)
    assert flash["fallbacks"] == [{"group": "experts", "from": "fp4", "to": "fp8",
                                   "reason": flash["fallbacks"][0]["reason"]}]
    assert flash["weights_bytes"] == engine_bytes_fp8_experts(FLASH)
    experts = flash["weights"]["routed_experts"]
    assert experts["bytes"] / experts["shipped_bytes"] == pytest.approx(
        routed_experts(FLASH, fp8) / routed_experts(FLASH, fp4))  # the transcode ~doubles the experts (1.88x)


def test_the_python_api_plans_what_the_command_line_prints(flash):
    """`dsv4c plan --json` is a thin layer over dsv4c.plan: the same figures, key for key (the warnings quote the
    free disk space, which may move between the two calls)."""
    import dsv4c

    api = dsv4c.plan(RECIPES / "flash-h100.yaml").to_dict()
    assert api["weights_bytes_as_shipped"] == flash["weights_bytes_as_shipped"] == 159_609_485_896
    assert api["weights_bytes"] == flash["weights_bytes"]
    assert {k: v for k, v in api.items() if k != "warnings"} == {k: v for k, v in flash.items() if k != "warnings"}


def test_pro_weights_match_the_official_checkpoint_and_the_fp8_transcode(pro):
    assert pro["weights_bytes_as_shipped"] == pytest.approx(864_704_792_696, rel=0.01)
    assert pro["weights_bytes_as_shipped"] == 864_704_792_696
    assert pro["weights_bytes"] == engine_bytes_fp8_experts(PRO)


def test_parameter_counts_match_the_spec(flash, pro):
    # spec §1.1: Flash 284.3B excluding MTP (+6.6B MTP); Pro 1573B + 25.8B MTP
    assert flash["model"]["params_excluding_mtp"] / 1e9 == pytest.approx(284.3, abs=0.05)
    assert flash["weights"]["mtp"]["params"] / 1e9 == pytest.approx(6.6, abs=0.05)
    assert pro["model"]["params_excluding_mtp"] / 1e9 == pytest.approx(1573, abs=0.5)
    assert pro["weights"]["mtp"]["params"] / 1e9 == pytest.approx(25.8, abs=0.05)
    assert not flash["weights"]["mtp"]["in_engine"]  # the engine runs no MTP: its weights are not deployed


# ---- KV cache --------------------------------------------------------------------------------------------------------
FP8_ENTRY = 448 + 64 * 2 + 448 // 64 + 1  # spec §4.2: e4m3 nope + bf16 rope + e8m0 per 64 + 1 pad = 584 B
FP4_INDEX_KEY = ID // 2 + ID // 32  # e2m1 + e8m0 per 32 = 68 B
CSA_STATE = 2 * 8 * 1024 * 4 + 2 * 8 * 256 * 4  # kv + score [c*m, c*d] fp32, main and indexer compressor
HCA_STATE = 2 * 128 * 512 * 4


def kv_by_hand(m: dict, seq_len: int) -> tuple[float, int]:
    """(bytes per token, bytes per sequence at seq_len) of the main layers in the official formats."""
    ratios = m["ratios"][: m["L"]]
    csa, hca = ratios.count(4), ratios.count(128)
    per_token = csa * (FP8_ENTRY / 4 + FP4_INDEX_KEY / 4) + hca * FP8_ENTRY / 128
    window = m["L"] * 128 * FP8_ENTRY
    entries = csa * (seq_len // 4) * (FP8_ENTRY + FP4_INDEX_KEY) + hca * (seq_len // 128) * FP8_ENTRY
    return per_token, window + entries + csa * CSA_STATE + hca * HCA_STATE


def test_kv_bytes_per_token_match_the_spec_layout(flash, pro):
    assert FP8_ENTRY == 584 and FP4_INDEX_KEY == 68
    for plan, m in ((flash, FLASH), (pro, PRO)):
        per_token, at_max = kv_by_hand(m, 131072)
        assert plan["kv_cache_bytes_per_token"] == pytest.approx(per_token)
        assert plan["kv_cache_bytes_at_max_seq_len"] == at_max
    assert flash["kv_cache_bytes_per_token"] == pytest.approx(21 * 163 + 20 * 4.5625)  # 3514.25 B


def test_kv_in_bf16_matches_vllms_v4_pro_figures():
    """vLLM's estimate (spec §4.2): BF16, 1M tokens, compressed entries only: 9.62 GiB per sequence for V4-Pro vs
    83.9 GiB for a V3.2-style stack (MLA 512+64 and indexer 128 dims per token on 61 layers)."""
    plan = make_plan(load_recipe(RECIPES / "pro-h200.yaml", ["quantization.kv_cache=bf16",
                                                             "quantization.indexer=bf16"]))
    assert plan["kv_cache_bytes_per_token"] * ONE_M / GIB == pytest.approx(9.62, abs=0.005)
    assert plan["kv_cache"]["at_1m"]["v32_bytes"] / GIB == pytest.approx(83.9, abs=0.05)


def test_kv_at_1m_reproduces_the_10_and_7_percent_claim(flash, pro):
    """V3.2's cache in its FP8 layout: 656 B (e4m3 latent + 4 f32 scales + bf16 rope) + 132 B indexer key per
    token per layer, 61 layers. V4 in its official formats (FP8 entries, FP4 indexer keys)."""
    v32 = 61 * (512 + 4 * 4 + 64 * 2 + 128 + 4) * ONE_M
    for plan, m, claim, measured in ((pro, PRO, 0.10, 0.105), (flash, FLASH, 0.07, 0.073)):
        _, v4 = kv_by_hand(m, ONE_M)  # windows and compressor state included (0.4 % of it)
        assert plan["kv_cache"]["at_1m"]["bytes"] == v4
        assert plan["kv_cache"]["at_1m"]["ratio_to_v32_61_layers"] == pytest.approx(v4 / v32)
        assert v4 / v32 == pytest.approx(measured, abs=0.001)
        assert v4 / v32 == pytest.approx(claim, abs=0.01)  # the claim, to within one percentage point
    # Flash against a dense cache of its own depth (43 layers) is 10.4 %: the 7 % compares with V3.2's 61 layers
    _, flash_1m = kv_by_hand(FLASH, ONE_M)
    assert flash["kv_cache"]["at_1m"]["ratio_to_dense_same_depth"] == pytest.approx(flash_1m / (v32 * 43 / 61))
    assert flash["kv_cache"]["at_1m"]["ratio_to_dense_same_depth"] == pytest.approx(0.104, abs=0.001)


def test_engine_kv_layout_is_the_recipes_formats(flash):
    # dsv4c's cache rows (graphs/cache.py) are packed under the official numerics: an FP8 KV row of 512 is 448 e4m3
    # bytes + 64 bf16 RoPE dims + 7 e8m0 scales, padded to 584; an FP4 indexer key of 128 is 64 + 4 = 68 bytes
    # (CSA: an entry per 4 tokens plus an indexer key; HCA: an entry per 128 tokens), the spec §4.2 figure
    per_token = 21 * (584 / 4 + 68 / 4) + 20 * 584 / 128
    assert flash["kv_cache"]["dsv4c_engine"]["bytes_per_token"] == pytest.approx(per_token) == 3514.25
    assert flash["kv_cache"]["dsv4c_engine"]["bytes_per_token"] == flash["kv_cache"]["bytes_per_token"]


# ---- devices and feasibility --------------------------------------------------------------------------------------
def tp_sharded(m: dict) -> int:
    """Bytes tensor parallelism splits (spec §5.3, DeepSeek's convert.py): per layer wq_b, wo_a, wo_b, attn_sink and
    the indexer's wq_b and weights_proj (CSA layers); the embedding and the head by vocabulary."""
    D, H, og, ol, q = m["D"], m["H"], m["og"], m["ol"], m["q"]
    per_layer = fp8(H * HD, q) + fp8(og * ol, H * HD // og) + fp8(D, og * ol) + H * 4
    csa = m["ratios"][: m["L"]].count(4)
    return m["L"] * per_layer + csa * (fp8(IH * ID, q) + IH * D * 2) + 2 * V * D * 2


def rank_weights(m: dict, tensor: int, expert: int) -> float:
    """One rank's weights: routed experts / expert, the tensor-parallel ones / tensor, the rest (shared expert,
    wq_a, wkv, compressors, gate, norms, hc) whole."""
    total = engine_bytes_fp8_experts(m)
    routed = m["L"] * routed_experts(m, fp8)
    return total - routed * (1 - 1 / expert) - tp_sharded(m) * (1 - 1 / tensor)


def test_flash_h100_fits_eight_h100s_and_every_rank_holds_the_whole_kv(flash):
    assert flash["fits"] and flash["problems"] == [] and flash["build_blockers"] == []
    assert flash["feasible"]
    stage = flash["per_device"]["stages"][0]
    _, per_seq = kv_by_hand(FLASH, 131072)
    assert stage["kv_cache"] == 64 * per_seq  # one K=V head: the whole cache of all 64 sequences on every rank
    assert flash["per_device_bytes"] <= 0.9 * 80 * GIB
    # by hand: 37.67 GB of weights per rank; each split tensor is rounded up to whole bytes per rank (< 1 KB)
    assert stage["weights"] == pytest.approx(rank_weights(FLASH, 8, 8), abs=1024)
    assert round(rank_weights(FLASH, 8, 8) / 1e9, 2) == 37.67
    # the ops the rank's graph calls include its collectives and the head-partial indexer scores
    ops = {o["op"]: o for o in flash["ops"]}
    assert {"all_reduce", "all_gather", "indexer_scores"} <= set(ops) and "indexer_topk" not in ops
    assert all(o["implemented"] for o in flash["ops"])


def test_data_replicas_run_the_whole_batch_and_spread_the_experts():
    """tensor 4 x data 2 on 8 H100s, experts over all 8: the data replicas run the same batch, so each rank holds
    the KV of all 64 sequences; the experts are split 8 ways, the attention 4 ways."""
    plan = make_plan(load_recipe(RECIPES / "flash-h100.yaml", ["target.parallel={tensor: 4, expert: 8, data: 2}"]))
    stage = plan["per_device"]["stages"][0]
    _, per_seq = kv_by_hand(FLASH, 131072)
    assert stage["kv_cache"] == 64 * per_seq
    assert stage["weights"] == pytest.approx(rank_weights(FLASH, 4, 8), abs=1024)
    assert stage["weights"] > make_plan(load_recipe(RECIPES / "flash-h100.yaml"))["per_device"]["stages"][0]["weights"]


def test_pipeline_is_a_problem_that_names_the_layout_to_use(pro):
    """pro-h200 asks for 2 pipeline stages: not implemented, so plan refuses it and names the mesh to use instead
    (the second node's devices as data replicas, the 384 experts over all 16); that layout plans without the
    pipeline problem (at batch 64 it then needs a smaller batch: 149 GiB of 127 usable, said by its own problem)."""
    assert not pro["fits"] and not pro["feasible"]
    first = pro["problems"][0]
    assert first.startswith("target.parallel.pipeline=2: pipeline parallelism is not implemented")
    want = "target.parallel={tensor: 8, expert: 16, pipeline: 1, data: 2}"
    assert f"--set '{want}'" in first
    stages = pro["per_device"]["stages"]  # still sized per stage, for comparison
    assert [s["layers"] for s in stages] == ["0-30", "31-60"]
    followed = make_plan(load_recipe(RECIPES / "pro-h200.yaml", [want]))
    assert not any("pipeline" in p for p in followed["problems"])
    stage = followed["per_device"]["stages"][0]
    assert stage["weights"] == pytest.approx(rank_weights(PRO, 8, 16), abs=1024)
    assert "lower runtime.max_batch_size to" in followed["problems"][0]


def test_flash_on_one_h100_exits_3_naming_what_to_change():
    done = plan_cli(str(RECIPES / "flash-h100.yaml"), "--json", "--set", "target.devices_per_node=1",
                    "--set", "target.parallel={tensor: 1, expert: 1}")
    assert done.returncode == 3, done.stderr
    first = done.stderr.splitlines()[0]
    assert first.startswith("error (infeasible on the declared target, exit 3): recipe 'flash-h100'")
    assert "80 GiB" in first and "add devices (at least 4" in first  # 266 GiB of FP8 weights / 72 GiB usable
    plan = json.loads(done.stdout)
    assert plan["feasible"] is False and plan["problems"] and plan["per_device_bytes"] > 80 * GIB


# ---- the layout against the shapes ----------------------------------------------------------------------------------
def test_tensor_degree_that_does_not_divide_the_heads_exits_3():
    # flash: 64 heads, 8 o-groups, 64 index heads, vocab 129280; tensor 16 on 16 H100s does not divide o_groups
    done = plan_cli(str(RECIPES / "flash-h100.yaml"), "--json", "--set", "target.devices_per_node=16",
                    "--set", "target.parallel={tensor: 16, expert: 16}")
    assert done.returncode == 3, done.stderr
    plan = json.loads(done.stdout)
    assert plan["problems"] == ["target.parallel.tensor=16 does not divide o_groups=8 (tensor parallelism shards it); "
                                "choose a divisor"]


def test_expert_degree_that_does_not_divide_the_experts_is_a_problem():
    # 256 routed experts over 3 x 2 = 6 devices (expert 6 divides the world, not the experts)
    plan = make_plan(load_recipe(RECIPES / "flash-h100.yaml", ["target.devices_per_node=6",
                                                               "target.parallel={tensor: 2, expert: 6, data: 3}"]))
    assert "target.parallel.expert=6 does not divide n_routed_experts=256; choose a divisor" in plan["problems"]


def test_expert_degree_must_divide_the_world():
    from dsv4c.compiler.errors import RecipeError

    with pytest.raises(RecipeError, match=r"parallel\.expert.*3 must divide tensor\*data = 8"):
        load_recipe(RECIPES / "flash-h100.yaml", ["target.parallel={tensor: 8, expert: 3}"])


@pytest.fixture()
def straddling_checkpoint(tmp_path):
    """A V4-Pro-shaped config.json with o_lora_rank 192: wo_a is [16 x 192, 4096] = [3072, 4096], so at tensor 16
    each rank's 192 rows (rows 192..383 on rank 1) cross the 128-row FP8 scale block boundary at 256; at tensor 8
    the 384 rows are three whole blocks."""
    from dsv4c.graphs.config import preset

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = preset("v4-pro").to_hf_dict()
    cfg["o_lora_rank"] = 192
    (ckpt / "config.json").write_text(json.dumps(cfg))
    recipe = tmp_path / "straddle.yaml"
    recipe.write_text("name: straddle\nmodel: {checkpoint: ckpt}\nquantization: {preset: official, "
                      "on_unsupported: fallback, fallback: {experts: fp8}}\ntarget: {kind: tensorrt, arch: sm_90, "
                      "device: H200, devices_per_node: 16}\nruntime: {max_batch_size: 8, max_seq_len: 8192}\n")
    return recipe


def test_fp8_blocks_split_by_tensor_parallelism_exit_3_naming_tensor_and_shape(straddling_checkpoint):
    done = plan_cli(str(straddling_checkpoint), "--json")
    assert done.returncode == 3, done.stderr
    first = done.stderr.splitlines()[0]
    assert "target.parallel.tensor=16 splits FP8 scale blocks" in first
    assert "attn.wo_a [3072, 4096]: 3072 / tensor 16 = 192 along dim 0" in first
    plan = json.loads(done.stdout)
    # wo_b is not among them: a rank's 192 input channels are not whole activation-quant blocks, so wo_b stays
    # whole on every rank with its input all-gathered (parallel.splits_wo_b) and nothing of it is split
    assert len(plan["problems"]) == 1 and not any("attn.wo_b" in p for p in plan["problems"])
    # a shard inside one block, or whole blocks, is exact: tensor 8 (384 rows = 3 blocks) has no such problem
    ok = plan_cli(str(straddling_checkpoint), "--json", "--set", "target.parallel={tensor: 8, expert: 16, data: 2}")
    assert not any("FP8 scale" in p for p in json.loads(ok.stdout)["problems"]), ok.stderr


def test_a_kv_overflow_suggests_the_batch_that_fits():
    plan = make_plan(load_recipe(RECIPES / "flash-h100.yaml", ["runtime.max_batch_size=128"]))
    assert not plan["fits"] and not plan["feasible"]
    stage = plan["per_device"]["stages"][0]
    room = 0.9 * 80 * GIB - stage["weights"] - stage["workspace"]
    _, per_seq = kv_by_hand(FLASH, 131072)
    assert f"lower runtime.max_batch_size to {int(room // per_seq)} (from 128: every rank holds" in plan["problems"][0]


def test_the_engine_column_holds_what_each_runtime_allocates(flash):
    """The TensorRT runtime binds a second set of caches for the step to write (an engine's outputs may not alias
    its inputs): a flash-h100 rank's engine holds the KV cache twice, which the recipe's formats fit and dsv4c's
    engine does not. The warning says so and names the batch that fits, and at that batch it fits."""
    stage, engine = flash["per_device"]["stages"][0], flash["per_device"]["dsv4c_engine_stages"][0]
    _, per_seq = kv_by_hand(FLASH, 131072)
    assert engine["kv_cache"] == 2 * stage["kv_cache"] == 2 * 64 * per_seq
    assert engine["workspace"] > stage["workspace"]  # the JIT MoE plugin's h and pair rows, kept by torch's cache
    (warning,) = [w for w in flash["warnings"] if "engine would need" in w]
    room = 0.9 * 80 * GIB - engine["weights"] - engine["workspace"]
    fit = int(room // (2 * per_seq))
    assert "holds caches twice" in warning and f"runtime.max_batch_size {fit} fits it" in warning
    smaller = make_plan(load_recipe(RECIPES / "flash-h100.yaml", [f"runtime.max_batch_size={fit}"]))
    assert not [w for w in smaller["warnings"] if "engine would need" in w]
    assert max(s["total"] for s in smaller["per_device"]["dsv4c_engine_stages"]) <= 0.9 * 80 * GIB


# ---- ops and the human table ----------------------------------------------------------------------------------------
def test_ops_follow_the_numerics():
    official = make_plan(load_recipe(RECIPES / "tiny-cpu.yaml"))
    plain = make_plan(load_recipe(RECIPES / "tiny-plain-cpu.yaml"))
    names = lambda p: {o["op"] for o in p["ops"]}  # noqa: E731
    assert names(official) == {"fp8_linear", "bf16_linear", "fp8_grouped_linear", "moe_experts", "pack_kv_fp8",
                               "hadamard_fp4", "pack_fp4", "sparse_attn", "indexer_topk", "compress_pool", "hc_pre",
                               "hc_post", "cache_write", "rope", "rms_norm", "head_rescale"}
    # plain numerics: no FP8 KV rows, no Hadamard + FP4 indexer keys
    assert names(plain) == names(official) - {"pack_kv_fp8", "hadamard_fp4", "pack_fp4"}
    assert all(o["implemented"] for o in official["ops"])  # the CPU target runs every op


def test_cann_910b_reports_int8_experts_and_missing_kernels():
    plan = make_plan(load_recipe(RECIPES / "flash-ascend910b.yaml"))
    experts = plan["weights"]["routed_experts"]
    # INT8 = 2 x e2m1 exactly, one f32 scale per 1x32: 1 + 4/32 bytes per weight
    assert experts["bytes"] == FLASH["L"] * FLASH["E"] * 3 * FLASH["I"] * FLASH["D"] * (1 + 4 / 32)
    assert plan["target"]["device_memory_gib"] == 64
    assert any("no cann implementation" in b and "SparseAttn" in b for b in plan["build_blockers"])


def test_table_output_exits_0_for_the_tiny_recipe():
    done = plan_cli(str(RECIPES / "tiny-cpu.yaml"))
    assert done.returncode == 0, done.stderr
    assert "weights per module group" in done.stdout and "feasible" in done.stdout
