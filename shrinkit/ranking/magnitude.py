"""magnitude: importance from the weights alone. Each tensor contributes its mean |w| per index,
normalized so every tensor weighs the same; a zero weight scores zero. An expert scores the sum
over its own tensors of their mean |w| (its router row does not count)."""

from __future__ import annotations

from typing import Callable

import torch

from ..checkpoint.reader import Checkpoint
from ..families.spaces import HEAD, Fused, Space, axis_space, axis_stage
from ..plan import Plan, match_rule, tensor_key, tensor_stage
from ..scores import Scores, add_score
from .base import Method

CHUNK = 1 << 20  # elements per chunk when reducing a large tensor


def _axis_sums(t: torch.Tensor, axes: list[int]) -> dict[int, torch.Tensor]:
    """sum |t| over all other axes, for each axis in `axes`, in float32."""
    if t.dim() == 1:
        return {0: t.float().abs()}
    if t.dim() > 2 and any(ax != 0 for ax in axes):  # a convolution's input channels (small tensors)
        a = t.float().abs()
        return {ax: a.sum([d for d in range(t.dim()) if d != ax]) for ax in axes}
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
        return [(axis_space(a), v)]
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
        layer, expert = tensor_key(rule, m, p)
        stage = tensor_stage(rule, m)
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
                st = axis_stage(a, stage, len(p.depths) if p.depths else None)
                add_score(sc, sp, sp.key(layer, expert, st), seg)
    return sc


class Magnitude(Method):
    name = "magnitude"

    def scores(self, ctx, stage, need, layers):
        prog = ctx.progress
        if prog is not None:
            prog.phase("rank (magnitude)", ctx.ckpt.total_bytes)
        return magnitude_scores(ctx.ckpt, ctx.plan, need, set(layers),
                                prog.advance if prog is not None else (lambda n: None)), {}


METHOD = Magnitude()
