"""heal: the least-squares refit of the kept blocks' output projections.

Exactness: a child that already reproduces the parent (nothing cut, or a planted parent whose
dead parts are cut) is left as it is. Usefulness: on a live cut the per-layer errors drop.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import planted
from helpers import logits, recipe, run, tokens
from planted import rel_err
from shrinkit.errors import RecipeError

CALIB = {"data": "random_tokens", "samples": 8, "seq_len": 32, "batch_size": 4}
RANK = {"rank_neurons": {"method": "activation", "calibration": CALIB}}
HEAL = {"heal": {"calibration": CALIB}}
LLAMA_CUT = dict(hidden_size=48, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3)


def make(kind, tmp_path):
    if kind == "llama":
        return planted.llama_like(tmp_path / kind), LLAMA_CUT, "AutoModelForCausalLM"
    if kind == "qwen2":  # tied head, q/k/v biases
        return (planted.llama_like(tmp_path / kind, "qwen2", tie=True, attention_bias=True), LLAMA_CUT,
                "AutoModelForCausalLM")
    if kind == "gpt2":
        return planted.gpt2(tmp_path / kind), dict(intermediate_size=224, num_hidden_layers=3), "AutoModelForCausalLM"
    if kind == "distilbert":  # post-LayerNorm, its own module names (out_lin, lin2, output_layer_norm)
        return planted.encoder(tmp_path / kind, kind, mlm=False), dict(intermediate_size=96, num_hidden_layers=3), "AutoModel"
    return planted.bert(tmp_path / kind, mlm=False), dict(intermediate_size=96, num_hidden_layers=3), "AutoModel"


def heal_report(res) -> list[dict]:
    return next(s for s in res.report["stages"] if s["stage"] == "heal")["layers"]


def weights(path) -> dict:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_identity_child_is_unchanged(tmp_path, kind):
    """Nothing cut: the fit is exact, every tensor stays (to float64 solve precision) the parent's."""
    pl, _, cls = make(kind, tmp_path)
    res = run(pl.path, tmp_path / "child", stages=[RANK, HEAL, {"slice_embeddings": {}}])
    rep = heal_report(res)
    assert len(rep) == 4
    for layer in rep:
        assert layer["attn_rel_err"] == [0.0, 0.0] and layer["residual_rel_err"] == [0.0, 0.0], layer
    parent, child = weights(pl.path), weights(tmp_path / "child")
    assert parent.keys() >= child.keys()
    for k, v in child.items():
        assert (v - parent[k]).abs().max() <= 1e-5 * max(1.0, float(parent[k].abs().max())), k
    ids = tokens(96)
    assert rel_err(logits(tmp_path / "child", ids, cls), logits(pl.path, ids, cls)) < 1e-5
    assert not [p for p in (tmp_path / "child").iterdir() if "heal" in p.name]  # scratch files gone


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "bert", "distilbert"])
def test_planted_parent_stays_exact(tmp_path, kind):
    """Dead hidden dims, neurons, KV groups and a dead layer cut: heal keeps the exact child exact;
    a live layer dropped instead (negative control): heal lowers the error but the child differs."""
    pl, target, cls = make(kind, tmp_path)
    keep = [i for i in range(4) if i not in pl.dead_layers]
    res = run(pl.path, tmp_path / "child", target=target,
              stages=[RANK, {"drop_layers": {"keep": keep}}, HEAL, {"slice_embeddings": {}}, {"rescale_norms": {}}])
    assert res.report["kept"]["layers"] == keep
    for layer in heal_report(res):
        assert max(layer["attn_rel_err"] + layer["residual_rel_err"]) < 1e-6, layer
    ids = tokens(96)
    ref = logits(pl.path, ids, cls)
    assert rel_err(logits(tmp_path / "child", ids, cls), ref) < 1e-4

    x = min(i for i in range(1, 4) if i not in pl.dead_layers)
    live = [i for i in range(4) if i != x]  # drops a live layer (the dead one is kept: its zero
    # projections would stay zero under the default max_change)
    res = run(pl.path, tmp_path / "neg", target=target,
              stages=[RANK, {"drop_layers": {"keep": live}}, HEAL, {"slice_embeddings": {}}, {"rescale_norms": {}}])
    rep = heal_report(res)
    assert max(layer["residual_rel_err"][0] for layer in rep) > 1e-2
    assert any(layer["residual_rel_err"][1] < 0.9 * layer["residual_rel_err"][0] for layer in rep)
    assert rel_err(logits(tmp_path / "neg", ids, cls), ref) > 1e-3


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_heal_lowers_every_error_on_a_live_cut(tmp_path, kind):
    """A random (unplanted) parent cut in width and depth: each layer's attention and residual
    errors go down on the calibration tokens. (A random tiny model's logits on other tokens
    need not follow: the real-model test in test_real.py checks held-out outputs.)"""
    import transformers

    pl, target, cls = make(kind, tmp_path)
    target = dict(target, num_hidden_layers=2)
    if kind == "llama":  # no dead parts at all
        pl = planted.llama_like(tmp_path / "live", dead_hidden=0, dead_ffn=0, dead_kv=0, dead_layers=())
    stages = [RANK, {"drop_layers": {"strategy": "middle"}}, {"slice_embeddings": {}}, {"rescale_norms": {}}]
    run(pl.path, tmp_path / "plain", target=target, stages=stages)
    res = run(pl.path, tmp_path / "healed", target=target, stages=stages[:2] + [HEAL] + stages[2:])
    for layer in heal_report(res):
        for key in ("attn_rel_err", "residual_rel_err"):
            before, after = layer[key]
            assert after <= before + 1e-9, layer
        assert layer["residual_rel_err"][1] < layer["residual_rel_err"][0]
    if kind == "gpt2":  # Conv1D [in, out] weights and their biases are refitted too
        a, b = weights(tmp_path / "plain"), weights(tmp_path / "healed")
        bias = next(k for k in a if k.endswith("h.1.mlp.c_proj.bias"))
        assert not torch.equal(a[bias], b[bias])
        w = bias.replace("bias", "weight")
        assert a[w].shape == b[w].shape == (224, 64)
    transformers.AutoConfig.from_pretrained(tmp_path / "healed")


def test_heal_when_auto_skips_an_uncut_child(tmp_path):
    pl = planted.llama_like(tmp_path / "p")
    res = run(pl.path, tmp_path / "c", stages=[{"heal": {"when": "auto", "calibration": CALIB}}, {"slice_embeddings": {}}])
    st = next(s for s in res.report["stages"] if s["stage"] == "heal")
    assert st["skipped"] == "no layer is dropped (when: auto)"
    rep = json.loads((tmp_path / "c" / "shrinkit_report.json").read_text())
    assert rep["stages"][0]["stage"] == "heal"


@pytest.mark.parametrize("stages,msg", [
    ([{"slice_embeddings": {}}, {"heal": {}}], "heal must come before slice_embeddings"),
    ([{"heal": {}}, {"rank_neurons": {}}, {"slice_embeddings": {}}], "rank_neurons must come before heal"),
    ([{"heal": {"alpha": 0}}, {"slice_embeddings": {}}], "greater than 0"),
    ([{"heal": {"weight": "abs"}}, {"slice_embeddings": {}}], "weight"),
    ([{"heal": {"max_change": 0}}, {"slice_embeddings": {}}], "greater than 0"),
    ([{"heal": {"max_change": float("inf")}}, {"slice_embeddings": {}}], "max_change"),
])
def test_heal_recipe_errors(stages, msg):
    with pytest.raises((RecipeError, ValueError)) as e:
        recipe(stages=stages)
    assert msg in str(e.value)


def test_default_pipeline_heals_only_when_layers_drop(tmp_path):
    """The default pipeline has `heal: {when: auto}`: it heals a child that drops layers when
    calibration text can be formed, and says why when it does not."""
    from shrinkit.recipe import Recipe

    assert {"heal": {"when": "auto"}} in Recipe().stages
    pl = planted.llama_like(tmp_path / "p")
    res = run(pl.path, tmp_path / "a", target=dict(num_hidden_layers=3),
              stages=[{"drop_layers": {"keep": [0, 1, 3]}}, {"heal": {"when": "auto"}}, {"slice_embeddings": {}}])
    assert heal_stage(res)["skipped"] == "no tokenizer for the calibration text (when: auto)"
    res = run(pl.path, tmp_path / "b", target=dict(num_hidden_layers=3),
              stages=[{"drop_layers": {"keep": [0, 1, 3]}}, {"heal": {"when": "auto", "calibration": CALIB}},
                      {"slice_embeddings": {}}])
    assert len(heal_stage(res)["layers"]) == 3
    res = run(pl.path, tmp_path / "c", target=dict(intermediate_size=64),
              stages=[RANK, {"heal": {"when": "auto", "calibration": CALIB}}, {"slice_embeddings": {}}])
    assert heal_stage(res)["skipped"] == "no layer is dropped (when: auto)"
    enc = planted.bert(tmp_path / "b", mlm=False)
    res = run(enc.path, tmp_path / "d", target=dict(num_hidden_layers=3),
              stages=[{"drop_layers": {"keep": [0, 2, 3]}}, {"heal": {"when": "auto", "calibration": CALIB}},
                      {"slice_embeddings": {}}])
    assert heal_stage(res)["skipped"].startswith("post-norm family")


def heal_stage(res) -> dict:
    return next(s for s in res.report["stages"] if s["stage"] == "heal")


# ------------------------------------------------------------------ the dual form (fewer tokens than inputs)
FEW = {"data": "random_tokens", "samples": 1, "seq_len": 32, "batch_size": 4}  # 32 tokens < every fitted input


def _fits(n, n_in, n_out, bias, seed=0):
    """The same weighted rows fed to a primal and a dual Fit, and the float64 ridge solution."""
    from shrinkit.stages.heal import Fit

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g) @ torch.randn(8, n_in, generator=g) + 0.1 * torch.randn(n, n_in, generator=g)
    R = torch.randn(n, n_out, generator=g)
    w = torch.rand(n, generator=g) + 0.5
    fits = {"streamed": Fit(n_in, n_out, bias, "cpu"), "stored": Fit(n_in, n_out, bias, "cpu", tokens=n)}
    for f in fits.values():
        for s in range(0, n, 7):
            f.add(X[s:s + 7], R[s:s + 7], w[s:s + 7], R[s:s + 7])
    Xa = X.double() * w.double()[:, None]
    if bias:
        Xa = torch.cat([Xa, w.double()[:, None]], 1)
    G = Xa.T @ Xa
    lam = 1e-3 * G.diagonal().mean()
    D64 = torch.linalg.solve(G + lam * torch.eye(len(G), dtype=torch.float64), Xa.T @ (R.double() * w.double()[:, None]))
    after64 = float((R.double() * w.double()[:, None] - Xa @ D64).pow(2).sum() / (R.double() * w.double()[:, None]).pow(2).sum()) ** 0.5
    return fits, D64, after64


@pytest.mark.parametrize("n,n_in,bias", [(32, 64, False), (32, 224, True), (300, 64, False), (300, 224, True)])
def test_stored_fit_is_the_streamed_fit(n, n_in, bias):
    """Rows stored in scratch mappings and solved afterwards (in the dual form when there are
    fewer tokens than inputs, else the primal) give the ridge solution (against float64) as
    closely as the Gram matrix accumulated chunk by chunk does, and the same errors."""
    fits, D64, after64 = _fits(n, n_in, 16, bias)
    assert fits["stored"].dual == (n < n_in + bias) and not fits["streamed"].dual
    out = {m: f.solve(1e-3) for m, f in fits.items()}
    for m, (D, before, after) in out.items():
        assert D.shape == (n_in + bias, 16)
        assert float((D.double() - D64).norm() / D64.norm()) < 5e-3, m
        assert before == pytest.approx(1.0) and after == pytest.approx(after64, rel=1e-3), m
    # negative control: a different ridge weight is a different fit
    fits, _, _ = _fits(n, n_in, 16, bias)
    D, _, _ = fits["stored"].solve(1e-1)
    assert float((D.double() - D64).norm() / D64.norm()) > 1e-2


def test_dual_fit_of_an_exact_child_is_zero():
    from shrinkit.stages.heal import Fit

    f = Fit(64, 8, True, "cpu", tokens=20)
    x = torch.randn(20, 64)
    f.add(x, torch.zeros(20, 8), torch.rand(20) + 0.5, torch.randn(20, 8))
    D, before, after = f.solve(1e-3)
    assert f.dual and before == 0.0 and after == 0.0 and not D.any()


@pytest.mark.parametrize("kind,max_change", [("llama", None), ("gpt2", None), ("llama", 0.5), ("gpt2", 0.05)])
def test_dual_form_keeps_identity_and_planted_children_exact(tmp_path, kind, max_change, monkeypatch):
    """32 calibration tokens, fewer than every fitted projection's inputs: every fit takes the
    dual form (the bounded fit's too: its eigendecomposition is of the tokens x tokens matrix);
    nothing cut stays unchanged, a planted cut stays exact, a live layer dropped (negative
    control) is fitted but not exact."""
    from shrinkit.stages import heal as heal_mod

    calls = []
    if max_change is None:
        orig = heal_mod.Fit._solve_dual
        monkeypatch.setattr(heal_mod.Fit, "_solve_dual", lambda self, a: calls.append(self.k) or orig(self, a))
    else:
        orig = heal_mod.Fit._solve_bounded
        monkeypatch.setattr(heal_mod.Fit, "_solve_bounded",
                            lambda self, a, m: (calls.append(self.k) if self.dual else None) or orig(self, a, m))
    pl, target, cls = make(kind, tmp_path)
    few = {"heal": {"calibration": FEW, "max_change": max_change}}
    res = run(pl.path, tmp_path / "same", stages=[RANK, few, {"slice_embeddings": {}}])
    assert len(calls) == 2 * 4 and min(calls) > 32
    for layer in heal_report(res):
        assert layer["attn_rel_err"] == [0.0, 0.0] and layer["residual_rel_err"] == [0.0, 0.0], layer
    parent, child = weights(pl.path), weights(tmp_path / "same")
    for k, v in child.items():
        assert (v - parent[k]).abs().max() <= 1e-5 * max(1.0, float(parent[k].abs().max())), k

    keep = [i for i in range(4) if i not in pl.dead_layers]
    ids = tokens(96)
    ref = logits(pl.path, ids, cls)
    res = run(pl.path, tmp_path / "planted", target=target,
              stages=[RANK, {"drop_layers": {"keep": keep}}, few, {"slice_embeddings": {}}, {"rescale_norms": {}}])
    for layer in heal_report(res):
        assert max(layer["attn_rel_err"] + layer["residual_rel_err"]) < 1e-6, layer
    assert rel_err(logits(tmp_path / "planted", ids, cls), ref) < 1e-4
    res = run(pl.path, tmp_path / "neg", target=target,
              stages=[RANK, {"drop_layers": {"keep": [0, 1, 2]}}, few, {"slice_embeddings": {}}, {"rescale_norms": {}}])
    last = heal_report(res)[-1]
    assert last["residual_rel_err"][0] > 1e-2
    if max_change is None:
        assert last["residual_rel_err"][1] < last["residual_rel_err"][0]
    else:  # the kept layer is the planted dead one: its projections are zero (llama) or only a bias
        # (gpt2), which a relative bound keeps zero or nearly so
        assert last["mlp_fit"]["change"] <= max_change * (1 + 1e-5)
        assert last["residual_rel_err"][1] <= last["residual_rel_err"][0]
    assert rel_err(logits(tmp_path / "neg", ids, cls), ref) > 1e-3


# ------------------------------------------------------------------ the bounded fit (max_change)
@pytest.mark.parametrize("f64_max", [4096, 10])
def test_bounded_fit_is_the_ridge_fit_at_its_lambda(f64_max, monkeypatch):
    """Bounded: ||Delta|| lands on the bound (from below) and Delta is the float64 ridge solution
    at the lambda the fit chose, with the reported error; a bound the ridge fit already meets
    changes nothing (lambda stays alpha x mean diag); in both forms, with the eigendecomposition
    in float64 and (f64_max 10) in float32."""
    from shrinkit.stages import heal as heal_mod

    monkeypatch.setattr(heal_mod, "EIGH_F64_MAX", f64_max)
    tol = 5e-3 if f64_max > 1000 else 2e-2
    for n, n_in, bias in [(32, 224, True), (300, 64, False)]:
        fits, D64, after64 = _fits(n, n_in, 16, bias)
        X, R, w = _rows(n, n_in, 16, bias)
        for form in ("streamed", "stored"):
            f = _fits(n, n_in, 16, bias)[0][form]
            D, _, after = f.solve(1e-3, max_norm=10 * float(D64.norm()))
            assert not f.info["bounded"] and f.info["lambda_rel"] == pytest.approx(1e-3)
            assert float((D.double() - D64).norm() / D64.norm()) < tol and after == pytest.approx(after64, rel=tol / 2)
            bound = 0.3 * float(D64.norm())
            f = _fits(n, n_in, 16, bias)[0][form]
            D, before, after = f.solve(1e-3, max_norm=bound)
            assert f.info["bounded"] and f.info["lambda_rel"] > 1e-3
            assert 0.999 * bound <= float(D.double().norm()) <= bound
            G = X.T @ X
            lam = f.info["lambda_rel"] * float(G.diagonal().mean())
            ref = torch.linalg.solve(G + lam * torch.eye(len(G), dtype=torch.float64), X.T @ R)
            assert float((D.double() - ref).norm() / ref.norm()) < tol, form
            err = float((R - X @ D.double()).pow(2).sum() / R.pow(2).sum()) ** 0.5
            assert after == pytest.approx(err, rel=tol / 2) and after64 < after < before


def _rows(n, n_in, n_out, bias, seed=0):
    """The weighted rows _fits feeds (float64): X (with the bias column), R."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g) @ torch.randn(8, n_in, generator=g) + 0.1 * torch.randn(n, n_in, generator=g)
    R = torch.randn(n, n_out, generator=g)
    w = torch.rand(n, generator=g) + 0.5
    Xa = X.double() * w.double()[:, None]
    if bias:
        Xa = torch.cat([Xa, w.double()[:, None]], 1)
    return Xa, R.double() * w.double()[:, None], w


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_max_change_bounds_every_refit_on_a_live_cut(tmp_path, kind):
    """A live cut (nothing planted dead) healed with max_change 0.05: every refitted projection
    (weight and bias) stays within 0.05 x the selected one (the un-healed child's, same recipe
    without heal), the report says which fits the bound set and how much each changed, and the
    errors still go down. Negative control: unbounded (max_change: null), some projection moves
    further than that."""
    if kind == "gpt2":
        pl = planted.gpt2(tmp_path / "live", dead_ffn=0, dead_layers=())
        target = dict(intermediate_size=224, num_hidden_layers=2)
    else:
        pl = planted.llama_like(tmp_path / "live", *(("qwen2",) if kind == "qwen2" else ()), dead_hidden=0, dead_ffn=0,
                                dead_kv=0, dead_layers=(), **(dict(tie=True, attention_bias=True) if kind == "qwen2" else {}))
        target = dict(LLAMA_CUT, num_hidden_layers=2)
    stages = [RANK, {"drop_layers": {"strategy": "middle"}}, {"slice_embeddings": {}}, {"rescale_norms": {}}]
    run(pl.path, tmp_path / "plain", target=target, stages=stages)
    sel = weights(tmp_path / "plain")
    projs = [k for k in sel if k.endswith(("o_proj.weight", "down_proj.weight", "c_proj.weight", "c_proj.bias"))]
    assert len(projs) >= 4

    def change(path):  # per projection: ||[W; b] - [W0; b0]|| / ||[W0; b0]||
        w, out = weights(path), {}
        for k in projs:
            base = k.rsplit(".", 1)[0]
            out[base] = out.get(base, (0.0, 0.0))
            d2, n2 = out[base]
            out[base] = (d2 + float((w[k].double() - sel[k].double()).pow(2).sum()), n2 + float(sel[k].double().pow(2).sum()))
        return {b: (d2 / n2) ** 0.5 for b, (d2, n2) in out.items()}

    res = run(pl.path, tmp_path / "bounded", target=target,
              stages=stages[:2] + [{"heal": {"calibration": CALIB, "max_change": 0.05}}] + stages[2:])
    ch = change(tmp_path / "bounded")
    assert max(ch.values()) <= 0.05 * (1 + 1e-5), ch
    rep = heal_report(res)
    assert any(layer[f]["bounded"] for layer in rep for f in ("attn_fit", "mlp_fit"))
    for layer in rep:
        for f in ("attn_fit", "mlp_fit"):
            assert layer[f]["change"] <= 0.05 * (1 + 1e-5) and layer[f]["lambda_rel"] >= 1e-2 * (1 - 1e-6)
        for key in ("attn_rel_err", "residual_rel_err"):
            assert layer[key][1] <= layer[key][0] + 1e-9, layer
    assert max(layer["residual_rel_err"][0] - layer["residual_rel_err"][1] for layer in rep) > 1e-3
    run(pl.path, tmp_path / "free", target=target,
        stages=stages[:2] + [{"heal": {"calibration": CALIB, "max_change": None}}] + stages[2:])
    assert max(change(tmp_path / "free").values()) > 0.06


def test_dinov2_heal_fits_through_the_layer_scale(tmp_path, monkeypatch):
    """A pre-norm ViT with layer scale (DINOv2): heal calibrates on images; a child cut to the
    planted parent's dead parts stays exact; on a live cut heal brings the child's output on the
    calibration images closer to the parent's, and fitting the MLP output as if there were no
    layer scale (negative control) does worse."""
    import transformers

    from shrinkit.images import calibration_pixels
    from shrinkit.stages import heal as heal_mod

    pl = planted.dinov2(tmp_path / "p", dead_ffn=64)
    calib = {"samples": 8}
    rank = {"rank_neurons": {"method": "activation", "calibration": calib}}
    fit = {"heal": {"calibration": calib}}
    target = dict(intermediate_size=64, num_hidden_layers=3)  # mlp_ratio 1
    keep = [i for i in range(4) if i not in pl.dead_layers]
    res = run(pl.path, tmp_path / "exact", target=target,
              stages=[rank, {"drop_layers": {"keep": keep}}, fit, {"slice_embeddings": {}}])
    for layer in heal_report(res):
        assert max(layer["attn_rel_err"] + layer["residual_rel_err"]) < 1e-6, layer

    x = calibration_pixels(pl.path, "builtin", 8)

    def out(path):
        with torch.no_grad():
            return transformers.AutoModel.from_pretrained(str(path)).eval()(pixel_values=x).last_hidden_state

    ref = out(pl.path)
    live = [0, 2, 3]  # drops the live layer 1
    cut = [rank, {"drop_layers": {"keep": live}}]
    run(pl.path, tmp_path / "plain", target=target, stages=cut + [{"slice_embeddings": {}}])
    res = run(pl.path, tmp_path / "healed", target=target, stages=cut + [fit, {"slice_embeddings": {}}])
    first = heal_report(res)[0]  # parent layer 0: its fit absorbs the dropped layer 1
    assert first["residual_rel_err"][1] < first["residual_rel_err"][0]
    plain, healed = rel_err(out(tmp_path / "plain"), ref), rel_err(out(tmp_path / "healed"), ref)
    assert healed < 0.9 * plain, (healed, plain)
    monkeypatch.setattr(heal_mod, "_unscale", lambda layer, scale, delta: delta)
    run(pl.path, tmp_path / "unscaled", target=target, stages=cut + [fit, {"slice_embeddings": {}}])
    assert rel_err(out(tmp_path / "unscaled"), ref) > 1.05 * healed
