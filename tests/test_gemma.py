"""Gemma family (gemma, gemma2, gemma3_text): (1 + w) RMSNorms, embeddings multiplied by
sqrt(hidden) in the forward, explicit head_dim, Gemma 2/3 sandwich norms, soft-capping,
sliding/global layer types, Gemma 3 q/k norms.

Planted parents are built with transformers' own config classes and planted by hand (not
through shrinkit's rules). Why the cut child is exact: every weight that writes a dead hidden
dim is zero, so the residual stream is exactly 0 there and every RMSNorm's output is 0 there
(0 * (1 + w)); the live dims see rms over fewer dims, which rescale_norms undoes with
1 + w' = (1 + w) * sqrt(H/h); the child's embedding lookup is multiplied by sqrt(h) rather than
sqrt(H), which the embedding rows (times sqrt(H/h)) undo, and the tied head, seeing those same
rows, is compensated through the final norm (1 + w' = 1 + w). Dead heads, neurons and layers
contribute exact zeros before any non-linearity that is not zero-preserving (soft-capping is
tanh(s / c) * c of an attention score of exactly 0, so dead heads' scores are 0 and their
values are 0; the final logits are the parent's, so their soft-capping sees the same input).
"""

import json

import pytest
import torch
from typer.testing import CliRunner

import planted
from helpers import load, logits, run, tokens
from planted import Planted, _choose, rel_err
from test_calibrate import CALIB, act_stages
from test_planted import check_kept, stages

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_hidden_layers=4, max_position_embeddings=64, rms_norm_eps=1e-12,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
TARGET = dict(hidden_size=48, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3)
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def config(model_type: str, tie=True, **kw):
    import transformers

    extra = {}
    if model_type != "gemma":  # short windows, so the sliding mask matters in a 24-token test
        extra = dict(sliding_window=8, layer_types=LAYER_TYPES, query_pre_attn_scalar=16)
    if model_type == "gemma2":
        extra.update(attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    if model_type == "gemma3_text":
        extra.update(final_logit_softcapping=4.0)
    cls = {"gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config,
           "gemma3_text": transformers.Gemma3TextConfig}[model_type]
    return cls(**{**TINY, **extra, "tie_word_embeddings": tie, **kw})


def gemma_like(tmp, model_type="gemma2", *, tie=True, dead_hidden=16, dead_ffn=32, dead_kv=1, dead_layers=(2,),
               seed=0, dtype=torch.float32, **kw) -> Planted:
    """A Gemma / Gemma 2 / Gemma 3 parent with planted dead hidden dims, FFN neurons, KV groups
    (with their query heads) and layers."""
    import transformers

    cfg = config(model_type, tie, **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # (1 + w) norms: w around 0; real spread elsewhere
            p.copy_(0.5 * torch.randn(p.shape, generator=gen) if p.dim() == 1
                    else torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    H, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    r = nq // nkv
    pl = Planted(tmp, dead_layers=list(dead_layers))
    pl.dead_hidden = D = _choose(gen, H, dead_hidden) if dead_hidden else []
    base = model.model
    with torch.no_grad():
        base.embed_tokens.weight[:, D] = 0
        base.norm.weight[D] = -1.0
        if not tie:
            model.lm_head.weight[:, D] = 0
        for li, layer in enumerate(base.layers):
            a, m = layer.self_attn, layer.mlp
            a.o_proj.weight[D, :] = 0       # the only writers of the residual stream
            for name, p in layer.named_parameters():   # (1 + w) norms over hidden: scale 0 on dead dims
                if name.endswith("layernorm.weight"):
                    p[D] = -1.0
            m.down_proj.weight[D, :] = 0
            fs = _choose(gen, F, dead_ffn)
            pl.dead_ffn[li] = fs
            m.gate_proj.weight[fs] = 0
            m.up_proj.weight[fs] = 0
            m.down_proj.weight[:, fs] = 0
            gs = _choose(gen, nkv, dead_kv)
            pl.dead_kv[li] = gs
            qheads = [g * r + j for g in gs for j in range(r)]
            pl.dead_q[li] = qheads
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


def real_parent(path, model_type):
    """A tiny random model from the family's own config class, bfloat16, as transformers saves it."""
    import transformers

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config(model_type, rms_norm_eps=1e-6)).to(torch.bfloat16).save_pretrained(path)
    return path


MODEL_TYPES = ["gemma", "gemma2", "gemma3_text"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """Planted parents shared by this module's tests (built once per model type and tying)."""
    made = {}

    def get(model_type, tie=True):
        if (model_type, tie) not in made:
            made[model_type, tie] = gemma_like(tmp_path_factory.mktemp(f"{model_type}-{tie}"), model_type, tie=tie)
        return made[model_type, tie]
    return get


@pytest.mark.parametrize("model_type,tie,method", [
    ("gemma", True, "magnitude"), ("gemma", False, "activation"),
    ("gemma2", True, "magnitude"), ("gemma2", True, "activation"),
    ("gemma3_text", True, "activation"), ("gemma3_text", False, "magnitude")])
def test_gemma_planted_exact(tmp_path, parent, model_type, tie, method):
    pl = parent(model_type, tie)
    st = stages() if method == "magnitude" else act_stages()
    res = run(pl.path, tmp_path / "child", target=TARGET, stages=st)
    check_kept(res.report, pl, n_hidden=64, n_ffn=96, nq=4, nkv=2)
    cfg = json.loads((tmp_path / "child" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["num_hidden_layers"], cfg["head_dim"]) == (48, 64, 2, 1, 3, 16)
    if model_type != "gemma":
        assert cfg["layer_types"] == [LAYER_TYPES[i] for i in (0, 1, 3)]
    ids = tokens(96)
    err = rel_err(logits(tmp_path / "child", ids), logits(pl.path, ids))
    assert err < 1e-4, err


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_gemma_negative_controls(tmp_path, parent, model_type, monkeypatch):
    """Each compensation is needed: without rescale_norms, with Llama's w * f norm rule, without
    the embedding's sqrt(H/h), scoring a norm by |w|, with `first` ranking or a live layer
    dropped, the child differs (all of them on gemma2, the richest; two on the others)."""
    from shrinkit.families.gemma import Gemma
    from shrinkit.families.base import Family

    pl = parent(model_type)
    ids = tokens(96)
    ref = logits(pl.path, ids)

    def err(name, **kw):
        run(pl.path, tmp_path / name, target=TARGET, stages=stages(**kw))
        return rel_err(logits(tmp_path / name, ids), ref)

    assert err("first", method="first") > 1e-2
    if model_type == "gemma2":
        assert err("norescale", rescale=False) > 1e-2
        assert err("wronglayer", drop=(1,)) > 1e-2
        with monkeypatch.context() as mp:
            mp.setattr(Gemma, "rescale", Family.rescale)       # w * f instead of (1 + w) * f - 1
            assert err("llama_rule") > 1e-2
        with monkeypatch.context() as mp:
            mp.setattr(Gemma, "magnitude", Family.magnitude)   # |w| of a (1 + w) norm: dead dims look alive
            assert err("abs_w") > 1e-2
    with monkeypatch.context() as mp:
        mp.setattr(Gemma, "adjust", Family.adjust)             # norms only, no embedding compensation
        assert err("no_embed_scale") > 1e-2


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_gemma_verify_of_exact_child(tmp_path, parent, model_type):
    """The block-at-a-time parent (embedding scale, masks, rotary per layer type, final soft-capping)
    computes what transformers' whole model computes: an exact child verifies with KL 0."""
    from shrinkit.recipe import Verify
    from shrinkit.verify import verify_child

    pl = parent(model_type)
    run(pl.path, tmp_path / "child", target=TARGET, stages=stages())
    v = verify_child(pl.path, tmp_path / "child", Verify(data="random_tokens", samples=4, seq_len=24, batch_size=2))
    assert abs(v["child"]["kl"]) < 1e-6, v["child"]
    assert v["random_init"]["kl"] > 1e-2


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_gemma_real_config_cut_loads_calibrates_verifies(tmp_path, model_type):
    """A tiny random model from the family's own config class (bf16, defaults otherwise): cut in
    width and depth with activation ranking and importance layer dropping, loaded with no
    missing or unexpected keys, verified; inspect and plan describe it."""
    from shrinkit.cli import app

    real_parent(tmp_path / "parent", model_type)
    from shrinkit.recipe import Verify
    from shrinkit.verify import verify_child

    run(tmp_path / "parent", tmp_path / "child", target=TARGET, stages=act_stages())
    m = load(tmp_path / "child")  # no missing / unexpected keys
    assert (m.config.hidden_size, m.config.num_hidden_layers, m.config.head_dim) == (48, 3, 16)
    v = verify_child(tmp_path / "parent", tmp_path / "child",
                     Verify(data="random_tokens", samples=4, seq_len=32, batch_size=2))
    assert v["child"]["kl"] > 0 and v["random_init"]["kl"] > 0
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "parent"), "--json"])
    assert r.exit_code == 0, r.output
    assert model_type in r.stdout
    rec = tmp_path / "r.yaml"
    rec.write_text(json.dumps({"target": TARGET, "stages": stages()}))
    r = CliRunner().invoke(app, ["plan", str(tmp_path / "parent"), "-r", str(rec), "--json"])
    assert r.exit_code == 0, r.output
    assert '"hidden_size": 48' in r.stdout


@pytest.mark.parametrize("model_type,pattern", [("gemma2", 2), ("gemma3_text", 6)])
def test_layer_types_from_the_pattern_follow_the_kept_layers(model_type, pattern):
    """An older config with only the sliding-window pattern: the child gets the explicit types of
    the layers it keeps (its own pattern would count from the renumbered layers)."""
    from shrinkit.families import FAMILIES

    fam = next(f for f in FAMILIES if f.name == model_type)
    cfg = {**TINY, "model_type": model_type, "num_hidden_layers": 8}
    child = fam.dims(cfg)
    out = fam.child_config(cfg, child, [0, 2, 5, 7], "float32")
    types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(8)]
    assert out["layer_types"] == [types[i] for i in (0, 2, 5, 7)]
    cfg["layer_types"] = list(reversed(types))
    assert fam.child_config(cfg, child, [0, 7], "float32")["layer_types"] == [types[7], types[0]]


@pytest.mark.parametrize("model_type,max_change", [("gemma3_text", None), ("gemma3_text", 0.5), ("gemma2", 0.5)])
def test_gemma_heal_keeps_a_planted_cut_exact(tmp_path, parent, model_type, max_change):
    """Gemma 2/3's sandwich norms: heal fits the down projection's output that the post-feedforward
    norm maps onto the target. A planted cut stays exact; a live layer dropped instead (negative
    control) is fitted (its residual error goes down) but not exact."""
    pl = parent(model_type)
    heal = {"heal": {"calibration": CALIB, "max_change": max_change}}
    st = act_stages()
    st = st[:2] + [heal] + st[2:]
    res = run(pl.path, tmp_path / "child", target=TARGET, stages=st)
    layers = next(s for s in res.report["stages"] if s["stage"] == "heal")["layers"]
    assert len(layers) == 3
    for layer in layers:
        assert max(layer["attn_rel_err"] + layer["residual_rel_err"]) < 1e-5, layer
    ids = tokens(96)
    ref = logits(pl.path, ids)
    assert rel_err(logits(tmp_path / "child", ids), ref) < 1e-4
    st = [s if "drop_layers" not in s else {"drop_layers": {"keep": [0, 2, 3]}} for s in st]  # drops live layer 1
    res = run(pl.path, tmp_path / "neg", target=TARGET, stages=st)
    first = next(s for s in res.report["stages"] if s["stage"] == "heal")["layers"][0]
    assert first["residual_rel_err"][0] > 1e-2 and first["residual_rel_err"][1] < 0.9 * first["residual_rel_err"][0]
    assert rel_err(logits(tmp_path / "neg", ids), ref) > 1e-3


def test_gemma3_heal_through_the_post_feedforward_norm(tmp_path):
    """A live cut (a live layer dropped, nothing planted dead): the unbounded fit through the
    post-feedforward norm brings the child's logits closer to the parent's than no heal does;
    negative control: the same fit treating the projection's output as the residual's update
    (no down_norm) gets less of the way."""
    import dataclasses
    import importlib

    gm = importlib.import_module("shrinkit.families.gemma")
    pl = gemma_like(tmp_path / "p", "gemma3_text", dead_layers=())
    ids = tokens(96)
    ref = logits(pl.path, ids)
    st = [s if "drop_layers" not in s else {"drop_layers": {"keep": [0, 2, 3]}} for s in act_stages()]
    healed = st[:2] + [{"heal": {"calibration": CALIB, "max_change": None}}] + st[2:]
    run(pl.path, tmp_path / "plain", target=TARGET, stages=st)
    run(pl.path, tmp_path / "healed", target=TARGET, stages=healed)
    fam, block = gm.gemma3_text, gm.gemma3_text.block
    object.__setattr__(fam, "block", dataclasses.replace(block, down_norm=None))  # a frozen dataclass
    try:
        run(pl.path, tmp_path / "no_norm", target=TARGET, stages=healed)
    finally:
        object.__setattr__(fam, "block", block)
    plain, good, bad = (rel_err(logits(tmp_path / n, ids), ref) for n in ("plain", "healed", "no_norm"))
    assert good < 0.9 * plain and good < 0.95 * bad, (plain, good, bad)
