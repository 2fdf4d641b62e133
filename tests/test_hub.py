"""Parents by Hub id, against a Hugging Face cache layout built offline (no network in tests):
models--org--name/{blobs, snapshots/<commit>/ (links into blobs), refs/<branch>}."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import planted
import shrinkit
from shrinkit.cli import app
from shrinkit.errors import ParentError, UsageError

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_hidden_layers=4, max_position_embeddings=64, tie_word_embeddings=False)
HALF = dict(target=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2),
            stages=[{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"strategy": "middle"}},
                    {"slice_embeddings": {}}, {"rescale_norms": {}}])
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> Path:
    import transformers

    path = tmp_path_factory.mktemp("src") / "tiny"
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY))
    planted._randomize(m, torch.Generator().manual_seed(0))
    m.save_pretrained(path, max_shard_size="100KB")  # sharded: an index and several shards
    return path


def put_snapshot(cache: Path, repo: str, commit: str, files: dict[str, bytes], refs=("main",)) -> Path:
    """Lay files out as huggingface_hub does: content-addressed blobs, a snapshot of links, refs."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    for r in refs:
        (root / "refs" / r).write_text(commit)
    return snap


@pytest.fixture
def cache(tmp_path, model_files, monkeypatch) -> Path:
    c = tmp_path / "hf-cache"
    files = {p.name: p.read_bytes() for p in model_files.iterdir() if p.is_file()}
    put_snapshot(c, "org/tiny", COMMIT, files)
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return c


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_hub_id_from_the_cache(tmp_path, cache, write_recipe):
    out = tmp_path / "child"
    r = cli("subclone", "org/tiny", "-r", write_recipe(HALF), "-o", out, "--no-verify", "-q")
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "shrinkit_report.json").read_text())
    assert rep["parent"]["repo_id"] == "org/tiny" and rep["parent"]["revision"] == COMMIT
    assert rep["base_model"] == "org/tiny"
    assert "base_model: org/tiny" in (out / "README.md").read_text()
    assert len(rep["parent"]["shards"]) > 1 and all(s["sha256"] for s in rep["parent"]["shards"])


def test_hub_child_equals_local_child(tmp_path, cache, model_files):
    a = shrinkit.subclone("org/tiny", HALF, out=tmp_path / "a", verify=False)
    b = shrinkit.subclone(model_files, HALF, out=tmp_path / "b", verify=False)
    assert a.report["parent_hash"] == b.report["parent_hash"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_default_out_is_named_after_the_repo(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = shrinkit.subclone("org/tiny", {**HALF, "name": "half"}, verify=False)
    assert res.out == tmp_path / "tiny-half"


def test_revision_by_commit_and_by_ref(tmp_path, cache, model_files):
    files = {p.name: p.read_bytes() for p in model_files.iterdir() if p.is_file()}
    cfg = json.loads(files["config.json"])
    cfg["rms_norm_eps"] = 1e-3
    files["config.json"] = json.dumps(cfg).encode()
    put_snapshot(cache, "org/tiny", OTHER, files, refs=("v2",))
    for rev in (OTHER, "v2"):
        rep = shrinkit.subclone("org/tiny", HALF, out=tmp_path / f"c-{rev}", verify=False, revision=rev).report
        assert rep["parent"]["revision"] == OTHER
        assert json.loads((tmp_path / f"c-{rev}" / "config.json").read_text())["rms_norm_eps"] == 1e-3
    assert shrinkit.inspect("org/tiny", revision="main")["model"]["revision"] == COMMIT
    s = shrinkit.plan("org/tiny", HALF, revision="v2")
    assert s["parent"]["revision"] == OTHER and s["child"]["hidden_size"] == 32


def test_inspect_plan_verify_take_hub_ids(tmp_path, cache, write_recipe):
    r = cli("inspect", "org/tiny", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["model"]["repo_id"] == "org/tiny"
    r = cli("plan", "org/tiny", "-r", write_recipe(HALF), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["parent"]["revision"] == COMMIT
    shrinkit.subclone("org/tiny", HALF, out=tmp_path / "child", verify=False)
    r = cli("verify", "org/tiny", tmp_path / "child", "--data", "random_tokens", "--samples", "2", "--seq-len", "16",
            "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)


def test_offline_and_not_cached_is_one_line_exit_3(tmp_path, cache, write_recipe):
    r = cli("subclone", "org/absent", "-r", write_recipe(HALF), "-o", tmp_path / "x", "--no-verify")
    assert r.exit_code == 3
    assert r.stderr.count("\n") == 1 and "not in the Hugging Face cache" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    assert not (tmp_path / "x").exists()
    with pytest.raises(ParentError, match="org/tiny@nope"):
        shrinkit.inspect("org/tiny", revision="nope")


def test_incomplete_snapshot_offline_is_refused(tmp_path, cache, model_files):
    put_snapshot(cache, "org/part", COMMIT, {"config.json": (model_files / "config.json").read_bytes()})
    with pytest.raises(ParentError, match="not in the Hugging Face cache"):
        shrinkit.inspect("org/part")


def test_local_path_wins_over_a_repo_id(tmp_path, cache, model_files, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(model_files, tmp_path / "org" / "tiny")
    cfg = json.loads((tmp_path / "org" / "tiny" / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-2  # tell the two apart
    (tmp_path / "org" / "tiny" / "config.json").write_text(json.dumps(cfg))
    rep = shrinkit.subclone("org/tiny", HALF, out=tmp_path / "child", verify=False).report
    assert "repo_id" not in rep["parent"]
    assert json.loads((tmp_path / "child" / "config.json").read_text())["rms_norm_eps"] == 1e-2
    with pytest.raises(UsageError, match="--revision applies to Hub ids"):
        shrinkit.inspect("org/tiny", revision="main")


def test_not_a_repo_id_stays_a_missing_path(tmp_path, cache):
    for bad in ("a/b/c", "nowhere", "../x/y", "org/tiny.safetensors"):
        with pytest.raises(UsageError, match="does not exist"):
            shrinkit.inspect(tmp_path / bad if bad.startswith("a/") else bad)


def test_fetch_takes_only_what_shrinkit_reads(tmp_path, model_files, monkeypatch):
    """Online: the weights fetched are the shards the index names (never .bin, never another
    .safetensors such as consolidated or onnx copies, never code), pinned to one commit."""
    import huggingface_hub

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    remote = {p.name: p.read_bytes() for p in model_files.iterdir() if p.is_file()}
    remote.update({"pytorch_model.bin": b"pickle", "consolidated.safetensors": b"x", "onnx/model.safetensors": b"x",
                   "modeling_custom.py": b"import os", "tokenizer.json": b"{}"})
    calls = []

    def fake(repo_id, *, revision=None, allow_patterns=None, local_files_only=False, cache_dir=None, **kw):
        calls.append(dict(revision=revision, allow=list(allow_patterns or []), local=local_files_only))
        assert Path(cache_dir) == cache
        root = cache / ("models--" + repo_id.replace("/", "--"))
        if local_files_only:
            if not (root / "snapshots" / COMMIT).exists():
                raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
            return str(root / "snapshots" / COMMIT)
        assert revision in (None, COMMIT)
        got = {n: d for n, d in remote.items() if any(fnmatch.fnmatch(n, p) for p in allow_patterns)}
        return str(put_snapshot(cache, repo_id, COMMIT, got))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    rep = shrinkit.subclone("org/tiny", HALF, out=tmp_path / "child", verify=False).report
    assert rep["parent"]["revision"] == COMMIT
    snap = cache / "models--org--tiny" / "snapshots" / COMMIT
    fetched = sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file())
    shards = sorted(json.loads((model_files / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert fetched == sorted({"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                              *shards})
    assert [c["local"] for c in calls] == [True, False, False]
    assert calls[2]["revision"] == COMMIT and sorted(calls[2]["allow"]) == sorted(set(shards))
    assert not any(p.endswith((".bin", ".py")) or p == "*.safetensors" for c in calls for p in c["allow"])
    # a second run needs no fetch: the cache is complete
    calls.clear()
    shrinkit.plan("org/tiny", HALF)
    assert [c["local"] for c in calls] == [True]
