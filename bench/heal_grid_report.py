#!/usr/bin/env python3
"""One table and one plot from bench/quality.py runs split across processes (one arm, one LR
and one warmup per run, `--results-name`): every run's held-out perplexity curve, and per LR and
warmup the healed arms against the un-healed (activation) arm after the last step.

Usage: python bench/heal_grid_report.py RESULTS.json ... --out PREFIX   (writes PREFIX.md, PREFIX.png)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def fmt(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "inf" if p is not None else "-"
    return f"{p:,.1f}" if p < 1e5 else f"{p:.3g}"


def load(paths: list[Path]) -> list[dict]:
    runs = []
    for p in paths:
        R = json.loads(p.read_text())
        c = R["config"]
        warm = c.get("warmup_steps")
        warm = f"{warm} steps" if warm is not None else f"{c['warmup_frac']:.0%} ({max(1, round(c['warmup_frac'] * c['steps']))} steps)"
        for arm, a in R["lm"]["arms"].items():
            for lr, run in a["runs"].items():
                runs.append({"parent": c.get("parent", "smollm2"), "arm": arm, "lr": float(lr), "warmup": warm,
                             "curve": run["curve"], "s_per_step": run["s_per_step"], "file": p.name,
                             "loads": R.get("load_average", []), "date": R["date"], "command": R["command"]})
    return runs


def markdown(runs: list[dict]) -> str:
    L = []
    for parent in sorted({r["parent"] for r in runs}):
        rs = [r for r in runs if r["parent"] == parent]
        L.append(f"### {parent}\n")
        L.append("Held-out perplexity, shakespeare / pydoc, at each evaluation of every run:\n")
        rs.sort(key=lambda r: (r["warmup"], r["lr"], r["arm"]))
        steps = sorted({s for r in rs for s in r["curve"]["step"]})
        L.append("| step | " + " | ".join(f"{r['arm']} LR {r['lr']:g}, warmup {r['warmup']}" for r in rs) + " |")
        L.append("|---:|" + "---:|" * len(rs))
        for st in steps:
            cells = []
            for r in rs:
                c = r["curve"]
                i = c["step"].index(st) if st in c["step"] else None
                cells.append("-" if i is None else f"{fmt(c['shakespeare'][i])} / {fmt(c['pydoc'][i])}")
            L.append(f"| {st} | " + " | ".join(cells) + " |")
        L.append("\nAfter the last step, healed against un-healed (activation) at the same LR and warmup "
                 "(shakespeare; ratio < 1: the healed child is better):\n")
        L.append("| warmup | LR | un-healed | " + " | ".join(sorted({r["arm"] for r in rs} - {"activation"})) + " |")
        heals = sorted({r["arm"] for r in rs} - {"activation"})
        L.append("|---|---:|---:|" + "---:|" * len(heals))
        for warm in sorted({r["warmup"] for r in rs}):
            for lr in sorted({r["lr"] for r in rs}):
                base = next((r for r in rs if r["arm"] == "activation" and r["lr"] == lr and r["warmup"] == warm), None)
                b = base["curve"]["shakespeare"][-1] if base else None
                cells = []
                for h in heals:
                    r = next((r for r in rs if r["arm"] == h and r["lr"] == lr and r["warmup"] == warm), None)
                    if r is None:
                        cells.append("not run")
                        continue
                    v = r["curve"]["shakespeare"][-1]
                    cells.append(f"{fmt(v)}" + (f" ({v / b:.2f}x)" if b else ""))
                if all(c == "not run" for c in cells) and b is None:
                    continue
                L.append(f"| {warm} | {lr:g} | {fmt(b) if b else 'not run'} | " + " | ".join(cells) + " |")
        L.append("")
        loads = [f"{r['arm']} LR {r['lr']:g} warmup {r['warmup']}: " + ", ".join(
            f"{x['load_start']:.1f}-{x['load_end']:.1f}" for x in r["loads"] if x["what"].startswith("train"))
                 + f" ({r['s_per_step']:.1f} s/step)" for r in rs]
        L.append("Load average (1 min) at the start and end of each training run: " + "; ".join(loads) + "\n")
    return "\n".join(L) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parents = sorted({r["parent"] for r in runs})
    lrs = sorted({r["lr"] for r in runs})
    fig, axes = plt.subplots(len(parents), len(lrs), figsize=(5 * len(lrs), 4 * len(parents)), squeeze=False)
    colors = {"activation": "tab:red", "activation-heal": "tab:purple", "activation-heal-unbounded": "tab:brown"}
    for i, parent in enumerate(parents):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            for r in runs:
                if r["parent"] != parent or r["lr"] != lr:
                    continue
                ls = "-" if r["warmup"].startswith("0 ") else "--"
                ax.plot(r["curve"]["step"], [min(y, 1e6) for y in r["curve"]["shakespeare"]], ls, marker="o", ms=3,
                        color=colors.get(r["arm"], "k"), label=f"{r['arm']}, warmup {r['warmup']}")
            ax.set_yscale("log")
            ax.set_title(f"{parent}, LR {lr:g}")
            ax.set_xlabel("training step")
            ax.set_ylabel("shakespeare_heldout ppl")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    runs = load(args.results)
    md = markdown(runs)
    args.out.with_suffix(".md").write_text(md)
    try:
        plot(runs, args.out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed; no plot")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
