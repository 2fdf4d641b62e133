#!/usr/bin/env python3
"""Quality of shrinkit's children against random init and weight selection: does a subcloned
student train faster than a random one of the same shape?

Not a test: a benchmark that writes results.json, results.md and curves.png.

Part 1, causal LM. SmolLM2-135M-Instruct (bench/assets.py) -> the child shape of
recipes/smollm2-40m.yaml (hidden 384, 15 layers, ffn 1024, 6 heads / 2 kv). Seven arms (--arms
picks a subset), all of that shape (the rotate arms with an untied head); all but random are
written by the shrinkit CLI
(`python -m shrinkit.cli subclone PARENT --recipe R --out DIR --force --quiet --no-verify`):

  activation        rank_neurons activation (calibration on the built-in text), drop_layers
                    middle, rescale_norms: shrinkit's default, the subcloning paper's recipe
  activation-heal   the same plus the heal stage (least-squares refit of every kept block's
                    attention and MLP output projections against the parent)
  rotate            activation ranking for FFN neurons and heads, drop_layers middle, and
                    rotate_hidden (top principal directions of the residual stream instead of a
                    subset of dims; the tied head is untied, so this arm has vocab x 384 more params)
  (rotate then heal is refused by the recipe validator: that child diverged in training trials)
  magnitude         the same with rank_neurons magnitude
  weight-selection  the weight-selection paper (Xu et al. 2023): rank_neurons uniform (evenly
                    spaced indices), drop_layers first (keep the first N layers), no rescale_norms
  random            transformers' default init of the child config (from_config, fixed seed)

Every arm trains on the same batches (the same seeded order of non-overlapping windows of
shakespeare_train, tokenized with the parent's tokenizer), for the same number of steps, with
the same optimizer (AdamW, betas 0.9/0.95, weight decay 0.1 on matrices only, grad-norm clip
1.0) and schedule (linear warmup over 5 % of the steps, then cosine to 10 % of the peak), fp32.
Each arm gets its best peak learning rate from a small grid, chosen by final held-out
perplexity on shakespeare_heldout (whole works never trained on). Held-out perplexity on a fixed
set of evenly spaced windows of shakespeare_heldout and pydoc_heldout (Python docs: text the
training never sees, so it measures what the parent's knowledge keeps) is measured at init
and every K steps. Reported: per-arm table, the grid, the steps each arm needs to first reach
the random arm's final shakespeare perplexity and the speed-up (random's steps / arm's
steps; crossing steps interpolated in log-perplexity between evaluations), the same against
the activation arm's final perplexity (how much sooner heal and rotation get there), and
curves.png.

Part 2, encoder, no training. all-MiniLM-L6-v2 cut to 3 layers (recipes/minilm-l3.yaml's
shape) and to 3 layers at hidden 256 (recipes/minilm-l3-h256.yaml's shape) by the same arms
(rotate_hidden refuses LayerNorm families, so no rotate arms here);
for ~200 held-out sentences (lines of 5-30 words from shakespeare_heldout and pydoc_heldout),
mask-aware mean-pooled embeddings, cosine similarity matrix, Spearman (and Pearson)
correlation of the upper triangle, child vs parent.

Modes:
  --smoke   a minute or two: tiny everything, one learning rate; checks the whole path works
  --quick   at most 15 minutes wall on 2 CPU cores, everything included: it measures seconds per
            training step and per evaluation first and sizes the number of steps to the budget
            left (windows of 64 tokens, batch 4, LRs 3e-4/1e-3/3e-3): a very short training run
  (default) full. On CPU: windows of 128, batch 8, LRs 3e-4/1e-3/3e-3, steps sized to
            --budget-min (default 60); still short training on 2 cores. With --device cuda: a fixed
            1000 steps x 8 x 256 tokens (about 1.5 epochs of shakespeare_train), TF32 matmuls; with
            --budget-min as well, the steps are sized to that budget instead
  --steps, --seq-len, --batch, --lrs, --evals, --eval-windows, --budget-min override the mode.
  --recipe R   the LM child's target from recipe R instead of recipes/smollm2-40m.yaml (explicit dims
               or a parameter budget such as `target: {params: 40M}`, solved by shrinkit per arm)
  --arms A,B   only these LM arms (random is always run: the speed-up is measured against it,
               unless --no-random; the activation arm is the reference of the heal and rotate arms,
               at each arm's best LR and at each LR of the grid)
  --drop-layers S   drop_layers strategy of the shrinkit arms (default: the --recipe's)
  --heal-alpha A    the activation-heal arm's heal alpha (default: the stage's)
  --heal-max-change M  the activation-heal arm's heal max_change (default: the stage's); the
                    activation-heal-unbounded arm heals with max_change: null (the fit before the bound)
  --warmup-steps N  linear warmup over N updates, 0 for none (default: 5 % of the steps)
  --parent gemma3   Gemma 3 270M instead of SmolLM2 (with --recipe bench/recipes/gemma3-270m-heal.yaml)
  --results-name S, --skip-parent-ppl   for grids split into one process per arm / LR / warmup
                    (bench/heal_grid_report.py joins them into one table and plot)
  --lock FILE       flock FILE for the subclones and for each training run separately
  --keep-children / --reuse-children   keep the children; reuse them (same --out, same recipe)

Usage (from the repository root; `make bench-setup` installs matplotlib):
  .venv/bin/python bench/quality.py --quick
  .venv/bin/python bench/quality.py --device cuda --out /tmp/quality-full
  .venv/bin/python bench/quality.py --quick --lrs 3e-4,1e-3,3e-3 --budget-min 25
Output: $SHRINKIT_CACHE/bench/quality/<mode>/ (default ~/.cache/shrinkit/...), or --out.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import assets  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

VENV_PY = ROOT / ".venv" / "bin" / "python"
PY = str(VENV_PY) if VENV_PY.exists() else sys.executable
ALL_ARMS = ("activation", "activation-heal", "activation-heal-unbounded", "rotate", "magnitude", "weight-selection",
            "random")
LM_ARMS = ALL_ARMS  # --arms picks a subset
ROTATED = ("rotate",)  # untied head: more parameters; refused for LayerNorm families (MiniLM)
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


LOCK: Path | None = None  # --lock: held for the subclones and for each training run, released between
LOADS: list = []  # (what, load average at start, at end) of every locked phase


class locked:
    """flock(LOCK) around one phase (nothing without --lock); the 1-minute load average at both ends."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        if LOCK is not None:
            import fcntl
            self.f = open(LOCK, "a")
            t = time.perf_counter()
            fcntl.flock(self.f, fcntl.LOCK_EX)
            if time.perf_counter() - t > 1:
                log(f"waited {time.perf_counter() - t:.0f} s for {LOCK}")
        self.load0 = os.getloadavg()[0]
        return self

    def __exit__(self, *exc):
        LOADS.append({"what": self.what, "load_start": round(self.load0, 2), "load_end": round(os.getloadavg()[0], 2)})
        if LOCK is not None:
            self.f.close()
        return False


# ----------------------------------------------------------------------------- settings
MODES = {
    # seq_len/batch: training windows; evals: evaluation points after init; eval_windows: per held-out text
    "smoke": dict(seq_len=64, batch=2, lrs=[1e-3], steps=6, evals=2, eval_windows=4, eval_batch=4,
                  calib_samples=8, calib_seq_len=64, minilm_calib_samples=8, sentences=40, budget_min=None),
    "quick": dict(seq_len=64, batch=4, lrs=[3e-4, 1e-3, 3e-3], steps=None, evals=8, eval_windows=16, eval_batch=8,
                  calib_samples=32, calib_seq_len=256, minilm_calib_samples=32, sentences=200, budget_min=15.0),
    # full on CPU: steps sized to a 60-minute budget; still short training, see the docstring
    "full": dict(seq_len=128, batch=8, lrs=[3e-4, 1e-3, 3e-3], steps=None, evals=10, eval_windows=32,
                 eval_batch=8, calib_samples=64, calib_seq_len=256, minilm_calib_samples=64, sentences=200,
                 budget_min=60.0),
    # full on a GPU: a fixed 1000 steps x 8 x 256 tokens (about 1.5 epochs of shakespeare_train)
    "full-gpu": dict(seq_len=256, batch=8, lrs=[3e-4, 1e-3, 3e-3], steps=1000, evals=20, eval_windows=64,
                     eval_batch=16, calib_samples=64, calib_seq_len=256, minilm_calib_samples=64, sentences=200,
                     budget_min=None),
}
WARMUP_FRAC, MIN_LR_FRAC, WEIGHT_DECAY, BETAS, CLIP = 0.05, 0.1, 0.1, (0.9, 0.95), 1.0
LOAD_S = 2.5  # loading (or initializing) a child, per run
SAFETY_S = 75.0  # quick/full budget: kept free for writing results and for timing noise (runs measured ~3 % over estimate)


def lm_recipes(target: dict, calib: dict, drop: str = "middle", heal_alpha: float | None = None,
               heal_max_change: float | None = None) -> dict[str, dict]:
    """The recipes of the subcloned arms; `drop` is the drop_layers strategy of every arm but
    weight-selection (which keeps the first layers, as its paper does)."""
    def rec(rank: dict, drop: str, rescale: bool, dtype="float32"):
        dl = {"strategy": drop, **({"calibration": calib} if drop == "importance" else {})}
        stages = [{"rank_neurons": rank}, {"drop_layers": dl}, {"slice_embeddings": {}}]
        if rescale:
            stages.append({"rescale_norms": {}})
        return {"target": dict(target), "stages": stages, "output": {"dtype": dtype}, "seed": 0}

    act = rec({"method": "activation", "calibration": calib}, drop, True)
    heal = {"heal": {"calibration": calib, **({"alpha": heal_alpha} if heal_alpha is not None else {}),
                     **({"max_change": heal_max_change} if heal_max_change is not None else {})}}
    free = {"heal": {**heal["heal"], "max_change": None}}  # the fit before max_change (unbounded)
    rot = {"rotate_hidden": {"calibration": calib}}
    recipes = {
        "activation": act,
        "activation-heal": {**act, "stages": act["stages"][:2] + [heal] + act["stages"][2:]},
        "activation-heal-unbounded": {**act, "stages": act["stages"][:2] + [free] + act["stages"][2:]},
        "rotate": {**act, "stages": act["stages"][:2] + [rot, {"slice_embeddings": {}}]},
        "magnitude": rec({"method": "magnitude"}, drop, True),
        "weight-selection": rec({"method": "uniform"}, "first", False),
    }
    return {k: v for k, v in recipes.items() if k in LM_ARMS}


def recipe_target(path: Path) -> dict:
    return dict(yaml.safe_load(path.read_text())["target"])


def recipe_drop(path: Path) -> str:
    """The recipe's drop_layers strategy (middle when it names none or lists layers)."""
    for st in yaml.safe_load(path.read_text()).get("stages") or []:
        if isinstance(st, dict) and "drop_layers" in st:
            return (st["drop_layers"] or {}).get("strategy") or "middle"
    return "middle"


# ----------------------------------------------------------------------------- subcloning
def subclone(parent: Path, recipe: dict, name: str, work: Path, device: str, reuse: bool = False) -> tuple[Path, float]:
    rpath = work / "recipes" / f"{name}.yaml"
    rpath.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(recipe, sort_keys=False)
    out = work / "children" / name
    if reuse and rpath.exists() and rpath.read_text() == text and (out / "shrinkit_report.json").exists():
        log(f"subclone {name}: reusing {out} (written by an earlier run from the same recipe)")
        return out, float(json.loads((out / "shrinkit_report.json").read_text()).get("seconds", float("nan")))
    rpath.write_text(text)
    cmd = [PY, "-m", "shrinkit.cli", "subclone", str(parent), "--recipe", str(rpath), "--out", str(out),
           "--force", "--quiet", "--no-verify"]
    if device != "cpu":
        cmd += ["--device", device]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"subclone {name} failed (exit {p.returncode}):\n$ {shlex.join(cmd)}\n{p.stderr}{p.stdout}")
    log(f"subclone {name}: {dt:.1f} s: {p.stdout.strip().splitlines()[-1]}")
    return out, dt


def kept_layers(child: Path) -> list[int] | None:
    try:
        return json.loads((child / "shrinkit_report.json").read_text())["kept"]["layers"]
    except (OSError, ValueError, KeyError):
        return None


# ----------------------------------------------------------------------------- stats
def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rho: Pearson r of average ranks (ties share the mean of their ranks)."""
    return pearson(avg_ranks(a), avg_ranks(b))


def avg_ranks(x: torch.Tensor) -> torch.Tensor:
    x = x.double().flatten()
    vals, order = torch.sort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(vals, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()  # 1-based rank of each group's last member
    mean_rank = ends - (counts.double() - 1) / 2
    r = torch.empty_like(x)
    r[order] = mean_rank[inverse]
    return r


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    d = a.norm() * b.norm()
    return float(a @ b / d) if d > 0 else float("nan")


# ----------------------------------------------------------------------------- part 2: MiniLM
def sentences(texts: dict, n: int) -> list[str]:
    out = []
    for key in ("shakespeare_heldout", "pydoc_heldout"):
        seen, lines = set(), []
        for line in Path(texts[key]).read_text(encoding="utf-8").splitlines():
            s = " ".join(line.split())
            if 5 <= len(s.split()) <= 30 and s not in seen:
                seen.add(s)
                lines.append(s)
        k = n // 2
        out += [lines[(i * len(lines)) // k] for i in range(k)]
    return out


def minilm_part(cfg: dict, work: Path, texts: dict, device: str) -> dict:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    parent = assets.minilm()
    sents = sentences(texts, cfg["sentences"])
    tok = AutoTokenizer.from_pretrained(str(parent))
    enc = tok(sents, padding=True, truncation=True, max_length=128, return_tensors="pt")

    def sims(model) -> torch.Tensor:
        model = model.to(device).eval()
        pooled = []
        with torch.no_grad():
            for s in range(0, len(sents), 50):
                ids, am = enc["input_ids"][s:s + 50].to(device), enc["attention_mask"][s:s + 50].to(device)
                h = model(input_ids=ids, attention_mask=am).last_hidden_state.float()
                m = am.unsqueeze(-1).float()
                pooled.append(((h * m).sum(1) / m.sum(1)).cpu())
        e = F.normalize(torch.cat(pooled).double(), dim=-1)
        iu = torch.triu_indices(len(e), len(e), 1)
        return (e @ e.T)[iu[0], iu[1]]

    ref = sims(AutoModel.from_pretrained(str(parent), dtype=torch.float32))
    shapes = {"l3": recipe_target(ROOT / "recipes/minilm-l3.yaml"),
              "l3-h256": recipe_target(ROOT / "recipes/minilm-l3-h256.yaml")}
    calib = {"samples": cfg["minilm_calib_samples"], "seq_len": 128}
    rows = {}
    for shape, target in shapes.items():
        rows[shape] = {}
        child_cfg = None
        for arm, recipe in lm_recipes(target, calib).items():
            if arm in ROTATED:  # LayerNorm: rotate_hidden refuses it (exit 2), by design
                continue
            recipe["output"] = {"dtype": "float32"}
            child, dt = subclone(parent, recipe, f"minilm-{shape}-{arm}", work, device)
            model = AutoModel.from_pretrained(str(child), dtype=torch.float32)
            s = sims(model)
            rows[shape][arm] = {"spearman": spearman(s, ref), "pearson": pearson(s, ref), "subclone_s": round(dt, 2),
                                "params": sum(p.numel() for p in model.parameters()),
                                "kept_layers": kept_layers(child)}
            child_cfg = child_cfg or AutoConfig.from_pretrained(str(child))
        torch.manual_seed(0)
        model = AutoModel.from_config(child_cfg, dtype=torch.float32)
        s = sims(model)
        rows[shape]["random"] = {"spearman": spearman(s, ref), "pearson": pearson(s, ref), "subclone_s": None,
                                 "params": sum(p.numel() for p in model.parameters()), "kept_layers": None}
        log(f"minilm {shape}: " + ", ".join(f"{a} rho={r['spearman']:.3f}" for a, r in rows[shape].items()))
    return {"parent": str(parent), "sentences": len(sents), "pairs": len(ref), "max_length": 128,
            "shapes": {k: v for k, v in shapes.items()}, "arms": rows,
            "sentence_examples": sents[:3] + sents[len(sents) // 2:len(sents) // 2 + 3]}


# ----------------------------------------------------------------------------- part 1: data
def token_stream(tok, path: Path) -> torch.Tensor:
    tok.model_max_length = 1 << 60
    ids = tok(Path(path).read_text(encoding="utf-8"), add_special_tokens=False,
              return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


class Batches:
    """The same seeded order of non-overlapping seq_len windows for every arm (a new permutation per epoch)."""

    def __init__(self, ids: torch.Tensor, seq_len: int, batch: int, seed: int):
        n = len(ids) // seq_len
        self.windows = ids[:n * seq_len].view(n, seq_len)
        self.batch, self.seed, self.perms = batch, seed, {}

    def get(self, step: int) -> torch.Tensor:
        n = len(self.windows)
        idx = []
        for j in range(step * self.batch, (step + 1) * self.batch):
            epoch, pos = divmod(j, n)
            if epoch not in self.perms:
                self.perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
            idx.append(int(self.perms[epoch][pos]))
        return self.windows[idx]


def eval_windows(ids: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    starts = torch.linspace(0, len(ids) - seq_len, n).long()
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def lm_loss(model, x: torch.Tensor, reduction="mean") -> torch.Tensor:
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1),
                           reduction=reduction)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, bs: int, device) -> float:
    was = model.training
    model.eval()
    nll, n = 0.0, 0
    for s in range(0, len(windows), bs):
        x = windows[s:s + bs].to(device)
        nll += float(lm_loss(model, x, "sum"))
        n += x[:, 1:].numel()
    model.train(was)
    return math.exp(min(nll / n, 700))


WARMUP_STEPS: int | None = None  # --warmup-steps: linear warmup over this many updates (0: none) instead of WARMUP_FRAC


def lr_at(step: int, steps: int, peak: float) -> float:
    """LR for update `step` (0-based): linear warmup, then cosine to MIN_LR_FRAC * peak at the last step.
    Warmup: WARMUP_FRAC of the steps (at least 1), or WARMUP_STEPS when set (0: the first update is at the peak)."""
    warm = max(1, round(WARMUP_FRAC * steps)) if WARMUP_STEPS is None else WARMUP_STEPS
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - 1 - warm)
    return peak * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def make_optimizer(model, lr: float):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=BETAS, eps=1e-8)


def load_arm(arm: str, children: dict, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(dtype=torch.float32, attn_implementation="sdpa")
    if arm == "random":
        cfg = AutoConfig.from_pretrained(str(next((children[a] for a in children if a not in ROTATED),
                                                   next(iter(children.values())))))
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg, **kw)
    else:
        m = AutoModelForCausalLM.from_pretrained(str(children[arm]), **kw)
    m.config.use_cache = False
    return m.to(device).train()


def train_run(model, batches: Batches, steps: int, lr: float, eval_at: set[int], evalsets: dict, ev_bs: int,
              device, init_eval: dict | None, tag: str) -> dict:
    opt = make_optimizer(model, lr)
    curve = {"step": [], **{k: [] for k in evalsets}}
    losses = []

    def evaluate(step):
        if step == 0 and init_eval is not None:
            vals = init_eval
        else:
            vals = {k: perplexity(model, w, ev_bs, device) for k, w in evalsets.items()}
        curve["step"].append(step)
        for k, v in vals.items():
            curve[k].append(v)
        return vals

    t = time.perf_counter()
    evaluate(0)
    step_s = 0.0
    for step in range(steps):
        ts = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        x = batches.get(step).to(device)
        loss = lm_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(float(loss))
        step_s += time.perf_counter() - ts
        if not math.isfinite(losses[-1]):
            log(f"{tag}: loss is {losses[-1]} at step {step + 1}; stopping this run")
            for k in evalsets:
                curve[k].append(float("inf"))
            curve["step"].append(step + 1)
            break
        if step + 1 in eval_at:
            v = evaluate(step + 1)
            log(f"{tag} step {step + 1}/{steps}: train loss {losses[-1]:.3f}, "
                + ", ".join(f"{k} ppl {p:.1f}" for k, p in v.items()))
    return {"curve": curve, "train_loss": losses, "seconds": round(time.perf_counter() - t, 1),
            "s_per_step": round(step_s / max(1, len(losses)), 3)}


def crossing(steps: list[int], ppl: list[float], target: float):
    """First (interpolated, in log ppl) step at which the curve reaches target, and the bracketing evals."""
    for i, p in enumerate(ppl):
        if p <= target:
            if i == 0:
                return 0.0, (0, 0)
            a, b = math.log(ppl[i - 1]), math.log(p)
            frac = (a - math.log(target)) / (a - b) if a != b else 1.0
            return steps[i - 1] + frac * (steps[i] - steps[i - 1]), (steps[i - 1], steps[i])
    return None, None


# ----------------------------------------------------------------------------- machine
def machine(device: str) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import transformers
    out = {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "cpu": cpu, "ram_gib": ram, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "device": device}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


# ----------------------------------------------------------------------------- report
def fmt_ppl(p: float | None) -> str:
    if p is None:
        return "-"
    if not math.isfinite(p):
        return "inf"
    return f"{p:,.1f}" if p < 1e5 else f"{p:.3g}"


def ppl_pair(curve: dict, i: int) -> str:
    """"shakespeare / pydoc" held-out perplexity at evaluation i of a curve."""
    return f"{fmt_ppl(curve['shakespeare'][i])} / {fmt_ppl(curve['pydoc'][i])}"


def ranges(xs: list[int]) -> str:
    """[0, 1, 2, 3, 7, 8] -> '0-3, 7-8'"""
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}-{a}" if a != start else f"{a}")
            start = b
    return ", ".join(out)


def fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def markdown(R: dict) -> str:
    L = []
    c, m = R["config"], R["machine"]
    L.append(f"# shrinkit quality benchmark ({R['mode']})\n")
    L.append(f"- command: `{R['command']}`")
    L.append(f"- date: {R['date']}; wall time {R['wall_s'] / 60:.1f} min"
             + (f" (budget {c['budget_min']:g} min)" if c.get("budget_min") else ""))
    L.append(f"- machine: {m['nproc']} CPU(s), {m['cpu']}, {m['ram_gib']} GiB RAM; torch {m['torch']} "
             f"({m['torch_threads']} threads), transformers {m['transformers']}, Python {m['python']}; device {m['device']}"
             + (f" ({m['gpu']})" if m.get("gpu") else ""))
    if R.get("load_average"):
        L.append("- load average (1 min) at the start and end of each phase: "
                 + "; ".join(f"{x['what']} {x['load_start']:.1f}-{x['load_end']:.1f}" for x in R["load_average"]))
    if "lm" in R:
        lm = R["lm"]
        pname = "Gemma 3 270M" if c.get("parent") == "gemma3" else "SmolLM2-135M-Instruct"
        warm_txt = f"{WARMUP_FRAC:.0%}" if c.get("warmup_steps") is None else f"{c['warmup_steps']} steps"
        L.append(f"\n## 1. {pname} -> {lm['params'] / 1e6:.0f}M child, trained on Shakespeare\n")
        shape = json.dumps(c.get("lm_shape", c["lm_target"]))
        if c.get("lm_budget"):
            shape += f" (solved by shrinkit for target {json.dumps(c['lm_target'])}, {c['lm_budget']['off']} off)"
        L.append(f"Recipe {c.get('lm_recipe', 'recipes/smollm2-40m.yaml')}. "
                 f"Child shape {shape} ({lm['params'] / 1e6:.2f}M params, tied embeddings), "
                 f"parent {lm['parent_params'] / 1e6:.1f}M. Training: {c['steps']} steps x {c['batch']} windows x "
                 f"{c['seq_len']} tokens ({c['steps'] * c['batch'] * c['seq_len']:,} tokens = "
                 f"{c['steps'] * c['batch'] * c['seq_len'] / lm['train_tokens_total']:.2f} epochs of shakespeare_train's "
                 f"{lm['train_tokens_total']:,}), same seeded batch order for every arm; AdamW "
                 f"betas {BETAS}, weight decay {WEIGHT_DECAY} (matrices), clip {CLIP}, warmup "
                 f"{warm_txt} then "
                 f"cosine to {MIN_LR_FRAC:.0%} of peak, fp32 on {m['device']}. Held-out perplexity on "
                 f"{c['eval_windows']} fixed windows x {c['seq_len']} tokens per text, at steps {lm['eval_steps']}. "
                 f"Peak LR grid {[fmt_lr(x) for x in c['lrs']]}, best by final shakespeare_heldout perplexity. "
                 f"Measured {lm['timing']['s_per_step']:.2f} s/step, {lm['timing']['s_per_eval']:.2f} s/eval (both texts).")
        L.append(f"\nParent (reference: the {lm['parent_params'] / 1e6:.0f}M parent as is, not trained here): shakespeare_heldout ppl "
                 f"{fmt_ppl(lm['parent_ppl']['shakespeare'])}, pydoc_heldout ppl {fmt_ppl(lm['parent_ppl']['pydoc'])}.\n")
        L.append("| arm | how | subclone s | kept layers | best LR | shakespeare ppl init | shakespeare ppl final "
                 "| pydoc ppl init | pydoc ppl final |")
        L.append("|---|---|---:|---|---:|---:|---:|---:|---:|")
        for arm in LM_ARMS:
            a = lm["arms"][arm]
            b = a["runs"][a["best_lr"]]["curve"]
            kl = a.get("kept_layers")
            kl = ranges(kl) if kl else "-"
            L.append(f"| {arm} | {a['how']} | {a['subclone_s'] if a['subclone_s'] is not None else '-'} | {kl} | "
                     f"{fmt_lr(float(a['best_lr']))}{' (grid edge)' if a['best_at_edge'] else ''} | "
                     f"{fmt_ppl(b['shakespeare'][0])} | {fmt_ppl(b['shakespeare'][-1])} | "
                     f"{fmt_ppl(b['pydoc'][0])} | {fmt_ppl(b['pydoc'][-1])} |")
        L.append("\n(grid edge): the best LR is the smallest or largest of the grid, so a value outside it might do better.")
        if c["steps"] * c["batch"] * c["seq_len"] < 0.1 * lm["train_tokens_total"]:
            L.append(f"\nNote: {R['mode']} mode trains for only {c['steps']} steps; these numbers describe the very "
                     "start of training, far shorter than the training runs behind the papers' speed-up claims.")
        L.append("\nLearning-rate grid (final held-out perplexity, shakespeare / pydoc):\n")
        L.append("| arm | " + " | ".join(f"LR {fmt_lr(x)}" for x in c["lrs"]) + " |")
        L.append("|---|" + "---:|" * len(c["lrs"]))
        for arm in LM_ARMS:
            a = lm["arms"][arm]
            cells = []
            for lr in c["lrs"]:
                cell = ppl_pair(a["runs"][str(lr)]["curve"], -1)
                cells.append(f"**{cell}**" if str(lr) == a["best_lr"] else cell)
            L.append(f"| {arm} | " + " | ".join(cells) + " |")
        for key in ("speedup", "speedup_vs_activation"):
            if key not in lm:
                continue
            s = lm[key]
            ref = s.get("reference", "random")
            L.append(f"\nSteps to first reach the {ref} arm's final shakespeare_heldout perplexity "
                     f"({fmt_ppl(s['target_ppl'])}, {ref} at its best LR after {c['steps']} steps), each arm at its best LR. "
                     f"Evaluations every {lm['eval_every']} steps; the crossing step is interpolated in log perplexity "
                     f"between the two evaluations that bracket it.\n")
            L.append(f"| arm | steps to reach (interpolated) | bracket (evals) | speed-up vs {ref} | "
                     f"conservative speed-up ({ref}'s steps / bracket end) |")
            L.append("|---|---:|---|---:|---:|")
            for arm in LM_ARMS:
                r = s["arms"][arm]
                if r["steps"] is None:
                    st, br = f"not reached in {c['steps']}", "-"
                elif r["steps"] == 0:
                    st, br = "0 (at init)", "init"
                else:
                    st, br = f"{r['steps']:.1f}", f"{r['bracket'][0]}-{r['bracket'][1]}"
                L.append(f"| {arm} | {st} | {br} | {r['ratio']} | {r['ratio_conservative'] or '-'} |")
        if "vs_activation_per_lr" in lm:
            others = [a for a in LM_ARMS if a != "activation"]
            L.append(f"\nPer learning rate: steps each arm needs to first reach the activation arm's final "
                     f"shakespeare_heldout perplexity **at the same LR** (interpolated; bracket in parentheses; "
                     f"{c['steps']} steps in all).\n")
            L.append("| LR | activation final | " + " | ".join(f"{a}: steps (bracket)" for a in others) + " |")
            L.append("|---:|---:|" + "---:|" * len(others))
            for lr, row in lm["vs_activation_per_lr"].items():
                cells = []
                for a in others:
                    r = row["arms"][a]
                    cells.append("not reached" if r["steps"] is None else "0 (at init)" if r["steps"] == 0 else
                                 f"{r['steps']:.1f} ({r['bracket'][0]}-{r['bracket'][1]})")
                L.append(f"| {fmt_lr(float(lr))} | {fmt_ppl(row['target_ppl'])} | " + " | ".join(cells) + " |")
            L.append("\nHeld-out perplexity at each evaluation, every run (shakespeare / pydoc):\n")
            runs = [(a, lr) for a in LM_ARMS for lr in c["lrs"]]
            L.append("| step | " + " | ".join(f"{a} LR {fmt_lr(lr)}" for a, lr in runs) + " |")
            L.append("|---:|" + "---:|" * len(runs))
            for i, st in enumerate(lm["eval_steps"]):
                cells = []
                for a, lr in runs:
                    cur = lm["arms"][a]["runs"][str(lr)]["curve"]
                    cells.append(ppl_pair(cur, i) if i < len(cur["step"]) else "-")
                L.append(f"| {st} | " + " | ".join(cells) + " |")
        L.append("\nHeld-out perplexity at each evaluation, best LR of each arm (shakespeare / pydoc):\n")
        L.append("| step | " + " | ".join(LM_ARMS) + " |")
        L.append("|---:|" + "---:|" * len(LM_ARMS))
        steps0 = lm["arms"][LM_ARMS[0]]["runs"][lm["arms"][LM_ARMS[0]]["best_lr"]]["curve"]["step"]
        for i, st in enumerate(steps0):
            cells = []
            for arm in LM_ARMS:
                cur = lm["arms"][arm]["runs"][lm["arms"][arm]["best_lr"]]["curve"]
                cells.append(ppl_pair(cur, i) if i < len(cur["step"]) else "-")
            L.append(f"| {st} | " + " | ".join(cells) + " |")
    if "minilm" in R:
        mm = R["minilm"]
        L.append("\n## 2. all-MiniLM-L6-v2 -> 3 layers, at init (no training)\n")
        L.append(f"How well each child keeps the parent's pairwise sentence similarities: {mm['sentences']} held-out "
                 f"sentences (lines of 5-30 words, half shakespeare_heldout, half pydoc_heldout), parent's tokenizer "
                 f"(max {mm['max_length']} tokens), mask-aware mean pooling, cosine similarity; Spearman rho (Pearson r) "
                 f"of the {mm['pairs']:,} upper-triangle pairs, child vs parent. Random: transformers' init of the child config, seed 0.\n")
        shapes = list(mm["arms"])
        L.append("| arm | " + " | ".join(f"{s} {json.dumps(mm['shapes'][s])}" for s in shapes) + " | kept layers |")
        L.append("|---|" + "---:|" * len(shapes) + "---|")
        for arm in LM_ARMS:
            if arm not in mm["arms"][shapes[0]]:
                L.append(f"| {arm} | " + " | ".join("refused (LayerNorm family)" for _ in shapes) + " | - |")
                continue
            cells = [f"{mm['arms'][s][arm]['spearman']:.3f} ({mm['arms'][s][arm]['pearson']:.3f})" for s in shapes]
            kl = mm["arms"][shapes[0]][arm]["kept_layers"]
            L.append(f"| {arm} | " + " | ".join(cells) + f" | {ranges(kl) if kl else '-'} |")
        L.append(f"\nParams: " + ", ".join(f"{s} {mm['arms'][s]['random']['params'] / 1e6:.2f}M" for s in shapes)
                 + " (parent 22.7M). At full width (l3) activation and magnitude ranking have nothing to rank, "
                   "so those two children are the same.")
    L.append("\n## Timings\n")
    L.append("| phase | seconds |")
    L.append("|---|---:|")
    for k, v in R["timings"].items():
        L.append(f"| {k} | {v:.1f} |")
    L.append(f"\nFiles: {R['out']}/results.json, results.md, curves.png; recipes in {R['out']}/recipes/.")
    return "\n".join(L) + "\n"


def plot(R: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm = R["lm"]
    colors = {"activation": "tab:red", "activation-heal": "tab:purple", "activation-heal-unbounded": "tab:brown", "rotate": "tab:green", "rotate-heal": "tab:olive",
              "magnitude": "tab:orange", "weight-selection": "tab:blue", "random": "tab:gray"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    cap = 1e6  # points above are drawn at the cap (their value is in the legend)
    for ax, key, title in ((axes[0], "shakespeare", "shakespeare_heldout (trained domain)"),
                           (axes[1], "pydoc", "pydoc_heldout (never trained on)")):
        for arm in LM_ARMS:
            a = lm["arms"][arm]
            for lr, run in a["runs"].items():
                cur = run["curve"]
                best = lr == a["best_lr"]
                ys = [min(y, cap) for y in cur[key]]
                off = [y for y in cur[key] if y > cap]
                label = f"{arm} (LR {fmt_lr(float(lr))})" + (f"; off scale: {max(off):.2g}" if off else "")
                ax.plot(cur["step"], ys, color=colors[arm], lw=2.2 if best else 0.8, alpha=1 if best else 0.35,
                        marker="o" if best else None, ms=3, label=label if best else None)
        ax.axhline(lm["parent_ppl"][key], color="k", ls=":", lw=1, label="parent 135M, as is (not trained here)")
        if key == "shakespeare" and "speedup" in lm:
            ax.axhline(lm["speedup"]["target_ppl"], color="tab:gray", ls="--", lw=1, label="random's final ppl")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    c = R["config"]
    pname = "Gemma 3 270M" if c.get("parent") == "gemma3" else "SmolLM2-135M"
    fig.suptitle(f"{pname} -> {lm['params'] / 1e6:.1f}M child, {R['mode']} mode: {c['steps']} steps x "
                 f"{c['batch']} x {c['seq_len']} tokens (thin lines: other LRs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    global LM_ARMS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="at most 15 minutes on 2 CPU cores, everything included")
    g.add_argument("--smoke", action="store_true", help="a minute or two; checks the whole path works")
    ap.add_argument("--out", type=Path, help="output folder (default $SHRINKIT_CACHE/bench/quality/<mode>/)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--steps", type=int, help="training steps per run (default: sized to the budget)")
    ap.add_argument("--budget-min", type=float, help="wall-time budget in minutes that sizes the steps")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--lrs", help="comma-separated peak learning rates")
    ap.add_argument("--evals", type=int, help="evaluations after init (default by mode)")
    ap.add_argument("--eval-windows", type=int, help="held-out windows per text")
    ap.add_argument("--calib-samples", type=int, help="calibration samples of the LM arms (default by mode)")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--keep-children", action="store_true", help="keep the child folders (deleted by default)")
    ap.add_argument("--reuse-children", action="store_true",
                    help="reuse the LM children an earlier --keep-children run left in the same --out folder "
                         "when their recipe is unchanged (implies --keep-children); to split a grid across runs")
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes/smollm2-40m.yaml",
                    help="recipe whose target sets the LM child's shape (default recipes/smollm2-40m.yaml)")
    ap.add_argument("--drop-layers", choices=("middle", "importance", "last"),
                    help="drop_layers strategy of the shrinkit arms (default: the --recipe's, else middle; "
                         "weight-selection always keeps the first layers)")
    ap.add_argument("--arms", help=f"comma-separated LM arms out of {','.join(ALL_ARMS)} (random is always run unless --no-random)")
    ap.add_argument("--heal-alpha", type=float, help="the heal stage's alpha in the activation-heal arm "
                    "(ridge lambda = alpha x mean diagonal of the Gram matrix; default: the stage's)")
    ap.add_argument("--heal-max-change", type=float, help="the heal stage's max_change in the activation-heal arm "
                    "(default: the stage's; the activation-heal-unbounded arm has none)")
    ap.add_argument("--warmup-steps", type=int, help=f"linear warmup over this many updates, 0 for none "
                    f"(default: {WARMUP_FRAC * 100:.0f}%% of the steps, at least 1)")
    ap.add_argument("--parent", choices=("smollm2", "gemma3"), default="smollm2",
                    help="the LM parent (bench/assets.py): SmolLM2-135M-Instruct (default) or Gemma 3 270M")
    ap.add_argument("--skip-parent-ppl", action="store_true",
                    help="do not measure the parent's perplexity (reported as nan): for grids split across runs")
    ap.add_argument("--results-name", default="results",
                    help="file name stem of results .json/.md (curves: <stem>-curves.png unless 'results')")
    ap.add_argument("--lock", type=Path, help="flock this file for the subclones and for each training run "
                    "(released in between, so one run holds it for minutes, not the whole benchmark)")
    ap.add_argument("--no-random", action="store_true",
                    help="do not train the random arm (no speed-up against random; the comparison against "
                         "the activation arm remains)")
    args = ap.parse_args(argv)
    global LOCK, WARMUP_STEPS
    LOCK = args.lock
    WARMUP_STEPS = args.warmup_steps
    if args.arms:
        pick = set(args.arms.split(",")) | ({"random"} if not args.no_random else set())
        if pick - set(ALL_ARMS):
            ap.error(f"--arms: unknown arm(s) {', '.join(sorted(pick - set(ALL_ARMS)))}")
        LM_ARMS = tuple(a for a in ALL_ARMS if a in pick)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = dict(MODES["full-gpu" if mode == "full" and device != "cpu" else mode])
    for k in ("steps", "budget_min", "seq_len", "batch", "evals", "eval_windows", "calib_samples"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.steps is not None:
        cfg["budget_min"] = None
    elif args.budget_min is not None:
        cfg["steps"] = None  # an explicit budget sizes the steps, on a GPU too
    if args.lrs:
        cfg["lrs"] = [float(x) for x in args.lrs.split(",")]
    torch.set_num_threads(args.threads)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # training matmuls in TF32 (fp32 weights and optimizer)
        torch.backends.cudnn.allow_tf32 = True
    out = (args.out or assets.cache_dir() / "bench" / "quality" / mode).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out
    command = shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable,
                          os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])])
    budget_s = cfg["budget_min"] * 60 if cfg.get("budget_min") else None
    log(f"mode {mode}, device {device}, {torch.get_num_threads()} threads, out {out}"
        + (f", budget {budget_s / 60:.1f} min for everything" if budget_s else ""))

    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    timings: dict[str, float] = {}
    R: dict = {"mode": mode, "command": command, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": machine(device), "out": str(out)}
    R["config"] = {**cfg, "arms": list(LM_ARMS), "device": device, "tf32": device.startswith("cuda"), "warmup_frac": WARMUP_FRAC,
                   "warmup_steps": WARMUP_STEPS, "parent": args.parent, "heal_max_change": args.heal_max_change,
                   "min_lr_frac": MIN_LR_FRAC,
                   "weight_decay": WEIGHT_DECAY, "betas": BETAS, "clip": CLIP}

    def save():
        R["timings"] = timings
        R["load_average"] = LOADS
        R["wall_s"] = time.perf_counter() - T0
        (out / f"{args.results_name}.json").write_text(json.dumps(R, indent=1) + "\n")

    t = time.perf_counter()
    texts = {k: str(v) for k, v in assets.text().items()}
    parent = (assets.gemma3() if args.parent == "gemma3" else assets.smollm2()) if not args.skip_lm else None
    timings["assets"] = time.perf_counter() - t

    # ---- subclone the LM arms first (their cost is fixed), then the MiniLM part, then size training
    if not args.skip_lm:
        t = time.perf_counter()
        target = recipe_target(args.recipe)
        drop = args.drop_layers or recipe_drop(args.recipe)
        R["config"]["lm_target"] = target
        R["config"]["drop_layers"] = drop
        R["config"]["heal_alpha"] = args.heal_alpha
        R["config"]["lm_recipe"] = os.path.relpath(args.recipe.resolve(), ROOT)
        calib = {"samples": cfg["calib_samples"], "seq_len": cfg["calib_seq_len"]}
        children, sub_s = {}, {}
        for arm, recipe in lm_recipes(target, calib, drop, args.heal_alpha, args.heal_max_change).items():
            if arm in LM_ARMS:
                with locked(f"subclone {arm}"):
                    children[arm], sub_s[arm] = subclone(parent, recipe, f"{args.parent}-{arm}", work, device,
                                                         reuse=args.reuse_children)
        rep0 = json.loads((next((children[a] for a in children if a not in ROTATED), next(iter(children.values())))
                            / "shrinkit_report.json").read_text())
        R["config"]["lm_shape"] = {k: rep0["child"]["dims"][k] for k in ("hidden_size", "intermediate_size",
                                   "num_attention_heads", "num_key_value_heads", "num_hidden_layers")}
        if "budget" in rep0:
            R["config"]["lm_budget"] = rep0["budget"]
        timings[f"subclone SmolLM2 ({len(children)} arms)"] = time.perf_counter() - t

    if not args.skip_minilm:
        t = time.perf_counter()
        R["minilm"] = minilm_part(cfg, work, texts, device)
        timings["MiniLM part (6 subclones + embeddings)"] = time.perf_counter() - t
        save()

    if not args.skip_lm:
        from transformers import AutoTokenizer

        t = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(str(parent))
        train_ids = token_stream(tok, Path(texts["shakespeare_train"]))
        evalsets = {"shakespeare": eval_windows(token_stream(tok, Path(texts["shakespeare_heldout"])), cfg["seq_len"],
                                                cfg["eval_windows"]),
                    "pydoc": eval_windows(token_stream(tok, Path(texts["pydoc_heldout"])), cfg["seq_len"],
                                          cfg["eval_windows"])}
        batches = Batches(train_ids, cfg["seq_len"], cfg["batch"], seed=1234)
        timings["tokenize"] = time.perf_counter() - t
        log(f"tokens: shakespeare_train {len(train_ids):,} ({len(batches.windows):,} windows of {cfg['seq_len']}); "
            f"eval {cfg['eval_windows']} windows per text")

        # parent reference perplexity
        t = time.perf_counter()
        from transformers import AutoModelForCausalLM
        pm = AutoModelForCausalLM.from_pretrained(str(parent), dtype=torch.float32, attn_implementation="sdpa").to(device)
        parent_ppl = {k: (perplexity(pm, w, cfg["eval_batch"], device) if not args.skip_parent_ppl else float("nan"))
                      for k, w in evalsets.items()}
        parent_params = sum(p.numel() for p in pm.parameters())
        del pm
        timings["parent perplexity"] = time.perf_counter() - t
        log(f"parent ppl: " + ", ".join(f"{k} {v:.1f}" for k, v in parent_ppl.items()))

        # init perplexity of every arm (the same for every LR) and shape check
        t = time.perf_counter()
        init_eval, params = {}, {}
        for arm in LM_ARMS:
            m = load_arm(arm, children, device)
            params[arm] = sum(p.numel() for p in m.parameters())
            init_eval[arm] = {k: perplexity(m, w, cfg["eval_batch"], device) for k, w in evalsets.items()}
            log(f"init {arm}: {params[arm] / 1e6:.2f}M params, "
                + ", ".join(f"{k} ppl {v:.1f}" for k, v in init_eval[arm].items()))
            del m
        s_eval = (time.perf_counter() - t) / len(LM_ARMS)
        assert len({v for a, v in params.items() if a not in ROTATED}) <= 1, f"arms differ in shape: {params}"
        timings[f"init evals ({len(LM_ARMS)} arms)"] = time.perf_counter() - t

        # measure seconds per training step (random arm, throwaway optimizer)
        t = time.perf_counter()
        m = load_arm("random", children, device) if cfg.get("steps") is None else None
        opt = make_optimizer(m, 1e-4) if m is not None else None
        times = []
        for i in range(8 if m is not None else 0):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            ts = time.perf_counter()
            loss = lm_loss(m, batches.get(i).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - ts)
        if m is not None:  # --steps given: no probe; s/step is measured in the runs instead
            s_step = sorted(times[4:])[len(times[4:]) // 2]  # the first steps touch fresh memory
            ts = time.perf_counter()
            perplexity(m, evalsets["shakespeare"], cfg["eval_batch"], device)
            perplexity(m, evalsets["pydoc"], cfg["eval_batch"], device)
            s_eval = time.perf_counter() - ts
        else:
            s_step = float("nan")
        del m, opt
        timings["timing probe"] = time.perf_counter() - t
        n_runs = len(LM_ARMS) * len(cfg["lrs"])
        if cfg.get("steps") is None:
            left = budget_s - (time.perf_counter() - T0) - SAFETY_S
            per_run_fixed = (cfg["evals"] + 2) * s_eval + LOAD_S  # evals after init (+2 early) + model load
            steps = int((left / n_runs - per_run_fixed) / s_step)
            floor = 20
            if steps < floor:
                log(f"WARNING: the budget leaves only {steps} steps per run; using {floor} (will run over budget)")
                steps = floor
            cfg["steps"] = steps
        steps = cfg["steps"]
        evals = min(cfg["evals"], steps)
        eval_every = max(1, steps // evals)
        eval_at = set(range(eval_every, steps + 1, eval_every)) | {steps}
        if eval_every >= 4:  # two extra early points: subcloned arms move fastest at the start
            eval_at |= {eval_every // 4, eval_every // 2}
        est = n_runs * (steps * s_step + len(eval_at) * s_eval + LOAD_S)
        R["config"]["steps"] = steps
        log(f"TIME BUDGET: {s_step:.2f} s/step (batch {cfg['batch']} x {cfg['seq_len']}), {s_eval:.2f} s/eval; "
            f"{n_runs} runs ({len(LM_ARMS)} arms x {len(cfg['lrs'])} LRs) x {steps} steps, eval every {eval_every} "
            f"-> training estimate {est / 60:.1f} min; elapsed so far {(time.perf_counter() - T0) / 60:.1f} min; "
            f"projected total {(time.perf_counter() - T0 + est) / 60:.1f} min"
            + (f" of {budget_s / 60:.1f}" if budget_s else ""))

        lm = {"params": next((v for a, v in params.items() if a not in ROTATED), next(iter(params.values()))), "parent_params": parent_params, "parent_ppl": parent_ppl,
              "train_tokens_total": len(train_ids), "eval_steps": sorted({0} | eval_at), "eval_every": eval_every,
              "timing": {"s_per_step": s_step, "s_per_eval": s_eval, "estimate_s": est}, "arms": {}}
        R["lm"] = lm
        hows = {"activation": f"activation ranking, drop {drop}, rescale norms",
                "activation-heal": f"activation ranking, drop {drop}, heal, rescale norms",
                "activation-heal-unbounded": f"activation ranking, drop {drop}, heal (max_change: null), rescale norms",
                "rotate": f"activation ranking (ffn, heads), drop {drop}, rotate_hidden (PCA), untied head",
                "magnitude": f"magnitude ranking, drop {drop}, rescale norms",
                "weight-selection": f"uniform selection, first {R['config']['lm_shape']['num_hidden_layers']} layers, no rescale",
                "random": "transformers init of the child config, seed 0"}
        t = time.perf_counter()
        for arm in LM_ARMS:
            a = {"how": hows[arm], "subclone_s": round(sub_s[arm], 1) if arm in sub_s else None,
                 "kept_layers": kept_layers(children[arm]) if arm in children else None, "runs": {}}
            lm["arms"][arm] = a
            for lr in cfg["lrs"]:
                torch.manual_seed(0)
                m = load_arm(arm, children, device)
                with locked(f"train {arm} LR {lr:g}"):
                    run = train_run(m, batches, steps, lr, eval_at, evalsets, cfg["eval_batch"], device,
                                    init_eval[arm], f"{arm} LR {lr:g}")
                del m
                a["runs"][str(lr)] = run
                log(f"{arm} LR {lr:g} done in {run['seconds']:.0f} s: final shakespeare ppl "
                    f"{run['curve']['shakespeare'][-1]:.1f}, pydoc ppl {run['curve']['pydoc'][-1]:.1f}")
                save()
            finals = {lr: r["curve"]["shakespeare"][-1] for lr, r in a["runs"].items()}
            a["best_lr"] = min(finals, key=lambda k: (finals[k], float(k)))
            order = [str(x) for x in sorted(cfg["lrs"])]
            a["best_at_edge"] = len(order) > 2 and a["best_lr"] in (order[0], order[-1])
        timings["training (all runs)"] = time.perf_counter() - t
        if not math.isfinite(lm["timing"]["s_per_step"]):  # no probe: the runs' own median
            per = sorted(r["s_per_step"] for a in lm["arms"].values() for r in a["runs"].values())
            lm["timing"]["s_per_step"] = per[len(per) // 2]

        for ref, key in (("random", "speedup"), ("activation", "speedup_vs_activation")):
            if ref not in LM_ARMS:
                continue
            rnd = lm["arms"][ref]["runs"][lm["arms"][ref]["best_lr"]]["curve"]
            target_ppl = rnd["shakespeare"][-1]
            sp = {"reference": ref, "target_ppl": target_ppl, "arms": {}}
            r_steps, _ = crossing(rnd["step"], rnd["shakespeare"], target_ppl)
            for arm in LM_ARMS:
                cur = lm["arms"][arm]["runs"][lm["arms"][arm]["best_lr"]]["curve"]
                st, br = crossing(cur["step"], cur["shakespeare"], target_ppl)
                bound = None
                if st is None:
                    ratio = f"< {r_steps / steps:.2f} (not reached)"
                elif st == 0:
                    ratio = bound = "inf (at init)"
                else:
                    ratio, bound = f"{r_steps / st:.2f}x", f"{r_steps / br[1]:.2f}x"
                sp["arms"][arm] = {"steps": st, "bracket": br, "ratio": ratio, "ratio_conservative": bound}
            lm[key] = sp
        if "activation" in LM_ARMS and len(LM_ARMS) > 1:  # the same comparison at each LR of the grid
            per = {}
            for lr in cfg["lrs"]:
                ref_curve = lm["arms"]["activation"]["runs"][str(lr)]["curve"]
                target_ppl = ref_curve["shakespeare"][-1]
                row = {"target_ppl": target_ppl, "arms": {}}
                for arm in LM_ARMS:
                    cur = lm["arms"][arm]["runs"][str(lr)]["curve"]
                    st, br = crossing(cur["step"], cur["shakespeare"], target_ppl)
                    row["arms"][arm] = {"steps": st, "bracket": br,
                                        "final": cur["shakespeare"][-1]}
                per[str(lr)] = row
            lm["vs_activation_per_lr"] = per
        save()
        try:
            plot(R, out / ("curves.png" if args.results_name == "results" else f"{args.results_name}-curves.png"))
        except ImportError:
            log("matplotlib is not installed (make bench-setup); no curves.png")

    if not (args.keep_children or args.reuse_children):
        shutil.rmtree(out / "children", ignore_errors=True)
    save()
    md = markdown(R)
    (out / f"{args.results_name}.md").write_text(md)
    log(f"done in {(time.perf_counter() - T0) / 60:.1f} min; wrote {out}/results.json, results.md, curves.png")
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
