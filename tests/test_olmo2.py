"""OLMo 2: post-norms and q/k RMSNorms over the whole projection width (all heads together).

The planted parent (transformers' Olmo2Config, planted by hand): dead hidden dims (nothing writes
them: zero embedding columns, zero o_proj/down_proj rows, so the post-norms' inputs are zero
there), dead FFN neurons, a dead KV group per layer with its query heads (zero q/k/v rows, so
they add nothing to q_norm's and k_norm's mean square) and a dead layer (zero o_proj and
down_proj). Exact through magnitude and activation ranking; the negative controls (`first`
ranking, a live layer dropped, no rescale_norms, and the q/k norms without their
sqrt(parent/child heads) factor) must all break it, and so must cutting a head that is live."""

import json

import pytest
import torch

from helpers import inspect_and_plan, load, logits, run, tokens
from planted import Planted, _choose, _randomize, rel_err
from test_calibrate import act_stages
from test_planted import check_kept, stages

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=4, max_position_embeddings=64, rms_norm_eps=1e-12, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False)
TARGET = dict(hidden_size=48, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3)


def olmo2_parent(tmp, *, dead_hidden=16, dead_ffn=32, dead_kv=1, dead_layers=(2,), seed=0, dtype=torch.float32,
                 **kw) -> Planted:
    import transformers

    cfg = transformers.Olmo2Config(**{**TINY, **kw})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    H, F = cfg.hidden_size, cfg.intermediate_size
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd, r = H // nq, nq // nkv
    pl = Planted(tmp, dead_layers=list(dead_layers))
    pl.dead_hidden = D = _choose(gen, H, dead_hidden) if dead_hidden else []
    base = model.model
    with torch.no_grad():
        base.embed_tokens.weight[:, D] = 0
        base.norm.weight[D] = 0
        model.lm_head.weight[:, D] = 0
        for li, layer in enumerate(base.layers):
            a, m = layer.self_attn, layer.mlp
            a.o_proj.weight[D, :] = 0
            m.down_proj.weight[D, :] = 0
            layer.post_attention_layernorm.weight[D] = 0
            layer.post_feedforward_layernorm.weight[D] = 0
            fs = _choose(gen, F, dead_ffn)
            pl.dead_ffn[li] = fs
            m.gate_proj.weight[fs] = 0
            m.up_proj.weight[fs] = 0
            m.down_proj.weight[:, fs] = 0
            gs = _choose(gen, nkv, dead_kv) if dead_kv else []
            pl.dead_kv[li] = gs
            pl.dead_q[li] = qheads = [g * r + j for g in gs for j in range(r)]
            for g in gs:
                a.k_proj.weight[g * hd:(g + 1) * hd] = 0
                a.v_proj.weight[g * hd:(g + 1) * hd] = 0
            for h in qheads:
                a.q_proj.weight[h * hd:(h + 1) * hd] = 0
                a.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            if li in pl.dead_layers:
                a.o_proj.weight.zero_()
                m.down_proj.weight.zero_()
    model.to(dtype).save_pretrained(tmp)
    pl.config = model.config.to_dict()
    return pl


def real_parent(path):
    """A tiny random Olmo2Config model, bfloat16."""
    import transformers

    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(transformers.Olmo2Config(**{**TINY, "rms_norm_eps": 1e-6}))
    _randomize(m, torch.Generator().manual_seed(0))
    m.to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    return olmo2_parent(tmp_path_factory.mktemp("olmo2"))


@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_olmo2_planted_exact(tmp_path, parent, method):
    pl = parent
    res = run(pl.path, tmp_path / "child", target=TARGET, stages=stages() if method == "magnitude" else act_stages())
    check_kept(res.report, pl, n_hidden=64, n_ffn=96, nq=4, nkv=2)
    cfg = json.loads((tmp_path / "child" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["num_hidden_layers"], cfg["head_dim"]) == (48, 64, 2, 1, 3, 16)
    ids = tokens(96)
    err = rel_err(logits(tmp_path / "child", ids), logits(pl.path, ids))
    assert err < 1e-4, err


def test_olmo2_negative_controls(tmp_path, parent):
    from shrinkit.families.base import Family
    from shrinkit.families.olmo2 import Olmo2

    pl = parent
    ids = tokens(96)
    ref = logits(pl.path, ids)

    def err(name, **kw):
        run(pl.path, tmp_path / name, target=TARGET, stages=stages(**kw))
        return rel_err(logits(tmp_path / name, ids), ref)

    assert err("norescale", rescale=False) > 1e-2
    assert err("first", method="first") > 1e-2
    assert err("wronglayer", drop=(1,)) > 1e-2
    with pytest.MonkeyPatch.context() as mp:   # q/k norms cut like any other tensor, no head factor
        mp.setattr(Olmo2, "adjust", Family.adjust)
        assert err("no_head_factor") > 1e-2


def test_olmo2_live_heads_cut_scale_the_kept_q_by_their_energy_share(tmp_path):
    """What is not exact: with no dead heads, cutting a live KV group leaves the kept heads' q
    scaled per token by sqrt(E_all / E_kept) (q_norm's mean square was over all heads). The child's
    q_norm output on the kept heads matches the parent's q_norm output times that factor."""
    import transformers

    pl = olmo2_parent(tmp_path / "p", dead_hidden=0, dead_ffn=0, dead_kv=0, dead_layers=())
    run(pl.path, tmp_path / "c", target=dict(num_attention_heads=2, num_key_value_heads=1),
        stages=[{"rank_neurons": {"method": "first"}}, {"slice_embeddings": {}}])
    p = transformers.AutoModelForCausalLM.from_pretrained(pl.path, dtype=torch.float32)
    c = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    pa, ca = p.model.layers[0].self_attn, c.model.layers[0].self_attn
    with torch.no_grad():
        q = pa.q_proj(x)                        # [5, 4 heads * 16]
        kept = q[:, :32]                        # `first`: heads 0, 1
        share = (q.pow(2).sum(-1) / kept.pow(2).sum(-1)).sqrt()[:, None]
        want = pa.q_norm(q)[:, :32] * share
        got = ca.q_norm(ca.q_proj(x))
    assert rel_err(got, want) < 1e-5
    assert share.min() > 1.01                   # live heads were cut: the factor is not 1


def test_olmo2_verify_of_exact_child(tmp_path, parent):
    from shrinkit.recipe import Verify
    from shrinkit.verify import verify_child

    run(parent.path, tmp_path / "child", target=TARGET, stages=stages())
    v = verify_child(parent.path, tmp_path / "child", Verify(data="random_tokens", samples=4, seq_len=24, batch_size=2))
    assert abs(v["child"]["kl"]) < 1e-6, v["child"]
    assert v["random_init"]["kl"] > 1e-2


def test_olmo2_real_config_cut_loads_calibrates_verifies(tmp_path):
    """A tiny random Olmo2Config model (bf16): cut with activation ranking and importance layer
    dropping, loaded with no missing or unexpected keys, verified; inspect and plan describe it."""
    from shrinkit.recipe import Verify
    from shrinkit.verify import verify_child

    real_parent(tmp_path / "parent")
    run(tmp_path / "parent", tmp_path / "child", target=TARGET, stages=act_stages())
    m = load(tmp_path / "child")
    assert (m.config.hidden_size, m.config.num_hidden_layers, m.config.head_dim) == (48, 3, 16)
    assert m.model.layers[0].self_attn.q_norm.weight.shape == (32,)
    assert m.model.layers[0].self_attn.k_norm.weight.shape == (16,)
    v = verify_child(tmp_path / "parent", tmp_path / "child",
                     Verify(data="random_tokens", samples=4, seq_len=32, batch_size=2))
    assert v["child"]["kl"] > 0 and v["random_init"]["kl"] > 0
    inspect_and_plan(tmp_path, tmp_path / "parent", "olmo2", {"target": TARGET, "stages": stages()})
    from shrinkit.errors import RecipeError   # post-norm blocks: no output projection writes the residual
    with pytest.raises(RecipeError, match="heal does not support the olmo2 family"):
        run(tmp_path / "parent", tmp_path / "healed", target=TARGET,
            stages=[{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"drop": [2]}},
                    {"heal": {"when": "always", "calibration": {"data": "random_tokens", "samples": 4, "seq_len": 16}}},
                    {"slice_embeddings": {}}])
