"""Cache correctness of the model: every way of feeding a sequence (one-shot prefill, prefill then decode,
chunked prefill at odd boundaries, a right-padded batch of unequal prompts with idle rows) must give the logits
of the one-shot prefill; and the MTP block against the spec §2.7 formula.

Plain numerics (fp32, no rounding simulation) must agree to float noise (~1e-6 relative). Reference numerics
round to bf16 / FP8 / FP4 everywhere, and a decode step runs its GEMMs as GEMVs whose results differ from the
prefill GEMM's in the last fp32 bit; a rounding boundary then flips now and then and the flips compound through
the layers, the FP8 scales and the indexer top-k. Measured on these synthetic models: a 1-ulp fp32 perturbation
of the embeddings alone moves single-position logits to cosine 0.971 (tiny) / 0.994 (tiny-b), mean 0.9996. So
reference numerics are held end to end only to what that chaos allows: spec §3.9 measures 0.93-0.99 for a
last-bit difference, and here a decode step at the HCA boundary (position 127 of `tiny`) moves the next positions
to cosine 0.927 (mean 0.989) although every attention layer's decode is bit-exact. The cache itself is held
strictly where chaos cannot reach, component by component (spec §3.9's method): each attention layer fed the
*same* inputs one-shot, in chunks with decode steps, and batched with idle rows must agree within one bf16 ulp
(test_attention_caches_are_exact_on_identical_inputs); a real cache bug (a lost window row, a wrong compressor
state, a misplaced entry) breaks whole rows there.
"""

from __future__ import annotations

import pytest
import torch

from dsv4c.graphs.checkpoint import synthetic_tensors
from dsv4c.graphs.config import preset
from dsv4c.graphs.model import DeepseekV4, Numerics, load_official

from conftest import flat_cosine

MAX_LEN = 256
# per preset: prompt/decode split, prefill chunks (boundaries off the 4 / 16 / 128 grids), batch lengths
CASES = {
    "tiny": dict(prompt=126, decode=6, chunks=[37, 50, 1, 45], lengths=[133, 70]),  # HCA entry 0 closes at 127
    "tiny-b": dict(prompt=30, decode=7, chunks=[7, 13, 1, 22], lengths=[43, 29]),  # HCA(16) closes at 31, 47
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast, and on a shared 2-core machine two OpenMP threads that
    wait on each other's barriers while another process holds a core made this file 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_logits(got: torch.Tensor, want: torch.Tensor, plain: bool, what: str) -> None:
    """got/want [N, V]: one row per position."""
    cos = [flat_cosine(g, w) for g, w in zip(got, want)]
    if plain:
        rel = ((got - want).abs().amax(-1) / want.abs().amax(-1)).max().item()
        assert rel <= 1e-5 and min(cos) >= 0.9999, f"{what}: max relative diff {rel}, min cosine {min(cos)}"
    else:
        mean = sum(cos) / len(cos)
        assert mean >= 0.98 and min(cos) >= 0.9, f"{what}: mean cosine {mean}, min {min(cos)}"


@pytest.fixture(scope="module", params=[(p, n) for p in CASES for n in ("plain", "reference")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model(request) -> DeepseekV4:
    name, numerics = request.param
    cfg = preset(name)
    m = DeepseekV4(cfg, Numerics.plain() if numerics == "plain" else Numerics.reference())
    load_official(m, dict(synthetic_tensors(cfg, seed=3)))
    return m.eval()


def case(model: DeepseekV4) -> dict:
    return CASES["tiny" if model.cfg.hidden_size == preset("tiny").hidden_size else "tiny-b"]


def tokens(model: DeepseekV4, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def run(model, toks, start, n_valid, cache, all_logits=True):
    return model(toks, torch.tensor(start), torch.tensor(n_valid), cache, all_logits=all_logits)


def one_shot(model: DeepseekV4, toks: torch.Tensor) -> torch.Tensor:
    """[N, V] logits of a single prefill from position 0."""
    logits, _ = run(model, toks, [0], [toks.shape[1]], model.new_cache(1, MAX_LEN))
    return logits[0]


@torch.no_grad()
def test_decode_after_prefill_equals_longer_prefill(model):
    c = case(model)
    p, d = c["prompt"], c["decode"]
    toks = tokens(model, p + d)
    want = one_shot(model, toks)
    logits, cache = run(model, toks[:, :p], [0], [p], model.new_cache(1, MAX_LEN), all_logits=False)
    got = [logits[0]]
    for i in range(p, p + d):
        logits, cache = run(model, toks[:, i:i + 1], [i], [1], cache, all_logits=False)
        got.append(logits[0])
    assert_same_logits(torch.stack(got), want[p - 1:], model.numerics.bf16 is False, "decode")


@torch.no_grad()
def test_chunked_prefill_equals_one_shot(model):
    chunks = case(model)["chunks"]
    toks = tokens(model, sum(chunks), seed=1)
    want = one_shot(model, toks)
    cache, start, got = model.new_cache(1, MAX_LEN), 0, []
    for n in chunks:
        logits, cache = run(model, toks[:, start:start + n], [start], [n], cache)
        got.append(logits[0])
        start += n
    assert_same_logits(torch.cat(got), want, model.numerics.bf16 is False, f"chunks {chunks}")


@torch.no_grad()
def test_batch_of_unequal_prompts_equals_each_alone(model):
    """Right-padded batch prefill, then decode steps where one row is idle (n_valid 0) for a step: each row
    must match the same sequence run alone, and the idle row must resume as if nothing happened."""
    lengths = case(model)["lengths"]
    seqs = [tokens(model, n + 3, seed=10 + b) for b, n in enumerate(lengths)]
    alone = [one_shot(model, s) for s in seqs]

    batch = torch.zeros(2, max(lengths), dtype=torch.long)
    for b, n in enumerate(lengths):
        batch[b, :n] = seqs[b][0, :n]
    logits, cache = run(model, batch, [0, 0], lengths, model.new_cache(2, MAX_LEN))
    got = [[logits[b, :n]] for b, n in enumerate(lengths)]
    pos = list(lengths)
    for active in ([1, 1], [1, 0], [1, 1], [0, 1]):  # row 1 idles in step 2, row 0 in step 4
        step = torch.stack([seqs[b][0, pos[b]] if active[b] else torch.tensor(7) for b in range(2)])[:, None]
        logits, cache = run(model, step, pos, active, cache, all_logits=False)
        for b in range(2):
            if active[b]:
                got[b].append(logits[b][None])
                pos[b] += 1
    for b, n in enumerate(lengths):
        assert_same_logits(torch.cat(got[b]), alone[b][:n + 3], model.numerics.bf16 is False, f"batch row {b}")


def within_one_ulp(got: torch.Tensor, want: torch.Tensor) -> float:
    """Fraction of elements with |got - want| <= one bf16 ulp of want (FORMAT.md of the conformance recordings)."""
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp(min=2.0 ** -126))) - 7)
    return ((got - want).abs() <= ulp).double().mean().item()


@torch.no_grad()
def test_attention_caches_are_exact_on_identical_inputs(model):
    """Every attention layer (SWA, CSA with the indexer, HCA) on one input sequence: one-shot, then a prefill
    chunk + decode steps + a chunk, then the same inside a batch whose other row idles. Same inputs, so the
    chaos of the end-to-end tests is absent: >= 99.9 % of outputs within one bf16 ulp and no row off."""
    from dsv4c.graphs.conformance import _fresh_cache
    from dsv4c.graphs.model import Step

    cfg, n = model.cfg, 140  # past the HCA boundary (128) and many CSA windows
    x = torch.randn(1, n, cfg.hidden_size, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).float()
    plan = [(0, 61), (61, 1), (62, 1), (63, 3), (66, 1), (67, 60), (127, 1), (128, 1), (129, 11)]

    def step(start, count, width, valid):
        return Step(torch.tensor(start), torch.tensor(valid), width)

    for layer in range(cfg.num_hidden_layers):
        attn = model.layers[layer].attn
        want, _ = attn(x, step([0], n, n, [n]), _fresh_cache(model, layer, 1, MAX_LEN), model.numerics)
        cache, single = _fresh_cache(model, layer, 1, MAX_LEN), []
        batched_cache, batched = _fresh_cache(model, layer, 2, MAX_LEN), []
        for i, (start, count) in enumerate(plan):
            out, cache = attn(x[:, start:start + count], step([start], count, count, [count]), cache, model.numerics)
            single.append(out)
            idle = i % 2  # the second row idles every other call: its state must not move
            other = [start if not idle else 0, count if not idle else 0]
            pair = torch.cat([x[:, start:start + count], x[:, start:start + count]])
            out, batched_cache = attn(pair, step([start, other[0]], count, count, [count, other[1]]),
                                      batched_cache, model.numerics)
            batched.append(out[:1])
        for label, got in (("chunks + decode", torch.cat(single, 1)), ("batched", torch.cat(batched, 1))):
            rows = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
            frac = within_one_ulp(got, want) if model.numerics.bf16 else 1.0
            assert frac >= 0.999 and rows <= (1e-2 if model.numerics.bf16 else 1e-5), (layer, label, frac, rows)


# ---- MTP (spec §2.7) ------------------------------------------------------------------------------------------
def mtp_cache(model: DeepseekV4, batch: int) -> tuple[torch.Tensor, ...]:
    main = len(model.cache_spec(batch, MAX_LEN))
    return model.new_cache(batch, MAX_LEN, include_mtp=True)[main:]


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


@torch.no_grad()
def test_mtp_block_matches_spec_formula(model):
    """e = enorm(embed(t+1)); X = e_proj(e) (broadcast over streams) + h_proj(hnorm(X_main)) per stream;
    X = Block(X); logits = head(norm(hc_head_mtp(X))), with hc_head: sigmoid(mix * scale + base) + eps weights
    over streams, mix = (flat(X) @ fn^T) * rsqrt(mean(flat(X)^2) + eps). Written out for plain numerics; the
    Block itself is the main model's (checked by the tests above and against transformers)."""
    if model.numerics.bf16:
        pytest.skip("the hand formula is written for plain numerics")
    from dsv4c.graphs.model import Step
    from dsv4c.graphs.ops.registry import decode_fp8

    cfg, mtp = model.cfg, model.mtp[0]
    n = 20
    toks = tokens(model, n + 1, seed=5)
    logits, _, streams = model(toks[:, :n], torch.tensor([0]), torch.tensor([n]), model.new_cache(1, MAX_LEN),
                               return_streams=True)
    assert streams.shape == (1, n, cfg.hc_mult, cfg.hidden_size)
    nxt = toks[:, 1:n + 1]  # token t+1 beside stream position t
    got, new_cache = model.forward_mtp(nxt, streams, torch.tensor([0]), torch.tensor([n]), mtp_cache(model, 1),
                                       all_logits=True)
    assert got.shape == (1, n, cfg.vocab_size)
    assert [t.shape for t in new_cache] == [t.shape for t in mtp_cache(model, 1)]

    eps = cfg.rms_norm_eps
    e_proj = decode_fp8(mtp.e_proj.weight, mtp.e_proj.scale)
    h_proj = decode_fp8(mtp.h_proj.weight, mtp.h_proj.scale)
    e = rms(model.embed[nxt].float(), mtp.enorm.weight, eps)  # [1, n, D]
    x = (e @ e_proj.T)[:, :, None, :] + rms(streams, mtp.hnorm.weight, eps) @ h_proj.T  # [1, n, 4, D]
    step = Step(torch.tensor([0]), torch.tensor([n]), n)
    names = ["win"]  # the MTP layer is sliding-window only (compress_ratios[-1] = 0)
    assert cfg.compress_ratios[-1] == 0
    x, _ = mtp.block(x, nxt, step, dict(zip(names, mtp_cache(model, 1))), model.numerics)
    flat = x.flatten(-2)
    mix = (flat @ mtp.head.hc_head_fn.T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)
    pre = torch.sigmoid(mix * mtp.head.hc_head_scale + mtp.head.hc_head_base) + cfg.hc_eps  # [1, n, 4]
    y = rms((pre[..., None] * x).sum(-2), mtp.head.norm.weight, eps)
    want = y @ model.head.float().T
    assert_same_logits(got[0], want[0], True, "mtp")
    # the MTP head is its own: the main model's hc_head/norm give other logits
    assert flat_cosine(got[0, -1], logits[0]) < 0.99


@torch.no_grad()
def test_mtp_decode_equals_mtp_prefill(model):
    n, p = 24, 19  # crosses the window (16 / 24 rows) in decode
    toks = tokens(model, n + 1, seed=6)
    _, _, streams = model(toks[:, :n], torch.tensor([0]), torch.tensor([n]), model.new_cache(1, MAX_LEN),
                          return_streams=True)
    nxt = toks[:, 1:n + 1]
    want, _ = model.forward_mtp(nxt, streams, torch.tensor([0]), torch.tensor([n]), mtp_cache(model, 1),
                                all_logits=True)
    logits, cache = model.forward_mtp(nxt[:, :p], streams[:, :p], torch.tensor([0]), torch.tensor([p]),
                                      mtp_cache(model, 1))
    got = [logits[0]]
    for i in range(p, n):
        logits, cache = model.forward_mtp(nxt[:, i:i + 1], streams[:, i:i + 1], torch.tensor([i]), torch.tensor([1]),
                                          cache)
        got.append(logits[0])
    assert_same_logits(torch.stack(got), want[0, p - 1:], model.numerics.bf16 is False, "mtp decode")


# ---- head_dim 192 against transformers (slow: the differential test's setup, one more config) --------------------
@pytest.mark.slow
@torch.no_grad()
def test_head_dim_192_matches_transformers_once_its_fp8_dequant_follows_the_spec(tmp_path):
    """At head_dim 192 wkv is [192, D] and its FP8 scale grid [2, D/128] has a partial second row block.
    transformers 5.23 (integrations/finegrained_fp8.py, Fp8Dequantize._dequantize_one: block_m = rows //
    scale_rows) dequantises it with 96-row blocks, so rows 96..127 get the wrong scale and its logits drift
    (cosine 0.986 from position 0). Re-dequantising that weight per spec §5.2 on its side makes the two models
    agree like at head_dim 128: the rest of the architecture (RoPE on the last 64 of 192 dims, inverse RoPE,
    grouped wo_a over 384-wide groups) matches."""
    pytest.importorskip("transformers")
    from test_model_vs_transformers import load_hf, load_ours

    from dsv4c.graphs import quant
    from dsv4c.graphs.checkpoint import CheckpointReader, expected_tensors, write_synthetic_checkpoint

    cfg = preset("tiny").replace(head_dim=192, index_topk=64)
    ragged = [n for n, s in expected_tensors(cfg).items()
              if s.dtype == torch.float8_e4m3fn and any(d % 128 for d in s.shape)]
    assert ragged and all(n.endswith(".attn.wkv.weight") for n in ragged)  # the only weights to re-dequantise
    path = write_synthetic_checkpoint(tmp_path / "hd192", cfg, seed=7)
    ours, hf = load_ours(path, Numerics.plain()), load_hf(path)
    reader = CheckpointReader(path)
    for name in ragged:
        t = reader.read([name, name[:-len("weight")] + "scale"])
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        if layer is None:
            continue  # MTP: transformers has no MTP block
        hf.model.layers[layer].self_attn.kv_proj.weight.copy_(quant.dequantize_fp8_blocks(*t.values()))
    toks = torch.randint(2, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    want = hf(toks).logits[0]
    got, _ = ours(toks, torch.tensor([0]), torch.tensor([40]), ours.new_cache(1, MAX_LEN), all_logits=True)
    assert min(flat_cosine(got[0, i], want[i]) for i in range(40)) >= 0.9999


@torch.no_grad()
def test_packed_cache_rows_hold_the_reference_values_exactly():
    """Under the reference numerics the caches hold KV rows and indexer keys packed in the recipe's formats (FP8
    rows with bf16 RoPE dims, FP4 keys; spec §4.2): every value written there is exactly such a value already (the
    reference's FP8 / FP4 simulations), so prefill and decode give bit for bit the logits and cache contents of the
    same model with those caches in float32."""
    from dsv4c.graphs.cache import RowFormat, layer_cache_spec, row_values

    cfg = preset("tiny")
    m = DeepseekV4(cfg, Numerics.reference())
    load_official(m, dict(synthetic_tensors(cfg, seed=3)))
    m.eval()
    spec = m.cache_spec(2, MAX_LEN)
    stored = tuple(e.empty() for e in spec)
    assert {c.dtype for c in stored} == {torch.uint8, torch.float32}
    wide = tuple(e.empty() for i in range(cfg.num_hidden_layers)
                 for e in layer_cache_spec(cfg, f"layers.{i}", cfg.layer_ratio(i), 2, MAX_LEN, RowFormat()))
    toks = torch.randint(2, cfg.vocab_size, (2, 140), generator=torch.Generator().manual_seed(4))
    runs = []
    for cache in (stored, wide):
        logits, cache = run(m, toks, [0, 0], [140, 97], cache, all_logits=False)
        out, pos = [logits], torch.tensor([140, 97])
        for i in range(5):
            logits, cache = m(toks[:, i:i + 1], pos + i, torch.ones(2, dtype=torch.long), cache)
            out.append(logits)
        runs.append((out, [torch.from_numpy(row_values(c.numpy(), e.packing if c.dtype == torch.uint8 else "", cfg))
                           for c, e in zip(cache, spec)]))
    (got, got_cache), (want, want_cache) = runs
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(torch.equal(g.nan_to_num(), w.nan_to_num()) for g, w in zip(got_cache, want_cache))