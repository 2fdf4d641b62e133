"""ConvNeXt and ConvNeXt V2: spaces per stage (a width per stage, FFN neurons per layer), per-stage
depths, planted parents and negative controls, tiny real configs cut and loaded with no missing
or unexpected keys, calibration and verification on images, inspect and plan, recipe errors
and budget targets.

What is exact. Whole layers: a layer whose layer scale (V1) or output projection (V2) is zero is
the identity, so a child that drops exactly those reproduces the parent (< 1e-4). FFN neurons:
transformers fixes a layer's FFN at 4 x its stage's width, so a child cannot cut neurons
without cutting channels; the neuron cut is checked layer by layer from the written tensors
(a dead neuron's removal is exact, V2 included thanks to the GRN scale compensation: without it
the error is large). Channels: every LayerNorm (stem, blocks, downsampling) takes its mean and
variance over a stage's channels, so removing even dead channels changes them: there the test
is that ranking keeps exactly the live channels and neurons, and a `first` ranking does not."""

import json

import pytest
import torch
import torch.nn.functional as Fn

import planted
from helpers import load, recipe
from planted import _choose, _randomize, rel_err
from shrinkit.checkpoint.reader import open_checkpoint
from shrinkit.pipeline import subclone
from test_errors import assert_failed, cli

CALIB = {"samples": 8}
HIDDEN, DEPTHS = [16, 24, 32], [2, 3, 2]


def classes(v2: bool, classifier: bool):
    import transformers
    cfg = transformers.ConvNextV2Config if v2 else transformers.ConvNextConfig
    if classifier:
        return cfg, (transformers.ConvNextV2ForImageClassification if v2 else transformers.ConvNextForImageClassification)
    return cfg, (transformers.ConvNextV2Model if v2 else transformers.ConvNextModel)


def auto(classifier: bool) -> str:
    return "AutoModelForImageClassification" if classifier else "AutoModel"


def prefix(v2):
    return "convnextv2" if v2 else "convnext"


@torch.no_grad()
def convnext_parent(tmp, *, v2=False, classifier=True, dead_layers=(0, 6), dead_ffn=(0, 0, 0), dead_hidden=(0, 0, 0),
                    seed=0, hidden=HIDDEN, depths=DEPTHS) -> planted.Planted:
    """A planted ConvNeXt parent (random weights with real spread). Dead layers (numbered across
    stages): layer scale zero (V1) or pwconv2 zero (V2), so the layer is the identity. Dead FFN
    neurons (dead_ffn[s] in every layer of stage s): pwconv1 rows and bias, GRN scale and bias
    (V2) and pwconv2 columns zero. Dead
    channels of stage s: every tensor that writes or reads the channel is zero there (stem or
    downsampling conv, every LayerNorm, dwconv, pwconv1 columns, pwconv2 rows, layer scale,
    the next downsampling's LayerNorm and conv columns, the final norm and the classifier)."""
    cfg_cls, cls = classes(v2, classifier)
    cfg = cfg_cls(num_stages=len(depths), depths=list(depths), hidden_sizes=list(hidden), image_size=32, num_labels=5)
    torch.manual_seed(seed)
    model = cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    base = getattr(model, prefix(v2), model)
    pl = planted.Planted(tmp)
    pl.dead_layers = list(dead_layers)
    pl.dead_stage = {}
    for s, stage in enumerate(base.encoder.stages):
        D = _choose(gen, hidden[s], dead_hidden[s]) if dead_hidden[s] else []
        pl.dead_stage[s] = D
        if D:
            if s == 0:
                writers = [base.embeddings.patch_embeddings, base.embeddings.layernorm]
            else:
                writers = [stage.downsampling_layer[1]]
            for m in writers:
                m.weight[D] = 0
                m.bias[D] = 0
            nxt = base.encoder.stages[s + 1] if s + 1 < len(depths) else None
            if nxt is not None:
                nxt.downsampling_layer[0].weight[D] = 0
                nxt.downsampling_layer[0].bias[D] = 0
                nxt.downsampling_layer[1].weight[:, D] = 0
            else:
                base.layernorm.weight[D] = 0
                base.layernorm.bias[D] = 0
                if classifier:
                    model.classifier.weight[:, D] = 0
        for j, layer in enumerate(stage.layers):
            i = sum(depths[:s]) + j
            if D:
                layer.dwconv.weight[D] = 0
                layer.dwconv.bias[D] = 0
                layer.layernorm.weight[D] = 0
                layer.layernorm.bias[D] = 0
                layer.pwconv1.weight[:, D] = 0
                layer.pwconv2.weight[D] = 0
                layer.pwconv2.bias[D] = 0
                if not v2:
                    layer.layer_scale_parameter[D] = 0
            if dead_ffn[s]:
                fs = pl.dead_ffn[i] = _choose(gen, 4 * hidden[s], dead_ffn[s])
                layer.pwconv1.weight[fs] = 0
                layer.pwconv1.bias[fs] = 0
                layer.pwconv2.weight[:, fs] = 0
                if v2:
                    layer.grn.weight[..., fs] = 0
                    layer.grn.bias[..., fs] = 0
            if i in pl.dead_layers:
                if v2:
                    layer.pwconv2.weight.zero_()
                    layer.pwconv2.bias.zero_()
                else:
                    layer.layer_scale_parameter.zero_()
    model.save_pretrained(tmp)
    (tmp / "preprocessor_config.json").write_text(json.dumps(planted.VISION_PRE))
    pl.config = model.config.to_dict()
    return pl


def stages(method="magnitude", drop=None, calib=None):
    d = {"strategy": "importance", "calibration": calib or CALIB} if drop == "importance" else {"drop": list(drop)}
    return [{"rank_neurons": {"method": method, "calibration": calib or CALIB}}, {"drop_layers": d},
            {"slice_embeddings": {}}, {"rescale_norms": {}}]


def run(parent, out, check=False, **data):
    return subclone(parent, recipe(**data), out, verify=check)


@torch.no_grad()
def outputs(path, classifier=True, x=None):
    out = load(path, auto(classifier))(pixel_values=planted.pixels() if x is None else x)
    return out.logits if classifier else out.pooler_output


# ---------------------------------------------------------------- exact: whole layers
@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("classifier", [True, False])
def test_convnext_planted_layers_exact(tmp_path, v2, classifier):
    """Dead layers in stages 0 and 2 (layers 0 and 6 across stages): drop_layers by list and by
    Block Influence keeps exactly the others, per stage, and the child computes the parent's
    outputs; dropping a live layer instead does not."""
    pl = convnext_parent(tmp_path / "parent", v2=v2, classifier=classifier)
    ref = outputs(pl.path, classifier)
    target = {"depths": [1, 3, 1]}
    for method, drop in (("magnitude", [0, 6]), ("activation", "importance")):
        res = run(pl.path, tmp_path / method, target=target, stages=stages(method, drop))
        assert res.report["kept"]["layers"] == [1, 2, 3, 4, 5]
        cfg = json.loads((tmp_path / method / "config.json").read_text())
        assert cfg["depths"] == [1, 3, 1] and cfg["hidden_sizes"] == HIDDEN
        assert rel_err(outputs(tmp_path / method, classifier), ref) < 1e-4, method
    run(pl.path, tmp_path / "wrong", target=target, stages=stages("magnitude", [1, 6]))
    assert rel_err(outputs(tmp_path / "wrong", classifier), ref) > 1e-2


def test_convnext_depths_must_match_the_drop_list(tmp_path):
    pl = convnext_parent(tmp_path / "parent")
    err = assert_failed(cli("subclone", pl.path, "-r", _recipe_file(tmp_path, {"depths": [1, 3, 1]}, drop=[0, 1]),
                            "--out", tmp_path / "c"), 2, tmp_path / "c", "stage 0", "depths")
    assert "keeps 0 layers of stage 0" in err


# ---------------------------------------------------------------- ranking: live channels and neurons
@pytest.mark.parametrize("v2", [False, True])
def test_convnext_ranking_keeps_exactly_the_live_channels_and_neurons(tmp_path, v2):
    """Dead channels in every stage and dead FFN neurons in every layer, cut to exactly the live
    counts: both rankings keep exactly the live ones (in each stage and layer); `first` does
    not. The outputs are not compared: LayerNorm over a stage's channels is never exact."""
    dead_h = (4, 8, 8)
    pl = convnext_parent(tmp_path / "parent", v2=v2, dead_hidden=dead_h, dead_ffn=tuple(4 * d for d in dead_h),
                         dead_layers=())
    child_h = [h - d for h, d in zip(HIDDEN, dead_h)]          # 12, 16, 24 -> FFN 48, 64, 96 per layer
    target = {"hidden_sizes": child_h}
    for method in ("magnitude", "activation"):
        res = run(pl.path, tmp_path / method, target=target, stages=stages(method, []))
        kept = res.report["kept"]
        for s, D in pl.dead_stage.items():
            assert kept["stage_hidden"][str(s)] == [c for c in range(HIDDEN[s]) if c not in D], (method, s)
        for i, fs in pl.dead_ffn.items():
            s = 0 if i < 2 else 1 if i < 5 else 2
            live = [f for f in range(4 * HIDDEN[s]) if f not in fs]
            assert len(live) == 4 * child_h[s]
            assert kept["stage_ffn"][str(i)] == live, (method, i)
        load(tmp_path / method, "AutoModelForImageClassification")
    res = run(pl.path, tmp_path / "first", target=target, stages=stages("first", []))
    assert res.report["kept"]["stage_hidden"]["0"] != [c for c in range(16) if c not in pl.dead_stage[0]]


# ---------------------------------------------------------------- exact: the FFN cut, layer by layer
def _layer(T, p, x, v2, ffn_scale=1.0):
    """One ConvNeXt layer from raw tensors (as transformers computes it)."""
    C = x.shape[1]
    y = Fn.conv2d(x, T[p + "dwconv.weight"], T[p + "dwconv.bias"], padding=3, groups=C).permute(0, 2, 3, 1)
    y = Fn.layer_norm(y, (C,), T[p + "layernorm.weight"], T[p + "layernorm.bias"], 1e-6)
    y = Fn.gelu(Fn.linear(y, T[p + "pwconv1.weight"], T[p + "pwconv1.bias"]))
    if v2:
        g = torch.linalg.vector_norm(y, ord=2, dim=(1, 2), keepdim=True)
        y = T[p + "grn.weight"] * ffn_scale * (y * g / (g.mean(-1, keepdim=True) + 1e-6)) + T[p + "grn.bias"] + y
    y = Fn.linear(y, T[p + "pwconv2.weight"], T[p + "pwconv2.bias"])
    if not v2:
        y = T[p + "layer_scale_parameter"] * y
    return x + y.permute(0, 3, 1, 2)


@pytest.mark.parametrize("v2", [False, True])
def test_convnext_ffn_cut_is_exact_per_layer(tmp_path, v2):
    """A plan that cuts only FFN neurons (a shape transformers cannot load, since it ties the FFN
    to 4 x the width, so checked on the written tensors layer by layer): every layer with its
    dead neurons removed computes what the parent's layer computes; for V2 only with the GRN
    scale compensated (the negative control leaves it as the parent's)."""
    from dataclasses import replace

    from shrinkit.plan import Plan, check_parent
    from shrinkit.ranking import select
    from shrinkit.ranking.magnitude import magnitude_scores
    from shrinkit.stages.slice import slice_blocks

    pl = convnext_parent(tmp_path / "parent", v2=v2, dead_ffn=(16, 16, 16), dead_layers=())
    with open_checkpoint(pl.path) as ck:
        fam, p = check_parent(ck)
        c = replace(p, intermediate_sizes=tuple(f - 16 for f in p.intermediate_sizes))
        plan = Plan(fam, p, c, torch.float32, cast=False)
        plan.layers = list(range(p.num_hidden_layers))
        select(plan, "magnitude", magnitude_scores(ck, plan, {fam.spaces()[-1]}, set(plan.layers)), plan.layers, 0)
        P = {n: ck.get(n).float() for n in ck.tensors}
        C = {ct.name: torch.cat(list(slice_blocks(plan, ct, ck.get(ct.parent.name)))) for ct in plan.child_tensors(ck)}
    for i, fs in pl.dead_ffn.items():
        assert plan.kept[(fam.spaces()[-1], i)].tolist() == [f for f in range(4 * HIDDEN[p.stage_of(i)]) if f not in fs]
    gen = torch.Generator().manual_seed(1)
    for i in range(p.num_hidden_layers):
        s = p.stage_of(i)
        j = i - p.layer_offset(s)
        pre = f"{prefix(v2)}.encoder.stages.{s}.layers.{j}."
        x = torch.randn(2, HIDDEN[s], 8, 8, generator=gen)
        ref = _layer(P, pre, x, v2)
        assert rel_err(_layer(C, pre, x, v2), ref) < 1e-5, i
        if v2:  # the GRN scale as the parent's: the mean response over fewer neurons is larger
            n_p, n_c = p.intermediate_sizes[s], c.intermediate_sizes[s]
            assert rel_err(_layer(C, pre, x, v2, ffn_scale=n_c / n_p), ref) > 1e-3, i


# ---------------------------------------------------------------- tiny real configs
def real_parent(tmp, v2=False, classifier=True):
    """transformers' own ConvNextConfig / ConvNextV2Config with random weights (4 stages)."""
    cfg_cls, cls = classes(v2, classifier)
    torch.manual_seed(0)
    m = cls(cfg_cls(num_stages=4, depths=[2, 2, 3, 2], hidden_sizes=[16, 24, 40, 48], image_size=32, num_labels=3))
    _randomize(m, torch.Generator().manual_seed(0))
    m.save_pretrained(tmp)
    (tmp / "preprocessor_config.json").write_text(json.dumps(planted.VISION_PRE))
    return tmp


REAL_TARGET = {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 2, 2, 1]}


@pytest.mark.parametrize("v2,classifier", [(False, True), (True, True), (False, False), (True, False)])
def test_convnext_real_config_cut_loads_calibrates_and_verifies(tmp_path, v2, classifier):
    parent = real_parent(tmp_path / "parent", v2, classifier)
    res = run(parent, tmp_path / "child", check=True, target=REAL_TARGET, verify={"samples": 6},
              stages=stages("activation", "importance"))
    cfg = json.loads((tmp_path / "child" / "config.json").read_text())
    assert cfg["hidden_sizes"] == REAL_TARGET["hidden_sizes"] and cfg["depths"] == REAL_TARGET["depths"]
    assert cfg["num_stages"] == 4
    m = load(tmp_path / "child", auto(classifier))
    out = m(pixel_values=planted.pixels())
    assert torch.isfinite(out.logits if classifier else out.pooler_output).all()
    v = res.report["verify"]
    assert v["status"] == "ok" and v["kind"] == "encoder" and "child_keys" not in v, v
    assert res.report["child"]["dims"]["hidden_sizes"] == REAL_TARGET["hidden_sizes"]
    assert set(res.report["kept"]) == {"layers", "stage_hidden", "stage_ffn"}
    assert len(res.report["kept"]["stage_hidden"]) == 4 and len(res.report["kept"]["stage_ffn"]) == 6
    if classifier:
        assert "top1_agreement" in v["child"]


def _recipe_file(tmp, target, drop=None, extra=None):
    import yaml
    st = [{"rank_neurons": {"method": "magnitude"}}] + ([{"drop_layers": {"drop": drop}}] if drop is not None else
                                                         [{"drop_layers": {}}]) + [{"slice_embeddings": {}}]
    p = tmp / "r.yaml"
    p.write_text(yaml.safe_dump({"target": target, "stages": st, **(extra or {})}))
    return p


def test_convnext_inspect_and_plan(tmp_path):
    parent = real_parent(tmp_path / "parent", v2=True)
    rc, out, err = cli("inspect", parent)
    assert rc == 0, err
    assert "convnextv2" in out and "[16, 24, 40, 48]" in out and "[2, 2, 3, 2]" in out
    assert "num_attention_heads" not in out     # no attention: not listed
    rc, out, err = cli("plan", parent, "-r", _recipe_file(tmp_path, REAL_TARGET))
    assert rc == 0, err
    assert "[8, 16, 24, 32]" in out and "[1, 2, 2, 1]" in out and "[32, 64, 96, 128]" in out


@pytest.mark.parametrize("target,needles", [
    ({"hidden_sizes": [8, 16, 24]}, ("hidden_sizes has 3 entries", "4 stages")),
    ({"hidden_sizes": [8, 16, 24, 64]}, ("hidden_sizes[3] 64", "larger than the parent's 48")),
    ({"depths": [1, 2, 2, 3]}, ("depths[3] 3", "larger")),
    ({"hidden_size": 32}, ("hidden_size does not apply", "hidden_sizes")),
    ({"num_hidden_layers": 4}, ("num_hidden_layers does not apply", "set depths")),
    ({"num_experts": 4}, ("num_experts", "no such dimension")),
])
def test_convnext_bad_targets_are_one_line_errors(tmp_path, target, needles):
    parent = real_parent(tmp_path / "parent")
    assert_failed(cli("subclone", parent, "-r", _recipe_file(tmp_path, target), "--out", tmp_path / "c"), 2,
                  tmp_path / "c", *needles)


def test_staged_targets_refused_on_a_flat_parent(tmp_path):
    pl = planted.vit(tmp_path / "vit")
    assert_failed(cli("subclone", pl.path, "-r", _recipe_file(tmp_path, {"hidden_sizes": [32]}), "--out",
                      tmp_path / "c"), 2, tmp_path / "c", "hidden_sizes", "no stages")


def test_convnext_rotate_and_heal_are_refused_cleanly(tmp_path):
    parent = real_parent(tmp_path / "parent")
    p = tmp_path / "rot.yaml"
    p.write_text("target: {hidden_sizes: [8, 16, 24, 32]}\nstages: [{rotate_hidden: {}}, {rank_neurons: {}}, "
                 "{slice_embeddings: {}}]\n")
    assert_failed(cli("subclone", parent, "-r", p, "--out", tmp_path / "c"), 2, tmp_path / "c", "rotate_hidden")


def test_convnext_budget_solves_widths_and_depths(tmp_path):
    parent = real_parent(tmp_path / "parent")
    p = tmp_path / "b.yaml"
    p.write_text("target: {params_ratio: 0.4, multiple_of: 8}\nstages: [{rank_neurons: {method: magnitude}}, "
                 "{drop_layers: {}}, {slice_embeddings: {}}]\n")
    res = subclone(parent, recipe(**__import__("yaml").safe_load(p.read_text())), tmp_path / "c")
    b = res.report["budget"]
    assert abs(res.report["child"]["params"] / res.report["parent"]["params"] - 0.4) <= 0.01 * 1.0001 or "note" in b, b
    dims = res.report["child"]["dims"]
    assert all(h % 8 == 0 for h in dims["hidden_sizes"]) and dims["hidden_sizes"] != [16, 24, 40, 48]
    assert all(1 <= d <= p_ for d, p_ in zip(dims["depths"], [2, 2, 3, 2]))
    load(tmp_path / "c", "AutoModelForImageClassification")
    # fixed widths: only the depths are solved
    p.write_text("target: {params_ratio: 0.7, hidden_sizes: [16, 24, 40, 48]}\nstages: [{rank_neurons: {}}, "
                 "{drop_layers: {}}, {slice_embeddings: {}}]\n")
    res = subclone(parent, recipe(**__import__("yaml").safe_load(p.read_text())), tmp_path / "d", force=True)
    assert res.report["child"]["dims"]["hidden_sizes"] == [16, 24, 40, 48]
    assert res.report["child"]["dims"]["depths"] != [2, 2, 3, 2]


def test_shipped_convnext_recipe_makes_the_femto_shape():
    """recipes/convnext-tiny-to-femto.yaml on ConvNeXt-T's dims gives ConvNeXt-F's shape."""
    from pathlib import Path

    from shrinkit.families import family_for
    from shrinkit.plan import resolve_target
    from shrinkit.recipe import load_recipe

    r = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "convnext-tiny-to-femto.yaml")
    cfg = {"model_type": "convnext", "hidden_sizes": [96, 192, 384, 768], "depths": [3, 3, 9, 3], "num_stages": 4}
    fam = family_for(cfg)
    child = resolve_target(fam, fam.dims(cfg), r, None)
    assert child.hidden_sizes == (48, 96, 192, 384) and child.depths == (2, 2, 6, 2)
    assert child.intermediate_sizes == (192, 384, 768, 1536)


def test_vision_child_is_replaced_with_force(tmp_path):
    """A vision child holds the parent's preprocessor_config.json (copied with it): --force
    recognizes the folder as an earlier child and replaces it."""
    parent = real_parent(tmp_path / "parent")
    r = _recipe_file(tmp_path, REAL_TARGET)
    rc, _, err = cli("subclone", parent, "-r", r, "--out", tmp_path / "c")
    assert rc == 0 and (tmp_path / "c" / "preprocessor_config.json").is_file(), err
    rc, _, err = cli("subclone", parent, "-r", r, "--out", tmp_path / "c", "--force")
    assert rc == 0, err


def test_convnext_rescale_norms_is_a_no_op(tmp_path):
    """One rescale factor cannot fit stages cut by different ratios: the stage changes nothing
    (the same tensors as without it) and the report says factor 1."""
    parent = real_parent(tmp_path / "parent")
    st = [{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {}}, {"slice_embeddings": {}}]
    a = run(parent, tmp_path / "a", target=REAL_TARGET, stages=st)
    b = run(parent, tmp_path / "b", target=REAL_TARGET, stages=st + [{"rescale_norms": {}}])
    assert b.report["stages"][-1] == {**b.report["stages"][-1], "stage": "rescale_norms", "factor": 1.0}
    with open_checkpoint(tmp_path / "a") as x, open_checkpoint(tmp_path / "b") as y:
        assert set(x.tensors) == set(y.tensors)
        for n in x.tensors:
            assert torch.equal(x.get(n), y.get(n)), n
    assert a.report["child"]["params"] == b.report["child"]["params"]


@pytest.mark.parametrize("change,needles", [
    ({"hidden_sizes": [16, 24, 40]}, ("hidden_sizes (3 entries) and depths (4)",)),
    ({"depths": "2,2,3,2"}, ("depths must be a list",)),
    ({"num_stages": 3}, ("num_stages is 3",)),
    ({"hidden_sizes": [16, 24, 40, 64]}, ("(stage_hidden", "48, but config.json makes it 64")),
])
def test_convnext_bad_parent_config_is_a_one_line_error(tmp_path, change, needles):
    parent = real_parent(tmp_path / "parent")
    cfg = json.loads((parent / "config.json").read_text())
    (parent / "config.json").write_text(json.dumps({**cfg, **change}))
    assert_failed(cli("subclone", parent, "-r", _recipe_file(tmp_path, {}), "--out", tmp_path / "c"), 3,
                  tmp_path / "c", *needles)


@pytest.mark.slow
@pytest.mark.parametrize("v2", [False, True])
def test_shipped_recipe_on_a_convnext_tiny_shaped_parent(tmp_path, v2):
    """The shipped recipe end to end at full size (ConvNeXt-T's shape, transformers' random init:
    no pretrained ConvNeXt is available offline): the ConvNeXt-F-shaped child loads with no
    missing or unexpected keys, runs on 224 x 224 images, and verification completes."""
    import transformers
    from shrinkit.recipe import load_recipe
    from pathlib import Path

    cfg_cls, cls = classes(v2, True)
    torch.manual_seed(0)
    cls(cfg_cls(num_labels=1000)).save_pretrained(tmp_path / "p")
    transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=224 / 256).save_pretrained(tmp_path / "p")
    r = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "convnext-tiny-to-femto.yaml")
    res = subclone(tmp_path / "p", r, tmp_path / "c", verify=True)
    assert res.report["child"]["dims"]["hidden_sizes"] == [48, 96, 192, 384]
    assert res.report["child"]["dims"]["depths"] == [2, 2, 6, 2]
    assert res.report["verify"]["status"] == "ok", res.report["verify"]
    m = load(tmp_path / "c", "AutoModelForImageClassification")
    assert torch.isfinite(m(pixel_values=planted.pixels(2, 224)).logits).all()
