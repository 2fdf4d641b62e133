"""What a ranking method is, and the one selection every method goes through.

A method scores the spaces the target cuts (or scores nothing: a data-free method) and picks the
kept units of each space from its scores. select() walks the spaces in one fixed order (global
spaces, then per layer, then per kept expert), so every method fills the plan the same way.
A plan that no ranking stage filled keeps the first units of every space: ensure_selected() is the
one place that decides it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..families.spaces import EXPERT, GLOBAL, LAYER, SPACES, STAGE, Space
from ..plan import Plan
from ..scores import Scores


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (ties go to the lower index), in ascending order."""
    order = torch.sort(-scores.double(), stable=True).indices
    return torch.sort(order[:k]).values


class Method:
    """A ranking method. `reads_data`: it runs the parent on calibration data."""

    name: ClassVar[str]
    reads_data: ClassVar[bool] = False

    def scores(self, ctx, stage: str, need: set[Space], layers: list[int]) -> tuple[Scores | None, dict]:
        """Scores of every space in `need` over the parent layers `layers` (None: the method picks
        without scores), and what the report records about them."""
        return None, {}

    def pick(self, n: int, k: int, scores: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
        """k of n units, ascending: by default the k best-scoring ones; without scores (no tensor
        or module of this layer holds the space: an MoE layer's dense FFN), the first k."""
        if scores is None:
            return torch.arange(k)
        return top_k(scores, k)


def _pick(method: Method, n: int, k: int, scores, gen) -> torch.Tensor:
    return torch.arange(n) if k >= n else method.pick(n, k, scores, gen)


def spaces_to_rank(plan: Plan) -> set[Space]:
    """The spaces whose kept indices must be chosen: those the child has fewer units of (and
    the spaces chosen together with them: query heads within kv groups)."""
    p, c = plan.parent, plan.child
    need = set()
    for sp in plan.family.spaces():
        if sp.cut and _narrower(sp, p, c):
            need.add(sp)
    for sp in plan.family.spaces():
        if sp.within is not None and (sp in need or sp.within in need):
            need.update((sp, sp.within))
    return need


def _narrower(sp: Space, p, c) -> bool:
    """Whether the child has fewer units of `sp` than the parent (in any stage, for a space
    sized per stage)."""
    a, b = getattr(p, sp.size, None), getattr(c, sp.size, None)
    if a is None:
        return False
    if isinstance(a, tuple):
        return any(y < x for x, y in zip(a, b))
    return b < a


def _stage_of_key(sp: Space, p, key) -> int | None:
    """The stage a staged space's kept set belongs to (its key, or its layer's stage)."""
    if not sp.staged:
        return None
    return key if sp.per == STAGE else p.stage_of(key)


def outside_spaces(plan: Plan) -> set[Space]:
    """Layer spaces that tensors outside the blocks hold too (a pooling head's heads and neurons:
    their kept sets are keyed None; calibration runs only the blocks, so activation ranking
    scores them by magnitude)."""
    out = {sp for r in plan.family.rules if not r.per_layer for _, sp in r.spaces() if sp.per == LAYER}
    return out | {sp.within for sp in out if sp.within is not None}


def _pick_grouped(plan: Plan, sp: Space, inner: Space, key, method: Method, sc: Scores, gen) -> None:
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
    groups = _pick(method, n_p, n_c, group, gen)
    qs = []
    for g in groups.tolist():
        within = _pick(method, r_p, r_c, None if q is None else q[g * r_p:(g + 1) * r_p], gen)
        qs.append(within + g * r_p)
    plan.kept[(inner, key)] = torch.cat(qs)
    plan.kept[(sp, key)] = groups


def select(plan: Plan, method: Method, scores: Scores | None, layers: list[int], seed: int) -> None:
    """Fill the plan's kept-index sets from scores (or from a data-free method): global spaces
    first, then per layer each layer space in declaration order, then every kept expert's own
    spaces."""
    p = plan.parent
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
            st = _stage_of_key(sp, p, key)
            plan.kept[(sp, key)] = _pick(method, sp.units(p, st), sp.units(plan.child, st), sc.get((sp, key)), gen)

    for sp in todo:
        if sp.per == GLOBAL:
            one(sp, None)
    for sp in todo:
        if sp.per == STAGE:
            for st in range(len(p.depths or ())):
                one(sp, st)
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
