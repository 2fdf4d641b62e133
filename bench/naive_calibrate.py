#!/usr/bin/env python3
"""The naive way to calibrate, which bench/speed.py's `naive-calibration` arm times against
shrinkit's block-by-block calibration (the `shrinkit-activation` arm).

Load the whole parent with transformers, converted to float32 in memory
(AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)), then forward the same
calibration tokens shrinkit-activation's recipe uses (`data: random_tokens`: torch.randint(0,
vocab, (samples, seq_len)) from torch.Generator().manual_seed(seed), in batches of batch_size)
with hooks that collect the statistics shrinkit's calibration collects:

  ffn      mean |input| of every mlp.down_proj, per intermediate neuron, per layer
  hidden   mean |hidden state| per hidden dim, summed over every layer's input and the last layer's output
  heads    each attention head's mean contribution |O_h z_h| to the residual stream (o_proj pre-hook)
  influence  Block Influence per layer: mean (1 - cos(layer input, layer output)) over tokens

and save them with torch.save to OUT. The full forward also computes the logits (as a naive
caller's model(ids) does); nothing else is written.

  python bench/naive_calibrate.py PARENT OUT.pt [--samples 16 --seq-len 128 --batch-size 8 --seed 0]
  python bench/naive_calibrate.py PARENT OUT.pt --recipe RECIPE.yaml     # calibration spec from the recipe
  python bench/naive_calibrate.py PARENT OUT.pt --recipe R --check-shrinkit   # also compare with shrinkit's stats
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def spec_from_recipe(path: str) -> dict:
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    for st in data.get("stages", []):
        rk = st.get("rank_neurons") if isinstance(st, dict) else None
        if rk and rk.get("method") == "activation":
            c = rk.get("calibration") or {}
            if c.get("data", "builtin") != "random_tokens":
                raise SystemExit(f"{path}: calibration data {c.get('data')!r}; this script only does random_tokens")
            # shrinkit's defaults (shrinkit/recipe.py Calibration) for whatever the recipe leaves out
            return {"samples": c.get("samples", 64), "seq_len": c.get("seq_len", 256),
                    "batch_size": c.get("batch_size", 8), "seed": data.get("seed", 0)}
    raise SystemExit(f"{path}: no rank_neurons stage with method activation")


def naive_stats(parent: str, samples: int, seq_len: int, batch_size: int, seed: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32)
    model.eval()
    cfg = model.config
    vocab = cfg.vocab_size
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    layers = model.model.layers
    n_layers = len(layers)

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (samples, seq_len), generator=g)

    ffn: dict[int, torch.Tensor] = {}
    heads: dict[int, torch.Tensor] = {}
    hidden = [None]
    bi = [0.0] * n_layers
    cnt = [0] * n_layers
    hooks = []

    def down_hook(i):
        def f(mod, args):
            a = args[0].detach()
            v = a.abs().reshape(-1, a.shape[-1]).sum(0).double()
            ffn[i] = ffn.get(i, 0) + v
        return f

    def o_hook(i):
        def f(mod, args):
            z = args[0].detach().reshape(-1, n_heads, head_dim).transpose(0, 1)       # [heads, T, hd]
            w = mod.weight                                                             # [H, heads*hd]
            wh = w.view(w.shape[0], n_heads, head_dim).permute(1, 2, 0)                # [heads, hd, H]
            heads[i] = heads.get(i, 0) + torch.bmm(z, wh).norm(dim=-1).sum(1).double()
        return f

    def layer_hook(i):
        def f(mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            xa = x.abs().reshape(-1, x.shape[-1]).sum(0).double()
            hidden[0] = xa if hidden[0] is None else hidden[0] + xa
            if i == n_layers - 1:
                hidden[0] += y.abs().reshape(-1, y.shape[-1]).sum(0).double()
            cos = torch.nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), dim=-1)
            bi[i] += float((1 - cos.double()).sum())
            cnt[i] += cos.numel()
        return f

    for i, layer in enumerate(layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(down_hook(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(o_hook(i)))
        hooks.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
    with torch.no_grad():
        for s in range(0, samples, batch_size):
            model(input_ids=ids[s:s + batch_size])
    for h in hooks:
        h.remove()
    n = max(cnt[0], 1)
    return {"tokens": n, "hidden": hidden[0] / n, "ffn": {k: v / n for k, v in ffn.items()},
            "heads": {k: v / n for k, v in heads.items()}, "influence": [b / max(c, 1) for b, c in zip(bi, cnt)]}


def shrinkit_stats(parent: str, recipe: str) -> dict:
    """shrinkit's own block-by-block statistics for the same recipe (shrinkit.calibrate.calibrate)."""
    from shrinkit.calibrate import calibrate
    from shrinkit.checkpoint.reader import open_checkpoint
    from shrinkit.pipeline import prepare
    from shrinkit.recipe import load_recipe

    r = load_recipe(recipe)
    ckpt = open_checkpoint(parent)
    try:
        plan = prepare(ckpt, r, True)
        spec = r.calibration_for("rank_neurons")
        st = calibrate(ckpt, plan, spec, seed=r.seed)
    finally:
        ckpt.close()
    from shrinkit.families.spaces import Space
    return {"tokens": st.tokens, "hidden": st.by_space(Space.HIDDEN)[None], "ffn": st.by_space(Space.FFN),
            "heads": st.by_space(Space.Q_HEADS), "influence": st.influence}


def compare(a: dict, b: dict) -> dict:
    def rel(x, y):
        x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
        return float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))

    out = {"tokens": (a["tokens"], b["tokens"]), "hidden": rel(a["hidden"], b["hidden"]),
           "ffn": max(rel(a["ffn"][k], b["ffn"][k]) for k in b["ffn"]),
           "heads": max(rel(a["heads"][k], b["heads"][k]) for k in b["heads"]),
           "influence": rel(a["influence"], b["influence"])}
    # the decisions that matter: the same top-half ffn neurons per layer?
    agree = []
    for k in b["ffn"]:
        n = len(b["ffn"][k]) // 2
        ta = set(torch.topk(a["ffn"][k], n).indices.tolist())
        tb = set(torch.topk(b["ffn"][k], n).indices.tolist())
        agree.append(len(ta & tb) / n)
    out["ffn_top_half_overlap_min"] = min(agree)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent")
    ap.add_argument("out")
    ap.add_argument("--recipe", help="take samples/seq_len/batch_size/seed from this recipe's activation stage")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-shrinkit", action="store_true",
                    help="also run shrinkit's calibration (needs --recipe) and print how far the stats differ")
    a = ap.parse_args()
    spec = spec_from_recipe(a.recipe) if a.recipe else {"samples": a.samples, "seq_len": a.seq_len,
                                                         "batch_size": a.batch_size, "seed": a.seed}
    st = naive_stats(a.parent, **spec)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"spec": spec, **st}, a.out)
    print(json.dumps({"spec": spec, "tokens": st["tokens"], "layers": len(st["ffn"])}))
    if a.check_shrinkit:
        if not a.recipe:
            raise SystemExit("--check-shrinkit needs --recipe")
        print("vs shrinkit: " + json.dumps(compare(st, shrinkit_stats(a.parent, a.recipe))))


if __name__ == "__main__":
    main()
