"""The one generic slicer: a parent tensor, its rule and the plan give the child tensor."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..plan import ChildTensor, Index, Plan

BLOCK_BYTES = 8 << 20  # child rows are produced in blocks of about this size


def _cut(plan: Plan, ct: ChildTensor, t: torch.Tensor, idx: list[Index | None]) -> torch.Tensor:
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


def slice_blocks(plan: Plan, ct: ChildTensor, t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The child tensor as consecutive row blocks (row-major order), so that memory holds one
    block of a few MB however large the tensor is."""
    idx = [plan.axis_index(a, ct.layer, s) for a, s in zip(ct.rule.axes, t.shape)]
    nbytes = ct.nbytes
    if t.dim() < 2 or nbytes <= BLOCK_BYTES:
        yield _cut(plan, ct, t, idx)
        return
    rows = idx[0]
    n_rows = rows.length if rows is not None else t.shape[0]
    step = max(1, n_rows * BLOCK_BYTES // nbytes)
    rest = [None, *idx[1:]]
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        if rows is None:
            part = t[r0:r1]
        elif rows.start is not None:
            part = t[rows.start + r0:rows.start + r1]
        else:
            part = t.index_select(0, rows.tensor[r0:r1])
        yield _cut(plan, ct, part, rest)
