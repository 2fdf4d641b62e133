"""rank_neurons: score every space the target cuts and keep the top units, by one of the ranking
methods registered in shrinkit.ranking (activation, magnitude, uniform, first, random)."""

from __future__ import annotations

from typing import Literal, Optional

from ..ranking import METHODS, default_method, select, spaces_to_rank  # noqa: F401 - select: API
from ..specs import Calibration, Strict
from .base import Context, Read, Stage, data_what


class RankNeurons(Strict):
    method: Optional[Literal[tuple(METHODS)]] = None  # type: ignore[valid-type]
    calibration: Optional[Calibration] = None   # default: the recipe's top-level calibration


class RankStage(Stage):
    name = "rank_neurons"
    config = RankNeurons
    default = {}
    provides = ("ranks",)
    before = {"writes": "{self} must come before {other}"}
    shares_heldout = True

    def method(self, cfg: RankNeurons, ctx: Context) -> str:
        return cfg.method or default_method(ctx.ckpt, ctx.tokenizer)

    def reads(self, cfg, ctx):
        m = self.method(cfg, ctx)
        if not METHODS[m].reads_data or (ctx.plan is not None and not spaces_to_rank(ctx.plan)):
            return []
        return [Read(self.name, f"{self.name} ({m})", data_what(ctx), ctx.recipe.calibration_for(self.name))]

    def run(self, cfg, ctx):
        m = self.method(cfg, ctx)
        info: dict = {"method": m}
        plan = ctx.plan
        layers = plan.layers if ctx.layers_chosen else list(range(plan.parent.num_hidden_layers))
        need = spaces_to_rank(plan)
        scores = None
        if need:
            scores, more = METHODS[m].scores(ctx, self.name, need, layers)
            info.update(more)
        select(plan, m, scores, layers, ctx.seed)
        return info



STAGE = RankStage()
