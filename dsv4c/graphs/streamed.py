"""Weights that stay in the checkpoint until a block needs them: the build's working set, bounded whatever the depth.

`streamed_model` builds DeepseekV4 with its weight buffers on the meta device. A block (a main layer, an MTP block)
gets its buffers read from the official checkpoint and converted (`load_official`, the same conversion as a whole
load) when one of its modules runs; before another block is read, blocks are given back, the least recently used
first, until it fits `budget` bytes beside those left. The globals (embedding, head, final mixing) are read once
and kept: every step needs them (`release` gives back everything, globals too; the next forward reads them again).
`StreamedWeights.tensor(name)` serves one buffer the same way, for the lowering to write the weights from the
checkpoint straight into the engine's data files (`write_onnx_program(..., weights=)`).

A model that fits in `budget` ends up wholly resident, as a whole load would leave it; a bigger one is re-read
block by block on each forward (from the page cache when it fits there), the price of a working set of one block.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import torch
from torch import nn

from dsv4c.graphs.checkpoint import CheckpointError, CheckpointReader, layer_prefixes
from dsv4c.graphs.model import Attention, DeepseekV4, Numerics, load_official, module_name, rope_frequencies
from dsv4c.graphs.parallel import Shard
from dsv4c.heap import trim_heap

# Bytes of blocks kept resident between uses (besides the globals and the block running). The blocks run in a
# cycle, so an LRU smaller than all of them hits nothing: a model whose blocks fit (tiny) stays resident, any other
# streams, and its working set is one block whatever the depth.
DEFAULT_BUDGET = 64 << 20
READ_CHUNK = 256 << 20  # checkpoint bytes paged in at once while a block is converted
GLOBALS = "globals"


def streamed_model(reader: CheckpointReader, numerics: Numerics | None = None, expert_format: str | None = None,
                   shard: Shard | None = None, budget: int = DEFAULT_BUDGET) -> DeepseekV4:
    """DeepseekV4 (or one rank's shard) on an official-format checkpoint, its weights read block by block as the
    blocks run (module docstring). The weights object is `model.streamed`."""
    with torch.device("meta"):
        model = DeepseekV4(reader.config, numerics, expert_format, shard)
    for m in model.modules():  # the one computed buffer: real values, not meta
        if isinstance(m, Attention):
            m.freqs = rope_frequencies(reader.config, yarn=m.ratio != 0)
    model.streamed = StreamedWeights(model, reader, budget)
    return model.eval()


class StreamedWeights:
    """Which checkpoint tensors fill which buffers, block by block, and which blocks are resident now."""

    def __init__(self, model: DeepseekV4, reader: CheckpointReader, budget: int):
        self.model, self.reader, self.budget = model, reader, budget
        self.sizes = reader.sizes()  # checkpoint bytes per tensor, for the read chunks (once: every re-read uses it)
        prefixes = [p for p, _ in layer_prefixes(reader.config)]
        self.official: dict[str, list[str]] = {b: [] for b in (GLOBALS, *prefixes)}  # block -> checkpoint names
        self.owner: dict[str, str] = {}  # model buffer name -> its block
        for name in reader.weight_map:
            block = next((p for p in prefixes if name.startswith(p + ".")), GLOBALS)
            self.official[block].append(name)
            self.owner[module_name(name)[0]] = block
        persistent = set(model.state_dict())
        unfilled = sorted(persistent - set(self.owner))
        if unfilled:
            raise CheckpointError(f"{reader.path}: no checkpoint tensor fills model buffer(s) {unfilled[:5]}")
        self.buffers: dict[str, list[str]] = {b: [] for b in self.official}
        for name in sorted(persistent):
            self.buffers[self.owner[name]].append(name)
        self.block_bytes = {b: sum(_nbytes(model.get_buffer(n)) for n in names)
                            for b, names in self.buffers.items() if b != GLOBALS}
        self.held: OrderedDict[str, int] = OrderedDict()  # resident block -> bytes, least recently used first
        self.reads = 0  # blocks read from the checkpoint so far (each re-read counts)
        self._materialise(GLOBALS)
        # the globals are kept from here on; after `release` the next forward reads them again
        model.register_forward_pre_hook(lambda _m, _a: self.need(GLOBALS))
        for block in prefixes:  # "layers.3", "mtp.0": the prefix is the block's module path
            for module in model.get_submodule(block).modules():
                module.register_forward_pre_hook(lambda _m, _a, block=block: self.need(block))

    def tensor(self, name: str) -> torch.Tensor:
        """Model buffer `name` (a state-dict path, or a computed buffer such as `freqs`) with its values."""
        block = self.owner.get(name)
        if block is not None:
            self.need(block)
        return self.model.get_buffer(name)

    def need(self, block: str) -> None:
        """Make `block` resident: if it is not, first give back blocks (least recently used first) until it fits
        the budget beside those left — before reading it, so two big blocks are never held at once (measured at
        V4-Flash width: 10.3 GB instead of 6.4 while the lowering moved from one layer to the next)."""
        if block in self.held:
            self.held.move_to_end(block)
            return
        blocks = [b for b in self.held if b != GLOBALS]  # least recently used first
        while blocks and sum(self.held[b] for b in blocks) + self.block_bytes.get(block, 0) > self.budget:
            self._release(blocks.pop(0))
        self._materialise(block)

    def release(self) -> None:
        """Give back every resident block and the globals: the validation does, once the reference has run, so
        the engine it checks runs without the reference's weights beside it. Anything used later is read again."""
        for block in list(self.held):
            self._release(block)

    @property
    def streaming(self) -> bool:
        """Whether blocks are re-read on each use (the model's blocks exceed the budget)."""
        return sum(self.block_bytes.values()) > self.budget

    def _materialise(self, block: str) -> None:
        nbytes = 0
        for name in self.buffers[block]:
            meta = self.model.get_buffer(name)
            self._set(name, torch.empty(meta.shape, dtype=meta.dtype))
            nbytes += _nbytes(meta)
        for names in _chunks(self.official[block], self.sizes):
            load_official(self.model, self.reader.read(names))  # each chunk's mapped pages dropped after it
        self.held[block] = nbytes
        self.reads += 1

    def _release(self, block: str) -> None:
        for name in self.buffers[block]:
            real = self.model.get_buffer(name)
            self._set(name, torch.empty(real.shape, dtype=real.dtype, device="meta"))
        del self.held[block]
        trim_heap()

    def _set(self, name: str, value: torch.Tensor) -> None:
        path, _, leaf = name.rpartition(".")
        module: nn.Module = self.model.get_submodule(path) if path else self.model
        module._buffers[leaf] = value


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _chunks(names: list[str], sizes: dict[str, int]) -> Iterator[list[str]]:
    """`names` in groups of about READ_CHUNK bytes (`sizes`: bytes per name), a weight always with its scale (a
    transcode or a rank's slice of a scale needs both)."""
    stems: dict[str, list[str]] = {}
    for n in names:
        stems.setdefault(n.rsplit(".", 1)[0], []).append(n)
    chunk, held = [], 0
    for group in stems.values():
        chunk += group
        held += sum(sizes.get(n, 0) for n in group)
        if held >= READ_CHUNK:
            yield chunk
            chunk, held = [], 0
    if chunk:
        yield chunk
