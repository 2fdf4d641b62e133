"""The one generic slicer: a parent tensor, its rule and the plan give the child tensor."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch

from ..families.spaces import Space
from ..plan import ChildTensor, Index, Plan

# Child rows are produced in blocks of at most about this size, counting the rows gathered from
# the parent before their columns are cut. Below glibc's mmap threshold (1 MB, fixed by the CLI),
# every block comes from the reused heap rather than from fresh, page-faulting mappings.
BLOCK_BYTES = 512 << 10


def _cut(plan: Plan, ct: ChildTensor, t: torch.Tensor, idx: list[Index | None]) -> torch.Tensor:
    # cut the axis that removes the most first, so later gathers move less data
    order = sorted((i for i, x in enumerate(idx) if x is not None), key=lambda i: idx[i].length / t.shape[i])
    for ax in order:
        ix = idx[ax]
        if ix.start is not None:
            t = t.narrow(ax, ix.start, ix.length)
        elif ax == 0:
            t = t.index_select(0, ix.tensor)
        else:  # advanced indexing gathers inner axes ~3x faster than index_select on CPU
            t = t[(slice(None),) * ax + (ix.tensor,)]
    t = plan.family.adjust_tensor(plan, ct, t)
    if t.dtype != ct.dtype:
        t = t.to(ct.dtype)
    return t.contiguous()


def _rotated(plan: Plan, ct: ChildTensor, t: torch.Tensor, idx: list[Index | None]) -> torch.Tensor:
    """rotate_hidden: the other axes cut as usual, then the hidden axis projected onto the plan's
    basis (after folding in the scale of the norm the tensor reads, for readers). A norm's own
    scale is folded into its readers; the child's norm is sqrt(D / d) (the RMS over d of the
    projected residual is sqrt(D / d) times the parent's RMS over D, when the d directions keep it)."""
    Q = plan.rotation
    D, d = Q.shape
    if ct.norm:
        return torch.full(ct.shape, math.sqrt(D / d), dtype=torch.float32).to(ct.dtype)
    ax = ct.rule.axes.index(Space.HIDDEN)
    x = _cut(plan, dataclasses.replace(ct, dtype=torch.float32), t, idx)
    g = plan.folds.get(ct.name)
    if g is not None:
        x = x * g.view([-1 if i == ax else 1 for i in range(x.dim())])
    x = torch.tensordot(x, Q, dims=([ax], [0])).movedim(-1, ax)
    return x.to(ct.dtype).contiguous()


def slice_blocks(plan: Plan, ct: ChildTensor, t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The child tensor as consecutive row blocks (row-major order), so that memory holds one
    block of a few MB however large the tensor is."""
    idx = [plan.axis_index(a, ct.layer, s, ct.expert, ct.stage) for a, s in zip(ct.rule.axes, t.shape)]
    if plan.rotation is not None and Space.HIDDEN in ct.rule.axes:
        ax = ct.rule.axes.index(Space.HIDDEN)
        if not ct.norm and t.dim() == 2 and ax == 1:  # embeddings and readers: rows project independently
            rows = idx[0]
            n_rows = rows.length if rows is not None else t.shape[0]
            step = max(1, BLOCK_BYTES // max(1, t.shape[1] * 4))
            for r0 in range(0, n_rows, step):
                r1 = min(n_rows, r0 + step)
                part = t[r0:r1] if rows is None else t.index_select(0, rows.tensor[r0:r1])
                yield _rotated(plan, ct, part, [None, *idx[1:]])
            return
        # writers (hidden on their first axis) mix all parent rows: made whole in the child's dtype,
        # projected a block of columns at a time (no float32 copy of the whole tensor), then
        # yielded in row blocks
        if not ct.norm and t.dim() == 2 and ax == 0:
            cols = idx[1]
            n_cols = cols.length if cols is not None else t.shape[1]
            x = torch.empty(ct.shape, dtype=ct.dtype)
            step = max(1, BLOCK_BYTES // max(1, t.shape[0] * 4))
            for c0 in range(0, n_cols, step):
                c1 = min(n_cols, c0 + step)
                part = t[:, c0:c1] if cols is None else t.index_select(1, cols.tensor[c0:c1])
                x[:, c0:c1] = _rotated(plan, ct, part, [idx[0], None])
        else:
            x = _rotated(plan, ct, t, idx)
        step = max(1, BLOCK_BYTES // max(1, x[0].numel() * x.element_size())) if x.dim() > 1 else len(x)
        for r0 in range(0, len(x), step):
            yield x[r0:r0 + step]
        return
    nbytes = ct.nbytes
    if t.dim() < 2 or nbytes <= BLOCK_BYTES:
        yield _cut(plan, ct, t, idx)
        return
    rows = idx[0]
    n_rows = rows.length if rows is not None else t.shape[0]
    row_bytes = max(nbytes // max(1, n_rows), t[0].numel() * t.element_size())  # child row, parent row
    step = max(1, BLOCK_BYTES // row_bytes)
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
