"""Dual encoders (shrinkit.families.dual), cut tower by tower and joined into one child.

A dual-encoder recipe gives one recipe per tower under `towers:` (a tower it does not name is
copied whole); `output` and `seed` at the top level serve both towers unless a tower sets its own.
Before any work, every tower is planned, its data checked and preflighted, exactly as a one-tower
parent is (shrinkit.pipeline), and the towers must agree on the output dtype. Then, inside one
output claim, each tower runs its pipeline over a view of the parent (its own tensors under their
own names, its nested config) into a folder of the claim: the tower child is a model of its own
(CLIPTextModelWithProjection, CLIPVisionModelWithProjection, SiglipTextModel,
SiglipVisionModel) and is verified as one. The join moves the towers' shards into the child
(renumbered, never copied), writes the shared scalars (logit_scale, logit_bias) as one more shard,
the index over all of them and the joined config, and a report with each tower's report inside.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from .checkpoint.reader import Checkpoint, open_checkpoint
from .errors import RecipeError, ShrinkitError
from .families.dual import DualEncoder
from .recipe import Recipe

INDEX = "model.safetensors.index.json"


@contextlib.contextmanager
def _tower(name: str):
    """Errors raised for one tower name it (`towers.vision: ...`)."""
    try:
        yield
    except ShrinkitError as e:
        if getattr(e, "_tower", False):
            raise
        err = type(e)(f"towers.{name}: {e}")
        err._tower = True
        raise err from None


def tower_recipes(dual: DualEncoder, recipe: Recipe) -> dict[str, Recipe]:
    """One recipe per tower (a tower the recipe does not name: copied whole)."""
    from .stages import stage_providing

    names = [t.name for t in dual.towers]
    top = [k for k in ("target", "stages", "calibration", "verify") if k in recipe.model_fields_set]
    if top:
        raise RecipeError(f"a {dual.name} parent is cut tower by tower: move `{top[0]}:` under `towers: "
                          f"{{{names[0]}: ..., {names[1]}: ...}}` (one recipe per tower)")
    if not recipe.towers:
        raise RecipeError(f"a {dual.name} parent has two towers ({', '.join(names)}); give each its recipe under "
                          "`towers:` (a tower not named there is copied whole)")
    for k in recipe.towers:
        dual.tower(k)   # RecipeError naming the towers
    out = {}
    for n in names:
        r = recipe.towers.get(n)
        if r is None:
            r = Recipe(stages=[{stage_providing("writes"): {}}])   # copied whole: only the writing stage
        upd = {k: getattr(recipe, k) for k in ("output", "seed") if k not in r.model_fields_set}
        r = r.model_copy(update=upd)
        r.name = f"{recipe.name or 'child'}.{n}"
        out[n] = r
    return out


def refuse_towers(recipe: Recipe, family: str) -> None:
    from .families.dual import DUALS

    if recipe.towers is not None:
        raise RecipeError(f"`towers:` is for dual-encoder parents ({', '.join(d.name for d in DUALS)}); this parent "
                          f"is a {family} model: put target and stages at the top level")


def prepare_towers(ckpt: Checkpoint, dual: DualEncoder, recipe: Recipe, verify: bool, tokenizer=None,
                   transformers_check: bool | None = None):
    """Each tower's view, recipe and plan, checked (the dual's own rules too) before any work."""
    from .runner import check_data, needs_transformers, prepare

    recipes = tower_recipes(dual, recipe)
    views, plans = dual.views(ckpt), {}
    for t in dual.towers:
        with _tower(t.name):
            v, r = views[t.name], recipes[t.name]
            tc = needs_transformers(v, r, verify, tokenizer) if transformers_check is None else transformers_check
            plans[t.name] = prepare(v, r, tc)
            check_data(v, r, tokenizer, verify, plans[t.name])
    dual.check_child({n: p.parent for n, p in plans.items()}, {n: p.child for n, p in plans.items()})
    if len({p.out_dtype for p in plans.values()}) > 1:
        raise RecipeError("the towers would be written in different dtypes; give `output: {dtype: ...}` once, at "
                          "the top level")
    return views, recipes, plans


def subclone_dual(ckpt: Checkpoint, dual: DualEncoder, recipe: Recipe, out, *, force: bool, progress, device: str,
                  tokenizer, verify: bool, source: dict | None, device_memory, parent_arg: str, t_start: float):
    from .output import Claim, check_inputs, check_out, resolve_out
    from .runner import Result, _run, run_inputs
    from .preflight import preflight
    from .runtime import budget_scope
    from .stages import Context

    views, recipes, plans = prepare_towers(ckpt, dual, recipe, verify, tokenizer)
    out = resolve_out(out)
    for n, v in views.items():
        check_inputs(out, *run_inputs(v, recipes[n], tokenizer, verify))
    check_out(out, force)
    checks = {}
    for n, v in views.items():
        with _tower(n):
            checks[n] = preflight(v, plans[n], recipes[n], out, device=device, tokenizer=tokenizer, verify=verify,
                                  device_memory=device_memory)
    _room_for_both(out, checks)
    reports = {}
    # one opts for both towers: the parent's shard hashes, made by the first tower's run, serve the second
    opts = {"verify": verify, "source": source, "parent_arg": parent_arg, "out": str(out)}
    with Claim(out, force, progress.log) as claim:
        for t in dual.towers:
            n = t.name
            tdir = claim.tmp / f".tower-{n}"
            tdir.mkdir()
            with _tower(n), budget_scope(checks[n].budget):
                ctx = Context(views[n], recipes[n], tokenizer, plan=plans[n], device=checks[n].device,
                              progress=progress, checks=checks[n])
                ctx.scratch = tdir
                reports[n] = (_run(ctx, time.perf_counter(), opts), ctx.files)
        report = join(ckpt, dual, recipe, plans, reports, claim.tmp, time.perf_counter() - t_start)
        claim.publish()
    return Result(out, report, None)


def _room_for_both(out: Path, checks: dict) -> None:
    """Each tower's preflight found room for its own child; the joined child holds both."""
    import shutil

    from .errors import UsageError
    from .preflight import _gb, _writable_ancestor

    anc = _writable_ancestor(out)
    need = sum(c.need_bytes for c in checks.values())
    free = shutil.disk_usage(anc).free
    if free < need:
        raise UsageError(f"not enough free disk space in {anc}: the two towers' children and their scratch need "
                         f"{_gb(need)}, {_gb(free)} is free; free some space or choose another --out")


def join(ckpt: Checkpoint, dual: DualEncoder, recipe: Recipe, plans: dict, reports: dict, tmp: Path,
         seconds: float) -> dict:
    """Move the towers' shards into `tmp`, write the shared tensors, the index, the config, the
    tokenizer and processor files and the report."""
    import shutil

    from .childfiles import copy_file, write_bytes
    from .hf import TOKENIZER_FILES
    from .plan import DTYPE_STR
    from .report import strict_json

    dtype = next(iter(plans.values())).out_dtype
    files, shared = _join_weights(ckpt, dual, dtype, reports, tmp)
    tower_cfgs = {t.name: json.loads((tmp / f".tower-{t.name}" / "config.json").read_text()) for t in dual.towers}
    cfg = dual.child_config(ckpt.config, tower_cfgs, DTYPE_STR[dtype])
    write_bytes(tmp / "config.json", (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode(), files)
    for fn in TOKENIZER_FILES:
        for t in dual.towers:
            src = tmp / f".tower-{t.name}" / fn
            if src.is_file():
                copy_file(src, tmp / fn, files)
                break
    for t in dual.towers:
        shutil.rmtree(tmp / f".tower-{t.name}")
    report = _joined_report(ckpt, dual, recipe, reports, shared, DTYPE_STR[dtype], seconds)
    report["files"] = dict(sorted(files.items()))
    report = strict_json(report)
    (tmp / "shrinkit_report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (tmp / "shrinkit_report.md").write_text(report_markdown(report))
    (tmp / "README.md").write_text(model_card(report))
    return report


def _join_weights(ckpt: Checkpoint, dual: DualEncoder, dtype, reports: dict, tmp: Path) -> tuple[dict, dict]:
    """The towers' shards moved into `tmp` (renumbered model-0000i-of-0000N, bytes untouched),
    the shared scalars written as the last shard, and the index over all of them. Returns the
    files' records (size, sha256) and the shared tensors."""
    from safetensors.torch import save

    from .childfiles import write_bytes

    shards: list[tuple[str, Path, list[str]]] = []   # (tower, file, its tensors)
    for t in dual.towers:
        tdir = tmp / f".tower-{t.name}"
        with open_checkpoint(tdir) as ck:
            by_file: dict[str, list[str]] = {}
            for name, info in ck.tensors.items():
                by_file.setdefault(info.shard, []).append(name)
        shards += [(t.name, tdir / f, names) for f, names in sorted(by_file.items())]
    shared = {k: ckpt.get(k).to(dtype).clone() for k in dual.shared if k in ckpt.tensors}
    total = len(shards) + (1 if shared else 0)
    files: dict = {}
    weight_map: dict[str, str] = {}
    for i, (n, path, names) in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(path, tmp / fn)
        files[fn] = reports[n][1][path.name]   # size and sha256, recorded as the tower wrote it
        weight_map.update({x: fn for x in names})
    if shared:
        fn = f"model-{total:05d}-of-{total:05d}.safetensors"
        write_bytes(tmp / fn, save(shared, metadata={"format": "pt"}), files)   # a few scalars
        weight_map.update({k: fn for k in shared})
    size = sum(int(files[f]["size"]) for f in set(weight_map.values()))
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    write_bytes(tmp / INDEX, (json.dumps(index, indent=2) + "\n").encode(), files)
    return files, shared


def _joined_report(ckpt: Checkpoint, dual: DualEncoder, recipe: Recipe, reports: dict, shared: dict, dtype: str,
                   seconds: float) -> dict:
    """The dual child's report: the fields a one-tower report has (dims flattened as
    `tower.dim`), and each tower's own report under `towers`."""
    from .hashing import recipe_hash
    from .version import __version__

    def dims(side: str) -> dict:
        return {f"{n}.{k}": v for n, (r, _) in reports.items() for k, v in r[side]["dims"].items()
                if not isinstance(v, (list, dict))}

    first = next(iter(reports.values()))[0]
    report = {
        "shrinkit_version": __version__,
        "family": dual.name,
        "architecture": (ckpt.config.get("architectures") or [None])[0],
        "base_model": first["base_model"],
        "recipe": recipe.as_dict(),
        "recipe_hash": recipe_hash(recipe),
        "parent_hash": first["parent_hash"],   # the whole parent's shards and config.json
        "parent": {**{k: v for k, v in first["parent"].items() if k != "dims"},
                   "params": sum(r["parent"]["params"] for r, _ in reports.values())
                   + sum(ckpt.tensors[k].numel for k in dual.shared if k in ckpt.tensors),
                   "bytes": ckpt.total_bytes, "dims": dims("parent")},
        "child": {
            "dims": dims("child"),
            "params": sum(r["child"]["params"] for r, _ in reports.values()) + sum(x.numel() for x in shared.values()),
            "bytes": sum(r["child"]["bytes"] for r, _ in reports.values())
            + sum(x.numel() * x.element_size() for x in shared.values()),
            "dtype": dtype,
        },
        "towers": {n: {k: v for k, v in r.items() if k not in ("files", "shrinkit_version", "recipe_hash", "parent_hash")}
                   for n, (r, _) in reports.items()},
        "seconds": round(seconds, 3),
    }
    notes = [f"{n} tower: {x}" for n, (r, _) in reports.items() for x in r.get("notes", [])]
    if notes:
        report["notes"] = notes
    verify = _joined_verify({n: r.get("verify") for n, (r, _) in reports.items()})
    if verify is not None:
        report["verify"] = verify
    return report


def _joined_verify(vs: dict) -> dict | None:
    """Both towers' checks as one: the worst status, each tower's table under its name."""
    if all(v is None for v in vs.values()):
        return None
    from .verify import FAILED
    order = ["ok", "skipped", *FAILED]
    statuses = [v.get("status", "ok") for v in vs.values() if v is not None]
    worst = max(statuses, key=lambda s: order.index(s) if s in order else len(order))
    table = []
    for n, v in vs.items():
        if v is not None:
            table += [f"### {n} tower", ""] + list(v.get("table", [])) + [""]
    return {"status": worst, "kind": "towers", "towers": vs, "table": table[:-1]}


def report_markdown(report: dict) -> str:
    from .report import stage_rows

    lines = [f"# shrinkit report: {report['base_model']} -> child", "",
             f"shrinkit {report['shrinkit_version']}, dual encoder `{report['family']}` ({report['architecture']}), "
             f"recipe `{report['recipe'].get('name')}`, {report['seconds']:.2f} s in all.", "",
             "| tower | parent | child |", "|---|---|---|"]
    for n, r in report["towers"].items():
        p, c = r["parent"]["dims"], r["child"]["dims"]
        lines.append(f"| {n} ({r['family']}) | " + ", ".join(f"{k} {v}" for k, v in p.items())
                     + " | " + ", ".join(f"{k} {v}" for k, v in c.items()) + " |")
    lines += ["", f"Child: {report['child']['params'] / 1e6:.2f}M params, {report['child']['bytes'] / 1e6:.1f} MB, "
              f"{report['child']['dtype']}.", ""]
    for n, r in report["towers"].items():
        lines += [f"## {n} tower", ""] + stage_rows(r) + [""]
    v = report.get("verify")
    if v:
        lines += ["## Verification", ""] + v.get("table", []) + [""]
    return "\n".join(lines) + "\n"


def model_card(report: dict) -> str:
    from .report import card_head

    lines = card_head(report, "This dual encoder", ", tower by tower",
                      ", and the projections keep the embedding width, so image and text embeddings stay comparable")
    lines += report_markdown(report).splitlines()[4:]
    return "\n".join(lines) + "\n"


def tower_data(fam, data: str) -> str:
    """The data a tower is verified on: a random kind becomes the tower's own (random_tokens for
    the text tower, random_pixels for the image tower); data the tower cannot read (an image
    folder for the text tower) becomes its builtin data."""
    if data in ("random_tokens", "random_pixels"):
        return fam.random_data
    try:
        fam.check_data(data)
    except RecipeError:
        return "builtin"
    return data


def verify_dual(ck: Checkpoint, dual: DualEncoder, child: Path, *, data: str, samples: int, seq_len: int | None,
                batch_size: int, device: str, tokenizer=None, gate: dict | None = None) -> dict:
    """`shrinkit verify` on a dual encoder: each tower of the child against the parent's, on the
    tower's own data, joined as subclone joins them."""
    from .errors import UsageError
    from .families import family_for
    from .families.dual import dual_for
    from .pair import check_pair
    from .verify import heldout_spec, verify_child

    with open_checkpoint(child) as cc:   # the caller (api.verify) refused a folder without config.json
        if dual_for(cc.config) is not dual:
            raise UsageError(f"child {child} is a {cc.config.get('model_type')} model, the parent a {dual.name}; "
                             "verify a child against the parent it was cut from")
        parents, children = dual.views(ck), dual.views(cc)
        out = {}
        for t in dual.towers:
            with _tower(t.name):
                pv, cv = parents[t.name], children[t.name]
                check_pair(pv, child, cv)
                fam = family_for(pv.config)
                spec = heldout_spec(fam, pv.config, tower_data(fam, data), samples, seq_len, batch_size,
                                    f"the {t.name} tower's")
                out[t.name] = verify_child(pv, cv, spec, device=device, tokenizer=tokenizer, gate=gate)
    return _joined_verify(out)


def inspect_dual(ck: Checkpoint, dual: DualEncoder, one) -> dict:
    """`inspect` of a dual encoder: the whole checkpoint, and each tower as `one(view)` describes it."""
    towers = {}
    for name, view in dual.views(ck).items():
        with _tower(name):
            s = one(view)
        towers[name] = {"family": s["model"]["family"], "params": s["model"]["params"], "dims": s["dims"]}
    shared = sum(ck.tensors[k].numel for k in dual.shared if k in ck.tensors)
    return {
        "model": {"path": str(ck.weights_path), "family": dual.name,
                  "architecture": (ck.config.get("architectures") or ["?"])[0], "model_type": ck.config.get("model_type"),
                  "params": sum(x["params"] for x in towers.values()) + shared, "bytes": ck.total_bytes,
                  "tensors": len(ck.tensors), "shards": len(ck.shards)},
        "towers": towers,
        "dtypes": dict(ck.dtype_counts()),
    }


def plan_dual(ck: Checkpoint, dual: DualEncoder, recipe: Recipe, one, tokenizer=None, source: dict | None = None) -> dict:
    """`plan` of a dual encoder: every tower planned and checked as subclone would (its data and
    preflight included), and each described by `one(view, plan, recipe)`."""
    views, recipes, plans = prepare_towers(ck, dual, recipe, verify=True, tokenizer=tokenizer, transformers_check=True)
    towers = {}
    for n, v in views.items():
        with _tower(n):
            towers[n] = one(v, plans[n], recipes[n])
    shared = [ck.tensors[k] for k in dual.shared if k in ck.tensors]
    dtype = next(iter(towers.values()))["child"]["dtype"]
    return {
        "parent": {"family": dual.name, "bytes": ck.total_bytes, **(source or {})},
        "child": {"params": sum(x["child"]["params"] for x in towers.values()) + sum(s.numel for s in shared),
                  "bytes": sum(x["child"]["bytes"] for x in towers.values())
                  + sum(s.numel for s in shared) * next(iter(plans.values())).out_dtype.itemsize,
                  "dtype": dtype},
        "towers": towers,
    }
