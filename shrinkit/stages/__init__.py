"""The stages: one module each, registered here, in the order the recipe schema lists them and the
default pipeline runs them. Adding a stage is one module (a shrinkit.stages.base.Stage with its
recipe block) and one line below; see shrinkit/stages/README.md."""

from __future__ import annotations

from . import heal, layers, rank, rescale, rotate, write
from .base import Context, Read, Stage  # noqa: F401

STAGES: dict[str, Stage] = {s.name: s for s in (
    rank.STAGE,
    layers.STAGE,
    rotate.STAGE,
    heal.STAGE,
    write.STAGE,
    rescale.STAGE,
)}


def default_pipeline() -> list[dict]:
    """The stages of a recipe that names none, with their default blocks."""
    return [{name: dict(s.default)} for name, s in STAGES.items() if s.default is not None]


def check_order(names: list[str]) -> None:
    """The pipeline's order against what each stage declares (ValueError with the stage's own
    message): required stages, stages that must run before or after others, and stages that
    cannot be combined."""
    for n in set(names):
        if names.count(n) > 1:
            raise ValueError(f"stage {n} appears twice")
    for name, s in STAGES.items():
        if s.required and name not in names:
            raise ValueError(s.required.format(self=name))
    pos = {n: i for i, n in enumerate(names)}

    def providers(cap: str) -> list[str]:
        return [n for n in names if cap in STAGES[n].provides]

    for kind in ("before", "after"):
        for name in names:
            for cap, msg in getattr(STAGES[name], kind).items():
                for other in providers(cap):
                    wrong = pos[other] < pos[name] if kind == "before" else pos[other] > pos[name]
                    if other != name and wrong:
                        raise ValueError(msg.format(self=name, other=other))
    for name in names:
        for cap, msg in STAGES[name].excludes.items():
            for other in providers(cap):
                raise ValueError(msg.format(self=name, other=other))


def fixed_layers(recipe, n_parent: int, listed: bool = False) -> tuple[int | None, str | None, list[int] | None]:
    """(layer count, the stage's name, the kept parent layers) that an explicit layer list in the
    recipe's pipeline fixes; (None, None, None) when no stage lists its layers. The list itself
    (checked against the parent's layers) only with `listed` (staged parents need it)."""
    for name, cfg in recipe.parsed:
        n = STAGES[name].child_layers(cfg, n_parent)
        if n is not None:
            return n, name, STAGES[name].listed(cfg, n_parent) if listed else None
    return None, None, None


def stage_providing(cap: str) -> str:
    """The name of the registered stage that provides a capability (for messages)."""
    return next(n for n, s in STAGES.items() if cap in s.provides)
