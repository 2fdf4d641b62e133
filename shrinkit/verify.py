"""Verification: how much of the parent survived in the child, measured on held-out text and
compared with a random-init child of the same shape so the numbers mean something.

Causal LMs: loss and perplexity of parent, child and random child, and the KL divergence of
the child's next-token distribution from the parent's. Encoders: how well the child keeps the
parent's pairwise cosine similarities of mean-pooled embeddings (Pearson and Spearman).

All three models run one block at a time (shrinkit.runtime.BlockModel), as in calibration:
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

from . import runtime as C
from .runtime import BlockModel
from .checkpoint.reader import Checkpoint, open_checkpoint
from .errors import UsageError
from .families import family_for
from .specs import Calibration

TABLE_BYTES = 1 << 20    # float32 bytes of a random vocabulary table drawn at a time (one vocabulary chunk)
LOGITS_BYTES = 4 << 20   # float32 bytes of one model's logits chunk (positions x vocabulary rows)
GATE_KEYS = ("max_kl", "max_perplexity_ratio", "min_similarity")
FAILED = ("failed", "gate_missed", "error")   # statuses that make `shrinkit subclone` exit 4


def _table_rows(width: int) -> int:
    """Vocabulary rows of `width` floats in TABLE_BYTES: a random table's draw chunk, and the
    vocabulary chunk of the logits."""
    return max(1, TABLE_BYTES // (width * 4))


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
    block at a time like BlockModel. A module's parameters are materialized in float32 (linear
    weights in a scratch-file mapping, like the calibration's activations) and drawn
    by the model's own `_init_weights` (children first, as transformers' initialize_weights does),
    with the RNG seeded from the run's seed and the module's name, so a block is the same
    whenever it is drawn; they are dropped again by free(). The input embedding and output head
    are never materialized: their rows are drawn TABLE_BYTES at a time inside forward."""

    def __init__(self, ckpt: Checkpoint, family, device: str = "cpu", scratch=None, seed: int = 0):
        super().__init__(ckpt, family, device, scratch)
        self.seed = seed
        try:
            emb = self.model.get_input_embeddings()
        except NotImplementedError:   # no input embedding module at all (a convolutional stem)
            emb = None
        out = self.model.get_output_embeddings()
        # vocabulary tables only (a vision model's input "embedding" is its patch projection)
        self._emb = emb if isinstance(emb, torch.nn.Embedding) else None
        self._out = out if isinstance(out, torch.nn.Linear) and self._emb is not None else None

    def _rng_seed(self, name: str) -> int:
        return zlib.crc32(f"{self.seed}:{name}".encode())

    def table_rows(self, module: torch.nn.Module) -> int:
        """Rows of a vocabulary table drawn at a time (each chunk seeded on its own)."""
        return _table_rows(module.weight.shape[1])

    def table_chunk(self, module: torch.nn.Module, c: int) -> torch.Tensor:
        """Chunk c (rows c * table_rows ... ) of a vocabulary table, float32, drawn by the model's
        own _init_weights with the RNG seeded from the run's seed, the table's name and c. A tied
        head draws the input embedding's chunks (the same tensor)."""
        emb = self._emb
        as_embedding = module is emb or (self.tied and module is self._out)
        name = self.name_of(emb if as_embedding else module)
        n_rows, width = module.weight.shape
        rows = self.table_rows(module)
        r0, r1 = c * rows, min(n_rows, (c + 1) * rows)
        w = torch.empty(r1 - r0, width, dtype=torch.float32)
        if as_embedding:
            pad = getattr(emb, "padding_idx", None)
            local = pad - r0 if pad is not None and r0 <= pad < r1 else None
            m = torch.nn.Embedding(r1 - r0, width, padding_idx=local, _weight=w)
        else:
            m = torch.nn.Linear(width, r1 - r0, bias=False, device="meta")
            m.weight = torch.nn.Parameter(w, requires_grad=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._rng_seed(f"{name}#{c}"))
            self.model._init_weights(m)
        return m.weight.detach().to(self.device)

    def table_chunks(self, module: torch.nn.Module):
        """(first row, last row, float32 rows) of a vocabulary table, drawn chunk by chunk."""
        n_rows, rows = module.weight.shape[0], self.table_rows(module)
        for c, r0 in enumerate(range(0, n_rows, rows)):
            yield r0, min(n_rows, r0 + rows), self.table_chunk(module, c)

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
        prefix = self.name_of(module)
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
            stream = C.streamed(sub)
            for pname, p in list(sub.named_parameters(recurse=False)):
                # a linear weight is drawn into a scratch-file mapping (page cache the kernel can
                # write back, as the calibration's residual stream): the block's largest tensors
                # do not grow the process's own memory with the model's width
                big = stream and pname == "weight" and self.device.type == "cpu"
                t = C.activation_buffer(tuple(p.shape), self.scratch) if big else torch.empty(p.shape, dtype=torch.float32)
                sub._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)
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
    index = bm.index
    missing = sorted(n for n, _ in bm.model.named_parameters() if n not in index and n != tied_head)
    used = set(index.values())
    unused = sorted(k for k in bm.ckpt.tensors if k not in used)
    return {k: v for k, v in (("missing", missing), ("unused", unused)) if v}


def verify_child(parent: Checkpoint | str | Path, child: Checkpoint | str | Path, spec: Calibration | None = None, *,
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
    child_ck = child if isinstance(child, Checkpoint) else open_checkpoint(child)
    try:
        problems = runtime_problems(fam, ckpt, child_ck)
        cm = BlockModel(child_ck, fam, device, scratch)
        keys = _key_report(cm)
        if keys:
            out["child_keys"] = keys
        rm = RandomBlockModel(child_ck, fam, device, scratch, seed)
        if problems:   # measure it anyway, with transformers' reference (eager) experts
            out["runtime_problems"] = problems
            for m in (cm, rm):
                m.model.set_experts_implementation("eager")
        cm.share_buffers(bm)
        rm.share_buffers(bm)   # one set of weight-cast buffers, not one per model
        models = {"parent": bm, "child": cm, "random_init": rm}
        states = {"parent": h, "child": _finals(cm, ids, bs), "random_init": _finals(rm, ids, bs)}
        with torch.no_grad():
            if bm.ad.causal:
                out["kind"] = "causal_lm"
                _causal(out, models, states, ids, bs, dev)
            else:
                out["kind"] = "encoder"
                out["pool"] = bm.ad.pool
                _encoder(out, models, states, bs, dev)
    finally:
        if child_ck is not child:
            child_ck.close()
    out["status"] = "ok"
    if gate:
        apply_gate(out, gate)
    if out.get("runtime_problems"):
        out["status"] = "failed"
    out["table"] = table(out)
    return out


def runtime_problems(fam, parent: Checkpoint, child: Checkpoint) -> list[str]:
    """What keeps transformers from running the child as loaded (the family's runtime
    constraints, Family.runtime): a child written before shrinkit refused such shapes."""
    pd, cd = fam.dims(parent.config), fam.dims(child.config)
    return [f"{c.dim} {v}: {c.why}" for c, v in fam.runtime_problems(cd, pd)]


def _rows_head(m: BlockModel, head: torch.nn.Module, rows: list):
    """forward() of a loaded head that computes only vocabulary rows rows[0]:rows[1]: the
    stored weight's rows cast to float32 (a random model's: that chunk drawn)."""
    if isinstance(m, RandomBlockModel) and head is m._out:
        def forward(x):
            r0, r1 = rows
            n = m.table_rows(head)
            assert r0 % n == 0 and r1 - r0 <= n, "vocabulary chunks follow the random table's chunks"
            return x @ m.table_chunk(head, r0 // n).T   # a random head's bias is zero (_init_weights)
        return forward

    def forward(x):
        r0, r1 = rows
        w = head.weight[r0:r1].to(device=x.device, dtype=x.dtype)
        b = head.bias[r0:r1].to(x.dtype) if getattr(head, "bias", None) is not None else None
        return F.linear(x, w, b)
    return forward


def _once(norm: torch.nn.Module):
    """forward() of a loaded final norm that returns its last output again for the same input
    tensor (the logits of one block of positions are computed vocabulary chunk by chunk)."""
    f, last = norm.forward, [None, None]

    def forward(x):
        if last[0] is not x:
            last[0], last[1] = x, f(x)
        return last[1]
    return forward


def _causal(out: dict, models: dict, states: dict, ids: torch.Tensor, batch: int, dev) -> None:
    """Loss and perplexity of each model and KL(parent || model), with the logits computed a
    block of positions by a chunk of vocabulary rows at a time (LOGITS_BYTES each): per position
    an online log-sum-exp (running maximum and sum) for every model, the target's logit, and
    for the parent against each model sum_v exp(zp_v - mp) (zp_v - z_v), rescaled as the
    maximum moves. Then loss = lse - z[target], KL = E_p[zp - z] - lse_p + lse. No
    vocabulary-wide row is ever held, and each head's weights are cast (or drawn) once per
    block of positions."""
    parts, rows = {}, [0, 0]
    for k, m in models.items():
        norm, head = m.final_norm(), m.head()
        for mod in (norm, head):
            if mod is not None:
                m.load(mod)
        parts[k] = (norm, head)
    try:
        heads = {k: parts[k][1] for k in models}
        n_vocab = {int(h.weight.shape[0]) for h in heads.values()}
        if len(n_vocab) != 1:
            raise ValueError(f"the models' output heads differ in size ({sorted(n_vocab)})")
        V = n_vocab.pop()
        rm = models.get("random_init")
        R = rm.table_rows(heads["random_init"]) if isinstance(rm, RandomBlockModel) and rm._out is not None \
            else _table_rows(heads["parent"].weight.shape[1])
        R = min(R, V)
        for k, m in models.items():
            norm, head = parts[k]
            head.forward = _rows_head(m, head, rows)
            if norm is not None:
                norm.forward = _once(norm)
        T = ids.shape[1]
        flat = ids.reshape(-1)
        N = flat.numel()
        tgt_all = torch.full_like(flat, -100)       # position t predicts token t + 1 of its sequence
        tgt_all[:-1] = flat[1:]
        tgt_all[T - 1::T] = -100
        P = max(1, LOGITS_BYTES // (R * 4))          # positions per block
        others = [k for k in models if k != "parent"]
        tot = {k: {"nll": 0.0, "kl": 0.0} for k in models}
        f64 = torch.float64
        for p0 in range(0, N, P):
            p1 = min(N, p0 + P)
            n = p1 - p0
            tgt = tgt_all[p0:p1].to(dev)
            valid = tgt != -100
            z_in = {k: states[k].reshape(-1, states[k].shape[-1])[p0:p1][None].to(dev) for k in models}
            mx = {k: torch.full((n,), -math.inf, dtype=torch.float32, device=dev) for k in models}
            sm = {k: torch.zeros(n, dtype=f64, device=dev) for k in models}
            zt = {k: torch.zeros(n, dtype=torch.float32, device=dev) for k in models}
            cross = {k: torch.zeros(n, dtype=f64, device=dev) for k in others}
            for r0 in range(0, V, R):
                r1 = min(V, r0 + R)
                rows[0], rows[1] = r0, r1
                z = {k: m.family.logits(m, z_in[k]).float()[0] for k, m in models.items()}   # [n, r1 - r0]
                hit = valid & (tgt >= r0) & (tgt < r1)
                if bool(hit.any()):
                    idx = (tgt[hit] - r0)[:, None]
                    for k in models:
                        zt[k][hit] = z[k][hit].gather(1, idx)[:, 0]
                for k in others + ["parent"]:   # the parent last: its cross terms overwrite the others' chunks
                    new = torch.maximum(mx[k], z[k].amax(1))
                    scale = (mx[k] - new).exp().to(f64)
                    e = (z[k] - new[:, None]).exp_()
                    sm[k].mul_(scale).add_(e.sum(1, dtype=f64))
                    if k == "parent":
                        for o in others:   # sum exp(zp - mp) (zp - z_o): in place in z_o's chunk
                            cross[o].mul_(scale).add_(z[o].neg_().add_(z["parent"]).mul_(e).sum(1, dtype=f64))
                    mx[k] = new
                    del e
                del z
            lse = {k: mx[k].to(f64) + sm[k].log() for k in models}
            for k in models:
                tot[k]["nll"] += float((lse[k] - zt[k].to(f64))[valid].sum())
                if k != "parent":
                    tot[k]["kl"] += float((cross[k] / sm["parent"] - lse["parent"] + lse[k]).sum())
        n_pred = int((tgt_all != -100).sum())
        n_pos = N
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
    """[B, T, H] -> [B, H]: the mean over positions, the first (CLS) or the last position."""
    return x[:, 0] if how == "first" else x[:, -1] if how == "last" else x.mean(1)


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
        where = {"first": "first-position (CLS)", "last": "last-position"}.get(v.get("pool"))
        if where:
            rows.append("")
            rows.append(f"Similarities of the {where} embeddings after the final norm.")
    rows.append("")
    inputs = v.get("inputs") or f"{v['samples']} x {v['seq_len']} tokens"
    rows.append(f"Held-out data: {v['data']}, {inputs}." + (f" ({v['note']})" if "note" in v else ""))
    if v.get("runtime_problems"):
        rows.append("FAILED: transformers cannot run this child as loaded (" + "; ".join(v["runtime_problems"])
                    + "); measured with experts_implementation=\"eager\". Re-cut it to a valid size, or load it "
                    "with from_pretrained(..., experts_implementation=\"eager\").")
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


def heldout_spec(fam, cfg: dict, data: str, samples: int, seq_len: int | None, batch_size: int,
                 whose: str = "the parent's") -> Calibration:
    """`shrinkit verify`'s held-out data: seq_len defaults to 256, or the model's maximum positions
    when fewer; a longer explicit one is a UsageError."""
    mp = fam.max_positions(cfg)
    if seq_len is not None and mp is not None and seq_len > mp:
        raise UsageError(f"--seq-len {seq_len} is longer than {whose} {mp} positions; use {mp} or less")
    n = seq_len or (min(256, mp) if mp else 256)
    return Calibration(data=data, samples=samples, seq_len=n, batch_size=batch_size)


def check_child(child: Path) -> None:
    if not (child / "config.json").is_file():
        raise UsageError(f"child {child} has no config.json; pass the folder that shrinkit subclone wrote")


def error_result(e: BaseException) -> dict:
    msg = f"{type(e).__name__}: {e}".strip()
    return {"kind": "error", "status": "error", "error": msg,
            "table": [f"Verification FAILED with an error ({msg}); the child was written and kept."]}

