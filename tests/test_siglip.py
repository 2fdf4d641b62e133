"""SigLIP's vision tower (siglip_vision_model): no CLS token, post_layernorm over every position,
and an attention-pooling head (probe, fused in_proj, MLP) cut in the blocks' spaces with kept
sets of its own.

The planted parent (transformers' SiglipVisionConfig, planted by hand): dead FFN neurons in every
layer and in the head's MLP, a dead head per layer and in the head's attention, and a dead layer.
LayerNorm makes hidden cuts inexact and heads go with the hidden size, so the exact test cuts FFN
neurons (the head's too) and layers and compares the pooled head output and the hidden states;
heads are checked by their kept indices (the head's own included)."""

import json

import pytest
import torch

import planted
from helpers import inspect_and_plan, load, recipe
from planted import Planted, _choose, _randomize, rel_err
from shrinkit.pipeline import subclone
from test_vision import alive, run, stages

TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=4, image_size=32,
            patch_size=8, layer_norm_eps=1e-12)
TARGET = dict(intermediate_size=64, num_hidden_layers=3)


def siglip_parent(tmp, *, dead_ffn=32, dead_heads=1, dead_layers=(2,), seed=0, dtype=torch.float32, **kw) -> Planted:
    import transformers

    cfg = transformers.SiglipVisionConfig(**{**TINY, **kw})
    torch.manual_seed(seed)
    model = transformers.SiglipVisionModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    H, F, nh = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    hd = H // nh
    pl = Planted(tmp, dead_layers=list(dead_layers))
    mlps = [layer.mlp for layer in model.encoder.layers]
    if cfg.vision_use_head:
        mlps.append(model.head.mlp)
    with torch.no_grad():
        for li, m in enumerate(mlps):   # index len(layers): the head's MLP
            fs = pl.dead_ffn[li] = _choose(gen, F, dead_ffn) if dead_ffn else []
            m.fc1.weight[fs] = 0
            m.fc1.bias[fs] = 0
            m.fc2.weight[:, fs] = 0
        for li, layer in enumerate(model.encoder.layers):
            a = layer.self_attn
            hs = pl.dead_q[li] = _choose(gen, nh, dead_heads) if dead_heads else []
            for h in hs:
                for lin in (a.q_proj, a.k_proj, a.v_proj):
                    lin.weight[h * hd:(h + 1) * hd] = 0
                    lin.bias[h * hd:(h + 1) * hd] = 0
                a.out_proj.weight[:, h * hd:(h + 1) * hd] = 0
            if li in pl.dead_layers:
                for lin in (a.out_proj, layer.mlp.fc2):
                    lin.weight.zero_()
                    lin.bias.zero_()
        if cfg.vision_use_head and dead_heads:
            att = model.head.attention
            hs = pl.dead_q["head"] = _choose(gen, nh, dead_heads)
            for h in hs:
                for part in range(3):
                    att.in_proj_weight[part * H + h * hd:part * H + (h + 1) * hd] = 0
                    att.in_proj_bias[part * H + h * hd:part * H + (h + 1) * hd] = 0
                att.out_proj.weight[:, h * hd:(h + 1) * hd] = 0
    model.to(dtype).save_pretrained(tmp)
    (tmp / "preprocessor_config.json").write_text(json.dumps(planted.VISION_PRE))
    pl.config = model.config.to_dict()
    return pl


def real_parent(path):
    import transformers

    torch.manual_seed(0)
    m = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**{**TINY, "layer_norm_eps": 1e-6}))
    _randomize(m, torch.Generator().manual_seed(0))
    m.to(torch.bfloat16).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(planted.VISION_PRE))
    return path


@torch.no_grad()
def outs(path):
    o = load(path, "AutoModel")(pixel_values=planted.pixels())
    return o.pooler_output, o.last_hidden_state


@pytest.mark.parametrize("head", [True, False])
@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_siglip_vision_planted_exact(tmp_path, method, head):
    pl = siglip_parent(tmp_path / "parent", vision_use_head=head)
    res = run(pl.path, tmp_path / "child", target=TARGET, stages=stages(method))
    kept = res.report["kept"]
    assert kept["layers"] == [0, 1, 3]
    for ci, p in enumerate(kept["layers"]):
        assert kept["ffn"][str(ci)] == alive(96, pl.dead_ffn[p])
    if head:   # the head's MLP: its own kept set (key None), ranked by its weights
        assert kept["ffn"]["outside"] == alive(96, pl.dead_ffn[4]), kept["ffn"].keys()
    (pp, ph), (cp, ch) = outs(pl.path), outs(tmp_path / "child")
    assert rel_err(ch, ph) < 1e-4, rel_err(ch, ph)
    assert (cp is None) == (pp is None) == (not head)   # no head: no pooled output
    if head:
        assert rel_err(cp, pp) < 1e-4, rel_err(cp, pp)


def test_siglip_vision_negative_controls(tmp_path):
    """`first` neurons, a live layer dropped, or the head's neurons taken as the first ones all
    break the child."""
    from shrinkit.ranking import magnitude as rank

    pl = siglip_parent(tmp_path / "parent")
    ref, _ = outs(pl.path)
    run(pl.path, tmp_path / "first", target=TARGET, stages=stages("first"))
    assert rel_err(outs(tmp_path / "first")[0], ref) > 1e-2
    run(pl.path, tmp_path / "wrong", target=TARGET, stages=stages("magnitude", drop=(1,)))
    assert rel_err(outs(tmp_path / "wrong")[0], ref) > 1e-2
    with pytest.MonkeyPatch.context() as mp:   # the head's weights not scored: its first neurons kept
        real = rank.magnitude_scores
        mp.setattr(rank, "magnitude_scores", lambda ckpt, plan, need, layers, *a: {
            k: v for k, v in real(ckpt, plan, need, layers, *a).items() if k[1] is not None})
        run(pl.path, tmp_path / "headfirst", target=TARGET, stages=stages("magnitude"))
    pooled, hidden = outs(tmp_path / "headfirst")
    assert rel_err(hidden, outs(pl.path)[1]) < 1e-4 and rel_err(pooled, ref) > 1e-2


def test_siglip_vision_dead_heads_are_the_ones_dropped(tmp_path):
    pl = siglip_parent(tmp_path / "parent", dead_ffn=0, dead_layers=())
    target = dict(hidden_size=48, num_attention_heads=3)
    for method in ("magnitude", "activation"):
        res = run(pl.path, tmp_path / method, target=target, stages=stages(method, drop=()))
        for li in range(4):
            assert res.report["kept"]["q_heads"][str(li)] == alive(4, pl.dead_q[li]), (method, li)
        assert res.report["kept"]["q_heads"]["outside"] == alive(4, pl.dead_q["head"])
        m = load(tmp_path / method, "AutoModel")
        assert m.head.attention.in_proj_weight.shape == (3 * 48, 48)


def test_siglip_vision_real_config_cut_calibrates_verifies(tmp_path):

    p = real_parent(tmp_path / "parent")
    target = dict(hidden_size=48, num_attention_heads=3, intermediate_size=64, num_hidden_layers=3)
    res = subclone(p, recipe(target=target, stages=stages("activation", "importance"), verify={"samples": 6}),
                   tmp_path / "child", verify=True)
    m = load(tmp_path / "child", "AutoModel")
    assert (m.config.hidden_size, m.config.num_hidden_layers) == (48, 3)
    v = res.report["verify"]
    assert v["kind"] == "encoder" and v["pool"] == "mean"
    assert v["child"]["similarity_pearson"] > v["random_init"]["similarity_pearson"]
    inspect_and_plan(tmp_path, p, "siglip_vision_model", {"target": target, "stages": stages(drop=(2,))})
