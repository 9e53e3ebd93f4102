"""Export stage: the model -> two torch.export programs, the one IR every target lowers.

    prefill: tokens [B, S] (S dynamic, >= 2), start_pos [B], n_valid [B], cache... -> logits [B, V], cache...
    decode:  tokens [B, 1],                   start_pos [B], n_valid [B], cache... -> logits [B, V], cache...

Both have a dynamic batch. The cache tensors are inputs and outputs in `DeepseekV4.cache_spec` order; their
names (`cache_names`) are the contract with the runtime, which feeds outputs back as the next inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from dsv4c.graphs.model import DeepseekV4

PROGRAMS = ("prefill", "decode")
# The programs embed the weights: the export stage stores them for models this small (and `plan` sizes disk so)
STORE_EXPORT_MAX_BYTES = 2 << 30


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


def export_program(model: DeepseekV4, program: str, max_batch: int, max_seq_len: int) -> ExportedProgram:
    """torch.export one step program with a dynamic batch (and a dynamic length for prefill)."""
    if program not in PROGRAMS:
        raise ValueError(f"unknown program {program!r}; expected one of {PROGRAMS}")
    # The example batch is always 2, even for a batch-1 engine: torch.export specialises a dimension whose example
    # size is 1 (0/1 specialisation), which then violates the dynamic `batch` Dim ("Constraints violated (batch)").
    # The exported graph serves every batch in 1..max(max_batch, 2); the runtime never feeds more than max_batch.
    example_batch = 2
    seqlen = 7 if program == "prefill" else 1
    cache = model.new_cache(example_batch, max_seq_len)
    args = (torch.ones(example_batch, seqlen, dtype=torch.long), torch.zeros(example_batch, dtype=torch.long),
            torch.full((example_batch,), seqlen, dtype=torch.long), cache)
    batch = Dim("batch", min=1, max=max(max_batch, 2))
    tokens_dims = {0: batch, 1: Dim("seq", min=2, max=max_seq_len)} if program == "prefill" else {0: batch}
    dynamic = (tokens_dims, {0: batch}, {0: batch}, tuple({0: batch} for _ in cache))
    with torch.no_grad():
        return torch.export.export(StepProgram(model.eval()), args, dynamic_shapes=dynamic, strict=False)
