"""The plan: the child's shape, the kept indices of every space, and the child's tensors.

Ranking fills the index sets; everything downstream (slicing, writing, the report) reads
only the plan, so a plan is the whole description of a child.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .checkpoint.reader import Checkpoint, TensorInfo
from .errors import ParentError, RecipeError
from .families import Dims, Family
from .families.base import CANONICAL, OPTIONAL
from .families.spaces import HEAD, At, Fused, Rule, Space
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
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
    expert: int | None = None  # parent expert index
    stage: int | None = None   # stage index (staged families)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def tensor_key(rule: Rule, m, dims: Dims | None = None) -> tuple[int | None, int | None]:
    """(parent layer, parent expert) of a matched tensor name (None where the rule has none).
    A staged family's layer is numbered across stages (with the parent's dims)."""
    layer = int(m.group("layer")) if rule.per_layer else None
    expert = int(m.group("expert")) if rule.per_expert else None
    if layer is not None and rule.per_stage and dims is not None and dims.depths is not None:
        layer += dims.layer_offset(int(m.group("stage")))
    return layer, expert


def tensor_stage(rule: Rule, m) -> int | None:
    """The stage of a matched tensor name (None where the rule has none)."""
    return int(m.group("stage")) if rule.per_stage else None


@dataclass
class Plan:
    family: Family
    parent: Dims
    child: Dims
    out_dtype: torch.dtype
    layers: list[int] = field(default_factory=list)        # parent index of each child layer
    # kept units of every (space, key), in parent numbering and ascending order: key None (global
    # space), the parent layer, or (parent layer, parent expert); heads for head spaces. An
    # absent entry keeps everything.
    kept: dict[tuple[Space, object], torch.Tensor] = field(default_factory=dict)
    cast: bool = True          # cast every float tensor to out_dtype; False keeps each tensor's own dtype
    norm_factor: float | None = None
    ranked: bool = False
    budget: dict | None = None  # a budget target: the solver's choice and alternatives (shrinkit.budget)
    replaced: dict = field(default_factory=dict)  # child tensor name -> file holding its fitted value (heal)
    # rotate_hidden: the child's hidden axis is the parent's projected onto `rotation` ([D, d]
    # orthonormal columns) instead of a subset of dims; `folds` holds, per reader tensor (child
    # name), the scale of the norm it reads, folded into it; a tied head is written untied
    rotate: bool = False
    rotation: torch.Tensor | None = None
    folds: dict = field(default_factory=dict)
    untie: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    # ---- kept indices per (space, key), as element indices along an axis
    def _kept(self, space: Space, layer: int | None, expert: int | None = None,
              stage: int | None = None) -> torch.Tensor | None:
        if not space.cut:
            return None
        k = self.kept.get((space, space.key(layer, expert, stage)))
        if k is None or space.unit != HEAD:
            return k
        return expand_heads(k, self.parent.head_dim)

    def kept_experts(self, layer: int) -> list[int] | None:
        """The parent experts of a parent layer that the child keeps, in order (None: all)."""
        k = self.kept.get((Space.EXPERTS, layer))
        return None if k is None else k.tolist()

    def axis_index(self, axis, layer: int | None, size: int, expert: int | None = None,
                   stage: int | None = None) -> Index | None:
        key = (axis, layer, expert, size) if stage is None else (axis, layer, expert, size, stage)
        if key in self._cache:
            return self._cache[key]
        if axis is None:
            out = None
        elif isinstance(axis, At):
            st = axis.resolve(stage, len(self.parent.depths or ()))
            k = self._kept(axis.space, layer, expert, st)
            out = None if k is None or len(k) == size and bool((k == torch.arange(size)).all()) else Index(k)
        elif isinstance(axis, Fused) and axis.layout == "heads":
            k = self.kept.get((axis.parts[0], axis.parts[0].key(layer, expert)))
            out = None if k is None else Index(expand_heads(k, len(axis.parts) * self.parent.head_dim))
        elif isinstance(axis, Fused):
            sizes = axis.part_sizes(self.parent)
            kept = [self._kept(p, layer, expert) for p in axis.parts]
            if all(k is None for k in kept):
                out = None
            else:
                offs = [sum(sizes[:j]) for j in range(len(sizes))]
                out = Index(torch.cat([(torch.arange(n) if k is None else k) + o
                                       for k, n, o in zip(kept, sizes, offs)]))
        else:
            k = self._kept(axis, layer, expert, stage)
            out = None if k is None or len(k) == size and bool((k == torch.arange(size)).all()) else Index(k)
        self._cache[key] = out
        return out

    def child_config(self, cfg: dict) -> dict:
        out = self.family.child_config(cfg, self.child, self.layers, DTYPE_STR[self.out_dtype])
        if self.untie:
            out["tie_word_embeddings"] = False
        return out

    # ---- the child's tensors, in the parent's storage order
    def child_tensors(self, ckpt: Checkpoint) -> list[ChildTensor]:
        fam = self.family
        tied = fam.tied(ckpt.config)
        new_index = {p: i for i, p in enumerate(self.layers)}
        if self.parent.depths is not None:  # staged: a child layer's number within its stage
            first: dict[int, int] = {}
            for i, p in enumerate(self.layers):
                first.setdefault(self.parent.stage_of(p), i)
            new_index = {p: i - first[self.parent.stage_of(p)] for i, p in enumerate(self.layers)}
        out = []
        infos = sorted(ckpt.tensors.values(), key=lambda t: (ckpt.shards.index(t.shard), t.begin))
        for info in infos:
            rule, m = match_rule(fam, info)
            if rule.drop or (rule.tied and tied and not self.untie):
                continue
            layer, expert = tensor_key(rule, m, self.parent)
            stage = tensor_stage(rule, m)
            renumber = {}
            if layer is not None:
                if layer not in new_index:
                    continue
                renumber["layer"] = new_index[layer]
            if expert is not None:
                kept = self.kept_experts(layer)
                if kept is not None:
                    if expert not in kept:
                        continue
                    renumber["expert"] = kept.index(expert)
            name = info.name
            for g in sorted(renumber, key=m.start, reverse=True):  # dropped layers/experts: renumber the rest
                name = name[: m.start(g)] + str(renumber[g]) + name[m.end(g):]
            shape = self._shape(rule, info, layer, expert, stage)
            dtype = self.out_dtype if info.dtype.is_floating_point and self.cast else info.dtype
            out.append(ChildTensor(name, info, rule, layer, shape, dtype, rule.norm, expert, stage))
        if self.untie and tied and not any(c.rule.tied for c in out):
            out.append(self._untied_head(ckpt, out))
        return out

    def _shape(self, rule: Rule, info: TensorInfo, layer, expert, stage=None) -> tuple[int, ...]:
        if self.rotate:  # the hidden axis is projected, not cut
            return tuple(self.child.hidden_size if a is Space.HIDDEN else
                         (idx.length if (idx := self.axis_index(a, layer, s, expert)) is not None else s)
                         for a, s in zip(rule.axes, info.shape))
        return tuple((idx.length if (idx := self.axis_index(a, layer, s, expert, stage)) is not None else s)
                     for a, s in zip(rule.axes, info.shape))

    def _untied_head(self, ckpt: Checkpoint, cts: list[ChildTensor]) -> ChildTensor:
        """The output head of a tied parent, written as a tensor of its own: the input embedding
        (the tied rule's source), named by the family's block description."""
        fam = self.family
        head_rule = next(r for r in fam.rules if r.tied)
        emb = next(c for c in cts if c.layer is None and c.rule.axes == head_rule.axes and not c.rule.tied)
        name = f"{fam.block.head}.weight"
        return ChildTensor(name, emb.parent, head_rule, None, emb.shape, emb.dtype, False, None)


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


def check_fused(fam: Family, dims: Dims, info: TensorInfo, rule: Rule) -> None:
    """The parts of every fused axis, computed from the dims, must add up to the axis's real length."""
    for ax, (a, n) in enumerate(zip(rule.axes, info.shape)):
        if not isinstance(a, Fused):
            continue
        sizes = a.part_sizes(dims)
        if None in sizes or sum(sizes) != n:
            parts = " + ".join(f"{p} {s}" for p, s in zip(a.parts, sizes))
            raise ParentError(f"tensor {info.name!r} axis {ax} has length {n}, but the {fam.name} config makes its "
                              f"fused parts {parts}; the checkpoint does not match its config")


def check_tensors(fam: Family, dims: Dims, ckpt: Checkpoint) -> None:
    """Before any work: every tensor is in the family's map, its shape is what the config's dims
    make it (Family.expected_shape, every rule's axes), weights are floating point, and the layer
    count of the config is the layer count of the tensors."""
    where = ckpt.config_path.name
    layers: set[int] = set()
    for info in ckpt.tensors.values():
        rule, m = match_rule(fam, info)
        if rule.drop:
            continue
        check_fused(fam, dims, info, rule)
        stage = tensor_stage(rule, m)
        if stage is not None and not stage < len(dims.depths or ()):
            raise ParentError(f"tensor {info.name!r} names stage {stage}, but {where} has {len(dims.depths or ())} "
                              "stages; the checkpoint does not match its config")
        if stage is not None and rule.per_layer and not int(m.group("layer")) < dims.depths[stage]:
            raise ParentError(f"tensor {info.name!r} names layer {m.group('layer')} of stage {stage}, but {where} "
                              f"gives that stage {dims.depths[stage]} layers; the checkpoint does not match its config")
        try:
            expected = fam.expected_shape(rule, dims, stage)
        except ValueError as e:
            raise ParentError(f"tensor {info.name!r}: {e}; the checkpoint does not match its config") from None
        for ax, (want, n) in enumerate(zip(expected, info.shape)):
            if want is not None and want != n:
                sp = rule.axes[ax]
                raise ParentError(f"tensor {info.name!r} axis {ax} ({sp}) has length {n}, but {where} makes it {want}; "
                                  "the checkpoint does not match its config")
        if rule.spaces() and not info.dtype.is_floating_point:
            raise ParentError(f"tensor {info.name!r} is stored as {info.dtype}, but it is a weight; the checkpoint is "
                              "corrupt or not a " + fam.name + " model")
        if rule.per_layer:
            layers.add(tensor_key(rule, m, dims)[0])
        if rule.per_expert and dims.num_experts is not None and int(m.group("expert")) >= dims.num_experts:
            raise ParentError(f"tensor {info.name!r} names expert {m.group('expert')}, but {where} has "
                              f"{dims.num_experts} experts")
    n = dims.num_hidden_layers
    key = fam.keys.get("num_hidden_layers")
    if layers and max(layers) >= n:
        raise ParentError(f"the checkpoint holds layer {max(layers)}, but {where} field {key} says {n} layers; "
                          "the checkpoint does not match its config")
    if len(layers) != n:
        raise ParentError(f"{where} field {key} says {n} layers, but the checkpoint holds tensors of {len(layers)}; "
                          "the checkpoint does not match its config")


def check_parent(ckpt: Checkpoint) -> tuple[Family, Dims]:
    """The parent's family and dims, with its config checked by schema and against its tensors."""
    from .families import family_for

    fam = family_for(ckpt.config)
    fam.check_config(ckpt.config, str(ckpt.config_path))
    dims = fam.dims(ckpt.config)
    check_tensors(fam, dims, ckpt)
    fam.check_layout(ckpt.config, list(ckpt.tensors), ckpt.config_path.name)
    return fam, dims


def own_keys(fam: Family, recipe: Recipe) -> Recipe:
    """The recipe with target keys in the family's own sense: a canonical name the family has no
    dimension for, but which is the family's config key of another dimension, means that one
    (a MoE family whose config calls its experts' FFN width `intermediate_size` and has no dense FFN).
    Setting both names to different sizes is a RecipeError."""
    t, update = recipe.target, {}
    for canon in CANONICAL:
        v = getattr(t, canon, None)
        if not v or fam.keys.get(canon, canon) is not None:   # 0: the budget solver's "no dense FFN"
            continue
        for other, key in fam.keys.items():
            keys = key if isinstance(key, tuple) else (key,)
            if other != canon and canon in keys:
                w = getattr(t, other, None)
                if w is not None and w != v:
                    raise RecipeError(f"target sets {canon} {v} and {other} {w}, but a {fam.name} config's {canon} "
                                      f"is its {other}; give one of them")
                update[canon], update[other] = None, v
    if not update:
        return recipe
    return recipe.model_copy(update={"target": t.model_copy(update=update)})


def resolve_target(fam: Family, parent: Dims, recipe: Recipe, n_layers_from_stage: int | None,
                   model_type: str | None = None, layers_stage: str | None = None,
                   listed: list[int] | None = None) -> Dims:
    """The child's shape from the recipe's target, or a RecipeError if it is impossible.
    n_layers_from_stage / listed: the layer count and the kept layers that a stage's explicit list
    fixes (layers_stage: that stage's name, for messages). A shape the family's runtime cannot run
    is refused too (Family.runtime)."""
    recipe = own_keys(fam, recipe)
    t = recipe.target
    if parent.depths is not None:
        return resolve_staged(fam, parent, recipe, n_layers_from_stage, layers_stage, listed)
    staged = [k for k in ("hidden_sizes", "depths") if getattr(t, k, None) is not None]
    if staged:
        raise RecipeError(f"target {staged[0]} gives one size per stage, but this {fam.name} parent has no stages; "
                          "use hidden_size and num_hidden_layers")
    if t.intermediate_size and not parent.intermediate_size:
        raise RecipeError(f"this {fam.name} parent has no dense FFN (every layer's FFN is experts); "
                          "set expert_intermediate_size instead of intermediate_size")
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
        raise RecipeError(f"target.num_hidden_layers is {layers}, but {layers_stage or 'the pipeline'} keeps "
                          f"{n_layers_from_stage} layers; make them agree")
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
    opt = {}
    for name in OPTIONAL:  # mixture-of-experts counts: only where the parent has them
        c, p = getattr(t, name, None), getattr(parent, name)
        if p is None:
            if c is not None:
                raise RecipeError(f"target {name} is set, but this {fam.name} parent has no such dimension; remove it")
            continue
        if c is not None and c > p:
            raise RecipeError(f"target {name} {c} is larger than the parent's {p}; a child can only be smaller")
        opt[name] = c if c is not None else p
    if "num_experts" in opt and "num_experts_per_tok" in opt:
        if getattr(t, "num_experts_per_tok", None) is None:
            opt["num_experts_per_tok"] = min(opt["num_experts_per_tok"], opt["num_experts"])
        elif opt["num_experts_per_tok"] > opt["num_experts"]:
            raise RecipeError(f"target num_experts_per_tok {opt['num_experts_per_tok']} is more than its "
                              f"num_experts {opt['num_experts']}")
    child = Dims(hidden, ffn, heads, kv, hd, layers, parent.vocab_size, **opt)
    fam.check_runtime(child, parent)
    return child


def resolve_staged(fam: Family, parent: Dims, recipe: Recipe, n_layers_from_stage: int | None,
                   layers_stage: str | None = None, listed: list[int] | None = None) -> Dims:
    """A staged family's child shape: `hidden_sizes` and `depths`, one per stage (each at most
    the parent's; left out: the parent's). Each stage's FFN width follows its width
    (Family.stage_ffn). The flat keys do not apply: widths and depths are per stage."""
    t = recipe.target
    n = len(parent.depths)
    flat = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                        "num_hidden_layers") if getattr(t, k) is not None]
    if flat:
        other = "depths" if flat[0] == "num_hidden_layers" else "hidden_sizes"
        raise RecipeError(f"target {flat[0]} does not apply to this {fam.name} parent, whose widths and depths are "
                          f"per stage; set {other} (a list of {n}, one per stage)")
    for name in OPTIONAL:
        if getattr(t, name, None) is not None:
            raise RecipeError(f"target {name} is set, but this {fam.name} parent has no such dimension; remove it")
    sizes = {}
    for key, p in (("hidden_sizes", parent.hidden_sizes), ("depths", parent.depths)):
        v = getattr(t, key, None)
        if v is None:
            sizes[key] = tuple(p)
            continue
        if len(v) != n:
            raise RecipeError(f"target {key} has {len(v)} entries, but this {fam.name} parent has {n} stages; "
                              f"give one per stage (the parent's: {list(p)})")
        for s_, (c, q) in enumerate(zip(v, p)):
            if c > q:
                raise RecipeError(f"target {key}[{s_}] {c} is larger than the parent's {q}; a child can only be smaller")
        sizes[key] = tuple(int(x) for x in v)
    depths = sizes["depths"]
    if getattr(t, "depths", None) is None and listed is not None:
        depths = tuple(sum(1 for i in listed if parent.stage_of(i) == s_) for s_ in range(n))
    total = sum(depths)
    if n_layers_from_stage is not None and total != n_layers_from_stage:
        raise RecipeError(f"target depths {list(depths)} make {total} layers, but {layers_stage or 'the pipeline'} "
                          f"keeps {n_layers_from_stage}; make them agree")
    hidden = sizes["hidden_sizes"]
    ffn = tuple(fam.stage_ffn(h, ph, pf) for h, ph, pf in zip(hidden, parent.hidden_sizes, parent.intermediate_sizes))
    return replace(parent, hidden_size=hidden[-1], intermediate_size=ffn[-1], num_hidden_layers=total,
                   hidden_sizes=hidden, intermediate_sizes=ffn, depths=depths)


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
