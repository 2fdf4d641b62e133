"""Mixture-of-experts families (mixtral, qwen2_moe, qwen3_moe).

Planted parents, planted by hand in transformers' own modules (experts held stacked in memory,
saved per expert by transformers): dead hidden dims, dead KV groups, dead neurons in every live
expert (and in the shared expert and a dense layer's FFN), dead experts that the router never
picks (their router row is -100 on a residual dimension that is a positive constant on every
token, so their routing probability underflows to exactly 0), and a dead layer. The child,
cut in every one of these, must reproduce the parent's logits through both `magnitude` (expert
weight norm) and `activation` (router load) ranking; `first` ranking is the negative control.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import load, logits, recipe, run, tokens
from planted import _choose, _randomize, rel_err
from shrinkit.cli import app
from shrinkit.pipeline import subclone

H, NQ, NKV, HD, LAYERS, E, K, F, FS, FD = 64, 4, 2, 16, 4, 6, 2, 32, 48, 96
CALIB = {"data": "random_tokens", "samples": 8, "seq_len": 32, "batch_size": 4}


@dataclass
class MoEPlanted:
    path: Path
    dense: list[int]                       # parent layers with a dense FFN
    dead_hidden: list[int] = field(default_factory=list)
    dead_kv: dict = field(default_factory=dict)
    dead_experts: dict = field(default_factory=dict)     # layer -> experts never routed to
    dead_expert_ffn: dict = field(default_factory=dict)  # (layer, expert) -> neurons
    dead_shared: dict = field(default_factory=dict)      # layer -> shared expert neurons
    dead_ffn: dict = field(default_factory=dict)         # dense layer -> neurons
    dead_layers: list[int] = field(default_factory=list)


def config(model_type: str, **kw):
    import transformers

    base = dict(vocab_size=96, hidden_size=H, num_attention_heads=NQ, num_key_value_heads=NKV, head_dim=HD,
                num_hidden_layers=LAYERS, max_position_embeddings=64, rms_norm_eps=1e-12, num_experts_per_tok=K,
                tie_word_embeddings=False)
    if model_type == "mixtral":
        return transformers.MixtralConfig(**base, num_local_experts=E, intermediate_size=F, **kw)
    extra = dict(num_experts=E, moe_intermediate_size=F, intermediate_size=FD, mlp_only_layers=[3])
    extra.update(kw)
    kw = {}
    if model_type == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**base, **extra, shared_expert_intermediate_size=FS, qkv_bias=True, **kw)
    return transformers.Qwen3MoeConfig(**base, **extra, **kw)


def planted_moe(tmp: Path, model_type: str, seed: int = 0) -> MoEPlanted:
    import transformers

    cfg = config(model_type)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    base = model.model
    dense = [i for i, layer in enumerate(base.layers) if not hasattr(layer.mlp, "experts")]
    pl = MoEPlanted(tmp, dense, dead_layers=[2])
    # dimension c: a positive constant on every token's residual stream (nothing writes to it),
    # so the normalized input's c entry is > 0 and a router row of -100 there is always last
    c = 5
    pl.dead_hidden = _choose(gen, H - 1, 16)
    pl.dead_hidden = [d + (d >= c) for d in pl.dead_hidden]
    D = pl.dead_hidden
    with torch.no_grad():
        base.embed_tokens.weight[:, c] = 4.0
        base.embed_tokens.weight[:, D] = 0
        base.norm.weight[D] = 0
        model.lm_head.weight[:, D] = 0
        for li, layer in enumerate(base.layers):
            a, m = layer.self_attn, layer.mlp
            layer.input_layernorm.weight[D] = 0
            layer.post_attention_layernorm.weight[D] = 0
            layer.post_attention_layernorm.weight[c] = 1.0
            for lin in (a.q_proj, a.k_proj, a.v_proj):
                lin.weight[:, D + [c]] = 0      # c is read by the dead experts' router rows only
            a.o_proj.weight[D + [c], :] = 0
            gs = _choose(gen, NKV, 1)
            pl.dead_kv[li] = gs
            r = NQ // NKV
            for g in gs:
                for lin in (a.k_proj, a.v_proj):
                    lin.weight[g * HD:(g + 1) * HD] = 0
                    if lin.bias is not None:
                        lin.bias[g * HD:(g + 1) * HD] = 0
                for h in range(g * r, (g + 1) * r):
                    a.q_proj.weight[h * HD:(h + 1) * HD] = 0
                    if a.q_proj.bias is not None:
                        a.q_proj.bias[h * HD:(h + 1) * HD] = 0
                    a.o_proj.weight[:, h * HD:(h + 1) * HD] = 0
            if li in dense:
                for lin in (m.gate_proj, m.up_proj):
                    lin.weight[:, D + [c]] = 0
                m.down_proj.weight[D + [c], :] = 0
                fs = _choose(gen, FD, 32)
                pl.dead_ffn[li] = fs
                m.gate_proj.weight[fs] = 0
                m.up_proj.weight[fs] = 0
                m.down_proj.weight[:, fs] = 0
                if li in pl.dead_layers:
                    m.down_proj.weight.zero_()
            else:
                gu, down, router = m.experts.gate_up_proj, m.experts.down_proj, m.gate.weight   # [E,2F,H] [E,H,F] [E,H]
                gu[:, :, D + [c]] = 0
                down[:, D + [c], :] = 0
                router[:, D] = 0
                router[:, c] = 0        # live experts: routed by the token, not by the constant
                dead_e = _choose(gen, E, 2)
                pl.dead_experts[li] = dead_e
                for e in range(E):
                    if e in dead_e:
                        gu[e] = 0
                        down[e] = 0
                        router[e] = 0
                        router[e, c] = -100.0
                        continue
                    fs = _choose(gen, F, 8)
                    pl.dead_expert_ffn[(li, e)] = fs
                    gu[e, fs] = 0
                    gu[e, [F + f for f in fs]] = 0
                    down[e, :, fs] = 0
                if li in pl.dead_layers:
                    down.zero_()
                if hasattr(m, "shared_expert"):
                    se = m.shared_expert
                    for lin in (se.gate_proj, se.up_proj, m.shared_expert_gate):
                        lin.weight[:, D + [c]] = 0
                    se.down_proj.weight[D + [c], :] = 0
                    fs = _choose(gen, FS, 12)
                    pl.dead_shared[li] = fs
                    se.gate_proj.weight[fs] = 0
                    se.up_proj.weight[fs] = 0
                    se.down_proj.weight[:, fs] = 0
                    if li in pl.dead_layers:
                        se.down_proj.weight.zero_()
            if li in pl.dead_layers:
                a.o_proj.weight.zero_()
    model.save_pretrained(tmp)
    return pl


TARGET = dict(hidden_size=48, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3, num_experts=4,
              expert_intermediate_size=F - 8)
EXTRA = {"mixtral": {}, "qwen2_moe": dict(intermediate_size=64, shared_expert_intermediate_size=FS - 12),
         "qwen3_moe": dict(intermediate_size=64)}


def stages(method: str, drop=(2,)):
    if method == "activation":
        return [{"rank_neurons": {"method": method, "calibration": CALIB}},
                {"drop_layers": {"strategy": "importance", "calibration": CALIB}},
                {"slice_embeddings": {}}, {"rescale_norms": {}}]
    return [{"rank_neurons": {"method": method}}, {"drop_layers": {"drop": list(drop)}},
            {"slice_embeddings": {}}, {"rescale_norms": {}}]


def alive(n, dead):
    return [i for i in range(n) if i not in set(dead)]


def check_kept(report, pl: MoEPlanted):
    kept = report["kept"]
    assert kept["layers"] == alive(LAYERS, pl.dead_layers)
    assert kept["hidden"] == alive(H, pl.dead_hidden)
    for ci, p in enumerate(kept["layers"]):
        assert kept["kv_heads"][str(ci)] == alive(NKV, pl.dead_kv[p])
        if p in pl.dense:
            assert kept["ffn"][str(ci)] == alive(FD, pl.dead_ffn[p])
            continue
        experts = alive(E, pl.dead_experts[p])
        assert kept["experts"][str(ci)] == experts
        for ce, e in enumerate(experts):
            assert kept["expert_ffn"][f"{ci}.{ce}"] == alive(F, pl.dead_expert_ffn[(p, e)])
        if pl.dead_shared:
            assert kept["shared_ffn"][str(ci)] == alive(FS, pl.dead_shared[p])


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe"])
def parent(request, tmp_path_factory):
    mt = request.param
    pl = planted_moe(tmp_path_factory.mktemp(mt) / "parent", mt)
    ids = tokens(96)
    return mt, pl, ids, logits(pl.path, ids)


@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_moe_planted_exact(parent, tmp_path, method):
    mt, pl, ids, ref = parent
    res = run(pl.path, tmp_path / "child", target={**TARGET, **EXTRA[mt]}, stages=stages(method))
    check_kept(res.report, pl)
    cfg = json.loads((tmp_path / "child" / "config.json").read_text())
    n_exp = cfg.get("num_local_experts", cfg.get("num_experts"))
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], n_exp, cfg["num_experts_per_tok"]) == (48, 3, 4, K)
    if mt != "mixtral":  # parent layer 3 (dense) is child layer 2
        assert cfg["mlp_only_layers"] == [2]
    err = rel_err(logits(tmp_path / "child", ids), ref)   # loads with no missing/unexpected keys
    assert err < 1e-4, err


def test_moe_negative_control(parent, tmp_path):
    """`first` keeps dead experts and neurons and drops live ones: the child differs."""
    mt, pl, ids, ref = parent
    run(pl.path, tmp_path / "first", target={**TARGET, **EXTRA[mt]}, stages=stages("first"))
    assert rel_err(logits(tmp_path / "first", ids), ref) > 1e-2
    run(pl.path, tmp_path / "wronglayer", target={**TARGET, **EXTRA[mt]}, stages=stages("magnitude", drop=(1,)))
    assert rel_err(logits(tmp_path / "wronglayer", ids), ref) > 1e-2


# ---------------------------------------------------------------- tiny real configs
def real_parent(tmp: Path, model_type: str) -> Path:
    """A tiny random model from the family's config class, as transformers saves it (one tensor
    per expert), in bfloat16."""
    import transformers

    kw = {"mixtral": {}, "qwen2_moe": dict(mlp_only_layers=[1]),   # layers 0, 2, 3 sparse
          "qwen3_moe": dict(mlp_only_layers=[], decoder_sparse_step=2)}[model_type]  # layers 1, 3 sparse
    cfg = config(model_type, **kw)
    cfg.rms_norm_eps = 1e-6
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    _randomize(model, torch.Generator().manual_seed(0))   # weights with real spread
    model.to(torch.bfloat16).save_pretrained(tmp)
    return tmp


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_real_config_cut_calibrate_verify(tmp_path, model_type):
    parent = real_parent(tmp_path / "parent", model_type)
    target = {**TARGET, **EXTRA[model_type], "num_experts": 3, "num_experts_per_tok": 1}
    r = recipe(target=target, stages=[{"rank_neurons": {"method": "activation", "calibration": CALIB}},
                                      {"drop_layers": {"strategy": "importance", "calibration": CALIB}},
                                      {"slice_embeddings": {}}, {"rescale_norms": {}}],
               verify={"data": "random_tokens", "samples": 4, "seq_len": 16})
    res = subclone(parent, r, tmp_path / "child", verify=True)
    m = load(tmp_path / "child")
    assert m.config.num_experts_per_tok == 1 and m.config.num_hidden_layers == 3
    pm = load(parent)   # every kept layer keeps its kind (dense or experts) in the child
    kinds = [hasattr(pm.model.layers[p].mlp, "experts") for p in res.report["kept"]["layers"]]
    assert [hasattr(layer.mlp, "experts") for layer in m.model.layers] == kinds
    v = res.report["verify"]
    assert v["kind"] == "causal_lm" and v["child"]["kl"] >= 0 and v["random_init"]["kl"] > 0
    # calibration ran on the router: every sparse child layer keeps 3 parent experts
    sparse = [k for k, e in res.report["kept"]["experts"].items()]
    assert sparse and all(len(res.report["kept"]["experts"][k]) == 3 for k in sparse)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_moe_block_forward_matches_transformers(tmp_path, model_type):
    """Calibration's block-at-a-time forward (experts assembled from per-expert tensors, router
    renamed) computes what transformers computes: verifying an uncut child gives KL 0."""
    parent = real_parent(tmp_path / "parent", model_type)
    r = recipe(target={}, stages=[{"slice_embeddings": {}}], output={"dtype": "float32"},
               verify={"data": "random_tokens", "samples": 4, "seq_len": 16})
    res = subclone(parent, r, tmp_path / "same", verify=True)
    assert res.report["verify"]["child"]["kl"] < 1e-6
    assert res.report["verify"]["random_init"]["kl"] > 1e-3


def test_moe_inspect_and_plan(tmp_path, write_recipe):
    parent = real_parent(tmp_path / "parent", "qwen2_moe")
    r = CliRunner().invoke(app, ["inspect", str(parent), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)["dims"]
    assert (d["num_experts"], d["num_experts_per_tok"], d["expert_intermediate_size"],
            d["shared_expert_intermediate_size"]) == (E, K, F, FS)
    rec = write_recipe({"target": {"num_experts": 2, "expert_intermediate_size": 16},
                        "stages": [{"rank_neurons": {"method": "magnitude"}}, {"slice_embeddings": {}}]})
    r = CliRunner().invoke(app, ["plan", str(parent), "-r", str(rec), "--json"])
    assert r.exit_code == 0, r.output
    c = json.loads(r.stdout)["child"]
    assert (c["num_experts"], c["num_experts_per_tok"], c["expert_intermediate_size"]) == (2, 2, 16)
    # more experts per token than experts: clamped when not set, refused when set
    rec = write_recipe({"target": {"num_experts": 1},
                        "stages": [{"rank_neurons": {"method": "magnitude"}}, {"slice_embeddings": {}}]})
    r = CliRunner().invoke(app, ["plan", str(parent), "-r", str(rec), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["child"]["num_experts_per_tok"] == 1
    rec = write_recipe({"target": {"num_experts": 2, "num_experts_per_tok": 3},
                        "stages": [{"rank_neurons": {"method": "magnitude"}}, {"slice_embeddings": {}}]})
    r = CliRunner().invoke(app, ["plan", str(parent), "-r", str(rec)])
    assert r.exit_code == 2 and "num_experts_per_tok" in r.output


# ---------------------------------------------------------------- children that run as loaded
MAG = [{"rank_neurons": {"method": "magnitude"}}, {"slice_embeddings": {}}]


def cli_plan(parent, rec):
    """exit code and stderr (with --json an error is also one JSON object on stdout)."""
    r = CliRunner().invoke(app, ["plan", str(parent), "-r", str(rec), "--json"])
    return r.exit_code, r.stderr if r.exit_code else r.output


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_moe_plan_refuses_widths_the_experts_kernel_cannot_run(tmp_path, write_recipe, model_type):
    """transformers' default experts kernel (grouped_mm) needs 16-byte row strides: expert widths
    and the hidden size a multiple of 8. plan refuses others in one line naming the nearest valid
    sizes (exit 2); the sizes next to them pass."""
    parent = real_parent(tmp_path / "parent", model_type)
    for target, near in (({"expert_intermediate_size": 30}, "use 24 or 32"), ({"hidden_size": 44}, "use 40 or 48"),
                         ({"expert_intermediate_size": 5}, "use 8")):
        code, out = cli_plan(parent, write_recipe({"target": target, "stages": MAG}))
        assert code == 2, out
        assert near in out and "grouped_mm" in out and len(out.strip().splitlines()) == 1, out
    for target in ({"expert_intermediate_size": 24}, {"hidden_size": 40}, {"expert_intermediate_size": 32}):
        code, out = cli_plan(parent, write_recipe({"target": target, "stages": MAG}))
        assert code == 0, out


def test_moe_child_at_odd_but_valid_widths_runs_with_from_pretrained_defaults(tmp_path):
    """A child cut to expert width 24 and hidden 40 (float32 and bfloat16) runs in transformers
    with no kwargs (default experts implementation) and gives finite logits."""
    import transformers

    parent = real_parent(tmp_path / "parent", "mixtral")
    for dtype in ("float32", "bfloat16"):
        run(parent, tmp_path / dtype, target={"expert_intermediate_size": 24, "hidden_size": 40,
                                              "num_attention_heads": 2, "num_key_value_heads": 1},
            stages=MAG, output={"dtype": dtype})
        m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / dtype)
        assert m.config._experts_implementation == "grouped_mm"
        with torch.no_grad():
            assert torch.isfinite(m(input_ids=tokens(96)).logits.float()).all()


def test_mixtral_intermediate_size_is_its_experts_width(tmp_path, write_recipe):
    """Mixtral's config key intermediate_size is its experts' FFN width: the target understands it
    (the child config writes it back under the same key); both names at different sizes are refused."""
    parent = real_parent(tmp_path / "parent", "mixtral")
    code, out = cli_plan(parent, write_recipe({"target": {"intermediate_size": 16}, "stages": MAG}))
    assert code == 0, out
    assert json.loads(out)["child"]["expert_intermediate_size"] == 16
    res = run(parent, tmp_path / "c", target={"intermediate_size": 16}, stages=MAG)
    assert json.loads((res.out / "config.json").read_text())["intermediate_size"] == 16
    assert load(res.out).model.layers[0].mlp.experts.down_proj.shape[-1] == 16
    code, out = cli_plan(parent, write_recipe({"target": {"intermediate_size": 16, "expert_intermediate_size": 24},
                                               "stages": MAG}))
    assert code == 2 and "give one of them" in out, out
    code, out = cli_plan(parent, write_recipe({"target": {"intermediate_size": 30}, "stages": MAG}))
    assert code == 2 and "use 24 or 32" in out, out


def test_moe_budget_solver_proposes_only_runnable_shapes(tmp_path):
    """With multiple_of 4 the grid holds hidden sizes the experts kernel refuses (44, 52, ...);
    the solver's choice and its alternatives are all multiples of 8."""
    import shrinkit

    parent = real_parent(tmp_path / "parent", "mixtral")
    stages_ = [{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"strategy": "middle"}}, {"slice_embeddings": {}}]
    seen = set()
    for ratio in (0.35, 0.45, 0.55, 0.7, 0.8):
        s = shrinkit.plan(parent, {"target": {"params_ratio": ratio, "multiple_of": 4}, "stages": stages_})
        seen.add(s["child"]["hidden_size"])
        labels = [v for k, v in s["budget"].items() if k.startswith("alternative")] + [s["budget"]["shape"]]
        for lab in labels:
            assert int(lab.split("hidden ")[1].split(",")[0]) % 8 == 0, lab
    assert all(h % 8 == 0 for h in seen), seen


def test_verify_on_a_child_the_kernel_cannot_run_is_a_failed_check_not_an_internal_error(tmp_path, monkeypatch):
    """A child written with expert width 30 (as shrinkit wrote before it refused such shapes):
    `shrinkit verify` measures it with eager experts and exits 4 with the reason, never 1."""
    from shrinkit.families.base import Family

    parent = real_parent(tmp_path / "parent", "mixtral")
    with monkeypatch.context() as mp:
        mp.setattr(Family, "check_runtime", lambda *a: None)
        run(parent, tmp_path / "c", target={"expert_intermediate_size": 30}, stages=MAG, output={"dtype": "float32"})
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    with pytest.raises(RuntimeError, match="16 bytes"):   # the failure the check stands for
        m(input_ids=tokens(96))
    r = CliRunner().invoke(app, ["verify", str(parent), str(tmp_path / "c"), "--data", "random_tokens",
                                 "--samples", "2", "--seq-len", "16"])
    assert r.exit_code == 4, r.output
    assert "internal error" not in r.output and "expert_intermediate_size 30" in r.output and "eager" in r.output
    # the same child at a valid width verifies with exit 0
    run(parent, tmp_path / "ok", target={"expert_intermediate_size": 24}, stages=MAG, output={"dtype": "float32"})
    r = CliRunner().invoke(app, ["verify", str(parent), str(tmp_path / "ok"), "--data", "random_tokens",
                                 "--samples", "2", "--seq-len", "16"])
    assert r.exit_code == 0, r.output
