"""Cache layout per layer type: explicit tensors the caller owns (the runtime, the exported graphs).

Per sequence and layer (d = head_dim, m = compress ratio, c = 2 for CSA's overlapping windows else 1):

| field               | layers     | shape                          | holds                                        |
|---------------------|------------|--------------------------------|----------------------------------------------|
| win                 | all        | [W, d]                         | ring of the last W raw KV rows, slot pos % W |
| cmp                 | CSA, HCA   | [max_seq_len // m, d]          | compressed entry j at row j                  |
| cmp_state_kv/score  | CSA, HCA   | [c*m, c*d]                     | last c*m raw rows (kv, gate+ape), in order   |
| idx                 | CSA        | [max_seq_len // 4, d_I]        | indexer keys, entry j at row j               |
| idx_state_kv/score  | CSA        | [8, 2*d_I]                     | the indexer compressor's last 8 raw rows     |

Rows dtype: win, cmp and idx hold bf16 when the numerics round to bf16 (the reference's cache dtype, spec §4.1:
the values are bf16 already — FP8-simulated nope dims, bf16 RoPE dims, FP4-simulated indexer keys — so storing
them as bf16 is exact and halves the cache); float32 in plain numerics. Compressor state stays float32, as the
reference keeps it. Departure from the reference layout: compressor state is a shift register of the last c*m rows in
position order instead of [previous window | current window]; rows before position 0 are masked by position,
so a new sequence needs no explicit reset and a sequence that is idle in a batched step keeps its state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dsv4c.graphs.config import ModelConfig


@dataclass(frozen=True)
class CacheEntry:
    name: str  # e.g. "layers.3.cmp"
    field: str  # e.g. "cmp"
    shape: tuple[int, ...]
    fill: float = 0.0
    dtype: torch.dtype = torch.float32

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
                     rows_dtype: torch.dtype = torch.float32) -> list[CacheEntry]:
    """The layer's cache entries; `rows_dtype` for the ROW_FIELDS (bf16 under the reference numerics)."""
    d, W = cfg.head_dim, cfg.sliding_window
    shapes: dict[str, tuple[tuple[int, ...], float]] = {"win": ((batch, W, d), 0.0)}
    if ratio:
        c = 2 if ratio == 4 else 1
        shapes["cmp"] = ((batch, max_seq_len // ratio, d), 0.0)
        shapes["cmp_state_kv"] = ((batch, c * ratio, c * d), 0.0)
        shapes["cmp_state_score"] = ((batch, c * ratio, c * d), float("-inf"))
    if ratio == 4:
        di = cfg.index_head_dim
        shapes["idx"] = ((batch, max_seq_len // 4, di), 0.0)
        shapes["idx_state_kv"] = ((batch, 8, 2 * di), 0.0)
        shapes["idx_state_score"] = ((batch, 8, 2 * di), float("-inf"))
    return [CacheEntry(f"{prefix}.{f}", f, *shapes[f], dtype=rows_dtype if f in ROW_FIELDS else torch.float32)
            for f in layer_cache_fields(ratio)]


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
