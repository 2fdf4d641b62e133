"""The plan: the child's shape, the kept indices of every space, and the child's tensors.

Ranking fills the index sets; everything downstream (slicing, writing, the report) reads
only the plan, so a plan is the whole description of a child.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .checkpoint.reader import Checkpoint, TensorInfo
from .errors import ParentError, RecipeError
from .families import Dims, Family
from .families.spaces import Fused, Rule, Space
from .recipe import Recipe

OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_STR = {v: k for k, v in OUT_DTYPES.items()}


class Index:
    """Kept indices along an axis, in their original order; knows when it is a plain range."""

    __slots__ = ("tensor", "start", "length")

    def __init__(self, idx):
        t = torch.as_tensor(idx, dtype=torch.long).flatten()
        self.tensor = t
        self.length = len(t)
        n = len(t)
        contiguous = n == 1 or (n > 1 and int(t[-1]) - int(t[0]) == n - 1 and bool((t[1:] > t[:-1]).all()))
        self.start = int(t[0]) if contiguous else None

    def tolist(self) -> list[int]:
        return self.tensor.tolist()


def expand_heads(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


@dataclass
class ChildTensor:
    name: str
    parent: TensorInfo
    rule: Rule
    layer: int | None        # parent layer index
    shape: tuple[int, ...]
    dtype: torch.dtype
    norm: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Plan:
    family: Family
    parent: Dims
    child: Dims
    out_dtype: torch.dtype
    layers: list[int] = field(default_factory=list)        # parent index of each child layer
    hidden: torch.Tensor | None = None                     # None: keep all
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)
    q_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    kv_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    cast: bool = True          # cast every float tensor to out_dtype; False keeps each tensor's own dtype
    norm_factor: float | None = None
    ranked: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    # ---- kept indices per (space, layer), as element indices along an axis
    def _kept(self, space: Space, layer: int | None) -> torch.Tensor | None:
        if space is Space.HIDDEN:
            return self.hidden
        if space is Space.FFN:
            return self.ffn.get(layer)
        if space is Space.Q_HEADS:
            h = self.q_heads.get(layer)
            return None if h is None else expand_heads(h, self.parent.head_dim)
        if space is Space.KV_HEADS:
            h = self.kv_heads.get(layer)
            return None if h is None else expand_heads(h, self.parent.head_dim)
        return None  # VOCAB: never cut

    def axis_index(self, axis, layer: int | None, size: int) -> Index | None:
        key = (axis, layer, size)
        if key in self._cache:
            return self._cache[key]
        if axis is None:
            out = None
        elif isinstance(axis, Fused):
            part = size // len(axis.parts)
            kept = [self._kept(p, layer) for p in axis.parts]
            if all(k is None for k in kept):
                out = None
            else:
                out = Index(torch.cat([(torch.arange(part) if k is None else k) + j * part for j, k in enumerate(kept)]))
        else:
            k = self._kept(axis, layer)
            out = None if k is None or len(k) == size and bool((k == torch.arange(size)).all()) else Index(k)
        self._cache[key] = out
        return out

    def child_config(self, cfg: dict) -> dict:
        return self.family.child_config(cfg, self.child, self.layers, DTYPE_STR[self.out_dtype])

    # ---- the child's tensors, in the parent's storage order
    def child_tensors(self, ckpt: Checkpoint) -> list[ChildTensor]:
        fam = self.family
        tied = fam.tied(ckpt.config)
        new_index = {p: i for i, p in enumerate(self.layers)}
        out = []
        infos = sorted(ckpt.tensors.values(), key=lambda t: (ckpt.shards.index(t.shard), t.begin))
        for info in infos:
            rule, m = match_rule(fam, info)
            if rule.drop or (rule.tied and tied):
                continue
            layer = None
            name = info.name
            if "layer" in rule.regex.groupindex:
                layer = int(m.group("layer"))
                if layer not in new_index:
                    continue
                name = name[: m.start("layer")] + str(new_index[layer]) + name[m.end("layer"):]
            shape = tuple(
                (idx.length if (idx := self.axis_index(a, layer, s)) is not None else s)
                for a, s in zip(rule.axes, info.shape))
            dtype = self.out_dtype if info.dtype.is_floating_point and self.cast else info.dtype
            out.append(ChildTensor(name, info, rule, layer, shape, dtype, rule.norm))
        return out


def match_rule(fam: Family, info: TensorInfo):
    hit = fam.match(info.name)
    if hit is None:
        raise ParentError(f"tensor {info.name!r} is not in the {fam.name} architecture map; "
                          "shrinkit cannot tell which of its axes to cut (is the config's model_type right?)")
    rule, m = hit
    if len(rule.axes) != len(info.shape) and not rule.drop:
        raise ParentError(f"tensor {info.name!r} has shape {list(info.shape)}, but a {fam.name} map expects "
                          f"{len(rule.axes)} axes; the checkpoint does not match its config")
    return rule, m


def resolve_target(fam: Family, parent: Dims, recipe: Recipe, n_layers_from_stage: int | None,
                   model_type: str | None = None) -> Dims:
    """The child's shape from the recipe's target, or a RecipeError if it is impossible."""
    t = recipe.target
    hidden = t.hidden_size or parent.hidden_size
    ffn = t.intermediate_size or parent.intermediate_size
    hd = parent.head_dim
    if fam.head_dim_from_hidden:
        heads = t.num_attention_heads or (hidden // hd if hidden != parent.hidden_size else parent.num_attention_heads)
        if heads * hd != hidden:
            raise RecipeError(
                f"{fam.name} ties hidden_size to heads x head_dim ({hd}): hidden_size {hidden} needs "
                f"num_attention_heads {hidden / hd:g}; pick a hidden_size that is a multiple of {hd}")
        if t.num_key_value_heads not in (None, heads):
            raise RecipeError(f"{fam.name} has no grouped-query attention: num_key_value_heads must equal num_attention_heads")
        kv = heads
    else:
        heads = t.num_attention_heads or parent.num_attention_heads
        if t.num_key_value_heads:
            kv = t.num_key_value_heads
        else:
            kv = min(parent.num_key_value_heads, heads)
            while heads % kv:
                kv -= 1
    layers = t.num_hidden_layers or n_layers_from_stage or parent.num_hidden_layers
    if n_layers_from_stage is not None and layers != n_layers_from_stage:
        raise RecipeError(f"target.num_hidden_layers is {layers}, but drop_layers keeps {n_layers_from_stage} layers; make them agree")
    for name, c, p in (("hidden_size", hidden, parent.hidden_size), ("intermediate_size", ffn, parent.intermediate_size),
                       ("num_attention_heads", heads, parent.num_attention_heads),
                       ("num_key_value_heads", kv, parent.num_key_value_heads),
                       ("num_hidden_layers", layers, parent.num_hidden_layers)):
        if c > p:
            raise RecipeError(f"target {name} {c} is larger than the parent's {p}; a child can only be smaller")
    if heads % kv:
        raise RecipeError(f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv}")
    if model_type in fam.heads_divide_hidden and hidden % heads:
        raise RecipeError(f"transformers requires a {model_type} hidden_size that is a multiple of num_attention_heads: "
                          f"{hidden} is not a multiple of {heads}; change the target")
    r_parent = parent.num_attention_heads // parent.num_key_value_heads
    if heads // kv > r_parent:
        raise RecipeError(
            f"{heads} query heads over {kv} kv heads is {heads // kv} per group, but the parent's groups hold "
            f"{r_parent}; whole KV groups are kept, so use at least {math.ceil(heads / r_parent)} kv heads")
    return Dims(hidden, ffn, heads, kv, hd, layers, parent.vocab_size)


def parent_params(fam: Family, ckpt: Checkpoint) -> int:
    """Parameters of the parent as a model has them: stale buffers and a tied head not counted."""
    tied = fam.tied(ckpt.config)
    n = 0
    for t in ckpt.tensors.values():
        hit = fam.match(t.name)
        if t.dtype.is_floating_point and not (hit and (hit[0].drop or (hit[0].tied and tied))):
            n += t.numel
    return n


def count_params(tensors: list[ChildTensor]) -> int:
    return sum(math.prod(t.shape) for t in tensors if t.dtype.is_floating_point)
