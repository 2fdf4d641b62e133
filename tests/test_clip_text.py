"""The text towers of CLIP (clip_text_model: CLIPTextModel, CLIPTextModelWithProjection) and SigLIP
(siglip_text_model: SiglipTextModel).

The planted parents (each model type's own transformers config, planted by hand): dead FFN
neurons, a dead head per layer and a dead layer (zero attention and FFN outputs, weights and
biases: the identity). LayerNorm makes hidden cuts inexact and heads go with the hidden size, so
the exact tests cut FFN neurons and layers (the projected text embeddings and every position's
hidden state must match) and heads are checked by their kept indices. The projections keep their
output axis (projection_dim, projection_size)."""

import json

import pytest
import torch

import planted
from helpers import inspect_and_plan, load, recipe, run, tokens
from planted import Planted, _randomize, rel_err

V = 96
TINY = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=4,
            max_position_embeddings=77, layer_norm_eps=1e-12, bos_token_id=0, eos_token_id=1, pad_token_id=1)
TARGET = dict(intermediate_size=64, num_hidden_layers=3)
CALIB = {"data": "random_tokens", "samples": 8, "seq_len": 24, "batch_size": 4}
# model type -> (config class, model class the parent is saved as, projection key, projection size)
KINDS = {
    "clip": ("CLIPTextConfig", "CLIPTextModelWithProjection", "projection_dim", 24),
    "clip-base": ("CLIPTextConfig", "CLIPTextModel", None, None),
    "siglip": ("SiglipTextConfig", "SiglipTextModel", "projection_size", 24),
    "siglip-null": ("SiglipTextConfig", "SiglipTextModel", None, None),   # projection_size null: the hidden size
}


def stages(method="magnitude", drop=(2,)):
    rank = {"method": method}
    if method == "activation":
        rank["calibration"] = CALIB
    st = [{"rank_neurons": rank}]
    if drop is not None:
        st.append({"drop_layers": {"drop": list(drop)} if drop else {"strategy": "importance"}})
    return st + [{"slice_embeddings": {}}]


def text_parent(tmp, kind="clip", *, dead_ffn=32, dead_heads=1, dead_layers=(2,), seed=0, dtype=torch.float32,
                **kw) -> Planted:
    import transformers

    cfg_cls, model_cls, proj_key, proj = KINDS[kind]
    extra = {proj_key: proj} if proj_key else {}
    cfg = getattr(transformers, cfg_cls)(**{**TINY, **extra, **kw})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg)
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    core = getattr(model, "text_model", model)
    H, F, nh = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    hd = H // nh
    pl = Planted(tmp, dead_layers=list(dead_layers))
    with torch.no_grad():
        planted.plant_blocks(core.encoder.layers, gen, pl, F, nh, hd, dead_ffn, dead_heads)
    model.to(dtype).save_pretrained(tmp)
    pl.config = model.config.to_dict()
    pl.cls = model_cls
    return pl


def real_parent(path, kind="clip"):
    """A tiny random text tower (bf16, no planted parts) with the weights' real spread."""
    return text_parent(path, kind, dead_ffn=0, dead_heads=0, dead_layers=(), dtype=torch.bfloat16,
                       layer_norm_eps=1e-5).path


def alive(n, dead):
    return [i for i in range(n) if i not in set(dead)]


@torch.no_grad()
def embeds(path, cls, ids):
    """The text embedding (projected where the model projects) and every position's final state."""
    out = load(path, cls)(input_ids=ids)
    emb = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
    return emb, out.last_hidden_state


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_text_tower_planted_exact(tmp_path, kind, method):
    pl = text_parent(tmp_path / "parent", kind)
    res = run(pl.path, tmp_path / "child", target=TARGET, stages=stages(method))
    kept = res.report["kept"]
    assert kept["layers"] == [0, 1, 3]
    for ci, p in enumerate(kept["layers"]):
        assert kept["ffn"][str(ci)] == alive(96, pl.dead_ffn[p])
    ids = tokens(V, n=3, seq=20)
    ids[:, -1] = 1   # end of text last (CLIP pools the first eos_token_id position)
    (pe, ph), (ce, ch) = embeds(pl.path, pl.cls, ids), embeds(tmp_path / "child", pl.cls, ids)
    proj = KINDS[kind][3] or 64
    assert ce.shape == pe.shape == (3, proj)
    assert rel_err(ce, pe) < 1e-4 and rel_err(ch, ph) < 1e-4, (rel_err(ce, pe), rel_err(ch, ph))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_text_tower_negative_controls(tmp_path, kind):
    """Choosing neurons without the weights, or dropping a live layer, changes the embeddings."""
    pl = text_parent(tmp_path / "parent", kind)
    ids = tokens(V, n=3, seq=20)
    ref, _ = embeds(pl.path, pl.cls, ids)
    run(pl.path, tmp_path / "first", target=TARGET, stages=stages("first"))
    assert rel_err(embeds(tmp_path / "first", pl.cls, ids)[0], ref) > 1e-2
    run(pl.path, tmp_path / "wrong", target=TARGET, stages=stages("magnitude", drop=(1,)))
    assert rel_err(embeds(tmp_path / "wrong", pl.cls, ids)[0], ref) > 1e-2


def test_clip_text_causal_mask_matters(tmp_path):
    """Calibration runs CLIP's blocks with its causal mask: the streamed forward equals
    transformers' (a bidirectional forward would not), so activation ranking sees what the model
    computes. Negative control: the same blocks without the mask give other states."""
    from shrinkit.checkpoint.reader import open_checkpoint
    from shrinkit.families import family_for
    from shrinkit.runtime import BlockModel

    pl = text_parent(tmp_path / "parent", "clip-base", dead_ffn=0, dead_heads=0, dead_layers=())
    ids = tokens(V, n=2, seq=16)
    with torch.no_grad():
        ref = load(pl.path, "CLIPTextModel")(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    ck = open_checkpoint(pl.path)
    try:
        fam = family_for(ck.config)
        bm = BlockModel(ck, fam)
        with torch.no_grad():
            x = bm.embed(ids, 2).clone()
            y = x
            for layer in bm.layers:
                bm.load(layer)
                x = fam.layer_call(bm, layer, x)
                y = layer(y, attention_mask=None)
                y = y[0] if isinstance(y, tuple) else y
                bm.free(layer)
    finally:
        ck.close()
    assert rel_err(x, ref) < 1e-5
    assert rel_err(y, ref) > 1e-2


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_text_tower_dead_heads_are_the_ones_dropped(tmp_path, kind):
    pl = text_parent(tmp_path / "parent", kind, dead_ffn=0, dead_layers=())
    target = dict(hidden_size=48, num_attention_heads=3)
    for method in ("magnitude", "activation"):
        res = run(pl.path, tmp_path / method, target=target, stages=stages(method, drop=None))
        for li in range(4):
            assert res.report["kept"]["q_heads"][str(li)] == alive(4, pl.dead_q[li]), (method, li)
        m = load(tmp_path / method, pl.cls)
        proj = m.text_projection if kind == "clip" else m.head
        assert proj.weight.shape == (24, 48)
    res = run(pl.path, tmp_path / "first", target=target, stages=stages("first", drop=None))
    assert any(res.report["kept"]["q_heads"][str(li)] != alive(4, pl.dead_q[li]) for li in range(4))


def test_siglip_null_projection_size_is_kept_as_the_parent_hidden(tmp_path):
    """An older SigLIP config leaves projection_size null (the head is hidden -> hidden): the child
    is narrower, so its config must say the head still writes the parent's 64 dims."""
    pl = text_parent(tmp_path / "parent", "siglip-null", dead_ffn=0, dead_layers=())
    assert json.loads((pl.path / "config.json").read_text()).get("projection_size") in (None, 64)
    run(pl.path, tmp_path / "child", target=dict(hidden_size=48, num_attention_heads=3), stages=stages(drop=None))
    assert json.loads((tmp_path / "child" / "config.json").read_text())["projection_size"] == 64
    assert load(tmp_path / "child", "SiglipTextModel").head.weight.shape == (64, 48)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_text_tower_real_config_cut_calibrates_verifies(tmp_path, kind):
    """A tiny planted text tower (bf16): cut in width (hidden dims too: inexact) and depth with
    activation ranking on tokens and importance dropping, loaded with no missing or unexpected keys, verified against random init
    (last-position embeddings); inspect and plan describe it."""
    from shrinkit.pipeline import subclone

    pl = text_parent(tmp_path / "parent", kind, dtype=torch.bfloat16, layer_norm_eps=1e-5)
    target = dict(hidden_size=48, num_attention_heads=3, intermediate_size=64, num_hidden_layers=3)
    res = subclone(pl.path, recipe(target=target, stages=stages("activation", drop=()), calibration=CALIB,
                                   verify={"data": "random_tokens", "samples": 6, "seq_len": 16}),
                   tmp_path / "child", verify=True)
    m = load(tmp_path / "child", pl.cls)
    assert (m.config.hidden_size, m.config.num_hidden_layers) == (48, 3)
    v = res.report["verify"]
    assert v["kind"] == "encoder" and v["pool"] == "last"
    assert v["child"]["similarity_pearson"] > v["random_init"]["similarity_pearson"]
    assert any("last-position" in row for row in v["table"])
    inspect_and_plan(tmp_path, pl.path, f"{kind}_text_model", {"target": target, "stages": stages(drop=(2,))})


@pytest.mark.parametrize("kind", ["clip-base", "siglip"])
def test_verify_pools_the_last_position_of_a_text_tower(tmp_path, kind):
    """Streamed verification of a text tower gives the child's similarity numbers that transformers'
    whole models give on the same held-out tokens, pooled at the last position of
    last_hidden_state (after final_layer_norm). Negative control: mean pooling gives others."""
    from shrinkit.checkpoint.reader import open_checkpoint
    from shrinkit.recipe import Verify
    from shrinkit.verify import _pairwise, _pearson, heldout_tokens, verify_child

    pl = text_parent(tmp_path / "parent", kind, dead_ffn=0, dead_heads=0, dead_layers=())
    run(pl.path, tmp_path / "child", target=dict(intermediate_size=48, num_hidden_layers=3),
        stages=stages(drop=(1,)), output={"dtype": "float32"})
    spec = Verify(data="random_tokens", samples=6, seq_len=16, batch_size=3)
    v = verify_child(pl.path, tmp_path / "child", spec, seed=3)
    assert v["pool"] == "last"
    with open_checkpoint(pl.path) as ck:
        ids = heldout_tokens(ck, spec, seed=3)
    with torch.no_grad():
        h = {k: load(p, pl.cls)(input_ids=ids).last_hidden_state for k, p in
             (("parent", pl.path), ("child", tmp_path / "child"))}
    last = _pearson(_pairwise(h["child"][:, -1]), _pairwise(h["parent"][:, -1]))
    mean = _pearson(_pairwise(h["child"].mean(1)), _pairwise(h["parent"].mean(1)))
    assert v["child"]["similarity_pearson"] == pytest.approx(last, rel=1e-4, abs=1e-5)
    assert abs(mean - last) > 1e-3
