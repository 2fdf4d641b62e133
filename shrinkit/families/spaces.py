"""Spaces and tensor rules: the vocabulary of an architecture map.

A *space* is an index set that several tensors share along one of their axes. Ranking fills
one kept-index set per space (one global set for the residual stream, one per layer for FFN
neurons and heads); slicing any tensor is then the same generic operation: for each axis, take
the kept indices of that axis's space. A family is a list of rules (a tensor-name pattern and
one space, or nothing, per axis) plus the names of its config keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum


class Space(str, Enum):
    HIDDEN = "hidden"      # the residual stream: one global index set
    FFN = "ffn"            # MLP neurons, per layer
    Q_HEADS = "q_heads"    # query heads (axis length heads * head_dim), per layer, whole heads
    KV_HEADS = "kv_heads"  # key/value heads, per layer, whole heads (GQA groups)
    VOCAB = "vocab"        # token rows; never cut (kept whole)


PER_LAYER = (Space.FFN, Space.Q_HEADS, Space.KV_HEADS)
HEAD_SPACES = (Space.Q_HEADS, Space.KV_HEADS)


@dataclass(frozen=True)
class Fused:
    """An axis that concatenates several spaces (GPT-2's c_attn: q, k and v side by side)."""

    parts: tuple[Space, ...]


Axis = Space | Fused | None


@dataclass(frozen=True)
class Rule:
    """Which space each axis of the tensors whose name matches `pattern` belongs to.

    The pattern is a regular expression searched at the end of the tensor name (any prefix
    such as ``model.`` or ``bert.`` is allowed); per-layer tensors capture the layer index as
    the group ``layer``.
    """

    pattern: str
    axes: tuple[Axis, ...]
    norm: bool = False    # a normalization scale over the hidden dim: rescale_norms applies
    tied: bool = False    # an output head that is not written when the config ties embeddings
    drop: bool = False    # a stale buffer that the child does not need (never written)
    regex: re.Pattern = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "regex", re.compile(r"(?:^|\.)" + self.pattern + r"$"))

    def spaces(self) -> list[tuple[int, Space]]:
        """(axis, space) for every axis of this tensor that lives in a space (fused parts included)."""
        out = []
        for i, a in enumerate(self.axes):
            if isinstance(a, Fused):
                out.extend((i, p) for p in a.parts)
            elif a is not None:
                out.append((i, a))
        return out


def layer_rule(prefix: str, suffix: str, axes: tuple[Axis, ...], **kw) -> Rule:
    """A rule for a per-layer tensor: ``<prefix>.<layer>.<suffix>``."""
    return Rule(re.escape(prefix) + r"\.(?P<layer>\d+)\." + re.escape(suffix), axes, **kw)


def rule(name: str, axes: tuple[Axis, ...], **kw) -> Rule:
    return Rule(re.escape(name), axes, **kw)
