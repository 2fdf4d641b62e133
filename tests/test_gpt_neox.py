"""GPT-NeoX (Pythia): q/k/v fused per head, parallel residual, partial rotary, LayerNorm with biases.

LayerNorm is not exact when hidden dims are cut (the mean and variance over the kept dims
differ), and head_dim is hidden / heads, so heads are only cut together with the hidden size.
The exact test therefore covers FFN neurons and layers (both residual layouts); heads are
tested by the kept set ranking finds and by the child's query_key_value rows, compared with
the parent's rows of the kept heads read by hand in the [heads, 3, head_dim] layout.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import load, logits, recipe, run, tokens
from planted import _choose, _randomize, rel_err
from shrinkit.cli import app
from shrinkit.pipeline import subclone

H, NH, HD, FFN, LAYERS = 64, 4, 16, 128, 4
CALIB = {"data": "random_tokens", "samples": 8, "seq_len": 32, "batch_size": 4}


def planted_neox(tmp: Path, parallel: bool = True, seed: int = 0):
    """Dead FFN neurons (gelu(0) = 0), one dead head per layer, dead layer 1."""
    import transformers

    cfg = transformers.GPTNeoXConfig(vocab_size=96, hidden_size=H, num_attention_heads=NH, intermediate_size=FFN,
                                     num_hidden_layers=LAYERS, max_position_embeddings=64, rotary_pct=0.25,
                                     use_parallel_residual=parallel, layer_norm_eps=1e-12, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    dead = {"ffn": {}, "heads": {}, "layers": [1]}
    with torch.no_grad():
        for li, layer in enumerate(model.gpt_neox.layers):
            a, m = layer.attention, layer.mlp
            fs = _choose(gen, FFN, 32)
            dead["ffn"][li] = fs
            m.dense_h_to_4h.weight[fs] = 0
            m.dense_h_to_4h.bias[fs] = 0
            m.dense_4h_to_h.weight[:, fs] = 0
            hs = _choose(gen, NH, 1)
            dead["heads"][li] = hs
            for h in hs:   # rows [heads, 3, head_dim]: head h owns rows h*3*hd .. (h+1)*3*hd
                a.query_key_value.weight[h * 3 * HD:(h + 1) * 3 * HD] = 0
                a.query_key_value.bias[h * 3 * HD:(h + 1) * 3 * HD] = 0
                a.dense.weight[:, h * HD:(h + 1) * HD] = 0
            if li in dead["layers"]:
                for lin in (a.dense, m.dense_4h_to_h):
                    lin.weight.zero_()
                    lin.bias.zero_()
    model.save_pretrained(tmp)
    return dead


def alive(n, dead):
    return [i for i in range(n) if i not in set(dead)]


def stages(method, drop=(1,)):
    if method == "activation":
        return [{"rank_neurons": {"method": method, "calibration": CALIB}},
                {"drop_layers": {"strategy": "importance", "calibration": CALIB}}, {"slice_embeddings": {}}]
    return [{"rank_neurons": {"method": method}}, {"drop_layers": {"drop": list(drop)}}, {"slice_embeddings": {}}]


@pytest.fixture(scope="module", params=[True, False], ids=["parallel", "sequential"])
def parent(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("neox") / "parent"
    dead = planted_neox(path, parallel=request.param)
    ids = tokens(96)
    return path, dead, ids, logits(path, ids)


@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_gpt_neox_planted_exact(parent, tmp_path, method):
    path, dead, ids, ref = parent
    res = run(path, tmp_path / "child", target=dict(intermediate_size=FFN - 32, num_hidden_layers=3),
              stages=stages(method))
    kept = res.report["kept"]
    assert kept["layers"] == alive(LAYERS, dead["layers"])
    for ci, p in enumerate(kept["layers"]):
        assert kept["ffn"][str(ci)] == alive(FFN, dead["ffn"][p])
    err = rel_err(logits(tmp_path / "child", ids), ref)
    assert err < 1e-4, err


def test_gpt_neox_negative_control(parent, tmp_path):
    path, dead, ids, ref = parent
    target = dict(intermediate_size=FFN - 32, num_hidden_layers=3)
    run(path, tmp_path / "first", target=target, stages=stages("first"))
    assert rel_err(logits(tmp_path / "first", ids), ref) > 1e-2
    run(path, tmp_path / "wrong", target=target, stages=stages("magnitude", drop=(2,)))
    assert rel_err(logits(tmp_path / "wrong", ids), ref) > 1e-2


@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_gpt_neox_heads_kept_whole(parent, tmp_path, method):
    """Cutting hidden 64 -> 48 cuts heads 4 -> 3 (head_dim 16): ranking keeps exactly the live
    heads, and each kept head's q, k and v rows come over together."""
    path, dead, ids, ref = parent
    res = run(path, tmp_path / "child", target=dict(hidden_size=48, num_attention_heads=3),
              stages=[s for s in stages(method) if "drop_layers" not in s])
    kept = res.report["kept"]
    pw = load_file(str(path / "model.safetensors"))
    cw = load_file(str(tmp_path / "child" / "model.safetensors"))
    hid = torch.tensor(kept["hidden"])
    for li in range(LAYERS):
        if li in dead["layers"]:
            continue  # a dead layer's heads all score zero through its zeroed output
        heads = alive(NH, dead["heads"][li])
        assert kept["q_heads"][str(li)] == heads
        name = f"gpt_neox.layers.{li}.attention.query_key_value"
        w = pw[f"{name}.weight"].view(NH, 3, HD, H)[heads][..., hid].reshape(-1, len(hid))
        assert torch.equal(cw[f"{name}.weight"], w)
        assert torch.equal(cw[f"{name}.bias"], pw[f"{name}.bias"].view(NH, 3, HD)[heads].reshape(-1))
    load(tmp_path / "child")


# ---------------------------------------------------------------- tiny real config
def real_parent(path: Path) -> Path:
    """A tiny random GPT-NeoX from its config class, as transformers saves it, in bfloat16."""
    import transformers

    cfg = transformers.GPTNeoXConfig(vocab_size=96, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                                     num_hidden_layers=4, max_position_embeddings=64, rotary_pct=0.25)
    torch.manual_seed(0)
    m = transformers.GPTNeoXForCausalLM(cfg)
    _randomize(m, torch.Generator().manual_seed(0))
    m.to(torch.bfloat16).save_pretrained(path)
    return path


def test_gpt_neox_real_config_cut_calibrate_verify(tmp_path, write_recipe):
    real_parent(tmp_path / "parent")
    r = recipe(target=dict(hidden_size=32, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2),
               stages=stages("activation") + [{"rescale_norms": {}}],
               verify={"data": "random_tokens", "samples": 4, "seq_len": 16})
    res = subclone(tmp_path / "parent", r, tmp_path / "child", verify=True)
    child = load(tmp_path / "child")
    assert (child.config.hidden_size, child.config.num_attention_heads, child.config.num_hidden_layers) == (32, 2, 2)
    v = res.report["verify"]
    assert v["kind"] == "causal_lm" and v["child"]["kl"] < v["random_init"]["kl"]
    # an uncut child: the block-at-a-time parent forward is transformers' forward (KL 0)
    r = recipe(target={}, stages=[{"slice_embeddings": {}}], output={"dtype": "float32"},
               verify={"data": "random_tokens", "samples": 4, "seq_len": 16})
    assert subclone(tmp_path / "parent", r, tmp_path / "same", verify=True).report["verify"]["child"]["kl"] < 1e-6
    out = CliRunner().invoke(app, ["inspect", str(tmp_path / "parent"), "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["model"]["family"] == "gpt_neox"
    rec = write_recipe({"target": {"hidden_size": 32, "num_attention_heads": 2},
                        "stages": [{"rank_neurons": {"method": "magnitude"}}, {"slice_embeddings": {}}]})
    out = CliRunner().invoke(app, ["plan", str(tmp_path / "parent"), "-r", str(rec), "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["child"]["head_dim"] == 16
