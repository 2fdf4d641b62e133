"""Scores: one importance vector per (space, key), as declared in shrinkit.families.spaces.

The key is None for a global space (hidden), the parent layer (ffn neurons, query and kv heads,
experts), or (parent layer, parent expert) for an expert's own neurons; head spaces hold one
score per head. Calibration statistics and weight magnitudes are both Scores, and every ranking
method's selection reads them the same way."""

from __future__ import annotations

import torch

from .families.spaces import Space

# (space, key) -> one score per unit (per head for head spaces), float64
Scores = dict


def add_score(sc: dict, space: Space, key, v: torch.Tensor) -> None:
    k = (space, key)
    if k in sc:
        sc[k] += v
    else:
        sc[k] = v.double()
