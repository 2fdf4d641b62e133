"""Inputs validated by schema: every malformed field of a safetensors header, the index,
config.json, a recipe, calibration rows and the sha256 cache is one line naming the file and the
field, exit 3 (parent) or 2 (recipe, data, command line), never an internal error, a hang or a
child that is wrong. And `shrinkit verify` checks its pair."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from test_errors import (GOOD, _llama, assert_failed, cli, copy_parent, fail, no_pickle_reads,  # noqa: F401
                         parents)


def edit_config(p: Path, **kv) -> Path:
    cfg = json.loads((p / "config.json").read_text())
    for k, v in kv.items():
        if v is DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (p / "config.json").write_text(json.dumps(cfg))
    return p


DELETE = object()


def edit_header(f: Path, fn) -> None:
    """Rewrite a safetensors file's header with fn(header) (the data stays as it is)."""
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    new = fn(header)
    text = (new if isinstance(new, (bytes, str)) else json.dumps(new))
    text = text.encode() if isinstance(text, str) else text
    text += b" " * (-len(text) % 8)
    f.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


@pytest.fixture
def good(write_recipe):
    return write_recipe(GOOD, name="good")


def deep(n: int) -> str:
    return "[" * n + "]" * n


# ---------------------------------------------------------------------------- config.json (exit 3)

@pytest.mark.parametrize("edit,needle", [
    (dict(hidden_size=128, head_dim=32), "axis"),                     # dims disagree with the tensors
    (dict(vocab_size=128), "axis"),
    (dict(intermediate_size=64), "axis"),
    (dict(num_key_value_heads=4), "axis"),
    (dict(num_hidden_layers=3), "holds layer 3"),                      # the extra layer would vanish
    (dict(num_hidden_layers=5), "says 5 layers"),
    (dict(num_hidden_layers=10**12), "layers"),                       # must not hang
    (dict(num_hidden_layers=1e12), "num_hidden_layers"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings"),
    (dict(tie_word_embeddings=0), "tie_word_embeddings"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(num_attention_heads=-4), "num_attention_heads"),
    (dict(num_key_value_heads=8), "num_key_value_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_key_value_heads=0), "num_key_value_heads"),
    (dict(architectures="LlamaForCausalLM"), "architectures"),
    (dict(architectures=[1]), "architectures"),
    (dict(hidden_size="64"), "hidden_size"),
    (dict(hidden_size=True), "hidden_size"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(intermediate_size=DELETE), "intermediate_size"),
    (dict(vocab_size=DELETE), "vocab_size"),
    (dict(head_dim=-1), "head_dim"),
    (dict(head_dim="16"), "head_dim"),
    (dict(model_type=5), "model_type"),
    (dict(model_type=["llama"]), "model_type"),
])
def test_bad_config_value(tmp_path, copy_parent, good, edit, needle):
    p = edit_config(copy_parent(), **edit)
    t0 = time.monotonic()
    msg = fail(3, p, good, tmp_path / "out", needle)
    assert time.monotonic() - t0 < 30
    assert "config" in msg or "model_type" in msg
    # inspect and plan blame the parent as well
    assert_failed(cli("inspect", p), 3, None, needle)
    assert_failed(cli("plan", p, "-r", good), 3, None, needle)


def test_gpt2_config_values(tmp_path, parents, good, copy_parent):
    p = copy_parent("gpt2")
    edit_config(p, n_head=3)
    fail(3, p, good, tmp_path / "out", "n_embd")
    edit_config(p, n_head=4, n_inner="big")
    fail(3, p, good, tmp_path / "out", "n_inner")
    edit_config(p, n_inner=None, n_layer=1)
    fail(3, p, good, tmp_path / "out", "layer")


@pytest.mark.parametrize("text", [deep(100_000), '{"a":' * 5000 + "1" + "}" * 5000, "[1, 2]", "null", "\x00\xff"])
def test_config_not_a_sane_document(tmp_path, copy_parent, good, text):
    p = copy_parent()
    (p / "config.json").write_text(text, encoding="latin-1")
    fail(3, p, good, tmp_path / "out", "config")


def test_config_too_large(tmp_path, copy_parent, good):
    p = copy_parent()
    cfg = json.loads((p / "config.json").read_text())
    cfg["padding"] = "x" * (17 << 20)
    (p / "config.json").write_text(json.dumps(cfg))
    fail(3, p, good, tmp_path / "out", "config", "larger than")


def test_integer_weight_is_refused(tmp_path, copy_parent, good):
    p = copy_parent()

    def to_int(h):
        h["model.norm.weight"]["dtype"] = "I32"     # same size, wrong kind
        return h
    edit_header(p / "model.safetensors", to_int)
    fail(3, p, good, tmp_path / "out", "model.norm.weight", "int32")


# ---------------------------------------------------------------------------- safetensors headers (exit 3)

NAME = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("mutate,needle", [
    (lambda h: h[NAME].update(shape=[float(x) for x in h[NAME]["shape"]]), "shape"),
    (lambda h: h[NAME].update(shape=[str(x) for x in h[NAME]["shape"]]), "shape"),
    (lambda h: h[NAME].update(shape=None), "shape"),
    (lambda h: h[NAME].update(shape=[1] * 20), "shape"),
    (lambda h: h[NAME].update(shape=[-96, -64]), "shape"),
    (lambda h: h[NAME].update(data_offsets=[str(x) for x in h[NAME]["data_offsets"]]), "data_offsets"),
    (lambda h: h[NAME].update(data_offsets=[float(x) for x in h[NAME]["data_offsets"]]), "data_offsets"),
    (lambda h: h[NAME].update(data_offsets=[0]), "data_offsets"),
    (lambda h: h[NAME].update(dtype="F33"), "dtype"),
    (lambda h: h[NAME].update(dtype=32), "dtype"),
    (lambda h: h[NAME].pop("dtype"), "dtype"),
    (lambda h: h.update({NAME: [1, 2, 3]}), NAME),
    (lambda h: h.update({"__metadata__": {"format": 1}}), "__metadata__"),
    (lambda h: h.update({"__metadata__": [1]}), "__metadata__"),
    (lambda h: h[NAME].update(shape=json.loads(deep(200))), "header"),
])
def test_bad_header_field(tmp_path, copy_parent, good, mutate, needle):
    p = copy_parent()

    def edit(h):
        mutate(h)
        return h
    edit_header(p / "model.safetensors", edit)
    msg = fail(3, p, good, tmp_path / "out", needle)
    assert "model.safetensors" in msg


def test_deeply_nested_header(tmp_path, copy_parent, good):
    p = copy_parent()
    edit_header(p / "model.safetensors", lambda h: '{"x": ' + deep(200_000) + "}")
    fail(3, p, good, tmp_path / "out", "model.safetensors", "nested")


# ---------------------------------------------------------------------------- the index (exit 3)

@pytest.mark.parametrize("mutate,needle", [
    (lambda i: i["weight_map"].update({k: 1 for k in list(i["weight_map"])[:1]}), "weight_map"),
    (lambda i: i["weight_map"].update({k: ["a"] for k in list(i["weight_map"])[:1]}), "weight_map"),
    (lambda i: i["weight_map"].update({k: None for k in list(i["weight_map"])[:1]}), "weight_map"),
    (lambda i: i.update(weight_map=list(i["weight_map"])), "weight_map"),
    (lambda i: i.update(weight_map={}), "weight_map"),
    (lambda i: i.update(metadata=json.loads(deep(500))), "nested"),
])
def test_bad_index_field(tmp_path, copy_parent, good, mutate, needle):
    p = copy_parent("sharded")
    ip = p / "model.safetensors.index.json"
    idx = json.loads(ip.read_text())
    mutate(idx)
    ip.write_text(json.dumps(idx))
    fail(3, p, good, tmp_path / "out", needle, "index")


# ---------------------------------------------------------------------------- recipes (exit 2)

@pytest.mark.parametrize("data,needle", [
    ({**GOOD, "seed": 2**64}, "seed"),
    ({**GOOD, "seed": 2**63}, "seed"),
    ({**GOOD, "seed": -1}, "seed"),
    ({**GOOD, "seed": 1.5}, "seed"),
    ({**GOOD, "seed": "7"}, "seed"),
    ({**GOOD, "stages": [*GOOD["stages"][:3], {"rescale_norms": {"factor": float("nan")}}]}, "factor"),
    ({**GOOD, "stages": [*GOOD["stages"][:3], {"rescale_norms": {"factor": float("inf")}}]}, "factor"),
    ({**GOOD, "stages": [*GOOD["stages"][:3], {"rescale_norms": {"factor": -1.0}}]}, "factor"),
    ({**GOOD, "stages": [*GOOD["stages"][:3], {"rescale_norms": {"factor": 0}}]}, "factor"),
    ({**GOOD, "stages": [*GOOD["stages"][:3], {"rescale_norms": {"factor": 1e300}}]}, "factor"),
    ({**GOOD, "verify": {"samples": 10**12}}, "samples"),
    ({**GOOD, "verify": {"seq_len": 10**9}}, "seq_len"),
    ({**GOOD, "output": {"max_shard_size": "9" * 400 + "GB"}}, "max_shard_size"),
    ({**GOOD, "target": {"params": "9" * 400 + "M"}}, "params"),
    ({**GOOD, "target": {"params_ratio": float("nan")}}, "params_ratio"),
    ({**GOOD, "verify": {"data": "a\0b"}}, "data"),
    ({**GOOD, "stages": [{"drop_layers": {"keep": [0.5]}}, {"slice_embeddings": {}}]}, "keep"),
])
def test_recipe_numbers_out_of_range(tmp_path, parents, write_recipe, data, needle):
    fail(2, parents["single"], write_recipe(data), tmp_path / "out", needle)


def test_recipe_yaml_special_floats(tmp_path, parents, write_recipe):
    for v in (".nan", ".inf", "-.inf"):
        text = ("stages:\n  - rank_neurons: {method: magnitude}\n  - slice_embeddings: {}\n"
                f"  - rescale_norms: {{factor: {v}}}\n")
        fail(2, parents["single"], write_recipe(text), tmp_path / "out", "factor")


@pytest.mark.parametrize("text,needle", [
    ("a: " + "[" * 100_000, "YAML"),
    ("a: " + deep(100), "nested"),
    ("".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v: 1\n", "nested"),
    # an alias bomb: each level doubles, walked once per shared node
    ("a: &a [x, x]\n" + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}]\n"
                                for i in range(20)), "Extra inputs"),
])
def test_recipe_nesting(tmp_path, parents, write_recipe, text, needle):
    t0 = time.monotonic()
    fail(2, parents["single"], write_recipe(text), tmp_path / "out", needle)
    assert time.monotonic() - t0 < 30


def test_recipe_dev_zero_fails_fast(tmp_path, parents):
    t0 = time.monotonic()
    fail(2, parents["single"], "/dev/zero", tmp_path / "out", "larger than")
    assert time.monotonic() - t0 < 10


def test_recipe_too_large_or_a_folder(tmp_path, parents, write_recipe):
    big = write_recipe("# " + "x" * (2 << 20) + "\n")
    fail(2, parents["single"], big, tmp_path / "out", "larger than")
    fail(2, parents["single"], tmp_path, tmp_path / "out", "folder")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    fail(2, parents["single"], binary, tmp_path / "out", "recipe")


# ---------------------------------------------------------------------------- calibration data (exit 2)

@pytest.mark.parametrize("rows,needle", [
    (['{"text": 5}'], "text"),
    (['{"text": ["a", "b"]}'], "text"),
    (['{"text": null}'], "text"),
    (['["text"]'], ":1:"),
    (['{"txt": "a"}'], "text"),
    (['{"text": "ok"}', "not json"], ":2:"),
    (['{"text": ' + deep(500) + "}"], ":1:"),
])
def test_bad_calibration_rows(tmp_path, rows, needle):
    from shrinkit.text import _text
    from shrinkit.errors import RecipeError

    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(rows) + "\n")
    with pytest.raises(RecipeError, match=needle) as e:
        _text(str(f))
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_calibration_rows_good(tmp_path):
    from shrinkit.text import _text

    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n')
    assert _text(str(f)) == "one\n\ntwo"


def test_bad_calibration_row_through_the_cli(tmp_path, parents, write_recipe):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": 5}\n')
    recipe = write_recipe({**GOOD, "stages": [{"rank_neurons": {"method": "activation",
                                                                "calibration": {"data": str(f), "samples": 2,
                                                                                "seq_len": 8}}},
                                              *GOOD["stages"][1:]]})
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    fail(2, parents["single"], recipe, tmp_path / "out", "c.jsonl:1", extra=("--tokenizer", tok))


def test_plan_fails_when_calibration_data_is_missing(tmp_path, parents, write_recipe):
    for stage in ({"rank_neurons": {"method": "activation", "calibration": {"data": str(tmp_path / "none.txt")}}},
                  {"rank_neurons": {"method": "magnitude"}}):
        recipe = write_recipe({**GOOD, "stages": [stage, *GOOD["stages"][1:]],
                               **({"verify": {"data": str(tmp_path / "none.txt")}} if "magnitude" in str(stage) else {})})
        assert_failed(cli("plan", parents["single"], "-r", recipe), 2, None, "none.txt")
        fail(2, parents["single"], recipe, tmp_path / "out", "none.txt") if "activation" in str(stage) else None
    # importance layer dropping reads calibration data too
    recipe = write_recipe({**GOOD, "stages": [GOOD["stages"][0], {"drop_layers": {
        "strategy": "importance", "calibration": {"data": str(tmp_path / "gone.jsonl")}}}, *GOOD["stages"][2:]]})
    assert_failed(cli("plan", parents["single"], "-r", recipe), 2, None, "gone.jsonl")


# ---------------------------------------------------------------------------- the sha256 cache

@pytest.mark.parametrize("content", ['["a"]', '{"k": null}', '{"k": 5}', "garbage", deep(100_000), "",
                                     '{"k": "not-a-hash"}'])
def test_malformed_hash_cache_is_ignored(tmp_path, parents, good, monkeypatch, content):
    import hashlib

    monkeypatch.delenv("SHRINKIT_NO_HASH_CACHE", raising=False)
    monkeypatch.setenv("SHRINKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "sha256-cache.json").write_text(content)
    out = tmp_path / "out"
    rc, _, err = cli("subclone", parents["single"], "-r", good, "-o", out, "-q")
    assert rc == 0 and err == "", err
    rep = json.loads((out / "shrinkit_report.json").read_text())
    want = hashlib.sha256((parents["single"] / "model.safetensors").read_bytes()).hexdigest()
    assert [s["sha256"] for s in rep["parent"]["shards"]] == [want]
    cache = json.loads((tmp_path / "cache" / "sha256-cache.json").read_text())   # rewritten, valid
    assert want in cache.values()


def test_hash_thread_failure_is_reported(tmp_path, parents, good, monkeypatch):
    import shrinkit.hashing as pipeline

    def boom(p):
        raise OSError(5, "Input/output error", str(p))
    monkeypatch.setattr(pipeline, "sha256_file", boom)
    out = tmp_path / "out"
    assert_failed(cli("subclone", parents["single"], "-r", good, "-o", out, "-q"), 1, out, "input/output error")


# ---------------------------------------------------------------------------- verify checks its pair (exit 2)

@pytest.fixture(scope="module")
def children(parents, tmp_path_factory):
    """A real child of the llama parent (identity recipe), and children that are not."""
    import transformers
    from helpers import recipe
    from shrinkit.pipeline import subclone

    root = tmp_path_factory.mktemp("children")
    subclone(parents["single"], recipe(target={"hidden_size": 48}, stages=[{"rank_neurons": {"method": "first"}},
                                                                          {"slice_embeddings": {}}]),
             root / "good")
    other_vocab = _llama(root / "vocab-parent")
    edit = json.loads((other_vocab / "config.json").read_text())
    cfg = transformers.LlamaConfig(**{**{k: edit[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                              "num_key_value_heads", "head_dim", "num_hidden_layers")},
                                      "vocab_size": 128})
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "vocab")
    return {"good": root / "good", "vocab": root / "vocab"}


def verify(parent, child):
    return cli("verify", parent, child, "--data", "random_tokens", "--samples", "2", "--seq-len", "8")


def test_verify_good_pair(parents, children):
    rc, out, err = verify(parents["single"], children["good"])
    assert rc == 0, err
    assert "child" in out


def test_verify_refuses_another_family(parents, children):
    assert_failed(verify(parents["single"], parents["gpt2"]), 2, None, "gpt2", "llama")
    assert_failed(verify(parents["gpt2"], children["good"]), 2, None, "llama", "gpt2")


def test_verify_refuses_another_vocabulary(parents, children):
    assert_failed(verify(parents["single"], children["vocab"]), 2, None, "vocabulary", "128")


def test_verify_refuses_a_larger_child(parents, children):
    assert_failed(verify(children["good"], parents["single"]), 2, None, "hidden_size", "larger")


def test_verify_refuses_another_tokenizer(tmp_path, parents, children, copy_parent):
    p = copy_parent()
    c = tmp_path / "child"
    shutil.copytree(children["good"], c)
    (p / "vocab.json").write_text('{"a": 0}')
    (c / "vocab.json").write_text('{"b": 0}')
    assert_failed(verify(p, c), 2, None, "tokenizer", "vocab.json")


def test_verify_refuses_a_pickle_child(tmp_path, parents, children, no_pickle_reads):
    c = tmp_path / "child"
    shutil.copytree(children["good"], c)
    (c / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, c / "pytorch_model.bin")
    opened = no_pickle_reads()
    assert_failed(verify(parents["single"], c), 2, None, "pytorch_model.bin", "never unpickles")
    assert opened == []


def test_verify_refuses_a_broken_child(tmp_path, parents, children):
    c = tmp_path / "child"
    shutil.copytree(children["good"], c)
    edit_config(c, hidden_size=64)
    assert_failed(verify(parents["single"], c), 2, None, "child", "axis")
    shutil.rmtree(c)
    assert_failed(verify(parents["single"], c), 2, None, "child")


def test_parent_config_transformers_rejects_is_the_parents_fault(tmp_path, copy_parent, good):
    """A config key shrinkit does not read but transformers rejects: where transformers' check
    runs (plan; subclone with calibration or verification), the parent is blamed (exit 3), not
    the recipe."""
    p = edit_config(copy_parent(), rms_norm_eps="x")
    assert_failed(cli("plan", p, "-r", good), 3, None, "parent's config", "rms_norm_eps")
