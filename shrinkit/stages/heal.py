"""heal: refit the cut blocks' output projections by least squares, so the child's blocks land
on the parent's activations instead of leaving all of the recovery to training.

Parent and child run together, one block at a time, over the calibration tokens; the child
runs on its own (already healed) residual stream. For child layer k (parent layer p_k, the next
kept parent layer p_{k+1}):

- the attention output projection is refitted so that the child's attention output matches the
  parent's attention output of layer p_k, on the kept hidden dims;
- the MLP output projection is refitted so that the child's residual after the block lands on
  the parent's residual where p_{k+1} reads it (for the last kept layer: where the final norm
  reads it), on the kept hidden dims. This absorbs the dropped layers and the error accumulated
  so far. Post-norm families (the family's block description names the norm whose input is the
  residual) match that norm's input: the input which, normalized by the child's own norm, gives
  the parent's output, taken at the per-token mean and spread of the child's current input.

Each token is weighted by 1 / RMS of the parent's residual at that point (massive-activation
tokens would otherwise dominate). The fit is ridge regression towards the selected weights:
min ||X W - Y||^2 + lambda ||W - W0||^2 with lambda = alpha x the mean diagonal of X^T X, so a
child that already reproduces the parent is left as it is (the fit is exact). Biases are fitted
too where the projection has one.

Memory: one parent block and one child block at a time, the Gram matrix (in x in, float32) and
cross term (in x out) of the projection being fitted, and two activation buffers (the parent's
and the child's residual streams) in scratch-file mappings. The fitted tensors go to a scratch safetensors file in the output's
temporary folder, one per child layer; the writer takes them instead of slicing the parent's.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field

from ..checkpoint.reader import Checkpoint
from ..errors import RecipeError
from ..families.spaces import Space
from ..malloc import trim
from ..plan import Plan
from ..specs import Calibration, Strict
from .base import Context, Read, Stage, data_what
from .slice import slice_blocks


class Heal(Strict):
    """Least-squares refit of every kept block's attention and MLP output projections."""
    alpha: float = Field(1e-2, gt=0, le=1e6)      # ridge lambda = alpha x mean diagonal of the Gram matrix
    # each refitted projection stays within max_change x its selected weights' norm:
    # ||W - W0||_F <= max_change ||W0||_F (lambda raised per projection until it holds); null: unbounded
    max_change: Optional[float] = Field(0.5, gt=0, le=100, allow_inf_nan=False)
    weight: Literal["rms", "none"] = "rms"        # per-token weight: 1 / RMS of the parent's residual
    when: Literal["always", "auto"] = "always"    # auto: only when layers are dropped and there is calibration text
    calibration: Optional[Calibration] = None   # default: the recipe's top-level calibration

FIT_BLOCK_BYTES = 4 << 20  # float32 bytes of the token, column or row blocks a fit is solved in
EIGH_F64_MAX = 4096  # a bounded fit decomposes its Gram matrix in float64 up to this many inputs


@dataclasses.dataclass(frozen=True)
class _Info:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class ChildView:
    """The planned child as a read-only checkpoint (config, tensors, get) whose tensors are sliced
    from the parent on demand (in the child's dtype, as the writer would write them), or taken
    from the healed replacements."""

    def __init__(self, ckpt: Checkpoint, plan: Plan):
        self.parent = ckpt
        self.plan = plan
        self.config = plan.child_config(ckpt.config)
        self.cts = {c.name: c for c in plan.child_tensors(ckpt)}
        self.tensors = {n: _Info(c.shape, c.dtype) for n, c in self.cts.items()}
        self.root = ckpt.root

    def get(self, name: str) -> torch.Tensor:
        rep = self.plan.replaced.get(name)
        if rep is not None:
            return load_replacement(rep, name)
        ct = self.cts[name]
        blocks = slice_blocks(self.plan, ct, self.parent.get(ct.parent.name))
        if not ct.shape:
            return next(blocks).clone()
        out = torch.empty(ct.shape, dtype=ct.dtype)  # filled block by block: one copy in memory
        r0 = 0
        for part in blocks:
            out[r0:r0 + len(part)] = part
            r0 += len(part)
        return out


def load_replacement(path: str | Path, name: str) -> torch.Tensor:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def _rms_weight(x: torch.Tensor, on: bool) -> torch.Tensor:
    """Per-token weight (the square root of the weight on the squared error): 1 / RMS of x."""
    if not on:
        return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
    return torch.rsqrt(x.pow(2).mean(-1).clamp_min(1e-12))


class Fit:
    """The ridge fit of one linear map y = x W (+ b) (W as [in, out]) as a correction Delta to its
    current weights W0: min ||X (W0 + Delta) - Y||^2 + lambda ||Delta||^2 over weighted token rows,
    lambda = alpha x the mean diagonal of G = X^T X. A child that already fits has Y = X W0, so
    Delta = 0 exactly.

    Given the number of tokens, the weighted rows of X and of R = Y - X W0 wait in scratch-file
    mappings (like the residual streams; nothing is accumulated in memory during the passes) and
    the fit is solved afterwards in the smaller of two forms of the same solution: with at least
    as many tokens as inputs the primal (G + lambda I) Delta = X^T R (in x in), with fewer the
    dual (X X^T + lambda I) C = R, Delta = X^T C (tokens x tokens). Without it (tokens=None), G
    and X^T R are accumulated chunk by chunk (float32). Either way the current error
    e0 = ||R||^2 is measured directly."""

    def __init__(self, n_in: int, n_out: int, bias: bool, device, tokens: int | None = None, scratch=None):
        k = n_in + (1 if bias else 0)
        self.bias = bias
        self.k, self.n_out = k, n_out
        self.stored = tokens is not None
        self.dual = self.stored and tokens < k
        self.rows = 0
        self.X = self.R = self.G = self.E = None
        if self.stored:
            self.X = _rows_buffer((tokens, k), device, scratch)
            self.R = _rows_buffer((tokens, n_out), device, scratch)
        else:
            self.G = torch.zeros(k, k, dtype=torch.float32, device=device)
            self.E = torch.zeros(k, n_out, dtype=torch.float32, device=device)
        self.e0 = 0.0    # sum of w^2 |y - x W0|^2
        self.ref = 0.0   # sum of w^2 |ref|^2: what the relative error is relative to

    def add(self, x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, ref: torch.Tensor) -> None:
        """x: the map's input rows, r: target minus current output, w: per-token weights."""
        w = w.reshape(-1, 1).float()
        rw = r.reshape(-1, r.shape[-1]).float() * w
        x = x.reshape(-1, x.shape[-1])
        n = x.shape[1]
        if self.stored:  # the weighted rows go to the scratch mappings, the bias input is the weight itself
            r0, r1 = self.rows, self.rows + len(w)
            torch.mul(x, w, out=self.X[r0:r1, :n])
            if self.bias:
                self.X[r0:r1, n:] = w
            self.R[r0:r1] = rw
            self.rows = r1
        else:
            xw = x.float() * w  # one float32 copy of the chunk's inputs
            self.G[:n, :n].addmm_(xw.T, xw)
            self.E[:n].addmm_(xw.T, rw)
            if self.bias:  # the constant input w: its row and column of G, its row of E
                col = xw.T @ w
                self.G[:n, n:].add_(col)
                self.G[n:, :n].add_(col.T)
                self.G[n:, n:].add_(w.T @ w)
                self.E[n:].add_(w.T @ rw)
            del xw
        self.e0 += float(rw.pow(2).sum(dtype=torch.float64))
        self.ref += float((ref.reshape(-1, ref.shape[-1]).float() * w).pow(2).sum(dtype=torch.float64))

    def solve(self, alpha: float, max_norm: float | None = None) -> tuple[torch.Tensor, float, float]:
        """(Delta [in (+1), out], relative error before, after). lambda = alpha * mean diag(G).
        The system is factorized in place (it is not needed afterwards). With max_norm, lambda is
        raised (never lowered) until ||Delta||_F <= max_norm (`bounded`)."""
        if max_norm is not None:
            return self._solve_bounded(alpha, max_norm)
        if self.dual:
            return self._solve_dual(alpha)
        if self.stored:
            self._gram()
        lam = max(alpha * float(self.G.diagonal().mean()), 1e-12)
        A = self.G
        A.diagonal().add_(lam)
        L = _cholesky_(A)
        D = self.E  # overwritten by the solution a column block at a time
        self.G = self.E = None
        # ||X (W0 + D) - Y||^2 = e0 - 2 <D, E> + <D, G D>, and G D = E - lambda D at the solution;
        # the sums in float64
        de = dd = 0.0
        step = max(1, FIT_BLOCK_BYTES // (4 * len(D)))
        for c0 in range(0, D.shape[1], step):
            e = D[:, c0:c0 + step]
            d = torch.cholesky_solve(e, L)
            de += float((d.double() * e.double()).sum())
            dd += float(d.double().pow(2).sum())
            e.copy_(d)
            del d
        del A, L
        after = self.e0 - de - lam * dd
        ref = max(self.ref, 1e-300)
        return D, (self.e0 / ref) ** 0.5, (max(after, 0.0) / ref) ** 0.5

    def _gram(self) -> None:
        """G = X^T X and E = X^T R from the stored rows, a block of tokens at a time."""
        X, R = self.X[:self.rows], self.R[:self.rows]
        self.G = torch.zeros(self.k, self.k, dtype=torch.float32, device=X.device)
        self.E = torch.zeros(self.k, self.n_out, dtype=torch.float32, device=X.device)
        step = max(1, FIT_BLOCK_BYTES // (4 * self.k))
        for t0 in range(0, len(X), step):
            xt = X[t0:t0 + step]
            self.G.addmm_(xt.T, xt)
            self.E.addmm_(xt.T, R[t0:t0 + step])
        self.X = self.R = None

    def _solve_bounded(self, alpha: float, max_norm: float) -> tuple[torch.Tensor, float, float]:
        """The ridge fit with its correction bounded: the smallest lambda >= alpha * mean diag(G)
        with ||Delta(lambda)||_F <= max_norm (the Tikhonov form of the norm-constrained least
        squares problem min ||X (W0 + Delta) - Y|| s.t. ||Delta||_F <= max_norm). One
        eigendecomposition (of G, in x in, or in the dual form of X X^T, tokens x tokens) makes
        ||Delta||_F a closed form in lambda, solved by bisection in log lambda; Delta is scaled
        onto the bound at the end, so the bound holds exactly whatever the rounding. Also records
        `self.info`: lambda / mean diag(G), the condition number of G, ||Delta||_F."""
        if self.dual:
            X, R = self.X[:self.rows], self.R[:self.rows]
            dt = torch.float64 if len(X) <= EIGH_F64_MAX else torch.float32
            K = torch.zeros(len(X), len(X), dtype=dt, device=X.device)
            step = max(1, FIT_BLOCK_BYTES // (4 * max(len(X), 1)))
            for c0 in range(0, self.k, step):
                xc = X[:, c0:c0 + step].to(dt)
                K.addmm_(xc, xc.T)
            mean_diag = float(K.diagonal().sum()) / self.k  # trace(X X^T) = trace(X^T X)
            s, U = torch.linalg.eigh(K)
            del K
            s = s.double()
            P = (U.T @ R.to(dt)).double()  # the targets in K's eigenbasis
        else:
            if self.stored:
                self._gram()
            mean_diag = float(self.G.diagonal().mean())
            # float64 up to EIGH_F64_MAX inputs; above, float32 (one more in x in float32 matrix at the peak)
            s, U = torch.linalg.eigh(self.G.double() if self.k <= EIGH_F64_MAX else self.G)
            self.G = None
            s, U = s.double(), U.double() if self.k <= EIGH_F64_MAX else U
            P = (U.T @ self.E.to(U.dtype)).double()  # X^T R in G's eigenbasis
            self.E = None
        s = s.clamp_min(0.0)
        p2 = P.pow(2).sum(1)  # per eigendirection
        # ||Delta||^2: primal sum p2 / (s + lam)^2; dual sum s p2 / (s + lam)^2 (Delta = X^T C)
        num = p2 * s if self.dual else p2

        def norm2(lam: float) -> float:
            return float((num / (s + lam).pow(2)).sum())

        max_norm = max_norm * (1 - 1e-5)  # room for float32 rounding: the stored change stays within the bound
        if max_norm <= 0:  # a projection whose selected weights are all zero stays zero
            self.X = self.R = None
            self.info = {"lambda_rel": math.inf, "bounded": True, "delta_norm": 0.0, "cond": None}
            ref = max(self.ref, 1e-300)
            return torch.zeros(self.k, self.n_out, dtype=torch.float32, device=s.device), (self.e0 / ref) ** 0.5, (self.e0 / ref) ** 0.5
        lam = lam0 = max(alpha * mean_diag, 1e-12)
        if norm2(lam) > max_norm ** 2:
            lo, hi = lam, lam * 2
            while norm2(hi) > max_norm ** 2 and hi < 1e300:
                lo, hi = hi, hi * 4
            for _ in range(60):  # bisection in log lambda: 2^-60 of the bracket's log width
                mid = math.sqrt(lo * hi)
                lo, hi = (mid, hi) if norm2(mid) > max_norm ** 2 else (lo, mid)
            lam = hi
        C = P / (s + lam)[:, None]  # in the eigenbasis
        if self.dual:
            D = torch.empty(self.k, self.n_out, dtype=torch.float32, device=X.device)
            Cc = (U @ C.to(U.dtype)).float()
            step = max(1, FIT_BLOCK_BYTES // (4 * max(len(X), 1)))
            for c0 in range(0, self.k, step):  # Delta = X^T C, a row block at a time
                torch.mm(X[:, c0:c0 + step].T, Cc, out=D[c0:c0 + step])
            self.X = self.R = None
        else:
            D = (U @ C.to(U.dtype)).float()
        n = float(D.double().norm())
        c = min(1.0, max_norm / n) if n > 0 else 1.0  # rounding: onto the bound (a shorter step
        if c < 1.0:                                    # along the fit lowers the error too)
            D.mul_(c)
            n = float(D.double().norm())
        if self.dual:  # Y - X (W0 + c Delta) = (1 - c) R + c lambda C (K C = R - lambda C), U square
            after = float(((1 - c) * P + c * lam * C).pow(2).sum())
        else:  # e0 - 2 <c Delta, E> + <c Delta, G c Delta>, in the eigenbasis
            after = self.e0 - float((2 * c * C * P - c * c * s[:, None] * C * C).sum())
        smin, smax = (float(s[0]), float(s[-1])) if len(s) else (1.0, 1.0)
        self.info = {"lambda_rel": lam / max(mean_diag, 1e-300), "bounded": lam > lam0, "delta_norm": n,
                     # G's condition number (None: rank-deficient, fewer tokens than inputs)
                     "cond": smax / smin if smin > 1e-12 * smax else None}
        ref = max(self.ref, 1e-300)
        return D, (self.e0 / ref) ** 0.5, (max(after, 0.0) / ref) ** 0.5

    def _solve_dual(self, alpha: float) -> tuple[torch.Tensor, float, float]:
        X, R = self.X[:self.rows], self.R[:self.rows]
        n = len(X)
        K = torch.zeros(n, n, dtype=torch.float32, device=X.device)  # X X^T, a column block of X at a time
        step = max(1, FIT_BLOCK_BYTES // (4 * max(n, 1)))
        for c0 in range(0, self.k, step):
            xc = X[:, c0:c0 + step]
            K.addmm_(xc, xc.T)
        del xc
        lam = max(alpha * float(K.diagonal().sum()) / self.k, 1e-12)  # trace(X X^T) = trace(X^T X)
        K.diagonal().add_(lam)
        L = _cholesky_(K)
        C = torch.cholesky_solve(R, L)
        del K, L
        # at the solution Y - X (W0 + D) = R - X X^T C = lambda C
        after = lam * lam * float(C.double().pow(2).sum())
        D = torch.empty(self.k, self.n_out, dtype=torch.float32, device=X.device)
        for c0 in range(0, self.k, step):  # D = X^T C, a row block at a time
            torch.mm(X[:, c0:c0 + step].T, C, out=D[c0:c0 + step])
        self.X = self.R = None
        ref = max(self.ref, 1e-300)
        return D, (self.e0 / ref) ** 0.5, (max(after, 0.0) / ref) ** 0.5


class _Stop(Exception):
    """Raised by a forward hook to end a block's forward pass once what is needed is captured."""


def _rows_buffer(shape: tuple[int, int], device, scratch) -> torch.Tensor:
    """Token rows of a dual-form fit: a scratch-file mapping on the CPU, plain memory elsewhere."""
    if torch.device(device).type == "cpu":
        from ..runtime import activation_buffer
        return activation_buffer(shape, scratch)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _cholesky_(A: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of A, written over A."""
    L, info = torch.linalg.cholesky_ex(A, out=(A, torch.empty((), dtype=torch.int32, device=A.device)))
    if int(info) != 0:  # pragma: no cover - A is positive definite
        raise RuntimeError("heal: the Gram matrix is not positive definite")
    return L


def _fit_for(mod: torch.nn.Module, in_first: bool, device, tokens: int | None = None, scratch=None) -> Fit:
    """A Fit for a linear layer (GPT-2's Conv1D stores its weight as [in, out]), bias included
    (its parameters need not be loaded yet: only their shapes are read)."""
    n_in, n_out = mod.weight.shape if in_first else mod.weight.shape[::-1]
    return Fit(n_in, n_out, mod.bias is not None, device, tokens, scratch)


def _apply(mod: torch.nn.Module, D: torch.Tensor, in_first: bool, dtypes: tuple) -> None:
    """W0 + Delta (Delta as [in (+1 bias row), out]) into a linear layer, summed in float32 over
    Delta's own storage, then stored in the child's dtypes (weight, bias): what the child's stream
    runs through next is what the written child will hold, and a bfloat16 child's refitted
    projection takes half the memory of a float32 one."""
    bias = mod.bias is not None
    n_in = D.shape[0] - (1 if bias else 0)
    d = D[:n_in]
    d.add_(mod.weight if in_first else mod.weight.T)  # Delta + W0: the same sums as W0 + Delta
    w = d if in_first else d.T
    if dtypes[0] is not None and w.dtype != dtypes[0]:
        w = torch.empty(w.shape, dtype=dtypes[0], device=w.device).copy_(w)
    mod._parameters["weight"] = torch.nn.Parameter(w, requires_grad=False)
    if bias:
        b = mod.bias.float() + D[n_in]
        mod._parameters["bias"] = torch.nn.Parameter(b.to(dtypes[1] or b.dtype), requires_grad=False)


def heal(ckpt: Checkpoint, plan: Plan, stage, *, seed: int = 0, device: str = "cpu", tokenizer=None,
         scratch: str | Path | None = None, progress=None) -> dict:
    """Refit every child layer's attention and MLP output projections; record the fitted tensors
    in plan.replaced (name -> scratch safetensors file) and return the per-layer report."""
    from safetensors.torch import save_file

    from ..runtime import BlockModel

    spec = stage.calibration
    fam = plan.family
    ids = fam.calibration_inputs(ckpt, spec, plan.parent, seed=seed, tokenizer=tokenizer)
    if fam.block is None or not (fam.block.out_proj and fam.block.down_proj):
        raise RecipeError(f"heal does not support the {fam.name} family yet (its block description names no "
                          "output projections); remove the heal stage")
    pm = BlockModel(ckpt, fam, device, scratch)
    view = ChildView(ckpt, plan)
    cm = BlockModel(view, fam, device, scratch)
    cm.share_buffers(pm)  # one set of float32 cast buffers for both models (they run one at a time)
    ad = pm.ad
    weighted = stage.weight == "rms"
    hidden = plan.kept.get((Space.HIDDEN, None))
    if plan.rotation is not None:  # the child's residual is the parent's projected onto the kept directions
        kept = lambda t, Q=plan.rotation.to(pm.device): t @ Q  # noqa: E731
    elif hidden is None:
        kept = lambda t: t  # noqa: E731
    else:
        kept = lambda t, ix=hidden.to(pm.device): t.index_select(-1, ix)  # noqa: E731
    if progress is not None:
        progress.phase(f"heal ({spec.samples}x{spec.seq_len} tokens)",
                       pm.total_bytes())
    hp = pm.embed(ids, spec.batch_size)
    hc = cm.embed(ids, spec.batch_size)
    post = ad.residual_norm  # post-norm families: the residual is this norm's input
    dnorm = getattr(ad, "down_norm", None)  # sandwich norms: down_proj's output is normalized first
    n_pos = fam.input_len(ckpt.config, ids)
    step = min(pm.micro(spec.batch_size, n_pos), cm.micro(spec.batch_size, n_pos))
    nl = len(pm.layers)
    layers = list(plan.layers)
    report = []
    folder = Path(scratch) if scratch is not None else Path(".")
    dev = pm.device
    n_tok = hp.shape[0] * hp.shape[1]  # the fits take the dual form when this is below their inputs

    def run_parent(i: int, on_chunk=None) -> None:
        """Parent layer i over all tokens, in place in hp."""
        layer = pm.layers[i]
        pm.readahead(i + 1)
        pm.load(layer)
        cap: dict = {}
        hooks = []
        if on_chunk is not None:
            hooks.append(layer.get_submodule(ad.out_proj).register_forward_hook(
                lambda m, a, out: cap.__setitem__("attn", out)))
        try:
            with torch.no_grad():
                for s in range(0, len(hp), step):
                    x = hp[s:s + step].to(dev)
                    y = pm.layer_call(layer, x)
                    if on_chunk is not None:
                        on_chunk(s, x, cap["attn"])
                    hp[s:s + step] = y
        finally:
            for h in hooks:
                h.remove()
            pm.free(layer)
        if progress is not None:
            progress.advance(pm.layer_bytes(i))

    def child_pass(layer, fit_down: Fit | None = None, update=False):
        cap: dict = {}
        d = layer.get_submodule(ad.down_proj)
        hooks = [d.register_forward_pre_hook(lambda m, a: cap.__setitem__("d_in", a[0]))]
        if post:
            hooks.append(layer.get_submodule(post).register_forward_pre_hook(
                lambda m, a: cap.__setitem__("pre", a[0])))
        if dnorm:  # sandwich norms: the projection's output and the norm's output
            hooks.append(d.register_forward_hook(lambda m, a, out: cap.__setitem__("d_out", out)))
            hooks.append(layer.get_submodule(dnorm).register_forward_hook(
                lambda m, a, out: cap.__setitem__("n_out", out)))
        try:
            with torch.no_grad():
                for s in range(0, len(hc), step):
                    x = hc[s:s + step].to(dev)
                    y = cm.layer_call(layer, x)
                    if fit_down is not None:
                        target = kept(hp[s:s + step].to(dev))
                        res = y
                        if post:  # the norm's input that gives the parent's output, near the child's own
                            res = cap["pre"]
                            target = _unnorm(layer.get_submodule(post), target, res)
                        elif dnorm:  # the projection's output whose norm adds what the residual lacks
                            res = cap["d_out"].float()
                            want = target - (y.float() - cap["n_out"].float())
                            target = _unnorm_rms(layer.get_submodule(dnorm), want, res)
                        w = _rms_weight(target if (post or dnorm) else hp[s:s + step].to(dev), weighted)
                        # with a layer scale the fit (and its relative error) is in the projection's units
                        fit_down.add(cap["d_in"], _unscale(layer, ad.down_scale, target - res), w,
                                     ref=_unscale(layer, ad.down_scale, target))
                    if update:
                        hc[s:s + step] = y
        finally:
            for h in hooks:
                h.remove()

    replaced = {}
    nxt = 0  # next parent layer to run
    for k, p in enumerate(layers):
        while nxt < p:  # dropped parent layers before this kept one
            run_parent(nxt)
            nxt += 1
        clayer = cm.layers[k]
        lazy = cm.load_lazily(clayer.modules())  # the MLP's weights only when step 3 first runs it
        o = clayer.get_submodule(ad.out_proj)
        prefix = cm.name_of(clayer)

        def child_dtypes(mod_path: str) -> tuple:  # (weight, bias) dtypes the child stores
            keys = (cm.key_of(f"{prefix}.{mod_path}.{n}") for n in ("weight", "bias"))
            return tuple(view.cts[k].dtype if k is not None else None for k in keys)
        d = clayer.get_submodule(ad.down_proj)
        fo = _fit_for(o, ad.in_first, dev, n_tok, scratch)  # the MLP's fit is made when its turn comes (one Gram matrix at a time)

        # 1. parent layer p (its attention output is the target) and the child's layer k, chunk by
        # chunk together: the child's attention output projection input against the parent's output
        def parent_chunk(s, x, attn):
            with torch.no_grad():
                cap: dict = {}

                def stop(m, a, out):  # the rest of the child's block is not needed here
                    cap["out"] = out
                    raise _Stop

                hk = [o.register_forward_pre_hook(lambda m, a: cap.__setitem__("z", a[0])),
                      o.register_forward_hook(stop)]
                try:
                    cm.layer_call(clayer, hc[s:s + step].to(dev))
                except _Stop:
                    pass
                finally:
                    for h in hk:
                        h.remove()
                target = kept(attn)
                fo.add(cap["z"], target - cap["out"], _rms_weight(x, weighted), ref=target)

        run_parent(p, parent_chunk)
        nxt = p + 1
        D, *e_o = fo.solve(stage.alpha, _max_norm(o, stage))
        fit_o = _fit_info(fo, D, o)
        del fo
        _apply(o, D, ad.in_first, child_dtypes(ad.out_proj))
        del D

        # 2. the parent on to where the next kept layer reads (or to the final norm)
        until = layers[k + 1] if k + 1 < len(layers) else nl
        while nxt < until:
            run_parent(nxt)
            nxt += 1

        # 3. the MLP output projection: the child's residual onto the parent's
        fd = _fit_for(d, ad.in_first, dev, n_tok, scratch)
        child_pass(clayer, fit_down=fd)
        # the solve needs none of the child's other modules (they load again when step 4 runs
        # them) nor the cast buffers
        rest = [m for m in clayer.modules() if next(m.parameters(recurse=False), None) is not None
                and o not in list(m.modules()) and d not in list(m.modules())]
        for m in rest:
            h = lazy.pop(m, None)
            if h is not None:
                h.remove()
            cm.free(m)
        lazy.update(cm.load_lazily(rest))
        pm.clear_buffers()
        trim()
        D, *e_d = fd.solve(stage.alpha, _max_norm(d, stage))
        fit_d = _fit_info(fd, D, d)
        del fd
        _apply(d, D, ad.in_first, child_dtypes(ad.down_proj))
        del D

        # 4. the child's stream through the healed block
        child_pass(clayer, update=True)
        tensors = {}
        for mod_path, mod in ((ad.out_proj, o), (ad.down_proj, d)):
            for pname in ("weight", "bias"):
                t = getattr(mod, pname, None)
                if t is None:
                    continue
                key = cm.key_of(f"{prefix}.{mod_path}.{pname}")
                # in the child's dtype: the writer casts to it anyway (the same bytes), half the scratch
                tensors[key] = t.detach().to(device="cpu", dtype=view.cts[key].dtype).contiguous()
        path = folder / f".shrinkit-heal-{k}.safetensors"
        save_file(tensors, str(path))
        for key in tensors:
            replaced[key] = path
        for h in lazy.values():
            h.remove()
        cm.free(clayer)
        trim()  # the freed child block's small pieces leave holes in the heap otherwise (shrinkit.malloc)
        report.append({"layer": k, "parent_layer": p,
                       "attn_rel_err": [round(e_o[0], 6), round(e_o[1], 6)],
                       "residual_rel_err": [round(e_d[0], 6), round(e_d[1], 6)],
                       "attn_fit": fit_o, "mlp_fit": fit_d})
    while nxt < nl:  # pragma: no cover - the last kept layer already ran the parent to the end
        run_parent(nxt)
        nxt += 1
    plan.replaced.update(replaced)
    return {"alpha": stage.alpha, "max_change": stage.max_change, "weight": stage.weight,
            "calibration": spec.model_dump(), "layers": report}


def _selected_norm(mod: torch.nn.Module) -> float:
    """||[W0; b0]||_F of a projection before its fit (the selected weights and bias)."""
    n2 = float(mod.weight.double().pow(2).sum())
    if mod.bias is not None:
        n2 += float(mod.bias.double().pow(2).sum())
    return math.sqrt(n2)


def _max_norm(mod: torch.nn.Module, stage) -> float | None:
    """The bound on a projection's correction: max_change x the selected weights' norm (None: unbounded)."""
    mc = getattr(stage, "max_change", None)
    return None if mc is None else mc * _selected_norm(mod)


def _fit_info(fit: Fit, D: torch.Tensor, mod: torch.nn.Module) -> dict:
    """What the report says of one fit: ||Delta|| / ||W0|| (the relative change of the
    projection), and for a bounded fit lambda / mean diag(G), G's condition number and whether
    the bound was what set lambda."""
    w0 = _selected_norm(mod)
    out = {"change": round(float(D.double().norm()) / max(w0, 1e-300), 6)}
    info = getattr(fit, "info", None)
    if info is not None:
        lr = info["lambda_rel"]
        out.update(lambda_rel=float(f"{lr:.4g}") if math.isfinite(lr) else None, bounded=bool(info["bounded"]),
                   cond=None if info["cond"] is None else float(f"{info['cond']:.4g}"))
    return out


def _unnorm_rms(norm: torch.nn.Module, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """An RMSNorm input u* whose normalized output points along v (the norm's output is
    u / rms(u) x g, so only v's direction per token is reachable), at the per-token RMS of u
    (the child's current input; v / g itself where u is 0): u* = rms(u) x (v / g) / rms(v / g). Exact whenever v is an
    output of that norm. g is read off the module (its output for an all-ones input, whatever
    its parametrization: w or 1 + w); where g is ~0 that dim keeps u."""
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    ones = torch.ones((1, u.shape[-1]), dtype=next(norm.parameters()).dtype, device=u.device)
    g = norm(ones).float().reshape(-1) * math.sqrt(1.0 + eps)
    ok = g.abs() > 1e-6
    q = torch.where(ok, v / torch.where(ok, g, torch.ones_like(g)), u)
    rms = lambda t: t.pow(2).mean(-1, keepdim=True).sqrt()  # noqa: E731
    ru, rq = rms(u), rms(q).clamp_min(1e-30)
    return torch.where(ru > 1e-30, q * (ru / rq), q)  # a token the projection writes nothing for: v / g


def _unscale(layer: torch.nn.Module, scale: str | None, delta: torch.Tensor) -> torch.Tensor:
    """The change of a projection's output that changes the residual by `delta` when the block
    multiplies that output by a per-channel scale (layer scale) before adding it; where a scale is
    ~0 no change of the output can help, and that channel asks for none."""
    if not scale:
        return delta
    g = layer.get_parameter(scale).detach().float().to(delta.device)
    ok = g.abs() > 1e-6
    return torch.where(ok, delta / torch.where(ok, g, torch.ones_like(g)), torch.zeros_like(delta))


def _unnorm(norm: torch.nn.Module, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A LayerNorm input z* with norm(z*) = y, at the per-token mean and spread of z (the
    child's own pre-norm residual): z* = mean(z) + std(z) * (y - bias) / weight. Exact whenever
    y is a LayerNorm output of that norm; where a weight is ~0 that dim keeps z."""
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5)))
    g = norm.weight.float()
    b = norm.bias.float() if getattr(norm, "bias", None) is not None else torch.zeros_like(g)
    mu = z.mean(-1, keepdim=True)
    sd = torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + eps)
    ok = g.abs() > 1e-6
    u = (y - b) / torch.where(ok, g, torch.ones_like(g))
    return torch.where(ok, mu + sd * u, z)


class HealStage(Stage):
    name = "heal"
    config = Heal
    default = {"when": "auto"}
    before = {"writes": "{self} must come before {other}"}
    _after = "{self} refits the chosen child, so {other} must come before {self}"
    after = {"ranks": _after, "drops_layers": _after, "rotates_hidden": _after}
    excludes = {"rotates_hidden": "{other} and {self} cannot be combined yet: a rotated and healed child diverged in "
                                  "training trials and the cause is not understood; keep one of the two stages"}

    def skip_reason(self, cfg: Heal, ctx: Context) -> str | None:
        """`when: auto` (the default pipeline's) heals only a child that drops layers, of a pre-norm
        family heal can refit, when there is calibration text for it (a tokenizer, or random
        tokens); see README, "Heal". The one rule: the run, preflight and the report all ask here."""
        if cfg.when != "auto":
            return None
        from ..families import family_for
        fam = family_for(ctx.ckpt.config)
        b = fam.block
        if b is None or not (b.out_proj and b.down_proj):
            return f"heal has no block description for the {fam.name} family yet (when: auto)"
        if b.residual_norm:  # measured worse than no refit on MiniLM (BENCHMARKS.md): opt-in only
            return "post-norm family: heal is opt-in here (`when: always`) (when: auto)"
        plan = ctx.plan
        if plan is not None and plan.child.num_hidden_layers == plan.parent.num_hidden_layers:
            return "no layer is dropped (when: auto)"
        if not has_data(ctx, ctx.recipe.calibration_for(self.name)):
            what = "tokenizer for the calibration text" if fam.random_data == "random_tokens" \
                else "image processor config for the calibration images"
            return f"no {what} (when: auto)"
        return None

    def reads(self, cfg, ctx):
        if self.skip_reason(cfg, ctx) is not None:
            return []
        return [Read(self.name, self.name, data_what(ctx), ctx.recipe.calibration_for(self.name))]

    def run(self, cfg, ctx):
        ctx.selected()
        cfg = cfg.model_copy(update={"calibration": ctx.spec(self.name)})
        return heal(ctx.ckpt, ctx.plan, cfg, seed=ctx.seed, device=ctx.device, tokenizer=ctx.tokenizer,
                    scratch=ctx.scratch, progress=ctx.progress)


def has_data(ctx: Context, spec: Calibration) -> bool:
    """Whether calibration inputs can be formed: the family's random data, a named file or folder,
    or its data source for builtin data (a tokenizer for text, an image processor config)."""
    from ..families import family_for
    fam = family_for(ctx.ckpt.config)
    return spec.data == fam.random_data or fam.has_data_source(ctx.ckpt.root, ctx.tokenizer)


STAGE = HealStage()
