"""Cache layout per layer type: explicit tensors the caller owns (the runtime, the exported graphs).

Per sequence and layer (d = head_dim, m = compress ratio, c = 2 for CSA's overlapping windows else 1):

| field               | layers     | shape                          | holds                                        |
|---------------------|------------|--------------------------------|----------------------------------------------|
| win                 | all        | [W, d]                         | ring of the last W raw KV rows, slot pos % W |
| cmp                 | CSA, HCA   | [max_seq_len // m, d]          | compressed entry j at row j                  |
| cmp_state_kv/score  | CSA, HCA   | [c*m, c*d]                     | last c*m raw rows (kv, gate+ape), in order   |
| idx                 | CSA        | [max_seq_len // 4, d_I]        | indexer keys, entry j at row j               |
| idx_state_kv/score  | CSA        | [8, 2*d_I]                     | the indexer compressor's last 8 raw rows     |

All float32 here (the CPU computes in fp32; values already carry the reference's bf16/FP8 rounding).
Departure from the reference layout: compressor state is a shift register of the last c*m rows in
position order instead of [previous window | current window]; rows before position 0 are masked by position,
so a new sequence needs no explicit reset and a sequence that is idle in a batched step keeps its state.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def layer_cache_spec(cfg: ModelConfig, prefix: str, ratio: int, batch: int, max_seq_len: int) -> list[CacheEntry]:
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
    return [CacheEntry(f"{prefix}.{f}", f, *shapes[f]) for f in layer_cache_fields(ratio)]
