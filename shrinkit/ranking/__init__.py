"""Ranking methods: one module each, registered here. A method is an object (shrinkit.ranking.base.
Method) that scores the spaces a target cuts and picks the kept units from the scores; the
rank_neurons stage runs the one the recipe names (see shrinkit/stages/README.md, "Ranking
methods")."""

from __future__ import annotations

from . import activation, first, magnitude, random, uniform
from . import base
from .base import Method, spaces_to_rank, top_k  # noqa: F401

METHODS: dict[str, Method] = {m.name: m for m in (
    activation.METHOD,
    magnitude.METHOD,
    uniform.METHOD,
    first.METHOD,
    random.METHOD,
)}

DATA_DEFAULT = activation.METHOD.name   # with a data source for the parent
DATA_FREE_DEFAULT = magnitude.METHOD.name


def default_method(ckpt, tokenizer=None) -> str:
    """The method a rank_neurons block without `method:` uses: activation ranking when built-in
    calibration data can be read for the parent (a tokenizer for text, an image processor config
    for images), else magnitude."""
    from ..families import family_for
    return DATA_DEFAULT if family_for(ckpt.config).has_data_source(ckpt.root, tokenizer) else DATA_FREE_DEFAULT


def select(plan, method: "Method | str", scores, layers: list[int], seed: int) -> None:
    """Fill the plan's kept indices by a method (an object or its registered name); see
    shrinkit.ranking.base.select."""
    base.select(plan, METHODS[method] if isinstance(method, str) else method, scores, layers, seed)


UNRANKED = first.METHOD   # what a plan keeps when no ranking stage chose: the first units of every space


def ensure_selected(plan, seed: int = 0):
    """The plan with kept indices: unchanged when a ranking stage filled them, else the first
    units of every space (widths unchanged: everything). Shapes never depend on the choice, so
    shape-only callers (inspect, the budget solver, preflight's disk estimate) use this too: the
    one place that decides what an unranked plan keeps."""
    if not plan.ranked:
        base.select(plan, UNRANKED, None, plan.layers, seed)
    return plan
