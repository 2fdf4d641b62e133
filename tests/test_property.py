"""Property test: mutate the safetensors headers, the index, config.json and the recipe of a
valid run, and check what shrinkit promises for every input:

- the exit code is 0, 2 or 3;
- on an error, stderr is one line (no traceback) and nothing is written (no output, no temp
  folder, no lock);
- the input folders are byte-identical afterwards;
- exit 0 gives a child that transformers loads with no missing or unexpected keys and whose
  outputs are finite.

`make test` runs a small, derandomized set (SHRINKIT_PROPERTY_EXAMPLES, default 40). A longer
run: `SHRINKIT_PROPERTY_EXAMPLES=2000 .venv/bin/python -m pytest -q -s tests/test_property.py`
(it prints how many cases ended in each exit code and the distinct error kinds).
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

import planted
from shrinkit.cli import app

EXAMPLES = int(os.environ.get("SHRINKIT_PROPERTY_EXAMPLES", "40"))
LONG = EXAMPLES > 100
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_hidden_layers=4, max_position_embeddings=64, tie_word_embeddings=False)
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "num_hidden_layers", "vocab_size", "tie_word_embeddings", "architectures", "model_type")
DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F33", "")
STATS: collections.Counter = collections.Counter()
KINDS: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    import transformers

    path = tmp_path_factory.mktemp("prop") / "parent"
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY))
    planted._randomize(m, torch.Generator().manual_seed(0))
    m.save_pretrained(path, max_shard_size="150KB")
    assert len(list(path.glob("*.safetensors"))) >= 2
    yield path
    if STATS:
        print(f"\nproperty cases: {sum(STATS.values())}; exit codes: {dict(sorted(STATS.items()))}")
        for k, n in KINDS.most_common():
            print(f"  {n:5d}  {k}")


# ---------------------------------------------------------------------------- strategies

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 200), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                   st.dictionaries(st.text(max_size=4), c, max_size=3)),
                      max_leaves=6)


def near(v):
    """Values close to a valid one: the kind of mistake a real file has."""
    if isinstance(v, bool):
        return st.one_of(st.just(not v), st.sampled_from(["true", "false", 0, 1, None]))
    if isinstance(v, int):
        return st.one_of(st.sampled_from([v + 1, v - 1, v * 2, v // 2, 0, -v, float(v), str(v), 10**12, 2**63]),
                         st.integers(0, max(2 * v + 2, 1)))
    if isinstance(v, list):
        return st.one_of(st.just(list(reversed(v))), st.just(v[:-1]), st.just(v + [1]),
                         st.lists(st.integers(-1, 130), max_size=4))
    return values


def header_mutation(draw, folder: Path):
    shards = sorted(folder.glob("*.safetensors"))
    f = draw(st.sampled_from(shards))
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8:8 + n])
        names = sorted(k for k in header if k != "__metadata__" and isinstance(header[k], dict))
        assert names
    except Exception:   # an earlier mutation broke it already
        return f"header {f.name} (broken already)"
    name = draw(st.sampled_from(names))
    op = draw(st.sampled_from(["field", "field", "field", "delete", "rename", "swap", "metadata", "raw", "length"]))
    body = raw[8 + n:]
    if op == "field":
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        cur = header[name].get(key)
        if key == "dtype":
            header[name][key] = draw(st.one_of(st.sampled_from(DTYPES), values))
        else:
            header[name][key] = draw(st.one_of(near(cur), values) if cur is not None else values)
    elif op == "delete":
        del header[name]
    elif op == "rename":
        header[draw(st.one_of(st.sampled_from(names), st.text(max_size=12)))] = header.pop(name)
    elif op == "swap":
        other = draw(st.sampled_from(names))
        header[name], header[other] = header[other], header[name]
    elif op == "metadata":
        header["__metadata__"] = draw(values)
    text = json.dumps(header).encode()
    if op == "raw":
        text = draw(st.one_of(st.binary(max_size=64), values.map(lambda v: json.dumps(v).encode())))
    text += b" " * (-len(text) % 8)
    length = len(text)
    if op == "length":
        length = draw(st.sampled_from([0, 1, length - 8, length + 8, 2**63, len(body) + length + 1]))
    f.write_bytes(length.to_bytes(8, "little") + text + body)
    return f"header {f.name} {op}"


def index_mutation(draw, folder: Path):
    ip = folder / "model.safetensors.index.json"
    try:
        idx = json.loads(ip.read_text())
        wm = idx["weight_map"]
        names = sorted(wm)
        shards = sorted(set(v for v in wm.values() if isinstance(v, str)))
        assert names and shards
    except Exception:   # an earlier mutation broke it already
        return "index (broken already)"
    op = draw(st.sampled_from(["value", "value", "delete", "add", "weight_map", "metadata"]))
    if op == "value":
        wm[draw(st.sampled_from(names))] = draw(st.one_of(st.sampled_from(shards + ["../x.safetensors", "/etc/passwd",
                                                                                  "missing.safetensors", ""]), values))
    elif op == "delete":
        del wm[draw(st.sampled_from(names))]
    elif op == "add":
        wm[draw(st.text(max_size=10))] = draw(st.sampled_from(shards))
    elif op == "weight_map":
        idx["weight_map"] = draw(values)
    else:
        idx["metadata"] = draw(values)
    ip.write_text(json.dumps(idx))
    return f"index {op}"


def config_mutation(draw, folder: Path):
    cp = folder / "config.json"
    try:
        cfg = json.loads(cp.read_text())
        assert isinstance(cfg, dict)
    except Exception:
        return "config (broken already)"
    key = draw(st.sampled_from(CONFIG_KEYS))
    op = draw(st.sampled_from(["near", "near", "value", "delete"]))
    if op == "delete":
        cfg.pop(key, None)
    elif op == "near" and key in cfg:
        if key == "model_type":
            cfg[key] = draw(st.sampled_from(["gpt2", "bert", "llama2", "", "LLAMA"]))
        else:
            cfg[key] = draw(near(cfg[key]))
    else:
        cfg[key] = draw(values)
    cp.write_text(json.dumps(cfg))
    return f"config {key} {op}"


def valid_recipe(draw) -> dict:
    """A recipe that is valid for the parent (most cases start from one and break one thing)."""
    target = {}
    for k, choices in (("hidden_size", [64, 48, 32, 16]), ("intermediate_size", [96, 64, 8]),
                       ("num_hidden_layers", [4, 3, 2, 1])):
        if draw(st.booleans()):
            target[k] = draw(st.sampled_from(choices))
    heads = draw(st.sampled_from([None, (4, 2), (2, 2), (2, 1), (4, 1)]))
    if heads:
        target["num_attention_heads"], target["num_key_value_heads"] = heads
    calib = {"data": "random_tokens", "samples": 2, "seq_len": 8}
    method = draw(st.sampled_from(["magnitude", "uniform", "first", "random", "magnitude", "activation"]))
    rank = {"method": method, **({"calibration": calib} if method == "activation" else {})}
    n = target.get("num_hidden_layers", 4)
    how = draw(st.sampled_from(["middle", "first", "last", "list", "list", "importance"]))
    if how == "list":
        drop = {"drop": sorted(draw(st.permutations(range(4)))[:4 - n])}
    elif how == "importance":
        drop = {"strategy": "importance", "calibration": calib}
    else:
        drop = {"strategy": how}
    stages = [{"rank_neurons": rank}, {"drop_layers": drop}, {"slice_embeddings": {}}]
    if draw(st.booleans()):
        stages.append({"rescale_norms": draw(st.sampled_from([{}, {"factor": 0.5}, {"factor": 1.7}]))})
    r = {"target": target, "stages": stages, "seed": draw(st.integers(0, 5))}
    if draw(st.booleans()):
        r["output"] = {"dtype": draw(st.sampled_from(["float32", "bfloat16", "float16"])),
                       "max_shard_size": draw(st.sampled_from(["40KB", "2GB", 100000]))}
    r["verify"] = {"data": "random_tokens", "samples": 2, "seq_len": 8}
    return r


RECIPE_PATHS = (("target",), ("target", "hidden_size"), ("target", "intermediate_size"),
                ("target", "num_attention_heads"), ("target", "num_key_value_heads"), ("target", "num_hidden_layers"),
                ("target", "params"), ("stages",), ("stages", 0, "rank_neurons", "method"),
                ("stages", 0, "rank_neurons", "calibration"), ("stages", 1, "drop_layers", "drop"),
                ("stages", 1, "drop_layers", "keep"), ("stages", 1, "drop_layers", "strategy"),
                ("stages", 3, "rescale_norms", "factor"), ("seed",), ("output", "dtype"),
                ("output", "max_shard_size"), ("name",), ("verify", "samples"), ("extra_key",))
HOSTILE_FLOATS = st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e300, 1e-300])


def recipe_mutation(draw, r: dict) -> str:
    path = draw(st.sampled_from(RECIPE_PATHS))
    node = r
    for k in path[:-1]:
        if isinstance(node, dict) and isinstance(node.get(k, {}), (dict, list)):
            node = node.setdefault(k, {})
        elif isinstance(node, list) and isinstance(k, int) and k < len(node):
            node = node[k]
        else:
            return "recipe (no-op)"
    last = path[-1]
    if not isinstance(node, (dict, list)) or (isinstance(node, list) and not (isinstance(last, int)
                                                                             and last < len(node))):
        return "recipe (no-op)"
    cur = node[last] if isinstance(node, list) else node.get(last)
    hostile = st.one_of(values, HOSTILE_FLOATS, st.sampled_from(["../x", "a/b", "..", "/", "x" * 300]))
    node[last] = draw(st.one_of(near(cur), hostile) if cur is not None else hostile)
    return f"recipe {'.'.join(map(str, path))}"


def recipe_text(draw, what: list) -> str:
    r = valid_recipe(draw)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        what.append(recipe_mutation(draw, r))
    text = yaml.safe_dump(r, sort_keys=False, allow_unicode=True)
    if draw(st.integers(0, 19)) == 0:   # raw damage to the text
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.text(max_size=5)) + text[i + draw(st.integers(0, 5)):]
        what.append("recipe text")
    return text


# ---------------------------------------------------------------------------- the property

def tree(p: Path) -> dict:
    out = {}
    for x in sorted(Path(p).rglob("*")):
        out[str(x.relative_to(p))] = hashlib.sha256(x.read_bytes()).hexdigest() if x.is_file() else "dir"
    return out


def kind(msg: str) -> str:
    """An error message with its paths and numbers blanked: what kind of error it is."""
    msg = re.sub(r"/\S+", "PATH", msg)
    msg = re.sub(r"'[^']*'", "'X'", msg)
    return re.sub(r"-?\d+(\.\d+)?", "N", msg)[:140]


def child_ok(out: Path) -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    m, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True,
                                                                dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys"), info
    ids = torch.randint(0, m.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = m(input_ids=ids).logits
    assert torch.isfinite(logits).all(), "non-finite child outputs"


@settings(max_examples=EXAMPLES, derandomize=not LONG, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_inputs(parent, data):
    with tempfile.TemporaryDirectory(prefix="shrinkit-prop-") as d:
        work = Path(d)
        p = work / "parent"
        shutil.copytree(parent, p)
        what = []
        n_mut = data.draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]), label="mutations")
        for _ in range(n_mut):
            target = data.draw(st.sampled_from(["header", "index", "config"]), label="target")
            what.append({"header": header_mutation, "index": index_mutation, "config": config_mutation}[target](
                data.draw, p))
        recipe = work / "r.yaml"
        recipe.write_text(recipe_text(data.draw, what))
        before, rbefore = tree(p), recipe.read_bytes()
        out = work / "out"
        res = CliRunner().invoke(app, ["subclone", str(p), "-r", str(recipe), "-o", str(out), "-q", "--no-verify"])
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
        rc = res.exit_code
        STATS[rc] += 1
        assert rc in (0, 2, 3), (rc, res.stderr, what)
        assert tree(p) == before, "the parent folder changed"
        assert recipe.read_bytes() == rbefore, "the recipe changed"
        if rc == 0:
            KINDS["0 ok"] += 1
            child_ok(out)
        else:
            lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), (res.stderr, what)
            assert "Traceback" not in res.stderr and "internal error" not in res.stderr, (res.stderr, what)
            KINDS[f"{rc} {kind(lines[0])}"] += 1
            assert sorted(x.name for x in work.iterdir()) == ["parent", "r.yaml"], (list(work.iterdir()), what)


# ---------------------------------------------------------------------------- more input classes
# shrinkit's own report (and the child it describes) under --skip-if-current, the Hugging Face
# cache layout (refs, snapshots, links), image processor configs and MoE routing fields, with the
# same invariants; a child reported "skipped" must be the intact child, byte for byte.

CLASS_EXAMPLES = max(6, EXAMPLES // 4)
CLASS_SETTINGS = dict(max_examples=CLASS_EXAMPLES, derandomize=not LONG, deadline=None, print_blob=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                             HealthCheck.function_scoped_fixture])
SMALL = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
                  st.text(max_size=6), st.lists(st.integers(-2, 300), max_size=4),
                  st.sampled_from([1e-300, 1e300, -0.0, "abc", {}, [], {"height": 0}, [[1]]]))
HALF_RECIPE = {"target": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2},
               "stages": [{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"strategy": "middle"}},
                          {"slice_embeddings": {}}]}


def walk(p: Path) -> dict:
    """Every entry under p, links not followed: file hash, link target or 'dir'."""
    out = {}
    for root, dirs, files in os.walk(p):
        for n in dirs + files:
            x = Path(root) / n
            rel = str(x.relative_to(p))
            if x.is_symlink():
                out[rel] = "-> " + os.readlink(x)
            elif x.is_file():
                out[rel] = hashlib.sha256(x.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def invoke(args, env=None):
    res = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


def error_ok(res, what) -> dict:
    """One error line on stderr, no traceback; with --json one object on stdout saying the same."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (res.stderr, what)
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, (res.stderr, what)
    KINDS[f"{res.exit_code} {kind(lines[0])}"] += 1
    if "--json" in res.stdout or res.stdout.strip():
        j = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
        assert j["exit"] == res.exit_code and j["error"] == lines[0].removeprefix("error: "), (j, what)
        return j
    return {}


def model_ok(out: Path, auto: str = "AutoModelForCausalLM") -> None:
    """transformers loads the child with no missing or unexpected keys, and its outputs are finite."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    m, info = getattr(transformers, auto).from_pretrained(str(out), output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys"), info
    with torch.no_grad():
        if auto == "AutoModel":   # vision
            s = int(m.config.image_size)
            y = m(pixel_values=torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0))).last_hidden_state
        else:
            ids = torch.randint(0, m.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
            y = m(input_ids=ids).logits
    assert torch.isfinite(y).all(), "non-finite child outputs"


@pytest.fixture(scope="module")
def golden(parent, tmp_path_factory) -> tuple[Path, Path]:
    """A child of `parent` by HALF_RECIPE, and that recipe."""
    d = tmp_path_factory.mktemp("golden")
    rec = d / "r.yaml"
    rec.write_text(yaml.safe_dump(HALF_RECIPE))
    res = invoke(["subclone", parent, "-r", rec, "-o", d / "child", "-q", "--no-verify"])
    assert res.exit_code == 0, res.output
    return d / "child", rec


REPORT_KEYS = ("shrinkit_version", "recipe_hash", "parent_hash", "child", "parent", "files", "verify", "notes",
               "seconds", "kept", "stages")


def report_mutation(draw, out: Path) -> str:
    rp = out / "shrinkit_report.json"
    rep = json.loads(rp.read_text())
    op = draw(st.sampled_from(["key", "nested", "delete", "file_record", "raw", "file", "file", "file", "none"]))
    if op == "key":
        k = draw(st.sampled_from(REPORT_KEYS))
        rep[k] = draw(st.one_of(near(rep.get(k)), SMALL, values))
    elif op == "nested":
        k = draw(st.sampled_from(["child", "parent", "files"]))
        sub = draw(st.sampled_from(sorted(rep[k])))
        rep[k][sub] = draw(st.one_of(near(rep[k][sub]), SMALL))
    elif op == "delete":
        rep.pop(draw(st.sampled_from(REPORT_KEYS)), None)
    elif op == "file_record":
        name = draw(st.sampled_from(sorted(rep["files"])))
        f = draw(st.sampled_from(["size", "sha256"]))
        rep["files"][name][f] = draw(st.one_of(near(rep["files"][name][f]), st.just("0" * 64), SMALL))
    if op == "raw":
        rp.write_bytes(draw(st.one_of(st.binary(max_size=40), st.just(rp.read_bytes()[:100]), st.just(b"[" * 5000))))
    elif op == "file":
        f = out / draw(st.sampled_from(sorted(rep["files"])))
        how = draw(st.sampled_from(["delete", "nan", "truncate", "append", "flip", "link", "empty"]))
        raw = f.read_bytes()
        if how == "delete":
            f.unlink()
        elif how == "nan" and f.suffix == ".safetensors":
            n = int.from_bytes(raw[:8], "little")
            f.write_bytes(raw[:8 + n] + b"\xff\xff\xff\x7f" * ((len(raw) - 8 - n) // 4))
        elif how == "truncate":
            f.write_bytes(raw[:-draw(st.integers(1, 16))])
        elif how == "append":
            f.write_bytes(raw + b"\0\0\0\0")
        elif how == "flip":
            i = draw(st.integers(0, len(raw) - 1))
            f.write_bytes(raw[:i] + bytes([raw[i] ^ 0x40]) + raw[i + 1:])
        elif how == "link":   # the same bytes, behind a link
            real = out.parent / ("moved-" + f.name)
            f.rename(real)
            f.symlink_to(real)
        elif how == "empty":
            f.write_bytes(b"")
        return f"child file {f.name} {how}"
    elif op != "none":
        rp.write_text(json.dumps(rep))
    return f"report {op}"


@settings(**CLASS_SETTINGS)
@given(data=st.data())
def test_mutated_report_and_child(parent, golden, data):
    """--skip-if-current over a child whose report or files were changed: skipped only when the
    child is exactly the one written; otherwise refused (one line) or, with --force, rebuilt."""
    child, rec = golden
    with tempfile.TemporaryDirectory(prefix="shrinkit-prop-") as d:
        work = Path(d)
        out = work / "out"
        shutil.copytree(child, out)
        what = [report_mutation(data.draw, out)]
        force = data.draw(st.booleans(), label="force")
        before, pbefore, rbefore = walk(work), tree(parent), rec.read_bytes()
        args = ["subclone", parent, "-r", rec, "-o", out, "-q", "--no-verify", "--skip-if-current", "--json"]
        res = invoke(args + (["--force"] if force else []))
        rc = res.exit_code
        STATS[rc] += 1
        assert rc in (0, 2, 3), (rc, res.output, what)
        assert tree(parent) == pbefore and rec.read_bytes() == rbefore, what
        if rc != 0:
            error_ok(res, what)
            assert walk(work) == before, ("the output changed on error", what)
            return
        j = json.loads(res.stdout)
        KINDS["0 skipped" if j["skipped"] else "0 rebuilt"] += 1
        if j["skipped"]:   # never over a child that is not the one written
            assert walk(out) == {k: v for k, v in walk(child).items()} or all(
                (out / n).is_file() and not (out / n).is_symlink()
                and hashlib.sha256((out / n).read_bytes()).hexdigest() == hashlib.sha256((child / n).read_bytes()).hexdigest()
                for n in json.loads((child / "shrinkit_report.json").read_text())["files"]), what
            assert walk(work) == before, what
        model_ok(out)


# -- the Hugging Face cache layout

OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def _hub_layout(work: Path, parent: Path) -> tuple[Path, Path]:
    from test_hub import COMMIT, put_snapshot

    cache = work / "hf-cache"
    put_snapshot(cache, "org/tiny", COMMIT, {p.name: p.read_bytes() for p in parent.iterdir() if p.is_file()})
    outside = work / "outside_model"       # a valid model outside the cache, told apart by its config
    shutil.copytree(parent, outside)
    cfg = json.loads((outside / "config.json").read_text())
    cfg["rms_norm_eps"] = 0.123
    (outside / "config.json").write_text(json.dumps(cfg))
    put_snapshot(cache, "org/other", OTHER_COMMIT, {"config.json": (outside / "config.json").read_bytes()})
    return cache, outside


def hub_mutation(draw, cache: Path, outside: Path) -> tuple[str, str | None]:
    from test_hub import COMMIT

    repo = cache / "models--org--tiny"
    snap = repo / "snapshots" / COMMIT
    op = draw(st.sampled_from(["ref", "ref", "snapshot_link", "file_link", "file_link", "file_copy", "revision",
                               "delete_blob", "none"]))
    revision = None
    hostile = ["../../../outside_model", "../../../../outside_model", "../snapshots/" + COMMIT, "", "main", "x" * 40,
               COMMIT.upper(), COMMIT + "\n", OTHER_COMMIT, "/etc", str(outside), COMMIT[:39]]
    if op == "ref":
        (repo / "refs" / "main").write_text(draw(st.one_of(st.sampled_from(hostile), st.text(max_size=12))))
    elif op == "snapshot_link":
        target = draw(st.sampled_from([outside, cache / "models--org--other" / "snapshots" / OTHER_COMMIT]))
        new = repo / "snapshots" / draw(st.sampled_from([COMMIT, OTHER_COMMIT]))
        if new.exists() or new.is_symlink():
            shutil.rmtree(new)
        new.symlink_to(target)
        if new.name == OTHER_COMMIT:
            (repo / "refs" / "main").write_text(OTHER_COMMIT)
    elif op in ("file_link", "file_copy"):
        name = draw(st.sampled_from(sorted(p.name for p in snap.iterdir())))
        link = snap / name
        real = Path(os.path.realpath(link))
        link.unlink()
        if op == "file_copy":   # a plain file in the snapshot (no-symlink layouts): accepted
            link.write_bytes(real.read_bytes())
        else:
            blobs = sorted((repo / "blobs").iterdir())
            link.symlink_to(draw(st.sampled_from([outside / name, work_missing(cache), blobs[0], blobs[-1],
                                                  *sorted((cache / "models--org--other" / "blobs").iterdir()),
                                                  Path("/etc/hostname")])))
    elif op == "revision":
        revision = draw(st.one_of(st.sampled_from(hostile[:4] + ["main", COMMIT, "a/b", "..", "main/../main", " main"]),
                                  st.text(max_size=8)))
    elif op == "delete_blob":
        draw(st.sampled_from(sorted((repo / "blobs").iterdir()))).unlink()
    return op, revision


def work_missing(cache: Path) -> Path:
    return cache.parent / "missing" / "model.safetensors"


@settings(**CLASS_SETTINGS)
@given(data=st.data())
def test_mutated_hub_cache(parent, data):
    """A parent by Hub id, from a cache whose refs, snapshots and links were changed: never a model
    outside the repository's own cache folder."""
    with tempfile.TemporaryDirectory(prefix="shrinkit-prop-") as d:
        work = Path(d)
        cache, outside = _hub_layout(work, parent)
        op, revision = hub_mutation(data.draw, cache, outside)
        what = [f"hub {op} {revision!r}"]
        rec = work / "r.yaml"
        rec.write_text(yaml.safe_dump(HALF_RECIPE))
        before = walk(work)
        out = work / "out"
        args = ["subclone", "org/tiny", "-r", rec, "-o", out, "-q", "--no-verify", "--json"]
        res = invoke(args + (["--revision", revision] if revision is not None else []),
                     env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
        rc = res.exit_code
        STATS[rc] += 1
        assert rc in (0, 2, 3), (rc, res.output, what)
        if rc != 0:
            error_ok(res, what)
            assert walk(work) == before, ("something changed on error", what)
            return
        KINDS["0 ok"] += 1
        assert {k: v for k, v in walk(work).items() if k != "out" and not k.startswith("out/")} == before, what
        j = json.loads(res.stdout)
        real_cache = os.path.realpath(cache / "models--org--tiny")
        assert os.path.realpath(j["parent"]["path"]).startswith(real_cache + os.sep), (j["parent"], what)
        assert json.loads((out / "config.json").read_text()).get("rms_norm_eps") != 0.123, what
        model_ok(out)


# -- image processor configs

PRE_KEYS = ("size", "crop_size", "do_resize", "do_center_crop", "image_mean", "image_std", "rescale_factor",
            "do_rescale", "do_normalize", "resample", "do_convert_rgb")


@pytest.fixture(scope="module")
def vit_parent(tmp_path_factory) -> Path:
    return planted.vit(tmp_path_factory.mktemp("prop-vit") / "parent").path


@settings(**CLASS_SETTINGS)
@given(data=st.data())
def test_mutated_image_processor_config(vit_parent, data):
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="shrinkit-prop-") as d:
        work = Path(d)
        p = work / "parent"
        shutil.copytree(vit_parent, p)
        pp = p / "preprocessor_config.json"
        pre = json.loads(pp.read_text())
        what = []
        for _ in range(data.draw(st.sampled_from([1, 1, 2, 3]), label="mutations")):
            k = data.draw(st.sampled_from(PRE_KEYS), label="key")
            op = data.draw(st.sampled_from(["near", "value", "delete"]), label="op")
            if op == "delete":
                pre.pop(k, None)
            else:
                cur = pre.get(k)
                pre[k] = data.draw(near(cur) if op == "near" and cur is not None and not isinstance(cur, (dict, float))
                                   else SMALL, label="value")
            what.append(f"preprocessor {k} {op}")
        if data.draw(st.integers(0, 9), label="raw") == 0:
            pp.write_bytes(data.draw(st.binary(max_size=30)))
            what.append("preprocessor raw")
        else:
            pp.write_text(json.dumps(pre))
        images = work / "images"
        images.mkdir()
        sizes = data.draw(st.lists(st.sampled_from([(40, 30), (40, 30), (32, 32), (50, 20)]), min_size=1, max_size=4))
        for i, s in enumerate(sizes):
            Image.new("RGB", s, (30 * i % 255, 80, 160)).save(images / f"i{i}.png")
        src = data.draw(st.sampled_from(["builtin", str(images), "random_pixels"]), label="data")
        rec = work / "r.yaml"
        rec.write_text(yaml.safe_dump({"target": {"intermediate_size": 96}, "stages": [
            {"rank_neurons": {"method": "activation", "calibration": {"data": src, "samples": 3}}},
            {"slice_embeddings": {}}]}))
        before = walk(work)
        out = work / "out"
        res = invoke(["subclone", p, "-r", rec, "-o", out, "-q", "--no-verify", "--json"])
        rc = res.exit_code
        STATS[rc] += 1
        assert rc in (0, 2, 3), (rc, res.output, what)
        if rc != 0:
            error_ok(res, what)
            assert walk(work) == before, ("something changed on error", what)
            return
        KINDS["0 ok"] += 1
        assert {k: v for k, v in walk(work).items() if k != "out" and not k.startswith("out/")} == before, what
        model_ok(out, "AutoModel")


# -- MoE routing fields

MOE_KEYS = {"mixtral": ("num_experts_per_tok", "num_local_experts"),
            "qwen2_moe": ("num_experts_per_tok", "num_experts", "decoder_sparse_step", "mlp_only_layers",
                          "norm_topk_prob")}


@pytest.fixture(scope="module")
def moe_parents(tmp_path_factory) -> dict:
    from test_moe import real_parent

    d = tmp_path_factory.mktemp("prop-moe")
    return {t: real_parent(d / t, t) for t in MOE_KEYS}


@settings(**CLASS_SETTINGS)
@given(data=st.data())
def test_mutated_moe_routing(moe_parents, data):
    with tempfile.TemporaryDirectory(prefix="shrinkit-prop-") as d:
        work = Path(d)
        t = data.draw(st.sampled_from(sorted(MOE_KEYS)), label="family")
        p = work / "parent"
        shutil.copytree(moe_parents[t], p)
        cfg = json.loads((p / "config.json").read_text())
        what = [t]
        for _ in range(data.draw(st.sampled_from([1, 1, 2]), label="mutations")):
            k = data.draw(st.sampled_from(MOE_KEYS[t]), label="key")
            cur = cfg.get(k)
            cfg[k] = data.draw(st.one_of(near(cur), SMALL) if cur is not None else SMALL, label="value")
            what.append(f"config {k}")
        (p / "config.json").write_text(json.dumps(cfg))
        target = data.draw(st.sampled_from([{}, {"num_experts": 4}, {"num_experts": 2, "num_experts_per_tok": 1},
                                            {"expert_intermediate_size": 16}]), label="target")
        rec = work / "r.yaml"
        rec.write_text(yaml.safe_dump({"target": target, "stages": [{"rank_neurons": {"method": "magnitude"}},
                                                                     {"slice_embeddings": {}}]}))
        before = walk(work)
        out = work / "out"
        res = invoke(["subclone", p, "-r", rec, "-o", out, "-q", "--no-verify", "--json"])
        rc = res.exit_code
        STATS[rc] += 1
        assert rc in (0, 2, 3), (rc, res.output, what)
        if rc != 0:
            error_ok(res, what)
            assert walk(work) == before, ("something changed on error", what)
            return
        KINDS["0 ok"] += 1
        assert {k: v for k, v in walk(work).items() if k != "out" and not k.startswith("out/")} == before, what
        model_ok(out)
