"""The streamed build (dsv4c.graphs.streamed, compiler.export.weightless_model, write_onnx_program(weights=)):
the same values as a whole load of the checkpoint, with at most the budgeted blocks held."""

from __future__ import annotations

import onnx
import onnx.numpy_helper
import pytest
import torch

from dsv4c.compiler.export import export_program, program_weights, weightless_model
from dsv4c.graphs.cache import host_array
from dsv4c.graphs.checkpoint import CheckpointReader, write_synthetic_checkpoint
from dsv4c.graphs.config import preset
from dsv4c.graphs.model import Numerics, load_checkpoint_model
from dsv4c.graphs.ops.onnx import write_onnx_program
from dsv4c.graphs.parallel import Shard
from dsv4c.graphs.streamed import GLOBALS, streamed_model


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> CheckpointReader:
    path = tmp_path_factory.mktemp("tiny") / "checkpoint"
    write_synthetic_checkpoint(path, preset("tiny"), seed=3)
    return CheckpointReader(path)


def _steps(model, tokens: torch.Tensor, decode_steps: int):
    """A prefill and greedy decode steps: every logits row and every cache after each step."""
    b, s = tokens.shape
    cache = model.new_cache(b, 128)
    out = []
    with torch.no_grad():
        logits, cache = model(tokens, torch.zeros(b, dtype=torch.long), torch.full((b,), s), cache)
        out.append((logits, cache))
        for i in range(decode_steps):
            pos = torch.full((b,), s + i)
            logits, cache = model(logits.argmax(-1)[:, None], pos, torch.ones(b, dtype=torch.long), cache)
            out.append((logits, cache))
    return out


@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_a_streamed_model_computes_what_the_whole_model_computes(reader, budget):
    """Bit for bit, whether every block stays resident (1 GiB) or each is re-read on every use (budget 0); with
    budget 0 nothing but the globals and the block last run is held."""
    num = Numerics.reference()
    whole = load_checkpoint_model(reader, num, "fp4")
    streamed = streamed_model(reader, num, "fp4", budget=budget)
    tokens = torch.randint(2, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    steps = zip(_steps(whole, tokens, 3), _steps(streamed, tokens, 3))
    for (want_logits, want_cache), (got_logits, got_cache) in steps:
        assert torch.equal(want_logits, got_logits)
        assert all((host_array(a) == host_array(b)).all() for a, b in zip(want_cache, got_cache))
    w = streamed.streamed
    layers = reader.config.num_hidden_layers
    if budget == 0:  # the globals once, then every main layer on each of the 4 forwards
        assert w.reads == 1 + 4 * layers
        assert set(w.held) == {GLOBALS, f"layers.{layers - 1}"}
    else:
        assert w.reads == 1 + layers


def test_a_released_model_reads_its_weights_again_when_it_next_runs(reader):
    """`release` (the validation's, before it loads the engine) gives back the globals too; the next forward reads
    what it needs again and computes the same logits."""
    streamed = streamed_model(reader, Numerics.reference(), "fp4", budget=0)
    tokens = torch.randint(2, 1000, (1, 12), generator=torch.Generator().manual_seed(1))
    before = _steps(streamed, tokens, 1)
    streamed.streamed.release()
    assert not streamed.streamed.held and streamed.embed.is_meta
    after = _steps(streamed, tokens, 1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(before, after))


def test_each_buffer_is_served_with_the_whole_loads_values(reader):
    whole = load_checkpoint_model(reader, Numerics.reference(), "fp8")  # the FP4 -> FP8 transcode too
    weights = streamed_model(reader, Numerics.reference(), "fp8", budget=0).streamed
    for name, want in whole.state_dict().items():
        got = weights.tensor(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name


def test_a_rank_streams_only_its_shard(reader):
    shard = Shard(rank=1, tensor=2, expert=2)
    whole = load_checkpoint_model(reader, Numerics.plain(), "fp4", shard)
    weights = streamed_model(reader, Numerics.plain(), "fp4", shard, budget=0).streamed
    for name, want in whole.state_dict().items():
        assert torch.equal(weights.tensor(name), want), name


def test_a_weightless_program_is_written_with_the_checkpoints_weights(reader, tmp_path):
    """The exported program holds meta tensors only; its ONNX file gets the values from the weights source, and
    without one (or with a tensor of another dtype) the write is refused, naming the tensor."""
    num = Numerics.reference()
    ep = export_program(weightless_model(reader.config, num, "fp4"), "decode", 2, 64)
    assert all(t.device.type == "meta" for t in ep.state_dict.values())
    with pytest.raises(ValueError, match=r"initializer 'model\.\S+' has no values .* no `weights` source"):
        write_onnx_program(ep, tmp_path / "none.onnx")
    wrong = lambda name: torch.zeros(1)  # noqa: E731
    with pytest.raises(ValueError, match=r"weights source gave 'model\.\S+' as torch.float32 \(1,\)"):
        write_onnx_program(ep, tmp_path / "wrong.onnx", weights=wrong)
    whole = load_checkpoint_model(reader, num, "fp4")
    write_onnx_program(ep, tmp_path / "decode.onnx", weights=program_weights(streamed_model(reader, num, "fp4")))
    model = onnx.load(tmp_path / "decode.onnx")
    want = {f"model.{k}": v for k, v in whole.state_dict().items()}
    checked = 0
    for init in model.graph.initializer:
        if init.name in want and want[init.name].dtype != torch.bfloat16:  # numpy has no bf16 to compare in
            assert (onnx.numpy_helper.to_array(init) == want[init.name].numpy()).all(), init.name
            checked += 1
    assert checked > 100
