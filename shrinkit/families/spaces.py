"""Spaces and tensor rules: the vocabulary of an architecture map.

A *space* is an index set that several tensors share along one of their axes. Each space is
declared once, here: its granularity (one global set, one set per layer, or one per (layer,
expert)), its unit (single indices, or whole heads of head_dim elements), the Dims field that
counts its units, and whether it is ever cut. Ranking fills one score vector and one kept-index
set per (space, key), where the key is None (global), the parent layer, or (parent layer,
parent expert); planning, ranking, selection, slicing and the report iterate over the declared
spaces rather than naming them.

A family is a list of rules (a tensor-name pattern and one space, a fused axis, or nothing per
axis) plus the names of its config keys; slicing any tensor is then one generic operation: for
each axis, take the kept indices of that axis's space.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

GLOBAL, LAYER, EXPERT, STAGE = "global", "layer", "expert", "stage"
INDEX, HEAD = "index", "head"
STAGED_SIZES = ("hidden_sizes", "intermediate_sizes")   # Dims fields that hold one size per stage


@dataclass(frozen=True, eq=False)
class Space:
    """One index set shared by tensor axes. Compared by identity; declared below, once."""

    name: str
    per: str                  # GLOBAL | LAYER | EXPERT | STAGE: what one kept-index set is keyed by
    unit: str                 # INDEX: single indices | HEAD: whole heads of head_dim elements
    size: str                 # the Dims field that counts this space's units
    cut: bool = True          # False: never cut (the vocabulary)
    within: "Space | None" = None  # units are chosen inside the kept units of this space (q heads in kv groups)

    def __repr__(self) -> str:
        return f"Space.{self.name.upper()}"

    def __str__(self) -> str:
        return self.name

    def units(self, dims, stage: int | None = None) -> int | None:
        """The number of units; for a space sized per stage (a tuple in the dims), the units of
        `stage` (None without one)."""
        n = getattr(dims, self.size, None)
        if isinstance(n, tuple):
            return None if stage is None else n[stage]
        return n

    def elems(self, dims, stage: int | None = None) -> int | None:
        """The length of an axis (or fused part) that holds all of this space's units."""
        n = self.units(dims, stage)
        if n is None:
            return None
        return n * dims.head_dim if self.unit == HEAD else n

    @property
    def staged(self) -> bool:
        """Sized per stage of a hierarchical model (a tuple of sizes in the dims)."""
        return self.size in STAGED_SIZES

    def key(self, layer: int | None, expert: int | None, stage: int | None = None):
        if self.per == GLOBAL:
            return None
        if self.per == LAYER:
            return layer
        if self.per == STAGE:
            return stage
        return (layer, expert)


Space.HIDDEN = Space("hidden", GLOBAL, INDEX, "hidden_size")                   # the residual stream
Space.VOCAB = Space("vocab", GLOBAL, INDEX, "vocab_size", cut=False)           # token rows; kept whole
Space.FFN = Space("ffn", LAYER, INDEX, "intermediate_size")                    # dense MLP neurons
Space.KV_HEADS = Space("kv_heads", LAYER, HEAD, "num_key_value_heads")         # key/value heads (GQA groups)
Space.Q_HEADS = Space("q_heads", LAYER, HEAD, "num_attention_heads", within=Space.KV_HEADS)  # query heads
Space.EXPERTS = Space("experts", LAYER, INDEX, "num_experts")                  # MoE experts (router rows)
Space.EXPERT_FFN = Space("expert_ffn", EXPERT, INDEX, "expert_intermediate_size")  # one expert's neurons
Space.SHARED_FFN = Space("shared_ffn", LAYER, INDEX, "shared_expert_intermediate_size")  # a shared expert's neurons
# hierarchical models (ConvNeXt): one width per stage, and per-layer FFN neurons whose count is the layer's stage's
Space.STAGE_HIDDEN = Space("stage_hidden", STAGE, INDEX, "hidden_sizes")               # a stage's channels
Space.STAGE_FFN = Space("stage_ffn", LAYER, INDEX, "intermediate_sizes")               # a staged layer's neurons

# Every space, in the order selection draws them (this order fixes the random method's draws).
SPACES: tuple[Space, ...] = (Space.HIDDEN, Space.VOCAB, Space.FFN, Space.KV_HEADS, Space.Q_HEADS, Space.EXPERTS,
                             Space.EXPERT_FFN, Space.SHARED_FFN, Space.STAGE_HIDDEN, Space.STAGE_FFN)
BY_NAME = {s.name: s for s in SPACES}


@dataclass(frozen=True)
class Fused:
    """An axis that concatenates several spaces (GPT-2's c_attn: q, k and v; Phi-3's qkv_proj:
    q then k then v with GQA sizes; a fused gate_up: ffn twice).

    Every part's length is computed from the dims (`Space.elems`), or by `sizes(dims)` where a
    family needs something else; plan time checks that the parts add up to the tensor's real
    axis length. layout "concat": the parts follow each other. layout "heads": the axis is
    [heads, parts, head_dim] (GPT-NeoX's query_key_value): every part must be the same head
    space, and the kept rows are whole per-head groups of len(parts) * head_dim.
    """

    parts: tuple[Space, ...]
    layout: str = "concat"
    sizes: Callable | None = field(default=None, compare=False)

    def part_sizes(self, dims) -> tuple[int, ...]:
        if self.sizes is not None:
            return tuple(int(s) for s in self.sizes(dims))
        return tuple(p.elems(dims) for p in self.parts)

    def __post_init__(self):
        if self.layout not in ("concat", "heads"):
            raise ValueError(f"unknown fused layout {self.layout!r}")
        if self.layout == "heads" and (len(set(self.parts)) != 1 or self.parts[0].unit != HEAD):
            raise ValueError("a per-head fused axis needs one head space for every part")


@dataclass(frozen=True)
class At:
    """An axis in a staged space, at another stage than the tensor's own: `stage` is "prev" (the
    stage before the tensor's: a downsampling layer reads the previous stage's width and writes
    its own), or a fixed stage (0: the stem; -1: the last stage, for the final norm and head)."""

    space: Space
    stage: int | str = "prev"

    def __str__(self) -> str:
        where = {"prev": "the previous stage", -1: "the last stage"}.get(self.stage, f"stage {self.stage}")
        return f"{self.space} of {where}"

    def resolve(self, stage: int | None, n_stages: int) -> int:
        if self.stage == "prev":
            if stage is None or stage < 1:
                raise ValueError("a previous-stage axis needs a tensor of stage 1 or later")
            return stage - 1
        return int(self.stage) % n_stages


def axis_stage(axis, stage: int | None, n_stages: int | None) -> int | None:
    """The stage whose kept indices an axis takes: an At axis's, else the tensor's own."""
    if isinstance(axis, At):
        return axis.resolve(stage, n_stages or 0)
    return stage


def axis_space(axis):
    """The space of an axis (an At axis's own space), or the axis itself (Fused, None)."""
    return axis.space if isinstance(axis, At) else axis


Axis = Space | Fused | At | None


@dataclass(frozen=True)
class Rule:
    """Which space each axis of the tensors whose name matches `pattern` belongs to.

    The pattern is a regular expression searched at the end of the tensor name (any prefix
    such as ``model.`` or ``bert.`` is allowed); per-layer tensors capture the layer index as
    the group ``layer``, per-expert tensors also capture ``expert``. Layers and experts that
    the child drops are skipped, and the kept ones renumbered in the child's tensor names.
    """

    pattern: str
    axes: tuple[Axis, ...]
    norm: bool = False    # a normalization scale over the hidden dim: the family's rescale applies
    tied: bool = False    # an output head that is not written when the config ties embeddings
    drop: bool = False    # a stale buffer that the child does not need (never written)
    tag: str | None = None  # free for a family's own methods (e.g. which rescale rule applies)
    regex: re.Pattern = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "regex", re.compile(r"(?:^|\.)" + self.pattern + r"$"))

    @property
    def per_layer(self) -> bool:
        return "layer" in self.regex.groupindex

    @property
    def per_expert(self) -> bool:
        return "expert" in self.regex.groupindex

    @property
    def per_stage(self) -> bool:
        return "stage" in self.regex.groupindex

    def spaces(self) -> list[tuple[int, Space]]:
        """(axis, space) for every axis of this tensor that lives in a space (fused parts included)."""
        out = []
        for i, a in enumerate(self.axes):
            if isinstance(a, Fused):
                out.extend((i, p) for p in a.parts)
            elif isinstance(a, At):
                out.append((i, a.space))
            elif a is not None:
                out.append((i, a))
        return out


def layer_rule(prefix: str, suffix: str, axes: tuple[Axis, ...], **kw) -> Rule:
    """A rule for a per-layer tensor: ``<prefix>.<layer>.<suffix>``."""
    return Rule(re.escape(prefix) + r"\.(?P<layer>\d+)\." + re.escape(suffix), axes, **kw)


def expert_rule(prefix: str, experts: str, suffix: str, axes: tuple[Axis, ...], **kw) -> Rule:
    """A rule for a per-expert tensor: ``<prefix>.<layer>.<experts>.<expert>.<suffix>``."""
    return Rule(re.escape(prefix) + r"\.(?P<layer>\d+)\." + re.escape(experts) + r"\.(?P<expert>\d+)\."
                + re.escape(suffix), axes, **kw)


def stage_rule(prefix: str, suffix: str, axes: tuple[Axis, ...], layers: str | None = None, **kw) -> Rule:
    """A rule for a per-stage tensor, ``<prefix>.<stage>.<suffix>``, or with `layers`, a per-layer
    tensor of a stage, ``<prefix>.<stage>.<layers>.<layer>.<suffix>`` (the layer numbered within
    its stage; the plan numbers layers across stages, stage by stage)."""
    mid = r"\.(?P<stage>\d+)\."
    if layers is not None:
        mid += re.escape(layers) + r"\.(?P<layer>\d+)\."
    return Rule(re.escape(prefix) + mid + re.escape(suffix), axes, **kw)


def rule(name: str, axes: tuple[Axis, ...], **kw) -> Rule:
    return Rule(re.escape(name), axes, **kw)
