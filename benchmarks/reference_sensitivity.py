"""How reproducible DeepSeek's reference numerics are under tiny input noise: the yardstick for validate gates.

    python benchmarks/reference_sensitivity.py CHECKPOINT_DIR [--seeds 3] [--steps 16] [--noise 1e-6]

Runs the PyTorch reference (reference numerics: FP8 activations, FP8 KV, FP4 indexer, bf16 points) against a
copy of itself whose embedding is scaled by (1 + noise * N(0, 1)), on batch 2 prompts of 24 and 21 tokens:
prefill, then `steps` greedy decode steps where the perturbed copy starts every step from the unperturbed
model's cache (the per-step resync the validate stage uses). Prints, per seed, the fraction of logit rows that
would pass a validate row test (cosine >= 0.999 and equal top-1), the minimum cosine and the rows that stayed
bit-identical. A gate the reference cannot pass against itself measures luck, not the engine (README
"Validation"). CHECKPOINT_DIR: an official-format checkpoint, e.g. the load stage's under the stage cache.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from dsv4c.graphs.checkpoint import CheckpointReader
from dsv4c.graphs.model import DeepseekV4, Numerics, load_checkpoint_model

PROMPT_LENS = (24, 21)


@torch.no_grad()
def compare(model: DeepseekV4, noisy: DeepseekV4, prompts: list[torch.Tensor], steps: int) -> list[tuple[float, bool]]:
    """(cosine, top-1 equal) per logit row: prefill rows, then one row per sequence per decode step."""
    lens = torch.tensor([len(p) for p in prompts])
    batch = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long)  # [B, S] right-padded
    for b, p in enumerate(prompts):
        batch[b, :len(p)] = p
    start = torch.zeros_like(lens)
    cache = model.new_cache(len(prompts), 4096)
    other, _ = noisy(batch, start, lens.clone(), [t.clone() for t in cache])
    logits, cache = model(batch, start, lens.clone(), cache)
    pos, rows = lens.clone(), []
    for step in range(steps + 1):
        rows += zip(F.cosine_similarity(logits, other, dim=-1).tolist(), (logits.argmax(-1) == other.argmax(-1)).tolist())
        if step == steps:
            break
        nxt = logits.argmax(-1)[:, None]  # [B, 1]
        other, _ = noisy(nxt, pos, torch.ones_like(pos), [t.clone() for t in cache])
        logits, cache = model(nxt, pos, torch.ones_like(pos), cache)
        pos += 1
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--noise", type=float, default=1e-6)
    args = ap.parse_args()
    model = load_checkpoint_model(CheckpointReader(args.checkpoint), Numerics.reference())
    vocab = model.embed.shape[0]
    print("| seed | rows | agree (cos >= 0.999, top-1) | min cosine | top-1 differs | bit-identical rows |")
    print("|---|---|---|---|---|---|")
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(2, vocab, (n,), generator=g) for n in PROMPT_LENS]
        noisy = copy.deepcopy(model)
        torch.manual_seed(seed)
        noisy.embed.mul_(1 + args.noise * torch.randn_like(noisy.embed))
        rows = compare(model, noisy, prompts, args.steps)
        agree = sum(c >= 0.999 and t for c, t in rows) / len(rows)
        print(f"| {seed} | {len(rows)} | {agree:.1%} | {min(c for c, _ in rows):.5f} | "
              f"{sum(not t for _, t in rows)} | {sum(c > 1 - 1e-9 for c, _ in rows)} |")


if __name__ == "__main__":
    main()
