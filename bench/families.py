"""Per-family benchmark rows for BENCHMARKS.md: planted-test error, subclone time, peak memory.

For each family case registered in tests/planted.py (BENCH_CASES; a new family adds its case
there), this
  1. builds the planted parent and cuts it with `magnitude` and `activation` ranking under the
     case's target, reporting the larger relative error of the child's outputs against the
     parent's (float32; the planted tests require < 1e-4);
  2. builds the tiny real parent and runs `shrinkit subclone --no-verify` on it as a separate
     process per ranking method, `--repeat` times, reporting the median wall time (Python
     start-up included) and the peak RSS of that process (GNU time's maximum resident set; on
     configs this small it is mostly the interpreter, torch and, for activation ranking,
     transformers).

Usage (take the lock so timings are not shared with other benchmarks; record the load):
  flock /work/bench.lock .venv/bin/python bench/families.py roberta distilbert [--repeat 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

CALIB = {"data": "random_tokens", "samples": 16, "seq_len": 64, "batch_size": 8}
PIXEL_CALIB = {"data": "random_pixels", "samples": 16, "batch_size": 8}


def stages(method: str, drop: dict | None, calib: dict | None = None) -> list:
    """rank_neurons by `method`, then drop_layers `drop` (e.g. {"drop": [1]}) if given."""
    rank = {"method": method}
    if method == "activation":
        rank["calibration"] = calib or CALIB
    # rescale_norms: exact for RMSNorm families whose targets cut hidden dims; a no-op otherwise
    return ([{"rank_neurons": rank}] + ([{"drop_layers": drop}] if drop else []) + [{"slice_embeddings": {}}]
            + [{"rescale_norms": {}}])


def dual_error(case, tmp: Path) -> float:
    """A dual encoder: both towers cut to their planted dead parts; the text embeddings, image
    embeddings and logits against the parent's (the largest relative error of the three)."""
    import planted
    import test_dual as D
    from helpers import recipe
    from shrinkit.pipeline import subclone

    kind = {"CLIPModel": "clip", "SiglipModel": "siglip"}[case.output_class]
    p, _ = case.planted(tmp / "planted")
    ref = D.outputs(p, kind)
    worst = 0.0
    for method in ("magnitude", "activation"):
        subclone(p, recipe(towers=D.exact_towers(method)), tmp / f"planted-{method}")
        got = D.outputs(tmp / f"planted-{method}", kind)
        worst = max([worst] + [planted.rel_err(g, r) for g, r in zip(got, ref)])
    return worst


def dual_recipe(case, method: str) -> dict:
    """`towers:` with each tower's real target, `method` ranking (tokens for the text tower,
    pixels for the image tower) and middle layers dropped."""
    calib = {"text": CALIB, "vision": PIXEL_CALIB}
    return {"name": method, "towers": {n: {"target": t, "stages": stages(method, {"strategy": "middle"}, calib[n])}
                                       for n, t in case.real_target.items()}}


def planted_error(case, tmp: Path) -> float:
    import torch

    import planted

    if case.inputs == "dual":
        return dual_error(case, tmp)
    from helpers import logits, run, tokens

    pixels = case.inputs == "pixels"
    pl = case.planted(tmp / "planted")
    pixels = getattr(case, "inputs", "tokens") == "pixels"
    ids = planted.pixels() if pixels else tokens(96)
    out = (lambda path: image_outputs(path, ids, case.output_class)) if pixels else \
        (lambda path: logits(path, ids, case.output_class))
    ref = out(pl.path)
    worst = 0.0
    for method in ("magnitude", "activation"):
        calib = {**CALIB, "data": "random_pixels"} if pixels else CALIB
        run(pl.path, tmp / f"planted-{method}", target=case.target,
            stages=stages(method, {"drop": list(case.drop)} if case.drop else None, calib))
        worst = max(worst, planted.rel_err(out(tmp / f"planted-{method}"), ref))
    return worst


def image_outputs(path, pixels, cls: str):
    """An image model's main output (projected embeddings, logits, the pooled output or hidden
    states), float32."""
    import torch

    from helpers import load
    with torch.no_grad():
        o = load(path, cls)(pixel_values=pixels)
    for k in ("image_embeds", "logits", "pooler_output", "last_hidden_state"):
        if getattr(o, k, None) is not None:
            return getattr(o, k)


def timed(cmd: list[str], tmp: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one process. The peak comes from GNU time, which
    starts the process from its own small image: a child forked straight from this process
    would report this process's own peak (torch and transformers are loaded here)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    rss = tmp / "rss.txt"
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss), *cmd], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, env=env)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr.decode()[-2000:]}")
    return dt, int(rss.read_text().split()[-1]) * 1024


def bench(name: str, repeat: int) -> dict:
    import planted

    case = planted.BENCH_CASES[name]
    with tempfile.TemporaryDirectory(prefix=f"shrinkit-bench-{name}-") as td:
        tmp = Path(td)
        row = {"family": name, "planted_max_rel_err": planted_error(case, tmp)}
        parent = case.real(tmp / "real")
        row["parent_bytes"] = sum(f.stat().st_size for f in Path(parent).glob("*.safetensors"))
        for method in ("magnitude", "activation"):
            rec = tmp / f"{method}.yaml"
            calib = {**CALIB, "data": "random_pixels"} if getattr(case, "inputs", "tokens") == "pixels" else CALIB
            if case.inputs == "dual":
                rec.write_text(yaml.safe_dump(dual_recipe(case, method)))
            else:
                rec.write_text(yaml.safe_dump({"name": method, "target": case.real_target,
                                               "stages": stages(method, {"strategy": "middle"}
                                                                if case.real_target.get("num_hidden_layers")
                                                                or case.real_target.get("depths") else None,
                                                                calib)}))
            runs = [timed([sys.executable, "-m", "shrinkit.cli", "subclone", str(parent), "-r", str(rec), "--out",
                           str(tmp / f"out-{method}"), "--force", "--no-verify", "--quiet"], tmp) for _ in range(repeat)]
            row[f"{method}_seconds"] = round(statistics.median(t for t, _ in runs), 3)
            row[f"{method}_peak_rss_mb"] = round(max(m for _, m in runs) / 2**20, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("families", nargs="*", help="names in tests/planted.py BENCH_CASES (default: all)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    import planted

    names = a.families or list(planted.BENCH_CASES)
    load = os.getloadavg()
    rows = [bench(n, a.repeat) for n in names]
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("| family | planted max rel. err | subclone magnitude (s) | peak RSS (MB) | subclone activation (s) | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['family']} | {r['planted_max_rel_err']:.1e} | {r['magnitude_seconds']:.2f} | "
              f"{r['magnitude_peak_rss_mb']:.0f} | {r['activation_seconds']:.2f} | {r['activation_peak_rss_mb']:.0f} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
