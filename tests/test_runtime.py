"""The block runtime's budgets: they decide micro-batches, weight casts (a few rows per forward
call, or the whole block once) and where residual streams live (scratch file, or device/host
memory), and never the results. On the CPU both paths are forced with small and large budgets."""

from __future__ import annotations

import pytest
import torch

import planted
from test_errors import assert_failed, cli, parents  # noqa: F401 - fixtures


def test_budget_rules():
    from shrinkit.runtime import ACT_BYTES, CAST_BYTES, Budget

    flat = Budget.for_device("cpu")
    assert flat.memory is None and flat.act_bytes == ACT_BYTES and flat.cast_bytes == CAST_BYTES
    assert not flat.cast_block(1) and not flat.resident(1)
    big = Budget.for_device("cpu", 8 << 30)
    assert big.act_bytes == (8 << 30) // 16 and big.cast_block(2 << 30) and not big.cast_block((2 << 30) + 1)
    assert big.resident(2 << 30) and not big.resident((2 << 30) + 1)


def _stats(ck, plan, spec, budget, monkeypatch=None):
    from shrinkit.calibrate import calibrate
    from shrinkit.runtime import budget_scope

    with budget_scope(budget):
        return calibrate(ck, plan, spec, seed=0)


def test_calibration_is_the_same_under_any_budget(tmp_path, monkeypatch):
    """A bfloat16 parent: with a tiny flat budget every weight is cast a few rows at a time, every
    micro-batch is one sequence and the stream is a scratch file; with a large budget each block
    is cast once, micro-batches are whole batches and the stream is plain memory. Same statistics."""
    import shrinkit.runtime as R
    from shrinkit.checkpoint.reader import open_checkpoint
    from shrinkit.pipeline import prepare
    from shrinkit.recipe import Calibration
    from helpers import recipe

    pl = planted.llama_like(tmp_path / "p", dtype=torch.bfloat16)
    spec = Calibration(data="random_tokens", samples=6, seq_len=16, batch_size=4)
    paths = {"rows": 0, "streams": []}
    real_fwd, real_buf = R.linear_forward, R.activation_buffer

    def counting_forward(mod, bufs, cast_bytes=None):
        f = real_fwd(mod, bufs, cast_bytes)

        def fwd(x):
            if mod.weight.dtype != x.dtype:
                paths["rows"] += 1
            return f(x)
        return fwd

    monkeypatch.setattr(R, "linear_forward", counting_forward)
    monkeypatch.setattr(R, "activation_buffer", lambda *a, **k: paths["streams"].append(1) or real_buf(*a, **k))
    with open_checkpoint(pl.path) as ck:
        plan = prepare(ck, recipe())
        monkeypatch.setattr(R, "CAST_BYTES", 1024)
        monkeypatch.setattr(R, "ACT_BYTES", 1024)
        small = _stats(ck, plan, spec, R.Budget())
        small_paths = (paths["rows"], len(paths["streams"]))
        paths["rows"], paths["streams"] = 0, []
        big = _stats(ck, plan, spec, R.Budget(1 << 30))
        big_paths = (paths["rows"], len(paths["streams"]))
        assert R.BlockModel(ck, plan.family, budget=R.Budget(1 << 30)).micro(4, 16) == 4
        assert R.BlockModel(ck, plan.family, budget=R.Budget()).micro(4, 16) == 1
    assert small_paths[0] > 0 and small_paths[1] > 0      # streamed casts, scratch-file stream
    assert big_paths == (0, 0)                              # block cast once, stream in memory
    assert small.scores.keys() == big.scores.keys()
    for k in small.scores:
        torch.testing.assert_close(small.scores[k], big.scores[k], rtol=1e-5, atol=1e-8)
    assert small.influence == pytest.approx(big.influence, rel=1e-5, abs=1e-7)   # a dead layer: ~1e-9 either way


@pytest.mark.parametrize("stage", ["heal", "rotate_hidden"])
def test_subclone_and_verification_are_the_same_under_any_budget(tmp_path, stage):
    """heal (or rotate_hidden) and the full verification through the whole pipeline, with the
    default flat budget and with --device-memory: the same child (to float32 rounding) and the
    same verification numbers."""
    from safetensors.torch import load_file

    from shrinkit import api

    pl = planted.llama_like(tmp_path / "p")
    cal = {"data": "random_tokens", "samples": 8, "seq_len": 16, "batch_size": 4}
    rec = {"target": {"hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 3},
           "calibration": cal, "verify": {"data": "random_tokens", "samples": 4, "seq_len": 16},
           "stages": [{"rank_neurons": {"method": "activation"}}, {"drop_layers": {"drop": [2]}}, {stage: {}},
                      {"slice_embeddings": {}}]}
    flat = api.subclone(pl.path, rec, tmp_path / "flat")
    big = api.subclone(pl.path, rec, tmp_path / "big", device_memory="1GB")
    assert flat.report["runtime"]["device_memory"] is None and big.report["runtime"]["device_memory"] == 10**9
    a, b = load_file(tmp_path / "flat" / "model.safetensors"), load_file(tmp_path / "big" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    va, vb = flat.report["verify"], big.report["verify"]
    for who in ("parent", "child", "random_init"):
        for k in ("loss", "kl") if who != "parent" else ("loss",):
            assert va[who][k] == pytest.approx(vb[who][k], rel=1e-4), (who, k)
    assert va["random_init"]["kl"] > va["child"]["kl"] + 1e-3   # the models are told apart


@pytest.mark.parametrize("value,needle", [("lots", "--device-memory"), ("1KB", "below the 64 MB")])
def test_bad_device_memory_is_one_line(tmp_path, parents, write_recipe, value, needle):
    from test_errors import GOOD

    out = tmp_path / "c"
    assert_failed(cli("subclone", parents["single"], "-r", write_recipe(GOOD), "-o", out, "--device-memory", value),
                  2, out, needle)


def test_next_block_is_read_ahead_while_this_one_runs(tmp_path, monkeypatch):
    """Before block i loads, the runtime has asked the kernel for block i + 1's bytes (posix_fadvise
    WILLNEED on exactly that block's tensors); nothing is asked past the last block."""
    import os

    import shrinkit.runtime as R
    from shrinkit.checkpoint.reader import open_checkpoint
    from shrinkit.pipeline import prepare
    from shrinkit.recipe import Calibration
    from helpers import recipe

    pl = planted.llama_like(tmp_path / "p")
    events = []
    real_load = R.BlockModel.load
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, adv: events.append(("ahead", off, n)))
    with open_checkpoint(pl.path) as ck:
        plan = prepare(ck, recipe())
        bm = R.BlockModel(ck, plan.family)
        spans = {i: sorted((ck.tensors[k].begin, ck.tensors[k].nbytes) for k in bm._keys_of(f"model.layers.{i}."))
                 for i in range(len(bm.layers))}

        def load(self, module, keep_dtype=False):
            if module in list(self.layers):
                events.append(("load", list(self.layers).index(module)))
            return real_load(self, module, keep_dtype)

        monkeypatch.setattr(R.BlockModel, "load", load)
        h = bm.embed(torch.randint(0, 96, (2, 8)), 2)
        bm.run_layers(h, 2)
    assert [e[1] for e in events if e[0] == "load"] == [0, 1, 2, 3]
    for i in range(len(spans)):
        pos = events.index(("load", i))
        ahead = {(e[1], e[2]) for e in events[:pos] if e[0] == "ahead"}
        assert set(spans.get(i + 1, [])) <= ahead          # the next block was asked for first
        beyond = {s for j in range(i + 2, len(spans)) for s in spans[j]}
        assert not beyond & ahead                          # and nothing further
