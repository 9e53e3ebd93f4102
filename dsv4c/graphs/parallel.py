"""Tensor and expert parallelism: which slice of each weight a rank holds, and the collectives between ranks.

The mesh (recipe `target.parallel`, pipeline 1): world = tensor * data ranks, rank r = d * tensor + t.
  * tensor parallel, inside each tensor group (the `tensor` consecutive ranks of one data replica), as DeepSeek's
    convert.py shards (spec §5.3): attention heads (wq_b rows, attn_sink) and o-groups (wo_a rows; wo_b columns,
    its partial sums all-reduced), the indexer's heads (wq_b rows, weights_proj rows; the head-partial scores are
    all-reduced before the top-k, spec §2.5) and the vocabulary (embedding rows, masked and all-reduced; head
    rows, logits all-gathered);
  * expert parallel, inside each expert group (the `expert` consecutive ranks r // expert): rank r holds routed
    experts [(r % expert) * E / expert, ...), and the routed outputs are all-reduced (before the shared expert is
    added, as the reference does);
  * everything else is replicated (wq_a, wkv, compressors, the gate, the shared expert, hc, norms).
The data replicas of a tensor group run the same batch (their purpose here is more devices to spread the
experts over; splitting the batch between them is not implemented).

Collectives are ops of the IR (`dsv4::all_reduce`, `dsv4::all_gather`, registry.py) naming a group by kind
(GROUP_TENSOR, GROUP_EXPERT); every rank's program is the same graph over its own slices, so every rank meets
the same collectives in the same order. Their torch implementation runs on the process groups `setup` made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dsv4c.graphs.quant import FP8_BLOCK

GROUP_TENSOR = 0  # the ranks of one tensor group (attention, indexer, vocabulary)
GROUP_EXPERT = 1  # the ranks of one expert group (routed experts)
GROUP_NAMES = {GROUP_TENSOR: "tensor", GROUP_EXPERT: "expert"}


@dataclass(frozen=True)
class Shard:
    """What one rank of a mesh computes. The default is the single-device model."""

    rank: int = 0
    tensor: int = 1
    expert: int = 1
    data: int = 1
    # wo_b split by its input (row-parallel, partial sums all-reduced) when each rank's input is whole
    # activation-quant blocks; else replicated, with its input all-gathered (see `splits_wo_b`)
    split_wo_b: bool = True

    @property
    def world(self) -> int:
        return self.tensor * self.data

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor

    @property
    def ep_rank(self) -> int:
        return self.rank % self.expert

    def group_ranks(self, group: int) -> tuple[int, ...]:
        size = self.tensor if group == GROUP_TENSOR else self.expert
        first = self.rank // size * size
        return tuple(range(first, first + size))

    def group_size(self, group: int) -> int:
        return self.tensor if group == GROUP_TENSOR else self.expert

    def part(self, total: int, group: int) -> range:
        """This rank's contiguous share of `total` (heads, rows, experts, vocabulary) split over `group`."""
        size, index = (self.tensor, self.tp_rank) if group == GROUP_TENSOR else (self.expert, self.ep_rank)
        if total % size:
            raise ValueError(f"{total} does not split {size} ways")
        n = total // size
        return range(index * n, (index + 1) * n)

    @classmethod
    def for_rank(cls, cfg: Any, rank: int, parallel: Any) -> "Shard":
        """The shard of `rank` of model `cfg` under a recipe's `target.parallel` (tensor, expert, data; pipeline 1)."""
        return cls(rank=rank, tensor=parallel.tensor, expert=parallel.expert, data=parallel.data,
                   split_wo_b=splits_wo_b(cfg, parallel.tensor))


def splits_wo_b(cfg: Any, tensor: int) -> bool:
    """Whether wo_b is row-parallel at this tensor degree. Its input is FP8-quantised per 128 channels (W8A8):
    a rank whose share of the input (its o-groups x o_lora_rank) is not whole 128-channel blocks cannot compute
    its blocks' scales alone, so wo_b then stays whole on every rank and its input is all-gathered instead
    (small models only: V4-Flash at tensor 8 holds 1 x 1024 channels per rank)."""
    return (cfg.o_groups // tensor * cfg.o_lora_rank) % FP8_BLOCK == 0


# ---- which official tensors are split, and how -----------------------------------------------------------------
# Official-name suffix -> (dim split over the tensor group). Everything else is replicated, except routed experts.
TENSOR_SPLIT = {
    "attn.wq_b.weight": 0, "attn.wq_b.scale": 0, "attn.wo_a.weight": 0, "attn.wo_a.scale": 0,
    "attn.wo_b.weight": 1, "attn.wo_b.scale": 1, "attn.attn_sink": 0,
    "attn.indexer.wq_b.weight": 0, "attn.indexer.wq_b.scale": 0, "attn.indexer.weights_proj.weight": 0,
}
VOCAB_SPLIT = ("embed.weight", "head.weight")


def split_dim(name: str, shard: Shard) -> int | None:
    """The dim an official tensor is split along over the tensor group, or None (replicated / routed expert)."""
    if shard.tensor == 1:
        return None
    if name in VOCAB_SPLIT:
        return 0
    if not shard.split_wo_b and (name.endswith(".attn.wo_b.weight") or name.endswith(".attn.wo_b.scale")):
        return None
    for suffix, dim in TENSOR_SPLIT.items():
        if name.endswith("." + suffix):
            return dim
    return None


def block_slice(total: int, part: range, block: int) -> slice:
    """The scale blocks (of `block` rows) covering rows `part` of `total`: a shard is either whole blocks or lies
    inside one block (then it keeps that block's scale: exact). A shard straddling a block boundary cannot be
    described by its own block scales; `plan` refuses such layouts before anything is read."""
    if len(part) % block == 0 and part.start % block == 0:
        return slice(part.start // block, part.stop // block)
    if part.start // block == (part.stop - 1) // block:
        return slice(part.start // block, part.start // block + 1)
    raise ValueError(f"rows {part.start}..{part.stop - 1} of {total} straddle a {block}-row scale block")


def shard_tensor(name: str, t: torch.Tensor, weight_rows: int | None, shard: Shard) -> torch.Tensor:
    """This rank's slice of official tensor `name` (weights and their FP8 block scales; `weight_rows` is the
    weight's size along the split dim, for a scale tensor). Replicated tensors come back whole."""
    dim = split_dim(name, shard)
    if dim is None:
        return t
    if name.endswith(".scale"):
        rows = shard.part(weight_rows, GROUP_TENSOR)
        return t.narrow(dim, *_start_len(block_slice(weight_rows, rows, FP8_BLOCK))).contiguous()
    rows = shard.part(t.shape[dim], GROUP_TENSOR)
    return t.narrow(dim, rows.start, len(rows)).contiguous()


def _start_len(s: slice) -> tuple[int, int]:
    return s.start, s.stop - s.start


def local_expert(expert: int, n_experts: int, shard: Shard) -> int | None:
    """Routed expert `expert`'s index among this rank's experts, or None when another rank holds it."""
    mine = shard.part(n_experts, GROUP_EXPERT)
    return expert - mine.start if expert in mine else None


def straddling_shards(cfg: Any, tensor: int) -> list[str]:
    """The FP8 tensors whose tensor-parallel shards would straddle a 128-row scale block (each names the tensor,
    its shape and the shard size): the layouts `plan` refuses."""
    if tensor == 1 or cfg.quantization.dense != "fp8":
        return []
    H, d, G = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups
    split = {
        "attn.wq_b": ((H * d, cfg.q_lora_rank), 0),
        "attn.wo_a": ((G * cfg.o_lora_rank, H * d // G), 0),
    }
    if splits_wo_b(cfg, tensor):
        split["attn.wo_b"] = ((cfg.hidden_size, G * cfg.o_lora_rank), 1)
    if 4 in cfg.compress_ratios:
        split["attn.indexer.wq_b"] = ((cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank), 0)
    bad = []
    for name, (shape, dim) in split.items():
        total = shape[dim]
        if total % tensor:
            continue  # not divisible at all: reported by the head/group divisibility checks
        n = total // tensor
        try:
            for i in range(tensor):
                block_slice(total, range(i * n, (i + 1) * n), FP8_BLOCK)
        except ValueError:
            bad.append(f"{name} {list(shape)}: {total} / tensor {tensor} = {n} along dim {dim} splits a "
                       f"{FP8_BLOCK}x{FP8_BLOCK} FP8 scale block")
    return bad


# ---- collectives -----------------------------------------------------------------------------------------------
_GROUPS: dict[int, Any] = {}  # GROUP_* -> this process's torch.distributed group (set up by `setup`)


def setup(shard: Shard) -> None:
    """Create this rank's process groups. torch.distributed must be initialised (world = shard.world); every rank
    calls this once, in the same order, because creating a group is itself collective."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("parallel.setup needs torch.distributed initialised (init_process_group) first")
    if dist.get_world_size() != shard.world or dist.get_rank() != shard.rank:
        raise RuntimeError(f"process group is rank {dist.get_rank()} of {dist.get_world_size()}, the shard says "
                           f"rank {shard.rank} of {shard.world}")
    for group in GROUP_NAMES:
        size = shard.group_size(group)
        for first in range(0, shard.world, size):  # every rank creates every group, in this order
            pg = dist.new_group(list(range(first, first + size)))
            if shard.group_ranks(group)[0] == first:
                _GROUPS[group] = pg


def teardown() -> None:
    _GROUPS.clear()


def _group(group: int):
    if group not in _GROUPS:
        raise RuntimeError(f"a {GROUP_NAMES.get(group, group)}-group collective ran outside a mesh "
                           "(parallel.setup was not called in this process)")
    return _GROUPS[group]


def all_reduce(x: torch.Tensor, group: int) -> torch.Tensor:
    """Sum of x over the ranks of `group` (a new tensor)."""
    import torch.distributed as dist

    y = x.float().clone()
    dist.all_reduce(y, group=_group(group))
    return y


def all_gather(x: torch.Tensor, group: int, size: int) -> torch.Tensor:
    """x of every rank of `group` concatenated along the last dim, in rank order."""
    import torch.distributed as dist

    pg = _group(group)
    parts = [torch.empty_like(x, dtype=torch.float32) for _ in range(size)]
    dist.all_gather(parts, x.float().contiguous(), group=pg)
    return torch.cat(parts, dim=-1)
