"""BERT-style encoder families (RoBERTa, XLM-RoBERTa, DistilBERT): planted parents through
magnitude and activation ranking with negative controls, and tiny real configs cut in width and
depth, loaded with no missing or unexpected keys, calibrated and verified.

LayerNorm normalizes over the whole hidden dim, so a child without dead hidden dims computes
a different mean and variance: the exact checks cover FFN neurons and whole layers; for hidden
dims and heads (whose cut needs a hidden cut here: hidden = heads x head_dim) ranking must find
exactly the dead ones."""

import json

import pytest
import torch
from typer.testing import CliRunner

import planted
from helpers import load, run, tokens
from planted import rel_err
from shrinkit.cli import app
from shrinkit.recipe import Verify
from shrinkit.verify import verify_child
from test_planted import alive, check_kept

KINDS = ["roberta", "xlm-roberta", "distilbert"]
CALIB = {"data": "random_tokens", "samples": 8, "seq_len": 32, "batch_size": 4}
BASE = {"distilbert": "distilbert", "roberta": "roberta", "xlm-roberta": "roberta"}


def stages(method, drop=(1,)):
    rank = {"method": method}
    if method == "activation":
        rank["calibration"] = CALIB
    return [{"rank_neurons": rank}, {"drop_layers": {"drop": list(drop)}}, {"slice_embeddings": {}}]


@torch.no_grad()
def outputs(path, ids, mlm=True):
    m = load(path, "AutoModelForMaskedLM" if mlm else "AutoModel")
    out = m(input_ids=ids)
    return out.logits if mlm else out.last_hidden_state


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,mlm", [("magnitude", True), ("activation", False), ("activation", True)])
def test_encoder_planted_ffn_and_layers_exact(tmp_path, kind, method, mlm):
    pl = planted.encoder(tmp_path / "parent", kind, mlm=mlm)
    target = dict(intermediate_size=96, num_hidden_layers=3)
    res = run(pl.path, tmp_path / "child", target=target, stages=stages(method))
    check_kept(res.report, pl, n_ffn=128)
    ids = tokens(96)
    ref = outputs(pl.path, ids, mlm)
    assert rel_err(outputs(tmp_path / "child", ids, mlm), ref) < 1e-4
    if not mlm:  # verification sees the exact child as the parent, and a random child as different
        v = verify_child(pl.path, tmp_path / "child", Verify(data="random_tokens", samples=6, seq_len=16, batch_size=3))
        assert v["child"]["similarity_pearson"] == pytest.approx(1.0, abs=1e-6)
        assert v["random_init"]["similarity_pearson"] < 0.99
    # negative controls: a live layer dropped, or neurons chosen without looking at the weights
    run(pl.path, tmp_path / "wrong-layer", target=target, stages=stages("magnitude", drop=(2,)))
    assert rel_err(outputs(tmp_path / "wrong-layer", ids, mlm), ref) > 1e-2
    run(pl.path, tmp_path / "first", target=target, stages=stages("first"))
    assert rel_err(outputs(tmp_path / "first", ids, mlm), ref) > 1e-2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_encoder_planted_heads_and_hidden_found(tmp_path, kind, method):
    """Dead hidden dims and one dead head per layer: ranking keeps exactly the live ones (the
    child's outputs then differ only by LayerNorm's statistics over fewer dims)."""
    pl = planted.encoder(tmp_path / "parent", kind, dead_ffn=0, dead_layers=(), dead_heads=1, dead_hidden=16)
    target = dict(hidden_size=48, num_attention_heads=3)
    res = run(pl.path, tmp_path / "child", target=target, stages=stages(method, drop=()))
    check_kept(res.report, pl, n_hidden=64, nq=4)
    first = run(pl.path, tmp_path / "first", target=target, stages=stages("first", drop=())).report
    assert first["kept"]["hidden"] != alive(64, pl.dead_hidden)  # the check above can fail
    assert any(first["kept"]["q_heads"][str(i)] != alive(4, pl.dead_q[i]) for i in range(4))
    load(tmp_path / "child", "AutoModelForMaskedLM")


def real_parent(path, kind, mlm=True, seed=0):
    """A tiny model from the family's own config class with random weights of real spread."""
    _, mlm_cls, base_cls = planted._encoder_classes(kind)
    torch.manual_seed(seed)
    m = (mlm_cls if mlm else base_cls)(planted.encoder_config(kind))
    planted._randomize(m, torch.Generator().manual_seed(seed))
    m.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind,mlm", [(k, True) for k in KINDS] + [(KINDS[0], False), (KINDS[-1], False)])
def test_encoder_real_cut_loads_calibrates_and_verifies(tmp_path, kind, mlm):
    parent = real_parent(tmp_path / "parent", kind, mlm)
    target = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
    st = [{"rank_neurons": {"method": "activation", "calibration": CALIB}},
          {"drop_layers": {"strategy": "importance", "calibration": CALIB}}, {"slice_embeddings": {}},
          {"rescale_norms": {}}]
    res = run(parent, tmp_path / "child", target=target, stages=st)
    m = load(tmp_path / "child", "AutoModelForMaskedLM" if mlm else "AutoModel")
    c = m.config
    ffn = c.hidden_dim if kind == "distilbert" else c.intermediate_size
    assert (c.hidden_size, ffn, c.num_attention_heads, c.num_hidden_layers) == (32, 64, 2, 2)
    assert res.report["family"] == BASE[kind] or res.report["family"] == kind
    with torch.no_grad():
        out = m(input_ids=tokens(96))
    assert torch.isfinite(out[0]).all()
    v = verify_child(parent, tmp_path / "child", Verify(data="random_tokens", samples=6, seq_len=16, batch_size=3))
    assert v["kind"] == "encoder"
    assert -1 <= v["child"]["similarity_pearson"] <= 1 and -1 <= v["random_init"]["similarity_pearson"] <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_encoder_inspect_and_plan(tmp_path, kind, write_recipe):
    parent = real_parent(tmp_path / "parent", kind)
    r = CliRunner().invoke(app, ["inspect", str(parent), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["model"]["model_type"] == kind and s["dims"]["hidden_size"] == 64
    rec = write_recipe({"target": {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2},
                        "stages": [{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"strategy": "first"}},
                                   {"slice_embeddings": {}}]})
    r = CliRunner().invoke(app, ["plan", str(parent), "-r", str(rec), "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["child"]["hidden_size"] == 32 and p["child"]["num_hidden_layers"] == 2
    r = CliRunner().invoke(app, ["subclone", str(parent), "-r", str(rec), "--out", str(tmp_path / "child"),
                                 "--no-verify", "--quiet"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["verify", str(parent), str(tmp_path / "child"), "--data", "random_tokens",
                                 "--samples", "4", "--seq-len", "16", "--json"])
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)
    assert v["kind"] == "encoder" and "similarity_pearson" in v["child"] and "similarity_pearson" in v["random_init"]
