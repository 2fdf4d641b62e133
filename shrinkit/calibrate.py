"""Calibration: run the parent one block at a time (shrinkit.runtime) over calibration inputs and
record activation statistics, in memory bounded by one block plus the activations plus the
embedding."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint.reader import Checkpoint
from .families.spaces import HEAD, Space
from .plan import Plan
from .runtime import BlockModel
from .specs import Calibration
from .scores import Scores, add_score

# ------------------------------------------------------------------ statistics
@dataclass
class CalibStats:
    # (space, key) -> mean statistic per unit: the residual stream's mean |x| (hidden), each
    # observed module's mean |input| per index (ffn, ...) or each head's mean contribution
    # |O_h z_h| to the residual stream (head spaces); keys as in Plan.kept
    scores: dict = field(default_factory=dict)
    influence: list[float] = field(default_factory=list)    # Block Influence per layer
    tokens: int = 0
    extra_final: torch.Tensor | None = None                 # final hidden states of extra_ids (unobserved)

    def by_space(self, space: Space) -> dict:
        """key -> statistic for one space (a global space's only key is None)."""
        return {k: v for (sp, k), v in self.scores.items() if sp is space}


class Observer:
    def __init__(self, bm: BlockModel, dims, n_layers: int):
        self.bm = bm
        self.dims = dims
        self.hd = dims.head_dim
        self.st = CalibStats()
        self._bi = [0.0] * n_layers
        self._n = [0] * n_layers
        self.n_layers = n_layers
        self.active = True   # False while samples that are not calibration data pass

    def record(self, space: Space, key, v: torch.Tensor) -> None:
        if not self.active:  # samples riding along unobserved (held-out windows)
            return
        add_score(self.st.scores, space, key, v)

    def _modules(self, layer, path: str):
        """(expert or None, module) for an observe path ("{expert}": every expert present). A
        path this block lacks gives nothing (blocks may differ: dense and MoE layers)."""
        if "{expert}" not in path:
            try:
                return [(None, layer.get_submodule(path))]
            except AttributeError:
                return []
        out = []
        for e in range(self.dims.num_experts or 0):
            try:
                out.append((e, layer.get_submodule(path.format(expert=e))))
            except AttributeError:
                pass
        return out

    def attach(self, i: int, layer) -> list:
        hooks = []
        for space, path in self.bm.ad.observe.items():
            for e, mod in self._modules(layer, path):
                key = space.key(i, e)
                fn = self._on_heads(space, key) if space.unit == HEAD else self._on_index(space, key)
                hooks.append(mod.register_forward_pre_hook(fn))
        return hooks + self.bm.family.observers(self.bm, i, layer, self.record)

    def _on_index(self, space: Space, key):
        def hook(mod, args):
            if not self.active:
                return
            a = args[0].detach()
            self.record(space, key, a.abs().reshape(-1, a.shape[-1]).sum(0).double())
        return hook

    def _on_heads(self, space: Space, key):
        nh, in_first = space.units(self.dims), self.bm.ad.in_first

        def hook(mod, args):
            # each head's contribution to the residual stream: |O_h z_h| per token
            if not self.active:
                return
            z = args[0].detach()
            z = z.reshape(-1, nh, self.hd).transpose(0, 1)                 # [heads, T, hd]
            w = mod.weight                                                  # as stored
            H = w.shape[1] if in_first else w.shape[0]
            contrib = torch.zeros(nh, dtype=torch.float64, device=z.device)
            group = max(1, min(nh, self.bm.budget.cast_bytes // (4 * self.hd * H)))       # heads cast to float32 at once
            for h0 in range(0, nh, group):
                h1 = min(nh, h0 + group)
                rows = w[h0 * self.hd:h1 * self.hd] if in_first else w[:, h0 * self.hd:h1 * self.hd].T
                wh = rows.to(z.dtype).reshape(h1 - h0, self.hd, H)          # [g, hd, H]
                step = max(1, self.bm.budget.act_bytes // (4 * (h1 - h0) * H))
                for t0 in range(0, z.shape[1], step):
                    contrib[h0:h1] += torch.bmm(z[h0:h1, t0:t0 + step], wh).norm(dim=-1).sum(1).double()
            self.record(space, key, contrib)
        return hook

    def residual(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.record(Space.HIDDEN, None, x.abs().reshape(-1, x.shape[-1]).sum(0).double())
        if i == self.n_layers - 1:
            self.st.scores[(Space.HIDDEN, None)] += y.abs().reshape(-1, y.shape[-1]).sum(0).double()
        cos = torch.nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), dim=-1)
        self._bi[i] += float((1 - cos.double()).sum())
        self._n[i] += cos.numel()

    def finish(self) -> CalibStats:
        n = max(self._n[0], 1)
        self.st.tokens = n
        self.st.scores = {k: (v / n).cpu() for k, v in self.st.scores.items()}   # sums stayed on the device
        self.st.influence = [b / max(c, 1) for b, c in zip(self._bi, self._n)]
        return self.st


def calibrate(ckpt: Checkpoint, plan: Plan, spec: Calibration, *, seed: int = 0, progress=None,
              device: str = "cpu", tokenizer=None, scratch: str | Path | None = None,
              ids: torch.Tensor | None = None, extra_ids: torch.Tensor | None = None) -> CalibStats:
    """Activation statistics of the parent over the calibration tokens, one block at a time.
    scratch: folder for the activations' backing file (default: the system's temporary folder).
    ids: the calibration inputs when already made (else from spec). extra_ids: more samples of
    the same length that ride along unobserved (verification's held-out windows: one parent pass
    for both); their final hidden states come back as stats.extra_final."""
    if ids is None:
        ids = plan.family.calibration_inputs(ckpt, spec, plan.parent, seed=seed, tokenizer=tokenizer)
    n = len(ids)
    if extra_ids is not None:
        ids = torch.cat([ids, extra_ids])
    bm = BlockModel(ckpt, plan.family, device, scratch)
    if progress is not None:
        more = f" + {len(extra_ids)} held-out" if extra_ids is not None else ""
        progress.phase(f"calibrate ({plan.family.describe_inputs(ids[:n])}{more})",
                       bm.total_bytes())
    h = bm.embed(ids, spec.batch_size)
    obs = Observer(bm, plan.parent, len(bm.layers))
    h = bm.run_layers(h, spec.batch_size, obs, progress, observe_n=n)
    st = obs.finish()
    if extra_ids is not None:
        st.extra_final = bm.stream(tuple(h[n:].shape))
        st.extra_final.copy_(h[n:])
    return st


def activation_scores(stats: CalibStats, plan: Plan, need: set[Space]) -> Scores:
    return {k: v for k, v in stats.scores.items() if k[0] in need}


def layer_influence(stats: CalibStats) -> list[float]:
    return list(stats.influence)
