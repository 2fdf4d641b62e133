"""Activation ranking and Block-Influence layer dropping on planted parents, and the
block-at-a-time forward against a whole-model forward with hooks."""

import pytest
import torch

import planted
from helpers import logits, run, tokens
from planted import rel_err
from test_planted import LLAMA_TARGET, check_kept

CALIB = {"data": "random_tokens", "samples": 8, "seq_len": 32, "batch_size": 4}


def act_stages(rescale=True, strategy="importance"):
    s = [{"rank_neurons": {"method": "activation", "calibration": CALIB}},
         {"drop_layers": {"strategy": strategy, "calibration": CALIB}}, {"slice_embeddings": {}}]
    return s + ([{"rescale_norms": {}}] if rescale else [])


@pytest.mark.parametrize("model_type,tie,extra", [("llama", False, {}), ("qwen2", True, {"attention_bias": True}),
                                                  ("qwen3", False, {})])
def test_llama_family_activation_finds_everything(tmp_path, model_type, tie, extra):
    pl = planted.llama_like(tmp_path / "parent", model_type, tie=tie, **extra)
    res = run(pl.path, tmp_path / "child", target=LLAMA_TARGET, stages=act_stages())
    check_kept(res.report, pl, n_hidden=64, n_ffn=96, nq=4, nkv=2)
    infl = res.report["stages"][1]["influence"]
    assert infl[2] < 1e-9 < min(infl[i] for i in (0, 1, 3))
    ids = tokens(96)
    assert rel_err(logits(tmp_path / "child", ids), logits(pl.path, ids)) < 1e-4


def test_activation_query_heads_only(tmp_path):
    """Heads whose o_proj columns are zero score zero even though their queries are not."""
    pl = planted.llama_like(tmp_path / "parent", num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                            dead_kv=0, dead_q_per_group=2, dead_hidden=0, dead_ffn=0, dead_layers=())
    res = run(pl.path, tmp_path / "child", target=dict(num_attention_heads=4),
              stages=[{"rank_neurons": {"method": "activation", "calibration": CALIB}}, {"slice_embeddings": {}}])
    check_kept(res.report, pl, nq=8)


def test_activation_negative_control(tmp_path):
    """Middle-dropping removes a live layer: the child must then differ from the parent."""
    pl = planted.llama_like(tmp_path / "parent", dead_layers=(3,))
    ids = tokens(96)
    run(pl.path, tmp_path / "child", target=LLAMA_TARGET, stages=act_stages(strategy="middle"))
    assert rel_err(logits(tmp_path / "child", ids), logits(pl.path, ids)) > 1e-2


def test_gpt2_and_bert_activation(tmp_path):
    pl = planted.gpt2(tmp_path / "g")
    res = run(pl.path, tmp_path / "gc", target=dict(intermediate_size=224, num_hidden_layers=3), stages=act_stages())
    check_kept(res.report, pl, n_ffn=256)
    ids = tokens(96)
    assert rel_err(logits(tmp_path / "gc", ids), logits(pl.path, ids)) < 1e-4
    pl = planted.bert(tmp_path / "b", mlm=False)
    res = run(pl.path, tmp_path / "bc", target=dict(intermediate_size=96, num_hidden_layers=3), stages=act_stages())
    check_kept(res.report, pl, n_ffn=128)
    assert rel_err(logits(tmp_path / "bc", ids, "AutoModel"), logits(pl.path, ids, "AutoModel")) < 1e-4


@pytest.mark.parametrize("kind,streamed", [("llama", False), ("gpt2", False), ("bert", False),
                                           ("llama", True), ("gpt2", True), ("bert", True)])
def test_block_forward_matches_whole_model(tmp_path, monkeypatch, kind, streamed):
    """Streaming changes nothing but memory: the same statistics as a whole-model forward with hooks.
    streamed: a bfloat16 parent with tiny cast and activation budgets, so every linear weight is
    cast a few rows at a time, heads one at a time, and every micro-batch is one sequence."""
    import transformers

    import shrinkit.runtime as C
    from shrinkit.calibrate import calibrate
    from shrinkit.families.spaces import Space
    from shrinkit.checkpoint.reader import open_checkpoint
    from shrinkit.pipeline import prepare
    from shrinkit.recipe import Calibration
    from helpers import recipe

    dt = torch.bfloat16 if streamed else torch.float32
    if streamed:
        monkeypatch.setattr(C, "CAST_BYTES", 1024)
        monkeypatch.setattr(C, "ACT_BYTES", 1024)
    pl = {"llama": planted.llama_like, "gpt2": planted.gpt2,
          "bert": lambda p, dtype: planted.bert(p, mlm=False, dtype=dtype)}[kind](tmp_path / "p", dtype=dt)
    spec = Calibration(data="random_tokens", samples=6, seq_len=16, batch_size=4)
    calls = []
    if streamed:
        real = C.linear_forward
        monkeypatch.setattr(C, "linear_forward", lambda mod, bufs, *a: (calls.append(mod), real(mod, bufs, *a))[1])
    with open_checkpoint(pl.path) as ck:
        plan = prepare(ck, recipe())
        st = calibrate(ck, plan, spec, seed=0)
        if streamed:
            bm = C.BlockModel(ck, plan.family.name)
            assert bm.micro(4, 16) == 1 and calls
        from shrinkit.text import calibration_tokens
        ids = calibration_tokens(ck, spec, plan.parent.vocab_size, seed=0)
    ad = plan.family.block
    model = getattr(transformers, ad.auto).from_pretrained(pl.path, attn_implementation="sdpa", dtype=torch.float32).eval()
    base = model.get_submodule(ad.base) if ad.base else model
    ffn, io = {}, {}
    for i, layer in enumerate(base.get_submodule(ad.layers)):
        layer.get_submodule(ad.observe[Space.FFN]).register_forward_pre_hook(
            lambda m, a, i=i: ffn.__setitem__(i, a[0].abs().reshape(-1, a[0].shape[-1]).sum(0)))
        layer.register_forward_hook(
            lambda m, a, kw, out, i=i: io.__setitem__(i, (a[0] if a else kw["hidden_states"],
                                                          out[0] if isinstance(out, tuple) else out)),
            with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids)
    ntok = ids.numel()
    flat = lambda t: t.reshape(-1, t.shape[-1])
    n = len(io)
    ref_hidden = (sum(flat(io[i][0]).abs().sum(0) for i in range(n)) + flat(io[n - 1][1]).abs().sum(0)) / ntok
    assert rel_err(st.scores[(Space.HIDDEN, None)], ref_hidden) < 1e-5
    for i in ffn:
        assert rel_err(st.scores[(Space.FFN, i)], ffn[i] / ntok) < 1e-5
    bi = [float((1 - torch.nn.functional.cosine_similarity(flat(io[i][0]).double(), flat(io[i][1]).double(), dim=-1)).mean())
          for i in range(n)]
    assert max(abs(a - b) for a, b in zip(st.influence, bi)) < 1e-6


def test_activation_buffer_is_file_backed_and_falls_back(tmp_path, monkeypatch):
    """The residual stream lives in an unlinked scratch file's mapping (nothing is left behind);
    where that file cannot be reserved it is plain memory, and calibration gives the same result."""
    import os

    import shrinkit.runtime as C

    t = C.activation_buffer((3, 5, 7), tmp_path)
    t[:] = 1.5
    assert t.shape == (3, 5, 7) and float(t.sum()) == 1.5 * 105
    assert os.listdir(tmp_path) == []
    maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
    assert not maps or ".shrinkit-activations-" in maps

    def no_space(*a):
        raise OSError(28, "No space left on device")

    pl = planted.llama_like(tmp_path / "p")
    a = run(pl.path, tmp_path / "a", target=LLAMA_TARGET, stages=act_stages()).report
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    b = run(pl.path, tmp_path / "b", target=LLAMA_TARGET, stages=act_stages()).report
    check_kept(b, pl, n_hidden=64, n_ffn=96, nq=4, nkv=2)
    assert a["kept"] == b["kept"] and a["stages"][1]["influence"] == b["stages"][1]["influence"]
