"""Cache layout per layer type: explicit tensors the caller owns (the runtime, the exported graphs).

Per sequence and layer (d = head_dim, m = compress ratio, c = 2 for CSA's overlapping windows else 1):

| field               | layers     | shape                          | holds                                        |
|---------------------|------------|--------------------------------|----------------------------------------------|
| win                 | all        | [W, d]                         | ring of the last W raw KV rows, slot pos % W |
| cmp                 | CSA, HCA   | [max_seq_len // m, d]          | compressed entry j at row j                  |
| cmp_state_kv/score  | CSA, HCA   | [c*m, c*d]                     | ring of the last c*m raw rows (kv, gate+ape) |
| idx                 | CSA        | [max_seq_len // 4, d_I]        | indexer keys, entry j at row j               |
| idx_state_kv/score  | CSA        | [8, 2*d_I]                     | the indexer compressor's last 8 raw rows     |

Rows format (`RowFormat`): under the recipe's FP8 KV, win and cmp rows are packed FP8 rows (quant.pack_kv_fp8:
e4m3 non-RoPE dims + bf16 RoPE dims + e8m0 scales, 584 bytes for V4's 512 dims, spec §4.2), and under FP4 indexer
keys idx rows are packed FP4 (quant.pack_fp4_rows, 68 bytes for 128 dims). Unpacked they are exactly the values the
reference's QAT simulation computes and stores as bf16 (spec §4.1), so the cache shrinks without changing a value.
Rows that are not packed are bf16 when the numerics round to bf16 (exact, as above), float32 in plain numerics. Compressor state stays float32, as the
reference keeps it. Departure from the reference layout: compressor state is a ring of the last c*m rows (position
p at slot p % (c*m), like the window) instead of [previous window | current window]; rows before position 0 are
masked by position, so a new sequence needs no explicit reset and a sequence that is idle in a batched step keeps its
state. A decode step writes its row in place and pools a closing window straight from the ring (model.Compressor).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dsv4c.graphs import quant
from dsv4c.graphs.config import ModelConfig


@dataclass(frozen=True)
class RowFormat:
    """How the cache stores its rows (ROW_FIELDS): `dtype` for rows kept as values; `kv_fp8` packs win / cmp rows
    (quant.pack_kv_fp8), `idx_fp4` packs idx rows (quant.pack_fp4_rows), both as uint8."""

    dtype: torch.dtype = torch.float32
    kv_fp8: bool = False
    idx_fp4: bool = False


@dataclass(frozen=True)
class CacheEntry:
    name: str  # e.g. "layers.3.cmp"
    field: str  # e.g. "cmp"
    shape: tuple[int, ...]
    fill: float = 0.0
    dtype: torch.dtype = torch.float32
    packing: str = ""  # "kv_fp8" / "fp4": uint8 rows in that packed format (RowFormat); "" for values

    def empty(self, device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.full(self.shape, self.fill, dtype=self.dtype, device=device)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty(0, dtype=self.dtype).element_size()


def layer_cache_fields(ratio: int) -> list[str]:
    fields = ["win"]
    if ratio:
        fields += ["cmp", "cmp_state_kv", "cmp_state_score"]
    if ratio == 4:
        fields += ["idx", "idx_state_kv", "idx_state_score"]
    return fields


ROW_FIELDS = ("win", "cmp", "idx")  # cache rows (raw or compressed KV, indexer keys); the rest: compressor state


def layer_cache_spec(cfg: ModelConfig, prefix: str, ratio: int, batch: int, max_seq_len: int,
                     rows: RowFormat = RowFormat()) -> list[CacheEntry]:
    """The layer's cache entries; `rows` says how the ROW_FIELDS are stored (packed under the recipe's formats)."""
    d, W, di = cfg.head_dim, cfg.sliding_window, cfg.index_head_dim
    kv_width = quant.kv_row_bytes(d, cfg.qk_rope_head_dim) if rows.kv_fp8 else d
    idx_width = quant.fp4_row_bytes(di) if rows.idx_fp4 else di
    shapes: dict[str, tuple[tuple[int, ...], float]] = {"win": ((batch, W, kv_width), 0.0)}
    if ratio:
        c = 2 if ratio == 4 else 1
        shapes["cmp"] = ((batch, max_seq_len // ratio, kv_width), 0.0)
        shapes["cmp_state_kv"] = ((batch, c * ratio, c * d), 0.0)
        shapes["cmp_state_score"] = ((batch, c * ratio, c * d), float("-inf"))
    if ratio == 4:
        shapes["idx"] = ((batch, max_seq_len // 4, idx_width), 0.0)
        shapes["idx_state_kv"] = ((batch, 8, 2 * di), 0.0)
        shapes["idx_state_score"] = ((batch, 8, 2 * di), float("-inf"))
    kv = "kv_fp8" if rows.kv_fp8 else ""
    packing = {"win": kv, "cmp": kv, "idx": "fp4" if rows.idx_fp4 else ""}  # the rest: compressor state, float32
    return [CacheEntry(f"{prefix}.{f}", f, *shapes[f], dtype=_field_dtype(f, packing.get(f, ""), rows),
                       packing=packing.get(f, "")) for f in layer_cache_fields(ratio)]


def _field_dtype(field: str, packing: str, rows: RowFormat) -> torch.dtype:
    if packing:
        return torch.uint8
    return rows.dtype if field in ROW_FIELDS else torch.float32


def row_values(rows: np.ndarray, packing: str, cfg: ModelConfig) -> np.ndarray:
    """A cache tensor's rows as float32 values [..., width] (packed rows unpacked), for comparing caches."""
    if not packing:
        return np.asarray(rows, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(rows))
    if packing == "kv_fp8":
        return quant.unpack_kv_fp8(t, cfg.head_dim, cfg.qk_rope_head_dim).numpy()
    return quant.unpack_fp4_rows(t, cfg.index_head_dim).numpy()


# ---- host arrays: numpy has no bfloat16; ml_dtypes' (an onnx dependency) carries bf16 caches on the host -------
def host_array(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array sharing its memory; bf16 as ml_dtypes.bfloat16."""
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def from_host(a: np.ndarray) -> torch.Tensor:
    """host_array's inverse (shares memory); an ml_dtypes.bfloat16 array becomes a torch bf16 tensor."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
