"""The dsv4 C++ ONNX Runtime kernels (dsv4c/targets/cpu/kernels) against the torch references of registry.py.

Every case is a one-node ONNX model WITHOUT the op's function body, so ONNX Runtime can only run it with the
kernel library (checked once below: without the library such a model does not even load). Each case runs with
each instruction set's loops this CPU runs (DSV4C_KERNEL_ISA: amx, avx512bf16, avx2, generic), on 2 intra-op threads,
at sizes that reach every code path: 1-4 token rows (fused decode), 5-12 (fused, several passes), > 12 (tiled GEMM), ragged K,
odd head counts, -1 sentinels, repeated picks, exact score ties, several 64-pick attention blocks. Where the
registry rounds to bf16 (attention probabilities, indexer scores, Hadamard output) each test also shows that its
data tells the rounding apart: the reference without it (or with the blocks elsewhere) fails the same check.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from dsv4c.graphs import quant
from dsv4c.graphs.ops import OPS
from dsv4c.graphs.ops.onnx import (DOMAIN, DOMAIN_VERSION, ONNX_OPSET, attach_functions, attribute_kinds, output_names,
                                   register_schemas, tensor_inputs)
from dsv4c.targets.base import ToolchainMissing
from dsv4c.targets.cpu.kernels import CPP_KERNELS, build

from conftest import resident_pages
from tensors import (assert_outputs_match, attention_blocks, bf16_initializer, differences_within_a_bf16_step,
                     e4m3_value, feeds, fp8_weight, indexer_grid, rand, reference, split_rows)

register_schemas()
ops = torch.ops.dsv4
_ELEM = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.uint8): onnx.TensorProto.UINT8,
         np.dtype(np.int64): onnx.TensorProto.INT64}


@pytest.fixture(scope="module")
def library() -> str:
    try:
        return str(build.build_library())
    except ToolchainMissing as e:  # no C++ compiler or no ORT headers on this machine: nothing to test
        pytest.skip(f"dsv4 ORT kernel library cannot be built here: {e}")


@pytest.fixture(autouse=True)
def split_all_work(monkeypatch):
    """Small calls normally run on the calling thread; the tests' shapes are small, so force the task split."""
    monkeypatch.setenv("DSV4C_KERNEL_INLINE_WORK", "0")


ISAS = ["generic", "avx2", "avx512bf16", "amx"]  # each runs on a CPU that runs the next


@pytest.fixture(params=ISAS[::-1])
def isa(request, library, monkeypatch) -> str:
    """Which inner loops the kernels created next use (read at session creation): each one this CPU runs."""
    if ISAS.index(request.param) > ISAS.index(build.kernel_isa(library)):
        pytest.skip(f"this CPU cannot run the {request.param} loops")
    monkeypatch.setenv("DSV4C_KERNEL_ISA", request.param)
    return request.param


# ---- one-node models ----------------------------------------------------------------------------------------
def node_model(name: str, inputs: dict[str, torch.Tensor], attrs: dict, out_ranks: list[int],
               with_body: bool = False, constants: tuple[str, ...] = ()) -> onnx.ModelProto:
    """One dsv4 node, every dim dynamic; the op's function body only when asked. The bf16 inputs and those named
    in `constants` are initializers (as an engine holds its weights), the others graph inputs."""
    op = OPS[name]
    names = tensor_inputs(op)
    onnx_attrs = {n: int(attrs[n]) if k == "bool" else attrs[n] for n, k in attribute_kinds(op).items()}
    node = helper.make_node(op.onnx_name, names, list(output_names(op)), domain=DOMAIN, **onnx_attrs)
    held = [n for n in names if inputs[n].dtype == torch.bfloat16 or n in constants]
    graph_inputs = [helper.make_tensor_value_info(n, _ELEM[inputs[n].numpy().dtype], [None] * inputs[n].dim())
                    for n in names if n not in held]
    weights = [bf16_initializer(n, inputs[n]) if inputs[n].dtype == torch.bfloat16
               else onnx.numpy_helper.from_array(inputs[n].numpy(), n) for n in held]
    dtype = op.output_dtypes[0]
    if dtype == "like:cache" and inputs["cache"].dtype == torch.uint8:  # a packed cache: bytes out
        dtype = "uint8"
    out_type = {"int64": onnx.TensorProto.INT64, "uint8": onnx.TensorProto.UINT8}.get(dtype, onnx.TensorProto.FLOAT)
    outputs = [helper.make_tensor_value_info(n, out_type, [None] * r) for n, r in zip(output_names(op), out_ranks)]
    opsets = [helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
    model = helper.make_model(helper.make_graph([node], name, graph_inputs, outputs, weights), ir_version=10,
                              opset_imports=opsets)
    return attach_functions(model) if with_body else model


def session(model: onnx.ModelProto, library: str | None, threads: int = 2, profile: str | None = None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if library:
        options.register_custom_ops_library(library)
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_kernel(library: str, name: str, attrs: dict, out_ranks: list[int], threads: int = 2,
               **inputs: torch.Tensor) -> list[np.ndarray]:
    s = session(node_model(name, inputs, attrs, out_ranks), library, threads)
    return s.run(None, feeds(inputs))


def check(library: str, name: str, attrs: dict, *, exact: bool = False, threads: int = 2,
          **inputs: torch.Tensor) -> list[np.ndarray]:
    """Kernel vs torch: bit-exact, or max |diff| <= 1e-5 * max |reference| per output."""
    want = reference(name, attrs, **inputs)
    got = run_kernel(library, name, attrs, [w.ndim for w in want], threads, **inputs)
    assert_outputs_match(got, want, exact)
    return got


# ---- the library is what runs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fp8_linear", "hc_post"])
def test_round_bf16_out_rounds_the_output_as_a_cast_pair_would(library, name):
    """The CPU build folds `op -> Cast(bf16) -> Cast(float)` into the op (dsv4c.targets.cpu.passes): with
    round_bf16_out=1 the kernel's output is its plain output rounded to bf16 (torch's round to nearest even), bit
    for bit."""
    if name == "fp8_linear":
        w, s = fp8_weight(200, 384, seed=2)
        inputs, attrs = dict(x=rand(5, 384, seed=3), w=w, w_scale=s), {"act_quant": True}
    else:
        b, t, n, d = 2, 3, 4, 64
        inputs = dict(f=rand(b, t, d, seed=1), res=rand(b, t, n, d, seed=2), post=rand(b, t, n, seed=3),
                      comb=rand(b, t, n, n, seed=4))
        attrs = {}
    plain = check(library, name, attrs, **inputs)[0]  # the kernel without the attribute: the reference's values
    model = node_model(name, inputs, attrs, [plain.ndim])
    model.graph.node[0].attribute.append(helper.make_attribute("round_bf16_out", 1))
    got = session(model, library).run(None, feeds(inputs))[0]
    rounded = torch.from_numpy(plain).to(torch.bfloat16).float().numpy()
    assert not np.array_equal(rounded, plain)  # the rounding shows
    assert np.array_equal(got, rounded)


def test_round_bf16_out_refuses_an_op_whose_output_is_not_float(library):
    """CacheWrite writes its output as bytes (the cache's own type): a rounding asked of it is an error, not a
    bf16 pass over bytes."""
    packed = dict(cache=torch.zeros(1, 4, 8, dtype=torch.uint8), rows=torch.ones(1, 2, 8, dtype=torch.uint8),
                  slots=torch.tensor([[0, 3]]))
    model = node_model("cache_write", packed, {}, [3])
    model.graph.node[0].attribute.append(helper.make_attribute("round_bf16_out", 1))
    with pytest.raises(Exception, match="round_bf16_out needs a float output"):
        session(model, library).run(None, feeds(packed))


def test_models_without_function_bodies_need_the_library(library):
    w, s = fp8_weight(16, 128)
    model = node_model("fp8_linear", {"x": rand(1, 128), "w": w, "w_scale": s}, {"act_quant": False}, [2])
    with pytest.raises(Exception, match="not a registered function/op"):
        session(model, None)
    session(model, library)  # loads with it


def test_kernel_preferred_over_function_body(library, tmp_path):
    """A node that carries its function body too runs as ONE node when the library is registered (ORT's
    profile lists the executed nodes), and as the body's inlined standard ops without it."""
    w, s = fp8_weight(64, 128)
    inputs = {"x": rand(2, 128), "w": w, "w_scale": s}
    model = node_model("fp8_linear", inputs, {"act_quant": True}, [2], with_body=True)
    executed = {}
    for label, lib in (("library", library), ("body", None)):
        sess = session(model, lib, profile=str(tmp_path / label))
        sess.run(None, feeds(inputs))
        events = json.loads(open(sess.end_profiling()).read())
        executed[label] = {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e["args"]}
    assert executed["library"] == {"Fp8Linear"}
    assert "Fp8Linear" not in executed["body"] and "Gather" in executed["body"] and len(executed["body"]) > 5


def test_library_build_is_cached_and_reports_its_isa(library):
    assert build.library_path() == build.build_library() == type(build.build_library())(library)
    assert build.kernel_isa(library) in ISAS


def test_missing_toolchain_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-dsv4c")
    with pytest.raises(ToolchainMissing, match="no-such-compiler-dsv4c"):
        build.build_library(tmp_path)
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("DSV4C_ORT_INCLUDE", str(tmp_path))
    with pytest.raises(ToolchainMissing, match="onnxruntime_c_api.h"):
        build.build_library(tmp_path)


# ---- linears ----------------------------------------------------------------------------------------------------
def test_fp8_decode_every_byte(library, isa):
    """x = I reads the decoded weight back exactly, fused (1 row) and tiled (16 rows) paths; the NaN codes
    0x7f / 0xff are left out (quantised weights never hold them; the vector decoder reads them as +-480)."""
    w = torch.arange(256, dtype=torch.uint8).view(16, 16)
    w[w & 0x7F == 0x7F] = 0
    scale = torch.full((1, 1), 2.0 ** -3)
    want = w.view(torch.float8_e4m3fn).float().numpy() * 2.0 ** -3
    got = run_kernel(library, "fp8_linear", {"act_quant": False}, [2], x=torch.eye(16), w=w, w_scale=scale)[0]
    np.testing.assert_array_equal(got.T, want)
    for j in (0, 5, 15):  # one row at a time: the fused path
        row = run_kernel(library, "fp8_linear", {"act_quant": False}, [2], x=torch.eye(16)[j:j + 1], w=w,
                         w_scale=scale)[0]
        np.testing.assert_array_equal(row[0], want[:, j])


def test_bf16_linear_reads_the_stored_weight_exactly(library, isa):
    """x = I reads the widened bf16 weight back bit for bit (the tiled path with 20 rows, the fused one a row at
    a time): random bit patterns, subnormals and signed zeros; K = 20 has an 8-wide vector part and a scalar tail.
    The AMX tiles read subnormals as 0 (documented in kernels_impl.h), the one difference.
    Infinities and NaNs are left out (0 * inf in the other columns' products would be NaN)."""
    bits = torch.randint(0, 1 << 16, (16, 20), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    bits[(bits & 0x7F80) == 0x7F80] = 0
    bits[0, :4] = torch.tensor([0x0001, 0x8000, 0x807F, 0x3F80])  # smallest subnormal, -0, -subnormal, 1.0
    w = bits.to(torch.int16).view(torch.bfloat16)
    want = w.float().numpy()
    # AMX (like vdpbf16ps) reads bf16 subnormals as 0: the 20 bf16-valued rows of I take its tiles
    flushed = np.where(np.abs(want) < np.finfo(np.float32).tiny, 0.0, want) if isa == "amx" else want
    np.testing.assert_array_equal(run_kernel(library, "bf16_linear", {}, [2], x=torch.eye(20), w=w)[0].T, flushed)
    for j in (0, 9, 19):
        row = run_kernel(library, "bf16_linear", {}, [2], x=torch.eye(20)[j:j + 1], w=w)[0]
        np.testing.assert_array_equal(row[0], want[:, j])


@pytest.mark.parametrize("rows", [5, 8])
def test_bf16_linear_of_5_to_8_rows_reads_every_weight_exactly(library, isa, rows):
    """5-8 rows of x = I (K = 48: three 16-wide chunks, the first read by a shift, the others by a mask on the
    load one weight earlier) read each column of W back bit for bit: an even or odd weight taken from the wrong
    place, or x's even / odd reordering wrong, puts another weight in its column. Random bit patterns with
    subnormals and signed zeros; 7 weight rows (groups of 3, then a single row). AMX reads subnormals as 0."""
    bits = torch.randint(0, 1 << 16, (7, 48), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    bits[(bits & 0x7F80) == 0x7F80] = 0
    bits[0, :4] = torch.tensor([0x0001, 0x8000, 0x807F, 0x3F80])
    w = bits.to(torch.int16).view(torch.bfloat16)
    want = w.float().numpy()
    if isa == "amx":
        want = np.where(np.abs(want) < np.finfo(np.float32).tiny, 0.0, want)
    for j0 in range(0, 48, rows):
        x = torch.eye(48)[j0:j0 + rows]
        got = run_kernel(library, "bf16_linear", {}, [2], x=x, w=w)[0]
        np.testing.assert_array_equal(got, want[:, j0:j0 + len(x)].T, err_msg=f"columns {j0}..")


def test_cache_write(library):
    """The hand-written case of tests/test_onnx_ops.py, then a larger cache against the reference."""
    from test_onnx_ops import cache_write_case

    inputs, want = cache_write_case()
    np.testing.assert_array_equal(check(library, "cache_write", {}, exact=True, **inputs)[0], want)
    slots = torch.tensor([[7, 0, -1, 1023], [3, 4, 5, -1], [-1, -1, -1, -1]])
    check(library, "cache_write", {}, exact=True, cache=rand(3, 1024, 64, seed=1), rows=rand(3, 4, 64, seed=2),
          slots=slots)


def test_cache_write_in_place(library):
    """The CPU executor binds an in-place cache's output to its input buffer: the kernel then writes only the
    listed rows into that buffer (the hand-written case again, and the buffer is the one that was passed)."""
    from test_onnx_ops import cache_write_case

    inputs, want = cache_write_case()
    s = session(node_model("cache_write", inputs, {}, [3]), library)
    buffer = inputs["cache"].numpy().copy()
    io = s.io_binding()
    io.bind_input("cache", "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
    for name in ("rows", "slots"):
        io.bind_cpu_input(name, inputs[name].numpy())
    io.bind_output("y", "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
    s.run_with_iobinding(io)
    np.testing.assert_array_equal(buffer, want)


@pytest.mark.parametrize("d", [40, 64, 23])  # 16-wide loads with a tail, without, and scalar only
def test_sparse_attn_reads_bf16_cache_rows_as_their_values(library, isa, d):
    """kv held as bf16 (the engine's cache rows under the reference numerics): the kernel widens each row exactly,
    so it gives bit for bit what it gives on the same values in float32 (with and without the bf16 rounding of
    P), and matches the reference (compared unrounded: a rounding flip is not what this test is about)."""
    inputs = attention_blocks(d=d)
    stored = {**inputs, "kv": inputs["kv"].to(torch.bfloat16), "cmp": inputs["cmp"].to(torch.bfloat16)}
    for rounding in (False, True):
        attrs = {"kv_rope": 0, "scale": d ** -0.5, "bf16": rounding}
        if rounding:
            got = run_kernel(library, "sparse_attn", attrs, [4], **stored)[0]
        else:
            got = check(library, "sparse_attn", attrs, **stored)[0]
        as_float = run_kernel(library, "sparse_attn", attrs, [4], **{**stored, "kv": stored["kv"].float(),
                                                                      "cmp": stored["cmp"].float()})[0]
        np.testing.assert_array_equal(got, as_float)


@pytest.mark.parametrize("h", [4, 5])  # one group of 4 heads (a row's 4 logits reduced together), then 4 + 1
def test_sparse_attn_of_bf16_q_against_bf16_rows(library, isa, h):
    """q and the rows bf16 numbers, d a multiple of 64 (the engine's decode under the reference numerics): on CPUs
    with AVX512-BF16 and no AMX the logits are pair dot products. The result matches the reference op, and the
    float32 rows' FMA loops up to the order of the fp32 sums."""
    inputs = attention_blocks(h=h, d=128)
    bf16 = {**inputs, "q": inputs["q"].bfloat16().float(), "kv": inputs["kv"].bfloat16(),
            "cmp": inputs["cmp"].bfloat16()}
    attrs = {"kv_rope": 0, "scale": 128 ** -0.5, "bf16": False}
    got = check(library, "sparse_attn", attrs, **bf16)[0]
    as_float = run_kernel(library, "sparse_attn", attrs, [4], **{**bf16, "kv": bf16["kv"].float(),
                                                                  "cmp": bf16["cmp"].float()})[0]
    np.testing.assert_allclose(got, as_float, rtol=0, atol=1e-5 * np.abs(as_float).max())


@pytest.mark.parametrize("name", ["indexer_topk", "indexer_scores"])
def test_indexer_reads_bf16_keys_as_their_values(library, isa, name):
    """Indexer keys held as bf16: the scores are bit for bit those of the same keys in float32 (picks exact)."""
    inputs = indexer_grid()  # integer keys: bf16-exact
    attrs = {"topk": 24, "bf16": True} if name == "indexer_topk" else {"bf16": True}
    if name == "indexer_scores":
        inputs.pop("n_visible")
    stored = {**inputs, "k": inputs["k"].to(torch.bfloat16)}
    got = check(library, name, attrs, exact=True, **stored)[0]
    as_float = run_kernel(library, name, attrs, [3], **{**stored, "k": stored["k"].float()})[0]
    np.testing.assert_array_equal(got, as_float)


def test_cache_write_bf16_cache(library):
    """A bf16 cache written with bf16 rows (the hand-written case in bf16: every value exact), copied and in place;
    the output is typed like the cache."""
    from test_onnx_ops import cache_write_case

    inputs, want = cache_write_case()
    bits = {n: inputs[n].to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16) for n in ("cache", "rows")}
    model = node_model("cache_write", {**inputs, "cache": inputs["cache"][:0].float(), "rows": inputs["rows"][:0]},
                       {}, [3])
    for value in (*model.graph.input[:2], model.graph.output[0]):
        value.type.tensor_type.elem_type = onnx.TensorProto.BFLOAT16
    s = session(model, library)
    for in_place in (False, True):
        cache = bits["cache"].copy()
        out = cache if in_place else np.empty_like(cache)
        io = s.io_binding()
        for name, array in (("cache", cache), ("rows", bits["rows"])):
            io.bind_input(name, "cpu", 0, onnx.TensorProto.BFLOAT16, list(array.shape), array.ctypes.data)
        io.bind_cpu_input("slots", inputs["slots"].numpy())
        io.bind_output("y", "cpu", 0, onnx.TensorProto.BFLOAT16, list(out.shape), out.ctypes.data)
        s.run_with_iobinding(io)
        got = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rows", [1, 3, 6, 17])
def test_bf16_linear(library, isa, rows):
    x, w = rand(2, rows, 200, seed=5), rand(70, 200, seed=4).to(torch.bfloat16)
    got = check(library, "bf16_linear", {}, x=x, w=w)[0]
    exact = (x.double() @ w.double().T).numpy()  # fp32 summation: within 1e-5 of the largest output
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("rows", [1, 2, 3, 6, 8, 9, 40, 70])
@pytest.mark.parametrize("k", [320, 203])
def test_bf16_linear_of_bf16_valued_rows(library, isa, rows, k):
    """x rows that are bf16 numbers (as the model's rounded activations): the AVX-512 BF16 loops' pair dot
    products, up to 8 rows in one pass (9: the tiled loops), K = 320 (two 128-wide steps and a 64-wide tail);
    the AMX tiles from 5 rows: 1 to 5 blocks of 16 rows (a partial one), K = 203 padded to whole 32-wide steps
    (and an odd last pair), 70 weight rows (a partial block of 16). The products are exact, so only the fp32
    summation order differs from float64."""
    x, w = rand(rows, k, seed=6).to(torch.bfloat16).float(), rand(70, k, seed=7).to(torch.bfloat16)
    got = check(library, "bf16_linear", {}, x=x, w=w)[0]
    exact = (x.double() @ w.double().T).numpy()
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("rows", [2, 6])
def test_bf16_linear_of_rows_with_one_value_that_is_not_bf16(library, isa, rows):
    """Rows of bf16 numbers but for the last of K = 203 values (in the scalar tail of the checks' 16-wide
    loops): the BF16 units' loops would truncate it, so every table must take the float loops for them."""
    x, w = rand(rows, 203, seed=6).to(torch.bfloat16).float(), rand(70, 203, seed=7).to(torch.bfloat16)
    x[:, -1] = 1 + 2 ** -12
    got = check(library, "bf16_linear", {}, x=x, w=w)[0]
    exact = (x.double() @ w.double().T).numpy()
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 6, 17])  # fused 1 / 3 rows, fused 4 + 2, tiled GEMM
def test_fp8_linear(library, isa, act_quant, rows):
    w, s = fp8_weight(200, 384, seed=2)  # N = 200: the last 128-row scale block is cropped
    check(library, "fp8_linear", {"act_quant": act_quant}, x=rand(rows, 384, seed=3), w=w, w_scale=s)


@pytest.mark.parametrize("name", ["fp8_linear", "moe_experts"])
def test_weights_held_as_initializers_give_the_same_results_run_after_run(library, isa, name):
    """Engines hold their weights as initializers, which the kernels read once, when ORT creates them (type, shape
    and data stay for the session's life). One session, three runs whose token counts differ: each matches the
    reference, as when the weights are fed as inputs."""
    if name == "fp8_linear":
        w, s = fp8_weight(200, 384, seed=2)
        runs = [dict(x=rand(t, 384, seed=t), w=w, w_scale=s) for t in (1, 17, 3)]
        attrs, constants = {"act_quant": True}, ("w", "w_scale")
    else:
        runs = [moe_inputs(2, t) for t in (6, 1, 48)]
        attrs, constants = {"fmt": 2, "swiglu_limit": 0.5, "act_quant": False, "bf16": False}, \
            ("w1", "s1", "w3", "s3", "w2", "s2")
    s = session(node_model(name, runs[0], attrs, [2], constants=constants), library)
    for inputs in runs:
        want = reference(name, attrs, **inputs)
        got = s.run(None, {n: v for n, v in feeds(inputs).items() if n not in constants})
        assert_outputs_match(got, want, exact=False)


@pytest.mark.parametrize("rows", [6, 20])
def test_fp8_linear_with_scales_that_are_not_powers_of_two(library, isa, rows):
    """act_quant rows are bf16 values, but weights times 1.3-like scales are not: the AMX tiles, which multiply
    bf16 numbers only, must leave such a weight to the float loops (their result, not a rounded one)."""
    w, s = fp8_weight(200, 384, seed=8)
    s = s * torch.linspace(1.1, 1.7, s.numel()).reshape(s.shape)
    check(library, "fp8_linear", {"act_quant": True}, x=rand(rows, 384, seed=9), w=w, w_scale=s)


@pytest.mark.parametrize("rows", [1, 2, 6, 8, 200])  # the float loops, then the AMX tiles (5+ bf16-valued rows)
@pytest.mark.parametrize("k", [200, 192])
def test_fp8_linear_reads_every_e4m3_code_exactly(library, isa, rows, k):
    """x = rows of the identity picks single weights: y[r, j] = e4m3(w[j, r]) * scale, exactly, for every code
    (subnormals and -0 included) under power-of-two block scales from 2^-10 to 2^4 (tensors.e4m3_value, the
    format's definition, gives the expected values). K = 200: a partial 128-wide block and a scalar tail; K = 192
    (a multiple of 64): the bf16 pair-dot path of CPUs with AVX512-BF16 and no AMX, up to 8 rows."""
    n = 256
    codes = (torch.arange(n)[:, None] + torch.arange(k)[None, :]) % 256
    codes[(codes == 0x7F) | (codes == 0xFF)] = 0  # the NaN codes: not weights
    scale = torch.tensor([[2.0 ** -3, 2.0 ** 4], [2.0 ** -10, 1.0]])
    values = torch.tensor([e4m3_value(c) for c in range(256)], dtype=torch.float64)[codes]
    want = (values * scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]).T[:rows]
    x = torch.eye(k)[:rows]
    got = run_kernel(library, "fp8_linear", {"act_quant": False}, [2], x=x, w=codes.to(torch.uint8), w_scale=scale)[0]
    np.testing.assert_array_equal(got, want.float().numpy())


@pytest.mark.parametrize("rows", [1, 2, 20])
def test_fp8_linear_ragged_k(library, isa, rows):
    w, s = fp8_weight(70, 200, seed=4)  # K = 200: a partial 128-block, a 16-wide and a scalar tail
    check(library, "fp8_linear", {"act_quant": False}, x=rand(2, rows, 200, seed=5), w=w, w_scale=s)


def test_fp8_linear_one_thread_inline_and_empty_batch(library, monkeypatch):
    w, s = fp8_weight(64, 128, seed=6)
    check(library, "fp8_linear", {"act_quant": True}, threads=1, x=rand(3, 128, seed=7), w=w, w_scale=s)
    monkeypatch.delenv("DSV4C_KERNEL_INLINE_WORK")  # the default: this small call runs on the calling thread
    check(library, "fp8_linear", {"act_quant": True}, x=rand(3, 128, seed=7), w=w, w_scale=s)
    assert run_kernel(library, "fp8_linear", {"act_quant": False}, [3], x=torch.zeros(0, 4, 128), w=w,
                      w_scale=s)[0].shape == (0, 4, 64)


@pytest.mark.parametrize("act_quant", [False, True])
@pytest.mark.parametrize("batch", [(1, 1), (2, 3), (4, 5)])
def test_fp8_grouped_linear(library, isa, act_quant, batch):
    w, s = fp8_weight(4 * 48, 128, seed=6)  # G = 4 groups of R = 48 rows: groups straddle 128-row scale blocks
    check(library, "fp8_grouped_linear", {"act_quant": act_quant}, x=rand(*batch, 4, 128, seed=7), w=w, w_scale=s)


# ---- e8m0 scales: the checkpoint's scale bytes, as the CPU build stores them ----------------------------------
def _e8m0_case(name: str, rows: int) -> tuple[dict[str, torch.Tensor], dict, tuple[str, ...]]:
    if name == "fp8_linear":
        w, s = fp8_weight(200, 384, seed=2)
        s[0, :], s[1, 2] = 2.0 ** -127, 2.0 ** 20  # e8m0 codes 0 (a float32 subnormal: outputs 0-127 tiny) and 147
        return dict(x=rand(rows, 384, seed=3), w=w, w_scale=s), {"act_quant": True}, ("w_scale",)
    if name == "fp8_grouped_linear":
        w, s = fp8_weight(4 * 48, 128, seed=6)
        return dict(x=rand(rows, 4, 128, seed=7), w=w, w_scale=s), {"act_quant": False}, ("w_scale",)
    fmt = 0 if name == "moe_experts_fp4" else 1
    inputs = dict(moe_inputs(fmt, tokens=rows, coarse=True))
    return inputs, {"fmt": fmt, "swiglu_limit": 0.5, "act_quant": True, "bf16": True}, ("s1", "s3", "s2")


@pytest.mark.parametrize("name", ["fp8_linear", "fp8_grouped_linear", "moe_experts_fp4", "moe_experts_fp8"])
@pytest.mark.parametrize("rows", [1, 6, 24])  # fused loops, AMX tiles / pair dots, tiled
def test_e8m0_scales_read_as_the_float_scales_they_encode(library, isa, name, rows):
    """Scales given as e8m0 bytes (quant.float_to_e8m0 of the float scales) give bit for bit the result of the
    float scales, which is the torch reference's to float rounding; held as initializers, as the engine holds
    them."""
    inputs, attrs, scales = _e8m0_case(name, rows)
    op = "moe_experts" if name.startswith("moe") else name
    as_float = check(library, op, attrs, **inputs)[0]
    coded = {**inputs, **{n: quant.float_to_e8m0(inputs[n]).view(torch.uint8) for n in scales}}
    model = node_model(op, coded, attrs, [as_float.ndim], constants=scales)
    got = session(model, library).run(None, {n: v for n, v in feeds(coded).items() if n not in scales})[0]
    np.testing.assert_array_equal(got, as_float)


def test_scale_bytes_rewritten_between_runs_are_read_anew(library, isa):
    """The kernel widens an FP8 block's scale bytes once for the block's rows, within one call: a later call that
    finds other bytes at the same address (an input array rewritten in place) must read those. One more in every
    exponent byte doubles every output, exactly. (One block of rows, one thread: the second call starts on the
    bytes the first ended on.)"""
    w, s = fp8_weight(100, 384, seed=2)
    codes = quant.float_to_e8m0(s).view(torch.uint8).numpy().copy()
    x = rand(1, 384, seed=3)
    sess = session(node_model("fp8_linear", dict(x=x, w=w, w_scale=torch.from_numpy(codes)), {"act_quant": True}, [2]),
                   library, threads=1)
    io = sess.io_binding()
    io.bind_cpu_input("x", x.numpy())
    io.bind_cpu_input("w", w.numpy())
    io.bind_cpu_input("w_scale", codes)  # bound: the kernel reads this very array
    io.bind_output("y", "cpu")
    sess.run_with_iobinding(io)
    first = io.copy_outputs_to_cpu()[0]
    codes += 1
    sess.run_with_iobinding(io)
    np.testing.assert_array_equal(io.copy_outputs_to_cpu()[0], 2 * first)


def test_scales_of_another_type_are_refused_naming_the_input(library):
    w, s = fp8_weight(64, 128)
    with pytest.raises(Exception, match="input 'w_scale' must be float32 or uint8 \\(e8m0\\) scales, got int64"):
        run_kernel(library, "fp8_linear", {"act_quant": False}, [2], x=rand(1, 128), w=w, w_scale=s.long())


# ---- routed experts ---------------------------------------------------------------------------------------------
def expert_stack(fmt: int, e: int, n: int, k: int, seed: int,
                 coarse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked expert weights [e, n, ...] in format fmt (0 FP4, 1 FP8, 2 float) and their scales. `coarse`
    weights have few bits, so that (with coarse x) every matmul before the first rounding is exact in fp32."""
    w = rand(e, n, k, seed=seed, scale=0.05)
    if coarse:
        w = (rand(e, n, k, seed=seed) * 3).round().clamp(-6, 6) / 64
    if fmt == 2:
        return w, torch.zeros(e, 1, 1)  # the reference indexes the scales even for float experts
    pack = quant.quantize_fp4 if fmt == 0 else quant.quantize_fp8_blocks
    ws, ss = zip(*(pack(m) for m in w))
    return torch.stack(ws).view(torch.uint8), quant.e8m0_to_float(torch.stack(ss))


@functools.lru_cache(maxsize=None)  # shared by the avx2 / generic runs (never mutated)
def moe_inputs(fmt: int, tokens: int = 6, coarse: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """3 picks per token over 5 experts, hidden 128, expert dim 256: the first six tokens hold repeated experts,
    -1 slots and a token without any expert; more tokens get random picks (busy experts take the tiled path)."""
    d, inter, e, k = 128, 256, 5, 3
    x = rand(tokens, d, seed=seed + 12)
    if coarse:
        x = (x * 16).round().clamp(-32, 32) / 16
    indices = torch.randint(-1, e, (tokens, k), generator=torch.Generator().manual_seed(seed))
    indices[:6] = torch.tensor([[0, 1, 2], [4, 4, 1], [3, -1, 0], [-1, -1, -1], [2, 2, 2], [1, 3, 4]])[:tokens]
    w1, s1 = expert_stack(fmt, e, inter, d, seed + 10, coarse)
    w3, s3 = expert_stack(fmt, e, inter, d, seed + 20, coarse)
    w2, s2 = expert_stack(fmt, e, d, inter, seed + 30, coarse)
    return dict(x=x, weights=rand(tokens, k, seed=seed + 11).abs(), indices=indices, w1=w1, s1=s1, w3=w3, s3=s3,
                w2=w2, s2=s2)


@functools.lru_cache(maxsize=None)
def moe_reference(fmt: int, tokens: int, coarse: bool, swiglu_limit: float, act_quant: bool, bf16: bool) -> np.ndarray:
    attrs = {"fmt": fmt, "swiglu_limit": swiglu_limit, "act_quant": act_quant, "bf16": bf16}
    return reference("moe_experts", attrs, **moe_inputs(fmt, tokens, coarse))[0]


@pytest.mark.parametrize("fmt", [0, 1, 2])
@pytest.mark.parametrize("tokens", [1, 6, 48])
def test_moe_experts(library, isa, fmt, tokens):
    limit = 0.5 if fmt else 0.0
    attrs = {"fmt": fmt, "swiglu_limit": limit, "act_quant": False, "bf16": False}
    want = moe_reference(fmt, tokens, False, limit, False, False)
    got = run_kernel(library, "moe_experts", attrs, [2], **moe_inputs(fmt, tokens))[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    if tokens > 3:
        assert not got[3].any()  # a token without experts gets zeros


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/self/status")
def test_large_scratch_is_kept_for_the_next_call_and_given_back_on_request(library):
    """A call's scratch blocks over 1 MiB (here the MoE picks of 4,096 tokens, ~40 MB) are kept for the next call
    (malloc's heap, which would otherwise serve them, fragments under blocks of changing sizes from two threads)
    and unmapped by dsv4_release_scratch, which the runtime calls after a prefill. The result stays the
    reference's."""
    import ctypes

    def rss_anon() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("RssAnon:"))

    attrs = {"fmt": 2, "swiglu_limit": 0.5, "act_quant": False, "bf16": False}
    inputs = moe_inputs(2, tokens=4096)
    s = session(node_model("moe_experts", inputs, attrs, [2]), library)
    release = ctypes.CDLL(library).dsv4_release_scratch
    release()
    got = s.run(None, feeds(inputs))
    assert_outputs_match(got, reference("moe_experts", attrs, **inputs), exact=False)
    before = rss_anon()
    release()
    assert before - rss_anon() > 30 << 20


@pytest.mark.skipif(not Path("/proc/self/pagemap").is_file(), reason="Linux only")
def test_weight_pages_in_registered_file_maps_are_given_back_after_the_node_that_read_them(library, tmp_path):
    """dsv4_drop_weight_pages(maps) (the build's validation): after each node, the pages of its constant inputs
    that lie in those read-only file maps leave the process's resident set; the page cache keeps them, and the
    next run reads them again and gets the reference's result. A weight outside the maps is left alone
    (MADV_DONTNEED would zero memory of ORT's own)."""
    import ctypes

    w, scale = fp8_weight(4096, 1024, seed=2)  # 4 MiB of e4m3: 1,024 pages
    file = tmp_path / "weights.bin"
    w.numpy().tofile(file)
    mapped = np.memmap(file, dtype=np.uint8, mode="r", shape=tuple(w.shape))
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    held = ort.OrtValue.ortvalue_from_numpy(mapped)  # ORT uses its memory as it is: kept alive here
    options.add_initializer("w", held)
    inputs = dict(x=rand(3, 1024, seed=3), w=w, w_scale=scale)
    model = node_model("fp8_linear", inputs, {"act_quant": True}, [2], constants=("w", "w_scale"))
    s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    want = reference("fp8_linear", {"act_quant": True}, **inputs)
    drop = ctypes.CDLL(library).dsv4_drop_weight_pages
    drop.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    starts, sizes = (ctypes.c_size_t * 1)(mapped.ctypes.data), (ctypes.c_size_t * 1)(mapped.nbytes)
    pages = mapped.nbytes // 4096
    try:
        assert_outputs_match(s.run(None, {"x": inputs["x"].numpy()}), want, exact=False)
        assert resident_pages(mapped) == pages  # read by the node, kept
        drop(starts, sizes, 1)
        assert resident_pages(mapped) == 0  # what earlier runs read goes at once
        for _ in range(2):
            assert_outputs_match(s.run(None, {"x": inputs["x"].numpy()}), want, exact=False)
            assert resident_pages(mapped) == 0
    finally:
        drop(None, None, 0)
    assert_outputs_match(s.run(None, {"x": inputs["x"].numpy()}), want, exact=False)
    assert resident_pages(mapped) == pages  # switched off: kept again


def test_moe_fp4_experts_with_scales_that_are_not_powers_of_two(library, isa):
    """bf16-valued x rows with 5-8 picks per expert, FP4 scales times 1.1-1.7: the AMX tiles' direct e2m1 -> bf16
    decode (the scale added to the exponent) must leave such a block to the float decode."""
    inputs = dict(moe_inputs(0, tokens=12, coarse=True))
    for name in ("s1", "s3", "s2"):
        inputs[name] = inputs[name] * torch.linspace(1.1, 1.7, inputs[name].numel()).reshape(inputs[name].shape)
    attrs = {"fmt": 0, "swiglu_limit": 0.0, "act_quant": False, "bf16": False}
    want = reference("moe_experts", attrs, **inputs)[0]
    got = run_kernel(library, "moe_experts", attrs, [2], **inputs)[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_moe_float_experts_without_scales(library):
    """model.Experts passes empty scales for float experts: the kernel must not read them."""
    inputs = moe_inputs(2)
    attrs = {"fmt": 2, "swiglu_limit": 0.0, "act_quant": False, "bf16": False}
    want = moe_reference(2, 6, False, 0.0, False, False)
    empty = torch.zeros(0)
    got = run_kernel(library, "moe_experts", attrs, [2], **{**inputs, "s1": empty, "s3": empty, "s2": empty})[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("fmt", [0, 1, 2])
@pytest.mark.parametrize("act_quant,bf16", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("tokens", [6, 12, 24])  # 1-3 picks per expert (fused loops), 5-9, ~14 (tiled)
def test_moe_experts_rounding(library, isa, fmt, act_quant, bf16, tokens):
    """With bf16 / FP8 rounding inside, ulp-level differences (silu's exp, the down projection's summation
    order) move an element across a rounding boundary now and then, so exactness is asked of nearly all
    elements. Gate/up are exact by construction (coarse inputs); a missing or misplaced rounding would make
    most elements differ (checked: the unrounded result is far off). The x rows are bf16 values here, as in the
    model: the AVX-512 BF16 loops' pair dot products for FP4 experts."""
    inputs = moe_inputs(fmt, tokens=tokens, coarse=True)
    attrs = {"fmt": fmt, "swiglu_limit": 0.5, "act_quant": act_quant, "bf16": bf16}
    want = moe_reference(fmt, tokens, True, 0.5, act_quant, bf16)
    got = run_kernel(library, "moe_experts", attrs, [2], **inputs)[0]
    err = np.abs(got - want) / np.abs(want).max()
    assert (err <= 1e-5).mean() >= 0.99 and err.max() <= 1e-2
    unrounded = moe_reference(fmt, tokens, True, 0.5, False, False)
    assert (np.abs(unrounded - want) / np.abs(want).max() > 1e-5).mean() > 0.5


# ---- attention / indexer / compressor -----------------------------------------------------------------------------
def far(a: np.ndarray, b: np.ndarray) -> float:
    """Share of elements that differ by more than check()'s tolerance (1e-5 of max |b|)."""
    return float((np.abs(a - b) > 1e-5 * np.abs(b).max()).mean())


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("h,d", [(4, 32), (5, 40), (16, 128)])  # 5 heads: a group of 4 + 1; d = 40: vector tails
def test_sparse_attn(library, isa, h, d, bf16):
    b, s, n, k = 2, 5, 9, 6
    idx = torch.randint(0, n, (b, s, k), generator=torch.Generator().manual_seed(0))
    idx[0, 1, 3:] = -1  # partly empty
    idx[1, 2] = -1  # nothing to attend to: only the sink, output 0
    idx[1, 3] = torch.tensor([2, 2, 2, -1, 5, 5])  # repeated rows count twice
    kv, cmp = split_rows(rand(b, n, d, seed=2), 4)  # rows 4..8 are cmp's
    out = check(library, "sparse_attn", {"kv_rope": 0, "scale": d ** -0.5, "bf16": bf16}, q=rand(b, s, h, d, seed=1),
                kv=kv, cmp=cmp, sink=rand(h, seed=3), idx=idx)[0]
    assert not out[1, 2].any()


@pytest.mark.parametrize("bf16", [False, True])
def test_sparse_attn_blocks(library, isa, bf16):
    """K = 200 picks: four online-softmax blocks, -1 picks scattered, an empty block after valid ones and one
    before any (tensors.attention_blocks). The probabilities rounded per block (bf16) or not: the reference with
    the other setting is far off on most elements, and with bf16 the same picks compacted to the front (other
    blocks, other running maxima) are far off on whole rows, so a kernel that rounds elsewhere fails."""
    inputs = attention_blocks()
    attrs = {"kv_rope": 0, "scale": 40 ** -0.5, "bf16": bf16}
    out = check(library, "sparse_attn", attrs, **inputs)[0]
    assert not out[1, 1].any()
    assert far(reference("sparse_attn", {**attrs, "bf16": not bf16}, **inputs)[0], out) > 0.5
    if bf16:
        idx = inputs["idx"]
        compacted = torch.gather(idx, -1, torch.sort((idx < 0).long(), dim=-1, stable=True).indices)
        assert far(reference("sparse_attn", attrs, **{**inputs, "idx": compacted})[0], out) > 0.05


def test_sparse_attn_without_picks(library, isa):
    """K = 0: no block at all, only the sink in the denominator: zeros."""
    out = check(library, "sparse_attn", {"kv_rope": 0, "scale": 0.5, "bf16": True}, q=rand(1, 2, 5, 8), kv=rand(1, 4, 8),
                cmp=rand(1, 0, 8), sink=rand(5), idx=torch.zeros(1, 2, 0, dtype=torch.int64))[0]
    assert out.shape == (1, 2, 5, 8) and not out.any()


def test_sparse_attn_rejects_rows_outside_kv(library):
    q, kv, cmp, sink = rand(1, 1, 2, 8), rand(1, 4, 8), rand(1, 3, 8), rand(2)
    with pytest.raises(Exception, match=r"idx holds row 7, kv and cmp have 4 \+ 3 rows"):
        run_kernel(library, "sparse_attn", {"kv_rope": 0, "scale": 1.0, "bf16": True}, [4], q=q, kv=kv, cmp=cmp,
                   sink=sink, idx=torch.tensor([[[0, 6, 7]]]))
    with pytest.raises(Exception, match=r"cmp bfloat16 \[1, 3, 8\] must be float32 \[B, M, 8\] like kv"):
        run_kernel(library, "sparse_attn", {"kv_rope": 0, "scale": 1.0, "bf16": True}, [4], q=q, kv=kv,
                   cmp=cmp.bfloat16(), sink=sink, idx=torch.tensor([[[0, 6]]]))


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("topk", [4, 20])  # 20 > N: K = N
def test_indexer_topk(library, isa, topk, bf16):
    b, s, h, d, n = 2, 4, 3, 16, 10
    q, kk, w = rand(b, s, h, d, seed=1).abs(), rand(b, n, d, seed=2).abs(), rand(b, s, h, seed=3).abs()
    n_visible = torch.tensor([[10, 7, 2, 0], [1, 3, 12, 6]])  # fewer visible than k, none, more than N
    picks = check(library, "indexer_topk", {"topk": topk, "bf16": bf16}, exact=True, q=q, k=kk, w=w,
                  n_visible=n_visible)[0]
    assert (picks[0, 3] == -1).all() and (picks[1, 0, 1:] == -1).all()


@pytest.mark.parametrize("bf16", [False, True])
def test_indexer_topk_ties(library, isa, bf16):
    """Small-integer q, k, w: every score is an exact integer whatever the summation order, so many scores tie
    (relu zeros among them) and ties straddle the k-th place: lower entry id first, as the stable reference."""
    g = torch.Generator().manual_seed(5)
    b, s, h, d, n = 2, 6, 5, 8, 40
    q = torch.randint(-1, 2, (b, s, h, d), generator=g).float()
    kk = torch.randint(-1, 2, (b, n, d), generator=g).float()
    w = torch.randint(-2, 3, (b, s, h), generator=g).float()
    n_visible = torch.tensor([[40, 33, 17, 5, 1, 0], [39, 40, 2, 21, 8, 30]])
    picks = check(library, "indexer_topk", {"topk": 12, "bf16": bf16}, exact=True, q=q, k=kk, w=w,
                  n_visible=n_visible)[0]
    scores = torch.einsum("bshd,bnd->bshn", q, kk).relu().mul(w[..., None]).sum(2)
    vis = scores[0, 0]
    assert len(set(vis[picks[0, 0]].tolist())) < 12  # ties among the picks really happen


@pytest.mark.parametrize("bf16", [False, True])
def test_indexer_topk_bf16_scores(library, isa, bf16):
    """Integer-grid inputs (tensors.indexer_grid): exact up to the bf16 roundings, so the picks must be the
    reference's exactly, ties included; the data tells the two settings apart on several rows."""
    inputs = indexer_grid()
    attrs = {"topk": 24, "bf16": bf16}
    picks = check(library, "indexer_topk", attrs, exact=True, **inputs)[0]
    other = reference("indexer_topk", {**attrs, "bf16": not bf16}, **inputs)[0]
    assert (other != picks).any(-1).sum() >= 2


@pytest.mark.parametrize("bf16", [False, True])
def test_indexer_scores(library, isa, bf16):
    """Integer-grid inputs: every step exact but the bf16 roundings, so the kernel gives the reference's bits;
    more entries than one 256-entry task, so tasks split a query's entries."""
    inputs = {n: t for n, t in indexer_grid(300).items() if n != "n_visible"}
    got = check(library, "indexer_scores", {"bf16": bf16}, exact=True, **inputs)[0]
    assert (reference("indexer_scores", {"bf16": not bf16}, **inputs)[0] != got).sum() >= 10


@pytest.mark.parametrize("overlap", [False, True])
def test_compress_pool(library, isa, overlap):
    b, length, d, ratio = 2, 24, 20, 4
    c = 2 if overlap else 1
    kv, score = rand(b, length, c * d, seed=1), rand(b, length, c * d, seed=2)
    score[:, 22:] = -torch.inf  # rows holding no token yet
    ends = torch.tensor([[3, 11, 15, 19], [23, -1, 11, -1]])  # 3 < span - 1 with overlap: clamped to span - 1
    out = check(library, "compress_pool", {"ratio": ratio, "overlap": overlap}, kv=kv, score=score, ends=ends)[0]
    assert not out[1, 1].any() and not out[1, 3].any()


# ---- hyper-connections / QAT simulations -----------------------------------------------------------------------
@pytest.mark.parametrize("n,iters", [(4, 1), (4, 20), (3, 4)])
def test_hc_pre(library, isa, n, iters):
    b, s, d = 2, 3, 40
    attrs = {"iters": iters, "norm_eps": 1e-6, "hc_eps": 1e-6}
    check(library, "hc_pre", attrs, x=rand(b, s, n, d, seed=1), fn=rand((2 + n) * n, n * d, seed=2, scale=0.1),
          scale=rand(3, seed=3), base=rand((2 + n) * n, seed=4))


@pytest.mark.parametrize("n", [4, 3, 1])
def test_hc_post(library, isa, n):
    """Bit-exact: streams summed in order j = 0, 1, ..., each product and sum rounded on its own (no FMA)."""
    b, s, d = 2, 3, 20
    check(library, "hc_post", {}, exact=True, f=rand(b, s, d, seed=1), res=rand(b, s, n, d, seed=2),
          post=rand(b, s, n, seed=3), comb=rand(b, s, n, n, seed=4))


@pytest.mark.parametrize("block", [128, 32])
def test_fake_quant_fp8(library, isa, block):
    x = rand(3, 5, 256, seed=1, scale=3.0)
    x[0, 0, :block] = torch.linspace(-448, 448, block)  # scale exactly 1: round-to-nearest at every binade
    x[0, 0, 1:6] = torch.tensor([7.9, 1.97, 124.3, -15.9, 0.0019])  # round up across a power of two
    x[0, 1, :block] = x[0, 0, :block] * 2.0 ** -5
    x[1, 0, :block] = torch.linspace(-1e-3, 1e-3, block)  # tiny amax: e4m3 subnormals
    x[1, 1, :block] = 0.0  # all zero: amax clamped to 1e-4
    x[1, 2, :block] = 448.0 * 2.0 ** -3  # amax / 448 exactly a power of two
    x[2, 0, :block] = torch.nextafter(x[1, 2, :block], torch.tensor(1e9))  # just above: the next power of two
    check(library, "fake_quant_fp8", {"block": block}, exact=True, x=x)


def test_fake_quant_fp8_scale_at_powers_of_two(library, isa):
    base = 448.0 * torch.pow(2.0, torch.arange(-15.0, 119.0))
    x = torch.cat([base, torch.nextafter(base, base * 2), torch.nextafter(base, base / 2), -1.3 * base])
    check(library, "fake_quant_fp8", {"block": 1}, exact=True, x=x.view(-1, 1))


def e4m3_probe() -> torch.Tensor:
    """Every e4m3 value, the midpoints between neighbours (ties to even) and points just off them."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[values.isfinite() & (values.abs() <= 448)].sort().values
    mids = (values[1:] + values[:-1]) / 2
    return torch.cat([values, mids, torch.nextafter(mids, values[1:]), torch.nextafter(mids, values[:-1])])


def test_fake_quant_fp8_every_e4m3_value(library, isa):
    """Block of 2 with 448 as the partner: scale 1, so each value of the first column is rounded on its own."""
    probe = e4m3_probe()
    x = torch.stack([probe, torch.full_like(probe, 448.0)], dim=1)
    check(library, "fake_quant_fp8", {"block": 2}, exact=True, x=x)


@pytest.mark.parametrize("scale_exp", [0, -9, 5])
def test_fake_quant_fp8_every_e4m3_value_in_vector_blocks(library, isa, scale_exp):
    """Blocks of 128 (the vector loops: 16 or 8 values a step, none left over), each 448 * 2^e and 127 probe
    values times 2^e: every value rounded at scale 2^e, subnormals and -0 included."""
    probe = e4m3_probe()
    probe = torch.cat([probe, torch.zeros(-len(probe) % 127)]).view(-1, 127)
    probe[-1, -1] = -0.0
    x = torch.cat([torch.full((len(probe), 1), 448.0), probe], dim=1) * 2.0 ** scale_exp
    check(library, "fake_quant_fp8", {"block": 128}, exact=True, x=x)


@pytest.mark.parametrize("d", [32, 64, 128])
def test_hadamard_fp4(library, d):
    """Bit-exact, and the bf16 rounding between the Hadamard and the FP4 step shows: without it some elements
    land in another e2m1 step (or their block in another scale)."""
    x = rand(64, d, seed=d)
    x[0] = 0.0
    x[1, :] = torch.linspace(-6, 6, d)
    got = check(library, "hadamard_fp4", {}, exact=True, x=x)[0]
    assert (quant.fake_quant_fp4(quant.hadamard(x), 32).numpy() != got).any()


def test_hadamard_fp4_odd_leading_dims(library):
    check(library, "hadamard_fp4", {}, exact=True, x=rand(7, 64, seed=3, scale=1e-3))


@pytest.mark.parametrize("shape", [(3, 1, 8, 128), (2, 3, 64, 512)])
def test_head_rescale(library, shape):
    """fp32 within 1e-5; bf16 (V4's 64 heads x 512): a row is either equal to the reference or, where the mean of
    its squares lay within an fp32 ulp of a bf16 midpoint (summed in double here, in fp32 lanes by torch), one
    bf16 step off; rarely."""
    q = rand(*shape, seed=5) * torch.logspace(-2, 1, shape[-1])
    check(library, "head_rescale", {"eps": 1e-6, "bf16": False}, x=q)
    (got,) = run_kernel(library, "head_rescale", {"eps": 1e-6, "bf16": True}, [len(shape)], 2, x=q)
    assert differences_within_a_bf16_step(got, ops.head_rescale(q, 1e-6, True).numpy()).any(-1).mean() <= 0.05


@pytest.mark.parametrize("shape", [(3, 64), (2, 1, 4, 128), (5, 7168)])
def test_rms_norm(library, shape):
    """Rows from 64 to V4-Pro's 7168 wide, values over four decades. The kernel sums the squares in double,
    torch in fp32 lanes: within 1e-5 of the largest value, and every value within 4 fp32 ulps of the norm
    computed in float64 from the same inputs."""
    x, w = rand(*shape, seed=5) * torch.logspace(-2, 2, shape[-1]), rand(shape[-1], seed=6)
    (got,) = check(library, "rms_norm", {"eps": 1e-6, "bf16": False}, x=x, weight=w)
    xd = x.double()
    exact = (xd / torch.sqrt(xd.square().mean(-1, keepdim=True) + 1e-6) * w.double()).numpy()
    assert (np.abs(got - exact) <= 4 * np.spacing(np.abs(exact).astype(np.float32))).all()
    (zeros,) = run_kernel(library, "rms_norm", {"eps": 1e-6, "bf16": False}, [2], x=torch.zeros(2, 64), weight=w[:64])
    assert not zeros.any()
    # bf16 in and out: one bf16 step from the reference at most, rarely
    (got,) = run_kernel(library, "rms_norm", {"eps": 1e-6, "bf16": True}, [len(shape)], 2, x=x, weight=w)
    assert differences_within_a_bf16_step(got, ops.rms_norm(x, w, 1e-6, True).numpy()).mean() < 0.01


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 192), (2, 3, 128), (1, 1, 3, 64)])
def test_rope(library, shape, inverse):
    """Heads [B, S, H, D], KV rows [B, S, D], a rope-only head; positions up to 65536. The kernel's cos/sin are
    rounded once from double, torch's are fp32 (within an ulp): within 1e-5 of the largest value in float, every
    value within 2 fp32 ulps (of its terms) of the rotation done in float64 from the same fp32 angles; rounded to
    bf16 at most one bf16 step from the reference, and rarely."""
    from dsv4c.graphs.config import preset
    from dsv4c.graphs.model import rope_frequencies

    freqs = rope_frequencies(preset("tiny"), yarn=True)
    pos = torch.tensor([[0, 5, 77], [1000, 3, 65536]])[:shape[0], :shape[1]]
    x = rand(*shape, seed=4)
    (got,) = check(library, "rope", {"inverse": inverse, "bf16": False}, x=x, freqs=freqs, pos=pos)
    angle = (pos.float()[..., None] * freqs).double()  # fp32 angles, as the reference's table
    while angle.dim() < x.dim():
        angle = angle.unsqueeze(-2)
    sin = torch.sin(angle) * (-1 if inverse else 1)
    x0, x1 = x[..., -64::2].double(), x[..., -63::2].double()
    cos = torch.cos(angle)
    exact = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)
    terms = torch.stack([(x0 * cos).abs() + (x1 * sin).abs(), (x0 * sin).abs() + (x1 * cos).abs()], -1).flatten(-2)
    ulp = np.spacing(terms.numpy().astype(np.float32))  # a sum's rounding is relative to its terms
    assert (np.abs(got[..., -64:] - exact.numpy()) <= 2 * ulp).all()
    (got,) = run_kernel(library, "rope", {"inverse": inverse, "bf16": True}, [len(shape)], 2, x=x, freqs=freqs, pos=pos)
    assert differences_within_a_bf16_step(got, ops.rope(x, freqs, pos, inverse, True).numpy()).mean() < 0.01
    assert np.array_equal(got[..., :-64], x[..., :-64].to(torch.bfloat16).float().numpy())


def test_every_op_has_a_kernel_test():
    tested = {"fp8_linear", "bf16_linear", "cache_write", "fp8_grouped_linear", "moe_experts", "fake_quant_fp8",
              "hadamard_fp4", "sparse_attn", "indexer_topk", "compress_pool", "hc_pre", "hc_post", "rope",
              "rms_norm", "head_rescale", "pack_kv_fp8", "pack_fp4"}
    # the collective kernels talk to other processes: tests/test_mesh_runtime.py runs them across two ranks
    collectives = {"all_reduce", "all_gather"}
    assert {op.onnx_name for op in OPS.values()} == CPP_KERNELS
    assert set(OPS) == tested | {"indexer_scores"} | collectives


# ---- packed cache rows ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2])
def test_pack_kernels_write_the_references_bytes(library, threads):
    from tensors import packed_rows_case

    x = packed_rows_case()
    check(library, "pack_kv_fp8", {"rope_dim": 64}, exact=True, threads=threads, x=x)
    check(library, "pack_fp4", {}, exact=True, threads=threads, x=x[..., :128])


@pytest.mark.parametrize("picks", [200, 40])  # more picks than rows over all queries (every row unpacked) or fewer
def test_kernels_read_packed_rows_as_their_values(library, isa, picks):
    """SparseAttn on packed FP8 rows gives bit for bit what it gives on the unpacked floats (kv_rope 0), and the
    indexer kernels on packed FP4 keys what they give on the unpacked keys; both match the reference."""
    from tensors import attention_blocks, packed_rows_case

    inputs = attention_blocks(d=192)
    inputs["idx"] = inputs["idx"][:, :, :picks]
    if picks < 200:  # 3 queries x 40 picks < 300 rows: each query's picks are unpacked
        inputs = {**inputs, "q": inputs["q"][:, :1], "idx": inputs["idx"][:, :1]}
    packed = {part: torch.ops.dsv4.pack_kv_fp8(inputs[part], 64) for part in ("kv", "cmp")}
    attrs = {"kv_rope": 64, "scale": 192 ** -0.5, "bf16": True}
    got = run_kernel(library, "sparse_attn", attrs, [4], **{**inputs, **packed})[0]
    values = {part: quant.unpack_kv_fp8(rows, 192, 64) for part, rows in packed.items()}
    as_float = run_kernel(library, "sparse_attn", {**attrs, "kv_rope": 0}, [4], **{**inputs, **values})[0]
    np.testing.assert_array_equal(got, as_float)
    check(library, "sparse_attn", {**attrs, "bf16": False}, **{**inputs, **packed})
    keys = torch.ops.dsv4.pack_fp4(packed_rows_case(d=128, rows=300)[:, :, :128])
    q, w = rand(2, 3, 4, 128, seed=1).round(), rand(2, 3, 4, seed=2)  # integer q: exact dot products
    values = quant.unpack_fp4_rows(keys, 128)
    for name, attrs, extra in (("indexer_scores", {"bf16": True}, {}),
                               ("indexer_topk", {"topk": 24, "bf16": True},
                                {"n_visible": torch.tensor([[3, 70, 300], [300, 1, 0]])})):
        got = check(library, name, attrs, exact=True, q=q, k=keys, w=w, **extra)[0]
        np.testing.assert_array_equal(got, run_kernel(library, name, attrs, [3], q=q, k=values, w=w, **extra)[0])


def test_sparse_attn_reads_packed_rows_that_bf16_cannot_hold_as_floats(library, isa):
    """The kernel unpacks FP8 rows as bf16 bits when bf16 holds every value. Block scales of e8m0 byte 0 (2^-127)
    put FP8's small codes below what bf16 holds (2^-9 x 2^-127 = 2^-136), and the call reads the rows as floats
    instead: bit for bit the result on the unpacked floats (the outputs are float subnormals, which bf16 rows
    would have cut short)."""
    from tensors import attention_blocks

    inputs = attention_blocks(d=192)
    packed = {part: torch.ops.dsv4.pack_kv_fp8(inputs[part], 64) for part in ("kv", "cmp")}
    for rows in packed.values():
        rows[..., 256:258] = 0  # the two nope blocks' scales, after 128 FP8 codes and 64 bf16 RoPE dims
        rows[..., 128:256] = 0  # RoPE dims 0: the output is the nope values' weighted sum alone
    attrs = {"kv_rope": 64, "scale": 192 ** -0.5, "bf16": True}
    got = run_kernel(library, "sparse_attn", attrs, [4], **{**inputs, **packed})[0]
    values = {part: quant.unpack_kv_fp8(rows, 192, 64) for part, rows in packed.items()}
    tiny = values["kv"][..., :128].abs()
    assert tiny.max() <= 448 * 2.0 ** -127 and (tiny[tiny > 0].min() < 2.0 ** -133)  # some below bf16
    as_float = run_kernel(library, "sparse_attn", {**attrs, "kv_rope": 0}, [4], **{**inputs, **values})[0]
    np.testing.assert_array_equal(got, as_float)
    assert np.abs(got).max() > 0


def test_sparse_attn_refuses_packed_rows_without_kv_rope(library):
    from tensors import attention_blocks

    inputs = attention_blocks(d=192)
    packed = {part: torch.ops.dsv4.pack_kv_fp8(inputs[part], 64) for part in ("kv", "cmp")}
    with pytest.raises(Exception, match="kv_rope"):
        run_kernel(library, "sparse_attn", {"kv_rope": 0, "scale": 0.1, "bf16": True}, [4], **{**inputs, **packed})


def test_cache_write_packed_uint8_cache(library):
    """A cache of packed uint8 rows (FP8 KV rows, FP4 keys) is written row by row in bytes: the hand-written case
    with byte values (every row its own bytes), rows 1 byte per element, the other rows kept."""
    from test_onnx_ops import cache_write_case

    inputs, want = cache_write_case()
    packed = {"cache": inputs["cache"].to(torch.uint8), "rows": (100 + inputs["rows"]).to(torch.uint8),
              "slots": inputs["slots"]}
    want = want.copy()
    want[want < 0] += 100
    got = run_kernel(library, "cache_write", {}, [3], **packed)[0]
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want.astype(np.uint8))
