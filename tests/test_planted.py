"""Planted parents: ranking must find exactly the dead parts, and the child must compute
exactly what the parent computes. Each family has a negative control that shows the
comparison can fail."""

import json

import pytest

import planted
from helpers import logits, run, tokens
from planted import rel_err

def stages(method="magnitude", drop=(2,), rescale=True):
    s = [{"rank_neurons": {"method": method}}, {"drop_layers": {"drop": list(drop)}}, {"slice_embeddings": {}}]
    if rescale:
        s.append({"rescale_norms": {}})
    return s


def alive(n, dead):
    return [i for i in range(n) if i not in set(dead)]


def check_kept(report, pl, n_hidden=None, n_ffn=None, nq=None, nkv=None):
    kept = report["kept"]
    layers = kept["layers"]
    assert layers == alive(len(layers) + len(pl.dead_layers), pl.dead_layers)
    if n_hidden is not None:
        assert kept["hidden"] == alive(n_hidden, pl.dead_hidden)
    for ci, p in enumerate(layers):
        if n_ffn is not None:
            assert kept["ffn"][str(ci)] == alive(n_ffn, pl.dead_ffn[p])
        if nkv is not None and pl.dead_kv:
            assert kept["kv_heads"][str(ci)] == alive(nkv, pl.dead_kv[p])
        if nq is not None:
            assert kept["q_heads"][str(ci)] == alive(nq, pl.dead_q[p])


LLAMA_TARGET = dict(hidden_size=48, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                    num_hidden_layers=3)


@pytest.mark.parametrize("model_type,tie", [("llama", False), ("qwen2", True), ("qwen3", False), ("mistral", True)])
def test_llama_family_planted_exact(tmp_path, model_type, tie):
    extra = {"attention_bias": True} if model_type == "qwen2" else {}
    pl = planted.llama_like(tmp_path / "parent", model_type, tie=tie, **extra)
    res = run(pl.path, tmp_path / "child", target=LLAMA_TARGET, stages=stages())
    check_kept(res.report, pl, n_hidden=64, n_ffn=96, nq=4, nkv=2)
    cfg = json.loads((tmp_path / "child" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["num_hidden_layers"], cfg["head_dim"]) == (48, 64, 2, 1, 3, 16)
    ids = tokens(96)
    err = rel_err(logits(tmp_path / "child", ids), logits(pl.path, ids))
    assert err < 1e-4, err


def test_llama_negative_controls(tmp_path):
    """Without norm rescaling, or with a ranking that ignores the weights, the child differs."""
    pl = planted.llama_like(tmp_path / "parent")
    ids = tokens(96)
    ref = logits(pl.path, ids)
    run(pl.path, tmp_path / "norescale", target=LLAMA_TARGET, stages=stages(rescale=False))
    assert rel_err(logits(tmp_path / "norescale", ids), ref) > 1e-2
    run(pl.path, tmp_path / "first", target=LLAMA_TARGET, stages=stages(method="first"))
    assert rel_err(logits(tmp_path / "first", ids), ref) > 1e-2
    run(pl.path, tmp_path / "wronglayer", target=LLAMA_TARGET, stages=stages(drop=(1,)))
    assert rel_err(logits(tmp_path / "wronglayer", ids), ref) > 1e-2


def test_llama_query_heads_only(tmp_path):
    """Only query heads shrink: the same number go from every KV group."""
    pl = planted.llama_like(tmp_path / "parent", num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                            dead_kv=0, dead_q_per_group=2, dead_hidden=0, dead_ffn=0, dead_layers=())
    target = dict(num_attention_heads=4, num_key_value_heads=2)
    res = run(pl.path, tmp_path / "child", target=target, stages=stages(drop=()))
    check_kept(res.report, pl, nq=8)
    ids = tokens(96)
    assert rel_err(logits(tmp_path / "child", ids), logits(pl.path, ids)) < 1e-4


@pytest.mark.parametrize("n_inner", [None, 192])
def test_gpt2_planted_exact(tmp_path, n_inner):
    pl = planted.gpt2(tmp_path / "parent", n_inner=n_inner)
    F = n_inner or 256
    target = dict(intermediate_size=F - 32, num_hidden_layers=3)
    res = run(pl.path, tmp_path / "child", target=target, stages=stages(drop=pl.dead_layers))
    check_kept(res.report, pl, n_ffn=F)
    ids = tokens(96)
    ref = logits(pl.path, ids)
    assert rel_err(logits(tmp_path / "child", ids), ref) < 1e-4
    run(pl.path, tmp_path / "neg", target=target, stages=stages(method="first", drop=pl.dead_layers))
    assert rel_err(logits(tmp_path / "neg", ids), ref) > 1e-2


@pytest.mark.parametrize("mlm", [True, False])
def test_bert_planted_exact(tmp_path, mlm):
    pl = planted.bert(tmp_path / "parent", mlm=mlm)
    cls = "AutoModelForMaskedLM" if mlm else "AutoModel"
    target = dict(intermediate_size=96, num_hidden_layers=3)
    res = run(pl.path, tmp_path / "child", target=target, stages=stages(drop=pl.dead_layers))
    check_kept(res.report, pl, n_ffn=128)
    ids = tokens(96)
    ref = logits(pl.path, ids, cls)
    assert rel_err(logits(tmp_path / "child", ids, cls), ref) < 1e-4
    run(pl.path, tmp_path / "neg", target=target, stages=stages(drop=(2,)))
    assert rel_err(logits(tmp_path / "neg", ids, cls), ref) > 1e-2


def test_row_blocks_give_the_same_child(tmp_path, monkeypatch):
    """Large tensors are cut and written in row blocks: with tiny blocks (every path: gathered
    rows, ranged rows, untouched rows) the child is byte-identical to the one-block child."""
    import shrinkit.stages.slice as slice_mod

    pl = planted.llama_like(tmp_path / "parent")
    for method in ("magnitude", "first", "uniform"):
        run(pl.path, tmp_path / f"whole-{method}", target=LLAMA_TARGET, stages=stages(method=method))
    monkeypatch.setattr(slice_mod, "BLOCK_BYTES", 700)
    for method in ("magnitude", "first", "uniform"):
        run(pl.path, tmp_path / f"blocks-{method}", target=LLAMA_TARGET, stages=stages(method=method))
        a = (tmp_path / f"whole-{method}" / "model.safetensors").read_bytes()
        b = (tmp_path / f"blocks-{method}" / "model.safetensors").read_bytes()
        assert a == b, method
    ids = tokens(96)
    assert rel_err(logits(tmp_path / "blocks-magnitude", ids), logits(pl.path, ids)) < 1e-4
