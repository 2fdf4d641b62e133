"""Phi-3: fused qkv_proj with grouped-query attention (unequal parts: q = heads * head_dim, k = v =
kv_heads * head_dim) and fused gate_up_proj (2 * ffn), partial rotary, sliding window.

The planted parent is built with transformers' Phi3Config and planted by hand, row by row of the
fused tensors, so a wrong split of a fused axis cannot hide behind a matching wrong planting."""

import json

import pytest
import torch

from helpers import inspect_and_plan, load, logits, run, tokens
from planted import Planted, _choose, _randomize, rel_err
from test_calibrate import act_stages
from test_planted import check_kept, stages

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=4, max_position_embeddings=64, rms_norm_eps=1e-12, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, sliding_window=8, partial_rotary_factor=0.5)
TARGET = dict(hidden_size=48, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3)


def phi3_parent(tmp, *, tie=False, dead_hidden=16, dead_ffn=32, dead_kv=1, dead_layers=(2,), seed=0,
                dtype=torch.float32, **kw) -> Planted:
    import transformers

    cfg = transformers.Phi3Config(**{**TINY, "tie_word_embeddings": tie, **kw})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    H, F = cfg.hidden_size, cfg.intermediate_size
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = H // nq
    r = nq // nkv
    k0, v0 = nq * hd, nq * hd + nkv * hd   # first k row, first v row of qkv_proj
    pl = Planted(tmp, dead_layers=list(dead_layers))
    pl.dead_hidden = D = _choose(gen, H, dead_hidden) if dead_hidden else []
    base = model.model
    with torch.no_grad():
        base.embed_tokens.weight[:, D] = 0
        base.norm.weight[D] = 0
        if not tie:
            model.lm_head.weight[:, D] = 0
        for li, layer in enumerate(base.layers):
            a, m = layer.self_attn, layer.mlp
            a.o_proj.weight[D, :] = 0
            m.down_proj.weight[D, :] = 0
            layer.input_layernorm.weight[D] = 0
            layer.post_attention_layernorm.weight[D] = 0
            fs = _choose(gen, F, dead_ffn)
            pl.dead_ffn[li] = fs
            m.gate_up_proj.weight[fs] = 0                       # gate rows
            m.gate_up_proj.weight[[F + f for f in fs]] = 0      # up rows
            m.down_proj.weight[:, fs] = 0
            gs = _choose(gen, nkv, dead_kv)
            pl.dead_kv[li] = gs
            pl.dead_q[li] = qheads = [g * r + j for g in gs for j in range(r)]
            for g in gs:
                a.qkv_proj.weight[k0 + g * hd:k0 + (g + 1) * hd] = 0
                a.qkv_proj.weight[v0 + g * hd:v0 + (g + 1) * hd] = 0
            for h in qheads:
                a.qkv_proj.weight[h * hd:(h + 1) * hd] = 0
                a.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            if li in pl.dead_layers:
                a.o_proj.weight.zero_()
                m.down_proj.weight.zero_()
    model.to(dtype).save_pretrained(tmp)
    pl.config = model.config.to_dict()
    return pl


def real_parent(path):
    """A tiny random Phi3Config model (partial rotary, sliding window), bfloat16."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Phi3Config(**{**TINY, "rms_norm_eps": 1e-5})
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """Planted parents shared by this module's tests (built once per tying)."""
    made = {}

    def get(tie=False):
        if tie not in made:
            made[tie] = phi3_parent(tmp_path_factory.mktemp(f"phi3-{tie}"), tie=tie)
        return made[tie]
    return get


@pytest.mark.parametrize("tie,method", [(False, "magnitude"), (True, "activation")])
def test_phi3_planted_exact(tmp_path, parent, tie, method):
    pl = parent(tie)
    res = run(pl.path, tmp_path / "child", target=TARGET, stages=stages() if method == "magnitude" else act_stages())
    check_kept(res.report, pl, n_hidden=64, n_ffn=96, nq=4, nkv=2)
    cfg = json.loads((tmp_path / "child" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["num_hidden_layers"], cfg["head_dim"]) == (48, 64, 2, 1, 3, 16)
    ids = tokens(96)
    err = rel_err(logits(tmp_path / "child", ids), logits(pl.path, ids))
    assert err < 1e-4, err


def test_phi3_negative_controls(tmp_path, parent):
    """No rescale, `first` ranking, a live layer dropped, or qkv_proj's parts in the wrong order
    all give a child that differs."""
    from dataclasses import replace

    import shrinkit.families as F
    from shrinkit.families.phi3 import phi3
    from shrinkit.families.spaces import Fused, Space as S

    pl = parent()
    ids = tokens(96)
    ref = logits(pl.path, ids)

    def err(name, **kw):
        run(pl.path, tmp_path / name, target=TARGET, stages=stages(**kw))
        return rel_err(logits(tmp_path / name, ids), ref)

    assert err("norescale", rescale=False) > 1e-2
    assert err("first", method="first") > 1e-2
    assert err("wronglayer", drop=(1,)) > 1e-2
    # the parts in the wrong order (k, q, v: 32 + 64 + 32 rows add up too): cut at the wrong rows
    r = phi3.rules[1]
    assert r.pattern.endswith("qkv_proj\\.weight")
    rules = list(phi3.rules)
    rules[1] = replace(r, axes=(Fused((S.KV_HEADS, S.Q_HEADS, S.KV_HEADS)), S.HIDDEN))
    wrong = replace(phi3, rules=tuple(rules))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "FAMILIES", tuple(wrong if f is phi3 else f for f in F.FAMILIES))
        assert err("wrong_split") > 1e-2


def test_phi3_verify_of_exact_child(tmp_path, parent):
    """The block-at-a-time parent (rotary, sliding-window mask) computes what the whole model does."""
    from shrinkit.recipe import Verify
    from shrinkit.verify import verify_child

    pl = parent()
    run(pl.path, tmp_path / "child", target=TARGET, stages=stages())
    v = verify_child(pl.path, tmp_path / "child", Verify(data="random_tokens", samples=4, seq_len=24, batch_size=2))
    assert abs(v["child"]["kl"]) < 1e-6, v["child"]
    assert v["random_init"]["kl"] > 1e-2


def test_phi3_real_config_cut_loads_calibrates_verifies(tmp_path):
    """A tiny random Phi3Config model (bf16): cut in width and depth with activation ranking and
    importance layer dropping, loaded with no missing or unexpected keys, verified; inspect and
    plan describe it."""
    from shrinkit.recipe import Verify
    from shrinkit.verify import verify_child

    real_parent(tmp_path / "parent")
    run(tmp_path / "parent", tmp_path / "child", target=TARGET, stages=act_stages())
    m = load(tmp_path / "child")
    assert (m.config.hidden_size, m.config.num_hidden_layers, m.config.head_dim) == (48, 3, 16)
    assert m.model.layers[0].self_attn.qkv_proj.weight.shape == (2 * 16 + 2 * 16, 48)
    assert m.model.layers[0].mlp.gate_up_proj.weight.shape == (128, 48)
    v = verify_child(tmp_path / "parent", tmp_path / "child",
                     Verify(data="random_tokens", samples=4, seq_len=32, batch_size=2))
    assert v["child"]["kl"] > 0 and v["random_init"]["kl"] > 0
    inspect_and_plan(tmp_path, tmp_path / "parent", "phi3", {"target": TARGET, "stages": stages()})
