"""Verification: a child identical to its parent scores KL 0 and the parent's perplexity;
a real cut scores between the parent and a random-init child."""

import json

import pytest
import torch
from typer.testing import CliRunner

import planted
from helpers import run
from shrinkit.cli import app
from shrinkit.recipe import Verify
from shrinkit.verify import verify_child

SPEC = Verify(data="random_tokens", samples=6, seq_len=24, batch_size=3)


def test_identical_child_has_zero_kl(tmp_path):
    pl = planted.llama_like(tmp_path / "p", dead_layers=())
    run(pl.path, tmp_path / "c", stages=[{"slice_embeddings": {}}])
    v = verify_child(pl.path, tmp_path / "c", SPEC)
    assert v["kind"] == "causal_lm"
    assert abs(v["child"]["kl"]) < 1e-6
    assert v["child"]["perplexity"] == pytest.approx(v["parent"]["perplexity"], rel=1e-5)
    assert v["random_init"]["kl"] > 1e-2  # the comparison can tell models apart


def test_planted_cut_verifies_as_exact_and_cli_json(tmp_path):
    pl = planted.llama_like(tmp_path / "p")
    run(pl.path, tmp_path / "c", target=dict(hidden_size=48, intermediate_size=64, num_attention_heads=2,
                                             num_key_value_heads=1, num_hidden_layers=3),
        stages=[{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"drop": [2]}},
                {"slice_embeddings": {}}, {"rescale_norms": {}}])
    r = CliRunner().invoke(app, ["verify", str(pl.path), str(tmp_path / "c"), "--data", "random_tokens",
                                 "--samples", "4", "--seq-len", "16", "--json"])
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)
    assert v["child"]["kl"] < 1e-6 < v["random_init"]["kl"]


def test_encoder_similarity(tmp_path):
    pl = planted.bert(tmp_path / "p", mlm=False)
    run(pl.path, tmp_path / "same", stages=[{"slice_embeddings": {}}])
    v = verify_child(pl.path, tmp_path / "same", SPEC)
    assert v["kind"] == "encoder"
    assert v["child"]["similarity_pearson"] == pytest.approx(1.0, abs=1e-6)
    assert v["random_init"]["similarity_pearson"] < 0.99


def test_subclone_writes_verification_into_report(tmp_path, write_recipe):
    pl = planted.llama_like(tmp_path / "p")
    rec = write_recipe({"target": {"num_hidden_layers": 3},
                        "stages": [{"drop_layers": {"drop": [2]}}, {"slice_embeddings": {}}],
                        "verify": {"data": "random_tokens", "samples": 4, "seq_len": 16}})
    r = CliRunner().invoke(app, ["subclone", str(pl.path), "-r", str(rec), "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "KL" in r.output
    rep = json.loads((tmp_path / "c" / "shrinkit_report.json").read_text())
    assert rep["verify"]["child"]["kl"] < 1e-6
    assert "## Verification" in (tmp_path / "c" / "shrinkit_report.md").read_text()


# ---------------------------------------------------------------------------- streamed == whole-model
def _whole_random_child(child, fam, seed):
    """transformers' whole model of the child's shape holding exactly the weights the streamed
    random child draws (block by block, tables chunk by chunk)."""
    import transformers

    from shrinkit.checkpoint.reader import open_checkpoint
    from shrinkit.verify import RandomBlockModel

    with open_checkpoint(child) as ck:
        rm = RandomBlockModel(ck, fam, "cpu", None, seed)
        klass = getattr(transformers, fam.block.auto)   # an Auto class, or a model class (no from_config)
        make = getattr(klass, "from_config", None) or klass._from_config
        whole = make(rm.config, dtype=torch.float32, attn_implementation=fam.block.attn).eval()
        params = dict(whole.named_parameters())
        pieces = list(rm.layers) + fam.embedding_modules(rm) + [m for m in (rm.final_norm(),) if m is not None]
        with torch.no_grad():
            for mod in pieces:
                rm.load(mod)
                prefix = rm.name_of(mod)
                for n, p in mod.named_parameters():
                    if p.device.type != "meta":
                        params[f"{prefix}.{n}"].copy_(p)
                rm.free(mod)
            for table in {id(t): t for t in (rm._emb, rm._out) if t is not None}.values():
                name = f"{rm.name_of(table)}.weight"
                if name in params:  # a tied head is the embedding's parameter (listed once)
                    params[name].copy_(torch.cat([c for _, _, c in rm.table_chunks(table)]))
    return whole


def _reference(parent, child, ids, fam, seed, causal):
    """Verification as it was computed before streaming: whole models in float32 (the parent and
    child by from_pretrained, the random child holding the same draws as the streamed one)."""
    import torch.nn.functional as F
    import transformers

    from shrinkit.verify import _pairwise, _pearson, _spearman

    cls = getattr(transformers, fam.block.auto)
    models = {"parent": cls.from_pretrained(str(parent), dtype=torch.float32, attn_implementation=fam.block.attn).eval(),
              "child": cls.from_pretrained(str(child), dtype=torch.float32, attn_implementation=fam.block.attn).eval(),
              "random_init": _whole_random_child(child, fam, seed)}
    out = {}
    with torch.no_grad():
        if causal:
            logps = {k: F.log_softmax(m(input_ids=ids).logits.float(), -1) for k, m in models.items()}
            lp, tgt = logps["parent"], ids[:, 1:].reshape(-1)
            for k, l in logps.items():
                loss = float(F.nll_loss(l[:, :-1].reshape(-1, l.shape[-1]), tgt)) 
                out[k] = {"loss": loss}
                if k != "parent":
                    out[k]["kl"] = float((lp.exp() * (lp - l)).sum()) / ids.numel()
        else:   # the last hidden state (after the final norm, where the model has one), pooled
            pooled = {}
            for k, m in models.items():
                o = m(**{fam.block.input_name: ids}, output_hidden_states=True)
                h = o.last_hidden_state if getattr(o, "last_hidden_state", None) is not None else o.hidden_states[-1]
                if h.dim() == 4:   # a convolutional model's feature map: its pooler (LayerNorm of the spatial mean)
                    pooled[k] = o.pooler_output.float()
                    continue
                if fam.name == "clip_vision_model":   # its final norm (post_layernorm) is on the pooled CLS only
                    h = o.pooler_output[:, None]
                pooled[k] = {"first": h.float()[:, 0], "last": h.float()[:, -1]}.get(fam.block.pool, h.float().mean(1))
            ref = _pairwise(pooled["parent"])
            for k in ("child", "random_init"):
                s = _pairwise(pooled[k])
                out[k] = {"similarity_pearson": _pearson(s, ref), "similarity_spearman": _spearman(s, ref)}
    return out


def _compare(v, ref):
    for k, r in ref.items():
        for m, x in r.items():
            assert v[k][m] == pytest.approx(x, rel=1e-4, abs=1e-5), (k, m, v[k][m], x)


@pytest.mark.parametrize("kind,streamed", [("llama", False), ("llama_tied", True), ("gpt2", True), ("bert", True)])
def test_streamed_verification_matches_whole_model(tmp_path, monkeypatch, kind, streamed):
    """Same numbers as whole-model verification on the same tokens. streamed: bf16 parent and tiny
    cast/activation/logits budgets, so linear weights are cast a few rows at a time, the random
    child's vocabulary tables are drawn in many chunks, every micro-batch is one sequence, and the
    logits come a few positions by a few vocabulary rows at a time."""
    import shrinkit.runtime as C
    from shrinkit.families import family_for
    from shrinkit.verify import heldout_tokens

    dt = torch.bfloat16 if streamed else torch.float32
    if streamed:
        import shrinkit.verify as V

        monkeypatch.setattr(C, "CAST_BYTES", 2048)
        monkeypatch.setattr(C, "ACT_BYTES", 2048)
        monkeypatch.setattr(V, "TABLE_BYTES", 1024)   # vocabulary chunks of a few rows
        monkeypatch.setattr(V, "LOGITS_BYTES", 4096)  # and blocks of a few positions
    make = {"llama": lambda p: planted.llama_like(p, dtype=dt),
            "llama_tied": lambda p: planted.llama_like(p, "qwen2", tie=True, attention_bias=True, dtype=dt),
            "gpt2": lambda p: planted.gpt2(p, dtype=dt),
            "bert": lambda p: planted.bert(p, mlm=False, dtype=dt)}[kind]
    pl = make(tmp_path / "p")
    cut = dict(intermediate_size=96, num_hidden_layers=3) if kind in ("gpt2", "bert") else \
        dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3)
    run(pl.path, tmp_path / "c", target=cut, stages=[{"rank_neurons": {"method": "random"}},
                                                     {"drop_layers": {"strategy": "middle"}},
                                                     {"slice_embeddings": {}}], output={"dtype": "float32"})
    spec = Verify(data="random_tokens", samples=5, seq_len=12, batch_size=3)
    v = verify_child(pl.path, tmp_path / "c", spec, seed=3)
    from shrinkit.checkpoint.reader import open_checkpoint
    with open_checkpoint(pl.path) as ck:
        fam = family_for(ck.config)
        ids = heldout_tokens(ck, spec, seed=3)
    ref = _reference(pl.path, tmp_path / "c", ids, fam, 3, v["kind"] == "causal_lm")
    _compare(v, ref)
    if v["kind"] == "causal_lm":  # the three models are told apart (the comparison can fail)
        assert v["child"]["kl"] > 1e-3 and v["random_init"]["kl"] > 1e-3


def test_random_child_is_seeded_and_drawn_like_transformers(tmp_path):
    """The random child is the same for the same seed, differs for another, and its weights have
    the spread of transformers' own init for the model (normal, initializer_range)."""
    pl = planted.llama_like(tmp_path / "p")
    run(pl.path, tmp_path / "c", stages=[{"slice_embeddings": {}}])
    from shrinkit.families import family_for
    fam = family_for(json.loads((tmp_path / "c" / "config.json").read_text()))
    a = _whole_random_child(tmp_path / "c", fam, 0).state_dict()
    b = _whole_random_child(tmp_path / "c", fam, 0).state_dict()
    c = _whole_random_child(tmp_path / "c", fam, 1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])
    w = a["model.layers.0.mlp.up_proj.weight"]
    assert abs(float(w.std()) - 0.02) < 0.002 and abs(float(w.mean())) < 0.002
    assert torch.equal(a["model.layers.0.input_layernorm.weight"], torch.ones(64))


# tiny real parents (random weights with real spread, from each family's transformers config class,
# as transformers saves them; several in bfloat16), cut in width and depth with random ranking, so
# the child differs from its parent: the families of bench/families.py, and the vision families
FAMILY_CASES = sorted(k for k, c in planted.BENCH_CASES.items() if c.inputs != "dual") + ["vit", "dinov2"]


def _family_parent(kind, path):
    if kind == "vit":
        planted.vit(path, dtype=torch.bfloat16)
        return path, dict(hidden_size=48, intermediate_size=96, num_attention_heads=3, num_hidden_layers=3)
    if kind == "dinov2":
        planted.dinov2(path, swiglu=True)
        return path, dict(hidden_size=48, intermediate_size=96, num_attention_heads=3, num_hidden_layers=3)
    case = planted.BENCH_CASES[kind]
    case.real(path)
    return path, dict(case.real_target)


@pytest.mark.parametrize("kind", FAMILY_CASES)
def test_streamed_verification_matches_whole_model_per_family(tmp_path, monkeypatch, kind):
    """Every family with a block runner: streamed verification (small cast and activation budgets,
    so weights are cast a few rows at a time and the random child's tables drawn in chunks) gives
    whole-model transformers verification's numbers on the same inputs, for a cut child."""
    import shrinkit.runtime as C
    from shrinkit.checkpoint.reader import open_checkpoint
    from shrinkit.families import family_for
    from shrinkit.verify import heldout_tokens

    import shrinkit.verify as V

    monkeypatch.setattr(C, "CAST_BYTES", 4096)
    monkeypatch.setattr(C, "ACT_BYTES", 4096)
    monkeypatch.setattr(V, "TABLE_BYTES", 2048)
    monkeypatch.setattr(V, "LOGITS_BYTES", 8192)
    parent, target = _family_parent(kind, tmp_path / "p")
    with open_checkpoint(parent) as ck:
        fam = family_for(ck.config)
    data = fam.random_data
    run(parent, tmp_path / "c", target=target,
        stages=[{"rank_neurons": {"method": "random"}}, {"drop_layers": {"strategy": "middle"}},
                {"slice_embeddings": {}}], output={"dtype": "float32"})
    spec = Verify(data=data, samples=5, seq_len=12, batch_size=3)
    v = verify_child(parent, tmp_path / "c", spec, seed=3)
    with open_checkpoint(parent) as ck:
        ids = heldout_tokens(ck, spec, seed=3)
    causal = v["kind"] == "causal_lm"
    assert causal == fam.block.causal
    ref = _reference(parent, tmp_path / "c", ids, fam, 3, causal)
    _compare(v, ref)
    # the three models are told apart, so the comparison above can fail
    if causal:
        assert v["child"]["kl"] > 1e-3 and v["random_init"]["kl"] > 1e-3
        assert v["child"]["loss"] != pytest.approx(v["parent"]["loss"], rel=1e-3)
    else:
        assert v["child"]["similarity_pearson"] < 0.9999
        assert abs(v["child"]["similarity_pearson"] - v["random_init"]["similarity_pearson"]) > 1e-3


MINILM = __import__("pathlib").Path("~/.cache/shrinkit/all-minilm-l6-v2").expanduser()


@pytest.mark.slow
@pytest.mark.skipif(not (MINILM / "model.safetensors").is_file(), reason="all-MiniLM-L6-v2 not cached (bench/assets.py)")
def test_streamed_verification_matches_whole_model_on_minilm(tmp_path):
    """A real pretrained parent (all-MiniLM-L6-v2) cut in width and depth: streamed verification on
    held-out builtin text gives the whole-model numbers."""
    from shrinkit.checkpoint.reader import open_checkpoint
    from shrinkit.families import family_for
    from shrinkit.verify import heldout_tokens

    run(MINILM, tmp_path / "c", target=dict(hidden_size=256, intermediate_size=768, num_attention_heads=8,
                                             num_hidden_layers=4),
        stages=[{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"strategy": "middle"}},
                {"slice_embeddings": {}}, {"rescale_norms": {}}])
    spec = Verify(data="builtin", samples=16, seq_len=64, batch_size=4)
    v = verify_child(MINILM, tmp_path / "c", spec, seed=0)
    with open_checkpoint(MINILM) as ck:
        fam = family_for(ck.config)
        ids = heldout_tokens(ck, spec, seed=0)
    assert v["kind"] == "encoder" and v["samples"] == 16
    ref = _reference(MINILM, tmp_path / "c", ids, fam, 0, False)
    _compare(v, ref)
    # a cut child keeps some of the parent's geometry, a random one less: told apart
    assert v["random_init"]["similarity_pearson"] + 0.05 < v["child"]["similarity_pearson"] < 0.9999
