"""Run a recipe over a parent checkpoint and stream the child to disk.

subclone() checks everything knowable before any work (the plan, the data every stage reads, the
output folder, preflight), then runs the recipe's stages (shrinkit.stages: each stage is one
module, asked through the registry) over one Checkpoint inside one output claim, verifies the
written child, and writes the report (shrinkit.runner). A dual-encoder parent (two towers) is cut
tower by tower and joined (shrinkit.towers).
"""

from __future__ import annotations

import os
import time

from .checkpoint.reader import Checkpoint, open_checkpoint  # noqa: F401 - API
from .errors import RecipeError  # noqa: F401 - API
from .families.dual import dual_for
from .hashing import parent_hash, recipe_hash, sha256_all  # noqa: F401 - API
from .hf import TOKENIZER_FILES  # noqa: F401 - API
from .output import Claim, check_inputs, check_out, resolve_out
from .plan import Plan  # noqa: F401 - API
from .preflight import preflight, resolve_device  # noqa: F401 - resolve_device: API
from .progress import Progress
from .ranking import default_method, ensure_selected, spaces_to_rank  # noqa: F401 - API
from .recipe import Recipe
from .runtime import budget_scope
from .runner import (Result, _run, _verify, check_data, data_specs, default_out, needs_transformers,  # noqa: F401
                     prepare, reads, run_inputs, stages_of)
from .stages import Context


def subclone(parent: str | os.PathLike, recipe: Recipe, out: str | os.PathLike | None = None, *,
             force: bool = False, config: str | os.PathLike | None = None,
             progress: Progress | None = None, device: str = "cpu", tokenizer: str | os.PathLike | None = None,
             verify: bool = False, source: dict | None = None, device_memory: int | str | None = None) -> Result:
    progress = progress or Progress()
    t_start = time.perf_counter()
    ckpt = open_checkpoint(parent, config)
    try:
        dual = dual_for(ckpt.config)
        if dual is not None:   # two towers, each cut as a model of its own, joined (shrinkit.towers)
            from .towers import subclone_dual
            return subclone_dual(ckpt, dual, recipe, out if out is not None else default_out(parent, recipe),
                                 force=force, progress=progress, device=device, tokenizer=tokenizer, verify=verify,
                                 source=source, device_memory=device_memory, parent_arg=str(parent), t_start=t_start)
        if recipe.towers is not None:
            from .towers import refuse_towers
            refuse_towers(recipe, str(ckpt.config.get("model_type")))
        plan = prepare(ckpt, recipe, needs_transformers(ckpt, recipe, verify, tokenizer))
        check_data(ckpt, recipe, tokenizer, verify, plan)
        out = resolve_out(out if out is not None else default_out(parent, recipe))
        check_inputs(out, *run_inputs(ckpt, recipe, tokenizer, verify))
        check_out(out, force)
        checks = preflight(ckpt, plan, recipe, out, device=device, tokenizer=tokenizer, verify=verify,
                           device_memory=device_memory)
        ctx = Context(ckpt, recipe, tokenizer, plan=plan, device=checks.device, progress=progress, checks=checks)
        opts = {"verify": verify, "source": source, "parent_arg": str(parent), "out": str(out)}
        with Claim(out, force, progress.log) as claim, budget_scope(checks.budget):
            ctx.scratch = claim.tmp
            report = _run(ctx, t_start, opts)
            claim.publish()
    finally:
        ckpt.close()
        progress.close()
    return Result(out, report, plan)
