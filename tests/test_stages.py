"""The stage registry: one module and one registry line per stage, stage names only there, no
import circles, the pipeline short; and the places where preflight and the run used to disagree."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest

import planted
from test_errors import GOOD, assert_failed, cli, parents  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent / "shrinkit"


# ---------------------------------------------------------------------------- structure

def _imports(root: Path) -> dict[str, set[str]]:
    """module -> the shrinkit modules it imports, at module level or inside functions (imports
    under `if TYPE_CHECKING:` do not run and do not count)."""
    mods = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    top = root.name
    graph = {}
    for name, f in mods.items():
        tree = ast.parse(f.read_text())
        pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        skip = {id(m) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                for m in ast.walk(n)}
        out = set()
        for n in ast.walk(tree):
            if id(n) in skip:
                continue
            if isinstance(n, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - (n.level - 1)] if n.level else []
                target = ".".join(base + [n.module]) if n.level and n.module else (".".join(base) if n.level else n.module or "")
                for a in n.names:
                    cand = f"{target}.{a.name}"
                    out.add(cand if cand in mods else target)
            elif isinstance(n, ast.Import):
                out.update(a.name for a in n.names)
        graph[name] = {o for o in out if o in mods and o != name and o.split(".")[0] == top}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert _cycles(_imports(ROOT)) == []


def test_import_circle_check_finds_a_circle(tmp_path):
    """Negative control: a lazy import inside a function still closes a circle."""
    pkg = tmp_path / "shrinkit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def x():\n    from .a import y\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n")
    assert _cycles(_imports(pkg)) == [["shrinkit.a", "shrinkit.b"]]


def _stage_name_literals(files, allowed) -> list[str]:
    """Non-docstring string constants that name a stage, outside the allowed files per stage."""
    from shrinkit.stages import STAGES

    hits = []
    for f in files:
        tree = ast.parse(f.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
                for name in STAGES:
                    if f.resolve() not in allowed(name) and re.search(rf"\b{name}\b", n.value):
                        hits.append(f"{f.name}:{n.lineno}: {name}")
    return hits


def _own_files(name: str) -> set[Path]:
    from shrinkit.stages import STAGES
    own = Path(sys.modules[type(STAGES[name]).__module__].__file__).resolve()
    return {own, (ROOT / "stages" / "__init__.py").resolve()}


def test_stage_names_only_in_their_own_module_and_the_registry():
    assert _stage_name_literals(sorted(ROOT.rglob("*.py")), _own_files) == []


def test_stage_name_check_finds_a_name(tmp_path):
    """Negative control: a stage name written as a string elsewhere is found."""
    f = tmp_path / "other.py"
    f.write_text('"""A docstring may say heal."""\nx = recipe.stage("heal")\n')
    assert _stage_name_literals([f], _own_files) == ["other.py:2: heal"]


def _long_functions(path: Path, limit: int) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{path.name}:{n.name} {n.end_lineno - n.lineno + 1} lines" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]


def test_pipeline_is_short_and_functions_are_small():
    assert len((ROOT / "pipeline.py").read_text().splitlines()) < 300
    long = [x for m in ("pipeline.py", "runner.py", "towers.py", "preflight.py", "runtime.py")
            for x in _long_functions(ROOT / m, 80)]
    assert long == []


def test_function_size_check_finds_a_long_function(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n" + "    x = 1\n" * 90)
    assert _long_functions(f, 80) == ["m.py:f 91 lines"]


# ---------------------------------------------------------------------------- a new stage is one module

def test_a_new_stage_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    """tests/stage_noop.py is a whole stage; registering it (one line) is all it takes for the
    recipe, its schema and the run to know it."""
    import stage_noop
    from shrinkit import api
    from shrinkit.stages import STAGES

    monkeypatch.setitem(STAGES, stage_noop.STAGE.name, stage_noop.STAGE)
    schema = api.schema()
    assert "noop" in json.dumps(schema)
    pl = planted.llama_like(tmp_path / "p")
    rec = {**GOOD, "stages": [{"noop": {"note": "hello"}}, *GOOD["stages"]]}
    res = api.subclone(pl.path, rec, tmp_path / "c", verify=False)
    entry = res.report["stages"][0]
    assert entry["stage"] == "noop" and entry["note"] == "hello" and entry["layers"] == 4
    # the stage's own order rule: it must run before the writing stage
    bad = {**GOOD, "stages": [*GOOD["stages"], {"noop": {}}]}
    from shrinkit.errors import RecipeError
    with pytest.raises(RecipeError, match="noop must come before slice_embeddings"):
        api.load_recipe(bad)


def test_ranking_methods_are_registered_objects():
    from shrinkit.ranking import METHODS, Method
    from shrinkit.stages.rank import RankNeurons

    assert all(isinstance(m, Method) and m.name == n for n, m in METHODS.items())
    assert set(RankNeurons.model_fields["method"].annotation.__args__[0].__args__) == set(METHODS)


# ---------------------------------------------------------------------------- preflight and the run agree

def test_post_norm_family_heal_auto_plans_no_heal_pass(tmp_path):
    """BERT with the default pipeline (heal when: auto) that drops a layer: heal skips (post-norm),
    so preflight plans no heal calibration and the default check stays structural."""
    from shrinkit import api
    from shrinkit.checkpoint.reader import open_checkpoint
    from shrinkit.pipeline import prepare
    from shrinkit.preflight import calibrating_stages
    from shrinkit.recipe import recipe_from_dict

    pl = planted.bert(tmp_path / "p")
    rec = {"target": {"num_hidden_layers": 3}, "calibration": {"data": "random_tokens", "samples": 4, "seq_len": 16},
           "stages": [{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"drop": [1]}},
                      {"heal": {"when": "auto"}}, {"slice_embeddings": {}}]}
    r = recipe_from_dict(rec)
    with open_checkpoint(pl.path) as ck:
        assert calibrating_stages(ck, prepare(ck, r), r, None) == []
    res = api.subclone(pl.path, rec, tmp_path / "c")
    heal = next(s for s in res.report["stages"] if s["stage"] == "heal")
    assert "post-norm" in heal["skipped"]
    assert res.report["verify"]["kind"] == "structural"
    # control: `when: always` heals, and then the run verifies in full on the heal data
    rec["stages"][2] = {"heal": {"when": "always"}}
    res = api.subclone(pl.path, rec, tmp_path / "c2")
    assert "skipped" not in next(s for s in res.report["stages"] if s["stage"] == "heal")
    assert res.report["verify"]["kind"] == "encoder"


@pytest.mark.parametrize("stage", ["heal", "rotate_hidden", "rank_neurons"])
def test_out_holding_data_only_one_stage_reads_is_refused(tmp_path, parents, write_recipe, stage):
    """The output may not be or contain a calibration file, whichever stage reads it."""
    data = tmp_path / "texts" / "calib.txt"
    data.parent.mkdir()
    data.write_text("some text " * 100)
    own = {"calibration": {"data": str(data)}}
    stages = {"heal": [{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"drop": [2]}},
                       {"heal": own}],
              "rotate_hidden": [{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"drop": [2]}},
                                {"rotate_hidden": own}],
              "rank_neurons": [{"rank_neurons": {"method": "activation", **own}}, {"drop_layers": {"drop": [2]}}]}
    recipe = write_recipe({**GOOD, "stages": stages[stage] + [{"slice_embeddings": {}}]})
    for out in (data, data.parent):
        assert_failed(cli("subclone", parents["single"], "-r", recipe, "-o", out, "--force"), 2, None, "calibration data")
    assert data.read_text() == "some text " * 100


def test_data_error_names_the_stage_and_the_top_level_block(tmp_path, parents, write_recipe):
    """A recipe gives random tokens to rank_neurons only; drop_layers (importance) then reads the
    builtin text, which this parent has no tokenizer for: the message says which stage reads what
    and that a top-level `calibration:` serves both."""
    cal = {"data": "random_tokens", "samples": 4, "seq_len": 16}
    recipe = write_recipe({**GOOD, "stages": [{"rank_neurons": {"method": "activation", "calibration": cal}},
                                              {"drop_layers": {"strategy": "importance"}},
                                              {"slice_embeddings": {}}]})
    err = assert_failed(cli("subclone", parents["single"], "-r", recipe, "-o", tmp_path / "c"), 2, tmp_path / "c",
                        "drop_layers (importance) reads calibration text (builtin)", "no tokenizer",
                        "top-level `calibration:`")
    assert "rank_neurons" in err
    # with the block at the top level, both stages read random tokens and the run succeeds
    fixed = write_recipe({**GOOD, "calibration": cal, "stages": [{"rank_neurons": {"method": "activation"}},
                                                                 {"drop_layers": {"strategy": "importance"}},
                                                                 {"slice_embeddings": {}}]})
    rc, _, err = cli("subclone", parents["single"], "-r", fixed, "-o", tmp_path / "c")
    assert rc == 0, err
