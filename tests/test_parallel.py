"""Tensor / expert parallelism of the PyTorch graph (dsv4c/graphs/parallel.py), run eagerly on torch.distributed
(gloo, one process per rank): every rank's shard model, put together by the collectives, computes the
single-device model. Plain numerics are continuous, so the mesh must give the same logits (cosine >= 0.9999 on
every row, prefill + decode, batch 2 with unequal prompts); official numerics round the partial sums in another
order and only move rows a little. Slices are checked against the spec's split table by hand."""

from __future__ import annotations

import queue
import socket
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from dsv4c.graphs.checkpoint import CheckpointReader, write_synthetic_checkpoint
from dsv4c.graphs.config import preset
from dsv4c.graphs.model import Numerics, load_checkpoint_model
from dsv4c.graphs.parallel import Shard, block_slice, straddling_shards
from tests.conftest import cosine

PROMPTS = [list(range(3, 40)), list(range(100, 121))]  # unequal lengths: 37 and 21 tokens
DECODE_STEPS = 16


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset("tiny"), seed=0)


def run_steps(model, prompts: list[list[int]], steps: int) -> list[np.ndarray]:
    """Prefill then greedy decode; the logits of every step (all ranks feed the same tokens: rank-0's greedy
    picks equal the others', their logits being gathered identically)."""
    batch = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for b, p in enumerate(prompts):
        batch[b, : len(p)] = torch.tensor(p)
    pos = torch.tensor([len(p) for p in prompts])
    cache = model.new_cache(len(prompts), 512)
    out = []
    with torch.no_grad():
        logits, cache = model(batch, torch.zeros_like(pos), pos.clone(), cache)
        out.append(logits.numpy())
        for _ in range(steps):
            nxt = logits.argmax(-1)
            logits, cache = model(nxt[:, None], pos, torch.ones_like(pos), cache)
            pos += 1
            out.append(logits.numpy())
    return out


def _rank_main(rank: int, world: int, port: int, checkpoint: str, layout: dict, numerics: Numerics, result) -> None:
    import torch.distributed as dist

    from dsv4c.graphs import parallel

    torch.set_num_threads(1)
    # a rank that fails makes the others' collectives time out instead of hanging the test
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        shard = Shard.for_rank(preset("tiny"), rank, SimpleNamespace(**layout))
        parallel.setup(shard)
        model = load_checkpoint_model(CheckpointReader(checkpoint), numerics, shard=shard)
        steps = run_steps(model, PROMPTS, DECODE_STEPS)
        if rank == 0:
            result.put(steps)
    finally:
        parallel.teardown()
        dist.destroy_process_group()


def run_mesh(checkpoint, layout: dict, numerics: Numerics) -> list[np.ndarray]:
    world = layout["tensor"] * layout.get("data", 1)
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(checkpoint), layout, numerics, result))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        while True:  # rank 0's result, or the first rank to fail
            try:
                steps = result.get(timeout=1)
                break
            except queue.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not failed, f"a rank failed: exit codes {[p.exitcode for p in procs]}"
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return steps


LAYOUTS = {
    "tp2": {"tensor": 2, "expert": 1, "data": 1},
    "ep2": {"tensor": 1, "expert": 2, "data": 2},
    "tp2xep2": {"tensor": 2, "expert": 2, "data": 2},
}


@pytest.mark.parametrize("name", ["tp2", "ep2", pytest.param("tp2xep2", marks=pytest.mark.slow)])
def test_mesh_computes_the_single_device_model(tiny_checkpoint, name):
    want = run_steps(load_checkpoint_model(CheckpointReader(tiny_checkpoint), Numerics.plain()), PROMPTS, DECODE_STEPS)
    got = run_mesh(tiny_checkpoint, LAYOUTS[name], Numerics.plain())
    for step, (g, w) in enumerate(zip(got, want)):
        assert cosine(g, w).min() >= 0.9999, (name, step, cosine(g, w))


def test_mesh_official_numerics_stay_close(tiny_checkpoint):
    """Official numerics (FP8 activations, bf16 rounding): the tensor group sums partials the reference never
    forms, so rows move by rounding, not by a wrong slice; prefill agrees closely and greedy decode stays on."""
    want = run_steps(load_checkpoint_model(CheckpointReader(tiny_checkpoint), Numerics.reference()), PROMPTS, 4)
    got = run_mesh(tiny_checkpoint, LAYOUTS["tp2"], Numerics.reference())[:5]
    assert cosine(got[0], want[0]).min() >= 0.99
    assert all((g.argmax(-1) == w.argmax(-1)).all() for g, w in zip(got, want))


def test_rank_slices_follow_the_split_table(tiny_checkpoint):
    """Hand-checked against spec §5.3: rows of wq_b / wo_a / indexer wq_b / attn_sink / embed / head, columns of
    wo_b, whole routed experts per expert shard, everything else replicated."""
    reader = CheckpointReader(tiny_checkpoint)
    full = load_checkpoint_model(reader, Numerics.plain())
    part = load_checkpoint_model(reader, Numerics.plain(), shard=Shard(rank=1, tensor=2, expert=2, data=1))
    mine = Shard.for_rank(reader.config, 1, SimpleNamespace(tensor=2, expert=2, data=1))
    f, p = dict(full.named_buffers()), dict(part.named_buffers())
    cfg = full.cfg
    hd = cfg.head_dim
    assert torch.equal(p["layers.1.attn.wq_b.weight"], f["layers.1.attn.wq_b.weight"][2 * hd:])  # heads 2, 3
    assert torch.equal(p["layers.1.attn.attn_sink"], f["layers.1.attn.attn_sink"][2:])
    assert torch.equal(p["layers.1.attn.wo_a.weight"], f["layers.1.attn.wo_a.weight"][cfg.o_lora_rank:])  # group 1
    assert torch.equal(p["layers.1.attn.wo_b.weight"], f["layers.1.attn.wo_b.weight"][:, cfg.o_lora_rank:])
    # tiny's wo_b input per rank (1 group x 64) is half an activation-quant block: the layout keeps wo_b whole
    assert not mine.split_wo_b
    whole = load_checkpoint_model(reader, Numerics.plain(), shard=mine)
    assert torch.equal(dict(whole.named_buffers())["layers.1.attn.wo_b.weight"], f["layers.1.attn.wo_b.weight"])
    assert torch.equal(p["layers.1.attn.indexer.weights_proj.weight"], f["layers.1.attn.indexer.weights_proj.weight"][2:])
    assert torch.equal(p["embed"], f["embed"][cfg.vocab_size // 2:])
    assert torch.equal(p["head"], f["head"][cfg.vocab_size // 2:])
    half = cfg.n_routed_experts // 2
    assert torch.equal(p["layers.2.ffn.experts.w1"], f["layers.2.ffn.experts.w1"][half:])
    for name in ("layers.1.attn.wq_a.weight", "layers.1.attn.wkv.weight", "layers.2.ffn.shared_experts.w2.weight",
                 "layers.2.ffn.gate.weight", "layers.1.attn.compressor.wkv.weight", "layers.0.hc_attn_fn"):
        assert torch.equal(p[name], f[name]), name
    # wo_b [256, 128] split by columns into 64-wide halves: both inside one 128-column scale block
    assert torch.equal(p["layers.1.attn.wo_b.scale"], f["layers.1.attn.wo_b.scale"])


def test_block_rule():
    assert block_slice(512, range(256, 512), 128) == slice(2, 4)  # whole blocks
    assert block_slice(128, range(64, 128), 128) == slice(0, 1)  # inside one block: its scale
    with pytest.raises(ValueError, match="straddle"):
        block_slice(3072, range(192, 384), 128)
    pro = preset("v4-pro")
    assert straddling_shards(pro, 8) == []
    odd = pro.replace(o_lora_rank=96 * 16 // 16, o_groups=16)  # wo_a rows 16*96 = 1536: 1536 / 16 = 96 per rank
    assert any("attn.wo_a" in p and "96" in p for p in straddling_shards(odd, 16)), straddling_shards(odd, 16)




def _weight_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if not n.endswith("freqs"))


@pytest.mark.parametrize("layout, most", [({"tensor": 1, "expert": 2, "data": 2}, 0.55),
                                          ({"tensor": 8, "expert": 8, "data": 1}, 0.16)])
def test_rank_holds_its_share_of_flash(layout, most):
    """On V4-Flash's shapes (meta tensors: sizes only; the tiny model is no measure: its experts are 16 % of its
    bytes, so at EP 2 a rank holds 87 %) a rank holds its share: the routed experts are ~95 % of the
    weights, so at expert parallel 2 the largest rank holds about half, at 8 x 8 about an eighth plus what
    DeepSeek replicates (wq_a, wkv, compressors, gate, shared expert, hc, norms)."""
    from dsv4c.graphs.model import DeepseekV4

    cfg = preset("v4-flash")
    with torch.device("meta"):
        whole = _weight_bytes(DeepseekV4(cfg))
        world = layout["tensor"] * layout["data"]
        largest = max(_weight_bytes(DeepseekV4(cfg, shard=Shard.for_rank(cfg, r, SimpleNamespace(**layout))))
                      for r in range(world))
    assert largest <= most * whole, largest / whole


def test_build_refuses_a_mesh_the_shapes_cannot_take_before_reading_weights(tmp_path):
    """pro-h200's pipeline 2 is refused by the build's own plan stage (exit 3, nothing written), before its
    checkpoint (absent here) is looked at."""
    from tests.conftest import ROOT, dsv4c_cli

    out = tmp_path / "out"
    r = dsv4c_cli("build", str(ROOT / "recipes" / "pro-h200.yaml"), "-o", str(out), cache=tmp_path / "cache")
    assert r.returncode == 3, r.stderr
    assert "pipeline" in r.stderr and "--set 'target.parallel=" in r.stderr
    assert not out.exists() and not (tmp_path / "cache" / "load").exists()
