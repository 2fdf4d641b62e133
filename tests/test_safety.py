"""Output ownership: shrinkit never deletes or replaces what the run may not replace.

The output path is judged as the real path it will become; an output that is, contains or lies
inside an input is refused; without --force nothing that exists is replaced, with --force only
an earlier shrinkit child; whatever appears at the output during a run is left alone; two runs
never share an output; SIGTERM cleans up like SIGINT; temp folders of killed runs are removed by
the next run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_errors import GOOD, REPO, assert_failed, cli, copy_parent, parents  # noqa: F401 - fixtures

from shrinkit import output


def tree(p: Path) -> dict:
    """Every path under p with the sha256 of files (symlinks as their target)."""
    out = {}
    for x in sorted(Path(p).rglob("*")):
        rel = str(x.relative_to(p))
        if x.is_symlink():
            out[rel] = "-> " + os.readlink(x)
        elif x.is_file():
            out[rel] = hashlib.sha256(x.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def victim(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "precious.txt").write_text("keep me")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(b"\x00" * 100)
    return path


def fake_child(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "shrinkit_report.json").write_text(json.dumps({"shrinkit_version": "0.1.0", "child": {}}))
    return path


@pytest.fixture
def good(write_recipe):
    return write_recipe(GOOD, name="good")


def subclone(*args):
    return cli("subclone", *args, "-q")


# ---------------------------------------------------------------------------- the path it will become

def test_dotdot_through_a_missing_folder_is_the_real_path(tmp_path, parents, good):
    v = victim(tmp_path / "victim")
    before = tree(v)
    out = f"{tmp_path}/missing/../victim"
    for extra in ((), ("--force",)):
        msg = assert_failed(subclone(parents["single"], "-r", good, "-o", out, *extra), 2, None, str(v))
        assert "/missing/" not in msg
        assert tree(v) == before
        assert not (tmp_path / "missing").exists()
        assert not list(tmp_path.glob(".victim.shrinkit-*"))


def test_dotdot_through_a_missing_folder_to_a_new_folder_works(tmp_path, parents, good):
    rc, _, err = subclone(parents["single"], "-r", good, "-o", f"{tmp_path}/a/b/../../new")
    assert rc == 0, err
    assert (tmp_path / "new" / "model.safetensors").is_file()
    assert not (tmp_path / "a").exists()


def test_symlink_to_the_parent_is_the_parent(tmp_path, copy_parent, good):
    p = copy_parent()
    before = tree(p)
    (tmp_path / "link").symlink_to(p)
    assert_failed(subclone(p, "-r", good, "-o", tmp_path / "link", "--force"), 2, None, "parent folder")
    assert_failed(subclone(p, "-r", good, "-o", tmp_path / "link" / ".." / "parent", "--force"), 2, None)
    assert tree(p) == before


@pytest.mark.parametrize("name", ["x/../../victim", "../victim", "..", "a/b", "a\\b", " "])
def test_recipe_name_that_is_a_path_is_refused(tmp_path, parents, write_recipe, monkeypatch, name):
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    v = victim(tmp_path / "victim")
    before = tree(v)
    monkeypatch.chdir(work)
    recipe = write_recipe({**GOOD, "name": name})
    assert_failed(subclone(parents["single"], "-r", recipe, "--force"), 2, None, "name")
    assert tree(v) == before
    assert list(work.iterdir()) == []


def test_root_is_refused(parents, good):
    assert_failed(subclone(parents["single"], "-r", good, "-o", "/", "--force"), 2, None, "root")


# ---------------------------------------------------------------------------- inputs are never the output

def test_out_is_the_config_folder(tmp_path, copy_parent, good):
    p = copy_parent()
    cfgdir = tmp_path / "cfg"
    cfgdir.mkdir()
    shutil.move(p / "config.json", cfgdir / "config.json")
    before, cbefore = tree(p), tree(cfgdir)
    for out in (cfgdir, tmp_path):
        assert_failed(subclone(p / "model.safetensors", "--config", cfgdir / "config.json", "-r", good, "-o", out,
                               "--force"), 2, None, "config")
    assert tree(p) == before and tree(cfgdir) == cbefore
    # a fake report does not make an input folder replaceable
    (cfgdir / "shrinkit_report.json").write_text(json.dumps({"shrinkit_version": "0", "child": {}}))
    assert_failed(subclone(p / "model.safetensors", "--config", cfgdir / "config.json", "-r", good, "-o", cfgdir,
                           "--force"), 2, None, "config")
    assert (cfgdir / "config.json").is_file()


def _hub(tmp_path, src: Path) -> tuple[Path, Path]:
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return repo, snap


def test_out_is_the_hub_cache_blobs(tmp_path, parents, good):
    repo, snap = _hub(tmp_path, parents["sharded"])
    before = tree(repo)
    for out in (repo / "blobs", repo / "blobs" / "child", repo, snap, snap / "child"):
        assert_failed(subclone(snap, "-r", good, "-o", out, "--force"), 2, None)
    assert tree(repo) == before
    rc, _, err = subclone(snap, "-r", good, "-o", repo / "child")   # beside blobs/ and snapshots/: fine
    assert rc == 0, err


def test_out_inside_the_parent_folder(tmp_path, copy_parent, good):
    p = copy_parent()
    before = tree(p)
    assert_failed(subclone(p, "-r", good, "-o", p / "child"), 2, None, "lies inside the parent folder")
    assert tree(p) == before


def test_out_is_the_tokenizer_folder(tmp_path, parents, good):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    for out in (tok, tok / "child", tmp_path):
        assert_failed(subclone(parents["single"], "-r", good, "-o", out, "--force", "--tokenizer", tok), 2, None,
                      "tokenizer")
    assert (tok / "tokenizer.json").read_text() == "{}"


def test_out_is_or_contains_calibration_data(tmp_path, parents, write_recipe):
    data = tmp_path / "texts" / "calib.txt"
    data.parent.mkdir()
    data.write_text("some text " * 100)
    recipe = write_recipe({**GOOD, "stages": [{"rank_neurons": {"method": "activation",
                                                                "calibration": {"data": str(data)}}},
                                              *GOOD["stages"][1:]]})
    for out in (data, data.parent):
        assert_failed(subclone(parents["single"], "-r", recipe, "-o", out, "--force"), 2, None, "calibration")
    assert data.read_text() == "some text " * 100


def test_out_is_a_shard(tmp_path, copy_parent, good):
    p = copy_parent()
    single = p / "model.safetensors"
    h = tree(p)
    assert_failed(subclone(single, "-r", good, "-o", single, "--force"), 2, None, "shard")
    assert tree(p) == h


# ---------------------------------------------------------------------------- what --force may replace

def test_force_replaces_only_an_earlier_child(tmp_path, parents, good):
    # an earlier real child: replaced
    out = tmp_path / "child"
    assert subclone(parents["single"], "-r", good, "-o", out)[0] == 0
    (out / "config.json").write_text("{}")
    rc, _, err = subclone(parents["single"], "-r", good, "-o", out, "--force")
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 48
    # a child the user added a file to: refused, untouched
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    assert_failed(subclone(parents["single"], "-r", good, "-o", out, "--force"), 2, None, "notes.txt")
    assert tree(out) == before
    (out / "notes.txt").unlink()
    # a sub-folder (training checkpoints, say) is not a child's either
    (out / "checkpoint-500").mkdir()
    assert_failed(subclone(parents["single"], "-r", good, "-o", out, "--force"), 2, None, "checkpoint-500")
    (out / "checkpoint-500").rmdir()
    # a report that is not a shrinkit report
    (out / "shrinkit_report.json").write_text('{"hello": 1}')
    assert_failed(subclone(parents["single"], "-r", good, "-o", out, "--force"), 2, None, "not a shrinkit report")
    (out / "shrinkit_report.json").unlink()
    assert_failed(subclone(parents["single"], "-r", good, "-o", out, "--force"), 2, None, "no shrinkit_report")


def test_out_is_a_symlink_to_an_earlier_child(tmp_path, parents, good):
    real = tmp_path / "real"
    assert subclone(parents["single"], "-r", good, "-o", real)[0] == 0
    (tmp_path / "link").symlink_to(real)
    rc, out, err = subclone(parents["single"], "-r", good, "-o", tmp_path / "link", "--force")
    assert rc == 0, err
    assert (tmp_path / "link").is_symlink() and (real / "model.safetensors").is_file()


# ---------------------------------------------------------------------------- races at publish time

def _during_run(monkeypatch, action):
    """Call action() while the child is being written (after the checks, before publishing)."""
    import shrinkit.pipeline as pipeline

    real = pipeline._run

    def run(*a, **k):
        r = real(*a, **k)
        action()
        return r
    monkeypatch.setattr(pipeline, "_run", run)


@pytest.mark.parametrize("force", [False, True])
def test_folder_appearing_during_the_run_is_left_alone(tmp_path, parents, good, monkeypatch, force):
    out = tmp_path / "out"
    _during_run(monkeypatch, lambda: victim(out))
    assert_failed(subclone(parents["single"], "-r", good, "-o", out, *(("--force",) if force else ())), 2, None,
                  "during the run")
    assert (out / "precious.txt").read_text() == "keep me" and (out / "sub" / "data.bin").is_file()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["good.yaml", "out"]


def test_file_appearing_during_the_run_is_left_alone(tmp_path, parents, good, monkeypatch):
    out = tmp_path / "out"
    _during_run(monkeypatch, lambda: out.write_text("mine"))
    assert_failed(subclone(parents["single"], "-r", good, "-o", out, "--force"), 2, None, "during the run")
    assert out.read_text() == "mine"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["good.yaml", "out"]


def test_earlier_child_swapped_for_user_data_during_the_run(tmp_path, parents, good, monkeypatch):
    out = fake_child(tmp_path / "out")

    def swap():
        shutil.rmtree(out)
        victim(out)
    _during_run(monkeypatch, swap)
    assert_failed(subclone(parents["single"], "-r", good, "-o", out, "--force"), 2, None, "during the run")
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["good.yaml", "out"]


def test_empty_folder_filled_during_the_run(tmp_path, parents, good, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    _during_run(monkeypatch, lambda: (out / "new.txt").write_text("mine"))
    assert_failed(subclone(parents["single"], "-r", good, "-o", out), 2, None, "during the run")
    assert (out / "new.txt").read_text() == "mine"


@pytest.mark.parametrize("have_renameat2", [True, False])
def test_rename_noreplace(tmp_path, monkeypatch, have_renameat2):
    if not have_renameat2:
        monkeypatch.setattr(output, "_renameat2", False)
    elif not output._libc_renameat2():
        pytest.skip("no renameat2 in this C library")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    full = victim(tmp_path / "full")
    (tmp_path / "file").write_text("f")
    for dst in (full, tmp_path / "file"):
        with pytest.raises(FileExistsError):
            output.rename_noreplace(src, dst)
    assert (full / "precious.txt").read_text() == "keep me" and (tmp_path / "file").read_text() == "f"
    output.rename_noreplace(src, tmp_path / "new")
    assert (tmp_path / "new" / "a").read_text() == "a"


def test_publish_without_renameat2(tmp_path, parents, good, monkeypatch):
    monkeypatch.setattr(output, "_renameat2", False)
    out = tmp_path / "out"
    assert subclone(parents["single"], "-r", good, "-o", out)[0] == 0
    assert subclone(parents["single"], "-r", good, "-o", out, "--force")[0] == 0
    _during_run(monkeypatch, lambda: (shutil.rmtree(out), victim(out)))
    assert_failed(subclone(parents["single"], "-r", good, "-o", out, "--force"), 2, None, "during the run")
    assert (out / "precious.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------- one run per output

def test_second_run_on_the_same_output_is_refused(tmp_path, parents, good):
    out = tmp_path / "out"
    with output.Claim(out, force=False):
        assert_failed(subclone(parents["single"], "-r", good, "-o", out), 2, None, "another shrinkit run")
        assert_failed(subclone(parents["single"], "-r", good, "-o", f"{tmp_path}/x/../out"), 2, None, "another")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["good.yaml"]   # lock and temp folder gone
    assert subclone(parents["single"], "-r", good, "-o", out)[0] == 0


DRIVER = """
import os, sys, time
import shrinkit.stages.write as p
real = p.slice_blocks
first = [True]
def slow(*a, **k):
    if first[0]:
        first[0] = False
        open(os.environ["SHRINKIT_TEST_READY"], "w").close()
        time.sleep(float(os.environ.get("SHRINKIT_TEST_SLEEP", "60")))
    return real(*a, **k)
p.slice_blocks = slow
from shrinkit.cli import app
app(prog_name="shrinkit")
"""


def _start(tmp_path, *args, sleep=60):
    drv = tmp_path / "driver.py"
    drv.write_text(DRIVER)
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    env = dict(os.environ, PYTHONPATH=str(REPO), SHRINKIT_TEST_READY=str(ready), SHRINKIT_TEST_SLEEP=str(sleep),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(drv), "subclone", *map(str, args), "-q", "--no-verify"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.monotonic()
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() - t0 > 60:
            proc.kill()
            raise AssertionError(proc.communicate())
        time.sleep(0.05)
    return proc


def test_sigterm_cleans_up(tmp_path, parents, good):
    """SIGTERM is handled like SIGINT (exit 143 instead of 130); the in-process interrupt tests
    are in test_errors.py."""
    sig, code, needle = signal.SIGTERM, 143, "terminated"
    work = tmp_path / "work"
    work.mkdir()
    out = work / "new" / "out"
    proc = _start(tmp_path, parents["single"], "-r", good, "-o", out)
    assert list((work / "new").glob(".out.shrinkit-tmp-*"))
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert_failed((proc.returncode, stdout, stderr), code, out, needle)
    assert list(work.iterdir()) == []   # temp folder, lock and the created folder all gone


def test_sigkill_leftovers_removed_by_the_next_run(tmp_path, parents, good):
    out = tmp_path / "out"
    proc = _start(tmp_path, parents["single"], "-r", good, "-o", out)
    proc.kill()
    proc.communicate()
    left = sorted(x.name for x in tmp_path.glob(".out.shrinkit-*"))
    assert left == sorted([f".out.shrinkit-tmp-{proc.pid}", ".out.shrinkit-lock"]), left
    # a folder that merely looks like a temp folder (no owner mark) is never touched
    look = victim(tmp_path / ".out.shrinkit-tmp-999999999")
    before = tree(look)
    rc, _, err = cli("subclone", parents["single"], "-r", good, "-o", out)
    assert rc == 0, err
    assert "removed" in err and f"shrinkit-tmp-{proc.pid}" in err
    assert sorted(x.name for x in tmp_path.glob(".out.shrinkit-*")) == [".out.shrinkit-tmp-999999999"]
    assert tree(look) == before


def test_concurrent_runs_second_refused(tmp_path, parents, good):
    out = tmp_path / "out"
    proc = _start(tmp_path, parents["single"], "-r", good, "-o", out, sleep=3)
    rc, _, err = subclone(parents["single"], "-r", good, "-o", out, "--force")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert rc == 2 and "another shrinkit run" in err
    assert (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".out.shrinkit-*"))


def test_killed_force_publish_restores_the_earlier_child(tmp_path, parents, good):
    """A --force run killed between setting the earlier child aside and renaming the new one into
    place: the next run puts the earlier child back before it decides anything."""
    out = tmp_path / "out"
    assert subclone(parents["single"], "-r", good, "-o", out)[0] == 0
    before = tree(out)
    aside = tmp_path / ".out.shrinkit-old-999999999"
    out.rename(aside)
    assert_failed(subclone(parents["single"], "-r", good, "-o", out), 2, None, "--force")
    assert tree(out) == before and not aside.exists()
