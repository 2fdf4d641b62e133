#!/usr/bin/env python3
"""The naive baseline that bench/speed.py times against shrinkit.

Load the whole parent with transformers, cut every tensor to the child's shape by keeping its
leading indices (first hidden dims, first ffn neurons, first heads and kv heads, the first N
layers), build the child model on the meta device, assign the sliced tensors and
save_pretrained() it as safetensors. Files are fsynced afterwards (as shrinkit and the `disk`
arm do) unless --no-fsync.

  python bench/naive_slice.py PARENT OUT [--factor 2] [--hidden-size N ...] [--no-fsync]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent")
    ap.add_argument("out")
    ap.add_argument("--factor", type=int, default=2, help="divide every dimension in KEYS by this (default 2)")
    for k in KEYS:
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None, help="explicit child value")
    ap.add_argument("--no-fsync", action="store_true")
    a = ap.parse_args()

    model = AutoModelForCausalLM.from_pretrained(a.parent, dtype=torch.bfloat16)
    cfg = AutoConfig.from_pretrained(a.parent)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for k in KEYS:
        v = getattr(a, k)
        setattr(cfg, k, v if v is not None else getattr(cfg, k) // a.factor)
    cfg.head_dim = head_dim
    cfg.dtype = torch.bfloat16

    with torch.device("meta"):
        child = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    parent_sd = model.state_dict()
    sliced = {}
    for name, meta in child.state_dict().items():
        t = parent_sd[name]  # the first N layers keep their names
        sliced[name] = t[tuple(slice(0, n) for n in meta.shape)].clone()
    del parent_sd, model
    child.load_state_dict(sliced, assign=True)
    # non-persistent buffers (rotary inv_freq) stay on meta; save_pretrained only writes the state dict
    out = Path(a.out)
    child.save_pretrained(out)
    if not a.no_fsync:
        for p in out.iterdir():
            if p.is_file():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


if __name__ == "__main__":
    main()
