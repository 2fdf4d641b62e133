"""rank_neurons: score every space and keep the top indices.

Scores are one vector per space: hidden (global), and per layer ffn neurons, query heads and
kv heads. `magnitude` scores from the weights alone (each tensor contributes its mean |w| per
index, normalized so every tensor weighs the same; a zero weight scores zero). `activation`
scores come from calibration (see shrinkit.calibrate) and go through the same selection.
`first`, `uniform` and `random` are the weight-selection paper's data-free selections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..checkpoint.reader import Checkpoint
from ..families.spaces import Fused, Space
from ..plan import Plan, match_rule

CHUNK = 1 << 20  # elements per chunk when reducing a large tensor


@dataclass
class Scores:
    hidden: torch.Tensor | None = None
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)
    q_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    kv_heads: dict[int, torch.Tensor] = field(default_factory=dict)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (ties go to the lower index), in ascending order."""
    order = torch.sort(-scores.double(), stable=True).indices
    return torch.sort(order[:k]).values


def pick(n: int, k: int, method: str, scores: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    if k >= n:
        return torch.arange(n)
    if method == "first":
        return torch.arange(k)
    if method == "uniform":
        return torch.tensor([(i * n) // k for i in range(k)])
    if method == "random":
        return torch.sort(torch.randperm(n, generator=gen)[:k]).values
    assert scores is not None, method
    return top_k(scores, k)


def _axis_sums(t: torch.Tensor, axes: list[int]) -> dict[int, torch.Tensor]:
    """sum |t| over all other axes, for each axis in `axes` (a 1D or 2D tensor), in float32."""
    if t.dim() == 1:
        return {0: t.float().abs()}
    t2 = t.reshape(t.shape[0], -1)
    rows = torch.empty(t2.shape[0], dtype=torch.float32) if 0 in axes else None
    cols = torch.zeros(t2.shape[1], dtype=torch.float32) if 1 in axes else None
    step = max(1, CHUNK // max(1, t2.shape[1]))
    buf = torch.empty(min(step, t2.shape[0]), t2.shape[1], dtype=torch.float32)  # reused for every chunk
    for r0 in range(0, t2.shape[0], step):
        chunk = t2[r0:r0 + step]
        a = buf[:chunk.shape[0]]
        a.copy_(chunk).abs_()  # a float32 copy: never in place on the mapped parent
        if rows is not None:
            torch.sum(a, dim=1, out=rows[r0:r0 + step])
        if cols is not None:
            cols += a.sum(0)
    out = {}
    if rows is not None:
        out[0] = rows
    if cols is not None:
        out[1] = cols
    return out


def magnitude_scores(ckpt: Checkpoint, plan: Plan, need: set[Space], layers: set[int],
                     advance: Callable[[int], None] = lambda n: None) -> Scores:
    """Weight-magnitude importance of every index of every space in `need`."""
    fam = plan.family
    p = plan.parent
    sc = Scores()
    if Space.HIDDEN in need:
        sc.hidden = torch.zeros(p.hidden_size, dtype=torch.float64)

    def acc(store: dict, layer: int, v: torch.Tensor):
        if layer in store:
            store[layer] += v
        else:
            store[layer] = v.double()

    for info in ckpt.tensors.values():
        rule, m = match_rule(fam, info)
        if rule.drop or not info.dtype.is_floating_point:
            continue
        layer = int(m.group("layer")) if "layer" in rule.regex.groupindex else None
        if layer is not None and layer not in layers:
            continue
        wanted = [(ax, sp) for ax, sp in rule.spaces() if sp in need]
        if not wanted:
            continue
        ckpt.prefetch(info.name)
        sums = _axis_sums(ckpt.get(info.name), sorted({ax for ax, _ in wanted}))
        advance(info.nbytes)
        for ax, a in enumerate(rule.axes):
            if ax not in sums:
                continue
            v = sums[ax]
            parts = a.parts if isinstance(a, Fused) else (a,)
            for j, sp in enumerate(parts):
                if sp not in need:
                    continue
                seg = v.view(len(parts), -1)[j]
                mean = seg.mean()
                seg = seg / mean if mean > 0 else seg
                if sp is Space.HIDDEN:
                    sc.hidden += seg
                elif sp is Space.FFN:
                    acc(sc.ffn, layer, seg)
                elif sp is Space.Q_HEADS:
                    acc(sc.q_heads, layer, seg.view(-1, p.head_dim).sum(1))
                elif sp is Space.KV_HEADS:
                    acc(sc.kv_heads, layer, seg.view(-1, p.head_dim).sum(1))
    return sc


def spaces_to_rank(plan: Plan) -> set[Space]:
    p, c = plan.parent, plan.child
    need = set()
    if c.hidden_size < p.hidden_size:
        need.add(Space.HIDDEN)
    if c.intermediate_size < p.intermediate_size:
        need.add(Space.FFN)
    if c.num_attention_heads < p.num_attention_heads or c.num_key_value_heads < p.num_key_value_heads:
        need.update((Space.Q_HEADS, Space.KV_HEADS))
    return need


def select(plan: Plan, method: str, scores: Scores | None, layers: list[int], seed: int) -> None:
    """Fill the plan's kept-index sets from scores (or from a data-free method)."""
    p, c = plan.parent, plan.child
    gen = torch.Generator().manual_seed(seed)
    need = spaces_to_rank(plan)
    sc = scores or Scores()
    plan.hidden = pick(p.hidden_size, c.hidden_size, method, sc.hidden, gen) if Space.HIDDEN in need else None
    plan.ffn, plan.q_heads, plan.kv_heads = {}, {}, {}
    r_p = p.num_attention_heads // p.num_key_value_heads
    r_c = c.num_attention_heads // c.num_key_value_heads
    for layer in layers:
        if Space.FFN in need:
            plan.ffn[layer] = pick(p.intermediate_size, c.intermediate_size, method, sc.ffn.get(layer), gen)
        if Space.Q_HEADS in need:
            q = sc.q_heads.get(layer)
            kv = sc.kv_heads.get(layer)
            group = None
            if q is not None or kv is not None:
                group = torch.zeros(p.num_key_value_heads, dtype=torch.float64)
                if q is not None:
                    group += q.view(p.num_key_value_heads, r_p).sum(1)
                if kv is not None:
                    group += kv
            groups = pick(p.num_key_value_heads, c.num_key_value_heads, method, group, gen)
            qs = []
            for g in groups.tolist():
                within = pick(r_p, r_c, method, None if q is None else q[g * r_p:(g + 1) * r_p], gen)
                qs.append(within + g * r_p)
            plan.q_heads[layer] = torch.cat(qs)
            plan.kv_heads[layer] = groups
    plan.ranked = True
