"""One model's run: the plan, the data every stage reads, and the stages run in order inside
an output claim (shrinkit.pipeline.subclone is the entry; shrinkit.towers runs this once per tower
of a dual encoder).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .checkpoint.reader import Checkpoint
from .errors import RecipeError
from .families import family_for
from .families.spaces import Space
from .hashing import sha256_all
from .hf import check_config
from .plan import OUT_DTYPES, Plan, check_parent, own_keys, resolve_target
from .ranking import spaces_to_rank
from .recipe import Recipe
from .report import build_report, model_card, parent_dtype, report_markdown, strict_json
from .stages import STAGES, Context, fixed_layers, stage_providing


@dataclass
class Result:
    """What a subclone run gives back: the child folder, its report (shrinkit_report.json) and
    plan; `skipped` when --skip-if-current found the child already current (plan is None then)."""

    out: Path
    report: dict
    plan: Plan | None
    skipped: bool = False


def stages_of(recipe: Recipe):
    """(stage, its block) for every stage of the recipe, in pipeline order."""
    return [(STAGES[name], cfg) for name, cfg in recipe.parsed]


def reads(ctx: Context) -> list:
    """Every Read of the stages that will run (shrinkit.stages.base.Read), in pipeline order."""
    return [r for st, cfg in stages_of(ctx.recipe) for r in st.reads(cfg, ctx)]


def needs_transformers(ckpt: Checkpoint, recipe: Recipe, verify: bool, tokenizer=None) -> bool:
    """Whether this run imports transformers anyway: a stage that reads data (asked before the plan
    exists, so a stage that may run counts) or a full verification (a data-free run's default check
    reads the child back without it)."""
    ctx = Context(ckpt, recipe, tokenizer)
    return bool((verify and recipe.verify is not None) or reads(ctx))


def prepare(ckpt: Checkpoint, recipe: Recipe, transformers_check: bool = True) -> Plan:
    """Validate the recipe against the parent and build the plan (no ranking yet).

    The shape rules of transformers' config validation that a cut can break are checked here
    directly; with `transformers_check`, the child config also goes through transformers' own
    validation (importing transformers costs ~1-2 s, so a data-free run without verification
    skips it; tests/test_plan.py checks that both agree)."""
    fam, pdims = check_parent(ckpt)  # config by schema, every tensor's shape against it, before any work
    if transformers_check:
        check_config(ckpt.config, parent=True)   # a config transformers rejects as it is: the parent's fault
    steps = stages_of(recipe)
    n_layers, layers_stage, listed = fixed_layers(recipe, pdims.num_hidden_layers, listed=pdims.depths is not None)
    solution = None
    recipe = own_keys(fam, recipe)   # target keys in the family's own sense (a config key naming another dimension)
    if recipe.target.budget() is not None:  # a parameter budget: solve the open dims first
        from .budget import apply, solve
        solution = solve(ckpt, fam, pdims, recipe, ckpt.config.get("model_type"))
    child = resolve_target(fam, pdims, apply(recipe, solution) if solution else recipe, n_layers,
                           ckpt.config.get("model_type"), layers_stage, listed)
    out_dtype = OUT_DTYPES[recipe.output.dtype] if recipe.output.dtype else parent_dtype(ckpt)
    plan = Plan(fam, pdims, child, out_dtype, cast=recipe.output.dtype is not None)
    if solution is not None:
        plan.budget = solution.summary()
    present = {st.name for st, _ in steps}
    dropper = stage_providing("drops_layers")
    if child.num_hidden_layers < pdims.num_hidden_layers and dropper not in present:
        raise RecipeError(f"the target has {child.num_hidden_layers} of {pdims.num_hidden_layers} layers, "
                          f"but the pipeline has no {dropper} stage; add one")
    # the first N until a stage chooses (and for the config check); staged: the first of each stage
    plan.layers = list(range(child.num_hidden_layers)) if child.depths is None else \
        [pdims.layer_offset(s) + j for s, d in enumerate(child.depths) for j in range(d)]
    ctx = Context(ckpt, recipe, plan=plan)
    for st, cfg in steps:
        st.prepare(cfg, ctx)
    ranker = stage_providing("ranks")
    if spaces_to_rank(plan) - ({Space.HIDDEN} if plan.rotate else set()) and ranker not in present:
        raise RecipeError(f"the target narrows the model, but the pipeline has no {ranker} stage; add one")
    if transformers_check:
        check_config(plan.child_config(ckpt.config))
    return plan


def data_specs(ckpt: Checkpoint, recipe: Recipe, tokenizer=None, verify: bool = False, plan: Plan | None = None) -> list:
    """The calibration specs this run will read data with: every running stage's reads, and a
    verification that names its data."""
    specs = [r.spec for r in reads(Context(ckpt, recipe, tokenizer, plan=plan))]
    if verify and recipe.verify is not None and recipe.verify.data is not None:
        specs.append(recipe.verify)
    return specs


def check_data(ckpt: Checkpoint, recipe: Recipe, tokenizer=None, verify: bool = False, plan: Plan | None = None) -> None:
    """Before any work: every calibration file the run will read exists (RecipeError, exit 2)."""
    fam = family_for(ckpt.config)
    for spec in data_specs(ckpt, recipe, tokenizer, verify, plan):
        fam.check_data(spec.data)


def default_out(parent: str | os.PathLike, recipe: Recipe) -> Path:
    p = Path(parent)
    stem = p.stem if p.is_file() else p.resolve().name
    return Path.cwd() / f"{stem}-{recipe.name or 'child'}"


def run_inputs(ckpt: Checkpoint, recipe: Recipe, tokenizer=None, verify: bool = False) -> tuple[list, list]:
    """What this run reads, as (folders, files) with a label each: the output may not be, contain
    or lie inside an input folder, nor be or contain an input file. Every data spec any stage's
    block names counts (the registry's inputs()), whether or not that stage ends up reading it."""
    folders: list = []
    files: list = [("config", ckpt.config_path)]
    if ckpt.weights_path.is_dir():
        folders.append(("parent folder", ckpt.root))
        for s in ckpt.shard_paths:
            folders.append(("folder of the parent's shard", os.path.dirname(os.path.realpath(s))))
    for s in ckpt.shard_paths:
        files.append(("parent shard", s))
    if tokenizer:
        folders.append(("--tokenizer folder", tokenizer))
    ctx = Context(ckpt, recipe, tokenizer)
    specs = [spec for st, cfg in stages_of(recipe) for spec in st.inputs(cfg, ctx)]
    if verify and recipe.verify is not None:
        specs.append(recipe.verify)
    random = family_for(ckpt.config).random_data
    for spec in specs:
        if spec is not None and spec.data not in (None, "builtin", random):
            if os.path.isdir(spec.data):
                folders.append(("calibration data folder", spec.data))
            else:
                files.append(("calibration data", spec.data))
    return folders, files


def _run(ctx: Context, t_start: float, opts: dict) -> dict:
    """Hash the parent (in a thread) while every stage runs in order, verify the child, write the
    report into the output's temporary folder. opts["hashes"], when given and filled, holds the
    parent's shard hashes already (a dual encoder's second tower reads the same shards)."""
    hashes: dict[str, str] = opts.setdefault("hashes", {})
    hash_error: list[BaseException] = []

    def hash_all():
        try:
            sha256_all(ctx.ckpt.shard_paths, hashes)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            hash_error.append(e)

    hasher = None if hashes else threading.Thread(target=hash_all, daemon=True)
    if hasher is not None:
        hasher.start()
    stages = []
    for st, cfg in stages_of(ctx.recipe):
        t0 = time.perf_counter()
        info: dict = {"stage": st.name}
        reason = st.skip_reason(cfg, ctx)
        if reason is not None:
            info["skipped"] = reason
        else:
            info.update(st.run(cfg, ctx))
        info["seconds"] = round(time.perf_counter() - t0, 3)
        stages.append(info)
    ctx.selected()  # widths unchanged and nothing ranked: keeps everything
    verified = _verify(ctx, opts)
    if hasher is not None:
        hasher.join()
    if hash_error:
        raise hash_error[0]
    report = build_report(ctx.ckpt, ctx.plan, ctx.recipe, stages, hashes, ctx.written,
                          time.perf_counter() - t_start, opts.get("source"))
    if ctx.checks.notes:
        report["notes"] = list(ctx.checks.notes)
    report["runtime"] = {"device": ctx.device, "device_memory": ctx.checks.budget.memory}
    if verified is not None:
        report["verify"] = verified
    report["files"] = dict(sorted(ctx.files.items()))
    report = strict_json(report)   # NaN / infinity (a diverged verification) become null: strict JSON
    tmp = ctx.scratch
    (tmp / "shrinkit_report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (tmp / "shrinkit_report.md").write_text(report_markdown(report))
    (tmp / "README.md").write_text(model_card(report))
    return report


def _verify(ctx: Context, opts: dict) -> dict | None:
    """The child's check after writing (see shrinkit.preflight for what runs by default). Whatever
    goes wrong here is recorded in the report, never raised: the written child is kept."""
    checks = ctx.checks
    if checks.verify_mode is None:
        return None
    from .verify import error_result, structural_check, structural_table, verify_child
    t0 = time.perf_counter()
    try:
        if checks.verify_mode == "structural":
            ctx.progress.phase("check (structural)", 0)
            v = structural_check(ctx.scratch, {c.name: (c.shape, c.dtype) for c in ctx.written},
                                 ctx.plan.child.as_dict())
            tok = f" --tokenizer {ctx.tokenizer}" if ctx.tokenizer else ""
            v["how_to_verify"] = f"shrinkit verify {opts['parent_arg']} {opts['out']}{tok}"
            v["table"] = structural_table(v)
        else:
            v = verify_child(ctx.ckpt, ctx.scratch, checks.verify, device=checks.device, tokenizer=ctx.tokenizer,
                             seed=ctx.seed, scratch=ctx.scratch, ids=checks.verify_ids,
                             parent_final=checks.parent_final, gate=checks.gate, progress=ctx.progress)
    except Exception as e:  # noqa: BLE001 - recorded in the report; the child stays
        v = error_result(e)
        if opts.get("debug"):
            import traceback
            v["traceback"] = traceback.format_exc()
    v["seconds"] = round(time.perf_counter() - t0, 3)
    return v
