"""Verification: a child identical to its parent scores KL 0 and the parent's perplexity;
a real cut scores between the parent and a random-init child."""

import json

import pytest
from typer.testing import CliRunner

import planted
from helpers import run
from shrinkit.cli import app
from shrinkit.recipe import Verify
from shrinkit.verify import verify_child

SPEC = Verify(data="random_tokens", samples=6, seq_len=24, batch_size=3)


def test_identical_child_has_zero_kl(tmp_path):
    pl = planted.llama_like(tmp_path / "p", dead_layers=())
    run(pl.path, tmp_path / "c", stages=[{"slice_embeddings": {}}])
    v = verify_child(pl.path, tmp_path / "c", SPEC)
    assert v["kind"] == "causal_lm"
    assert abs(v["child"]["kl"]) < 1e-6
    assert v["child"]["perplexity"] == pytest.approx(v["parent"]["perplexity"], rel=1e-5)
    assert v["random_init"]["kl"] > 1e-2  # the comparison can tell models apart


def test_planted_cut_verifies_as_exact_and_cli_json(tmp_path):
    pl = planted.llama_like(tmp_path / "p")
    run(pl.path, tmp_path / "c", target=dict(hidden_size=48, intermediate_size=64, num_attention_heads=2,
                                             num_key_value_heads=1, num_hidden_layers=3),
        stages=[{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"drop": [2]}},
                {"slice_embeddings": {}}, {"rescale_norms": {}}])
    r = CliRunner().invoke(app, ["verify", str(pl.path), str(tmp_path / "c"), "--data", "random_tokens",
                                 "--samples", "4", "--seq-len", "16", "--json"])
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)
    assert v["child"]["kl"] < 1e-6 < v["random_init"]["kl"]


def test_encoder_similarity(tmp_path):
    pl = planted.bert(tmp_path / "p", mlm=False)
    run(pl.path, tmp_path / "same", stages=[{"slice_embeddings": {}}])
    v = verify_child(pl.path, tmp_path / "same", SPEC)
    assert v["kind"] == "encoder"
    assert v["child"]["similarity_pearson"] == pytest.approx(1.0, abs=1e-6)
    assert v["random_init"]["similarity_pearson"] < 0.99


def test_subclone_writes_verification_into_report(tmp_path, write_recipe):
    pl = planted.llama_like(tmp_path / "p")
    rec = write_recipe({"target": {"num_hidden_layers": 3},
                        "stages": [{"drop_layers": {"drop": [2]}}, {"slice_embeddings": {}}],
                        "verify": {"data": "random_tokens", "samples": 4, "seq_len": 16}})
    r = CliRunner().invoke(app, ["subclone", str(pl.path), "-r", str(rec), "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "KL" in r.output
    rep = json.loads((tmp_path / "c" / "shrinkit_report.json").read_text())
    assert rep["verify"]["child"]["kl"] < 1e-6
    assert "## Verification" in (tmp_path / "c" / "shrinkit_report.md").read_text()
