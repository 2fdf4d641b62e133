"""Summaries for `shrinkit inspect` and `shrinkit plan` (dry run)."""

from __future__ import annotations

from .checkpoint.reader import open_checkpoint
from .plan import DTYPE_STR, check_parent, count_params, parent_params
from .recipe import Recipe, parse_size
from .checkpoint.writer import Entry, layout


def inspect_summary(parent, config=None) -> dict:
    from .families.dual import dual_for

    with open_checkpoint(parent, config) as ck:
        dual = dual_for(ck.config)
        if dual is not None:
            from .towers import inspect_dual
            return inspect_dual(ck, dual, _inspect)
        return _inspect(ck)


def _inspect(ck) -> dict:
    fam, d = check_parent(ck)
    tied = fam.tied(ck.config)
    params = parent_params(fam, ck)
    return {
        "model": {"path": str(ck.weights_path), "family": fam.name,
                  "architecture": (ck.config.get("architectures") or ["?"])[0],
                  "model_type": ck.config.get("model_type"), "tied_embeddings": tied,
                  "params": params, "bytes": ck.total_bytes, "tensors": len(ck.tensors),
                  "shards": len(ck.shards)},
        "dims": d.as_dict(),
        "dtypes": {k: v for k, v in ck.dtype_counts().items()},
    }


def plan_summary(parent, recipe: Recipe, config=None, source: dict | None = None, tokenizer=None) -> dict:
    from .families.dual import dual_for
    from .pipeline import check_data, prepare

    with open_checkpoint(parent, config) as ck:
        dual = dual_for(ck.config)
        if dual is not None:
            from .towers import plan_dual
            return plan_dual(ck, dual, recipe, lambda v, p, r: _plan(v, p, r, tokenizer), tokenizer, source)
        if recipe.towers is not None:
            from .towers import refuse_towers
            refuse_towers(recipe, str(ck.config.get("model_type")))
        plan = prepare(ck, recipe)
        check_data(ck, recipe, tokenizer, verify=True, plan=plan)
        return _plan(ck, plan, recipe, tokenizer, source)


def _plan(ck, plan, recipe: Recipe, tokenizer=None, source: dict | None = None) -> dict:
    from .preflight import preflight
    from .ranking import ensure_selected

    # the data subclone would read (verification on), by subclone's own preflight (no output folder)
    preflight(ck, plan, recipe, None, tokenizer=tokenizer, verify=True)
    ensure_selected(plan, recipe.seed)  # shapes only; ranking does not change them
    cts = plan.child_tensors(ck)
    nbytes = sum(c.nbytes for c in cts)
    shards = layout([Entry(c.name, c.dtype, c.shape) for c in cts], parse_size(recipe.output.max_shard_size))
    layers_note = "chosen by calibration" if _layers_chosen_later(recipe) else plan.layers
    return {
        "parent": {**plan.parent.as_dict(), "bytes": ck.total_bytes, **(source or {})},
        "child": {**plan.child.as_dict(), "params": count_params(cts), "bytes": nbytes,
                  "dtype": DTYPE_STR[plan.out_dtype], "shards": len(shards), "kept_layers": layers_note,
                  **({"untied_head_params": plan.parent.vocab_size * plan.child.hidden_size} if plan.untie else {})},
        "stages": {n: s.model_dump() for n, s in recipe.parsed},
        **({"budget": plan.budget} if plan.budget else {}),
    }


def _layers_chosen_later(recipe: Recipe) -> bool:
    """Whether a stage chooses the child's layers at run time (from calibration)."""
    from .stages import STAGES
    return any(getattr(STAGES[n], "chooses_later", lambda c: False)(cfg) for n, cfg in recipe.parsed)
