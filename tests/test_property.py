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
