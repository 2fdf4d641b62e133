#!/usr/bin/env python3
"""Held-out perplexity of children at init (no training), with bench/quality.py's windows:
fixed, evenly spaced windows of shakespeare_heldout and pydoc_heldout, tokenized with the
parent's tokenizer.

Usage: python bench/init_ppl.py --parent DIR NAME=CHILD_DIR ... [--windows 8] [--seq-len 128] [--out OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import assets  # noqa: E402
import quality as Q  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parent", required=True)
    ap.add_argument("children", nargs="+", help="NAME=DIR")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.parent)
    texts = assets.text()
    evalsets = {k: Q.eval_windows(Q.token_stream(tok, Path(texts[f"{k}_heldout"])), args.seq_len, args.windows)
                for k in ("shakespeare", "pydoc")}
    R = {"command": " ".join(["bench/init_ppl.py", *(argv if argv is not None else sys.argv[1:])]),
         "load_start": os.getloadavg()[0], "children": {}}
    t = time.perf_counter()
    for spec in args.children:
        name, path = spec.split("=", 1)
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
        R["children"][name] = {"path": path, "params": sum(p.numel() for p in m.parameters()),
                               **{k: Q.perplexity(m, w, 4, "cpu") for k, w in evalsets.items()}}
        print(name, R["children"][name], flush=True)
        del m
    R["load_end"], R["wall_s"] = os.getloadavg()[0], round(time.perf_counter() - t, 1)
    if args.out:
        args.out.write_text(json.dumps(R, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
