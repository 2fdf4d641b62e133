"""ModernBERT: fused Wqkv ([3, heads, head_dim] rows) and GeGLU Wi (input half, then gate half),
pre-LayerNorm without biases, rotary positions, alternating local (sliding window) and global
attention, and a layer 0 without an attention norm.

The planted parent (transformers' ModernBertConfig, planted by hand, row by row of the fused
tensors): dead FFN neurons (both GeGLU halves), dead heads and a dead layer (zero attention and
FFN outputs: the identity). LayerNorm subtracts the mean over the hidden dims, so the exact test
cuts FFN neurons and layers (heads go with the hidden size here: their kept indices are checked).
A sliding window of 8 tokens over 24-token inputs makes the local layers' masks matter."""

import json

import pytest
import torch
from typer.testing import CliRunner

from helpers import inspect_and_plan, load, logits, run, tokens
from planted import Planted, _choose, _randomize, rel_err
from test_planted import alive, stages

MLM = "AutoModelForMaskedLM"
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=4,
            max_position_embeddings=64, local_attention=8, global_attn_every_n_layers=2, norm_eps=1e-12,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
TARGET = dict(intermediate_size=64, num_hidden_layers=3)
CALIB = {"data": "random_tokens", "samples": 8, "seq_len": 24, "batch_size": 4}


def modernbert_parent(tmp, *, dead_ffn=32, dead_heads=1, dead_layers=(2,), seed=0, dtype=torch.float32,
                      **kw) -> Planted:
    import transformers

    cfg = transformers.ModernBertConfig(**{**TINY, **kw})
    torch.manual_seed(seed)
    model = transformers.ModernBertForMaskedLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    H, F, nh = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    hd = H // nh
    pl = Planted(tmp, dead_layers=list(dead_layers))
    with torch.no_grad():
        for li, layer in enumerate(model.model.layers):
            a, m = layer.attn, layer.mlp
            fs = pl.dead_ffn[li] = _choose(gen, F, dead_ffn) if dead_ffn else []
            m.Wi.weight[fs] = 0                          # the activation's input half
            m.Wi.weight[[F + f for f in fs]] = 0         # the gate half
            m.Wo.weight[:, fs] = 0
            hs = pl.dead_q[li] = _choose(gen, nh, dead_heads) if dead_heads else []
            for h in hs:
                for part in range(3):                    # q, k, v rows of head h
                    a.Wqkv.weight[part * H + h * hd:part * H + (h + 1) * hd] = 0
                a.Wo.weight[:, h * hd:(h + 1) * hd] = 0
            if li in pl.dead_layers:
                a.Wo.weight.zero_()
                m.Wo.weight.zero_()
    model.to(dtype).save_pretrained(tmp)
    pl.config = model.config.to_dict()
    return pl


def real_parent(path, every_n_only=False):
    """A tiny random ModernBertConfig MLM model, bfloat16; every_n_only: its config.json gives
    the local/global pattern as global_attn_every_n_layers alone (as older Hub configs do)."""
    import transformers

    torch.manual_seed(0)
    m = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**{**TINY, "norm_eps": 1e-5}))
    _randomize(m, torch.Generator().manual_seed(0))
    m.to(torch.bfloat16).save_pretrained(path)
    if every_n_only:
        cfg = json.loads((path / "config.json").read_text())
        cfg.pop("layer_types")
        cfg["global_attn_every_n_layers"] = 3
        (path / "config.json").write_text(json.dumps(cfg))
    return path


def act_stages(drop="importance"):
    d = {"strategy": "importance", "calibration": CALIB} if drop == "importance" else {"drop": list(drop)}
    return [{"rank_neurons": {"method": "activation", "calibration": CALIB}}, {"drop_layers": d},
            {"slice_embeddings": {}}, {"rescale_norms": {}}]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    return modernbert_parent(tmp_path_factory.mktemp("modernbert"))


@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_modernbert_planted_exact(tmp_path, parent, method):
    res = run(parent.path, tmp_path / "child", target=TARGET,
              stages=stages() if method == "magnitude" else act_stages())
    kept = res.report["kept"]
    assert kept["layers"] == [0, 1, 3]
    for ci, p in enumerate(kept["layers"]):
        assert kept["ffn"][str(ci)] == alive(96, parent.dead_ffn[p])
    cfg = json.loads((tmp_path / "child" / "config.json").read_text())
    parent_types = parent.config["layer_types"]
    assert cfg["layer_types"] == [parent_types[p] for p in (0, 1, 3)] != parent_types[:3]
    ids = tokens(96)
    err = rel_err(logits(tmp_path / "child", ids, MLM), logits(parent.path, ids, MLM))
    assert err < 1e-4, err
    if method == "activation":
        infl = res.report["stages"][1]["influence"]
        assert infl[2] < 1e-9 < min(infl[i] for i in (0, 1, 3))


def test_modernbert_negative_controls(tmp_path, parent):
    """`first` neurons, a live layer dropped, or the child's layer types left as the parent's first
    three (the local/global pattern not following the kept layers) all break the child."""
    ids = tokens(96)
    ref = logits(parent.path, ids, MLM)

    def err(name, **kw):
        run(parent.path, tmp_path / name, target=TARGET, stages=stages(**kw))
        return rel_err(logits(tmp_path / name, ids, MLM), ref)

    assert err("first", method="first") > 1e-2
    assert err("wronglayer", drop=(1,)) > 1e-2
    run(parent.path, tmp_path / "types", target=TARGET, stages=stages())
    cfg = json.loads((tmp_path / "types" / "config.json").read_text())
    cfg["layer_types"] = parent.config["layer_types"][:3]
    (tmp_path / "types" / "config.json").write_text(json.dumps(cfg))
    assert rel_err(logits(tmp_path / "types", ids, MLM), ref) > 1e-2


def test_modernbert_dead_heads_are_the_ones_dropped(tmp_path):
    pl = modernbert_parent(tmp_path / "parent", dead_ffn=0, dead_layers=())
    target = dict(hidden_size=48, num_attention_heads=3)
    for method in ("magnitude", "activation"):
        st = stages(method, drop=()) if method == "magnitude" else act_stages(drop=())
        res = run(pl.path, tmp_path / method, target=target, stages=st)
        for li in range(4):
            assert res.report["kept"]["q_heads"][str(li)] == alive(4, pl.dead_q[li]), (method, li)
        load(tmp_path / method, MLM)
    res = run(pl.path, tmp_path / "first", target=target, stages=stages("first", drop=()))
    assert any(res.report["kept"]["q_heads"][str(li)] != alive(4, pl.dead_q[li]) for li in range(4))


def test_modernbert_layer0_is_kept(tmp_path, write_recipe):
    """Layer 0 has no attention norm: a drop list or strategy without it is refused (exit 2, one
    line); importance dropping keeps it even when it is the least influential layer (here it is
    the identity), and without that pin the run would be refused."""
    from shrinkit.cli import app
    from shrinkit.errors import RecipeError
    from shrinkit.families.base import Family
    from shrinkit.families.modernbert import ModernBert

    pl = modernbert_parent(tmp_path / "parent", dead_ffn=0, dead_heads=0, dead_layers=(0,))
    for drop in ({"drop": [0]}, {"strategy": "last"}):
        rec = write_recipe({"target": {"num_hidden_layers": 3}, "stages": [{"drop_layers": drop}, {"slice_embeddings": {}}]})
        r = CliRunner().invoke(app, ["plan", str(pl.path), "-r", str(rec)])
        assert r.exit_code == 2 and "layer 0" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    res = run(pl.path, tmp_path / "imp", target={"num_hidden_layers": 3}, stages=act_stages())
    assert res.report["stages"][1]["influence"][0] < 1e-9 and res.report["kept"]["layers"][0] == 0
    load(tmp_path / "imp", MLM)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ModernBert, "pin_influence", Family.pin_influence)
        with pytest.raises(RecipeError, match="layer 0"):
            run(pl.path, tmp_path / "unpinned", target={"num_hidden_layers": 3}, stages=act_stages())


@pytest.mark.parametrize("every_n_only", [False, True])
def test_modernbert_real_config_cut_loads_calibrates_verifies(tmp_path, every_n_only):
    """A tiny random ModernBertConfig MLM model (bf16), with layer_types or the older every-n
    pattern: cut in width and depth with activation ranking and importance dropping, loaded with
    no missing or unexpected keys, verified; inspect and plan describe it."""
    from shrinkit.recipe import Verify
    from shrinkit.verify import verify_child

    p = real_parent(tmp_path / "parent", every_n_only)
    target = dict(hidden_size=48, num_attention_heads=3, intermediate_size=64, num_hidden_layers=3)
    res = run(p, tmp_path / "child", target=target, stages=act_stages())
    m = load(tmp_path / "child", MLM)
    assert (m.config.hidden_size, m.config.num_hidden_layers) == (48, 3)
    assert m.model.layers[1].mlp.Wi.weight.shape == (128, 48)
    pattern = ["full_attention" if i % (3 if every_n_only else 2) == 0 else "sliding_attention" for i in range(4)]
    assert m.config.layer_types == [pattern[i] for i in res.report["kept"]["layers"]]
    v = verify_child(p, tmp_path / "child", Verify(data="random_tokens", samples=4, seq_len=24, batch_size=2))
    assert v["kind"] == "encoder" and v["child"]["similarity_pearson"] > v["random_init"]["similarity_pearson"]
    inspect_and_plan(tmp_path, p, "modernbert", {"target": target, "stages": stages(drop=(2,))})


def test_modernbert_block_forward_matches_transformers(tmp_path, parent):
    """Calibration's block-at-a-time forward (rotary per layer type, local masks) computes what
    the whole model does: an uncut child verifies with similarity r = 1."""
    from shrinkit.recipe import Verify
    from shrinkit.verify import verify_child

    run(parent.path, tmp_path / "same", target={}, stages=[{"slice_embeddings": {}}])
    v = verify_child(parent.path, tmp_path / "same", Verify(data="random_tokens", samples=4, seq_len=24, batch_size=2))
    assert v["child"]["similarity_pearson"] > 1 - 1e-9
