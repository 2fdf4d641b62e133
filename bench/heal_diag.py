#!/usr/bin/env python3
"""Why does a healed child break under its first full-learning-rate updates?

Not a test: a diagnostic that compares children of the same shape (for instance the un-healed
child, the healed one, a healed one under another heal setting; the parent as a reference),
all written beforehand by `shrinkit subclone` in float32. For each child it reports:

- per layer, the Frobenius and spectral norms and the condition number (largest / smallest
  singular value) of the attention and MLP output projections, and their change against the
  first child (the selected weights when the first child is the un-healed one);
- the held-out perplexity at init and after each of the first updates of AdamW (the protocol of
  bench/quality.py: betas 0.9/0.95, weight decay 0.1 on matrices, grad-norm clip 1.0) at a
  constant learning rate, no warmup, on the same batches as bench/quality.py;
- the gradient norm (before clipping) and the update norm (relative to the weights) per step,
  total and for the output projections;
- which layers' outputs move most: the relative change of every layer's residual output on
  the held-out windows after one update.

Usage:
  python bench/heal_diag.py --child un-healed=DIR --child healed=DIR [--parent DIR] \
      [--lrs 1e-3,3e-3] [--steps 3] [--out OUT.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import assets  # noqa: E402
import quality as Q  # noqa: E402


def load(path: str):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    m.config.use_cache = False
    return m.train()


def projections(model) -> dict[str, torch.Tensor]:
    """name -> [out, in] weight of every layer's attention and MLP output projection."""
    return {n[:-len(".weight")]: p.detach() for n, p in model.named_parameters()
            if n.endswith(("o_proj.weight", "down_proj.weight"))}


def spectrum(w: torch.Tensor) -> dict:
    s = torch.linalg.svdvals(w.double())
    return {"fro": float(w.double().norm()), "spec": float(s[0]), "cond": float(s[0] / s[-1].clamp_min(1e-300)),
            "max_abs": float(w.abs().max())}


@torch.no_grad()
def layer_outputs(model, x: torch.Tensor) -> list[torch.Tensor]:
    out = model(input_ids=x, output_hidden_states=True)
    return [h.float() for h in out.hidden_states[1:]]


def one_child(name: str, path: str, ref_proj: dict | None, batches, evalsets, lrs, steps, ev_bs) -> dict:
    m = load(path)
    proj = {k: v.clone() for k, v in projections(m).items()}
    rows = {}
    for k, w in proj.items():
        r = spectrum(w)
        if ref_proj is not None and k in ref_proj and ref_proj[k].shape == w.shape:
            r["rel_change_vs_ref"] = float((w - ref_proj[k]).double().norm() / ref_proj[k].double().norm())
            r["fro_ratio_vs_ref"] = r["fro"] / float(ref_proj[k].double().norm())
        rows[k] = r
    init_state = {k: v.clone() for k, v in m.state_dict().items()}
    init_ppl = {k: Q.perplexity(m, w, ev_bs, "cpu") for k, w in evalsets.items()}
    probe = evalsets["shakespeare"][:4]
    h0 = layer_outputs(m, probe)
    res = {"path": path, "projections": rows, "init_ppl": init_ppl, "runs": {}}
    Q.log(f"{name}: init ppl {init_ppl}")
    for lr in lrs:
        m.load_state_dict(init_state)
        opt = Q.make_optimizer(m, lr)
        run = {"ppl": [], "grad_norm": [], "grad_norm_out_proj": [], "update_rel": [], "update_rel_out_proj": []}
        for step in range(steps):
            x = batches.get(step)
            loss = Q.lm_loss(m, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = float(torch.nn.utils.clip_grad_norm_(m.parameters(), Q.CLIP))
            gproj = math.sqrt(sum(float(p.grad.norm()) ** 2 for n, p in m.named_parameters()
                                  if n.endswith(("o_proj.weight", "down_proj.weight"))))
            before = {n: p.detach().clone() for n, p in m.named_parameters()}
            opt.step()
            num = den = pnum = pden = 0.0
            for n, p in m.named_parameters():
                d = float((p.detach() - before[n]).norm()) ** 2
                b = float(before[n].norm()) ** 2
                num, den = num + d, den + b
                if n.endswith(("o_proj.weight", "down_proj.weight")):
                    pnum, pden = pnum + d, pden + b
            del before
            run["grad_norm"].append(gn)
            run["grad_norm_out_proj"].append(gproj)
            run["update_rel"].append(math.sqrt(num / den))
            run["update_rel_out_proj"].append(math.sqrt(pnum / pden))
            run["ppl"].append({k: Q.perplexity(m, w, ev_bs, "cpu") for k, w in evalsets.items()})
            if step == 0:
                h1 = layer_outputs(m, probe)
                run["layer_move_after_1"] = [float((b - a).norm() / a.norm()) for a, b in zip(h0, h1)]
            Q.log(f"{name} LR {lr:g} step {step + 1}: loss {float(loss):.3f}, grad norm {gn:.3g}, "
                  f"ppl {run['ppl'][-1]}")
        res["runs"][str(lr)] = run
    return res, proj


def markdown(R: dict) -> str:
    names = list(R["children"])
    out = [f"# heal diagnostic\n\ncommand: `{R['command']}`  \nload average: {R['load']}\n"]
    out.append("## Output projections (Frobenius norm / spectral norm / condition number; change vs the first child)\n")
    first = R["children"][names[0]]["projections"]
    out.append("| projection | " + " | ".join(names) + " |")
    out.append("|---|" + "---:|" * len(names))
    for k in first:
        cells = []
        for n in names:
            r = R["children"][n]["projections"].get(k)
            if r is None:
                cells.append("-")
                continue
            c = f"{r['fro']:.1f} / {r['spec']:.2f} / {r['cond']:.3g}"
            if "rel_change_vs_ref" in r and n != names[0]:
                c += f" (Δ {r['rel_change_vs_ref']:.2f}, x{r['fro_ratio_vs_ref']:.2f})"
            cells.append(c)
        out.append(f"| {k.replace('model.layers.', '')} | " + " | ".join(cells) + " |")
    out.append("\n## First updates without warmup (shakespeare / pydoc held-out perplexity)\n")
    for n in names:
        c = R["children"][n]
        out.append(f"**{n}**: init {c['init_ppl']['shakespeare']:,.0f} / {c['init_ppl']['pydoc']:,.0f}\n")
        out.append("| LR | step | ppl | grad norm (all / out proj) | update / weights (all / out proj) |")
        out.append("|---:|---:|---:|---:|---:|")
        for lr, r in c["runs"].items():
            for i, p in enumerate(r["ppl"]):
                out.append(f"| {lr} | {i + 1} | {p['shakespeare']:,.0f} / {p['pydoc']:,.0f} | "
                           f"{r['grad_norm'][i]:.3g} / {r['grad_norm_out_proj'][i]:.3g} | "
                           f"{r['update_rel'][i]:.2e} / {r['update_rel_out_proj'][i]:.2e} |")
        out.append("")
        out.append("Relative change of each layer's output after one update (4 held-out windows):\n")
        for lr, r in c["runs"].items():
            mv = r["layer_move_after_1"]
            top = sorted(range(len(mv)), key=lambda i: -mv[i])[:3]
            out.append(f"- LR {lr}: " + ", ".join(f"{v:.2f}" for v in mv) + f" (largest: layers {top})")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="append", required=True, help="NAME=DIR (the first is the reference)")
    ap.add_argument("--parent", help="the parent folder (tokenizer; default SmolLM2-135M)")
    ap.add_argument("--lrs", default="1e-3,3e-3")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="results .json (and .md beside it)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    parent = args.parent or str(assets.smollm2())
    texts = assets.text()
    tok = AutoTokenizer.from_pretrained(parent)
    batches = Q.Batches(Q.token_stream(tok, Path(texts["shakespeare_train"])), args.seq_len, args.batch, seed=1234)
    evalsets = {k: Q.eval_windows(Q.token_stream(tok, Path(texts[f"{k}_heldout"])), args.seq_len, args.eval_windows)
                for k in ("shakespeare", "pydoc")}
    lrs = [float(x) for x in args.lrs.split(",")]
    R = {"command": " ".join(["bench/heal_diag.py", *(argv if argv is not None else sys.argv[1:])]),
         "load": [os.getloadavg()[0]], "children": {}}
    ref = None
    t = time.perf_counter()
    for spec in args.child:
        name, path = spec.split("=", 1)
        R["children"][name], proj = one_child(name, path, ref, batches, evalsets, lrs, args.steps, 8)
        ref = proj if ref is None else ref
    R["load"].append(os.getloadavg()[0])
    R["wall_s"] = round(time.perf_counter() - t, 1)
    args.out.write_text(json.dumps(R, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(R))
    print(markdown(R))
    return 0


if __name__ == "__main__":
    sys.exit(main())
