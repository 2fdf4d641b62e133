"""Verification: how much of the parent survived in the child, measured on held-out text and
compared with a random-init child of the same shape so the numbers mean something.

Causal LMs: loss and perplexity of parent, child and random child, and the KL divergence of
the child's next-token distribution from the parent's. Encoders: how well the child keeps the
parent's pairwise cosine similarities of mean-pooled embeddings (Pearson and Spearman). The
parent runs one block at a time (shrinkit.calibrate.BlockModel), as in calibration.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .calibrate import BlockModel
from .checkpoint.reader import Checkpoint, open_checkpoint
from .errors import UsageError
from .families import family_for
from .recipe import Calibration


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    d = a.norm() * b.norm()
    return float((a @ b) / d) if d > 0 else 0.0


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    rank = lambda x: torch.argsort(torch.argsort(x)).double()
    return _pearson(rank(a), rank(b))


def _pairwise(e: torch.Tensor) -> torch.Tensor:
    e = F.normalize(e.double(), dim=-1)
    iu = torch.triu_indices(len(e), len(e), 1)
    return (e @ e.T)[iu[0], iu[1]]


def _load_child(child: Path, auto: str, device, random_init: bool, seed: int, attn: str = "sdpa"):
    import transformers

    transformers.utils.logging.disable_progress_bar()

    cls = getattr(transformers, auto)
    if random_init:
        cfg = transformers.AutoConfig.from_pretrained(str(child))
        torch.manual_seed(seed)
        m = cls.from_config(cfg, dtype=torch.float32, attn_implementation=attn)
    else:
        m = cls.from_pretrained(str(child), dtype=torch.float32, attn_implementation=attn)
    return m.to(device).eval()


def verify_child(parent: Checkpoint | str | Path, child: str | Path, spec: Calibration | None = None, *,
                 device: str = "cpu", tokenizer=None, seed: int = 0, scratch: str | Path | None = None) -> dict:
    ckpt = parent if isinstance(parent, Checkpoint) else open_checkpoint(parent)
    spec = spec or Calibration(samples=16, seq_len=256, batch_size=4)
    note = None
    fam = family_for(ckpt.config)
    if spec.data == "builtin" and not fam.has_data_source(ckpt.root, tokenizer):
        spec = spec.model_copy(update={"data": fam.random_data})
        note = f"the parent has no data source for builtin data: verified on {fam.random_data.replace('_', ' ')}"
    dims = fam.dims(ckpt.config)
    vocab = dims.vocab_size
    ids = fam.calibration_inputs(ckpt, spec, dims, seed=seed, split="heldout", tokenizer=tokenizer)
    bm = BlockModel(ckpt, fam, device, scratch)
    h = bm.embed(ids, spec.batch_size)
    bm.run_layers(h, spec.batch_size)
    dev = bm.device
    out = {"data": spec.data, "samples": spec.samples, "seq_len": spec.seq_len, "tokens": h.shape[0] * h.shape[1],
           "inputs": fam.describe_inputs(ids)}
    if note:
        out["note"] = note
    child = Path(child)
    models = {"child": _load_child(child, bm.ad.auto, dev, False, seed, bm.ad.attn),
              "random_init": _load_child(child, bm.ad.auto, dev, True, seed, bm.ad.attn)}
    with torch.no_grad():
        if bm.ad.causal:
            out["kind"] = "causal_lm"
            norm, head = bm.final_norm(), bm.head()
            for m in (norm, head):
                bm.load(m)
            tot = {k: {"nll": 0.0, "kl": 0.0} for k in ("parent", *models)}
            n_pred, n_pos = 0, 0
            step = bm.micro(spec.batch_size, ids.shape[1], vocab)  # logits are the widest
            for s in range(0, len(ids), step):
                x = ids[s:s + step].to(dev)
                lp = F.log_softmax(fam.logits(bm, h[s:s + step].to(dev)).float(), -1)
                logps = {"parent": lp}
                for k, m in models.items():
                    logps[k] = F.log_softmax(m(input_ids=x).logits.float(), -1)
                tgt = x[:, 1:].reshape(-1)
                for k, l in logps.items():
                    tot[k]["nll"] += float(F.nll_loss(l[:, :-1].reshape(-1, l.shape[-1]), tgt, reduction="sum"))
                    if k != "parent":
                        tot[k]["kl"] += float((lp.exp() * (lp - l)).sum())
                n_pred += tgt.numel()
                n_pos += x.numel()
            for k, v in tot.items():
                loss = v["nll"] / n_pred
                out[k] = {"loss": loss, "perplexity": math.exp(min(loss, 700))}
                if k != "parent":
                    out[k]["kl"] = v["kl"] / n_pos
        else:
            out["kind"] = "encoder"
            ad = bm.ad
            out["pool"] = ad.pool
            norm, head = bm.final_norm(), bm.head()
            for m in (norm, head):
                if m is not None:
                    bm.load(m)
            step = bm.micro(spec.batch_size, h.shape[1])
            pooled, top = [], []
            for s in range(0, len(h), step):
                x = h[s:s + step].to(dev)
                x = norm(x) if norm is not None else x
                p = _pool(x, ad.pool)
                pooled.append(p.float().cpu())
                if head is not None:
                    top.append(head(p).float().argmax(-1).cpu())
            ref = _pairwise(torch.cat(pooled))
            ref_top = torch.cat(top) if top else None
            for k, m in models.items():
                emb, preds = [], []
                for s in range(0, len(ids), step):
                    x = {ad.input_name: ids[s:s + step].to(dev), **ad.call_kwargs}
                    emb.append(_pool(m.base_model(**x).last_hidden_state.float(), ad.pool).cpu())
                    if ref_top is not None:
                        preds.append(m(**x).logits.float().argmax(-1).cpu())
                sims = _pairwise(torch.cat(emb))
                out[k] = {"similarity_pearson": _pearson(sims, ref), "similarity_spearman": _spearman(sims, ref)}
                if ref_top is not None:
                    out[k]["top1_agreement"] = float((torch.cat(preds) == ref_top).double().mean())
    out["table"] = table(out)
    return out


def _pool(x: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, H] -> [B, H]: the mean over positions, or the first (CLS) position."""
    return x[:, 0] if how == "first" else x.mean(1)


def table(v: dict) -> list[str]:
    if v["kind"] == "causal_lm":
        rows = ["| model | loss | perplexity | KL(parent ‖ model) |", "|---|---:|---:|---:|"]
        for k in ("parent", "child", "random_init"):
            r = v[k]
            kl = f"{r['kl']:.4f}" if "kl" in r else "0"
            rows.append(f"| {k} | {r['loss']:.4f} | {r['perplexity']:.2f} | {kl} |")
    else:
        top = "top1_agreement" in v["child"]
        rows = ["| model | similarity Pearson r | similarity Spearman ρ |" + (" top-1 agreement |" if top else ""),
                "|---|---:|---:|" + ("---:|" if top else ""),
                "| parent | 1.0000 | 1.0000 |" + (" 1.0000 |" if top else "")]
        for k in ("child", "random_init"):
            r = v[k]
            rows.append(f"| {k} | {r['similarity_pearson']:.4f} | {r['similarity_spearman']:.4f} |"
                        + (f" {r['top1_agreement']:.4f} |" if top else ""))
        if v.get("pool") == "first":
            rows.append("")
            rows.append("Similarities of the first-position (CLS) embeddings after the final norm.")
    rows.append("")
    inputs = v.get("inputs") or f"{v['samples']} x {v['seq_len']} tokens"
    rows.append(f"Held-out data: {v['data']}, {inputs}." + (f" ({v['note']})" if "note" in v else ""))
    return rows


def check_child(child: Path) -> None:
    if not (child / "config.json").is_file():
        raise UsageError(f"child {child} has no config.json; pass the folder that shrinkit subclone wrote")
