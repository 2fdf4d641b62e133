"""The report: shrinkit_report.json's contents (build_report, kept_report) and its human-readable
renderings, shrinkit_report.md and the child's model card."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .checkpoint.reader import Checkpoint
from .families.spaces import GLOBAL, LAYER, STAGE, Space
from .hashing import parent_hash, recipe_hash
from .plan import DTYPE_STR, Plan, count_params, parent_params
from .version import __version__


def strict_json(x):
    """`x` with every float that JSON cannot hold (NaN, infinity) replaced by None (null), so
    that json.dumps(..., allow_nan=False) never fails and every reader gets strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return x


def parent_dtype(ckpt: Checkpoint):
    import torch
    counts: dict = {}
    for t in ckpt.tensors.values():
        if t.dtype.is_floating_point:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
    return max(counts, key=counts.get) if counts else torch.float32


def build_report(ckpt: Checkpoint, plan: Plan, recipe, stages: list, hashes: dict, cts: list,
                 seconds: float, source: dict | None = None) -> dict:
    fam = plan.family
    tied = fam.tied(ckpt.config)

    kept = {"layers": list(plan.layers)}
    kept.update(kept_report(plan))
    return {
        "shrinkit_version": __version__,
        "family": fam.name,
        "architecture": (ckpt.config.get("architectures") or [None])[0],
        "base_model": source["repo_id"] if source else base_model_name(ckpt),
        "recipe": recipe.as_dict(),
        "recipe_hash": recipe_hash(recipe),
        "parent_hash": parent_hash(ckpt, hashes),
        "parent": {
            "path": str(ckpt.weights_path),
            **({"repo_id": source["repo_id"], "revision": source["revision"]} if source else {}),
            "dims": plan.parent.as_dict(),
            "params": parent_params(fam, ckpt),
            "bytes": ckpt.total_bytes,
            "dtype": DTYPE_STR.get(parent_dtype(ckpt), str(parent_dtype(ckpt))),
            "shards": [{"file": s, "sha256": hashes.get(Path(s).name)} for s in ckpt.shards],
        },
        "child": {
            "dims": plan.child.as_dict(),
            "params": count_params(cts),
            "bytes": sum(c.nbytes for c in cts),
            "dtype": DTYPE_STR[plan.out_dtype],
            "tied_embeddings": tied and not plan.untie,
            **({"untied_head_params": plan.parent.vocab_size * plan.child.hidden_size} if plan.untie else {}),
        },
        "kept": kept,
        **({"budget": plan.budget} if plan.budget else {}),
        "stages": stages,
        "seconds": round(seconds, 3),
    }


def kept_report(plan: Plan) -> dict:
    """Kept indices of every space of the family, in child numbering: a list (global space), or
    {child layer: list} or {"child layer.child expert": list}; "all" where nothing is cut."""
    out = {}
    for sp in plan.family.spaces():
        if not sp.cut:
            continue
        if sp.per == GLOBAL:
            k = plan.kept.get((sp, None))
            out[sp.name] = k.tolist() if k is not None else (
                "rotated" if sp is Space.HIDDEN and plan.rotation is not None else "all")
            continue
        if sp.per == STAGE:
            d = {str(s): plan.kept[(sp, s)].tolist() for s in range(len(plan.parent.depths or ())) if (sp, s) in plan.kept}
            out[sp.name] = d or "all"
            continue
        d = {}
        for ci, p in enumerate(plan.layers):
            if sp.per == LAYER:
                if (sp, p) in plan.kept:
                    d[str(ci)] = plan.kept[(sp, p)].tolist()
                continue
            experts = plan.kept_experts(p)
            for ce, e in enumerate(experts if experts is not None else range(plan.parent.num_experts or 0)):
                if (sp, (p, e)) in plan.kept:
                    d[f"{ci}.{ce}"] = plan.kept[(sp, (p, e))].tolist()
        if sp.per == LAYER and (sp, None) in plan.kept:   # tensors outside the blocks (a pooling head)
            d["outside"] = plan.kept[(sp, None)].tolist()
        out[sp.name] = d or "all"
    return out


def base_model_name(ckpt: Checkpoint) -> str:
    n = ckpt.config.get("_name_or_path")
    if isinstance(n, str) and n and not os.path.isabs(n) and n.count("/") == 1:
        return n
    return ckpt.root.resolve().name


def _fmt_params(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def shape_table(report: dict) -> list[str]:
    p, c = report["parent"], report["child"]
    rows = ["| | parent | child |", "|---|---:|---:|"]
    for k in p["dims"]:  # every dimension the family has (Dims.as_dict), in declaration order
        rows.append(f"| {k} | {p['dims'][k]} | {c['dims'].get(k, '')} |")
    rows.append(f"| parameters | {_fmt_params(p['params'])} | {_fmt_params(c['params'])} |")
    rows.append(f"| bytes | {_fmt_bytes(p['bytes'])} | {_fmt_bytes(c['bytes'])} |")
    rows.append(f"| dtype | {p['dtype']} | {c['dtype']} |")
    return rows


def report_markdown(report: dict) -> str:
    lines = [f"# shrinkit report: {report['base_model']} -> child", "",
             f"shrinkit {report['shrinkit_version']}, family `{report['family']}` ({report['architecture']}), "
             f"recipe `{report['recipe'].get('name')}`, {report['seconds']:.2f} s in all.", ""]
    lines += shape_table(report)
    lines += ["", "## Stages", ""] + stage_rows(report) + [""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    v = report.get("verify")
    if v:
        lines += ["## Verification", ""] + v.get("table", []) + [""]
        if v.get("child_keys"):
            ck = v["child_keys"]
            lines += [f"Loading the child into transformers' model class leaves {len(ck.get('missing', []))} parameters "
                      f"freshly initialized ({', '.join(ck.get('missing', [])[:6]) or 'none'}) and "
                      f"{len(ck.get('unused', []))} tensors unused ({', '.join(ck.get('unused', [])[:6]) or 'none'}).", ""]
    lines += ["## Parent shards", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| {s['file']} | `{s['sha256']}` |" for s in report["parent"]["shards"]]
    return "\n".join(lines) + "\n"


def card_head(report: dict, what: str = "This model", how: str = "", after: str = "") -> list[str]:
    """The model card's front matter and first paragraph (one-tower and dual-encoder children)."""
    base = report["base_model"]
    return ["---", f"base_model: {base}", "library_name: transformers", "tags:", "- shrinkit", "- student-init",
            "---", "", f"# Student initialization of {base}", "",
            f"{what} was cut out of **{base}** by shrinkit {report['shrinkit_version']} "
            f"(recipe `{report['recipe'].get('name')}`){how}: the kept neurons, heads and layers carry the "
            f"parent's pretrained weights{after}. It is an initialization for training (distillation or "
            "pre-training), not a finished model.", ""]


def stage_rows(report: dict) -> list[str]:
    """The stages table of a report (one model's, or one tower's) and the kept parent layers."""
    lines = ["| stage | how | seconds |", "|---|---|---:|"]
    for s in report["stages"]:
        how = s.get("method") or s.get("strategy") or (f"x{s['factor']:.4f}" if "factor" in s else "")
        lines.append(f"| {s['stage']} | {how} | {s['seconds']:.3f} |")
    return lines + ["", f"Kept parent layers: {report['kept']['layers']}"]


def model_card(report: dict) -> str:
    lines = card_head(report)
    lines += shape_table(report)
    lines += ["", "See `shrinkit_report.json` for the kept index sets, per-stage timings and the parent's shard hashes.", ""]
    return "\n".join(lines)
