"""rotate_hidden: instead of keeping a subset of the residual stream's dims, keep its top-d
principal directions.

The parent runs over the calibration tokens one block at a time; the covariance of the
RMS-normalized residual stream (each token divided by its RMS, so that massive-activation
tokens do not decide the basis), summed over the input of every layer and the final norm's
input, gives one global orthonormal basis (its eigenvectors, by decreasing eigenvalue). With
RMSNorm the rotation is exact: every norm's scale is folded into the linear layers that read
it, the residual stream is rotated (embeddings and writers x Q, readers x Q), an orthogonal
rotation leaves every token's RMS unchanged, and the norms of the rotated model are plain.
Keeping the first d directions cuts the hidden size to d; the child's norm scales are then
sqrt(D / d), since the RMS over d dims of what is kept is about sqrt(D / d) times the RMS over
all D. A tied head cannot take the final norm's scale (the embedding reads no norm), so the
child of a tied parent gets an untied head (vocab x d more parameters; plan and report say
so). The child is a plain model of the parent's family.

LayerNorm families are refused: a LayerNorm subtracts each token's mean, which a rotation does
not commute with unless the mean is folded into the writers first (not done here).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from ..checkpoint.reader import Checkpoint
from ..errors import RecipeError
from ..families.spaces import Space
from ..plan import Plan, match_rule, tensor_key
from ..specs import Calibration, Strict
from .base import Read, Stage, data_what


class RotateHidden(Strict):
    """Keep the top principal directions of the residual stream instead of a subset of its dims."""
    method: Literal["pca"] = "pca"
    calibration: Optional[Calibration] = None   # default: the recipe's top-level calibration


def check_rotatable(plan: Plan) -> None:
    fam = plan.family
    if fam.norm != "rms" or not fam.norm_readers or fam.block is None:
        why = ("uses LayerNorm, whose mean-centering does not commute with a rotation" if fam.norm == "layer"
               else "has no norm-reader description for folding its norm scales")
        from .rank import STAGE as RANK
        raise RecipeError(f"{STAGE.name} needs an RMSNorm family whose norm scales can be folded; {fam.name} {why}; "
                          f"remove {STAGE.name} and let {RANK.name} pick the hidden dims")


def _ends(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def folds(ckpt: Checkpoint, plan: Plan) -> dict:
    """Child reader tensor name -> the float32 scale of the norm it reads (per layer)."""
    fam = plan.family
    norms = {}
    for info in ckpt.tensors.values():
        rule, m = match_rule(fam, info)
        layer, _ = tensor_key(rule, m)
        for ns in fam.norm_readers:
            if _ends(info.name, ns):
                norms[(ns, layer)] = info.name
    out = {}
    for ct in plan.child_tensors(ckpt):
        for ns, readers in fam.norm_readers.items():
            if any(_ends(ct.name, r) for r in readers):
                out[ct.name] = ckpt.get(norms[(ns, ct.layer)]).float().clone()
    return out


class _Covariance:
    """Observer for BlockModel.run_layers: sum of x^ x^T over every layer's input and the last
    layer's output, x^ = x / RMS(x) per token, in float32, accumulated in place (the basis is
    found in float32 too: a float64 eigendecomposition needs about 4 x D^2 x 8 bytes at once)."""

    def __init__(self, dim: int, n_layers: int, device):
        self.cov = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.n_layers = n_layers
        self.tokens = 0

    def attach(self, i, layer):
        return []

    def _add(self, x):
        x = x.reshape(-1, x.shape[-1]).float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp_min(1e-12))
        self.cov.addmm_(x.T, x)

    def residual(self, i, x, y):
        self._add(x)
        if i == 0:
            self.tokens += x.shape[0] * x.shape[1]
        if i == self.n_layers - 1:
            self._add(y)


def rotate_hidden(ckpt: Checkpoint, plan: Plan, stage, *, seed: int = 0, device: str = "cpu", tokenizer=None,
                  scratch=None, progress=None) -> dict:
    from ..runtime import BlockModel
    from ..text import calibration_tokens

    check_rotatable(plan)
    spec = stage.calibration
    ids = calibration_tokens(ckpt, spec, plan.parent.vocab_size, seed=seed, tokenizer=tokenizer)
    bm = BlockModel(ckpt, plan.family, device, scratch)
    if progress is not None:
        progress.phase(f"rotate_hidden ({spec.samples}x{spec.seq_len} tokens)",
                       bm.total_bytes())
    h = bm.embed(ids, spec.batch_size)
    D, d = plan.parent.hidden_size, plan.child.hidden_size
    obs = _Covariance(D, len(bm.layers), bm.device)
    bm.run_layers(h, spec.batch_size, obs, progress)
    del h
    bm.clear_buffers()  # the forward passes' cast buffers: not needed beside the eigendecomposition
    cov = obs.cov.cpu()
    obs.cov = None
    evals, vecs = torch.linalg.eigh(cov)  # ascending
    del cov
    evals = evals.flip(0)
    plan.rotation = vecs[:, -d:].flip(1).contiguous() if d else vecs[:, :0].contiguous()  # top d, descending
    del vecs
    plan.kept.pop((Space.HIDDEN, None), None)   # the hidden axis is projected, not selected
    plan._cache.clear()
    plan.folds = folds(ckpt, plan)
    tot = float(evals.clamp_min(0).sum())
    out = {"method": stage.method, "calibration": spec.model_dump(), "tokens": obs.tokens,
           "kept_variance": round(float(evals[:d].clamp_min(0).sum()) / tot, 6) if tot > 0 else 1.0}
    if plan.untie:
        out["untied_head_params"] = plan.parent.vocab_size * d
    return out


class RotateStage(Stage):
    name = "rotate_hidden"
    config = RotateHidden
    provides = ("rotates_hidden",)
    before = {"writes": "{self} must come before {other}"}
    after = {"ranks": "{self} replaces {other}'s choice of hidden dims, so {other} must come first"}

    def prepare(self, cfg, ctx):
        plan = ctx.plan
        check_rotatable(plan)
        plan.rotate = True
        plan.untie = plan.family.tied(ctx.ckpt.config)

    def reads(self, cfg, ctx):
        return [Read(self.name, self.name, data_what(ctx), ctx.recipe.calibration_for(self.name))]

    def run(self, cfg, ctx):
        ctx.selected()
        cfg = cfg.model_copy(update={"calibration": ctx.spec(self.name)})
        return rotate_hidden(ctx.ckpt, ctx.plan, cfg, seed=ctx.seed, device=ctx.device, tokenizer=ctx.tokenizer,
                             scratch=ctx.scratch, progress=ctx.progress)


STAGE = RotateStage()
