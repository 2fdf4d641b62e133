"""rank_neurons: score every space and keep the top indices.

Scores are one vector per (space, key), as declared in shrinkit.families.spaces: the key is
None for a global space (hidden), the parent layer (ffn neurons, query and kv heads, experts),
or (parent layer, parent expert) for an expert's own neurons; head spaces score whole heads.
`magnitude` scores from the weights alone (each tensor contributes its mean |w| per
index, normalized so every tensor weighs the same; a zero weight scores zero). `activation`
scores come from calibration (see shrinkit.calibrate) and go through the same selection.
`first`, `uniform` and `random` are the weight-selection paper's data-free selections.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..checkpoint.reader import Checkpoint
from ..families.spaces import EXPERT, GLOBAL, HEAD, LAYER, SPACES, Fused, Space
from ..plan import Plan, match_rule, tensor_key

CHUNK = 1 << 20  # elements per chunk when reducing a large tensor

# (space, key) -> one score per unit (per head for head spaces), float64
Scores = dict


def add_score(sc: dict, space: Space, key, v: torch.Tensor) -> None:
    k = (space, key)
    if k in sc:
        sc[k] += v
    else:
        sc[k] = v.double()


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
    if scores is None:  # no tensor or module of this layer holds the space (an MoE layer's dense FFN)
        return torch.arange(k)
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


def _parts(a, v: torch.Tensor, dims) -> list[tuple[Space, torch.Tensor]]:
    """The per-element sums v along an axis, split into its spaces' parts."""
    if not isinstance(a, Fused):
        return [(a, v)]
    if a.layout == "heads":
        per = v.view(-1, len(a.parts), dims.head_dim)
        return [(p, per[:, j].reshape(-1)) for j, p in enumerate(a.parts)]
    out, o = [], 0
    for p, n in zip(a.parts, a.part_sizes(dims)):
        out.append((p, v[o:o + n]))
        o += n
    return out


def magnitude_scores(ckpt: Checkpoint, plan: Plan, need: set[Space], layers: set[int],
                     advance: Callable[[int], None] = lambda n: None) -> Scores:
    """Weight-magnitude importance of every index of every space in `need`. An expert (the
    experts space) scores the sum over its own tensors of their mean |w|; its router row does
    not count (a router row's size says how the router was trained, not what the expert holds)."""
    fam = plan.family
    p = plan.parent
    sc: Scores = {}
    for info in ckpt.tensors.values():
        rule, m = match_rule(fam, info)
        if rule.drop or not info.dtype.is_floating_point:
            continue
        layer, expert = tensor_key(rule, m)
        if layer is not None and layer not in layers:
            continue
        # an expert scores by its own tensors only (below), not by its router row
        wanted = [(ax, sp) for ax, sp in rule.spaces() if sp in need and sp is not Space.EXPERTS]
        whole = expert is not None and Space.EXPERTS in need
        if not wanted and not whole:
            continue
        ckpt.prefetch(info.name)
        t = fam.magnitude(rule, ckpt.get(info.name))
        sums = _axis_sums(t, sorted({ax for ax, _ in wanted})) if wanted else {}
        if whole:
            rows = sums[0] if 0 in sums else _axis_sums(t, [0])[0]
            v = torch.zeros(p.num_experts, dtype=torch.float64)
            v[expert] = float(rows.double().sum()) / max(1, t.numel())
            add_score(sc, Space.EXPERTS, layer, v)
        advance(info.nbytes)
        for ax, a in enumerate(rule.axes):
            if ax not in sums:
                continue
            for sp, seg in _parts(a, sums[ax], p):
                if sp not in need:
                    continue
                mean = seg.mean()
                seg = seg / mean if mean > 0 else seg
                if sp.unit == HEAD:
                    seg = seg.view(-1, p.head_dim).sum(1)
                add_score(sc, sp, sp.key(layer, expert), seg)
    return sc


def spaces_to_rank(plan: Plan) -> set[Space]:
    """The spaces whose kept indices must be chosen: those the child has fewer units of (and
    the spaces chosen together with them: query heads within kv groups)."""
    p, c = plan.parent, plan.child
    need = set()
    for sp in plan.family.spaces():
        if sp.cut and sp.units(p) is not None and sp.units(c) < sp.units(p):
            need.add(sp)
    for sp in plan.family.spaces():
        if sp.within is not None and (sp in need or sp.within in need):
            need.update((sp, sp.within))
    return need


def _pick_grouped(plan: Plan, sp: Space, inner: Space, key, method: str, sc: Scores, gen) -> None:
    """Whole groups of `sp` (kv heads), each keeping the same number of `inner` units (query
    heads) chosen inside it; a group scores its own score plus its inner units' scores."""
    p, c = plan.parent, plan.child
    n_p, n_c = sp.units(p), sp.units(c)
    r_p, r_c = inner.units(p) // n_p, inner.units(c) // n_c
    q, kv = sc.get((inner, key)), sc.get((sp, key))
    group = None
    if q is not None or kv is not None:
        group = torch.zeros(n_p, dtype=torch.float64)
        if q is not None:
            group += q.view(n_p, r_p).sum(1)
        if kv is not None:
            group += kv
    groups = pick(n_p, n_c, method, group, gen)
    qs = []
    for g in groups.tolist():
        within = pick(r_p, r_c, method, None if q is None else q[g * r_p:(g + 1) * r_p], gen)
        qs.append(within + g * r_p)
    plan.kept[(inner, key)] = torch.cat(qs)
    plan.kept[(sp, key)] = groups


def outside_spaces(plan: Plan) -> set[Space]:
    """Layer spaces that tensors outside the blocks hold too (a pooling head's heads and neurons:
    their kept sets are keyed None; calibration runs only the blocks, so activation ranking
    scores them by magnitude)."""
    out = {sp for r in plan.family.rules if not r.per_layer for _, sp in r.spaces() if sp.per == LAYER}
    return out | {sp.within for sp in out if sp.within is not None}


def select(plan: Plan, method: str, scores: Scores | None, layers: list[int], seed: int) -> None:
    """Fill the plan's kept-index sets from scores (or from a data-free method): global spaces
    first, then per layer each layer space in declaration order, then every kept expert's own
    spaces."""
    p, c = plan.parent, plan.child
    gen = torch.Generator().manual_seed(seed)
    need = spaces_to_rank(plan)
    sc = scores or {}
    plan.kept = {}
    inner = {sp.within: sp for sp in need if sp.within is not None}
    todo = [sp for sp in SPACES if sp in need and sp.within is None]

    def one(sp: Space, key) -> None:
        if sp in inner:
            _pick_grouped(plan, sp, inner[sp], key, method, sc, gen)
        else:
            plan.kept[(sp, key)] = pick(sp.units(p), sp.units(c), method, sc.get((sp, key)), gen)

    for sp in todo:
        if sp.per == GLOBAL:
            one(sp, None)
    for layer in layers:
        for sp in todo:
            if sp.per == LAYER:
                one(sp, layer)
        experts = plan.kept_experts(layer)
        for e in (experts if experts is not None else range(p.num_experts or 0)):
            for sp in todo:
                if sp.per == EXPERT:
                    one(sp, (layer, e))
    # a layer space that a tensor outside the blocks also holds (SigLIP's pooling head: its attention
    # heads and MLP neurons) gets a kept set of its own, keyed None
    for sp in todo:
        if sp in outside_spaces(plan):
            one(sp, None)
    plan.ranked = True
