"""CLIP's vision tower (clip_vision_model): CLIPVisionModel and CLIPVisionModelWithProjection.

The planted parent (transformers' CLIPVisionConfig, planted by hand): dead FFN neurons, a dead
head per layer and a dead layer (zero attention and FFN outputs, weights and biases: the
identity). LayerNorm makes hidden cuts inexact and heads go with the hidden size, so the exact
test cuts FFN neurons and layers (both the projected image embeddings and the hidden states must
match) and heads are checked by their kept indices. The projection keeps projection_dim."""

import json

import pytest
import torch
from typer.testing import CliRunner

import planted
from helpers import inspect_and_plan, load
from planted import Planted, _randomize, rel_err
from test_vision import alive, run, stages

PROJ = "CLIPVisionModelWithProjection"
TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=4, image_size=32,
            patch_size=8, projection_dim=24, layer_norm_eps=1e-12)
TARGET = dict(intermediate_size=64, num_hidden_layers=3)


def clip_parent(tmp, *, projection=True, dead_ffn=32, dead_heads=1, dead_layers=(2,), seed=0, dtype=torch.float32,
                **kw) -> Planted:
    import transformers

    cfg = transformers.CLIPVisionConfig(**{**TINY, **kw})
    torch.manual_seed(seed)
    model = (transformers.CLIPVisionModelWithProjection if projection else transformers.CLIPVisionModel)(cfg)
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    core = model.vision_model if projection else model
    H, F, nh = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    hd = H // nh
    pl = Planted(tmp, dead_layers=list(dead_layers))
    with torch.no_grad():
        planted.plant_blocks(core.encoder.layers, gen, pl, F, nh, hd, dead_ffn, dead_heads)
    model.to(dtype).save_pretrained(tmp)
    (tmp / "preprocessor_config.json").write_text(json.dumps(planted.VISION_PRE))
    pl.config = model.config.to_dict()
    return pl


def real_parent(path, projection=True):
    """A tiny random CLIPVisionConfig model, bfloat16, with a preprocessor config."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(**{**TINY, "layer_norm_eps": 1e-5})
    m = (transformers.CLIPVisionModelWithProjection if projection else transformers.CLIPVisionModel)(cfg)
    _randomize(m, torch.Generator().manual_seed(0))
    m.to(torch.bfloat16).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(planted.VISION_PRE))
    return path


@torch.no_grad()
def embeds(path, cls=PROJ):
    out = load(path, cls)(pixel_values=planted.pixels())
    return out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output, out.last_hidden_state


@pytest.mark.parametrize("projection", [True, False])
@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_clip_vision_planted_exact(tmp_path, method, projection):
    cls = PROJ if projection else "CLIPVisionModel"
    pl = clip_parent(tmp_path / "parent", projection=projection)
    res = run(pl.path, tmp_path / "child", target=TARGET, stages=stages(method))
    kept = res.report["kept"]
    assert kept["layers"] == [0, 1, 3]
    for ci, p in enumerate(kept["layers"]):
        assert kept["ffn"][str(ci)] == alive(96, pl.dead_ffn[p])
    (pe, ph), (ce, ch) = embeds(pl.path, cls), embeds(tmp_path / "child", cls)
    assert ce.shape == pe.shape == (3, 24 if projection else 64)
    assert rel_err(ce, pe) < 1e-4 and rel_err(ch, ph) < 1e-4, (rel_err(ce, pe), rel_err(ch, ph))


def test_clip_vision_negative_controls(tmp_path):
    pl = clip_parent(tmp_path / "parent")
    ref, _ = embeds(pl.path)
    run(pl.path, tmp_path / "first", target=TARGET, stages=stages("first"))
    assert rel_err(embeds(tmp_path / "first")[0], ref) > 1e-2
    run(pl.path, tmp_path / "wrong", target=TARGET, stages=stages("magnitude", drop=(1,)))
    assert rel_err(embeds(tmp_path / "wrong")[0], ref) > 1e-2


def test_clip_vision_dead_heads_are_the_ones_dropped(tmp_path):
    pl = clip_parent(tmp_path / "parent", dead_ffn=0, dead_layers=())
    target = dict(hidden_size=48, num_attention_heads=3)
    for method in ("magnitude", "activation"):
        res = run(pl.path, tmp_path / method, target=target, stages=stages(method, drop=()))
        for li in range(4):
            assert res.report["kept"]["q_heads"][str(li)] == alive(4, pl.dead_q[li]), (method, li)
        assert load(tmp_path / method, PROJ).visual_projection.weight.shape == (24, 48)
    res = run(pl.path, tmp_path / "first", target=target, stages=stages("first", drop=()))
    assert any(res.report["kept"]["q_heads"][str(li)] != alive(4, pl.dead_q[li]) for li in range(4))


def test_clip_vision_real_config_cut_calibrates_verifies(tmp_path):
    """A tiny random CLIPVisionModelWithProjection (bf16): cut in width and depth with activation
    ranking on images and importance dropping, loaded with no missing or unexpected keys (the
    projection keeps projection_dim), verified against random init; inspect and plan describe it."""

    p = real_parent(tmp_path / "parent")
    target = dict(hidden_size=48, num_attention_heads=3, intermediate_size=64, num_hidden_layers=3)
    from helpers import recipe
    from shrinkit.pipeline import subclone

    res = subclone(p, recipe(target=target, stages=stages("activation", "importance"), verify={"samples": 6}),
                   tmp_path / "child", verify=True)
    m = load(tmp_path / "child", PROJ)
    assert (m.config.hidden_size, m.config.num_hidden_layers, m.config.projection_dim) == (48, 3, 24)
    v = res.report["verify"]
    assert v["kind"] == "encoder" and v["pool"] == "first"
    assert v["child"]["similarity_pearson"] > v["random_init"]["similarity_pearson"]
    inspect_and_plan(tmp_path, p, "clip_vision_model", {"target": target, "stages": stages(drop=(2,))})


def test_force_replaces_an_image_child(tmp_path, write_recipe):
    """A vision child holds the parent's preprocessor_config.json (copied with it); `--force`
    replaces such a child like any other shrinkit child (it was refused as a foreign file)."""
    from shrinkit.cli import app

    p = real_parent(tmp_path / "parent")
    rec = write_recipe({"target": TARGET, "stages": stages(drop=(2,))})
    for _ in range(2):
        r = CliRunner().invoke(app, ["subclone", str(p), "-r", str(rec), "--out", str(tmp_path / "c"), "--force",
                                     "--no-verify", "--quiet"])
        assert r.exit_code == 0, r.output
    assert (tmp_path / "c" / "preprocessor_config.json").is_file()
