"""Reliability, round 2: a child is current only if it is intact; the Hub cache stays closed;
image processor configs, MoE routing fields, recipe numbers, calibration text and the Python
API's arguments are checked; `plan` refuses the calibration data `subclone` refuses (one
checker); `--json` prints one object on every error; every report is strict JSON."""

from __future__ import annotations

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
from test_hub import COMMIT, HALF as HUB_HALF, cache, model_files, put_snapshot  # noqa: F401 (fixtures)

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_hidden_layers=4, max_position_embeddings=64, tie_word_embeddings=False)
HALF = dict(target=dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                        num_hidden_layers=2),
            stages=[{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"strategy": "middle"}},
                    {"slice_embeddings": {}}, {"rescale_norms": {}}])


def _raise(c):
    raise ValueError(f"not strict JSON: {c}")


def strict(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity."""
    return json.loads(text, parse_constant=_raise)


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(r, code):
    assert r.exit_code == code, (r.exit_code, r.output)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert "internal error" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    import transformers

    path = tmp_path_factory.mktemp("rel") / "tiny-llama"
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY))
    planted._randomize(m, torch.Generator().manual_seed(0))
    m.save_pretrained(path)
    return path


@pytest.fixture
def parent(llama, tmp_path) -> Path:
    p = tmp_path / "tiny-llama"
    shutil.copytree(llama, p)
    return p


# ---------------------------------------------------------------------------- 1. intact or not current

def test_report_records_every_child_file_as_written(tmp_path, parent):
    res = shrinkit.subclone(parent, {**HALF, "output": {"max_shard_size": "40KB"}}, out=tmp_path / "c", verify=False)
    files = res.report["files"]
    on_disk = sorted(p.name for p in (tmp_path / "c").iterdir()
                     if p.name not in ("shrinkit_report.json", "shrinkit_report.md", "README.md"))
    assert sorted(files) == on_disk and "config.json" in files and "model.safetensors.index.json" in files
    assert sum(n.endswith(".safetensors") for n in files) >= 2
    for name, rec in files.items():
        data = (tmp_path / "c" / name).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert strict((tmp_path / "c" / "shrinkit_report.json").read_text())["files"] == files


def _damage(out: Path, how: str) -> None:
    w = out / "model.safetensors"
    if how == "deleted":
        w.unlink()
    elif how == "nan":   # the same size, weights overwritten with NaN bytes
        raw = bytearray(w.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        raw[8 + n:] = b"\xff\xff\xff\x7f" * ((len(raw) - 8 - n) // 4)
        w.write_bytes(bytes(raw))
    elif how == "truncated":
        w.write_bytes(w.read_bytes()[:-4])
    elif how == "config":
        cfg = json.loads((out / "config.json").read_text())
        cfg["num_hidden_layers"] = 1
        (out / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("how", ["deleted", "nan", "truncated", "config"])
def test_skip_if_current_never_skips_a_broken_child(tmp_path, parent, write_recipe, how):
    out, rec = tmp_path / "child", write_recipe(HALF)
    first = cli("subclone", parent, "-r", rec, "-o", out, "--no-verify", "-q", "--json")
    assert first.exit_code == 0, first.output
    _damage(out, how)
    before = sorted(p.name for p in out.iterdir())
    r = cli("subclone", parent, "-r", rec, "-o", out, "--no-verify", "-q", "--skip-if-current", "--json")
    line = one_line(r, 2)
    assert "not intact" in line and "--force" in line, line
    j = strict(r.stdout)
    assert j["exit"] == 2 and j["kind"] == "usage" and "not intact" in j["error"] and "skipped" not in j
    assert sorted(p.name for p in out.iterdir()) == before        # refused: left as it was
    r = cli("subclone", parent, "-r", rec, "-o", out, "--no-verify", "-q", "--skip-if-current", "--force", "--json")
    assert r.exit_code == 0, r.output
    assert strict(r.stdout)["skipped"] is False                    # rebuilt
    assert shrinkit.current_report(out, parent, rec) is not None
    r = cli("subclone", parent, "-r", rec, "-o", out, "--no-verify", "-q", "--skip-if-current", "--json")
    assert r.exit_code == 0 and strict(r.stdout)["skipped"] is True   # control: an intact child is skipped


@pytest.mark.parametrize("edit", ["child", "parent", "files", "truncated", "nan", "list", "deep"])
def test_malformed_report_is_not_current(tmp_path, parent, write_recipe, edit):
    out, rec = tmp_path / "child", write_recipe(HALF)
    assert cli("subclone", parent, "-r", rec, "-o", out, "--no-verify", "-q").exit_code == 0
    rp = out / "shrinkit_report.json"
    rep = json.loads(rp.read_text())
    text = {"child": lambda: json.dumps({**rep, "child": "small"}),
            "parent": lambda: json.dumps({**rep, "parent": 5}),
            "files": lambda: json.dumps({**rep, "files": {"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}}),
            "truncated": lambda: rp.read_text()[:200],
            "nan": lambda: json.dumps({**rep, "seconds": float("nan")}),
            "list": lambda: "[]",
            "deep": lambda: "[" * 100000}[edit]()
    rp.write_text(text)
    assert shrinkit.current_report(out, parent, rec) is None
    r = cli("subclone", parent, "-r", rec, "-o", out, "--no-verify", "-q", "--skip-if-current", "--json")
    one_line(r, 2)                                                  # not current, and the folder is not empty
    assert strict(r.stdout)["exit"] == 2
    r = cli("subclone", parent, "-r", rec, "-o", out, "--no-verify", "-q", "--skip-if-current", "--force")
    assert r.exit_code in (0, 2), r.output                          # rebuilt, or refused as not a shrinkit child
    if r.exit_code == 2:
        one_line(r, 2)
    else:
        assert r.stdout.startswith("wrote ")


# ---------------------------------------------------------------------------- 2. the Hub cache stays closed

def _outside_model(tmp_path, model_files) -> Path:
    o = tmp_path / "outside_model"
    shutil.copytree(model_files, o)
    return o


def test_ref_that_is_a_path_is_refused(tmp_path, cache, model_files):
    _outside_model(tmp_path, model_files)
    (cache / "models--org--tiny" / "refs" / "main").write_text("../../../outside_model")   # = tmp_path / outside_model
    for args in (("inspect", "org/tiny"), ("plan", "org/tiny", "-r", tmp_path / "r.yaml")):
        (tmp_path / "r.yaml").write_text(json.dumps(HUB_HALF))
        r = cli(*args, "--json")
        line = one_line(r, 3)
        assert "commit hash" in line and strict(r.stdout)["kind"] == "parent"
    r = cli("subclone", "org/tiny", "-r", tmp_path / "r.yaml", "-o", tmp_path / "c", "--no-verify")
    one_line(r, 3)
    assert not (tmp_path / "c").exists()
    # a ref holding a commit hash whose snapshot is a link out of the cache
    (cache / "models--org--tiny" / "refs" / "main").write_text(COMMIT.replace("0", "f"))
    (cache / "models--org--tiny" / "snapshots" / COMMIT.replace("0", "f")).symlink_to(tmp_path / "outside_model")
    with pytest.raises(ParentError, match="leads outside"):
        shrinkit.inspect("org/tiny")


@pytest.mark.parametrize("rev", ["../../../../outside_model", "..", "a/../../b", "refs/../x", "main\\..", "x/y"])
def test_revision_with_a_path_is_refused(tmp_path, cache, model_files, rev):
    _outside_model(tmp_path, model_files)
    with pytest.raises(UsageError, match="not a branch, tag or commit"):
        shrinkit.inspect("org/tiny", revision=rev)
    r = cli("inspect", "org/tiny", "--revision", rev, "--json")
    one_line(r, 2)
    assert strict(r.stdout)["exit"] == 2
    assert shrinkit.inspect("org/tiny", revision="main")["model"]["revision"] == COMMIT   # control


def test_snapshot_file_linking_outside_its_blobs_is_refused(tmp_path, cache, model_files):
    snap = cache / "models--org--tiny" / "snapshots" / COMMIT
    outside = _outside_model(tmp_path, model_files)
    shard = sorted(json.loads((snap / "model.safetensors.index.json").read_text())["weight_map"].values())[0]
    for name in ("config.json", shard):
        link = snap / name
        keep = os.readlink(link)
        link.unlink()
        link.symlink_to(outside / name)
        with pytest.raises(ParentError, match="outside the repository's blobs"):
            shrinkit.inspect("org/tiny")
        link.unlink()
        link.symlink_to(keep)
    assert shrinkit.inspect("org/tiny")["model"]["repo_id"] == "org/tiny"   # control
    # another repository's blob is outside this repository's blobs too
    other = put_snapshot(cache, "org/other", COMMIT, {"config.json": (model_files / "config.json").read_bytes()})
    link = snap / "config.json"
    link.unlink()
    link.symlink_to(os.path.realpath(other / "config.json"))
    with pytest.raises(ParentError, match="outside the repository's blobs"):
        shrinkit.inspect("org/tiny")


def test_lone_safetensors_follows_the_shard_link_rule(tmp_path, llama, write_recipe):
    """A folder whose only weight file is a link out of it is refused like an indexed shard."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(llama / "model.safetensors", outside / "model.safetensors")
    p = tmp_path / "parent"
    p.mkdir()
    shutil.copy(llama / "config.json", p / "config.json")
    (p / "model.safetensors").symlink_to(outside / "model.safetensors")
    for args in (("inspect", p), ("plan", p, "-r", write_recipe(HALF)),
                 ("subclone", p, "-r", write_recipe(HALF), "-o", tmp_path / "c", "--no-verify")):
        line = one_line(cli(*args), 3)
        assert "outside the parent folder" in line, line
    assert not (tmp_path / "c").exists()
    (p / "model.safetensors").unlink()     # control: a link inside the folder is fine
    shutil.copy(llama / "model.safetensors", p / "weights.bin.safetensors.real")
    (p / "model.safetensors").symlink_to("weights.bin.safetensors.real")
    assert cli("inspect", p).exit_code == 0


# ---------------------------------------------------------------------------- 3. what was still trusted

PRE = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
       "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    return planted.vit(tmp_path_factory.mktemp("vit") / "parent").path


def _vit_copy(vit, tmp_path, pre: dict) -> Path:
    p = tmp_path / "vit"
    shutil.copytree(vit, p)
    (p / "preprocessor_config.json").write_text(json.dumps(pre))
    return p


def _vit_recipe(write_recipe, data="builtin"):
    return write_recipe({"target": {"intermediate_size": 96},
                         "stages": [{"rank_neurons": {"method": "activation",
                                                      "calibration": {"data": data, "samples": 4}}},
                                    {"slice_embeddings": {}}]})


@pytest.mark.parametrize("change,code,needle", [
    ({"size": {"height": 0, "width": 0}}, 3, "field size: height"),
    ({"size": 0}, 3, "field size"),
    ({"image_mean": "abc"}, 3, "field image_mean"),
    ({"image_std": [0.5, 0.0, 0.5]}, 3, "image_std must be positive"),
    ({"image_mean": [0.5, 0.5]}, 3, "1 or 3"),
    ({"do_resize": "no"}, 3, "field do_resize"),
    ({"rescale_factor": -1}, 3, "field rescale_factor"),
    ({"crop_size": {"height": 32}}, 3, "field crop_size"),
    ({"size": None}, 3, "size is null while do_resize"),
    ({"image_std": None}, 3, "image_std is null while do_normalize"),
    ({"do_center_crop": True}, 3, "crop_size is missing"),
    ({"do_center_crop": True, "crop_size": {"shortest_edge": 20}}, 3, "field crop_size"),
    ({"size": {"longest_edge": 40}}, 3, "field size"),
    ({"image_processor_type": 5}, 3, "field image_processor_type"),
])
def test_image_processor_config_by_schema(tmp_path, vit, write_recipe, change, code, needle):
    p = _vit_copy(vit, tmp_path, {**PRE, **change})
    rec = _vit_recipe(write_recipe)
    for args in (("plan", p, "-r", rec), ("subclone", p, "-r", rec, "-o", tmp_path / "c", "--no-verify", "-q")):
        r = cli(*args, "--json")
        line = one_line(r, code)
        assert "preprocessor_config.json" in line and needle in line, line
        assert strict(r.stdout) == {"error": line.removeprefix("error: "), "exit": code, "kind": "parent"}
    assert not (tmp_path / "c").exists()


def test_image_processor_control_and_mixed_sizes_without_resize(tmp_path, vit, write_recipe):
    from PIL import Image

    p = _vit_copy(vit, tmp_path, PRE)
    assert cli("plan", p, "-r", _vit_recipe(write_recipe)).exit_code == 0     # control: the valid config
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, size in enumerate([(40, 30), (50, 50), (40, 30)]):
        Image.new("RGB", size, (20 * i, 40, 90)).save(imgs / f"i{i}.png")
    rec = _vit_recipe(write_recipe, str(imgs))
    assert cli("plan", p, "-r", rec).exit_code == 0                           # resized: mixed sizes are fine
    (p / "preprocessor_config.json").write_text(json.dumps({**PRE, "do_resize": False}))
    for args in (("plan", p, "-r", rec), ("subclone", p, "-r", rec, "-o", tmp_path / "c", "--no-verify", "-q")):
        line = one_line(cli(*args), 2)
        assert "differ in size" in line and "do_resize: false" in line, line
    assert not (tmp_path / "c").exists()


def _moe(tmp_path, model_type: str, **cfg_changes) -> Path:
    from test_moe import real_parent

    p = real_parent(tmp_path / model_type, model_type)
    cfg = json.loads((p / "config.json").read_text())
    cfg.update(cfg_changes)
    (p / "config.json").write_text(json.dumps(cfg))
    return p


@pytest.mark.parametrize("model_type,change,needle", [
    ("mixtral", {"num_experts_per_tok": 7}, "num_experts_per_tok is 7, more than the 6 experts"),
    ("qwen2_moe", {"num_experts_per_tok": 9}, "num_experts_per_tok is 9"),
    ("qwen3_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ("qwen2_moe", {"mlp_only_layers": [7]}, "mlp_only_layers"),
    ("qwen3_moe", {"mlp_only_layers": "all"}, "mlp_only_layers"),
    ("qwen3_moe", {"norm_topk_prob": "yes"}, "norm_topk_prob"),
    ("mixtral", {"num_experts_per_tok": None}, "num_experts_per_tok is missing or null"),
    ("qwen2_moe", {"num_experts": None}, "num_experts is missing or null"),
    ("qwen2_moe", {"decoder_sparse_step": None}, "decoder_sparse_step"),
    ("qwen3_moe", {"norm_topk_prob": None}, "norm_topk_prob"),
    ("qwen2_moe", {"mlp_only_layers": []}, "layer 1 holds no expert tensors"),     # the parent's layer 1 is dense
    ("qwen3_moe", {"decoder_sparse_step": 1}, "layer 0 holds no expert tensors"),  # its layers 0 and 2 are dense
    ("qwen2_moe", {"mlp_only_layers": [0, 1]}, "layer 0 holds expert tensors"),
])
def test_moe_routing_fields_checked_with_the_parent(tmp_path, write_recipe, model_type, change, needle):
    p = _moe(tmp_path, model_type, **change)
    rec = write_recipe({"target": {"num_experts": 4},
                        "stages": [{"rank_neurons": {"method": "magnitude"}}, {"slice_embeddings": {}}]})
    for args in (("inspect", p), ("plan", p, "-r", rec),
                 ("subclone", p, "-r", rec, "-o", tmp_path / "c", "--no-verify", "-q")):
        r = cli(*args, "--json")
        line = one_line(r, 3)
        assert needle in line and "config.json" in line, line
        assert strict(r.stdout)["kind"] == "parent"
    assert not (tmp_path / "c").exists()


def test_moe_routing_control(tmp_path, write_recipe):
    p = _moe(tmp_path, "qwen2_moe", num_experts_per_tok=6, norm_topk_prob=True)
    assert cli("inspect", p).exit_code == 0
    # the same layout said the other way: dense layers 0 and 2 by list instead of by step
    p = _moe(tmp_path / "b", "qwen3_moe", mlp_only_layers=[0, 2], decoder_sparse_step=1)
    assert cli("inspect", p).exit_code == 0


@pytest.mark.parametrize("stage,field", [({"heal": {"alpha": ".inf"}}, "alpha"), ({"heal": {"alpha": ".nan"}}, "alpha"),
                                         ({"rescale_norms": {"factor": "-.inf"}}, "factor")])
def test_recipe_numbers_are_finite(tmp_path, parent, write_recipe, stage, field):
    (name, body), = stage.items()
    (k, v), = body.items()
    text = (f"target: {{num_hidden_layers: 2}}\nstages:\n  - rank_neurons: {{method: magnitude}}\n"
            f"  - drop_layers: {{strategy: middle}}\n  - {name}: {{{k}: {v}}}\n  - slice_embeddings: {{}}\n")
    if name == "rescale_norms":
        text = text.replace(f"  - {name}: {{{k}: {v}}}\n  - slice_embeddings: {{}}\n",
                            f"  - slice_embeddings: {{}}\n  - {name}: {{{k}: {v}}}\n")
    rec = write_recipe(text)
    for args in (("plan", parent, "-r", rec), ("subclone", parent, "-r", rec, "-o", tmp_path / "c", "--no-verify")):
        line = one_line(cli(*args), 2)
        assert field in line and "finite" in line, line
    assert not (tmp_path / "c").exists()
    from shrinkit.recipe import Recipe
    finite_everywhere = [f for m in Recipe.__mro__ if hasattr(m, "model_config") for f in [m.model_config]]
    assert finite_everywhere[0].get("allow_inf_nan") is False


def test_every_report_is_strict_json(tmp_path, parent, write_recipe):
    """Reports (file and --json) hold no NaN or Infinity, even when the numbers are: a parent with a
    NaN weight gives NaN verification numbers, which the report holds as null."""
    cases = {
        "data_free": HALF,
        "healed": {"target": {"num_hidden_layers": 2},
                   "stages": [{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"strategy": "middle"}},
                              {"heal": {"calibration": {"data": "random_tokens", "samples": 2, "seq_len": 8}}},
                              {"slice_embeddings": {}}]},
    }
    for name, rec in cases.items():
        r = cli("subclone", parent, "-r", write_recipe(rec), "-o", tmp_path / name, "--json", "-q")
        assert r.exit_code == 0, (name, r.output)
        strict(r.stdout)
        strict((tmp_path / name / "shrinkit_report.json").read_text())
    for cmd in (("inspect", parent), ("plan", parent, "-r", write_recipe(HALF))):
        strict(cli(*cmd, "--json").stdout)
    # verified, with NaN numbers: one NaN weight in the parent
    from safetensors.torch import load_file, save_file
    w = load_file(parent / "model.safetensors")
    w["model.norm.weight"][0] = float("nan")
    save_file(w, parent / "model.safetensors", metadata={"format": "pt"})
    rec = write_recipe({"target": {}, "stages": [{"slice_embeddings": {}}],
                        "verify": {"data": "random_tokens", "samples": 2, "seq_len": 8}})
    r = cli("subclone", parent, "-r", rec, "-o", tmp_path / "nan", "--json", "-q")
    raw = (tmp_path / "nan" / "shrinkit_report.json").read_text()
    rep = strict(raw)
    strict(r.stdout)
    assert rep["verify"]["child"]["kl"] is None or rep["verify"].get("status") == "error", rep["verify"]
    with pytest.raises(ValueError):   # negative control: the checker refuses what json.dumps writes by default
        strict(json.dumps({"x": float("nan")}))
    r = cli("verify", parent, tmp_path / "nan", "--data", "random_tokens", "--samples", "2", "--seq-len", "8", "--json")
    strict(r.stdout)


@pytest.fixture
def text_parent(parent) -> Path:
    """The tiny Llama with a word-level tokenizer of its 96 tokens."""
    from test_default_run import planted_tokenizer

    tok = planted_tokenizer(parent.parent)
    for f in tok.iterdir():
        shutil.copy(f, parent / f.name)
    return parent


WORDS = " ".join(f"w{i % 90}" for i in range(400))
DATA = {   # calibration files subclone refuses: (file name, bytes, what the one line says)
    "null_first": ("d.jsonl", b"null\n", "d.jsonl:1"),
    "null_later": ("d.jsonl", json.dumps({"text": WORDS}).encode() + b"\nnull\n", "d.jsonl:2"),
    "list_row": ("d.jsonl", b'["w1 w2"]\n', "d.jsonl:1"),
    "not_json": ("d.jsonl", b'{"text": "w1 w2"\n', "not a JSON object"),
    "text_number": ("d.jsonl", b'{"text": 5}\n', "field text"),
    "utf8_txt": ("d.txt", b"w1 w2 \xff\xfe w3", "not UTF-8"),
    "utf8_jsonl": ("d.jsonl", b'{"text": "w1 \xff"}\n', "not UTF-8"),
    "all_empty": ("d.jsonl", b'{"text": ""}\n{"text": "   "}\n\n{"text": "\\n"}\n', "holds no text"),
}


def _act_recipe(write_recipe, data):
    return write_recipe({"target": {"intermediate_size": 48},
                         "stages": [{"rank_neurons": {"method": "activation",
                                                      "calibration": {"data": str(data), "samples": 2, "seq_len": 8}}},
                                    {"slice_embeddings": {}}]})


@pytest.mark.parametrize("case", sorted(DATA))
def test_plan_refuses_the_data_subclone_refuses(tmp_path, text_parent, write_recipe, case):
    name, raw, needle = DATA[case]
    data = tmp_path / name
    data.write_bytes(raw)
    rec = _act_recipe(write_recipe, data)
    lines = []
    for args in (("plan", text_parent, "-r", rec), ("subclone", text_parent, "-r", rec, "-o", tmp_path / "c")):
        line = one_line(cli(*args), 2)
        assert needle in line and name in line, line
        lines.append(line)
    assert lines[0] == lines[1]           # the same checker, the same words
    assert not (tmp_path / "c").exists()


def test_plan_refuses_text_without_a_tokenizer(tmp_path, parent, write_recipe):
    data = tmp_path / "d.txt"
    data.write_text(WORDS)
    rec = _act_recipe(write_recipe, data)
    lines = [one_line(cli(*args), 2) for args in (("plan", parent, "-r", rec),
                                                  ("subclone", parent, "-r", rec, "-o", tmp_path / "c"))]
    assert lines[0] == lines[1] and "no tokenizer" in lines[0]
    tok = __import__("test_default_run").planted_tokenizer(tmp_path)
    assert cli("plan", parent, "-r", rec, "--tokenizer", tok).exit_code == 0     # control: --tokenizer given


def test_plan_accepts_good_data(tmp_path, text_parent, write_recipe):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": WORDS}) for _ in range(3)) + "\n")
    r = cli("plan", text_parent, "-r", _act_recipe(write_recipe, data))
    assert r.exit_code == 0, r.output


def test_api_checks_argument_types(tmp_path, parent):
    bad = [dict(device=5), dict(force="yes"), dict(verify=1), dict(out=3.5), dict(revision=7), dict(tokenizer=["x"]),
           dict(config=0), dict(skip_if_current=None), dict(progress=object())]
    for kw in bad:
        with pytest.raises(UsageError) as e:
            shrinkit.subclone(parent, HALF, out=tmp_path / "c", **kw) if "out" not in kw else \
                shrinkit.subclone(parent, HALF, **kw)
        assert (next(iter(kw)) + " must be") in str(e.value) and e.value.exit_code == 2, str(e.value)
    with pytest.raises(UsageError, match="parent must be"):
        shrinkit.inspect(5)
    with pytest.raises(UsageError, match="samples must be"):
        shrinkit.verify(parent, tmp_path, samples="2")
    with pytest.raises(UsageError, match="gate max_kl must be a finite number"):
        shrinkit.verify(parent, tmp_path, gate={"max_kl": float("inf")})
    with pytest.raises(UsageError, match="revision must be"):
        shrinkit.plan(parent, HALF, revision=b"main")
    assert not (tmp_path / "c").exists()
    assert shrinkit.subclone(parent, HALF, out=tmp_path / "c", device="cpu", verify=False).out == tmp_path / "c"


# ---------------------------------------------------------------------------- 5. --json on every exit path

def test_json_error_object_for_every_command(tmp_path, parent, write_recipe):
    rec = write_recipe(HALF)
    bad_cfg = tmp_path / "bad"
    shutil.copytree(parent, bad_cfg)
    (bad_cfg / "config.json").write_text("{not json")
    shrinkit.subclone(parent, HALF, out=tmp_path / "child", verify=False)
    cases = [
        (("subclone", parent, "-r", tmp_path / "missing.yaml", "-o", tmp_path / "o"), 2, "recipe"),
        (("subclone", tmp_path / "nowhere", "-r", rec, "-o", tmp_path / "o"), 2, "usage"),
        (("subclone", bad_cfg, "-r", rec, "-o", tmp_path / "o"), 3, "parent"),
        (("subclone", parent, "-r", rec, "-o", tmp_path / "child"), 2, "usage"),    # exists, no --force
        (("plan", bad_cfg, "-r", rec), 3, "parent"),
        (("plan", parent, "-r", write_recipe({"target": {"hidden_size": 10**6}})), 2, "recipe"),
        (("inspect", bad_cfg), 3, "parent"),
        (("inspect", tmp_path / "nowhere"), 2, "usage"),
        (("verify", parent, tmp_path / "nowhere"), 2, "usage"),
        (("verify", bad_cfg, tmp_path / "child", "--data", "random_tokens"), 3, "parent"),
    ]
    for args, code, kind in cases:
        r = cli(*args, "--json")
        line = one_line(r, code)
        j = strict(r.stdout)            # the whole of stdout is one JSON object
        assert j == {"error": line.removeprefix("error: "), "exit": code, "kind": kind}, (args, j)
        r = cli(*args)                  # without --json: nothing on stdout
        assert r.exit_code == code and r.stdout == "", (args, r.stdout)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [("subclone", "PARENT"), ("plan", "PARENT"), ("inspect",),
                                  ("verify", "PARENT"), ("inspect", "PARENT", "--revision"),
                                  ("subclone", "PARENT", "-r", "R", "--device")])
def test_json_error_object_for_command_line_errors(parent, args):
    """A missing argument or option value (click's own errors, exit 2) still gives the object."""
    argv = [str(parent) if a == "PARENT" else a for a in args]
    r = cli(*argv[:1], "--json", *argv[1:])
    assert r.exit_code == 2, r.output
    j = strict(r.stdout)
    assert j["exit"] == 2 and j["kind"] == "usage" and j["error"], j
    assert cli(*argv).stdout == ""
