"""The default run (no --no-verify): the check it does, its gate and exit code 4 with the child
kept, short-context parents, one calibration spec for every stage, and every check that must
come before any work (nothing written, no calibration run)."""

import json
import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

import planted
from shrinkit.cli import app

CAL = {"data": "random_tokens", "samples": 8, "seq_len": 16, "batch_size": 4}


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


@pytest.fixture
def no_work(monkeypatch):
    """Any forward pass or calibration fails the test: checks must come first."""
    import shrinkit.calibrate as C

    calls = []

    def refuse(*a, **k):
        calls.append(a)
        raise AssertionError("work started before the checks")

    monkeypatch.setattr(C, "calibrate", refuse)
    monkeypatch.setattr(C.BlockModel, "embed", refuse)
    import shrinkit.text as T
    monkeypatch.setattr(T, "calibration_tokens", lambda *a, **k: refuse())
    return calls


@pytest.fixture
def count_passes(monkeypatch):
    """Counts block passes over each checkpoint (by its folder)."""
    import shrinkit.calibrate as C

    seen = []
    real = C.BlockModel.run_layers

    def counted(self, h, *a, **k):
        seen.append((self.ckpt.root.name, len(h)))
        return real(self, h, *a, **k)

    monkeypatch.setattr(C.BlockModel, "run_layers", counted)
    return seen


def nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".shrinkit-" in p.name]


def report(out):
    return json.loads((out / "shrinkit_report.json").read_text())


# ---------------------------------------------------------------------------- the default check
def test_data_free_default_is_a_structural_check(tmp_path, write_recipe):
    pl = planted.llama_like(tmp_path / "p")
    rec = write_recipe({"target": {"num_hidden_layers": 3, "hidden_size": 48},
                        "stages": [{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"drop": [2]}},
                                   {"slice_embeddings": {}}]})
    rc, out = cli("subclone", pl.path, "-r", rec, "--out", tmp_path / "c", "-q")
    assert rc == 0, out
    v = report(tmp_path / "c")["verify"]
    assert v["kind"] == "structural" and v["status"] == "ok" and v["problems"] == []
    assert v["how_to_verify"].startswith("shrinkit verify ")
    assert "Structural check passed" in out and "shrinkit verify" in out
    md = (tmp_path / "c" / "shrinkit_report.md").read_text()
    assert "Structural check passed" in md


def test_structural_check_catches_nan_and_mismatch(tmp_path):
    """Negative controls: a NaN in the written child, a planned tensor missing, a shape off."""
    from safetensors.torch import load_file, save_file

    from shrinkit.verify import structural_check

    pl = planted.llama_like(tmp_path / "p")
    from helpers import run
    res = run(pl.path, tmp_path / "c", stages=[{"slice_embeddings": {}}])
    from shrinkit.checkpoint.reader import open_checkpoint
    with open_checkpoint(tmp_path / "c") as ck:
        expected = {n: (tuple(t.shape), t.dtype) for n, t in ck.tensors.items()}
    dims = res.plan.child.as_dict()
    assert structural_check(tmp_path / "c", expected, dims)["status"] == "ok"
    bad = dict(expected, **{"model.extra.weight": ((2,), torch.float32)})
    v = structural_check(tmp_path / "c", bad, dims)
    assert v["status"] == "failed" and "missing" in v["problems"][0]
    v = structural_check(tmp_path / "c", expected, dict(dims, hidden_size=1))
    assert v["status"] == "failed" and "hidden_size" in v["problems"][0]
    f = tmp_path / "c" / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    v = structural_check(tmp_path / "c", expected, dims)
    assert v["status"] == "failed" and v["problems"] == ["model.layers.1.mlp.up_proj.weight holds NaN or inf values"]


def test_nonfinite_parent_gives_exit_4_and_keeps_the_child(tmp_path, write_recipe):
    from safetensors.torch import load_file, save_file

    pl = planted.llama_like(tmp_path / "p")
    f = pl.path / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(sd, f, metadata={"format": "pt"})
    rec = write_recipe({"stages": [{"rank_neurons": {"method": "first"}}, {"slice_embeddings": {}}]})
    rc, out = cli("subclone", pl.path, "-r", rec, "--out", tmp_path / "c")
    assert rc == 4, out
    assert (tmp_path / "c" / "model.safetensors").is_file()
    assert report(tmp_path / "c")["verify"]["status"] == "failed"
    assert "kept at" in out


def test_calibrated_default_verifies_and_shares_the_parent_pass(tmp_path, write_recipe, count_passes):
    """One parent pass in all: the held-out windows ride along with calibration (their statistics
    excluded), and the numbers equal a separate verification on the same windows."""
    from shrinkit.recipe import Calibration
    from shrinkit.verify import verify_child

    pl = planted.llama_like(tmp_path / "p")
    rec = write_recipe({"target": {"hidden_size": 48, "num_hidden_layers": 3},
                        "calibration": CAL,
                        "stages": [{"rank_neurons": {"method": "activation"}}, {"drop_layers": {"strategy": "importance"}},
                                   {"slice_embeddings": {}}, {"rescale_norms": {}}]})
    rc, out = cli("subclone", pl.path, "-r", rec, "--out", tmp_path / "c", "-q")
    assert rc == 0, out
    parent_passes = [n for root, n in count_passes if root == "p"]
    assert parent_passes == [8 + 2], count_passes        # 8 calibration + 8 // 8 -> 2 held-out windows, one pass
    rep = report(tmp_path / "c")
    v = rep["verify"]
    assert v["kind"] == "causal_lm" and v["parent_pass"] == "shared with calibration"
    assert (v["samples"], v["seq_len"], v["data"]) == (2, 16, "random_tokens")
    # the calibration statistics exclude the held-out windows: same kept sets as a --no-verify run
    rc, out = cli("subclone", pl.path, "-r", rec, "--out", tmp_path / "n", "-q", "--no-verify")
    assert rc == 0, out
    assert report(tmp_path / "n")["kept"] == rep["kept"] and "verify" not in report(tmp_path / "n")
    assert report(tmp_path / "n")["stages"][1]["influence"] == rep["stages"][1]["influence"]
    alone = verify_child(pl.path, tmp_path / "c", Calibration(data="random_tokens", samples=2, seq_len=16, batch_size=4))
    assert alone["parent_pass"] == "own"
    for k in ("parent", "child", "random_init"):
        for m in alone[k]:
            assert v[k][m] == pytest.approx(alone[k][m], rel=1e-5, abs=1e-6), (k, m)


# ---------------------------------------------------------------------------- gate, failures
def test_gate_missed_exits_4_and_keeps_the_child(tmp_path, write_recipe):
    pl = planted.llama_like(tmp_path / "p", dead_layers=())
    base = {"target": {"num_hidden_layers": 3}, "stages": [{"drop_layers": {"drop": [1]}}, {"slice_embeddings": {}}]}
    gated = dict(base, verify={"data": "random_tokens", "samples": 4, "seq_len": 16, "max_kl": 1e-4})
    rc, out = cli("subclone", pl.path, "-r", write_recipe(gated), "--out", tmp_path / "c")
    assert rc == 4, out
    assert (tmp_path / "c" / "model.safetensors").is_file() and (tmp_path / "c" / "config.json").is_file()
    v = report(tmp_path / "c")["verify"]
    assert v["status"] == "gate_missed" and "max_kl" in v["gate"]["missed"][0]
    assert "MISSED" in (tmp_path / "c" / "shrinkit_report.md").read_text()
    # a gate the child meets: exit 0 (the same child, a looser limit)
    met = dict(base, verify={"data": "random_tokens", "samples": 4, "seq_len": 16, "max_kl": 1e3,
                             "max_perplexity_ratio": 1e3})
    rc, out = cli("subclone", pl.path, "-r", write_recipe(met), "--out", tmp_path / "d")
    assert rc == 0, out
    v = report(tmp_path / "d")["verify"]
    assert v["status"] == "ok" and v["gate"]["missed"] == [] and "perplexity_ratio" in v
    # `shrinkit verify` takes the same gate
    rc, out = cli("verify", pl.path, tmp_path / "c", "--data", "random_tokens", "--samples", "4", "--seq-len", "16",
                  "--max-kl", "1e-4")
    assert rc == 4, out


def test_encoder_gate(tmp_path, write_recipe):
    pl = planted.bert(tmp_path / "p", mlm=False)
    rec = {"target": {"num_hidden_layers": 3}, "stages": [{"drop_layers": {"drop": [3]}}, {"slice_embeddings": {}}],
           "verify": {"data": "random_tokens", "samples": 6, "seq_len": 16, "min_similarity": 0.9999999}}
    rc, out = cli("subclone", pl.path, "-r", write_recipe(rec), "--out", tmp_path / "c")
    assert rc == 4, out
    assert report(tmp_path / "c")["verify"]["status"] == "gate_missed"


def test_gate_for_the_wrong_kind_is_a_recipe_error(tmp_path, write_recipe, no_work):
    pl = planted.bert(tmp_path / "p", mlm=False)
    rec = {"stages": [{"slice_embeddings": {}}], "verify": {"data": "random_tokens", "max_kl": 1.0}}
    rc, out = cli("subclone", pl.path, "-r", write_recipe(rec), "--out", tmp_path / "c")
    assert rc == 2 and "max_kl" in out, out
    nothing_written(tmp_path, tmp_path / "c")


def test_verification_that_raises_keeps_the_child(tmp_path, write_recipe, monkeypatch):
    import importlib

    V = importlib.import_module("shrinkit.verify")  # the module (shrinkit.verify is also the API function)

    def boom(*a, **k):
        raise RuntimeError("The expanded size of the tensor (256) must match the existing size (128)")

    monkeypatch.setattr(V, "verify_child", boom)
    pl = planted.llama_like(tmp_path / "p")
    rec = {"stages": [{"slice_embeddings": {}}], "verify": {"data": "random_tokens", "samples": 2, "seq_len": 8}}
    rc, out = cli("subclone", pl.path, "-r", write_recipe(rec), "--out", tmp_path / "c")
    assert rc == 4, out
    assert (tmp_path / "c" / "model.safetensors").is_file()
    v = report(tmp_path / "c")["verify"]
    assert v["status"] == "error" and "expanded size" in v["error"]
    assert "could not be verified" in out and "Traceback" not in out
    assert "Verification FAILED" in (tmp_path / "c" / "shrinkit_report.md").read_text()


# ---------------------------------------------------------------------------- short context
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_short_context_parent_subclones_and_verifies(tmp_path, write_recipe, kind):
    """max positions 16, below the default seq_len 256: defaults are clamped (and the report says
    so), and the run calibrates and verifies."""
    make = {"llama": lambda p: planted.llama_like(p, max_position_embeddings=16),
            "gpt2": lambda p: planted.gpt2(p, n_positions=16),
            "bert": lambda p: planted.bert(p, mlm=False, max_position_embeddings=16)}[kind]
    pl = make(tmp_path / "p")
    rec = write_recipe({"target": {"intermediate_size": 64, "num_hidden_layers": 3},
                        "calibration": {"data": "random_tokens", "samples": 8},
                        "stages": [{"rank_neurons": {"method": "activation"}}, {"drop_layers": {"strategy": "middle"}},
                                   {"slice_embeddings": {}}]})
    rc, out = cli("subclone", pl.path, "-r", rec, "--out", tmp_path / "c")
    assert rc == 0, out
    rep = report(tmp_path / "c")
    assert rep["stages"][0]["calibration"]["seq_len"] == 16
    assert rep["verify"]["seq_len"] == 16 and rep["verify"]["status"] == "ok"
    assert any("clamped" in n for n in rep["notes"]) and "clamped" in out
    assert "## Notes" in (tmp_path / "c" / "shrinkit_report.md").read_text()
    # an explicit `verify: {}` on a data-free cut is clamped too; `shrinkit verify` clamps its default
    rc, out = cli("verify", pl.path, tmp_path / "c", "--data", "random_tokens", "--samples", "3")
    assert rc == 0, out


def test_explicit_seq_len_beyond_positions_is_refused_before_work(tmp_path, write_recipe, no_work):
    pl = planted.llama_like(tmp_path / "p", max_position_embeddings=16)
    for rec in ({"stages": [{"rank_neurons": {"method": "activation", "calibration": dict(CAL, seq_len=32)}},
                            {"slice_embeddings": {}}], "target": {"intermediate_size": 64}},
                {"stages": [{"slice_embeddings": {}}], "verify": {"data": "random_tokens", "seq_len": 17}}):
        rc, out = cli("subclone", pl.path, "-r", write_recipe(rec), "--out", tmp_path / "c")
        assert rc == 2 and "16 positions" in out, out
        nothing_written(tmp_path, tmp_path / "c")
    rc, out = cli("verify", pl.path, pl.path, "--seq-len", "32")
    assert rc == 2 and "16 positions" in out
    assert no_work == []


# ---------------------------------------------------------------------------- one calibration spec
def test_one_calibration_spec_serves_both_stages(tmp_path, write_recipe, count_passes):
    """A parent without a tokenizer, a top-level random_tokens block, and both stages without
    their own: one calibration pass serves ranking and importance (and verification)."""
    pl = planted.llama_like(tmp_path / "p")
    assert not any((pl.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    rec = write_recipe({"target": {"hidden_size": 48, "num_hidden_layers": 3}, "calibration": CAL,
                        "stages": [{"rank_neurons": {"method": "activation"}}, {"drop_layers": {"strategy": "importance"}},
                                   {"slice_embeddings": {}}]})
    rc, out = cli("subclone", pl.path, "-r", rec, "--out", tmp_path / "c", "-q")
    assert rc == 0, out
    rep = report(tmp_path / "c")
    assert rep["stages"][0]["calibration"] == rep["stages"][1]["calibration"] == {**CAL}
    assert [r for r, _ in count_passes].count("p") == 1
    # a stage's own block overrides the top-level one field by field: two distinct specs, two passes
    count_passes.clear()
    rec = write_recipe({"target": {"hidden_size": 48, "num_hidden_layers": 3}, "calibration": CAL,
                        "stages": [{"rank_neurons": {"method": "activation", "calibration": {"samples": 4}}},
                                   {"drop_layers": {"strategy": "importance"}}, {"slice_embeddings": {}}]})
    rc, out = cli("subclone", pl.path, "-r", rec, "--out", tmp_path / "d", "-q", "--no-verify")
    assert rc == 0, out
    rep = report(tmp_path / "d")
    assert rep["stages"][0]["calibration"] == {**CAL, "samples": 4} and rep["stages"][1]["calibration"] == CAL
    assert [n for r, n in count_passes if r == "p"] == [4, 8]


def test_stage_without_data_for_text_fails_before_the_first_pass(tmp_path, write_recipe, no_work):
    """The issue's case: ranking on random tokens, importance with its default (builtin text) on a
    parent without a tokenizer: refused before any calibration runs."""
    pl = planted.llama_like(tmp_path / "p")
    rec = write_recipe({"target": {"hidden_size": 48, "num_hidden_layers": 3},
                        "stages": [{"rank_neurons": {"method": "activation", "calibration": CAL}},
                                   {"drop_layers": {"strategy": "importance"}}, {"slice_embeddings": {}}]})
    rc, out = cli("subclone", pl.path, "-r", rec, "--out", tmp_path / "c")
    assert rc == 2 and "tokenizer" in out, out
    nothing_written(tmp_path, tmp_path / "c")
    assert no_work == []


# ---------------------------------------------------------------------------- every check before any work
def _act(data, **kw):
    return {"target": {"hidden_size": 48}, "stages": [
        {"rank_neurons": {"method": "activation", "calibration": {"data": str(data), "samples": 4, "seq_len": 8, **kw}}},
        {"slice_embeddings": {}}]}


def test_every_check_comes_before_any_work(tmp_path, write_recipe, no_work, monkeypatch):
    import time

    pl = planted.llama_like(tmp_path / "p")
    notok = tmp_path / "notok"
    notok.mkdir()
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    badjsonl = tmp_path / "bad.jsonl"
    badjsonl.write_text('{"content": "x"}\n')
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = tmp_path / "out" / "c"
    cases = [
        (_act("builtin"), [], "tokenizer"),                                   # parent without a tokenizer
        (_act("builtin"), ["--tokenizer", notok], "holds no tokenizer"),       # --tokenizer without one
        (_act(tmp_path / "missing.txt"), [], "neither builtin"),
        (_act(tmp_path), [], "neither builtin"),                             # a folder
        (_act(empty), [], "is empty"),
        (_act(latin), [], "not UTF-8"),
        (_act(badjsonl), [], 'bad.jsonl:1'),
        (_act("random_tokens", seq_len=65), [], "64 positions"),
        (_act("random_tokens"), ["--device", "cuda:7"], "no CUDA device"),
        (_act("random_tokens"), ["--device", "tpu"], "--device"),
        ({"stages": [{"slice_embeddings": {}}], "verify": {"data": tmp_path / "missing.txt"}}, [], "neither builtin"),
    ]
    for rec, extra, needle in cases:
        rec = json.loads(json.dumps(rec, default=str))
        t0 = time.perf_counter()
        rc, text = cli("subclone", pl.path, "-r", write_recipe(rec), "--out", out, *extra)
        assert rc == 2, (needle, text)
        assert needle.lower() in text.lower(), (needle, text)
        assert len([ln for ln in text.splitlines() if ln.startswith("error:")]) == 1 and "Traceback" not in text
        assert not (tmp_path / "out").exists(), needle
        assert time.perf_counter() - t0 < 60
    # the output folder: a file in the way, a folder that cannot be written, too little disk
    ok = write_recipe(_act("random_tokens"))
    rc, text = cli("subclone", pl.path, "-r", ok, "--out", blocker / "c")
    assert rc == 2 and "is a file" in text, text
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if str(p) == str(tmp_path) else real_access(p, m))
    rc, text = cli("subclone", pl.path, "-r", ok, "--out", out)
    assert rc == 2 and "not writable" in text, text
    monkeypatch.setattr(os, "access", real_access)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1000))
    rc, text = cli("subclone", pl.path, "-r", ok, "--out", out)
    assert rc == 2 and "not enough free disk" in text, text
    assert not (tmp_path / "out").exists()
    assert no_work == []


def test_too_little_text_is_refused_before_work(tmp_path, write_recipe, monkeypatch):
    """A text file too short for the windows: found while making the windows, before any pass."""
    import shrinkit.calibrate as C

    pl = planted.llama_like(tmp_path / "p")
    shutil.copytree(planted_tokenizer(tmp_path), pl.path, dirs_exist_ok=True)
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    calls = []
    monkeypatch.setattr(C, "calibrate", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(C.BlockModel, "embed", lambda *a, **k: calls.append(1))
    rc, text = cli("subclone", pl.path, "-r", write_recipe(_act(short, seq_len=64, samples=2)), "--out", tmp_path / "c")
    assert rc == 2 and "fewer than seq_len" in text, text
    assert calls == [] and not (tmp_path / "c").exists()


def planted_tokenizer(tmp_path):
    """A tiny word-level tokenizer (96 tokens, the planted vocabulary) saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(95)}
    vocab["[UNK]"] = 95
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(d))
    return d


def test_transformers_messages_stay_off_the_terminal(tmp_path, write_recipe):
    """A BERT parent without a pooler: transformers' model class has one, so its loader would print
    a MISSING table; shrinkit prints none and records the keys in the report."""
    pl = planted.bert(tmp_path / "p", mlm=False, pooler=False)
    rec = {"target": {"num_hidden_layers": 3}, "stages": [{"drop_layers": {"drop": [1]}}, {"slice_embeddings": {}}],
           "verify": {"data": "random_tokens", "samples": 4, "seq_len": 16}}
    rc, out = cli("subclone", pl.path, "-r", write_recipe(rec), "--out", tmp_path / "c", "-q")
    assert rc == 0, out
    assert "MISSING" not in out and "warn" not in out.lower()
    keys = report(tmp_path / "c")["verify"]["child_keys"]
    assert keys["missing"] == ["pooler.dense.bias", "pooler.dense.weight"]
