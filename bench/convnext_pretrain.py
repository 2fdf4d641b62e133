#!/usr/bin/env python3
"""A pretrained ConvNeXt-T parent made here: no pretrained ConvNeXt checkpoint can be fetched
offline (no package on PyPI, npm or Debian ships one), so this trains transformers'
ConvNextForImageClassification at ConvNeXt-T's shape (widths 96, 192, 384, 768; depths 3, 3, 9,
3; 27.8M parameters) from scratch on Fashion-MNIST (Debian's dataset-fashion-mnist, MIT), and
writes it as a Hugging Face folder with a preprocessor config, for bench/vision_train.py and
`shrinkit subclone --recipe recipes/convnext-tiny-to-femto.yaml`.

It is a small-data parent (grayscale clothing at 32 x 32 pixels, one pass over at most the 55,000
training images that bench/vision_train.py's default 5,000-image fine-tuning subset does not
use), not an ImageNet one: what it shows is that a ConvNeXt-F child cut from a ConvNeXt that has
learned something keeps it, measured against random init of the same shape.

Training: AdamW (lr 1e-3, betas 0.9/0.999, weight decay 0.05 on matrices), linear warmup over 5 %
of the steps then cosine to 0, batch 64, grad-norm clip 1.0, fp32, images resized to 32 x 32 and
normalized to [-1, 1] (the saved preprocessor does the same). Test accuracy on the 10,000 test
images at the end.

Usage: python bench/convnext_pretrain.py [--steps 600] [--out ~/.cache/shrinkit/convnext-tiny-fashion]
       [--json bench/results/convnext-pretrain.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vision_train import FASHION, FASHION_CLASSES, _balanced, _idx  # noqa: E402

SIZE = 32
PRE = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": SIZE, "width": SIZE},
       "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def tensors(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 3, 32, 32] in [-1, 1] (bilinear, as the preprocessor's resample 2)."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


def main(argv=None) -> int:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache" / "shrinkit" / "convnext-tiny-fashion")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    xtr, ytr = _idx(FASHION / "train-images-idx3-ubyte.gz"), _idx(FASHION / "train-labels-idx1-ubyte.gz")
    xte, yte = _idx(FASHION / "t10k-images-idx3-ubyte.gz"), _idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    held = set(_balanced(ytr, 5000, 0).tolist())   # bench/vision_train.py's fine-tuning images: not seen here
    pool = np.array([i for i in range(len(ytr)) if i not in held])
    rng = np.random.default_rng(0)
    order = rng.permutation(pool)
    n = min(len(order), a.steps * a.batch)
    xs, ys = tensors(xtr[order[:n]]), torch.from_numpy(ytr[order[:n]].astype(np.int64))
    cfg = transformers.ConvNextConfig(num_labels=10, hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3],
                                      image_size=SIZE, id2label=dict(enumerate(FASHION_CLASSES)),
                                      label2id={c: i for i, c in enumerate(FASHION_CLASSES)})
    model = transformers.ConvNextForImageClassification(cfg)
    decay = [p for n_, p in model.named_parameters() if p.dim() > 1]
    other = [p for n_, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.999))
    warm = max(1, int(0.05 * a.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, a.steps - warm))))
    t0, load0, losses = time.time(), os.getloadavg()[0], []
    model.train()
    for step in range(a.steps):
        i = (step * a.batch) % n
        xb, yb = xs[i:i + a.batch], ys[i:i + a.batch]
        loss = F.cross_entropy(model(pixel_values=xb).logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step} loss {np.mean(losses[-50:]):.4f} {time.time() - t0:.0f} s", flush=True)
    train_s = time.time() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        xt = tensors(xte)
        for s in range(0, len(xt), 500):
            correct += int((model(pixel_values=xt[s:s + 500]).logits.argmax(-1).numpy() == yte[s:s + 500]).sum())
    acc = correct / len(yte)
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(a.out)
    (a.out / "preprocessor_config.json").write_text(json.dumps(PRE, indent=2))
    res = {"parent": str(a.out), "params": sum(p.numel() for p in model.parameters()), "steps": a.steps,
           "batch": a.batch, "images_seen": a.steps * a.batch, "distinct_images": n, "lr": a.lr,
           "final_train_loss_50": float(np.mean(losses[-50:])), "test_accuracy": acc, "test_images": len(yte),
           "train_seconds": round(train_s, 1), "threads": a.threads, "load_start": round(load0, 2),
           "load_end": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
