"""Bad inputs: each gives its exit code (2 command line / recipe, 3 bad or unsupported parent,
1 other), a one-line message without a traceback, and leaves no output (nor a hidden temp
folder) behind. A few go through a real subprocess; the rest through typer's CliRunner."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import planted
from shrinkit.cli import app

REPO = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_hidden_layers=4, max_position_embeddings=64, tie_word_embeddings=False)
GOOD = dict(target=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3),
            stages=[{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"drop": [2]}},
                    {"slice_embeddings": {}}, {"rescale_norms": {}}])


# ---------------------------------------------------------------------------- parents (built once)

def _llama(path: Path, **save_kw) -> Path:
    import transformers

    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY))
    planted._randomize(m, torch.Generator().manual_seed(0))
    m.save_pretrained(path, **save_kw)
    return path


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("parents")
    single = _llama(root / "single")
    sharded = _llama(root / "sharded", max_shard_size="100KB")
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(root / "gpt2")
    return {"single": single, "sharded": sharded, "gpt2": root / "gpt2"}


@pytest.fixture
def copy_parent(parents, tmp_path):
    def make(kind="single", name="parent") -> Path:
        dst = tmp_path / name
        shutil.copytree(parents[kind], dst)
        return dst
    return make


@pytest.fixture
def good_recipe(write_recipe):
    return write_recipe(GOOD, name="good")


# ---------------------------------------------------------------------------- running

def cli(*args: str):
    """Run the CLI in-process. subclone skips verification (slow, and tested in test_cli.py)."""
    args = [str(a) for a in args]
    if args[0] == "subclone":
        args.append("--no-verify")
    res = CliRunner().invoke(app, args)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def subproc(*args: str, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "shrinkit.cli", *[str(a) for a in args]], capture_output=True,
                       text=True, cwd=cwd, env=env, timeout=120)
    return p.returncode, p.stdout, p.stderr


def assert_failed(result, code: int, out: Path | None, *needles: str):
    rc, stdout, stderr = result
    assert rc == code, (rc, stdout, stderr)
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith(("error:", "interrupted", "terminated"))]
    assert len(errs) == 1 and lines[-1] == errs[0], stderr
    for n in needles:
        assert n.lower() in errs[0].lower(), (n, errs[0])
    if out is not None:
        assert not out.exists(), f"{out} was left behind"
        assert not list(out.parent.glob(f".{out.name}.shrinkit-*")), list(out.parent.iterdir())
    return errs[0]


def fail(code, parent, recipe, out, *needles, extra=()):
    """Run subclone in-process (quiet, so stderr holds only the error) and check the failure."""
    return assert_failed(cli("subclone", parent, "-r", recipe, "-o", out, "-q", *extra), code, out, *needles)


# ---------------------------------------------------------------------------- through a subprocess

def test_subprocess_parent_missing(tmp_path, good_recipe):
    out = tmp_path / "out"
    assert_failed(subproc("subclone", tmp_path / "nope", "-r", good_recipe, "-o", out), 2, out, "does not exist")


def test_subprocess_recipe_missing(tmp_path, parents):
    out = tmp_path / "out"
    assert_failed(subproc("subclone", parents["single"], "-r", tmp_path / "nope.yaml", "-o", out), 2, out,
                  "not found")


def test_subprocess_corrupt_shard(tmp_path, copy_parent, good_recipe):
    p = copy_parent()
    (p / "model.safetensors").write_bytes(os.urandom(8192))
    out = tmp_path / "out"
    assert_failed(subproc("subclone", p, "-r", good_recipe, "-o", out), 3, out, "model.safetensors")


def test_subprocess_version():
    rc, out, err = subproc("--version")
    assert rc == 0, err
    from shrinkit import __version__
    assert out.strip() == f"shrinkit {__version__}"


# ---------------------------------------------------------------------------- the parent (exit 3, or 2 for usage)

def test_debug_shows_traceback(tmp_path, good_recipe, write_recipe):
    out = tmp_path / "out"
    rc, _, err = cli("subclone", tmp_path / "nope", "-r", good_recipe, "-o", out, "--debug")
    assert rc == 2
    assert "Traceback" in err and "UsageError" in err
    assert err.rstrip().splitlines()[-1].startswith("error: ")
    assert not out.exists()
    rc, _, err = cli("plan", tmp_path / "nope", "-r", good_recipe, "--debug")
    assert rc == 2 and "Traceback" in err


def test_folder_without_config(tmp_path, copy_parent, good_recipe):
    p = copy_parent()
    (p / "config.json").unlink()
    fail(3, p, good_recipe, tmp_path / "out", "config.json")


def test_single_file_without_config(tmp_path, copy_parent, good_recipe):
    p = copy_parent()
    (p / "config.json").unlink()
    fail(2, p / "model.safetensors", good_recipe, tmp_path / "out", "--config")


def test_config_flag_pointing_nowhere(tmp_path, copy_parent, good_recipe):
    p = copy_parent()
    fail(2, p / "model.safetensors", good_recipe, tmp_path / "out", extra=("--config", tmp_path / "none.json"))


def test_config_not_json(tmp_path, copy_parent, good_recipe):
    p = copy_parent()
    (p / "config.json").write_text("{not json")
    fail(3, p, good_recipe, tmp_path / "out", "config")


@pytest.fixture
def no_pickle_reads(monkeypatch):
    """Fail the test if anything opens a .bin file or unpickles."""
    real_open, real_io_open = builtins.open, io.open
    opened = []

    def guard(real):
        def f(file, *a, **k):
            if str(file).endswith((".bin", ".pt")):
                opened.append(str(file))
                raise AssertionError(f"shrinkit opened {file}")
            return real(file, *a, **k)
        return f

    def no_load(*a, **k):
        opened.append("torch.load")
        raise AssertionError("torch.load called")

    def arm():
        monkeypatch.setattr(builtins, "open", guard(real_open))
        monkeypatch.setattr(io, "open", guard(real_io_open))
        monkeypatch.setattr(torch, "load", no_load)
        return opened
    return arm


def test_bin_only_parent(tmp_path, copy_parent, good_recipe, no_pickle_reads):
    p = copy_parent()
    (p / "model.safetensors").unlink()
    (p / "pytorch_model.bin").write_bytes(b"\x80\x04junk that is not a pickle" * 10)
    opened = no_pickle_reads()
    msg = fail(3, p, good_recipe, tmp_path / "out", "never unpickles", "pytorch_model.bin")
    assert "safetensors" in msg
    # the .bin file itself, passed as PARENT
    fail(3, p / "pytorch_model.bin", good_recipe, tmp_path / "out", "never unpickles")
    assert opened == []


def test_index_not_json(tmp_path, copy_parent, good_recipe):
    p = copy_parent("sharded")
    (p / "model.safetensors.index.json").write_text("{oops")
    fail(3, p, good_recipe, tmp_path / "out", "index")
    (p / "model.safetensors.index.json").write_text('{"metadata": {}}')
    fail(3, p, good_recipe, tmp_path / "out", "weight_map")


def test_unsupported_weight_file(tmp_path, copy_parent, good_recipe):
    p = copy_parent()
    (p / "model.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    fail(3, p / "model.gguf", good_recipe, tmp_path / "out", "safetensors")


def test_folder_with_no_weights(tmp_path, copy_parent, good_recipe):
    p = copy_parent()
    (p / "model.safetensors").unlink()
    fail(3, p, good_recipe, tmp_path / "out")


def test_several_safetensors_without_index(tmp_path, copy_parent, good_recipe):
    p = copy_parent("sharded")
    (p / "model.safetensors.index.json").unlink()
    fail(3, p, good_recipe, tmp_path / "out", "index")


def test_garbage_with_plausible_length(tmp_path, copy_parent, good_recipe):
    p = copy_parent()
    junk = b"this is not json at all!"
    (p / "model.safetensors").write_bytes(len(junk).to_bytes(8, "little") + junk + b"\0" * 64)
    fail(3, p, good_recipe, tmp_path / "out", "model.safetensors")


def test_empty_shard(tmp_path, copy_parent, good_recipe):
    p = copy_parent()
    (p / "model.safetensors").write_bytes(b"")
    fail(3, p, good_recipe, tmp_path / "out", "model.safetensors")


def test_truncated_shard(tmp_path, copy_parent, good_recipe):
    p = copy_parent()
    f = p / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    fail(3, p, good_recipe, tmp_path / "out", "truncated")


def test_truncated_shard_of_sharded_parent(tmp_path, copy_parent, good_recipe):
    p = copy_parent("sharded")
    f = sorted(p.glob("*.safetensors"))[-1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    fail(3, p, good_recipe, tmp_path / "out", f.name)


def test_index_names_missing_shard(tmp_path, copy_parent, good_recipe):
    p = copy_parent("sharded")
    shard = sorted(p.glob("*.safetensors"))[1]
    shard.unlink()
    fail(3, p, good_recipe, tmp_path / "out", shard.name, "missing")


def _repoint(p: Path, new: str) -> str:
    """Point every index entry of the first shard at `new`; return the old shard name."""
    ip = p / "model.safetensors.index.json"
    idx = json.loads(ip.read_text())
    old = sorted(set(idx["weight_map"].values()))[0]
    idx["weight_map"] = {k: (new if v == old else v) for k, v in idx["weight_map"].items()}
    ip.write_text(json.dumps(idx))
    return old


def test_index_relative_path_outside(tmp_path, copy_parent, good_recipe):
    p = copy_parent("sharded")
    old = sorted(p.glob("*.safetensors"))[0]
    shutil.copyfile(old, tmp_path / "x.safetensors")   # a real, valid shard lies there
    _repoint(p, "../x.safetensors")
    fail(3, p, good_recipe, tmp_path / "out", "../x.safetensors")


def test_index_absolute_path(tmp_path, copy_parent, good_recipe):
    p = copy_parent("sharded")
    old = sorted(p.glob("*.safetensors"))[0]
    outside = tmp_path / "abs.safetensors"
    shutil.copyfile(old, outside)
    _repoint(p, str(outside))
    fail(3, p, good_recipe, tmp_path / "out", str(outside))
    # even an absolute path to the shard inside the folder is refused
    p2 = copy_parent("sharded", "parent2")
    _repoint(p2, str(sorted(p2.glob("*.safetensors"))[0]))
    fail(3, p2, good_recipe, tmp_path / "out")


def test_index_shard_is_symlink_outside(tmp_path, copy_parent, good_recipe):
    p = copy_parent("sharded")
    shard = sorted(p.glob("*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    fail(3, p, good_recipe, tmp_path / "out", "outside")


def test_symlink_inside_folder_is_fine(tmp_path, copy_parent, good_recipe):
    p = copy_parent("sharded")
    shard = sorted(p.glob("*.safetensors"))[0]
    (p / "blobs").mkdir()
    shutil.move(shard, p / "blobs" / "abc")
    shard.symlink_to(p / "blobs" / "abc")
    rc, out, err = cli("subclone", p, "-r", good_recipe, "-o", tmp_path / "out", "-q")
    assert rc == 0, err


def test_index_lists_tensor_missing_from_shards(tmp_path, copy_parent, good_recipe):
    p = copy_parent("sharded")
    ip = p / "model.safetensors.index.json"
    idx = json.loads(ip.read_text())
    idx["weight_map"]["model.layers.9.mlp.up_proj.weight"] = sorted(set(idx["weight_map"].values()))[0]
    ip.write_text(json.dumps(idx))
    fail(3, p, good_recipe, tmp_path / "out", "model.layers.9.mlp.up_proj.weight")


def test_unknown_architecture(tmp_path, copy_parent, good_recipe):
    p = copy_parent()
    cfg = json.loads((p / "config.json").read_text())
    cfg["model_type"] = "foo"
    cfg["architectures"] = ["FooForCausalLM"]
    (p / "config.json").write_text(json.dumps(cfg))
    fail(3, p, good_recipe, tmp_path / "out", "'foo'", "llama")


def test_config_missing_shape_key(tmp_path, copy_parent, good_recipe):
    p = copy_parent()
    cfg = json.loads((p / "config.json").read_text())
    del cfg["hidden_size"]
    (p / "config.json").write_text(json.dumps(cfg))
    fail(3, p, good_recipe, tmp_path / "out", "hidden_size")


def test_tensor_not_in_architecture_map(tmp_path, copy_parent, write_recipe):
    """Found only while writing: the temp folder is removed, nothing is published."""
    p = copy_parent()
    sd = load_file(str(p / "model.safetensors"))
    sd["model.mystery.weight"] = torch.zeros(3, 3)
    save_file(sd, str(p / "model.safetensors"), metadata={"format": "pt"})
    identity = write_recipe({"target": {}, "stages": [{"rank_neurons": {"method": "magnitude"}},
                                                      {"slice_embeddings": {}}]})
    fail(3, p, identity, tmp_path / "out", "model.mystery.weight")
    fail(3, p, write_recipe(GOOD), tmp_path / "out2", "model.mystery.weight")


def test_checkpoint_shape_disagrees_with_config(tmp_path, copy_parent, good_recipe):
    p = copy_parent()
    sd = load_file(str(p / "model.safetensors"))
    sd["model.norm.weight"] = torch.ones(64, 2)
    save_file(sd, str(p / "model.safetensors"), metadata={"format": "pt"})
    fail(3, p, good_recipe, tmp_path / "out", "model.norm.weight")


@pytest.mark.parametrize("exc,code,needle", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (MemoryError(), 1, "out of memory"),
    (OSError(28, "No space left on device"), 1, "no space left"),
    (RuntimeError("boom"), 1, "--debug"),
])
def test_failure_while_writing_leaves_nothing(tmp_path, parents, good_recipe, monkeypatch, exc, code, needle):
    """An interrupt, out-of-memory, a full disk or a bug half-way through the write: the temp
    folder goes, nothing is published, and an existing --out (replaced only with --force) stays."""
    import shrinkit.stages.write as pipeline

    calls = [0]
    real = pipeline.slice_blocks

    def flaky(*a, **k):
        calls[0] += 1
        if calls[0] == 5:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "slice_blocks", flaky)
    out = tmp_path / "out"
    msg = fail(code, parents["single"], good_recipe, out, needle)
    assert calls[0] == 5
    if code != 130:
        assert msg.startswith("error: ")
    # the same with --force over an earlier child: it stays as it was
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "shrinkit_report.json").write_text('{"shrinkit_version": "0.1.0", "child": {}}')
    calls[0] = 0
    rc, _, err = cli("subclone", parents["single"], "-r", good_recipe, "-o", out, "-q", "--force")
    assert rc == code, err
    assert sorted(x.name for x in out.iterdir()) == ["config.json", "shrinkit_report.json"]
    assert (out / "config.json").read_text() == "{}"
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".out.")], list(tmp_path.iterdir())


def test_failed_phase_is_not_reported_done(tmp_path, copy_parent, good_recipe, monkeypatch):
    """Without --quiet the plain progress lines go to stderr; a phase that failed must not be
    logged as "done", and the error is still the last line."""
    import shrinkit.ranking.magnitude as rank
    from shrinkit.errors import ParentError

    def boom(*a, **k):
        raise ParentError("model.layers.0.mlp.up_proj.weight: simulated read failure")

    monkeypatch.setattr(rank, "_axis_sums", boom)
    p = copy_parent()
    out = tmp_path / "out"
    rc, stdout, stderr = cli("subclone", p, "-r", good_recipe, "-o", out)
    assert_failed((rc, stdout, stderr), 3, out, "simulated read failure")
    lines = stderr.strip().splitlines()
    assert lines[0].startswith("shrinkit: rank (magnitude)")  # the phase that fails
    assert not any("done in" in ln for ln in lines), stderr


def test_tensor_outside_the_map_is_refused_before_any_work(tmp_path, copy_parent, good_recipe):
    p = copy_parent()
    sd = load_file(str(p / "model.safetensors"))
    sd["model.mystery.weight"] = torch.zeros(3, 3)
    save_file(sd, str(p / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    rc, stdout, stderr = cli("subclone", p, "-r", good_recipe, "-o", out)
    assert_failed((rc, stdout, stderr), 3, out, "model.mystery.weight")
    assert not any(ln.startswith("shrinkit:") for ln in stderr.splitlines()), stderr


# ---------------------------------------------------------------------------- the recipe (exit 2)

def test_recipe_missing(tmp_path, parents):
    fail(2, parents["single"], tmp_path / "nope.yaml", tmp_path / "out", "nope.yaml")


def test_recipe_not_given(tmp_path, parents):
    rc, _, err = cli("subclone", parents["single"], "-o", tmp_path / "out")
    assert rc == 2 and "--recipe" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,needle", [
    ("target: {hidden_size: 48\nstages: [", "YAML"),
    ("target:\n  hidden_size: 48\n bad_indent: 1\n", "YAML"),
    ("- just\n- a list\n", "mapping"),
    ("\tfoo: 1", "YAML"),
])
def test_malformed_yaml(tmp_path, parents, write_recipe, text, needle):
    fail(2, parents["single"], write_recipe(text), tmp_path / "out", needle)


@pytest.mark.parametrize("data,needle", [
    ({"targte": {"hidden_size": 48}}, "targte"),
    ({"target": {"hidden": 48}}, "hidden"),
    ({"stages": [{"prune_heads": {}}, {"slice_embeddings": {}}]}, "prune_heads"),
    ({"stages": [{"rank_neurons": {"method": "best"}}, {"slice_embeddings": {}}]}, "method"),
    ({"stages": [{"rank_neurons": {"methd": "first"}}, {"slice_embeddings": {}}]}, "methd"),
    ({"stages": [{"drop_layers": {"strategy": "random"}}, {"slice_embeddings": {}}]}, "strategy"),
    ({"stages": [{"drop_layers": {"drop": [1], "keep": [0]}}, {"slice_embeddings": {}}]}, "drop"),
    ({"stages": [{"rank_neurons": {}}]}, "slice_embeddings"),
    ({"stages": [{"slice_embeddings": {}}, {"rank_neurons": {}}]}, "before"),
    ({"stages": [{"slice_embeddings": {}}, {"slice_embeddings": {}}]}, "twice"),
    ({"output": {"max_shard_size": "big"}}, "max_shard_size"),
    ({"output": {"dtype": "float8"}}, "dtype"),
    ({"target": {"hidden_size": 0}}, "hidden_size"),
    ({"target": {"hidden_size": "wide"}}, "hidden_size"),
])
def test_bad_recipe(tmp_path, parents, write_recipe, data, needle):
    fail(2, parents["single"], write_recipe(data), tmp_path / "out", needle)


def _cut(target, drop=None, strategy=None):
    d = {"drop": drop} if drop is not None else ({"strategy": strategy} if strategy else {})
    return {"target": target, "stages": [{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": d},
                                         {"slice_embeddings": {}}]}


@pytest.mark.parametrize("data,needle", [
    (_cut({"hidden_size": 128}), "larger"),
    (_cut({"intermediate_size": 97}), "larger"),
    (_cut({"num_hidden_layers": 5}), "larger"),
    (_cut({"num_attention_heads": 8}), "larger"),
    (_cut({"num_attention_heads": 3, "num_key_value_heads": 2}), "divisible"),
    (_cut({"num_attention_heads": 4, "num_key_value_heads": 1}), "kv heads"),
    (_cut({"num_hidden_layers": 3}, drop=[7]), "7"),
    (_cut({"num_hidden_layers": 3}, drop=[-1]), "-1"),
    (_cut({"num_hidden_layers": 2}, drop=[1]), "agree"),
    (_cut({"num_hidden_layers": 3}, drop=[]), "agree"),
    (_cut({}, drop=[0, 1, 2, 3]), "layer"),
    ({"target": {"hidden_size": 48}, "stages": [{"slice_embeddings": {}}]}, "rank_neurons"),
    ({"target": {"num_hidden_layers": 2}, "stages": [{"slice_embeddings": {}}]}, "drop_layers"),
])
def test_impossible_target_llama(tmp_path, parents, write_recipe, data, needle):
    fail(2, parents["single"], write_recipe(data), tmp_path / "out", needle)


def test_fewer_query_heads_per_group_is_possible(tmp_path, parents, write_recipe):
    """The control for the kv-ratio case: 2 query heads over 2 kv groups (one per group) is fine."""
    data = _cut({"num_attention_heads": 2, "num_key_value_heads": 2})
    rc, _, err = cli("subclone", parents["single"], "-r", write_recipe(data), "-o", tmp_path / "out", "-q")
    assert rc == 0, err


@pytest.mark.parametrize("target,needle", [
    ({"hidden_size": 40}, "multiple of 16"),
    ({"hidden_size": 32, "num_attention_heads": 4}, "num_attention_heads"),
    ({"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}, "grouped-query"),
])
def test_impossible_target_gpt2(tmp_path, parents, write_recipe, target, needle):
    fail(2, parents["gpt2"], write_recipe(_cut(target)), tmp_path / "out", needle)


# ---------------------------------------------------------------------------- --out

def test_out_exists_without_force_is_untouched(tmp_path, parents, good_recipe):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc, _, err = cli("subclone", parents["single"], "-r", good_recipe, "-o", out, "-q")
    assert rc == 2 and "--force" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert (out / "precious.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".out.shrinkit-*"))

    # --force replaces only an earlier shrinkit child: a folder of other files stays as it is
    rc, stdout, err = cli("subclone", parents["single"], "-r", good_recipe, "-o", out, "-q", "--force")
    assert rc == 2 and "not an earlier shrinkit child" in err and "precious.txt" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".out.shrinkit-*"))

    child = tmp_path / "child"
    assert cli("subclone", parents["single"], "-r", good_recipe, "-o", child, "-q")[0] == 0
    rc, _, err = cli("subclone", parents["single"], "-r", good_recipe, "-o", child, "-q")
    assert rc == 2 and "--force" in err
    rc, stdout, err = cli("subclone", parents["single"], "-r", good_recipe, "-o", child, "-q", "--force")
    assert rc == 0, err
    assert (child / "model.safetensors").is_file() and (child / "config.json").is_file()
    assert not list(tmp_path.glob(".child.shrinkit-*")), list(tmp_path.iterdir())


def test_out_empty_folder_is_used(tmp_path, parents, good_recipe):
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = cli("subclone", parents["single"], "-r", good_recipe, "-o", out, "-q")
    assert rc == 0, err
    assert (out / "model.safetensors").is_file()


def test_out_is_a_file(tmp_path, parents, good_recipe):
    out = tmp_path / "out"
    out.write_text("a file")
    rc, _, err = cli("subclone", parents["single"], "-r", good_recipe, "-o", out, "-q", "--force")
    assert rc == 2 and "file" in err
    assert out.read_text() == "a file"


def test_out_is_the_parent_or_above_it(tmp_path, copy_parent, good_recipe):
    p = copy_parent()
    files = sorted(x.name for x in p.iterdir())
    for out in (p, tmp_path):
        rc, _, err = cli("subclone", p, "-r", good_recipe, "-o", out, "-q", "--force")
        assert rc == 2 and "parent" in err, err
        assert sorted(x.name for x in p.iterdir()) == files
    rc, _, err = cli("subclone", p / "model.safetensors", "-r", good_recipe, "-o", p, "-q", "--force")
    assert rc == 2 and "parent" in err, err
    assert sorted(x.name for x in p.iterdir()) == files


def test_out_under_a_file(tmp_path, parents, good_recipe):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    for out in (blocker / "child", blocker / ".." / "child2"):
        assert_failed(cli("subclone", parents["single"], "-r", good_recipe, "-o", out, "-q"), 2, None,
                      "is a file, not a folder")
    assert blocker.read_text() == "x"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["blocker", "good.yaml"]


# ---------------------------------------------------------------------------- plan, inspect, version

def test_plan_writes_nothing(tmp_path, parents, good_recipe, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(str(x) for x in tmp_path.rglob("*"))
    pbefore = sorted(str(x) for x in parents["single"].rglob("*"))
    rc, out, err = cli("plan", parents["single"], "-r", good_recipe, "--json")
    assert rc == 0, err
    summary = json.loads(out)
    params = summary["child"]["params"]
    assert summary["child"]["hidden_size"] == 48 and summary["child"]["num_hidden_layers"] == 3
    assert summary["child"]["kept_layers"] == [0, 1, 3]
    rc, out, err = cli("plan", parents["single"], "-r", good_recipe)
    assert rc == 0, err
    assert str(params) in out and "48" in out
    assert sorted(str(x) for x in tmp_path.rglob("*")) == before
    assert sorted(str(x) for x in parents["single"].rglob("*")) == pbefore


def test_plan_reports_recipe_errors(tmp_path, parents, write_recipe):
    assert_failed(cli("plan", parents["single"], "-r", write_recipe(_cut({"hidden_size": 128}))), 2, None, "larger")
    assert_failed(cli("plan", tmp_path / "nope", "-r", write_recipe(GOOD)), 2, None, "does not exist")


def test_inspect(parents):
    rc, out, err = cli("inspect", parents["sharded"], "--json")
    assert rc == 0, err
    s = json.loads(out)
    assert s["model"]["family"] == "llama" and s["model"]["architecture"] == "LlamaForCausalLM"
    assert s["model"]["shards"] == len(list(parents["sharded"].glob("*.safetensors"))) >= 3
    assert s["model"]["tied_embeddings"] is False
    assert s["dims"] == dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, num_hidden_layers=4, vocab_size=96)
    tensors = {}
    for f in parents["sharded"].glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    assert s["model"]["params"] == sum(t.numel() for t in tensors.values())
    rc, out, err = cli("inspect", parents["single"])
    assert rc == 0, err
    for needle in ("llama", "hidden_size", "64", "num_key_value_heads", "head_dim"):
        assert needle in out, needle
    rc, out, err = cli("inspect", parents["gpt2"] / "model.safetensors")
    assert rc == 0 and "gpt2" in out
    assert_failed(cli("inspect", parents["single"] / "nope.safetensors"), 2, None)


def test_version_in_process():
    from shrinkit import __version__
    rc, out, _ = cli("--version")
    assert rc == 0 and out.strip() == f"shrinkit {__version__}"
