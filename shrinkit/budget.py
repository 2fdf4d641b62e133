"""Targets by parameter budget: pick the child dims a recipe leaves open so that the child has
about the asked number of parameters.

    target: {params: 40M}                       # or params_ratio: 0.3, or non_embedding_params: 20M
    target: {params: 40M, num_hidden_layers: 12} # some dims fixed, the rest solved

Counting is exact and family-agnostic: every candidate shape is checked by the same
validation as an explicit target (plan.resolve_target) and counted from the plan's child
tensors (plan.child_tensors), never from a formula, so a family (dense, MoE, fused axes) needs
nothing here. Only the dims the pipeline can change are solved: widths need a rank_neurons
stage, depth a drop_layers stage without explicit lists; mixture-of-experts counts stay the
parent's unless fixed.

Constraints: head_dim is kept; attention shrinks by whole KV groups with the parent's
query-heads-per-group (families that tie heads to the hidden size follow it); hidden and
intermediate sizes are multiples of `multiple_of` (default 64, what GPU matmul kernels tile
well), or the parent's own size.

The width/depth rule. Among the shapes within 1 % of the budget, the one that minimizes

    |ln d - ALPHA ln w| + |ln(ffn ratio / parent's)| + |ln(attention width ratio / parent's)|

with w the hidden-size ratio and d the layer ratio to the parent, ALPHA = 0.5: depth shrinks
as the square root of width (w = 0.5 -> d = 0.71), and the FFN and attention keep the parent's
proportions to the hidden size. Why ALPHA in (0, 1), and 0.5: Minitron (Muralidharan et al.
2024, "Compact Language Models via Pruning and Knowledge Distillation"; Sreenivas et al. 2024,
its 8B -> 4B follow-up) finds width pruning better than depth pruning at equal parameters after
distillation (so depth should shrink less than width: ALPHA < 1); MobileLLM (Liu et al. 2024)
finds that sub-billion models need depth ("deep and thin"), and the target shapes of Xia et al.
2023 ("Sheared" structured pruning) shrink both: a 7B parent (4096 wide, 32 layers) to 2.7B
keeps every layer at w = 0.63, to 1.3B takes w = 0.5 and d = 0.75 (ALPHA 0.42) (so depth
should shrink too: ALPHA > 0). On SmolLM2-135M at 40M the rule picks hidden 384,
14 layers, FFN 960 where the hand-written recipes/smollm2-40m.yaml has 15 layers and FFN 1024
(BENCHMARKS.md compares the two after training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import RecipeError

ALPHA = 0.5          # ln(depth ratio) = ALPHA * ln(width ratio)
TOLERANCE = 0.01     # a shape within 1 % of the budget meets it
DEFAULT_MULTIPLE = 64
EXACT = 24           # candidate shapes counted exactly (the best by the rule, then the nearest)
WIDTHS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


@dataclass
class Shape:
    hidden: int
    ffn: int
    heads: int | None        # None: the family derives it
    kv: int | None
    layers: int
    pred: float = 0.0        # predicted count of the budget's kind (affine model)
    params: int = 0          # exact counts, once counted
    non_embedding: int = 0
    exact: bool = False
    score: float = 0.0
    dims: object = None

    def key(self):
        return (self.hidden, self.ffn, self.heads, self.kv, self.layers)

    def label(self) -> str:
        d = self.dims
        if d.depths is not None:
            return f"hidden_sizes {list(d.hidden_sizes)}, depths {list(d.depths)}"
        return (f"hidden {d.hidden_size}, ffn {d.intermediate_size}, heads {d.num_attention_heads}/"
                f"{d.num_key_value_heads} kv, layers {d.num_hidden_layers}")


@dataclass
class Solution:
    kind: str
    budget: int
    chosen: Shape
    alternatives: list[Shape]
    target: dict                 # the dims to put into the recipe's target
    note: str | None = None
    multiple_of: int = DEFAULT_MULTIPLE
    solved: list[str] = field(default_factory=list)

    def off(self, s: Shape) -> float:
        return (self._count(s) - self.budget) / self.budget

    def _count(self, s: Shape) -> int:
        return s.non_embedding if self.kind == "non_embedding_params" else s.params

    def summary(self) -> dict:
        c = self.chosen
        out = {"kind": self.kind, "budget": self.budget, "params": c.params, "non_embedding_params": c.non_embedding,
               "off": f"{100 * self.off(c):+.2f}%", "shape": c.label(), "solved": ", ".join(self.solved),
               "multiple_of": self.multiple_of,
               "rule": f"within {100 * TOLERANCE:g}% of the budget, min |ln d - {ALPHA} ln w| + FFN and attention "
                       "ratio deviations (shrinkit/budget.py)"}
        for i, a in enumerate(self.alternatives, 1):
            out[f"alternative {i}"] = f"{a.label()}: {self._count(a):,} ({100 * self.off(a):+.2f}%)"
        if self.note:
            out["note"] = self.note
        return out


def _grid(parent: int, m: int) -> list[int]:
    return sorted({k * m for k in range(1, parent // m + 1)} | {parent})


def solve(ckpt, fam, pdims, recipe, model_type: str | None = None) -> Solution:
    """The shape for the recipe's budget; RecipeError when no shape can reach it."""
    import torch

    from .plan import Plan, count_params, resolve_target
    from .families.spaces import Space
    from .ranking import ensure_selected
    from .stages import STAGES, Context, fixed_layers

    t = recipe.target
    if pdims.depths is not None:
        return _solve_staged(ckpt, fam, pdims, recipe)
    kind, value = t.budget()
    m = t.multiple_of or DEFAULT_MULTIPLE
    steps = [(STAGES[n], cfg) for n, cfg in recipe.parsed]
    caps = {c for st, _ in steps for c in st.provides}
    from_lists = fixed_layers(recipe, pdims.num_hidden_layers)[0]
    rotate = "rotates_hidden" in caps   # projects the hidden axis; a tied head is written untied
    widths_free = "ranks" in caps
    layers_free = "drops_layers" in caps and from_lists is None and t.num_hidden_layers is None
    choosers = [(st, cfg) for st, cfg in steps if "drops_layers" in st.provides]

    # ---- exact counting through the plan
    def count(hidden, ffn, heads, kv, layers) -> tuple[int, int, object] | None:
        fixed = {"hidden_size": hidden, "intermediate_size": ffn, "num_attention_heads": heads,
                 "num_key_value_heads": kv, "num_hidden_layers": layers}
        tgt = t.model_copy(update={**{k: None for k in ("params", "params_ratio", "non_embedding_params",
                                                         "multiple_of")}, **fixed})
        try:
            dims = resolve_target(fam, pdims, recipe.model_copy(update={"target": tgt}), from_lists, model_type)
        except RecipeError:
            return None
        plan = Plan(fam, pdims, dims, torch.float32, cast=False)
        plan.rotate, plan.untie = rotate, rotate and fam.tied(ckpt.config)
        plan.layers = list(range(dims.num_hidden_layers))
        for st, cfg in choosers:   # the layers a stage keeps from the recipe alone (not from calibration)
            st.prepare(cfg, Context(ckpt, recipe, plan=plan))
        ensure_selected(plan, 0)
        cts = plan.child_tensors(ckpt)
        total = count_params(cts)
        emb = count_params([c for c in cts if any(a is Space.VOCAB for a in c.rule.axes)])
        return total, total - emb, dims

    parent_total = count(pdims.hidden_size, pdims.intermediate_size, pdims.num_attention_heads,
                         pdims.num_key_value_heads, pdims.num_hidden_layers)
    if parent_total is None:  # pragma: no cover - the parent's own shape is always valid
        raise RecipeError("the parent's own shape does not validate; cannot solve a budget")
    if kind == "params_ratio":
        budget, kind = int(round(value * parent_total[0])), "params"
    else:
        budget = int(value)
    metric = 1 if kind == "non_embedding_params" else 0
    what = "non-embedding parameters" if metric else "parameters"
    if budget > parent_total[metric] * (1 + TOLERANCE):
        raise RecipeError(f"target {kind} {budget:,} is more than the parent's {parent_total[metric]:,} {what}; "
                          "a child can only be smaller")

    # ---- candidate widths: (hidden, heads, kv) and the FFN that keeps the parent's ratio
    P = pdims
    hiddens = [t.hidden_size] if t.hidden_size else \
        _grid(P.hidden_size, m) if widths_free or rotate else [P.hidden_size]
    ffn_fixed = t.intermediate_size or (None if widths_free else P.intermediate_size)
    ffns_all = [ffn_fixed] if ffn_fixed else _grid(P.intermediate_size, m)
    group = max(1, P.num_attention_heads // max(1, P.num_key_value_heads))
    att_ratio_p = P.num_attention_heads * P.head_dim / P.hidden_size
    widths = []
    for h in hiddens:
        w = h / P.hidden_size
        if fam.head_dim_from_hidden or not widths_free or (t.num_attention_heads and t.num_key_value_heads):
            heads_opts = [(t.num_attention_heads, t.num_key_value_heads)]
            if not widths_free and not fam.head_dim_from_hidden:
                heads_opts = [(P.num_attention_heads, P.num_key_value_heads)]
        elif t.num_attention_heads:
            heads_opts = [(t.num_attention_heads, None)]
        else:
            kvs = range(1, P.num_key_value_heads + 1) if not t.num_key_value_heads else [t.num_key_value_heads]
            ideal = P.num_key_value_heads * w
            kvs = sorted(kvs, key=lambda k: abs(math.log(k / ideal)))[:4]
            heads_opts = [(k * group, k) for k in kvs]
        for heads, kv in heads_opts:
            widths.append((h, heads, kv))

    def shape_score(s: Shape) -> float:
        d = s.dims
        w = d.hidden_size / P.hidden_size
        dl = d.num_hidden_layers / P.num_hidden_layers
        # no dense FFN (every layer's FFN is experts, whose width stays the parent's unless fixed)
        fr = (d.intermediate_size / d.hidden_size) / (P.intermediate_size / P.hidden_size) if P.intermediate_size else 1
        ar = (d.num_attention_heads * d.head_dim / d.hidden_size) / att_ratio_p
        # rounded: equal scores (different shapes can tie exactly) fall to the tie-break, nearest the budget
        return round(abs(math.log(dl) - ALPHA * math.log(w)) + abs(math.log(fr)) + abs(math.log(ar)), 9)

    Ls = list(range(1, P.num_hidden_layers + 1)) if layers_free else \
        [t.num_hidden_layers or from_lists or P.num_hidden_layers]
    cands: dict[tuple, Shape] = {}
    for h, heads, kv in widths:
        f0 = ffn_fixed or min(P.intermediate_size, max(m, round(P.intermediate_size * h / P.hidden_size / m) * m))
        la = Ls[0] if len(Ls) == 1 else min(2, Ls[-1])
        base = count(h, f0, heads, kv, la)
        if base is None:
            continue
        # affine model in layers and FFN width, from two or three exact counts; finalists are recounted
        if len(Ls) > 1:
            nxt = count(h, f0, heads, kv, la - 1 if la > 1 else la + 1)
            per_layer = (base[metric] - nxt[metric]) / (1 if la > 1 else -1) if nxt else 0
        else:
            per_layer = base[metric] / la
        const = base[metric] - la * per_layer
        slope = 0.0
        if not ffn_fixed and P.intermediate_size:
            f1 = f0 - m if f0 - m >= m else f0 + m
            alt = count(h, f1, heads, kv, la)
            slope = (base[metric] - alt[metric]) / (f0 - f1) / la if alt else 0.0
        for L in Ls:
            fs = {f0}
            if slope > 0:
                f_star = f0 + (budget - const - L * per_layer) / (L * slope)
                lo = math.floor(f_star / m) * m
                fs |= {lo, lo + m}
            fs = {f for f in fs if f in ffns_all or f == ffn_fixed} or {f0}
            for f in fs:
                s = Shape(h, f, heads, kv, L, pred=const + L * (per_layer + slope * (f - f0)))
                cands[s.key()] = s
    if not cands:
        raise RecipeError(f"no child shape satisfies the fixed dims of this target under the family's constraints; "
                          "fix fewer dims")

    val = (lambda s: s.non_embedding) if metric else (lambda s: s.params)

    def off(s: Shape) -> float:
        return abs((val(s) if s.exact else s.pred) - budget) / budget

    def exact(s: Shape) -> Shape | None:
        r = count(*s.key())
        if r is None:
            return None
        s.params, s.non_embedding, s.dims, s.exact = r[0], r[1], r[2], True
        s.score = shape_score(s)
        return s

    order = sorted(cands.values(), key=off)
    pool = [s for s in order if off(s) <= 2 * TOLERANCE] or order[:EXACT]
    for s in pool:  # rough score from the predicted dims picks which shapes to count exactly
        s.dims = _dims_like(s, P)
        s.score = shape_score(s)
    inside = sorted((s for s in pool if off(s) <= TOLERANCE), key=lambda s: s.score)
    counted: dict[tuple, Shape] = {}
    for s in inside[:EXACT] + order[:EXACT]:
        if s.key() not in counted and exact(s) is not None:
            counted[s.key()] = s
    shapes = list(counted.values())
    if not shapes:  # pragma: no cover - every candidate was validated when it was made
        raise RecipeError("no child shape satisfies this target; fix fewer dims")
    ok = sorted((s for s in shapes if abs(val(s) - budget) <= TOLERANCE * budget), key=lambda s: (s.score, abs(val(s) - budget)))
    note = None
    if ok:
        chosen, rest = ok[0], ok[1:]
    else:
        nearest = sorted(shapes, key=lambda s: abs(val(s) - budget))
        chosen, rest = nearest[0], nearest[1:]
        smallest = min(shapes, key=val)
        if budget < val(smallest) * (1 - TOLERANCE) and val(chosen) > budget:
            raise RecipeError(
                f"target {kind} {budget:,} is unreachable: the smallest child under this recipe's constraints "
                f"({smallest.label()}) has {val(smallest):,} {what}; raise the budget, lower multiple_of ({m}) or "
                "fix fewer dims")
        note = (f"no shape lands within {100 * TOLERANCE:g}% of {budget:,}: the nearest is "
                f"{100 * (val(chosen) - budget) / budget:+.2f}% off, because hidden and ffn move in steps of "
                f"multiple_of {m}, attention by whole KV groups and depth by whole layers; lower multiple_of or "
                "fix fewer dims")
    alts = [s for s in rest if s.key() != chosen.key()][:3]
    d = chosen.dims
    solved = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                          "num_hidden_layers") if getattr(t, k) is None]
    target = {"hidden_size": d.hidden_size, "intermediate_size": d.intermediate_size,
              "num_attention_heads": d.num_attention_heads, "num_key_value_heads": d.num_key_value_heads,
              "num_hidden_layers": d.num_hidden_layers}
    if fam.head_dim_from_hidden:  # the family derives heads from the hidden size
        target["num_attention_heads"] = target["num_key_value_heads"] = None
        solved = [k for k in solved if k not in ("num_attention_heads", "num_key_value_heads")]
    return Solution(kind, budget, chosen, alts, target, note, m, solved)


def _dims_like(s: Shape, P):
    """Predicted dims for the rough score (the exact dims come from resolve_target)."""
    from .families import Dims

    heads = s.heads or max(1, s.hidden // P.head_dim)
    kv = s.kv or heads
    return Dims(s.hidden, s.ffn, heads, kv, P.head_dim, s.layers, P.vocab_size)


def apply(recipe, solution: Solution):
    """The recipe with the solved dims in its target (the budget kept, for the record)."""
    tgt = recipe.target.model_copy(update={k: v for k, v in solution.target.items() if v is not None})
    return recipe.model_copy(update={"target": tgt})


STAGED_MULTIPLE = 16   # staged families: stage widths are multiples of this by default (48, 96, 192, 384 are)
WIDTH_STEPS, DEPTH_STEPS = 64, 24


def _solve_staged(ckpt, fam, P, recipe) -> Solution:
    """A staged family's budget: one width ratio for every stage (each stage's width its
    parent's times the ratio, a multiple of `multiple_of`, default 16, or the parent's own) and
    one depth ratio (each stage keeps round(parent depth x ratio) layers, at least one). Every
    candidate is counted exactly through the plan; the rule is the same as for flat families,
    within 1 % of the budget the least |ln d - ALPHA ln w| (w: the geometric mean of the stages'
    width ratios, d: the ratio of all layers), then the nearest to the budget."""
    import torch

    from .plan import Plan, count_params, resolve_staged
    from .ranking import ensure_selected
    from .stages import STAGES, Context, fixed_layers

    t = recipe.target
    kind, value = t.budget()
    m = t.multiple_of or STAGED_MULTIPLE
    steps = [(STAGES[n], cfg) for n, cfg in recipe.parsed]
    caps = {c for st, _ in steps for c in st.provides}
    from_lists, _, listed = fixed_layers(recipe, P.num_hidden_layers, listed=True)
    widths_free = "ranks" in caps and t.hidden_sizes is None
    layers_free = "drops_layers" in caps and from_lists is None and t.depths is None
    choosers = [(st, cfg) for st, cfg in steps if "drops_layers" in st.provides]

    def count(hidden: tuple, depths: tuple | None):
        tgt = t.model_copy(update={"params": None, "params_ratio": None, "non_embedding_params": None,
                                   "multiple_of": None, "hidden_sizes": list(hidden),
                                   "depths": None if depths is None else list(depths)})
        try:
            dims = resolve_staged(fam, P, recipe.model_copy(update={"target": tgt}), from_lists, listed=listed)
        except RecipeError:
            return None
        plan = Plan(fam, P, dims, torch.float32, cast=False)
        plan.layers = [P.layer_offset(s) + j for s, d in enumerate(dims.depths) for j in range(d)]
        for st, cfg in choosers:   # the layers a stage keeps from the recipe alone (not from calibration)
            st.prepare(cfg, Context(ckpt, recipe, plan=plan))
        ensure_selected(plan, 0)
        total = count_params(plan.child_tensors(ckpt))
        return total, total, dims   # no vocabulary: every parameter is a non-embedding one

    parent_total = count(P.hidden_sizes, P.depths)[0]
    if kind == "params_ratio":
        budget, kind = int(round(value * parent_total)), "params"
    else:
        budget = int(value)
    if budget > parent_total * (1 + TOLERANCE):
        raise RecipeError(f"target {kind} {budget:,} is more than the parent's {parent_total:,} parameters; "
                          "a child can only be smaller")
    if widths_free:
        hiddens = sorted({tuple(min(p, max(m, round(p * k / WIDTH_STEPS / m) * m)) for p in P.hidden_sizes)
                          for k in range(1, WIDTH_STEPS + 1)} | {tuple(P.hidden_sizes)})
    else:
        hiddens = [tuple(t.hidden_sizes or P.hidden_sizes)]
    if layers_free:
        depths = sorted({tuple(max(1, round(d * k / DEPTH_STEPS)) for d in P.depths)
                         for k in range(1, DEPTH_STEPS + 1)})
    else:
        depths = [tuple(t.depths) if t.depths is not None else None]
    shapes = []
    for h in hiddens:
        for d in depths:
            r = count(h, d)
            if r is None:
                continue
            dims = r[2]
            s = Shape(dims.hidden_size, dims.intermediate_size, None, None, dims.num_hidden_layers, params=r[0],
                      non_embedding=r[1], exact=True, dims=dims)
            w = math.exp(sum(math.log(c / p) for c, p in zip(dims.hidden_sizes, P.hidden_sizes)) / len(P.depths))
            dl = dims.num_hidden_layers / P.num_hidden_layers
            s.score = round(abs(math.log(dl) - ALPHA * math.log(w)), 9)
            s.key = (lambda dd=dims: (dd.hidden_sizes, dd.depths))
            shapes.append(s)
    if not shapes:
        raise RecipeError("no child shape satisfies the fixed dims of this target; fix fewer dims")
    ok = sorted((s for s in shapes if abs(s.params - budget) <= TOLERANCE * budget),
                key=lambda s: (s.score, abs(s.params - budget)))
    note = None
    if ok:
        chosen, rest = ok[0], ok[1:]
    else:
        nearest = sorted(shapes, key=lambda s: abs(s.params - budget))
        chosen, rest = nearest[0], nearest[1:]
        smallest = min(shapes, key=lambda s: s.params)
        if budget < smallest.params * (1 - TOLERANCE) and chosen.params > budget:
            raise RecipeError(f"target {kind} {budget:,} is unreachable: the smallest child under this recipe's "
                              f"constraints ({smallest.label()}) has {smallest.params:,} parameters; raise the budget, "
                              f"lower multiple_of ({m}) or fix fewer dims")
        note = (f"no shape lands within {100 * TOLERANCE:g}% of {budget:,}: the nearest is "
                f"{100 * (chosen.params - budget) / budget:+.2f}% off, because stage widths move in steps of "
                f"multiple_of {m} and depths by whole layers; lower multiple_of or fix fewer dims")
    alts = [s for s in rest if s.key() != chosen.key()][:3]
    d = chosen.dims
    solved = [k for k, free in (("hidden_sizes", widths_free), ("depths", layers_free)) if free]
    target = {"hidden_sizes": list(d.hidden_sizes), "depths": list(d.depths)}
    return Solution(kind, budget, chosen, alts, target, note, m, solved)
