"""For CI jobs: `subclone --json` prints one JSON object and nothing else on stdout; the report
carries parent and recipe hashes; --skip-if-current skips exactly when both and the version match."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import planted
import shrinkit
from shrinkit.cli import app

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_hidden_layers=4, max_position_embeddings=64, tie_word_embeddings=False)
HALF = dict(target=dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                        num_hidden_layers=2),
            stages=[{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"strategy": "middle"}},
                    {"slice_embeddings": {}}, {"rescale_norms": {}}])


@pytest.fixture
def parent(tmp_path) -> Path:
    import transformers

    path = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY))
    planted._randomize(m, torch.Generator().manual_seed(0))
    m.save_pretrained(path)
    return path


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_json_is_the_only_stdout(tmp_path, parent, write_recipe):
    out = tmp_path / "child"
    r = cli("subclone", parent, "-r", write_recipe(HALF), "-o", out, "--json", "--no-verify")
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)  # the whole of stdout is one JSON object
    rep = json.loads((out / "shrinkit_report.json").read_text())
    assert j["out"] == str(out) and j["skipped"] is False
    assert j["params"] == rep["child"]["params"] and j["bytes"] == rep["child"]["bytes"]
    assert j["parent_hash"] == rep["parent_hash"] and j["recipe_hash"] == rep["recipe_hash"]
    assert j["verify"] is None and j["gate"] is None
    assert "shrinkit: slice + write" in r.stderr  # progress still goes to stderr


def test_json_includes_the_verification_summary(tmp_path, parent, write_recipe):
    out = tmp_path / "child"
    r = cli("subclone", parent, "-r", write_recipe({**HALF, "verify": {"data": "random_tokens", "samples": 2,
                                                                        "seq_len": 16}}), "-o", out, "--json", "-q")
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    rep = json.loads((out / "shrinkit_report.json").read_text())
    assert j["verify"] and "table" not in j["verify"]
    assert j["verify"] == {k: v for k, v in rep["verify"].items() if k != "table"}


def test_hashes(tmp_path, parent):
    a = shrinkit.subclone(parent, HALF, out=tmp_path / "a", verify=False).report
    b = shrinkit.subclone(parent, {**HALF, "name": "renamed"}, out=tmp_path / "b", verify=False).report
    assert a["recipe_hash"] == b["recipe_hash"]           # the name is not content
    assert a["parent_hash"] == b["parent_hash"]
    c = shrinkit.subclone(parent, {**HALF, "seed": 1}, out=tmp_path / "c", verify=False).report
    assert c["recipe_hash"] != a["recipe_hash"]
    # a recipe spelled with its defaults is the same recipe
    full = shrinkit.load_recipe(HALF).as_dict()
    from shrinkit.pipeline import recipe_hash
    assert recipe_hash(shrinkit.load_recipe(full)) == a["recipe_hash"]
    cfg = json.loads((parent / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (parent / "config.json").write_text(json.dumps(cfg))
    d = shrinkit.subclone(parent, HALF, out=tmp_path / "d", verify=False).report
    assert d["parent_hash"] != a["parent_hash"]            # the config is part of the parent


def test_skip_if_current(tmp_path, parent, write_recipe):
    out = tmp_path / "child"
    rec = write_recipe(HALF)
    first = cli("subclone", parent, "-r", rec, "-o", out, "--no-verify", "-q", "--skip-if-current")
    assert first.exit_code == 0 and first.stdout.startswith("wrote "), first.output
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    again = cli("subclone", parent, "-r", rec, "-o", out, "--no-verify", "-q", "--skip-if-current", "--json")
    assert again.exit_code == 0, again.output
    j = json.loads(again.stdout)
    assert j["skipped"] is True and j["out"] == str(out)
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    plain = cli("subclone", parent, "-r", rec, "-o", out, "--no-verify", "-q", "--skip-if-current")
    assert plain.exit_code == 0 and plain.stdout.startswith("skipped: ") and "already holds this child" in plain.stdout

    # a changed recipe is not current: without --force the existing folder is refused, with it replaced
    rec2 = write_recipe({**HALF, "seed": 3})
    r = cli("subclone", parent, "-r", rec2, "-o", out, "--no-verify", "-q", "--skip-if-current")
    assert r.exit_code == 2 and "--force" in r.stderr
    r = cli("subclone", parent, "-r", rec2, "-o", out, "--no-verify", "-q", "--skip-if-current", "--force")
    assert r.exit_code == 0 and r.stdout.startswith("wrote ")

    # a changed parent (one weight) is not current either
    from safetensors.torch import load_file, save_file
    w = load_file(parent / "model.safetensors")
    k = next(iter(w))
    w[k] = w[k] + 1
    save_file(w, parent / "model.safetensors", metadata={"format": "pt"})
    r = cli("subclone", parent, "-r", rec2, "-o", out, "--no-verify", "-q", "--skip-if-current", "--force")
    assert r.exit_code == 0 and r.stdout.startswith("wrote ")

    # nor a child written by another shrinkit version
    rep = json.loads((out / "shrinkit_report.json").read_text())
    rep["shrinkit_version"] = "0.0.1"
    (out / "shrinkit_report.json").write_text(json.dumps(rep))
    r = cli("subclone", parent, "-r", rec2, "-o", out, "--no-verify", "-q", "--skip-if-current", "--force")
    assert r.exit_code == 0 and r.stdout.startswith("wrote ")


def test_readme_ci_job_runs(tmp_path, parent, write_recipe, monkeypatch):
    """The README's GitHub Actions job parses, and its key and gate steps work on a real --json result."""
    import re
    import subprocess
    import sys

    import yaml

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "student-init" in b)
    steps = {s.get("name", s.get("uses", "")): s for s in yaml.safe_load(block)["jobs"]["student"]["steps"]}
    cut, gate = steps["Cut the student (skipped when student/ is current)"]["run"], steps["Gate"]["run"]
    assert "--skip-if-current --json" in cut and "--force" in cut

    rec = write_recipe({**HALF, "verify": {"data": "random_tokens", "samples": 2, "seq_len": 16}})
    r = cli("subclone", parent, "-r", rec, "--out", tmp_path / "student", "--force", "--skip-if-current", "--json")
    assert r.exit_code == 0, r.output
    (tmp_path / "result.json").write_text(r.stdout)
    key_line = cut.splitlines()[1].split(" >> ")[0]
    out = subprocess.run(["bash", "-c", key_line], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    j = json.loads(r.stdout)
    assert out.strip() == f"key=student-{j['parent_hash'][:16]}-{j['recipe_hash'][:16]}"
    script = gate.split("<<'EOF'\n", 1)[1].rsplit("EOF", 1)[0]
    assert j["verify"]["kind"] == "causal_lm" and "perplexity" in j["verify"]["random_init"]  # the keys it reads
    j["verify"] = {"kind": "causal_lm", "child": {"perplexity": 70.0}, "random_init": {"perplexity": 80.0}}
    (tmp_path / "result.json").write_text(json.dumps(j))
    ok = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    # negative control: a student no better than random fails the gate
    j["verify"] = {"kind": "causal_lm", "child": {"perplexity": 90.0}, "random_init": {"perplexity": 80.0}}
    (tmp_path / "result.json").write_text(json.dumps(j))
    bad = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 1 and "no better than random" in bad.stderr


def test_gate_result_in_json_drives_the_readme_gate_step(tmp_path, parent, write_recipe):
    """A recipe gate's result reaches --json with `passed`, which the README's Gate step reads:
    a generous gate passes the step, an impossible one exits 4 and its result fails the step."""
    import re
    import subprocess
    import sys

    import yaml

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "student-init" in b)
    steps = {s.get("name", s.get("uses", "")): s for s in yaml.safe_load(block)["jobs"]["student"]["steps"]}
    script = steps["Gate"]["run"].split("<<'EOF'\n", 1)[1].rsplit("EOF", 1)[0]
    spec = {"data": "random_tokens", "samples": 2, "seq_len": 16}
    results = {}
    for name, gate in (("loose", {"max_kl": 1e6, "max_perplexity_ratio": 1e6}), ("tight", {"max_kl": 0.0})):
        r = cli("subclone", parent, "-r", write_recipe({**HALF, "verify": {**spec, **gate}}),
                "-o", tmp_path / name, "--json", "-q")
        results[name] = (r.exit_code, json.loads(r.stdout))
    (code, loose), (tcode, tight) = results["loose"], results["tight"]
    assert code == 0 and loose["gate"]["passed"] is True and loose["gate"]["missed"] == []
    assert tcode == 4 and tight["gate"]["passed"] is False and tight["gate"]["missed"]
    assert (tmp_path / "tight" / "shrinkit_report.json").is_file()  # a missed gate keeps the child
    for j, want in ((loose, 0), (tight, 1)):
        # the step's random-init comparison is not what this test is about: make it pass
        j["verify"] = {"kind": "causal_lm", "child": {"perplexity": 70.0}, "random_init": {"perplexity": 80.0}}
        (tmp_path / "result.json").write_text(json.dumps(j))
        p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode == want, p.stderr
        if want:
            assert "verification gate failed" in p.stderr
