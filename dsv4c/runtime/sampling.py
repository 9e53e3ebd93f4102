"""Token sampling outside the engine: greedy, temperature and nucleus (top-p), seeded per request."""

from __future__ import annotations

import numpy as np


def sample(logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy (argmax, lowest id on ties)."""
    if temperature <= 0.0:
        return logits.argmax(axis=-1)
    rng = rng or np.random.default_rng()
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        probs = _nucleus(probs, top_p)
    return np.array([rng.choice(p.shape[0], p=p) for p in probs])


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one)."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum(axis=-1, keepdims=True)
