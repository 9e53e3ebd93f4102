"""Official-format checkpoints (spec §5): the expected tensor set of the published models (counts and bytes from
the spec, on the meta device), the writer -> reader round trip, and a corpus of bad inputs that must each raise
CheckpointError naming the file or tensor at fault."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shutil
import struct
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv4c.graphs import quant
from dsv4c.graphs.checkpoint import (INDEX, CheckpointError, CheckpointReader, expected_tensors, global_tensors,
                                     layer_prefixes, synthetic_tensors, write_checkpoint,
                                     write_synthetic_checkpoint)
from dsv4c.graphs.config import preset
from dsv4c.graphs.model import DeepseekV4, Numerics, load_official
from dsv4c.graphs.ops.registry import decode_fp8

# spec §5.1 (tensor counts) and §5.6 (IDX metadata.total_size; Pro from third-party audits)
PUBLISHED = {"v4-flash": (69_187, 159_609_485_896), "v4-pro": (145_116, 864_704_792_696)}


# ---- the published models, from the spec alone -----------------------------------------------------------------
@pytest.mark.parametrize("name", PUBLISHED)
def test_expected_tensor_set_matches_published_counts_and_bytes(name):
    specs = expected_tensors(preset(name))
    count, total = PUBLISHED[name]
    assert len(specs) == count
    assert sum(s.nbytes for s in specs.values()) == total


def test_expected_shapes_and_dtypes_of_flash_by_hand():
    """A sample of spec §2.3-2.6 / §5.2 rows (Flash), incl. the scale shapes DUMP lists."""
    s = expected_tensors(preset("v4-flash"))
    e4m3, e8m0, i8, bf16, f32, i64 = (torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int8, torch.bfloat16,
                                      torch.float32, torch.int64)
    want = {
        "embed.weight": ((129280, 4096), bf16), "head.weight": ((129280, 4096), bf16),
        "hc_head_fn": ((4, 16384), f32), "layers.0.hc_attn_fn": ((24, 16384), f32),
        "layers.0.hc_ffn_scale": ((3,), f32), "layers.5.attn.wq_a.scale": ((8, 32), e8m0),
        "layers.5.attn.wq_b.weight": ((32768, 1024), e4m3), "layers.5.attn.wq_b.scale": ((256, 8), e8m0),
        "layers.5.attn.wkv.scale": ((4, 32), e8m0), "layers.5.attn.wo_a.scale": ((64, 32), e8m0),
        "layers.5.attn.wo_b.scale": ((32, 64), e8m0), "layers.5.attn.attn_sink": ((64,), f32),
        "layers.2.attn.compressor.wkv.weight": ((1024, 4096), bf16), "layers.2.attn.compressor.ape": ((4, 1024), f32),
        "layers.3.attn.compressor.ape": ((128, 512), f32), "layers.2.attn.indexer.wq_b.weight": ((8192, 1024), e4m3),
        "layers.2.attn.indexer.weights_proj.weight": ((64, 4096), bf16),
        "layers.2.attn.indexer.compressor.ape": ((4, 256), f32),
        "layers.2.attn.indexer.compressor.norm.weight": ((128,), bf16),
        "layers.2.ffn.gate.tid2eid": ((129280, 6), i64), "layers.3.ffn.gate.bias": ((256,), f32),
        "layers.7.ffn.experts.255.w1.weight": ((2048, 2048), i8),
        "layers.7.ffn.experts.0.w1.scale": ((2048, 128), e8m0), "layers.7.ffn.experts.0.w2.scale": ((4096, 64), e8m0),
        "layers.7.ffn.shared_experts.w2.weight": ((4096, 2048), e4m3),
        "mtp.0.e_proj.weight": ((4096, 4096), e4m3), "mtp.0.hc_head_fn": ((4, 16384), f32),
        "mtp.0.attn.wkv.weight": ((512, 4096), e4m3), "mtp.0.ffn.gate.bias": ((256,), f32),
    }
    for name, (shape, dtype) in want.items():
        assert (s[name].shape, s[name].dtype) == (shape, dtype), name
    absent = ["layers.0.attn.compressor.ape", "layers.3.attn.indexer.wq_b.weight", "layers.2.ffn.gate.bias",
              "mtp.0.attn.compressor.ape", "mtp.0.embed.weight", "mtp.0.head.weight", "layers.3.ffn.gate.tid2eid",
              "layers.2.attn.wo_a.weight_scale_inv"]
    assert not [n for n in absent if n in s]


@pytest.mark.parametrize("name", PUBLISHED)
def test_presets_instantiate_on_meta_with_the_checkpoint_element_count(name):
    """Every checkpoint tensor has a model buffer holding the same number of elements (FP4 bytes stay packed,
    scales become float32, bf16 becomes float32): the meta model is the checkpoint, element for element."""
    cfg = preset(name)
    with torch.device("meta"):
        model = DeepseekV4(cfg)
    persistent = model.state_dict()
    assert all(t.is_meta for t in persistent.values())
    want = sum(math.prod(s.shape) for s in expected_tensors(cfg).values())
    assert sum(t.numel() for t in persistent.values()) == want


# ---- writer -> reader round trip ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset("tiny"), seed=3,
                                      shard_bytes=1 << 20)


def test_round_trip(tiny_ckpt):
    cfg = preset("tiny")
    reader = CheckpointReader(tiny_ckpt)
    reader.verify()
    assert reader.config == cfg
    mask = os.umask(0)
    os.umask(mask)
    assert tiny_ckpt.stat().st_mode & 0o777 == 0o777 & ~mask  # readable like any file, not mkdtemp's 0700
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~mask for f in tiny_ckpt.iterdir())
    shards = sorted(p.name for p in tiny_ckpt.glob("*.safetensors"))
    assert len(shards) > 2 and all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    index = json.loads((tiny_ckpt / INDEX).read_text())
    expected = expected_tensors(cfg)
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in expected.values())
    # the files hold exactly what the (deterministic) generator makes, and reading layer by layer gets all of it
    regenerated = dict(synthetic_tensors(cfg, seed=3))
    seen = dict(reader.read_globals())
    prefixes = [p for p, _ in layer_prefixes(cfg)]
    for prefix, tensors in reader.iter_layers():
        assert prefix == prefixes.pop(0) and all(n.startswith(prefix + ".") for n in tensors)
        seen.update(tensors)
    assert set(seen) == set(expected)
    for name, t in seen.items():
        assert t.dtype == expected[name].dtype and tuple(t.shape) == expected[name].shape, name
        assert torch.equal(t.view(torch.uint8), regenerated[name].view(torch.uint8)), name
    other = dict(synthetic_tensors(cfg, seed=4))
    assert not torch.equal(other["layers.1.attn.wq_b.weight"].view(torch.uint8),
                           regenerated["layers.1.attn.wq_b.weight"].view(torch.uint8))


def test_shards_are_the_bytes_safetensors_writes(tiny_ckpt, tmp_path):
    """The streaming shard writer lays out header and data as `safetensors.torch.save_file` does: the checkpoint's
    shards, and a shard of every official dtype with names out of order and a 0-d tensor."""
    for shard in sorted(tiny_ckpt.glob("*.safetensors")):
        save_file(load_file(shard), tmp_path / "ref.safetensors", metadata={"format": "pt"})
        assert shard.read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), shard.name
    g = torch.Generator().manual_seed(0)
    mixed = {"z.scale": torch.rand(3, 5, generator=g).to(torch.float8_e8m0fnu),
             "a.weight": torch.randn(7, 9, generator=g).to(torch.float8_e4m3fn),
             "m.idx": torch.randint(0, 9, (4, 2), generator=g), "b.norm": torch.randn(11, generator=g).bfloat16(),
             "k.sink": torch.tensor(1.5), "c.fp4": torch.randint(-128, 127, (2, 3), dtype=torch.int8, generator=g),
             "aa.base": torch.randn(2, 2, generator=g)}
    write_checkpoint(tmp_path / "mixed", preset("tiny"), iter(mixed.items()))
    save_file(mixed, tmp_path / "mixed.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "mixed" / "model-00001-of-00001.safetensors").read_bytes() == \
        (tmp_path / "mixed.safetensors").read_bytes()


def test_the_writer_holds_one_tensor_at_a_time(tmp_path):
    """Each tensor is on disk and released before the next is made (the writer kept a whole shard, 1 GB by
    default, in memory and serialised it into a second buffer: mini-1b's writer peaked at 2.0 GB)."""
    made, alive_when_asked = [], []

    def tensors():
        for i in range(6):
            alive_when_asked.append(sum(ref() is not None for ref in made))
            t = torch.full((1000,), float(i))
            made.append(weakref.ref(t))
            yield f"t{i}", t
            del t

    write_checkpoint(tmp_path / "c", preset("tiny"), tensors())
    assert alive_when_asked == [0] * 6
    assert [load_file(next((tmp_path / "c").glob("*.safetensors")))[f"t{i}"][0].item() for i in range(6)] == \
        [float(i) for i in range(6)]


def test_the_synthetic_checkpoint_of_a_seed_is_pinned(tmp_path):
    """The bytes of a synthetic checkpoint are a function of (preset, seed): caches and recordings are keyed by
    them (sha256 recorded with the writer that kept whole shards in memory and called save_file)."""
    write_synthetic_checkpoint(tmp_path / "t", preset("tiny"), seed=0)
    shard, = (tmp_path / "t").glob("*.safetensors")
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == \
        "3074e9b469547d048b3919c4a80eb1e46d79e089df7be4616919f32e43bf183e"


def test_synthetic_weights_follow_the_format_rules(tiny_ckpt):
    """FP8 weights with their 128x128 scales dequantise close to a unit-scaled weight; FP4 experts unpack low
    nibble first with per-32 scales; tid2eid holds distinct valid experts per token."""
    reader = CheckpointReader(tiny_ckpt)
    t = reader.read_layer("layers.0")
    w = quant.dequantize_fp8_blocks(t["layers.0.attn.wq_b.weight"], t["layers.0.attn.wq_b.scale"])
    assert 0.5 < w.std().item() * math.sqrt(w.shape[1]) < 2  # std ~ in^-0.5 as generated
    e = quant.dequantize_fp4(t["layers.0.ffn.experts.3.w2.weight"], t["layers.0.ffn.experts.3.w2.scale"])
    assert e.shape == (256, 128) and 0.3 < e.std().item() * math.sqrt(128) < 3
    tid2eid = t["layers.0.ffn.gate.tid2eid"]
    assert tid2eid.min() >= 0 and tid2eid.max() < 8
    assert all(len(set(row)) == len(row) for row in tid2eid[:50].tolist())


# ---- bad inputs: each names its cause ------------------------------------------------------------------------------
def corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_of(path: Path, name: str) -> Path:
    return path / json.loads((path / INDEX).read_text())["weight_map"][name]


def rewrite_shard(path: Path, name: str, change) -> Path:
    """Load the shard holding `name`, apply change(dict) in place, save it back under the same file name."""
    shard = shard_of(path, name)
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def edit_index(path: Path, change) -> None:
    index = json.loads((path / INDEX).read_text())
    change(index["weight_map"])
    (path / INDEX).write_text(json.dumps(index))


def read_everything(path: Path) -> None:
    reader = CheckpointReader(path)
    reader.read_globals()
    for _ in reader.iter_layers():
        pass


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nope"))):
        CheckpointReader(tmp_path / "nope")


def test_missing_shard(tiny_ckpt, tmp_path):
    path = corrupt_copy(tiny_ckpt, tmp_path / "c")
    shard = shard_of(path, "layers.2.attn.wkv.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard.name) + ".*missing"):
        CheckpointReader(path).verify()
    with pytest.raises(CheckpointError, match=re.escape(shard.name)):
        read_everything(path)  # reading without verify() also names the file


def test_truncated_shard(tiny_ckpt, tmp_path):
    path = corrupt_copy(tiny_ckpt, tmp_path / "c")
    shard = shard_of(path, "layers.1.attn.wq_a.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=re.escape(shard.name) + ".*truncated"):
        CheckpointReader(path).verify()
    with pytest.raises(CheckpointError, match=re.escape(shard.name)):
        read_everything(path)


def test_shard_cut_inside_its_header(tiny_ckpt, tmp_path):
    path = corrupt_copy(tiny_ckpt, tmp_path / "c")
    shard = shard_of(path, "layers.1.attn.wq_a.weight")
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=re.escape(shard.name) + ".*truncated"):
        CheckpointReader(path).verify()


def test_corrupt_shard_header(tiny_ckpt, tmp_path):
    path = corrupt_copy(tiny_ckpt, tmp_path / "c")
    shard = shard_of(path, "layers.1.attn.wq_a.weight")
    data = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8:8 + n] = b"{" + b"x" * (n - 1)
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(shard.name) + ".*header"):
        CheckpointReader(path).verify()


def test_header_entry_without_offsets(tiny_ckpt, tmp_path):
    path = corrupt_copy(tiny_ckpt, tmp_path / "c")
    shard = shard_of(path, "layers.1.attn.wq_a.weight")
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    del header["layers.1.attn.wq_a.weight"]["data_offsets"]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # shorter: pad with spaces, same layout
    assert len(raw) == n
    shard.write_bytes(data[:8] + raw + data[8 + n:])
    with pytest.raises(CheckpointError, match="layers.1.attn.wq_a.weight"):
        CheckpointReader(path).verify()


def test_wrong_dtype(tiny_ckpt, tmp_path):
    path = corrupt_copy(tiny_ckpt, tmp_path / "c")
    name = "layers.1.attn.compressor.ape"
    shard = rewrite_shard(path, name, lambda t: t.update({name: t[name].to(torch.bfloat16)}))
    with pytest.raises(CheckpointError, match=re.escape(name) + ".*" + re.escape(shard.name) + ".*BF16.*F32"):
        CheckpointReader(path).verify()


def test_wrong_shape(tiny_ckpt, tmp_path):
    path = corrupt_copy(tiny_ckpt, tmp_path / "c")
    name = "layers.3.ffn.experts.5.w1.scale"
    rewrite_shard(path, name, lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    with pytest.raises(CheckpointError, match=re.escape(name) + r".*\[128, 7\].*\[128, 8\]"):
        CheckpointReader(path).verify()


def test_missing_tensor(tiny_ckpt, tmp_path):
    path = corrupt_copy(tiny_ckpt, tmp_path / "c")
    name = "layers.2.attn.attn_sink"
    rewrite_shard(path, name, lambda t: t.pop(name))
    edit_index(path, lambda m: m.pop(name))
    with pytest.raises(CheckpointError, match=re.escape(name) + ".*missing"):
        CheckpointReader(path).verify()


def test_index_points_at_a_shard_without_the_tensor(tiny_ckpt, tmp_path):
    path = corrupt_copy(tiny_ckpt, tmp_path / "c")
    name = "layers.2.attn.attn_sink"
    shard = rewrite_shard(path, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=re.escape(name) + ".*" + re.escape(shard.name)):
        CheckpointReader(path).verify()
    with pytest.raises(CheckpointError, match=re.escape(name)):
        read_everything(path)


def test_unexpected_tensor(tiny_ckpt, tmp_path):
    path = corrupt_copy(tiny_ckpt, tmp_path / "c")
    name = "layers.0.attn.compressor.ape"  # layer 0 is sliding-window only: no compressor
    shard = rewrite_shard(path, "layers.0.attn.attn_sink", lambda t: t.update({name: torch.zeros(4, 256)}))
    edit_index(path, lambda m: m.update({name: shard.name}))
    with pytest.raises(CheckpointError, match="unexpected tensor " + re.escape(repr(name))):
        CheckpointReader(path).verify()


def test_pickle_only_checkpoint_is_refused(tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(preset("tiny").to_hf_dict()))
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match=re.escape("pytorch_model.bin") + ".*pickle"):
        CheckpointReader(path)


@pytest.mark.parametrize("content", ['{"weight_map": {"a": ', '{"metadata": {}}', '[]', '{"weight_map": [1]}'])
def test_corrupt_index(tiny_ckpt, tmp_path, content):
    path = corrupt_copy(tiny_ckpt, tmp_path / "c")
    (path / INDEX).write_text(content)
    with pytest.raises(CheckpointError, match=re.escape(INDEX)):
        CheckpointReader(path)


def test_missing_or_invalid_config(tiny_ckpt, tmp_path):
    path = corrupt_copy(tiny_ckpt, tmp_path / "c")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        CheckpointReader(path)
    d = preset("tiny").to_hf_dict()
    d["o_groups"] = 3
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="o_groups"):
        CheckpointReader(path)


# ---- head_dim 192: FP8 blocks are 128x128 even when a dim is not a multiple of 128 -------------------------------
def test_ragged_fp8_blocks_load_per_spec_at_head_dim_192():
    """wkv of a head_dim-192 model is [192, D]: scale grid [2, D/128], rows 128..191 are the second (partial)
    block. Spec §5.2: W[o,i] = e4m3(w[o,i]) * 2^(S[o//128, i//128] - 127). transformers 5.23 derives the block
    size from the grid instead (192 / 2 = 96 rows) and so scales rows 96..127 with the second block's scale;
    this test pins our side to the spec formula and shows the two readings differ."""
    cfg = preset("tiny").replace(head_dim=192)
    # globals come first, then layer 0: stop there (generating the FP4 experts of every layer is slow)
    tensors = dict(itertools.takewhile(lambda nt: not nt[0].startswith("layers.1."), synthetic_tensors(cfg, seed=7)))
    assert set(global_tensors(cfg)) < set(tensors) and "layers.0.attn.wkv.scale" in tensors
    scale = torch.tensor([[120, 121], [117, 125]], dtype=torch.uint8)  # distinct per block
    tensors["layers.0.attn.wkv.scale"] = scale.view(torch.float8_e8m0fnu)
    model = DeepseekV4(cfg, Numerics.plain())
    load_official(model, tensors)
    wkv = model.layers[0].attn.wkv
    got = decode_fp8(wkv.weight, wkv.scale)
    values = tensors["layers.0.attn.wkv.weight"].float()  # e4m3 decode (every byte checked in test_quant)
    rows, cols = torch.arange(192)[:, None], torch.arange(cfg.hidden_size)[None, :]
    by_spec = values * torch.pow(2.0, scale[rows // 128, cols // 128].float() - 127)
    assert torch.equal(got, by_spec)
    by_grid = values * torch.pow(2.0, scale[rows // 96, cols // 128].float() - 127)  # transformers' reading
    assert not torch.equal(by_grid[96:128], by_spec[96:128]) and torch.equal(by_grid[:96], by_spec[:96])
