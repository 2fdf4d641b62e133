"""drop_layers: which parent layers the child keeps (in order), by rule, by list, or by their
influence on calibration data (importance)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, StrictInt, model_validator

from ..errors import RecipeError
from ..specs import Calibration, Strict
from .base import Context, Read, Stage, data_what


class DropLayers(Strict):
    strategy: Optional[Literal["middle", "first", "last", "importance"]] = None
    drop: Optional[list[StrictInt]] = Field(None, max_length=1 << 16)
    keep: Optional[list[StrictInt]] = Field(None, max_length=1 << 16)
    calibration: Optional[Calibration] = None   # default: the recipe's top-level calibration

    @model_validator(mode="after")
    def _one_way(self):
        given = [k for k in ("strategy", "drop", "keep") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of strategy, drop or keep, not {' and '.join(given)}")
        for k in ("drop", "keep"):
            v = getattr(self, k)
            if v is not None and len(set(v)) != len(v):
                raise ValueError(f"{k} lists a layer twice")
        if not given:
            self.strategy = "middle"
        return self


def count_from_lists(stage: DropLayers | None, n_parent: int) -> int | None:
    if stage is None:
        return None
    if stage.keep is not None:
        return len(stage.keep)
    if stage.drop is not None:
        return n_parent - len(stage.drop)
    return None


def listed_layers(stage: DropLayers, n_parent: int) -> list[int]:
    """The layers a keep or drop list keeps, checked against the parent's layer count."""
    for what, lst in (("keep", stage.keep), ("drop", stage.drop)):
        if lst is not None:
            bad = [i for i in lst if not 0 <= i < n_parent]
            if bad:
                raise RecipeError(f"drop_layers.{what} names layer {bad[0]}, but the parent has layers 0..{n_parent - 1}")
    if stage.keep is not None:
        return sorted(stage.keep)
    return [i for i in range(n_parent) if i not in set(stage.drop)]


def keep_layers(stage: DropLayers, n_parent: int, n_child: int, influence: list[float] | None = None,
                depths: tuple | None = None) -> list[int]:
    """The parent layers the child keeps. With `depths` (parent depths, child depths) of a staged
    family, each stage keeps its own count by the same rule (layers numbered across stages; a
    keep or drop list names them so and must leave each stage its target depth)."""
    if depths is not None and depths[0] is not None:
        return _keep_staged(stage, depths[0], depths[1], influence)
    if stage.keep is not None or stage.drop is not None:
        kept = listed_layers(stage, n_parent)
    elif stage.strategy == "first":
        kept = list(range(n_child))
    elif stage.strategy == "last":
        kept = list(range(n_parent - n_child, n_parent))
    elif stage.strategy == "middle":
        n_drop = n_parent - n_child
        start = (n_parent - n_drop) // 2
        kept = [i for i in range(n_parent) if not start <= i < start + n_drop]
    elif stage.strategy == "importance":
        if influence is None:
            raise RecipeError("drop_layers strategy importance needs calibration data")
        order = sorted(range(n_parent), key=lambda i: (-influence[i], i))
        kept = sorted(order[:n_child])
    else:  # pragma: no cover - the recipe model forbids it
        raise RecipeError(f"unknown drop_layers strategy {stage.strategy!r}")
    if not kept:
        raise RecipeError("drop_layers would keep no layer at all")
    return kept


def _keep_staged(stage: DropLayers, parent: tuple, child: tuple, influence: list[float] | None) -> list[int]:
    n_parent = sum(parent)
    offs = [sum(parent[:s]) for s in range(len(parent))]
    if stage.keep is not None or stage.drop is not None:
        kept = listed_layers(stage, n_parent)
        for s, (o, n, c) in enumerate(zip(offs, parent, child)):
            got = sum(1 for i in kept if o <= i < o + n)
            if got != c:
                raise RecipeError(f"drop_layers keeps {got} layers of stage {s} (layers {o}..{o + n - 1}), but the "
                                  f"target depths give it {c}; make them agree")
        return kept
    out = []
    for o, n, c in zip(offs, parent, child):
        sub = None if influence is None else influence[o:o + n]
        out += [o + i for i in keep_layers(stage, n, c, sub)]
    return out


class DropStage(Stage):
    name = "drop_layers"
    config = DropLayers
    default = {}
    provides = ("drops_layers",)
    before = {"writes": "{self} must come before {other}"}
    shares_heldout = True

    def child_layers(self, cfg, n_parent):
        return count_from_lists(cfg, n_parent)

    def listed(self, cfg, n_parent) -> list[int] | None:
        """The layers an explicit keep or drop list keeps (None: chosen by a rule)."""
        return listed_layers(cfg, n_parent) if cfg.keep is not None or cfg.drop is not None else None

    def chooses_later(self, cfg) -> bool:
        """The layers are chosen at run time from calibration (importance), not from the recipe."""
        return cfg.strategy == "importance"

    def prepare(self, cfg, ctx):
        plan = ctx.plan
        if not self.chooses_later(cfg):
            plan.layers = keep_layers(cfg, plan.parent.num_hidden_layers, plan.child.num_hidden_layers,
                                      depths=(plan.parent.depths, plan.child.depths))
            plan.family.check_layers(plan.layers)

    def reads(self, cfg, ctx):
        if not self.chooses_later(cfg):
            return []
        return [Read(self.name, f"{self.name} (importance)", data_what(ctx), ctx.recipe.calibration_for(self.name))]

    def run(self, cfg, ctx):
        info: dict = {"strategy": cfg.strategy or ("keep" if cfg.keep is not None else "drop")}
        if self.chooses_later(cfg):
            from ..calibrate import layer_influence
            info["calibration"] = ctx.spec(self.name).model_dump()
            influence = layer_influence(ctx.calibration(self.name))
            info["influence"] = [round(x, 6) for x in influence]
            plan = ctx.plan
            plan.layers = keep_layers(cfg, plan.parent.num_hidden_layers, plan.child.num_hidden_layers,
                                      plan.family.pin_influence(influence),
                                      depths=(plan.parent.depths, plan.child.depths))
        ctx.layers_chosen = True
        return info


STAGE = DropStage()
