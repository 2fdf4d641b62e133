"""Dual encoders (clip: CLIPModel, siglip: SiglipModel): both towers cut in one run, each by its own
family, joined into one child that transformers loads with no missing or unexpected keys.

The planted parents (transformers' CLIPConfig / SiglipConfig, planted by hand in both towers):
dead FFN neurons in every layer (and in SigLIP's pooling head) and one dead layer per tower (zero attention and FFN outputs:
the identity). A child cut to exactly the dead parts gives the parent's text embeddings, image
embeddings and image-text logits (float32, rel. err < 1e-4); the projections keep their output
dims. Negative controls: a live layer dropped in one tower, or neurons chosen without the
weights, change the logits."""

import json

import pytest
import torch
from typer.testing import CliRunner

import planted
from helpers import load, recipe, tokens
from planted import _randomize, rel_err
from shrinkit.cli import app
from shrinkit.errors import RecipeError
from shrinkit.pipeline import subclone

V = 96
TEXT = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=4,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, layer_norm_eps=1e-12)
VISION = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=4, image_size=32,
              patch_size=8, layer_norm_eps=1e-12)
CLS = {"clip": "CLIPModel", "siglip": "SiglipModel"}
CALIB = {"text": {"data": "random_tokens", "samples": 8, "seq_len": 16, "batch_size": 4},
         "vision": {"data": "random_pixels", "samples": 8, "batch_size": 4}}
DEAD = {"text": 1, "vision": 2}   # the dead layer of each tower


def dual_parent(path, kind="clip", *, dead_ffn=32, dtype=torch.float32, seed=0):
    import transformers

    if kind == "clip":
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION,
                                                               projection_dim=24))
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=dict(TEXT, projection_size=64),
                                                                   vision_config=VISION))
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    dead = {}
    with torch.no_grad():
        for tower in ("text", "vision"):
            for li, layer in enumerate(getattr(model, f"{tower}_model").encoder.layers):
                dead[(tower, li)] = planted.kill_ffn(layer.mlp, gen, 96, dead_ffn)
                if li == DEAD[tower]:
                    planted.kill_layer(layer.self_attn, layer.mlp)
        head = getattr(model.vision_model, "head", None)   # SigLIP's pooling head: an MLP of its own
        if head is not None and dead_ffn:
            dead[("vision", "head")] = planted.kill_ffn(head.mlp, gen, 96, dead_ffn)
    model.to(dtype).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(planted.VISION_PRE))
    return path, dead


def real_parent(path, kind="clip"):
    """A tiny random dual encoder (bf16, nothing planted) with the weights' real spread."""
    return dual_parent(path, kind, dead_ffn=0, dtype=torch.bfloat16)[0]


def tower(method="magnitude", drop=None, target=None, name="text"):
    rank = {"method": method}
    if method == "activation":
        rank["calibration"] = CALIB[name]
    st = [{"rank_neurons": rank}] + ([{"drop_layers": {"drop": list(drop)}}] if drop else []) + [{"slice_embeddings": {}}]
    return {"target": target or {}, "stages": st}


def exact_towers(method="magnitude"):
    return {n: tower(method, [DEAD[n]], dict(intermediate_size=64, num_hidden_layers=3), n) for n in ("text", "vision")}


@torch.no_grad()
def outputs(path, kind):
    ids = tokens(V, n=3, seq=12)
    ids[:, -1] = 1   # end of text last
    o = load(path, CLS[kind])(input_ids=ids, pixel_values=planted.pixels())
    return o.text_embeds, o.image_embeds, o.logits_per_image


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_dual_planted_exact(tmp_path, kind, method):
    p, dead = dual_parent(tmp_path / "parent", kind)
    res = subclone(p, recipe(towers=exact_towers(method)), tmp_path / "child")
    for n in ("text", "vision"):
        kept = res.report["towers"][n]["kept"]
        assert kept["layers"] == [i for i in range(4) if i != DEAD[n]]
        for ci, li in enumerate(kept["layers"]):
            assert kept["ffn"][str(ci)] == [i for i in range(96) if i not in set(dead[(n, li)])], (n, li)
    ref, got = outputs(p, kind), outputs(tmp_path / "child", kind)
    for r, g in zip(ref, got):
        assert r.shape == g.shape and rel_err(g, r) < 1e-4, (r.shape, rel_err(g, r))
    cfg = json.loads((tmp_path / "child" / "config.json").read_text())
    assert cfg["model_type"] == kind and cfg["text_config"]["num_hidden_layers"] == 3
    assert cfg["vision_config"]["intermediate_size"] == 64
    rep = res.report
    assert rep["family"] == kind and rep["child"]["dims"]["vision.num_hidden_layers"] == 3
    assert set(rep["files"]) >= {"config.json", "model.safetensors.index.json", "preprocessor_config.json"}
    assert not [f for f in (tmp_path / "child").iterdir() if f.name.startswith(".")]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_dual_negative_controls(tmp_path, kind):
    p, _ = dual_parent(tmp_path / "parent", kind)
    ref = outputs(p, kind)[2]
    towers = exact_towers()
    towers["vision"] = tower("magnitude", [0], dict(intermediate_size=64, num_hidden_layers=3), "vision")
    subclone(p, recipe(towers=towers), tmp_path / "wrong-layer")
    assert rel_err(outputs(tmp_path / "wrong-layer", kind)[2], ref) > 1e-2
    towers = exact_towers()
    towers["text"] = tower("first", [DEAD["text"]], dict(intermediate_size=64, num_hidden_layers=3), "text")
    subclone(p, recipe(towers=towers), tmp_path / "first")
    assert rel_err(outputs(tmp_path / "first", kind)[2], ref) > 1e-2


def test_dual_cuts_width_keeps_projections_and_copies_an_unnamed_tower(tmp_path):
    """CLIP: the text tower narrowed (hidden 64 -> 48, 3 heads) keeps projection_dim 24; the image
    tower, not named, is copied whole (its tensors byte-identical to the parent's)."""
    from safetensors import safe_open

    p, _ = dual_parent(tmp_path / "parent", "clip", dead_ffn=0)
    subclone(p, recipe(towers={"text": tower(target=dict(hidden_size=48, num_attention_heads=3))}),
             tmp_path / "child")
    m = load(tmp_path / "child", "CLIPModel")
    assert m.text_projection.weight.shape == (24, 48) and m.visual_projection.weight.shape == (24, 64)
    assert m.config.text_config.hidden_size == 48 and m.config.projection_dim == 24
    par = load(p, "CLIPModel").state_dict()
    for k, v in m.state_dict().items():
        if k.startswith("vision_model.") or k in ("visual_projection.weight", "logit_scale"):
            assert torch.equal(v, par[k]), k
    idx = json.loads((tmp_path / "child" / "model.safetensors.index.json").read_text())
    for name, fn in idx["weight_map"].items():
        with safe_open(str(tmp_path / "child" / fn), "pt") as f:
            assert name in f.keys()


def test_siglip_image_tower_keeps_its_width(tmp_path):
    """SigLIP's image embedding is the image tower's pooled output: narrowing that tower would
    change the embedding width. Refused before any work (exit 2, nothing written); the text
    tower may be narrowed (its head keeps projection_size)."""
    p, _ = dual_parent(tmp_path / "parent", "siglip", dead_ffn=0)
    with pytest.raises(RecipeError, match="keep hidden_size 64"):
        subclone(p, recipe(towers={"vision": tower(target=dict(hidden_size=48, num_attention_heads=3),
                                                   name="vision")}), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    subclone(p, recipe(towers={"text": tower(target=dict(hidden_size=48, num_attention_heads=3))}),
             tmp_path / "child")
    m = load(tmp_path / "child", "SiglipModel")
    assert m.text_model.head.weight.shape == (64, 48)
    assert m.config.text_config.projection_size == 64


@pytest.mark.parametrize("rec,match", [
    ({"target": {"intermediate_size": 64}}, "cut tower by tower: move `target:`"),
    ({}, "give each its recipe under `towers:`"),
    ({"towers": {"audio": {}}}, "no tower 'audio'; its towers: text, vision"),
    ({"towers": {"text": {"output": {"dtype": "bfloat16"}}}}, "different dtypes"),
    ({"towers": {"vision": {"target": {"num_hidden_layers": 3}, "stages": [{"slice_embeddings": {}}]}}},
     "towers.vision: the target has 3 of 4 layers"),
])
def test_dual_bad_recipes_are_one_line_exit_2_and_write_nothing(tmp_path, rec, match):
    p, _ = dual_parent(tmp_path / "parent", "clip", dead_ffn=0)
    rf = tmp_path / "r.yaml"
    rf.write_text(json.dumps(rec))
    r = CliRunner().invoke(app, ["subclone", str(p), "-r", str(rf), "--out", str(tmp_path / "child")])
    assert r.exit_code == 2, r.output
    assert match in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "child").exists()


def test_towers_on_a_one_tower_parent_are_refused(tmp_path):
    import test_clip_text

    pl = test_clip_text.text_parent(tmp_path / "parent", "clip", dead_ffn=0, dead_heads=0, dead_layers=())
    with pytest.raises(RecipeError, match="`towers:` is for dual-encoder parents"):
        subclone(pl.path, recipe(towers={"text": {}}), tmp_path / "child")
    assert not (tmp_path / "child").exists()


def test_dual_cli_json_skip_if_current_and_force(tmp_path):
    """The command a user types: --json; --skip-if-current skips an intact dual child, refuses one
    with a deleted shard (exit 2), and --force rebuilds it (the joined child's files are a
    shrinkit child's)."""
    p, _ = dual_parent(tmp_path / "parent", "clip")
    rf = tmp_path / "r.yaml"
    rf.write_text(json.dumps({"towers": exact_towers()}))
    out = tmp_path / "child"
    args = ["subclone", str(p), "-r", str(rf), "--out", str(out), "--no-verify"]
    r = CliRunner().invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.output
    js = json.loads(r.stdout)
    assert js["dims"]["text.num_hidden_layers"] == 3 and js["skipped"] is False
    r = CliRunner().invoke(app, args + ["--skip-if-current", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] is True, r.output
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.unlink()
    r = CliRunner().invoke(app, args + ["--skip-if-current"])
    assert r.exit_code == 2 and shard.name in r.output, r.output
    r = CliRunner().invoke(app, args + ["--skip-if-current", "--force"])
    assert r.exit_code == 0 and shard.is_file(), r.output


def test_dual_verify_inspect_plan(tmp_path):
    """subclone verifies each tower on its own data (text: tokens, image tower: pixels) and joins
    the results; `shrinkit verify`, `inspect` and `plan` take a dual parent."""
    p, _ = dual_parent(tmp_path / "parent", "clip", dtype=torch.bfloat16)
    towers = {n: {**tower("activation", [DEAD[n]], dict(intermediate_size=64, num_hidden_layers=3), n),
                  "verify": {"data": CALIB[n]["data"], "samples": 6, **({"seq_len": 16} if n == "text" else {})}}
              for n in ("text", "vision")}
    res = subclone(p, recipe(towers=towers), tmp_path / "child", verify=True)
    v = res.report["verify"]
    assert v["kind"] == "towers" and v["status"] == "ok"
    for n in ("text", "vision"):
        t = v["towers"][n]
        assert t["kind"] == "encoder" and t["child"]["similarity_pearson"] > t["random_init"]["similarity_pearson"]
    r = CliRunner().invoke(app, ["verify", str(p), str(tmp_path / "child"), "--data", "random_tokens",
                                 "--samples", "6", "--seq-len", "16", "--json"])
    assert r.exit_code == 0, r.output
    js = json.loads(r.stdout)
    assert js["kind"] == "towers" and set(js["towers"]) == {"text", "vision"}
    assert js["towers"]["vision"]["data"] == "random_pixels"
    r = CliRunner().invoke(app, ["inspect", str(p), "--json"])
    assert r.exit_code == 0, r.output
    js = json.loads(r.stdout)
    assert js["model"]["family"] == "clip" and js["towers"]["vision"]["dims"]["hidden_size"] == 64
    rf = tmp_path / "r.yaml"
    rf.write_text(json.dumps({"towers": {"text": tower(target=dict(hidden_size=48, num_attention_heads=3))}}))
    r = CliRunner().invoke(app, ["plan", str(p), "-r", str(rf), "--json"])
    assert r.exit_code == 0, r.output
    js = json.loads(r.stdout)
    assert js["towers"]["text"]["child"]["hidden_size"] == 48 and js["towers"]["vision"]["child"]["hidden_size"] == 64


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("what", ["no vision_config", "vision_config not a mapping", "stray tensor"])
def test_dual_bad_parents_are_one_line_exit_3_and_write_nothing(tmp_path, what):
    from safetensors.torch import load_file, save_file

    p, _ = dual_parent(tmp_path / "parent", "clip", dead_ffn=0)
    if what == "no vision_config":
        _edit_config(p, lambda c: c.pop("vision_config"))
    elif what == "vision_config not a mapping":
        _edit_config(p, lambda c: c.update(vision_config=[1, 2]))
    else:
        sd = load_file(str(p / "model.safetensors"))
        sd["extra_head.weight"] = torch.zeros(2, 2)
        save_file(sd, str(p / "model.safetensors"), metadata={"format": "pt"})
    rf = tmp_path / "r.yaml"
    rf.write_text(json.dumps({"towers": {"text": tower(target=dict(intermediate_size=64))}}))
    for cmd in (["subclone", str(p), "-r", str(rf), "--out", str(tmp_path / "child")],
                ["plan", str(p), "-r", str(rf)], ["inspect", str(p)]):
        r = CliRunner().invoke(app, cmd)
        assert r.exit_code == 3, (cmd[0], r.output)
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert ("vision_config" in r.output) if what != "stray tensor" else ("extra_head.weight" in r.output)
    assert not (tmp_path / "child").exists()


def test_dual_verify_refuses_a_child_of_another_kind(tmp_path):
    """`shrinkit verify` of a dual parent against a one-tower child (or the reverse) is a one-line
    exit 2."""
    import test_clip_text

    p, _ = dual_parent(tmp_path / "parent", "clip", dead_ffn=0)
    other = test_clip_text.text_parent(tmp_path / "text", "clip", dead_ffn=0, dead_heads=0, dead_layers=()).path
    for a, b in ((p, other), (other, p)):
        r = CliRunner().invoke(app, ["verify", str(a), str(b), "--data", "random_tokens", "--samples", "4",
                                     "--seq-len", "8"])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert "verify a child against the parent it was cut from" in r.output, r.output


def test_a_tower_recipe_cannot_nest_towers(tmp_path):
    from shrinkit.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match="a tower's recipe cannot have towers of its own"):
        recipe_from_dict({"towers": {"text": {"towers": {"vision": {}}}}})
    with pytest.raises(RecipeError, match="must name at least one tower"):
        recipe_from_dict({"towers": {}})


def test_dual_needs_room_for_both_towers(tmp_path, monkeypatch):
    """Each tower alone fits the free space, both together do not: refused before any work (exit
    2), nothing written."""
    import collections

    import shrinkit.preflight as P

    p, _ = dual_parent(tmp_path / "parent", "clip", dead_ffn=0)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(P.shutil, "disk_usage", lambda _: usage(1 << 40, 0, int(P.SLACK_BYTES * 1.5)))
    rf = tmp_path / "r.yaml"
    rf.write_text(json.dumps({"towers": {"text": tower(target=dict(intermediate_size=64))}}))
    r = CliRunner().invoke(app, ["subclone", str(p), "-r", str(rf), "--out", str(tmp_path / "child")])
    assert r.exit_code == 2 and "the two towers' children" in r.output, r.output
    assert not (tmp_path / "child").exists()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_dual_child_runs_as_loaded(tmp_path, kind):
    """As tests/test_children_run.py for one-tower families: a dual child at awkward widths (odd FFN
    widths, 3 heads), written in float32 and bfloat16, loaded with from_pretrained and no keyword
    at all, one forward pass on tokens and pixels, finite logits."""
    import transformers

    p, _ = dual_parent(tmp_path / "parent", kind, dead_ffn=0)
    narrow = dict(hidden_size=48, num_attention_heads=3)
    towers = {"text": tower(target=dict(narrow, intermediate_size=37, num_hidden_layers=3)),
              "vision": tower(target=dict({} if kind == "siglip" else narrow, intermediate_size=41,
                                          num_hidden_layers=2), name="vision")}
    for t in towers.values():
        t["stages"].insert(1, {"drop_layers": {"strategy": "middle"}})
    for dtype in ("float32", "bfloat16"):
        subclone(p, recipe(towers=towers, output={"dtype": dtype}), tmp_path / dtype)
        model = getattr(transformers, CLS[kind]).from_pretrained(tmp_path / dtype)   # defaults only
        assert model.dtype == getattr(torch, dtype)
        ids = tokens(V, n=2, seq=12)
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=planted.pixels(2).to(model.dtype))
        assert out.logits_per_image.shape == (2, 2) and torch.isfinite(out.logits_per_image.float()).all()
