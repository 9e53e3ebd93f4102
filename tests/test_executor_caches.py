"""The cache handles executors own (dsv4c.targets.base.Cache): the host one (ONNX Runtime CPU, emulation) and the
torch one (torch executor, TensorRT), on small made-up layouts; and the TensorRT executor's bindings, exercised
with torch CPU tensors: a step reads the cache's buffers and writes its spare ones, never a host copy.

The handles over a real engine are checked in test_tensorrt_torch_executor.py (torch) and by every test that runs
a CPU engine (host)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsv4c.artifact import ArtifactError
from dsv4c.targets.base import CacheSlot, HostCache, cache_slots
from dsv4c.targets.tensorrt.device_cache import TorchCache
from dsv4c.targets.tensorrt.executor import step_bindings

SLOTS = [CacheSlot("layers.0.kv", (4, 3), 0.0), CacheSlot("layers.0.idx", (2,), float("-inf"))]


def host_cache(batch: int) -> HostCache:
    return HostCache(SLOTS, batch)


def torch_cache(batch: int) -> TorchCache:
    return TorchCache(SLOTS, batch, "cpu")


def numbered(batch: int) -> list[np.ndarray]:
    """Distinct values in every row, so a row copied to the wrong place shows."""
    return [np.arange(batch * int(np.prod(s.shape)), dtype=np.float32).reshape(batch, *s.shape) + 100 * i
            for i, s in enumerate(SLOTS)]


def test_manifest_dtype_is_allocated_and_defaults_to_float32():
    engine = {"cache": [{"name": "a", "shape": [2], "fill": 0.0},
                        {"name": "b", "shape": [3], "fill": "-Infinity", "dtype": "float16"}]}
    slots = cache_slots(engine)
    assert [s.dtype for s in slots] == ["float32", "float16"]  # a manifest written before dtype: float32
    assert [a.dtype for a in HostCache(slots, 2).arrays] == [np.float32, np.float16]
    assert [t.dtype for t in TorchCache(slots, 2, "cpu").tensors] == [torch.float32, torch.float16]
    assert np.isneginf(HostCache(slots, 1).arrays[1]).all()


@pytest.mark.parametrize("make", [host_cache, torch_cache], ids=["host", "torch"])
def test_reset_take_put_move_whole_sequences(make):
    cache = make(3)
    assert [a.shape for a in cache.to_host()] == [(3, 4, 3), (3, 2)]
    values = numbered(3)
    cache.from_host(values)
    part = cache.take(np.array([2, 0]))
    assert part.batch_size == 2
    assert all(np.array_equal(p, v[[2, 0]]) for p, v in zip(part.to_host(), values))
    part.from_host([-v[[2, 0]] for v in values])  # the part is a copy: the whole is untouched until put
    assert all(np.array_equal(h, v) for h, v in zip(cache.to_host(), values))
    cache.put(np.array([2, 0]), part)
    cache.reset(1)
    want = [-v for v in values]
    for w, s in zip(want, SLOTS):
        w[1] = s.fill
    assert all(np.array_equal(h, w) for h, w in zip(cache.to_host(), want))


@pytest.mark.parametrize("make", [host_cache, torch_cache], ids=["host", "torch"])
def test_to_host_is_a_copy_and_from_host_checks_shapes(make):
    cache = make(2)
    copy = cache.to_host()
    copy[0][:] = 7.0
    assert (cache.to_host()[0] == 0.0).all()
    with pytest.raises(ValueError, match=r"from_host: cache arrays of shapes \[\(1, 4, 3\), \(1, 2\)\]"):
        cache.from_host(numbered(1))  # one sequence's caches for a batch of 2: would broadcast silently


def test_tensorrt_steps_bind_the_caches_own_buffers_and_swap_them():
    """Three steps of a stand-in engine (new cache = old cache + 1, which TensorRT would compute) through
    `step_bindings`: every cache address bound is one of the two sets the handle allocated, a step never writes
    the buffer it reads, and after the swaps the handle holds the third step's values."""
    cache = TorchCache(SLOTS, 2, "cpu", double_buffered=True)
    allocated = {t.data_ptr() for t in [*cache.tensors, *cache.spare]}
    assert len(allocated) == 2 * len(SLOTS)
    inputs, outputs = ["tokens", "start_pos", "n_valid", "kv", "idx"], ["logits", "new_kv", "new_idx"]
    cache.from_host(numbered(2))
    for _ in range(3):
        step = [torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                torch.ones(2, dtype=torch.int64)]
        bound = step_bindings(inputs, outputs, step, torch.empty(2, 8), cache)
        read, written = {bound[n].data_ptr() for n in inputs[3:]}, {bound[n].data_ptr() for n in outputs[1:]}
        assert read | written <= allocated and not read & written
        for old, new in zip(inputs[3:], outputs[1:]):
            bound[new].copy_(bound[old] + 1)
        cache.swap()
    assert all(np.array_equal(h, v + 3) for h, v in zip(cache.to_host(), numbered(2)))
    with pytest.raises(ArtifactError, match="the engine has 4 inputs and 3 outputs, the runtime binds 5 and 3"):
        step_bindings(inputs[:4], outputs, step, torch.empty(2, 8), cache)


# ---- which caches the CPU executor updates in place ---------------------------------------------------------
def cache_graph(readers: dict[str, list[str]]):
    """tokens, start_pos, n_valid and one cache per entry of `readers`; each cache's output is a CacheWrite of it,
    and the listed extra op types also read it (their outputs unused)."""
    from onnx import TensorProto, helper

    from dsv4c.graphs.ops.onnx import DOMAIN

    nodes, outputs = [], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, None) for n in ("tokens", "start_pos", "n_valid")]
    nodes.append(helper.make_node("Cast", ["tokens"], ["logits"], to=TensorProto.FLOAT))
    for name, extra in readers.items():
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        nodes.append(helper.make_node("CacheWrite", [name, "rows", "slots"], [f"{name}_new"], domain=DOMAIN))
        nodes += [helper.make_node(op, [name], [f"{name}_{op}_{k}"]) for k, op in enumerate(extra)]
        outputs.append(helper.make_tensor_value_info(f"{name}_new", TensorProto.FLOAT, None))
    return helper.make_graph(nodes, "g", inputs, outputs)


def test_in_place_only_where_the_cache_write_is_the_only_reader():
    from dsv4c.targets.cpu.executor import updated_in_place

    graph = cache_graph({"cmp": [], "win": ["Identity"], "idx": ["Shape"]})
    assert updated_in_place(graph) == [True, False, False]


def test_a_cache_passed_on_by_another_node_is_not_in_place():
    from onnx import helper

    from dsv4c.targets.cpu.executor import updated_in_place

    graph = cache_graph({"state": []})
    graph.node.append(helper.make_node("Identity", ["state"], ["state_copy"]))
    graph.output[1].name = "state_copy"  # the output is the input passed through, not its CacheWrite
    assert updated_in_place(graph) == [False]


def test_spare_buffers_swap_in():
    cache = host_cache(2)
    before = cache.arrays[0]
    spare = cache.spare(0)
    spare[...] = 7.0
    cache.swap(0)
    assert cache.arrays[0] is spare and np.all(cache.arrays[0] == 7.0)
    assert cache.spare(0) is before  # the old buffer is the next step's spare: two buffers in all
