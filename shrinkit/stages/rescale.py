"""rescale_norms: scale the child's norm weights (default sqrt(parent hidden / child hidden)), so
the RMS a narrower residual stream loses is given back where the family's rule says (see
Family.rescale); applied by the slicer as each norm is cut."""

from __future__ import annotations

import math
from typing import Optional

from pydantic import Field

from ..specs import Strict
from .base import Stage


class RescaleNorms(Strict):
    factor: Optional[float] = Field(None, gt=0, le=100, allow_inf_nan=False,
                                    description="norm scale factor; default sqrt(parent hidden / child hidden)")


class RescaleStage(Stage):
    name = "rescale_norms"
    config = RescaleNorms
    default = {}

    def prepare(self, cfg, ctx):
        plan = ctx.plan
        if plan.family.staged:   # no one factor fits stages cut by different ratios: a no-op there
            return
        f = cfg.factor if cfg.factor is not None else math.sqrt(plan.parent.hidden_size / plan.child.hidden_size)
        plan.norm_factor = None if f == 1.0 else f

    def run(self, cfg, ctx):
        return {"factor": ctx.plan.norm_factor if ctx.plan.norm_factor is not None else 1.0}


STAGE = RescaleStage()
