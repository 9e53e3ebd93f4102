"""Export stage: the model -> two torch.export programs, the one IR every target lowers.

    prefill: tokens [B, S] (S dynamic, >= 2), start_pos [B], n_valid [B], cache... -> logits [B, V], cache...
    decode:  tokens [B, 1],                   start_pos [B], n_valid [B], cache... -> logits [B, V], cache...

Both have a dynamic batch. The cache tensors are inputs and outputs in `DeepseekV4.cache_spec` order; their
names (`cache_names`) are the contract with the runtime, which feeds outputs back as the next inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from dsv4c.graphs.model import DeepseekV4
from dsv4c.graphs.ops.onnx import forget_export_trace

PROGRAMS = ("prefill", "decode")


class StepProgram(nn.Module):
    """Flat-signature wrapper: (tokens, start_pos, n_valid, cache) -> (logits, *new_cache)."""

    def __init__(self, model: DeepseekV4):
        super().__init__()
        self.model = model

    def forward(self, tokens, start_pos, n_valid, cache):
        logits, new_cache = self.model(tokens, start_pos, n_valid, cache)
        return (logits, *new_cache)


@dataclass(frozen=True)
class ProgramSignature:
    inputs: list[str]
    outputs: list[str]


def io_names(model: DeepseekV4, max_seq_len: int) -> ProgramSignature:
    cache = [e.name for e in model.cache_spec(1, max_seq_len)]
    return ProgramSignature(inputs=["tokens", "start_pos", "n_valid"] + [f"cache_in.{n}" for n in cache],
                            outputs=["logits"] + [f"cache_out.{n}" for n in cache])


def weightless_model(cfg, numerics, expert_format: str, shard=None) -> DeepseekV4:
    """The model with every tensor on the meta device: what export traces. The programs then carry no weights;
    the lowering writes them from the checkpoint (`write_onnx_program(..., weights=)`, graphs.streamed), so
    exporting costs the same memory at any depth."""
    with torch.device("meta"):
        return DeepseekV4(cfg, numerics, expert_format, shard).eval()


def program_weights(model) -> Callable[[str], torch.Tensor]:
    """Initializer name of an exported program (`StepProgram`'s paths, "model.<buffer>") -> the tensor of the
    streamed `model` (graphs.streamed)."""
    return lambda name: model.streamed.tensor(name.removeprefix("model."))


def export_program(model: DeepseekV4, program: str, max_batch: int, max_seq_len: int) -> ExportedProgram:
    """torch.export one step program with a dynamic batch (and a dynamic length for prefill)."""
    if program not in PROGRAMS:
        raise ValueError(f"unknown program {program!r}; expected one of {PROGRAMS}")
    # The example batch is always 2, even for a batch-1 engine: torch.export specialises a dimension whose example
    # size is 1 (0/1 specialisation), which then violates the dynamic `batch` Dim ("Constraints violated (batch)").
    # The exported graph serves every batch in 1..max(max_batch, 2); the runtime never feeds more than max_batch.
    example_batch = 2
    seqlen = 7 if program == "prefill" else 1
    device = model.embed.device  # "meta": a program without weights (`weightless_model`); every input alike
    cache = tuple(c.to(device) for c in model.new_cache(example_batch, max_seq_len))
    args = (torch.ones(example_batch, seqlen, dtype=torch.long, device=device),
            torch.zeros(example_batch, dtype=torch.long, device=device),
            torch.full((example_batch,), seqlen, dtype=torch.long, device=device), cache)
    batch = Dim("batch", min=1, max=max(max_batch, 2))
    tokens_dims = {0: batch, 1: Dim("seq", min=2, max=max_seq_len)} if program == "prefill" else {0: batch}
    dynamic = (tokens_dims, {0: batch}, {0: batch}, tuple({0: batch} for _ in cache))
    with torch.no_grad():
        program = torch.export.export(StepProgram(model.eval()), args, dynamic_shapes=dynamic, strict=False)
    forget_export_trace()
    return program
