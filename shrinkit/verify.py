"""Verification: how much of the parent survived in the child, measured on held-out text and
compared with a random-init child of the same shape so the numbers mean something.

Causal LMs: loss and perplexity of parent, child and random child, and the KL divergence of
the child's next-token distribution from the parent's. Encoders: how well the child keeps the
parent's pairwise cosine similarities of mean-pooled embeddings (Pearson and Spearman).

All three models run one block at a time (shrinkit.calibrate.BlockModel), as in calibration:
the parent and the child from their shards, the random child from blocks drawn with
transformers' own init for that model (its `_init_weights`, seeded per module) and dropped
after use; its vocabulary tables are drawn in row chunks inside the lookup and the head.
Memory therefore stays at one block plus the activations, whatever the model's size.

`structural_check` is the cheap check a data-free run does by default: the written child's
tensors are finite, its names and shapes are the plan's, its config gives the planned shape.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from . import calibrate as C
from .calibrate import BlockModel
from .checkpoint.reader import Checkpoint, open_checkpoint
from .errors import UsageError
from .families import family_for
from .recipe import Calibration

GATE_KEYS = ("max_kl", "max_perplexity_ratio", "min_similarity")
FAILED = ("failed", "gate_missed", "error")   # statuses that make `shrinkit subclone` exit 4


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


# ------------------------------------------------------------------ the random-init child
class RandomBlockModel(BlockModel):
    """A random-init model of the child's shape (read from the child's checkpoint header), run
    block at a time like BlockModel. A module's parameters are materialized in float32 and drawn
    by the model's own `_init_weights` (children first, as transformers' initialize_weights does),
    with the RNG seeded from the run's seed and the module's name, so a block is the same
    whenever it is drawn; they are dropped again by free(). The input embedding and output head
    are never materialized: their rows are drawn CAST_BYTES at a time inside forward."""

    def __init__(self, ckpt: Checkpoint, family, device: str = "cpu", scratch=None, seed: int = 0):
        super().__init__(ckpt, family, device, scratch)
        self.seed = seed
        emb, out = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        # vocabulary tables only (a vision model's input "embedding" is its patch projection)
        self._emb = emb if isinstance(emb, torch.nn.Embedding) else None
        self._out = out if isinstance(out, torch.nn.Linear) and self._emb is not None else None

    def _rng_seed(self, name: str) -> int:
        return zlib.crc32(f"{self.seed}:{name}".encode())

    def table_chunks(self, module: torch.nn.Module):
        """(first row, last row, float32 rows) of a vocabulary table, drawn chunk by chunk. A tied
        head draws the input embedding's chunks (the same tensor)."""
        emb = self._emb
        as_embedding = module is emb or (self.tied and module is self._out)
        name = self._full(emb if as_embedding else module)
        n_rows, width = module.weight.shape
        rows = max(1, C.CAST_BYTES // (width * 4))
        pad = getattr(emb, "padding_idx", None) if as_embedding else None
        for c, r0 in enumerate(range(0, n_rows, rows)):
            r1 = min(n_rows, r0 + rows)
            w = torch.empty(r1 - r0, width, dtype=torch.float32)
            if as_embedding:
                local = pad - r0 if pad is not None and r0 <= pad < r1 else None
                m = torch.nn.Embedding(r1 - r0, width, padding_idx=local, _weight=w)
            else:
                m = torch.nn.Linear(width, r1 - r0, bias=False, device="meta")
                m.weight = torch.nn.Parameter(w, requires_grad=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self._rng_seed(f"{name}#{c}"))
                self.model._init_weights(m)
            yield r0, r1, m.weight.detach().to(self.device)

    def _lookup(self, module):
        def forward(ids: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(*ids.shape, module.weight.shape[1], dtype=torch.float32, device=ids.device)
            for r0, r1, w in self.table_chunks(module):
                m = (ids >= r0) & (ids < r1)
                if bool(m.any()):
                    out[m] = w[ids[m] - r0]
            return out
        return forward

    def _project(self, module):
        def forward(x: torch.Tensor) -> torch.Tensor:
            out = x.new_empty(*x.shape[:-1], module.weight.shape[0])
            for r0, r1, w in self.table_chunks(module):
                out[..., r0:r1] = x @ w.T   # a random head's bias is zero (_init_weights)
            return out
        return forward

    def load(self, module: torch.nn.Module, keep_dtype: bool = False) -> None:
        prefix = self._full(module)
        tables = {id(m) for m in (self._emb, self._out) if m is not None}

        def post_order(m: torch.nn.Module, name: str):
            for n, ch in m.named_children():
                yield from post_order(ch, f"{name}.{n}" if name else n)
            yield name, m

        subs = list(post_order(module, prefix))
        for _, sub in subs:
            if id(sub) in tables:
                sub.forward = self._lookup(sub) if sub is self._emb else self._project(sub)
                continue
            for pname, p in list(sub.named_parameters(recurse=False)):
                sub._parameters[pname] = torch.nn.Parameter(torch.empty(p.shape, dtype=torch.float32),
                                                            requires_grad=False)
        for name, sub in subs:
            if id(sub) in tables:
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self._rng_seed(name))
                self.model._init_weights(sub)
        if self.device.type != "cpu":
            for _, sub in subs:
                if id(sub) in tables:
                    continue
                for pname, p in list(sub.named_parameters(recurse=False)):
                    sub._parameters[pname] = torch.nn.Parameter(p.data.to(self.device), requires_grad=False)


# ------------------------------------------------------------------ verification
def heldout_tokens(ckpt: Checkpoint, spec: Calibration, *, seed: int = 0, tokenizer=None) -> torch.Tensor:
    """The held-out inputs (token windows, or what the family reads) of a verification."""
    fam = family_for(ckpt.config)
    return fam.calibration_inputs(ckpt, spec, fam.dims(ckpt.config), seed=seed, split="heldout", tokenizer=tokenizer)


def _finals(bm: BlockModel, ids: torch.Tensor, batch: int) -> torch.Tensor:
    h = bm.embed(ids, batch)
    return bm.run_layers(h, batch)


def _key_report(bm: BlockModel) -> dict:
    """What transformers' loader would say about this checkpoint (missing / unused keys), as data
    for the report instead of a table on the terminal."""
    tied_head = f"{bm.ad.head}.weight" if bm.tied and bm.ad.head else None
    missing = sorted(n for n, _ in bm.model.named_parameters() if n not in bm._index and n != tied_head)
    used = set(bm._index.values())
    unused = sorted(k for k in bm.ckpt.tensors if k not in used)
    return {k: v for k, v in (("missing", missing), ("unused", unused)) if v}


def verify_child(parent: Checkpoint | str | Path, child: str | Path, spec: Calibration | None = None, *,
                 device: str = "cpu", tokenizer=None, seed: int = 0, scratch: str | Path | None = None,
                 ids: torch.Tensor | None = None, parent_final: torch.Tensor | None = None,
                 gate: dict | None = None, progress=None) -> dict:
    """Verify `child` against `parent` on held-out tokens (`ids`, else made from `spec`).
    parent_final: the parent's final hidden states for `ids` when a calibration pass already
    computed them (then the parent is not run again)."""
    ckpt = parent if isinstance(parent, Checkpoint) else open_checkpoint(parent)
    spec = spec or Calibration(samples=16, seq_len=256, batch_size=4)
    note = None
    fam = family_for(ckpt.config)
    if ids is None:
        if spec.data == "builtin" and not fam.has_data_source(ckpt.root, tokenizer):
            spec = spec.model_copy(update={"data": fam.random_data})
            note = f"the parent has no data source for builtin data: verified on {fam.random_data.replace('_', ' ')}"
        ids = heldout_tokens(ckpt, spec, seed=seed, tokenizer=tokenizer)
    vocab = fam.dims(ckpt.config).vocab_size
    bs = spec.batch_size
    out = {"data": spec.data, "samples": int(ids.shape[0]), "seq_len": spec.seq_len, "inputs": fam.describe_inputs(ids)}
    if note:
        out["note"] = note
    if progress is not None:
        progress.phase(f"verify ({fam.describe_inputs(ids)})", 0)
    bm = BlockModel(ckpt, fam, device, scratch)
    dev = bm.device
    h = parent_final if parent_final is not None else _finals(bm, ids, bs)
    out["tokens"] = int(h.shape[0] * h.shape[1])
    out["parent_pass"] = "shared with calibration" if parent_final is not None else "own"
    child_ck = open_checkpoint(child)
    try:
        cm = BlockModel(child_ck, fam, device, scratch)
        keys = _key_report(cm)
        if keys:
            out["child_keys"] = keys
        rm = RandomBlockModel(child_ck, fam, device, scratch, seed)
        cm._bufs = rm._bufs = bm._bufs   # one set of weight-cast buffers, not one per model
        models = {"parent": bm, "child": cm, "random_init": rm}
        states = {"parent": h, "child": _finals(cm, ids, bs), "random_init": _finals(rm, ids, bs)}
        with torch.no_grad():
            if bm.ad.causal:
                out["kind"] = "causal_lm"
                _causal(out, models, states, ids, bs, vocab, dev)
            else:
                out["kind"] = "encoder"
                out["pool"] = bm.ad.pool
                _encoder(out, models, states, bs, dev)
    finally:
        child_ck.close()
    out["status"] = "ok"
    if gate:
        apply_gate(out, gate)
    out["table"] = table(out)
    return out


def _causal(out: dict, models: dict, states: dict, ids: torch.Tensor, batch: int, vocab: int, dev) -> None:
    parts = {}
    for k, m in models.items():
        norm, head = m.final_norm(), m.head()
        for mod in (norm, head):
            if mod is not None:
                m.load(mod)
        parts[k] = (norm, head)
    try:
        tot = {k: {"nll": 0.0, "kl": 0.0} for k in models}
        T = ids.shape[1]
        flat = ids.reshape(-1)
        tgt_all = torch.full_like(flat, -100)       # position t predicts token t + 1 of its sequence
        tgt_all[:-1] = flat[1:]
        tgt_all[T - 1::T] = -100
        chunk = max(1, C.ACT_BYTES // (vocab * 4))  # positions whose logits exist at once (vocab-wide rows)
        n_pred = n_pos = 0
        for p0 in range(0, flat.numel(), chunk):
            p1 = min(flat.numel(), p0 + chunk)
            tgt = tgt_all[p0:p1].to(dev)
            lp = pp = None
            for k, m in models.items():  # the family's logits (final norm, head, any soft-capping)
                z = states[k].reshape(-1, states[k].shape[-1])[p0:p1][None].to(dev)
                l = F.log_softmax(m.family.logits(m, z).float()[0], -1)
                tot[k]["nll"] += float(F.nll_loss(l, tgt, ignore_index=-100, reduction="sum"))
                if k == "parent":
                    lp, pp = l, l.exp()
                else:   # pp * (lp - l), in place in l's storage: no further vocabulary-wide temporaries
                    tot[k]["kl"] += float(l.neg_().add_(lp).mul_(pp).sum())
                del l
            n_pred += int((tgt != -100).sum())
            n_pos += p1 - p0
    finally:
        for k, m in models.items():
            for mod in parts[k]:
                if mod is not None:
                    m.free(mod)
    for k, v in tot.items():
        loss = v["nll"] / n_pred
        out[k] = {"loss": loss, "perplexity": math.exp(min(loss, 700))}
        if k != "parent":
            out[k]["kl"] = v["kl"] / n_pos


def _pool(x: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, H] -> [B, H]: the mean over positions, or the first (CLS) position."""
    return x[:, 0] if how == "first" else x.mean(1)


def _encoder(out: dict, models: dict, states: dict, batch: int, dev) -> None:
    """Pairwise cosine similarities of pooled embeddings (after the final norm, if any) against
    the parent's, and top-1 agreement where the model has a classification head."""
    pooled, tops = {}, {}
    for k, m in models.items():
        norm, head = m.final_norm(), m.head()
        for mod in (norm, head):
            if mod is not None:
                m.load(mod)
        try:
            step = m.micro(batch, states[k].shape[1])
            emb, top = [], []
            for s in range(0, len(states[k]), step):
                x = states[k][s:s + step].to(dev)
                p = _pool(norm(x) if norm is not None else x, m.ad.pool)
                emb.append(p.float().cpu())
                if head is not None:
                    top.append(head(p).float().argmax(-1).cpu())
        finally:
            for mod in (norm, head):
                if mod is not None:
                    m.free(mod)
        pooled[k], tops[k] = torch.cat(emb), (torch.cat(top) if top else None)
    ref = _pairwise(pooled["parent"])
    for k in ("child", "random_init"):
        sims = _pairwise(pooled[k])
        out[k] = {"similarity_pearson": _pearson(sims, ref), "similarity_spearman": _spearman(sims, ref)}
        if tops["parent"] is not None and tops[k] is not None:
            out[k]["top1_agreement"] = float((tops[k] == tops["parent"]).double().mean())


def apply_gate(v: dict, gate: dict) -> None:
    """Mark the result against the recipe's limits: status gate_missed and the misses listed."""
    missed = []
    if v["kind"] == "causal_lm":
        c = v["child"]
        if gate.get("max_kl") is not None and not c["kl"] <= gate["max_kl"]:
            missed.append(f"child KL {c['kl']:.4g} > max_kl {gate['max_kl']:g}")
        r = gate.get("max_perplexity_ratio")
        if r is not None:
            ratio = c["perplexity"] / v["parent"]["perplexity"]
            v["perplexity_ratio"] = ratio
            if not ratio <= r:
                missed.append(f"child perplexity {ratio:.4g}x the parent's > max_perplexity_ratio {r:g}")
    else:
        s = gate.get("min_similarity")
        if s is not None and not v["child"]["similarity_pearson"] >= s:
            missed.append(f"child similarity r {v['child']['similarity_pearson']:.4f} < min_similarity {s:g}")
    v["gate"] = {"limits": dict(gate), "missed": missed, "passed": not missed}
    if missed:
        v["status"] = "gate_missed"


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
    if "gate" in v:
        g = v["gate"]
        limits = ", ".join(f"{k} {x:g}" for k, x in g["limits"].items())
        rows.append(f"Gate ({limits}): " + ("met." if not g["missed"] else "MISSED: " + "; ".join(g["missed"]) + "."))
    return rows


# ------------------------------------------------------------------ the cheap check
FINITE_CHUNK = 1 << 20  # elements checked at a time (bounds the temporaries)


def structural_check(child: str | Path, expected: dict[str, tuple], child_dims: dict | None = None) -> dict:
    """The written child, read back: every planned tensor present with its planned shape and dtype
    and nothing else, every float tensor finite, and config.json giving the planned shape.
    expected: tensor name -> (shape, dtype)."""
    problems: list[str] = []
    n_float = 0
    with open_checkpoint(child) as ck:
        names = set(ck.tensors)
        missing = sorted(set(expected) - names)
        extra = sorted(names - set(expected))
        if missing:
            problems.append(f"{len(missing)} planned tensors missing (first: {missing[0]})")
        if extra:
            problems.append(f"{len(extra)} tensors not in the plan (first: {extra[0]})")
        for name in sorted(names & set(expected)):
            info = ck.tensors[name]
            shape, dtype = expected[name]
            if tuple(info.shape) != tuple(shape) or info.dtype != dtype:
                problems.append(f"{name} is {list(info.shape)} {info.dtype}, planned {list(shape)} {dtype}")
                continue
            if not info.dtype.is_floating_point:
                continue
            n_float += 1
            flat = ck.get(name).reshape(-1)
            for i in range(0, flat.numel(), FINITE_CHUNK):
                if not bool(torch.isfinite(flat[i:i + FINITE_CHUNK]).all()):
                    problems.append(f"{name} holds NaN or inf values")
                    break
        cfg = ck.config
        try:
            dims = family_for(cfg).dims(cfg).as_dict()
        except Exception as e:  # noqa: BLE001 - reported, not raised
            problems.append(f"config.json does not give a shape ({e})")
            dims = None
        if dims is not None and child_dims is not None and dims != child_dims:
            diff = [k for k in dims if dims[k] != child_dims.get(k)]
            problems.append(f"config.json gives {', '.join(f'{k}={dims[k]}' for k in diff)}, planned "
                            f"{', '.join(f'{k}={child_dims.get(k)}' for k in diff)}")
    out = {"kind": "structural", "tensors": len(names), "float_tensors_finite": n_float,
           "status": "failed" if problems else "ok", "problems": problems}
    out["table"] = structural_table(out)
    return out


def structural_table(v: dict) -> list[str]:
    if v["status"] == "ok":
        rows = [f"Structural check passed: {v['tensors']} tensors as planned, all finite; config.json gives the planned shape."]
    else:
        rows = ["Structural check FAILED: " + "; ".join(v["problems"]) + "."]
    if v.get("how_to_verify"):
        rows.append(f"No forward pass was run (data-free recipe). Full check on held-out text: `{v['how_to_verify']}` "
                    "(or add `verify: {}` to the recipe).")
    return rows


def check_child(child: Path) -> None:
    if not (child / "config.json").is_file():
        raise UsageError(f"child {child} has no config.json; pass the folder that shrinkit subclone wrote")


def error_result(e: BaseException) -> dict:
    msg = f"{type(e).__name__}: {e}".strip()
    return {"kind": "error", "status": "error", "error": msg,
            "table": [f"Verification FAILED with an error ({msg}); the child was written and kept."]}

