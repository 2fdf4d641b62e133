"""rotate_hidden: the residual stream projected onto its top principal directions."""

import json

import pytest
import torch
from safetensors.torch import load_file

import planted
from helpers import load, logits, recipe, run, tokens
from planted import rel_err
from shrinkit.errors import RecipeError

CALIB = {"data": "random_tokens", "samples": 8, "seq_len": 32, "batch_size": 4}
ROTATE = {"rotate_hidden": {"calibration": CALIB}}


@pytest.mark.parametrize("model_type,tie,extra", [("llama", False, {}), ("qwen2", True, {"attention_bias": True}),
                                                  ("qwen3", False, {})])
def test_rotation_with_nothing_cut_reproduces_the_parent(tmp_path, model_type, tie, extra):
    """A full rotation (d = D) with every norm folded into its readers computes what the parent
    computes; a tied parent's child gets an untied head (and says so)."""
    pl = planted.llama_like(tmp_path / "p", model_type, tie=tie, dead_hidden=0, dead_ffn=0, dead_kv=0,
                            dead_layers=(), **extra)
    res = run(pl.path, tmp_path / "c", stages=[ROTATE, {"slice_embeddings": {}}])
    ids = tokens(96)
    assert rel_err(logits(tmp_path / "c", ids), logits(pl.path, ids)) < 1e-4
    w = load_file(str(tmp_path / "c" / "model.safetensors"))
    norm = next(k for k in w if k.endswith("layers.0.input_layernorm.weight"))
    assert torch.allclose(w[norm], torch.ones(64))                          # the scales moved into the readers
    emb = next(k for k in w if k.endswith("embed_tokens.weight"))
    parent = load_file(str(pl.path / "model.safetensors"))
    assert not torch.allclose(w[emb], parent[emb], atol=1e-3)             # really rotated
    st = next(s for s in res.report["stages"] if s["stage"] == "rotate_hidden")
    assert st["kept_variance"] == pytest.approx(1.0)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    if tie:
        assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in w
        assert st["untied_head_params"] == 96 * 64 == res.report["child"]["untied_head_params"]
        assert res.report["child"]["params"] == res.report["parent"]["params"] + 96 * 64
        assert not res.report["child"]["tied_embeddings"]
    else:
        assert "untied_head_params" not in st and not cfg.get("tie_word_embeddings", False)
    load(tmp_path / "c")  # no missing or unexpected keys


def test_rotation_planted_dead_dims_and_negative_control(tmp_path):
    """A parent whose residual stream lives in 48 of 64 dims: the top 48 directions span it, so a
    rotated child of hidden 48 is exact (norm scale sqrt(64/48) restores the RMS); at hidden 40
    (negative control) it cannot be."""
    pl = planted.llama_like(tmp_path / "p", dead_hidden=16, dead_ffn=0, dead_kv=0, dead_layers=())
    ids = tokens(96)
    ref = logits(pl.path, ids)
    res = run(pl.path, tmp_path / "c", target=dict(hidden_size=48), stages=[ROTATE, {"slice_embeddings": {}}])
    assert res.report["stages"][0]["kept_variance"] == pytest.approx(1.0, abs=1e-6)
    assert rel_err(logits(tmp_path / "c", ids), ref) < 1e-4
    w = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert torch.allclose(w["model.norm.weight"], torch.full((48,), (64 / 48) ** 0.5))
    run(pl.path, tmp_path / "n", target=dict(hidden_size=40), stages=[ROTATE, {"slice_embeddings": {}}])
    assert rel_err(logits(tmp_path / "n", ids), ref) > 1e-2


def test_rotation_with_ranked_ffn_and_heads(tmp_path):
    """rotate_hidden after rank_neurons: neurons and KV groups are still selected (planted dead
    ones go), the hidden axis is rotated; the child is exact."""
    pl = planted.llama_like(tmp_path / "p", dead_layers=())
    res = run(pl.path, tmp_path / "c", target=dict(hidden_size=48, intermediate_size=64, num_key_value_heads=1,
                                                    num_attention_heads=2),
              stages=[{"rank_neurons": {"method": "activation", "calibration": CALIB}}, ROTATE,
                      {"slice_embeddings": {}}])
    assert res.report["kept"]["hidden"] == "rotated"
    ids = tokens(96)
    assert rel_err(logits(tmp_path / "c", ids), logits(pl.path, ids)) < 1e-4


def test_rotation_of_a_layernorm_family_is_refused(tmp_path):
    from shrinkit.pipeline import subclone

    pl = planted.gpt2(tmp_path / "g")
    with pytest.raises(RecipeError, match="LayerNorm"):
        subclone(pl.path, recipe(target=dict(hidden_size=32, num_attention_heads=2),
                                 stages=[{"rank_neurons": {}}, ROTATE, {"slice_embeddings": {}}]), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_rotation_order_errors():
    with pytest.raises(ValueError, match="rank_neurons must come first"):
        recipe(stages=[ROTATE, {"rank_neurons": {}}, {"slice_embeddings": {}}])
    with pytest.raises(ValueError, match="rotate_hidden must come before slice_embeddings"):
        recipe(stages=[{"slice_embeddings": {}}, ROTATE])


def test_rotate_with_heal_is_refused_before_any_work(tmp_path):
    """rotate_hidden and heal in one recipe: a one-line recipe error (exit 2) that says why and
    what to do, and no output folder. Each stage alone is accepted (negative control)."""
    import yaml
    from typer.testing import CliRunner

    from shrinkit.cli import app

    pl = planted.llama_like(tmp_path / "p", tie=True)
    target = dict(hidden_size=48, intermediate_size=64, num_key_value_heads=1, num_attention_heads=2,
                  num_hidden_layers=3)
    for heal in ({"heal": {"calibration": CALIB}}, {"heal": {"when": "auto", "calibration": CALIB}}):
        stages = [{"rank_neurons": {"method": "activation", "calibration": CALIB}}, ROTATE, heal,
                  {"slice_embeddings": {}}]
        with pytest.raises(ValueError, match="rotate_hidden and heal cannot be combined yet"):
            recipe(target=target, stages=stages)
        rf = tmp_path / "r.yaml"
        rf.write_text(yaml.safe_dump({"target": target, "stages": stages}))
        r = CliRunner().invoke(app, ["subclone", str(pl.path), "-r", str(rf), "--out", str(tmp_path / "c")])
        assert r.exit_code == 2, r.output
        assert "diverged in training" in r.stderr and "keep one of the two stages" in r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert not (tmp_path / "c").exists()
    for stages in ([ROTATE, {"slice_embeddings": {}}], [{"heal": {"calibration": CALIB}}, {"slice_embeddings": {}}]):
        recipe(target=target, stages=stages)  # each alone is a valid recipe

