"""Checkpoint I/O end to end: sharded parents and children, exact identity cuts, determinism,
single-file parents, dtype conversion, the files written beside the weights, and that every
family's child loads with transformers after a real (width and depth) cut."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import planted
from helpers import load, run, tokens
from shrinkit.cli import app

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_hidden_layers=4, max_position_embeddings=64)
CUT = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3)


def stages(method="magnitude", drop=None, rescale=True, strategy=None):
    d = {"drop": list(drop)} if drop is not None else ({"strategy": strategy} if strategy else {})
    s = [{"rank_neurons": {"method": method}}, {"drop_layers": d}, {"slice_embeddings": {}}]
    if rescale:
        s.append({"rescale_norms": {}})
    return s


IDENTITY = [{"rank_neurons": {"method": "magnitude"}}, {"slice_embeddings": {}}]


def llama_parent(path: Path, model_type="llama", *, dtype=torch.float32, tie=False, seed=0, save_kw=None, **over):
    """A tiny random Llama-family parent with real weight spread."""
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, **{**TINY, "tie_word_embeddings": tie, **over})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    planted._randomize(model, torch.Generator().manual_seed(seed))
    model.to(dtype).save_pretrained(path, **(save_kw or {}))
    return Path(path)


def st_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in st_files(folder):
        out.update(load_file(str(f)))
    return out


def data_bytes(f: Path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus the 8-byte length and header)."""
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
    return f.stat().st_size - 8 - n


def sha256(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@torch.no_grad()
def forward_ok(path, cls="AutoModelForCausalLM", vocab=96):
    m = load(path, cls)
    out = m(input_ids=tokens(vocab))
    t = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert torch.isfinite(t).all()
    return m, t


# ---------------------------------------------------------------------------- sharding

def test_sharded_parent_to_sharded_child(tmp_path):
    parent = llama_parent(tmp_path / "parent", save_kw={"max_shard_size": "100KB"})
    pshards = st_files(parent)
    assert len(pshards) >= 3, pshards
    out = tmp_path / "child"
    res = run(parent, out, target=CUT, stages=stages(drop=[2]), output={"max_shard_size": "40KB"})

    shards = st_files(out)
    n = len(shards)
    assert n >= 3, shards
    assert not (out / "model.safetensors").exists()
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    wm = idx["weight_map"]
    seen, total = {}, 0
    for s in shards:
        with safe_open(str(s), "pt") as f:
            keys = list(f.keys())
            for k in keys:
                assert k not in seen, f"{k} in two shards"
                seen[k] = s.name
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
        # size cap holds, except for a shard that holds a single oversized tensor
        assert data_bytes(s) <= 40_000 or len(keys) == 1, (s.name, data_bytes(s))
    assert wm == seen
    assert idx["metadata"]["total_size"] == total == sum(data_bytes(s) for s in shards)
    assert res.report["child"]["bytes"] == total
    stage = [s for s in res.report["stages"] if s["stage"] == "slice_embeddings"][0]
    assert stage["shards"] == [s.name for s in shards]
    # the parent's shards are all hashed in the report
    assert {s["file"]: s["sha256"] for s in res.report["parent"]["shards"]} == {p.name: sha256(p) for p in pshards}
    m, _ = forward_ok(out)
    assert m.config.hidden_size == 48 and m.config.num_hidden_layers == 3


def test_one_shard_child_has_no_index(tmp_path):
    parent = llama_parent(tmp_path / "parent", save_kw={"max_shard_size": "100KB"})
    out = tmp_path / "child"
    run(parent, out, target=CUT, stages=stages(drop=[2]))
    assert [p.name for p in st_files(out)] == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    forward_ok(out)


@pytest.mark.parametrize("size", ["40000", 40000, "40 kB", "39.07KiB"])
def test_max_shard_size_spellings(tmp_path, size):
    """A plain byte count is a size too, as a YAML string or a YAML number (parse_size takes both)."""
    parent = llama_parent(tmp_path / "parent")
    out = tmp_path / "child"
    run(parent, out, target=CUT, stages=stages(drop=[2]), output={"max_shard_size": size})
    shards = st_files(out)
    assert len(shards) >= 3
    for s in shards:
        with safe_open(str(s), "pt") as f:
            assert data_bytes(s) <= 40_000 or len(list(f.keys())) == 1


# ---------------------------------------------------------------------------- identity

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tie", [False, True])
def test_identity_is_exact(tmp_path, dtype, tie):
    parent = llama_parent(tmp_path / "parent", dtype=dtype, tie=tie)
    out = tmp_path / "child"
    res = run(parent, out, target={}, stages=IDENTITY)
    p, c = read_all(parent), read_all(out)
    expect = {k for k in p if not (tie and k == "lm_head.weight")}
    assert set(c) == expect
    if tie:
        assert "lm_head.weight" not in c
    for k in expect:
        assert c[k].dtype == p[k].dtype == dtype, k
        assert torch.equal(c[k], p[k]), k
    cfg = json.loads((out / "config.json").read_text())
    pcfg = json.loads((parent / "config.json").read_text())
    assert cfg == pcfg, "an identity cut must not change the config"
    m, _ = forward_ok(out)
    assert res.report["child"]["params"] == sum(x.numel() for x in m.parameters())
    if tie:
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_identity_with_default_rescale_is_exact(tmp_path):
    """rescale_norms with the default factor sqrt(64/64) = 1 changes nothing."""
    parent = llama_parent(tmp_path / "parent", dtype=torch.bfloat16)
    run(parent, tmp_path / "child", target={}, stages=stages(strategy="middle"))
    p, c = read_all(parent), read_all(tmp_path / "child")
    assert set(p) == set(c)
    for k in p:
        assert c[k].dtype == p[k].dtype and torch.equal(c[k], p[k]), k


def test_tied_parent_that_stores_lm_head(tmp_path):
    """Some tied checkpoints store lm_head.weight anyway: the child still writes the embedding once."""
    parent = llama_parent(tmp_path / "parent", tie=True)
    sd = load_file(str(parent / "model.safetensors"))
    assert "lm_head.weight" not in sd
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(parent / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "child"
    run(parent, out, target=CUT, stages=stages(drop=[2]))
    c = read_all(out)
    assert "lm_head.weight" not in c
    assert c["model.embed_tokens.weight"].shape == (96, 48)
    forward_ok(out)


# ---------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_runs_are_byte_identical(tmp_path, method):
    parent = llama_parent(tmp_path / "parent")
    target = dict(CUT, num_attention_heads=2, num_key_value_heads=1)
    for name in ("a", "b"):
        run(parent, tmp_path / name, target=target, stages=stages(method=method, drop=[1]), seed=7,
            output={"max_shard_size": "60KB"})
    a, b = st_files(tmp_path / "a"), st_files(tmp_path / "b")
    assert len(a) > 1 and [x.name for x in a] == [x.name for x in b]
    for x, y in zip(a, b):
        assert sha256(x) == sha256(y), x.name
    for fn in ("config.json", "model.safetensors.index.json"):
        assert (tmp_path / "a" / fn).read_bytes() == (tmp_path / "b" / fn).read_bytes()
    ra = json.loads((tmp_path / "a" / "shrinkit_report.json").read_text())
    rb = json.loads((tmp_path / "b" / "shrinkit_report.json").read_text())
    assert ra["kept"] == rb["kept"]


# ---------------------------------------------------------------------------- single file

def test_single_file_parent_with_config_beside(tmp_path):
    parent = llama_parent(tmp_path / "parent")
    f = parent / "model.safetensors"
    out = tmp_path / "child"
    res = run(f, out, target=CUT, stages=stages(drop=[2]))
    assert res.report["parent"]["path"] == str(f)
    assert [s["file"] for s in res.report["parent"]["shards"]] == ["model.safetensors"]
    assert res.report["parent"]["shards"][0]["sha256"] == sha256(f)
    forward_ok(out)


def test_single_file_parent_with_config_elsewhere(tmp_path):
    from shrinkit.pipeline import subclone
    from helpers import recipe

    src = llama_parent(tmp_path / "src")
    wdir, cdir = tmp_path / "weights", tmp_path / "cfg"
    wdir.mkdir()
    cdir.mkdir()
    f = wdir / "tiny.safetensors"
    shutil.copyfile(src / "model.safetensors", f)
    shutil.copyfile(src / "config.json", cdir / "config.json")
    (cdir / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')

    # via the pipeline's config= argument
    r = recipe(target=CUT, stages=stages(drop=[2]))
    subclone(f, r, tmp_path / "child_api", config=cdir / "config.json")
    forward_ok(tmp_path / "child_api")
    # tokenizer files beside the config are copied too
    assert (tmp_path / "child_api" / "tokenizer_config.json").read_text() == '{"model_max_length": 64}\n'

    # via the CLI's --config
    rp = tmp_path / "r.yaml"
    import yaml
    rp.write_text(yaml.safe_dump(dict(target=CUT, stages=stages(drop=[2]))))
    res = CliRunner().invoke(app, ["subclone", str(f), "-r", str(rp), "-o", str(tmp_path / "child_cli"), "-q", "--no-verify",
                                   "--config", str(cdir / "config.json")])
    assert res.exit_code == 0, res.output
    forward_ok(tmp_path / "child_cli")
    for x, y in zip(st_files(tmp_path / "child_api"), st_files(tmp_path / "child_cli")):
        assert sha256(x) == sha256(y)


def test_folder_with_one_oddly_named_safetensors(tmp_path):
    parent = llama_parent(tmp_path / "parent")
    (parent / "model.safetensors").rename(parent / "weights.safetensors")
    run(parent, tmp_path / "child", target=CUT, stages=stages(drop=[2]))
    forward_ok(tmp_path / "child")


# ---------------------------------------------------------------------------- dtype

@pytest.mark.parametrize("out_dtype,tdtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_output_dtype_conversion(tmp_path, out_dtype, tdtype):
    parent = llama_parent(tmp_path / "parent")
    out = tmp_path / "child"
    res = run(parent, out, target={}, stages=IDENTITY, output={"dtype": out_dtype})
    p, c = read_all(parent), read_all(out)
    for k, t in c.items():
        assert t.dtype == tdtype, k
        assert torch.equal(t, p[k].to(tdtype)), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == out_dtype
    assert res.report["child"]["dtype"] == out_dtype
    assert res.report["parent"]["dtype"] == "float32"
    assert res.report["child"]["bytes"] == sum(data_bytes(f) for f in st_files(out))
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert m.dtype == tdtype


@pytest.mark.parametrize("keys", [("torch_dtype",), ("dtype", "torch_dtype")])
def test_output_dtype_written_to_every_dtype_key(tmp_path, keys):
    """Older configs say torch_dtype; some say both. Every dtype key the child config carries must
    name the child's dtype, not the parent's."""
    parent = llama_parent(tmp_path / "parent")
    cfg = json.loads((parent / "config.json").read_text())
    cfg.pop("dtype", None)
    for k in keys:
        cfg[k] = "float32"
    (parent / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "child"
    run(parent, out, target={}, stages=IDENTITY, output={"dtype": "bfloat16"})
    ccfg = json.loads((out / "config.json").read_text())
    for k in keys:
        assert ccfg[k] == "bfloat16", (k, ccfg.get("dtype"), ccfg.get("torch_dtype"))


# ---------------------------------------------------------------------------- side files and report

def test_side_files_model_card_and_report(tmp_path):
    parent = llama_parent(tmp_path / "tiny-parent", save_kw={"max_shard_size": "100KB"})
    tok = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64}
    (parent / "tokenizer_config.json").write_text(json.dumps(tok))
    (parent / "special_tokens_map.json").write_text('{"bos_token": "<s>"}')
    (parent / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 7}')
    (parent / "notes.txt").write_text("not a tokenizer file")
    out = tmp_path / "child"
    res = run(parent, out, target=CUT, stages=stages(drop=[2]))

    for fn in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / fn).read_bytes() == (parent / fn).read_bytes(), fn
    assert not (out / "notes.txt").exists()
    assert {"README.md", "shrinkit_report.json", "shrinkit_report.md", "config.json"} <= {p.name for p in out.iterdir()}

    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    assert "base_model: tiny-parent\n" in card
    assert "tiny-parent" in card.split("---", 2)[2]

    rep = json.loads((out / "shrinkit_report.json").read_text())
    assert rep == json.loads(json.dumps(res.report))
    pshards = st_files(parent)
    assert len(pshards) >= 3
    assert [s["file"] for s in rep["parent"]["shards"]] == [p.name for p in pshards]
    for s in rep["parent"]["shards"]:
        assert s["sha256"] == hashlib.sha256((parent / s["file"]).read_bytes()).hexdigest()
    assert rep["family"] == "llama" and rep["architecture"] == "LlamaForCausalLM"
    assert rep["base_model"] == "tiny-parent"
    assert rep["kept"]["layers"] == [0, 1, 3]
    assert len(rep["kept"]["hidden"]) == 48
    assert [s["stage"] for s in rep["stages"]] == ["rank_neurons", "drop_layers", "slice_embeddings", "rescale_norms"]
    for s in rep["stages"]:
        assert isinstance(s["seconds"], (int, float)) and s["seconds"] >= 0
    assert rep["stages"][0]["method"] == "magnitude"
    assert rep["stages"][3]["factor"] == pytest.approx(math.sqrt(64 / 48))
    assert rep["recipe"]["target"]["hidden_size"] == 48

    # child params and bytes agree with the files; parent params with the parent model
    c = read_all(out)
    assert rep["child"]["params"] == sum(t.numel() for t in c.values() if t.is_floating_point())
    assert rep["child"]["bytes"] == sum(data_bytes(f) for f in st_files(out))
    assert rep["parent"]["bytes"] == sum(data_bytes(f) for f in pshards)
    p = read_all(parent)
    assert rep["parent"]["params"] == sum(t.numel() for t in p.values())
    m, _ = forward_ok(out)
    assert rep["child"]["params"] == sum(x.numel() for x in m.parameters())
    assert rep["child"]["dims"]["hidden_size"] == 48 and rep["parent"]["dims"]["hidden_size"] == 64

    md = (out / "shrinkit_report.md").read_text()
    for s in rep["parent"]["shards"]:
        assert s["sha256"] in md


def test_model_card_uses_hub_name(tmp_path):
    parent = llama_parent(tmp_path / "parent")
    cfg = json.loads((parent / "config.json").read_text())
    cfg["_name_or_path"] = "some-org/tiny-llama"
    (parent / "config.json").write_text(json.dumps(cfg))
    run(parent, tmp_path / "child", target={}, stages=IDENTITY)
    assert "base_model: some-org/tiny-llama\n" in (tmp_path / "child" / "README.md").read_text()


# ---------------------------------------------------------------------------- every family, real cuts

@pytest.mark.parametrize("model_type,over", [
    ("llama", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8)),
    ("qwen2", dict(attention_bias=True)),
    ("qwen3", {}),
    ("mistral", {}),
])
def test_llama_family_real_cut_loads(tmp_path, model_type, over):
    parent = llama_parent(tmp_path / "parent", model_type, **over)
    nq, nkv = over.get("num_attention_heads", 4), over.get("num_key_value_heads", 2)
    target = dict(hidden_size=32, intermediate_size=48, num_attention_heads=nq // 2, num_key_value_heads=nkv // 2,
                  num_hidden_layers=2)
    out = tmp_path / "child"
    run(parent, out, target=target, stages=stages(strategy="middle"))
    m, t = forward_ok(out)
    c = m.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers) == \
        (32, 48, nq // 2, nkv // 2, 2)
    assert c.head_dim == over.get("head_dim", 16)
    assert t.shape[-1] == 96
    if model_type == "qwen2":
        assert m.model.layers[0].self_attn.q_proj.bias.shape == ((nq // 2) * 16,)
    if model_type == "qwen3":
        assert m.model.layers[0].self_attn.q_norm.weight.shape == (16,)


def gpt2_parent(path: Path, n_inner=None, seed=0) -> Path:
    import transformers

    cfg = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=4, n_head=4, n_inner=n_inner)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg)
    planted._randomize(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(path)
    return Path(path)


@pytest.mark.parametrize("n_inner,target_ffn", [(None, None), (None, 96), (192, None)])
def test_gpt2_hidden_cut_loads(tmp_path, n_inner, target_ffn):
    parent = gpt2_parent(tmp_path / "parent", n_inner=n_inner)
    if n_inner is None and target_ffn is None:
        # old GPT-2 checkpoints store the causal-mask buffers; they are never written to the child
        sd = load_file(str(parent / "model.safetensors"))
        for i in range(4):
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        save_file(sd, str(parent / "model.safetensors"), metadata={"format": "pt"})
    target = dict(hidden_size=32, num_hidden_layers=3)
    if target_ffn:
        target["intermediate_size"] = target_ffn
    out = tmp_path / "child"
    res = run(parent, out, target=target, stages=stages(drop=[1]))
    cfg = json.loads((out / "config.json").read_text())
    # n_inner null meant 4 * 64 = 256: the child must say its FFN width explicitly, not 4 * 32
    want_ffn = target_ffn or n_inner or 256
    assert (cfg["n_embd"], cfg["n_head"], cfg["n_layer"], cfg["n_inner"]) == (32, 2, 3, want_ffn)
    assert res.report["child"]["dims"]["num_attention_heads"] == 2
    c = read_all(out)
    assert "lm_head.weight" not in c
    assert c["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    assert c["transformer.h.0.mlp.c_fc.weight"].shape == (32, want_ffn)
    assert not any(k.endswith(".attn.bias") or k.endswith(".attn.masked_bias") for k in c)
    m, _ = forward_ok(out)
    assert res.report["child"]["params"] == sum(x.numel() for x in m.parameters())


def bert_parent(path: Path, mlm: bool, seed=0) -> Path:
    import transformers

    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(cfg) if mlm else transformers.BertModel(cfg)
    planted._randomize(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(path)
    return Path(path)


@pytest.mark.parametrize("mlm", [False, True])
def test_bert_hidden_cut_loads(tmp_path, mlm):
    parent = bert_parent(tmp_path / "parent", mlm)
    # older BERT checkpoints store the integer position_ids buffer: it passes through, still integer
    pre = "bert." if mlm else ""
    sd = load_file(str(parent / "model.safetensors"))
    sd[pre + "embeddings.position_ids"] = torch.arange(64).view(1, 64)
    save_file(sd, str(parent / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "child"
    run(parent, out, target=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2),
        stages=stages(strategy="first"), output={"dtype": "bfloat16"} if mlm else {})
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == \
        (32, 2, 64, 2)
    c = read_all(out)
    assert c[pre + "embeddings.position_embeddings.weight"].shape == (64, 32)
    assert c[pre + "embeddings.position_embeddings.weight"].dtype == (torch.bfloat16 if mlm else torch.float32)
    assert torch.equal(c[pre + "embeddings.position_ids"], torch.arange(64).view(1, 64))
    assert c[pre + "embeddings.token_type_embeddings.weight"].shape == (2, 32)
    assert not any(".layer.2." in k or ".layer.3." in k for k in c)
    if mlm:
        assert "cls.predictions.decoder.weight" not in c
        assert c["cls.predictions.transform.dense.weight"].shape == (32, 32)
    m, t = forward_ok(out, "AutoModelForMaskedLM" if mlm else "AutoModel")
    assert t.shape[-1] == (96 if mlm else 32)


def test_hugging_face_cache_snapshot_with_linked_shards(tmp_path):
    """A hub cache snapshot links every file to ../../blobs/<hash>: those links are followed,
    while a link that leaves both the folder and its repository's blobs is still refused."""
    import os

    src = llama_parent(tmp_path / "src", save_kw={"max_shard_size": "20KB"})
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / sha256(f)
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    out = tmp_path / "child"
    run(snap, out, stages=[{"slice_embeddings": {}}])
    assert read_all(out).keys() == read_all(src).keys()
    for k, v in read_all(src).items():
        assert torch.equal(read_all(out)[k], v)
    # the same layout outside a hub cache is not trusted
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in snap.iterdir():
        os.symlink(os.path.realpath(f), plain / f.name)
    from shrinkit.checkpoint.reader import open_checkpoint
    from shrinkit.errors import ParentError
    with pytest.raises(ParentError, match="outside the parent folder"):
        open_checkpoint(plain)


def test_shard_hash_cache(tmp_path, monkeypatch):
    """Hashes of unchanged shards are reused; a changed shard is hashed again."""
    import os

    from shrinkit import hashing as pipeline

    monkeypatch.delenv("SHRINKIT_NO_HASH_CACHE", raising=False)
    monkeypatch.setenv("SHRINKIT_CACHE", str(tmp_path / "cache"))
    parent = llama_parent(tmp_path / "parent", save_kw={"max_shard_size": "100KB"})
    shards = st_files(parent)
    calls = []
    real = pipeline.sha256_file
    monkeypatch.setattr(pipeline, "sha256_file", lambda p: calls.append(p.name) or real(p))
    out = {}
    pipeline.sha256_all(shards, out)
    assert sorted(calls) == sorted(s.name for s in shards)
    assert out == {s.name: sha256(s) for s in shards}
    calls.clear()
    out2 = {}
    pipeline.sha256_all(shards, out2)
    assert calls == [] and out2 == out
    st = os.stat(shards[0])
    os.utime(shards[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    pipeline.sha256_all(shards, {})
    assert calls == [shards[0].name]
