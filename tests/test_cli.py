"""The happy path through the command line (typer's CliRunner, in-process)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import planted
from shrinkit.cli import app

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_hidden_layers=4, max_position_embeddings=64, tie_word_embeddings=False)
HALF = dict(target=dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                        num_hidden_layers=2),
            stages=[{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"strategy": "middle"}},
                    {"slice_embeddings": {}}, {"rescale_norms": {}}],
            output={"max_shard_size": "30KB"})
WROTE = re.compile(r"^wrote (?P<out>.+) \((?P<params>[\d.]+)M params, (?P<mb>[\d.]+) MB\) in [\d.]+ s$")


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    import transformers

    path = tmp_path_factory.mktemp("p") / "tiny-llama"
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY))
    planted._randomize(m, torch.Generator().manual_seed(0))
    m.save_pretrained(path)
    return path


def cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


def wrote_line(stdout: str) -> re.Match:
    last = stdout.strip().splitlines()[-1]
    m = WROTE.match(last)
    assert m, stdout
    return m


def test_subclone_prints_wrote(tmp_path, parent, write_recipe):
    out = tmp_path / "child"
    res = cli("subclone", parent, "-r", write_recipe(HALF, name="half"), "-o", out, "--no-verify")
    assert res.exit_code == 0, res.output
    m = wrote_line(res.stdout)
    assert Path(m["out"]) == out
    rep = json.loads((out / "shrinkit_report.json").read_text())
    assert float(m["params"]) == pytest.approx(rep["child"]["params"] / 1e6, abs=0.006)
    assert float(m["mb"]) == pytest.approx(rep["child"]["bytes"] / 1e6, abs=0.06)
    # not quiet: progress lines on stderr (no terminal, so plain lines, not a bar)
    assert "shrinkit: slice + write" in res.stderr
    assert "error" not in res.stderr.lower()
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2
    assert not list(tmp_path.glob(".child.shrinkit-*"))


def test_quiet(tmp_path, parent, write_recipe):
    out = tmp_path / "child"
    res = cli("subclone", parent, "-r", write_recipe(HALF), "-o", out, "--quiet", "--no-verify")
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    assert len(res.stdout.strip().splitlines()) == 1
    wrote_line(res.stdout)
    res = cli("subclone", parent, "-r", write_recipe(HALF), "-o", tmp_path / "c2", "-q", "--no-verify")
    assert res.exit_code == 0 and res.stderr == ""


def test_default_out(tmp_path, parent, write_recipe, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    recipe = write_recipe(HALF, name="half")
    res = cli("subclone", parent, "-r", recipe, "-q", "--no-verify")
    assert res.exit_code == 0, res.output
    out = work / "tiny-llama-half"
    assert out.is_dir() and (out / "config.json").is_file()
    assert Path(wrote_line(res.stdout)["out"]).resolve() == out.resolve()
    assert sorted(x.name for x in work.iterdir()) == ["tiny-llama-half"]
    # a recipe's own name wins over the file name
    res = cli("subclone", parent, "-r", write_recipe({**HALF, "name": "mini"}, name="x"), "-q", "--no-verify")
    assert res.exit_code == 0, res.output
    assert (work / "tiny-llama-mini").is_dir()
    # a relative PARENT, given with a trailing slash, still names the folder
    rel = os.path.relpath(parent, work) + "/"
    res = cli("subclone", rel, "-r", write_recipe(HALF, name="rel"), "-q", "--no-verify")
    assert res.exit_code == 0, res.output
    assert (work / "tiny-llama-rel").is_dir()
    res = cli("subclone", parent, "-r", recipe, "-q", "--no-verify")
    assert res.exit_code == 2 and "--force" in res.stderr   # the default out exists now


def test_default_out_single_file(tmp_path, parent, write_recipe, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("subclone", parent / "model.safetensors", "-r", write_recipe(HALF, name="half"), "-q", "--no-verify")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "model-half" / "config.json").is_file()


def test_plan_json_matches_subclone(tmp_path, parent, write_recipe):
    recipe = write_recipe(HALF, name="half")
    res = cli("plan", parent, "-r", recipe, "--json")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    c = plan["child"]
    assert (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"],
            c["num_hidden_layers"], c["head_dim"]) == (32, 48, 2, 1, 2, 16)
    assert plan["parent"]["hidden_size"] == 64
    assert c["dtype"] == "float32"
    assert not (tmp_path / "child").exists()

    out = tmp_path / "child"
    res = cli("subclone", parent, "-r", recipe, "-o", out, "-q", "--no-verify")
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "shrinkit_report.json").read_text())
    assert c["params"] == rep["child"]["params"]
    assert c["bytes"] == rep["child"]["bytes"]
    assert c["kept_layers"] == rep["kept"]["layers"]
    shards = sorted(out.glob("*.safetensors"))
    assert c["shards"] == len(shards)
    files = {}
    for f in shards:
        files.update(load_file(str(f)))
    assert c["params"] == sum(t.numel() for t in files.values())
    assert float(wrote_line(res.stdout)["params"]) == pytest.approx(c["params"] / 1e6, abs=0.006)


def test_inspect_child_round_trip(tmp_path, parent, write_recipe):
    """The child is itself a valid parent: inspect reads it, and a second cut works."""
    out = tmp_path / "child"
    assert cli("subclone", parent, "-r", write_recipe(HALF), "-o", out, "-q", "--no-verify").exit_code == 0
    res = cli("inspect", out, "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["dims"]["hidden_size"] == 32 and s["dims"]["num_hidden_layers"] == 2
    rep = json.loads((out / "shrinkit_report.json").read_text())
    assert s["model"]["params"] == rep["child"]["params"]
    again = write_recipe({"target": {"intermediate_size": 32}, "stages": HALF["stages"]})
    res = cli("subclone", out, "-r", again, "-o", tmp_path / "grandchild", "-q", "--no-verify")
    assert res.exit_code == 0, res.output


def test_subclone_with_verification(tmp_path, parent, write_recipe):
    """The default (verification on), kept small by the recipe's verify section."""
    recipe = write_recipe({**HALF, "verify": {"data": "random_tokens", "samples": 2, "seq_len": 16,
                                              "batch_size": 2}})
    out = tmp_path / "child"
    res = cli("subclone", parent, "-r", recipe, "-o", out, "-q")
    assert res.exit_code == 0, res.output
    wrote_line(res.stdout)
    rep = json.loads((out / "shrinkit_report.json").read_text())
    assert "verify" in rep
    assert "child" in res.stdout and "parent" in res.stdout
