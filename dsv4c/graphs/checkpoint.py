"""Official-format DeepSeek-V4 checkpoints: the expected tensor set, a verifying layer-by-layer reader, and a
writer of deterministic synthetic checkpoints in exactly the official layout (spec §5).

Layout: `config.json`, `model.safetensors.index.json` (weight_map + metadata.total_size), shards
`model-0000N-of-0000M.safetensors`. Names are the inference module names (no `model.` prefix, `.scale` for
e8m0 block scales, routed experts per index).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from dsv4c.graphs import quant
from dsv4c.graphs.config import ConfigError, ModelConfig

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPE_NAMES = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e8m0fnu: "F8_E8M0", torch.int8: "I8",
               torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}
DTYPE_BYTES = {torch.float8_e4m3fn: 1, torch.float8_e8m0fnu: 1, torch.int8: 1, torch.bfloat16: 2,
               torch.float32: 4, torch.int64: 8}


class CheckpointError(ValueError):
    """An invalid checkpoint; the message names the file or tensor first."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * DTYPE_BYTES[self.dtype]


# ---- the expected tensor set ----------------------------------------------------------------------------------
def _linear(specs: dict, name: str, out: int, inp: int, fmt: str) -> None:
    if fmt == "fp8":
        specs[f"{name}.weight"] = TensorSpec(f"{name}.weight", (out, inp), torch.float8_e4m3fn)
        specs[f"{name}.scale"] = TensorSpec(f"{name}.scale", (-(-out // 128), -(-inp // 128)), torch.float8_e8m0fnu)
    elif fmt == "fp4":
        specs[f"{name}.weight"] = TensorSpec(f"{name}.weight", (out, inp // 2), torch.int8)
        specs[f"{name}.scale"] = TensorSpec(f"{name}.scale", (out, inp // 32), torch.float8_e8m0fnu)
    else:
        specs[f"{name}.weight"] = TensorSpec(f"{name}.weight", (out, inp), torch.bfloat16)


def _put(specs: dict, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    specs[name] = TensorSpec(name, shape, dtype)


def _compressor(specs: dict, p: str, cfg: ModelConfig, ratio: int, d: int) -> None:
    c = 2 if ratio == 4 else 1
    _put(specs, f"{p}.ape", (ratio, c * d), torch.float32)
    _put(specs, f"{p}.wkv.weight", (c * d, cfg.hidden_size), torch.bfloat16)
    _put(specs, f"{p}.wgate.weight", (c * d, cfg.hidden_size), torch.bfloat16)
    _put(specs, f"{p}.norm.weight", (d,), torch.bfloat16)


def layer_tensors(cfg: ModelConfig, p: str, layer: int) -> dict[str, TensorSpec]:
    """The tensors of block `layer` under prefix p ("layers.3" or "mtp.0")."""
    specs: dict[str, TensorSpec] = {}
    D, H, hd, dense, ex = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.quantization.dense,
                           cfg.quantization.experts)
    mix = cfg.hc_mix_dim
    for part in ("attn", "ffn"):
        _put(specs, f"{p}.hc_{part}_fn", (mix, cfg.hc_mult * D), torch.float32)
        _put(specs, f"{p}.hc_{part}_base", (mix,), torch.float32)
        _put(specs, f"{p}.hc_{part}_scale", (3,), torch.float32)
    _put(specs, f"{p}.attn_norm.weight", (D,), torch.bfloat16)
    _put(specs, f"{p}.ffn_norm.weight", (D,), torch.bfloat16)
    a = f"{p}.attn"
    _put(specs, f"{a}.attn_sink", (H,), torch.float32)
    _linear(specs, f"{a}.wq_a", cfg.q_lora_rank, D, dense)
    _put(specs, f"{a}.q_norm.weight", (cfg.q_lora_rank,), torch.bfloat16)
    _linear(specs, f"{a}.wq_b", H * hd, cfg.q_lora_rank, dense)
    _linear(specs, f"{a}.wkv", hd, D, dense)
    _put(specs, f"{a}.kv_norm.weight", (hd,), torch.bfloat16)
    _linear(specs, f"{a}.wo_a", cfg.o_groups * cfg.o_lora_rank, H * hd // cfg.o_groups, dense)
    _linear(specs, f"{a}.wo_b", D, cfg.o_groups * cfg.o_lora_rank, dense)
    ratio = cfg.layer_ratio(layer)
    if ratio:
        _compressor(specs, f"{a}.compressor", cfg, ratio, hd)
    if ratio == 4:
        _linear(specs, f"{a}.indexer.wq_b", cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank, dense)
        _put(specs, f"{a}.indexer.weights_proj.weight", (cfg.index_n_heads, D), torch.bfloat16)
        _compressor(specs, f"{a}.indexer.compressor", cfg, 4, cfg.index_head_dim)
    f, I, E = f"{p}.ffn", cfg.moe_intermediate_size, cfg.n_routed_experts
    _put(specs, f"{f}.gate.weight", (E, D), torch.bfloat16)
    if layer < cfg.num_hash_layers:
        _put(specs, f"{f}.gate.tid2eid", (cfg.vocab_size, cfg.num_experts_per_tok), torch.int64)
    else:
        _put(specs, f"{f}.gate.bias", (E,), torch.float32)
    for w, (o, i) in {"w1": (I, D), "w2": (D, I), "w3": (I, D)}.items():
        _linear(specs, f"{f}.shared_experts.{w}", o, i, dense)
    for e in range(E):
        for w, (o, i) in {"w1": (I, D), "w2": (D, I), "w3": (I, D)}.items():
            _linear(specs, f"{f}.experts.{e}.{w}", o, i, ex)
    return specs


def global_tensors(cfg: ModelConfig) -> dict[str, TensorSpec]:
    D, V, n = cfg.hidden_size, cfg.vocab_size, cfg.hc_mult
    specs: dict[str, TensorSpec] = {}
    _put(specs, "embed.weight", (V, D), torch.bfloat16)
    _put(specs, "head.weight", (V, D), torch.bfloat16)
    _put(specs, "norm.weight", (D,), torch.bfloat16)
    _put(specs, "hc_head_fn", (n, n * D), torch.float32)
    _put(specs, "hc_head_base", (n,), torch.float32)
    _put(specs, "hc_head_scale", (1,), torch.float32)
    return specs


def mtp_extra_tensors(cfg: ModelConfig, p: str) -> dict[str, TensorSpec]:
    D, n = cfg.hidden_size, cfg.hc_mult
    specs: dict[str, TensorSpec] = {}
    _linear(specs, f"{p}.e_proj", D, D, cfg.quantization.dense)
    _linear(specs, f"{p}.h_proj", D, D, cfg.quantization.dense)
    for norm in ("enorm", "hnorm", "norm"):
        _put(specs, f"{p}.{norm}.weight", (D,), torch.bfloat16)
    _put(specs, f"{p}.hc_head_fn", (n, n * D), torch.float32)
    _put(specs, f"{p}.hc_head_base", (n,), torch.float32)
    _put(specs, f"{p}.hc_head_scale", (1,), torch.float32)
    return specs


def layer_prefixes(cfg: ModelConfig) -> list[tuple[str, int]]:
    main = [(f"layers.{i}", i) for i in range(cfg.num_hidden_layers)]
    return main + [(f"mtp.{i}", cfg.num_hidden_layers + i) for i in range(cfg.num_nextn_predict_layers)]


def expected_tensors(cfg: ModelConfig) -> dict[str, TensorSpec]:
    specs = dict(global_tensors(cfg))
    for p, layer in layer_prefixes(cfg):
        specs.update(layer_tensors(cfg, p, layer))
        if p.startswith("mtp."):
            specs.update(mtp_extra_tensors(cfg, p))
    return specs


# ---- reading ----------------------------------------------------------------------------------------------------
def _read_header(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated shard ({size} bytes, no safetensors header)")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated shard (header claims {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"tensor {name!r} in {path}: corrupt header entry (needs dtype, shape and "
                                  f"data_offsets [begin, end]), got {entry!r}")
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or padded shard (header describes {8 + n + end} bytes, file has "
                              f"{size}); re-download it")
    return header


class CheckpointReader:
    """Reads an official-format checkpoint directory shard by shard, one layer at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: checkpoint directory not found")
        self.weight_map = self._weight_map()
        try:
            self.config = ModelConfig.from_json_file(self.path / "config.json")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a weight_map)") from None
            if not (isinstance(weight_map, dict)
                    and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
                raise CheckpointError(f"{index}: `weight_map` must map tensor names to shard file names")
            return weight_map
        single = self.path / "model.safetensors"
        if single.is_file():
            return {name: single.name for name in _read_header(single)}
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(f"{self.path / pickles[0]}: pickle checkpoints are refused (they can run code); "
                                  "convert to safetensors")
        raise CheckpointError(f"{self.path}: no {INDEX} or model.safetensors")

    def verify(self) -> None:
        """Every expected tensor present with the right dtype and shape, nothing unexpected, shards whole."""
        expected = expected_tensors(self.config)
        missing = sorted(set(expected) - set(self.weight_map))
        if missing:
            raise CheckpointError(f"tensor {missing[0]!r} missing from {self.path / INDEX}"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        unexpected = sorted(set(self.weight_map) - set(expected))
        if unexpected:
            raise CheckpointError(f"unexpected tensor {unexpected[0]!r} in {self.path / self.weight_map[unexpected[0]]}"
                                  f" (not part of DeepSeek-V4 with this config.json)")
        by_shard: dict[str, list[str]] = {}
        for name, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        names = {v: k for k, v in DTYPE_NAMES.items()}
        for shard, tensors in sorted(by_shard.items()):
            file = self.path / shard
            if not file.is_file():
                raise CheckpointError(f"{file}: shard listed in {INDEX} is missing")
            header = _read_header(file)
            for name in tensors:
                if name not in header:
                    raise CheckpointError(f"tensor {name!r}: index points at {file} which does not hold it")
                spec, got = expected[name], header[name]
                dtype = names.get(got["dtype"])
                if dtype != spec.dtype or tuple(got["shape"]) != spec.shape:
                    raise CheckpointError(f"tensor {name!r} in {file}: {got['dtype']} {got['shape']}, expected "
                                          f"{DTYPE_NAMES[spec.dtype]} {list(spec.shape)}")

    def _tensor(self, name: str, handles: dict[str, object]) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} missing from {self.path / INDEX}")
        shard = self.weight_map[name]
        try:
            if shard not in handles:
                handles[shard] = safe_open(self.path / shard, framework="pt")
            return handles[shard].get_tensor(name)
        except Exception as e:  # safetensors raises its own error types (and OSError) for bad files
            raise CheckpointError(f"tensor {name!r} in {self.path / shard}: cannot be read ({e})") from None

    def sizes(self) -> dict[str, int]:
        """Each tensor's stored bytes, from the config (`verify` checks that the shards agree)."""
        return {name: spec.nbytes for name, spec in expected_tensors(self.config).items()}

    def read(self, names) -> dict[str, torch.Tensor]:
        """The named tensors, as safetensors hands them out: views of the memory-mapped shard, paged in when
        touched. Shard handles live for this call only: an open handle keeps every page read through it
        resident (RSS grew to the whole checkpoint when the reader cached them), while each tensor keeps just
        its own mapping alive, so memory follows what the caller still holds."""
        handles: dict[str, object] = {}
        return {n: self._tensor(n, handles) for n in names}

    def read_globals(self) -> dict[str, torch.Tensor]:
        return self.read(global_tensors(self.config))

    def read_layer(self, prefix: str) -> dict[str, torch.Tensor]:
        return self.read([n for n in self.weight_map if n.startswith(prefix + ".")])

    def iter_layers(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(prefix, tensors) per block, main layers then MTP. A plain `for prefix, tensors in ...` loop still
        holds the previous layer while the next one is read (the loop variable); `del tensors` at the end of
        the loop body keeps it to one layer."""
        for p, _ in layer_prefixes(self.config):
            yield p, self.read_layer(p)


# ---- writing ----------------------------------------------------------------------------------------------------
def _generator(seed: int, name: str) -> torch.Generator:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(h)


def _synthetic(cfg: ModelConfig, spec: TensorSpec, seed: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A deterministic value for one tensor (for a quantised linear: its (weight, scale) pair)."""
    g, name, shape = _generator(seed, spec.name), spec.name, spec.shape

    def randn(*s, std=1.0):
        return torch.randn(*s, generator=g).mul_(std)  # in place: one tensor's memory, the same bits as `* std`

    if name.endswith("tid2eid"):
        return torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: shape[1]] for _ in range(shape[0])])
    if name.endswith("_fn"):
        return randn(*shape, std=0.02 / shape[1] ** 0.5 * 8)
    if name.endswith("_base"):
        return randn(*shape, std=0.5)
    if name.endswith("_scale") and spec.dtype == torch.float32:
        return 0.5 + randn(*shape, std=0.1)
    if "norm" in name:
        return (1 + randn(*shape, std=0.1)).to(torch.bfloat16)
    if name.endswith("attn_sink"):
        return randn(*shape)
    if name.endswith("ape"):
        return randn(*shape, std=0.1)
    if name.endswith("gate.bias"):
        return randn(*shape, std=0.1)
    if name == "embed.weight":
        return randn(*shape, std=0.5).to(torch.bfloat16)
    return randn(*shape, std=shape[-1] ** -0.5).to(torch.bfloat16)


def synthetic_tensors(cfg: ModelConfig, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Official-format tensors, layer by layer (globals first), deterministic in (seed, name)."""
    groups = [global_tensors(cfg)]
    for p, layer in layer_prefixes(cfg):
        specs = layer_tensors(cfg, p, layer)
        if p.startswith("mtp."):
            specs.update(mtp_extra_tensors(cfg, p))
        groups.append(specs)
    for specs in groups:
        for name, spec in specs.items():
            if name.endswith(".scale"):
                continue  # written with its weight
            if name.endswith(".weight") and f"{name[:-7]}.scale" in specs:
                full = _synthetic(cfg, TensorSpec(name, _logical(spec), torch.bfloat16), seed)
                if spec.dtype == torch.int8:
                    w, s = quant.quantize_fp4(full.float())
                else:
                    w, s = quant.quantize_fp8_blocks(full.float())
                del full  # this frame holds no tensor the writer has stored (it writes one at a time)
                yield name, w
                del w
                yield f"{name[:-7]}.scale", s
                del s
            else:
                yield name, _synthetic(cfg, spec, seed).to(spec.dtype).contiguous()


def _logical(spec: TensorSpec) -> tuple[int, int]:
    return (spec.shape[0], spec.shape[1] * 2) if spec.dtype == torch.int8 else spec.shape


def write_checkpoint(out_dir: str | Path, cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]], *,
                     shard_bytes: int = 1 << 30, tokenizer_dir: str | Path | None = None) -> Path:
    """Write tensors as an official-format checkpoint; atomic (temp dir, then rename). Streams: each tensor goes to
    disk as it arrives (`_ShardWriter`), so memory holds one tensor of `tensors`, whatever the shard size."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        shards, current, total = [], None, 0
        for name, t in tensors:
            if current is None:
                current = _ShardWriter(tmp / f"shard-{len(shards)}.safetensors")
            current.add(name, t)
            total += t.numel() * t.element_size()
            del t  # the writer has it on disk: drop it before the generator makes the next one
            if current.nbytes >= shard_bytes:
                shards.append(current.close())
                current = None
        if current is not None:
            shards.append(current.close())
        weight_map = {}
        for i, (tmp_name, names) in enumerate(shards):
            final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            os.rename(tmp / tmp_name, tmp / final)
            weight_map.update({n: final for n in names})
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                            indent=2, sort_keys=True))
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "temperature": 1.0, "top_p": 1.0,
             "do_sample": True}, indent=2))
        if tokenizer_dir is not None:
            for f in ("tokenizer.json", "tokenizer_config.json"):
                if (Path(tokenizer_dir) / f).is_file():
                    shutil.copy(Path(tokenizer_dir) / f, tmp / f)
        _usual_modes(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _usual_modes(d: Path) -> None:
    """mkdtemp creates the directory 0700 and safetensors writes 0600 files: give them the modes the umask
    gives ordinary files, so a shared build cache or another user can read the checkpoint."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(d, 0o777 & ~mask)
    for f in d.iterdir():
        os.chmod(f, 0o666 & ~mask)


# safetensors lays the data out by dtype, in descending order of its Dtype enum, then by name (and the header in
# the same order); these are the official format's dtypes in that order. tests/test_checkpoint.py holds
# `_ShardWriter` to `safetensors.torch.save_file` byte for byte.
SAFETENSORS_ORDER = ("I64", "F32", "BF16", "F8_E8M0", "F8_E4M3", "I8")
COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # in the spill file
    nbytes: int


class _ShardWriter:
    """One safetensors shard written tensor by tensor, with the bytes `safetensors.torch.save_file` writes for the
    same tensors. save_file needs every tensor of the shard in memory and serialises them into a second buffer
    (2x a 1 GB shard, or 2x a whole small model); here each tensor's bytes go to a spill file when they arrive,
    and `close` writes the header, then copies the data from the spill file in safetensors' order."""

    def __init__(self, path: Path):
        self.path = path
        self.spill_path = path.with_name(path.name + ".spill")
        self.spill = open(self.spill_path, "w+b")
        self.entries: list[_Entry] = []
        self.nbytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        dtype = DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise ValueError(f"tensor {name!r}: {t.dtype} is not an official-format dtype "
                             f"({', '.join(DTYPE_NAMES.values())})")
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # a view: no copy
        self.spill.write(data)
        self.entries.append(_Entry(name, dtype, tuple(t.shape), self.nbytes, data.nbytes))
        self.nbytes += data.nbytes

    def close(self) -> tuple[str, list[str]]:
        """Write the shard; returns its file name and the names of its tensors."""
        order = sorted(self.entries, key=lambda e: (SAFETENSORS_ORDER.index(e.dtype), e.name))
        header: dict = {"__metadata__": {"format": "pt"}}
        at = 0
        for e in order:
            header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [at, at + e.nbytes]}
            at += e.nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.spill.flush()
        try:
            with open(self.path, "wb") as out:
                out.write(struct.pack("<Q", len(raw)) + raw)
                out.flush()
                for e in order:
                    _copy_range(self.spill, e.offset, out, e.nbytes)
        finally:
            self.spill.close()
            self.spill_path.unlink()
        return self.path.name, [e.name for e in self.entries]


def _copy_range(src, offset: int, dst, n: int) -> None:
    """`n` bytes of `src` from `offset` appended to `dst`, in the kernel where it can (no user-space buffer)."""
    while n:
        try:
            done = os.copy_file_range(src.fileno(), dst.fileno(), min(n, COPY_CHUNK), offset)
        except (AttributeError, OSError):  # no copy_file_range here (platform, filesystem): a bounded buffer
            done = 0
        if not done:
            src.seek(offset)
            chunk = src.read(min(n, COPY_CHUNK))
            if not chunk:
                raise OSError(f"{src.name}: {n} bytes short (the spill file was truncated)")
            dst.write(chunk)
            dst.flush()
            done = len(chunk)
        offset += done
        n -= done


def write_synthetic_checkpoint(out_dir: str | Path, cfg: ModelConfig, seed: int = 0,
                               tokenizer_dir: str | Path | None = None, shard_bytes: int = 1 << 30) -> Path:
    return write_checkpoint(out_dir, cfg, synthetic_tensors(cfg, seed), shard_bytes=shard_bytes,
                            tokenizer_dir=tokenizer_dir)
