"""Caches as torch tensors on the executor's device: the torch executor's (device="cuda"/"cpu") and the TensorRT
executor's, which binds their addresses. Allocated once per session; a step never copies them to the host."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from dsv4c.graphs.cache import from_host, host_array
from dsv4c.targets.base import CacheSlot, check_host_arrays


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"cache dtype {name!r} is not a torch dtype")
    return dtype


class TorchCache:
    """`tensors`: the current caches, [batch, *shape] each, in manifest order. With `double_buffered` a same-sized
    `spare` set exists for an engine that cannot write its outputs over its inputs (TensorRT): it reads
    `tensors`, writes `spare`, then `swap()` exchanges the two; both sets are allocated here, once."""

    def __init__(self, slots: Sequence[CacheSlot], batch_size: int, device: str, double_buffered: bool = False,
                 tensors: list[torch.Tensor] | None = None):
        self.slots, self.batch_size, self.device = list(slots), batch_size, device
        self.tensors = tensors if tensors is not None else [
            torch.full((batch_size, *s.shape), s.fill, dtype=torch_dtype(s.dtype), device=device) for s in self.slots]
        self.spare = [torch.empty_like(t) for t in self.tensors] if double_buffered else None

    def write(self, new: Sequence[torch.Tensor]) -> None:
        """Copy a program's new caches into place (device to device), keeping these tensors."""
        for mine, value in zip(self.tensors, new):
            mine.copy_(value)

    def swap(self) -> None:
        self.tensors, self.spare = self.spare, self.tensors

    def reset(self, slot: int) -> None:
        for spec, tensor in zip(self.slots, self.tensors):
            tensor[slot].fill_(spec.fill)

    def take(self, slots: np.ndarray) -> "TorchCache":
        index = self._index(slots)
        return TorchCache(self.slots, len(index), self.device, self.spare is not None,
                          [t.index_select(0, index) for t in self.tensors])

    def put(self, slots: np.ndarray, part: "TorchCache") -> None:
        index = self._index(slots)
        for whole, piece in zip(self.tensors, part.tensors):
            whole.index_copy_(0, index, piece)

    def to_host(self) -> list[np.ndarray]:
        return [host_array(t.to("cpu", copy=True)) for t in self.tensors]

    def from_host(self, arrays: Sequence[np.ndarray]) -> None:
        check_host_arrays(self.slots, self.batch_size, arrays)
        for mine, value in zip(self.tensors, arrays):
            mine.copy_(from_host(np.ascontiguousarray(value)))

    def _index(self, slots: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(slots, dtype=np.int64), device=self.device)
