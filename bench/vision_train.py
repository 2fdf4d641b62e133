#!/usr/bin/env python3
"""Do shrinkit's vision children train faster than random init? Fine-tuning on real labeled images.

Not a test: a benchmark that writes results.json, results.md and curves.png.

Task: Fashion-MNIST (Zalando, 10 classes of 28 x 28 grayscale clothing photos, MIT) from Debian's
`dataset-fashion-mnist` package (`apt-get install dataset-fashion-mnist`: the idx files under
/usr/share/datasets/fashion-mnist/) by default, or any folder `DIR/<class>/*.png` (`--data DIR`;
every image file suffix PIL reads). Training images come from the train split (Fashion-MNIST's
60k; for a folder a seeded 80 %), the fixed held-out test set from the test split (Fashion-MNIST's
10k; for a folder the other 20 %), each a seeded class-balanced subset of `--train` / `--test`
images. Every image is resized and normalized by the parent's own image processor
(preprocessor_config.json through transformers' AutoImageProcessor, `--size` pixels square
instead of the parent's crop: small images keep a CPU run short; position embeddings are
interpolated by the model).

Parent: `--parent DIR` (default: the DINOv2-small backbone of `python bench/assets.py dinov2`).
Child shape: `--target` (JSON of canonical dims; default ViT-T width at half depth: hidden 192, 3
heads, FFN 768, 6 layers). Arms, all of that exact shape, written by the shrinkit CLI
(`python -m shrinkit.cli subclone PARENT --recipe R --out DIR --force --quiet`, which verifies
each child on the built-in held-out images) except random:

  shrinkit-first    rank_neurons activation (calibration: 64 built-in images), drop_layers first
                    (the first N layers), rescale_norms: recipes/dinov2-small-to-vit-tiny-6l.yaml
  shrinkit          the same with drop_layers importance (Block Influence on the same images)
  shrinkit-heal     the same plus heal (refit of each kept block's output projections), where the
                    parent's family has a heal description
  weight-selection  Xu et al. 2023: rank_neurons uniform (evenly spaced indices), drop_layers
                    first (the first N layers), no rescale
  magnitude         rank_neurons magnitude, drop_layers middle, rescale_norms
  random            transformers' default init of the child's config (from_config, seed 0)

`--arm NAME=SPEC` adds (or redefines) an arm; SPEC is comma-separated key:value pairs:
rank:activation|magnitude|uniform|first|random, drop:importance|middle|first|last,
rescale:0|1|<factor>, heal:0|1, calib:builtin|task|DIR (task: --calib-samples training images of
the task, written as PNGs at their own size), samples:N (calibration images).

Training: the child plus a linear head (zero-initialized) on the pooled output (`--pool`: `cls`
the first token after the final norm, `mean` the mean of the patch tokens after the final norm,
`pooler` the model's own pooler_output: CLS for ViT/DINOv2, the pooled feature map for
convolutional families), the same seeded batch order for every arm; AdamW (betas 0.9/0.999,
weight decay 0.05 on matrices), linear warmup over 10 % of the steps then cosine to 0, grad-norm
clip 1.0, fp32. The head's peak LR is 1e-3 in every run; the backbone's peak LR is each arm's
best of `--lrs` (chosen by final test accuracy; the selection uses the test split, the same way
for every arm). Test accuracy and loss on the fixed held-out set at step 0 and every
`--eval-every` steps. Also at init: a linear probe (logistic regression, full batch, on frozen
pooled features of the training images; test accuracy) per arm.

Reported: per-arm table (best LR, probe at init, test accuracy and loss at the end, steps to
random's final accuracy and the speed-up), the grid, the accuracy by step, curves.png, the
1-minute load average at the start and end of every run.

Modes:
  --quick   (default) sized for a 2-core CPU: 56 px images (4 x 4 patches), 5000 training and 500
            test images, batch 32, 200 steps, LRs 3e-4 and 1e-3 (a 200-step run took 51-112 s at load
            4-9 with OMP_NUM_THREADS=1; the whole mode was not timed end to end, BENCHMARKS.md 14)
  --full    a GPU: 112 px, 20000 / 5000 images, batch 128, 2000 steps, LRs 1e-4, 3e-4, 1e-3
  --steps, --size, --train, --test, --batch, --lrs, --eval-every override the mode.

Usage (from the repository root):
  .venv/bin/python bench/vision_train.py [--quick|--full] [--out DIR] [--arms shrinkit,random]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import json
import math
import os
import platform
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
from vision_quality import linear_probe  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
DEFAULT_TARGET = {"hidden_size": 192, "num_attention_heads": 3, "intermediate_size": 768, "num_hidden_layers": 6}
DEFAULT_ARMS = ("shrinkit-first", "shrinkit", "shrinkit-heal", "weight-selection", "magnitude", "random")
ARM_SPECS = {
    "shrinkit-first": "rank:activation,drop:first,rescale:1,heal:0,calib:builtin",
    "shrinkit": "rank:activation,drop:importance,rescale:1,heal:0,calib:builtin",
    "shrinkit-heal": "rank:activation,drop:importance,rescale:1,heal:1,calib:builtin",
    "weight-selection": "rank:uniform,drop:first,rescale:0,heal:0",
    "magnitude": "rank:magnitude,drop:middle,rescale:1,heal:0",
}
MODES = {
    "quick": {"size": 56, "train": 5000, "test": 500, "batch": 32, "steps": 200, "lrs": "3e-4,1e-3", "eval_every": 20},
    "full": {"size": 112, "train": 20000, "test": 5000, "batch": 128, "steps": 2000, "lrs": "1e-4,3e-4,1e-3",
             "eval_every": 100},
}
HEAD_LR = 1e-3
WEIGHT_DECAY = 0.05
WARMUP = 0.1
COLORS = {"shrinkit-first": "tab:green", "shrinkit": "tab:red", "shrinkit-heal": "tab:purple", "weight-selection": "tab:blue",
          "magnitude": "tab:orange", "random": "tab:gray"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


# ----------------------------------------------------------------------------- data
def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    nd = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * nd).reshape(shape)


def _balanced(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices, classes as balanced as the labels allow, in a seeded order."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    out, k = [], 0
    while len(out) < n and any(k < len(v) for v in per.values()):
        out += [int(per[c][k]) for c in classes if k < len(per[c])]
        k += 1
    return rng.permutation(np.array(out[:n]))


def load_task(data: str | None, n_train: int, n_test: int, seed: int = 0):
    """(train images, train labels, test images, test labels, class names); images are PIL RGB."""
    from PIL import Image

    if data is None:
        if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
            raise SystemExit(f"Fashion-MNIST not found under {FASHION}: apt-get install dataset-fashion-mnist, "
                             "or pass --data DIR (DIR/<class>/*.png)")
        xtr, ytr = _idx(FASHION / "train-images-idx3-ubyte.gz"), _idx(FASHION / "train-labels-idx1-ubyte.gz")
        xte, yte = _idx(FASHION / "t10k-images-idx3-ubyte.gz"), _idx(FASHION / "t10k-labels-idx1-ubyte.gz")
        itr, ite = _balanced(ytr, n_train, seed), _balanced(yte, n_test, seed + 1)
        to = lambda a: Image.fromarray(a, mode="L").convert("RGB")  # noqa: E731
        return ([to(xtr[i]) for i in itr], ytr[itr].astype(np.int64), [to(xte[i]) for i in ite],
                yte[ite].astype(np.int64), list(FASHION_CLASSES))
    root = Path(data)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise SystemExit(f"--data {root}: expected DIR/<class>/*.png with at least two class folders")
    files, labels = [], []
    for c, name in enumerate(classes):
        fs = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp",
                                                                              ".webp", ".gif"))
        files += fs
        labels += [c] * len(fs)
    labels = np.array(labels)
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(files), dtype=bool)
    for c in range(len(classes)):  # 20 % of every class is the test split
        ix = rng.permutation(np.flatnonzero(labels == c))
        test_mask[ix[:max(1, len(ix) // 5)]] = True
    tr, te = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    itr = tr[_balanced(labels[tr], min(n_train, len(tr)), seed)]
    ite = te[_balanced(labels[te], min(n_test, len(te)), seed + 1)]
    op = lambda i: Image.open(files[i]).convert("RGB")  # noqa: E731
    return [op(i) for i in itr], labels[itr], [op(i) for i in ite], labels[ite], classes


def preprocess(parent: Path, images: list, size: int) -> torch.Tensor:
    """[N, 3, size, size] float16 pixel values through the parent's own image processor, resized
    to `size` (shortest edge, then a `size` square crop where the processor crops)."""
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(parent))
    kw = {}
    if "shortest_edge" in (getattr(proc, "size", None) or {}):
        kw["size"] = {"shortest_edge": size}
    else:
        kw["size"] = {"height": size, "width": size}
    if getattr(proc, "do_center_crop", False):
        kw["crop_size"] = {"height": size, "width": size}
    if "crop_pct" in (getattr(proc, "__dict__", {}) or {}):   # ConvNeXt-style: no crop below 384 px
        kw["crop_pct"] = 1.0
    out = []
    for s in range(0, len(images), 256):
        px = proc(images=images[s:s + 256], return_tensors="pt", **kw)["pixel_values"]
        out.append(px.to(torch.float16))
    x = torch.cat(out)
    if x.shape[-2:] != (size, size):
        raise SystemExit(f"the parent's processor made {tuple(x.shape[-2:])} images, not {size} x {size}")
    return x


# ----------------------------------------------------------------------------- arms
def parse_spec(spec: str) -> dict:
    out = {"rank": "activation", "drop": "importance", "rescale": "1", "heal": "0", "calib": "builtin",
           "samples": "64"}
    for part in filter(None, spec.split(",")):
        k, _, v = part.partition(":")
        if k not in out:
            raise SystemExit(f"arm spec {spec!r}: unknown key {k!r} (known: {', '.join(out)})")
        out[k] = v
    return out


def recipe(spec: dict, target: dict, calib_task: Path | None) -> dict:
    calib_data = {"builtin": "builtin", "task": str(calib_task) if calib_task else None}.get(spec["calib"],
                                                                                             spec["calib"])
    calib = {"data": calib_data, "samples": int(spec["samples"])}
    data_free = spec["rank"] in ("magnitude", "uniform", "first", "random")
    st: list = [{"rank_neurons": {"method": spec["rank"]} if data_free else
                 {"method": spec["rank"], "calibration": calib}}]
    if target.get("num_hidden_layers") is not None or target.get("depths") is not None:   # flat or staged depth
        st.append({"drop_layers": {"strategy": spec["drop"], "calibration": calib} if spec["drop"] == "importance"
                   else {"strategy": spec["drop"]}})
    if spec["heal"] not in ("0", "", "no"):
        st.append({"heal": {"calibration": calib}})
    st.append({"slice_embeddings": {}})
    if spec["rescale"] not in ("0", "", "no"):
        st.append({"rescale_norms": {} if spec["rescale"] == "1" else {"factor": float(spec["rescale"])}})
    return {"target": dict(target), "stages": st, "output": {"dtype": "float32"},
            "verify": {"data": "builtin", "samples": 20}, "seed": 0}


def subclone(parent: Path, rec: dict, name: str, work: Path) -> tuple[Path | None, float, dict | str]:
    import yaml

    (work / "recipes").mkdir(parents=True, exist_ok=True)
    rp = work / "recipes" / f"{name}.yaml"
    rp.write_text(yaml.safe_dump(rec, sort_keys=False))
    out = work / "children" / name
    cmd = [sys.executable, "-m", "shrinkit.cli", "subclone", str(parent), "--recipe", str(rp), "--out", str(out),
           "--force", "--quiet", "--skip-if-current"]   # a child already there from the same recipe is reused
    rp_out = out / "shrinkit_report.json"
    before = rp_out.stat().st_mtime_ns if rp_out.exists() else None
    t = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t
    if p.returncode not in (0, 4):
        return None, secs, f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}"
    rep = json.loads(rp_out.read_text())
    if before is not None and rp_out.stat().st_mtime_ns == before:
        rep["reused"] = True
    return out, secs, rep


def load_model(child: Path | None, random_from: Path, seed: int = 0):
    import transformers

    if child is not None:
        return transformers.AutoModel.from_pretrained(child, dtype=torch.float32)
    cfg = transformers.AutoConfig.from_pretrained(random_from)
    torch.manual_seed(seed)
    return transformers.AutoModel.from_config(cfg, dtype=torch.float32)


# ----------------------------------------------------------------------------- training
def width(model) -> int:
    c = model.config
    return int(getattr(c, "hidden_size", None) or c.hidden_sizes[-1])


def pooled(model, x: torch.Tensor, pool: str) -> torch.Tensor:
    out = model(pixel_values=x)
    if pool == "pooler" or out.last_hidden_state.dim() != 3:
        p = out.pooler_output
        return p.flatten(1)
    h = out.last_hidden_state
    if pool == "cls":
        return h[:, 0]
    extra = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    return h[:, extra:].mean(1)


def evaluate(model, head, x, y, pool: str, bs: int = 250) -> tuple[float, float]:
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for s in range(0, len(x), bs):
            logits = head(pooled(model, x[s:s + bs].float(), pool))
            loss += float(F.cross_entropy(logits, y[s:s + bs], reduction="sum"))
            correct += int((logits.argmax(-1) == y[s:s + bs]).sum())
    model.train()
    return correct / len(x), loss / len(x)


def probe(model, xtr, ytr, xte, yte, pool: str, n_classes: int, epochs: int = 200) -> float:
    """Linear probe on frozen pooled features: logistic regression, full batch, standardized."""
    model.eval()
    with torch.no_grad():
        ftr = torch.cat([pooled(model, xtr[s:s + 250].float(), pool) for s in range(0, len(xtr), 250)])
        fte = torch.cat([pooled(model, xte[s:s + 250].float(), pool) for s in range(0, len(xte), 250)])
    return linear_probe(ftr, ytr, fte, yte, epochs=epochs, n_classes=n_classes)


def lr_mult(step: int, steps: int) -> float:
    warm = max(1, int(steps * WARMUP))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train(model, n_classes, xtr, ytr, xte, yte, *, lr: float, steps: int, batch: int, eval_every: int, pool: str,
          device: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model.to(device)
    head = torch.nn.Linear(width(model), n_classes).to(device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "lr": lr, "weight_decay": WEIGHT_DECAY},
                             {"params": rest, "lr": lr, "weight_decay": 0.0},
                             {"params": list(head.parameters()), "lr": HEAD_LR, "weight_decay": 0.0}])
    base = [g["lr"] for g in opt.param_groups]
    g = torch.Generator().manual_seed(seed + 1)
    order = torch.cat([torch.randperm(len(xtr), generator=g) for _ in range(steps * batch // len(xtr) + 1)])
    xte_d, yte_d = xte.to(device), yte.to(device)
    acc, loss = evaluate(model, head, xte_d, yte_d, pool)
    curve = {"step": [0], "acc": [acc], "loss": [loss], "train_loss": [None]}
    model.train()
    losses = []
    t0 = time.perf_counter()
    params = list(model.parameters()) + list(head.parameters())
    for step in range(steps):
        m = lr_mult(step, steps)
        for grp, b in zip(opt.param_groups, base):
            grp["lr"] = b * m
        idx = order[step * batch:(step + 1) * batch]
        xb, yb = xtr[idx].to(device).float(), ytr[idx].to(device)
        loss = F.cross_entropy(head(pooled(model, xb, pool)), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lv = float(loss.detach())
        losses.append(lv)
        if not math.isfinite(lv):
            curve["diverged_at"] = step + 1
            break
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            acc, tl = evaluate(model, head, xte_d, yte_d, pool)
            curve["step"].append(step + 1)
            curve["acc"].append(acc)
            curve["loss"].append(tl)
            curve["train_loss"].append(sum(losses[-eval_every:]) / len(losses[-eval_every:]))
            log(f"  step {step + 1}: test acc {acc:.3f}, loss {tl:.3f} ({time.perf_counter() - t0:.0f} s, load {load1()})")
    curve["seconds"] = round(time.perf_counter() - t0, 1)
    curve["final_acc"] = curve["acc"][-1] if "diverged_at" not in curve else 0.0
    return curve


def steps_to(curve: dict, target: float) -> int | None:
    for s, a in zip(curve["step"], curve["acc"]):
        if a >= target:
            return s
    return None


# ----------------------------------------------------------------------------- report
def machine(device: str) -> dict:
    m = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
         "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
         "device": device}
    try:
        import transformers
        m["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        m["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()
    except OSError:  # pragma: no cover
        pass
    if device == "cuda":
        m["gpu"] = torch.cuda.get_device_name(0)
    return m


def fmt_lr(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


def markdown(R: dict) -> str:
    c, m = R["config"], R["machine"]
    L = [f"# shrinkit vision fine-tune benchmark ({R['mode']})", "",
         f"- command: `{R['command']}`",
         f"- date: {R['date']}; commit {m.get('commit', '?')}; wall time {R['wall_s'] / 60:.1f} min",
         f"- machine: {m['cores']} CPU(s) ({m['cpu']}), torch {m['torch']} ({m['torch_threads']} threads), "
         f"transformers {m.get('transformers', '?')}, device {m['device']}" + (f" ({m['gpu']})" if m.get("gpu") else ""),
         "- load average (1 min) at the start and end of each run: "
         + "; ".join(f"{x['what']} {x['load_start']:.1f}-{x['load_end']:.1f}" for x in R["load_average"]),
         f"- task: {R['task']['name']}, {len(R['task']['classes'])} classes, {c['train']} training / {c['test']} "
         f"test images (fixed held-out split), {c['size']} x {c['size']} px through the parent's image processor; "
         f"chance {1 / len(R['task']['classes']):.3f}",
         f"- child: {json.dumps(R['target'])}, {R['params'] / 1e6:.2f}M params; parent {R['parent']}",
         f"- training: {c['steps']} steps x batch {c['batch']} ({c['steps'] * c['batch'] / c['train']:.1f} epochs), "
         f"AdamW wd {WEIGHT_DECAY}, warmup {WARMUP:.0%} then cosine, head LR {fmt_lr(HEAD_LR)}, backbone LR best of "
         f"{[fmt_lr(x) for x in c['lrs']]} by final test accuracy; pooled output: `{c['pool']}`; "
         f"evaluation every {c['eval_every']} steps", ""]
    target = R.get("random_final_acc")
    L.append("| arm | recipe | subclone s | kept layers | verify: CLS sim. Spearman (child / random) | "
             "probe acc at init | best LR | test acc final | test loss final | steps to random's final acc"
             + (f" ({target:.3f})" if target is not None else "") + " | speed-up |")
    L.append("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, a in R["arms"].items():
        if "error" in a:
            L.append(f"| {name} | {a.get('spec', '-')} | - | - | - | - | - | - | - | {a['error']} | - |")
            continue
        best = a.get("best_lr")
        cur = a["runs"][best] if best else None
        v = (a.get("verify") or {})
        vs = (f"{v['child']['similarity_spearman']:.3f} / {v['random_init']['similarity_spearman']:.3f}"
              if v.get("child", {}).get("similarity_spearman") is not None else "-")
        pr = f"{a['probe']:.3f}" if "probe" in a else "-"
        st = a.get("steps_to_random")
        st = "-" if target is None else st if st is not None else "not reached"
        sp = f"{a['speedup']:.1f}x" if a.get("speedup") else "-"
        L.append(f"| {name} | {a.get('spec', 'transformers init')} | {a.get('subclone_s', '-')} | "
                 f"{a.get('kept_layers') or '-'} | {vs} | {pr} | "
                 f"{fmt_lr(float(best)) if best else '-'} | {cur['final_acc']:.3f} | {cur['loss'][-1]:.3f} | "
                 f"{st} | {sp} |")
    L += ["", "Final test accuracy by backbone LR:", "",
          "| arm | " + " | ".join(fmt_lr(x) for x in c["lrs"]) + " |", "|---|" + "---:|" * len(c["lrs"])]
    for name, a in R["arms"].items():
        if "runs" in a:
            L.append(f"| {name} | " + " | ".join(f"{a['runs'][str(lr)]['final_acc']:.3f}"
                                                 if str(lr) in a["runs"] else "-" for lr in c["lrs"]) + " |")
    arms = [n for n, a in R["arms"].items() if "runs" in a]
    if arms:
        L += ["", "Test accuracy by step (each arm at its best LR):", "",
              "| step | " + " | ".join(arms) + " |", "|---:|" + "---:|" * len(arms)]
        curves = {n: R["arms"][n]["runs"][R["arms"][n]["best_lr"]] for n in arms}
        steps = max((cv["step"] for cv in curves.values()), key=len)
        for i, s in enumerate(steps):
            L.append(f"| {s} | " + " | ".join(f"{cv['acc'][i]:.3f}" if i < len(cv["acc"]) else "-"
                                              for cv in curves.values()) + " |")
    return "\n".join(L) + "\n"


def plot(R: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    extra = iter(("tab:green", "tab:olive", "tab:cyan", "tab:pink", "tab:brown", "k"))
    for name, a in R["arms"].items():
        if "runs" not in a:
            continue
        color = COLORS.get(name) or next(extra, "k")
        for lr, cur in a["runs"].items():
            best = lr == a["best_lr"]
            kw = dict(color=color, lw=2.2 if best else 0.8, alpha=1 if best else 0.35, marker="o" if best else None,
                      ms=3)
            axes[0].plot(cur["step"], cur["acc"], label=f"{name} (LR {fmt_lr(float(lr))})" if best else None, **kw)
            axes[1].plot(cur["step"], cur["loss"], **kw)
    if R.get("random_final_acc") is not None:
        axes[0].axhline(R["random_final_acc"], color="tab:gray", ls="--", lw=1, label="random's final accuracy")
    axes[0].set_ylabel("test accuracy")
    axes[1].set_ylabel("test loss")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    c = R["config"]
    fig.suptitle(f"{R['task']['name']} fine-tune, {R['params'] / 1e6:.1f}M child, {R['mode']}: {c['steps']} steps x "
                 f"{c['batch']}, {c['size']} px, pool {c['pool']} (thin lines: other LRs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="2-core CPU, well under 20 minutes (the default)")
    g.add_argument("--full", action="store_true", help="a GPU run")
    ap.add_argument("--out", type=Path, help="output folder (default $SHRINKIT_CACHE/bench/vision_train/<mode>/)")
    ap.add_argument("--parent", type=Path, help="the parent folder (default: bench/assets.py's DINOv2-small)")
    ap.add_argument("--target", type=json.loads, default=None, help="the child's dims as JSON")
    ap.add_argument("--data", help="DIR/<class>/*.png instead of Fashion-MNIST")
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS), help="comma-separated arm names")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=SPEC", help="add or redefine an arm")
    ap.add_argument("--pool", choices=("cls", "mean", "pooler"), default="cls")
    ap.add_argument("--calib-samples", type=int, default=256, help="task images written for `calib:task` arms")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="training seed: head init, batch order, random init (default 0)")
    ap.add_argument("--no-random", action="store_true", help="leave the random arm out (no speed-up column)")
    for k in ("size", "train", "test", "batch", "steps", "eval_every"):
        ap.add_argument("--" + k.replace("_", "-"), type=int)
    ap.add_argument("--lrs")
    args = ap.parse_args(argv)
    mode = "full" if args.full else "quick"
    cfg = dict(MODES[mode])
    for k in cfg:
        if getattr(args, k, None) is not None:
            cfg[k] = getattr(args, k)
    cfg["lrs"] = [float(x) for x in str(cfg["lrs"]).split(",")]
    cfg["pool"] = args.pool
    T0 = time.perf_counter()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    import transformers
    transformers.utils.logging.set_verbosity_error()
    out = (args.out or assets.cache_dir() / "bench" / "vision_train" / mode).resolve()
    out.mkdir(parents=True, exist_ok=True)
    parent = (args.parent or assets.dinov2()).resolve()
    target = args.target or dict(DEFAULT_TARGET)
    specs = dict(ARM_SPECS)
    for a in args.arm:
        name, _, spec = a.partition("=")
        specs[name] = spec
    arms = [a for a in args.arms.split(",") if a]
    for extra in args.arm:
        n = extra.partition("=")[0]
        if n not in arms:
            arms.append(n)
    if "random" not in arms and not args.no_random:
        arms.append("random")
    if args.no_random and "random" in arms:
        arms.remove("random")
    R = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "mode": mode,
         "machine": machine(args.device), "command": "python bench/vision_train.py "
         + " ".join(argv if argv is not None else sys.argv[1:]), "config": cfg, "target": target,
         "parent": str(parent), "load_average": [], "arms": {}}

    def phase(what: str, l0: float) -> None:
        R["load_average"].append({"what": what, "load_start": l0, "load_end": load1()})

    l0 = load1()
    trimgs, ytr, teimgs, yte, classes = load_task(args.data, cfg["train"], cfg["test"])
    calib_task = None
    if any(parse_spec(specs[a]).get("calib") == "task" for a in arms if a in specs):
        calib_task = out / "calib-task"
        calib_task.mkdir(exist_ok=True)
        for i, im in enumerate(trimgs[:args.calib_samples]):
            im.save(calib_task / f"{i:05d}.png")
    xtr, xte = preprocess(parent, trimgs, cfg["size"]), preprocess(parent, teimgs, cfg["size"])
    ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
    del trimgs, teimgs
    R["task"] = {"name": "Fashion-MNIST" if args.data is None else Path(args.data).name, "classes": classes}
    phase("data", l0)
    log(f"data: {len(xtr)} train / {len(xte)} test images of {cfg['size']} px, {len(classes)} classes")

    children: dict[str, Path | None] = {}
    for name in arms:
        if name == "random":
            continue
        if name not in specs:
            raise SystemExit(f"unknown arm {name!r}; known: {', '.join(specs)}, random (or --arm NAME=SPEC)")
        spec = parse_spec(specs[name])
        l0 = load1()
        child, secs, rep = subclone(parent, recipe(spec, target, calib_task), name, out)
        phase(f"subclone {name}", l0)
        a = R["arms"][name] = {"spec": specs[name], "subclone_s": round(secs, 1)}
        if isinstance(rep, dict) and rep.get("reused"):
            a["subclone_s"] = "reused"
        if child is None:
            a["error"] = f"subclone failed ({rep})"
            log(f"{name}: {a['error']}")
            continue
        children[name] = child
        a["kept_layers"] = (rep.get("kept") or {}).get("layers")
        a["verify"] = {k: rep.get("verify", {}).get(k) for k in ("child", "random_init")} if rep.get("verify") else None
        if rep.get("heal"):
            a["heal"] = rep["heal"].get("layers") if isinstance(rep["heal"], dict) else rep["heal"]
        log(f"{name}: subclone {secs:.1f} s, verify {a['verify'] and a['verify']['child']}")
    random_from = next(iter(children.values()), None)
    if random_from is None:
        raise SystemExit("no arm could be written, so the random arm has no config to copy; see the errors above")
    if "random" in arms:
        R["arms"]["random"] = {"spec": None, "verify": None}
    order = [a for a in arms if a != "random"] + (["random"] if "random" in arms else [])
    R["arms"] = {n: R["arms"][n] for n in order if n in R["arms"]}
    for name in order:
        a = R["arms"][name]
        if "error" in a:
            continue
        child = children.get(name)
        if not args.no_probe:
            l0 = load1()
            model = load_model(child, random_from, args.seed)
            R["params"] = sum(p.numel() for p in model.parameters())
            a["probe"] = probe(model, xtr[:2000], ytr[:2000], xte, yte, cfg["pool"], len(classes))
            phase(f"probe {name}", l0)
            log(f"{name}: probe at init {a['probe']:.3f}")
        a["runs"] = {}
        for lr in cfg["lrs"]:
            l0 = load1()
            model = load_model(child, random_from, args.seed)
            R["params"] = sum(p.numel() for p in model.parameters())
            cur = train(model, len(classes), xtr, ytr, xte, yte, lr=lr, steps=cfg["steps"], batch=cfg["batch"],
                        eval_every=cfg["eval_every"], pool=cfg["pool"], device=args.device, seed=args.seed)
            phase(f"train {name} LR {fmt_lr(lr)}", l0)
            a["runs"][str(lr)] = cur
            log(f"{name} LR {fmt_lr(lr)}: acc {cur['acc'][0]:.3f} -> {cur['final_acc']:.3f} "
                f"(loss {cur['loss'][-1]:.3f}) in {cur['seconds']:.0f} s, load {load1()}")
        a["best_lr"] = max(a["runs"], key=lambda k: a["runs"][k]["final_acc"])
    if "runs" in R["arms"].get("random", {}):
        rr = R["arms"]["random"]
        R["random_final_acc"] = target_acc = rr["runs"][rr["best_lr"]]["final_acc"]
        for name, a in R["arms"].items():
            if "runs" in a:
                a["steps_to_random"] = st = steps_to(a["runs"][a["best_lr"]], target_acc)
                a["speedup"] = round(cfg["steps"] / st, 2) if st else None
    R["wall_s"] = time.perf_counter() - T0
    (out / "results.json").write_text(json.dumps(R, indent=1) + "\n")
    md = markdown(R)
    (out / "results.md").write_text(md)
    try:
        plot(R, out / "curves.png")
    except ImportError:
        log("matplotlib is not installed (make bench-setup); no curves.png")
    print(md)
    log(f"done in {R['wall_s'] / 60:.1f} min; wrote {out}/results.json, results.md, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
