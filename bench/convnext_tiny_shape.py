#!/usr/bin/env python3
"""recipes/convnext-tiny-to-femto.yaml at full size: time and peak memory of one subclone.

No pretrained ConvNeXt can be had offline (see BENCHMARKS.md), so the parent here has
ConvNeXt-T's shape (transformers' ConvNextConfig defaults: widths 96, 192, 384, 768, depths
3, 3, 9, 3, 1000 classes, 28.6M parameters) and transformers' own random init (seed 0), with
convnext-tiny-224's preprocessing (224 x 224 crops). It measures what the recipe costs on that shape
(64 built-in calibration images for ranking and for per-stage Block Influence, the 20 held-out
images for verification); its verification numbers compare random weights with random weights
and say nothing about quality.

Usage (from the repository root; take the lock, record the load):
  flock /work/bench.lock .venv/bin/python bench/convnext_tiny_shape.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parent(path: Path, v2: bool) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = (transformers.ConvNextV2Config if v2 else transformers.ConvNextConfig)(num_labels=1000)
    cls = transformers.ConvNextV2ForImageClassification if v2 else transformers.ConvNextForImageClassification
    cls(cfg).save_pretrained(path)
    # convnext-tiny-224's preprocessing: shortest edge 256, center crop 224 (crop_pct 0.875)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=224 / 256).save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--v2", action="store_true", help="a ConvNeXt V2 parent of the same shape")
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="shrinkit-convnext-t-") as td:
        tmp = Path(td)
        p = parent(tmp / "parent", a.v2)
        out = a.out or tmp / "child"
        load = os.getloadavg()
        t0 = time.perf_counter()
        r = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(tmp / "rss"), sys.executable, "-m", "shrinkit.cli",
                            "subclone", str(p), "-r", str(ROOT / "recipes" / "convnext-tiny-to-femto.yaml"),
                            "--out", str(out), "--force", "--quiet"], env=env, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(r.stderr[-2000:])
        rep = json.loads((out / "shrinkit_report.json").read_text())
        print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: "
              + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        print(f"parent params {rep['parent']['params']:,}, child params {rep['child']['params']:,}, "
              f"child dims {rep['child']['dims']}")
        print(f"subclone wall {dt:.1f} s, peak RSS {int((tmp / 'rss').read_text().split()[-1]) / 1024:.0f} MB")
        for s in rep["stages"]:
            print(f"  {s['stage']}: {s['seconds']} s")
        print(f"  verify: {rep['verify'].get('seconds')} s")
        print("\n".join(rep["verify"].get("table", [])))


if __name__ == "__main__":
    main()
