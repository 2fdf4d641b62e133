"""The one generic slicer: a parent tensor, its rule and the plan give the child tensor."""

from __future__ import annotations

import torch

from ..plan import ChildTensor, Plan


def slice_tensor(plan: Plan, ct: ChildTensor, t: torch.Tensor) -> torch.Tensor:
    """Cut `t` (the parent tensor of `ct`) to the kept indices on every axis; cast; rescale norms."""
    idx = [plan.axis_index(a, ct.layer, s) for a, s in zip(ct.rule.axes, t.shape)]
    # cut the axis that removes the most first, so later gathers move less data
    order = sorted((i for i, x in enumerate(idx) if x is not None), key=lambda i: idx[i].length / t.shape[i])
    for ax in order:
        ix = idx[ax]
        t = t.narrow(ax, ix.start, ix.length) if ix.start is not None else t.index_select(ax, ix.tensor)
    if ct.norm and plan.norm_factor is not None:
        t = (t.float() * plan.norm_factor).to(ct.dtype)
    elif t.dtype != ct.dtype:
        t = t.to(ct.dtype)
    return t.contiguous()
