"""Human-readable renderings of the report: shrinkit_report.md and the child's model card."""

from __future__ import annotations

import math


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
    lines += ["", "## Stages", "", "| stage | how | seconds |", "|---|---|---:|"]
    for s in report["stages"]:
        how = s.get("method") or s.get("strategy") or (f"x{s['factor']:.4f}" if "factor" in s else "")
        lines.append(f"| {s['stage']} | {how} | {s['seconds']:.3f} |")
    lines += ["", f"Kept parent layers: {report['kept']['layers']}", ""]
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


def model_card(report: dict) -> str:
    base = report["base_model"]
    lines = ["---", f"base_model: {base}", "library_name: transformers", "tags:", "- shrinkit", "- student-init",
             "---", "", f"# Student initialization of {base}", "",
             f"This model was cut out of **{base}** by shrinkit {report['shrinkit_version']} "
             f"(recipe `{report['recipe'].get('name')}`): the kept neurons, heads and layers carry the "
             "parent's pretrained weights. It is an initialization for training (distillation or "
             "pre-training), not a finished model.", ""]
    lines += shape_table(report)
    lines += ["", "See `shrinkit_report.json` for the kept index sets, per-stage timings and the parent's shard hashes.", ""]
    return "\n".join(lines)
