"""Planted parents: random checkpoints in which chosen hidden dims, FFN neurons, KV groups
(or query heads) and whole layers provably contribute nothing, because every weight that
touches them is zero. The planting here is written per family by hand, independent of
shrinkit's architecture maps, so a wrong map cannot hide behind a matching wrong planting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

TINY_LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_hidden_layers=4, max_position_embeddings=64,
                  rms_norm_eps=1e-12)


@dataclass
class Planted:
    path: Path
    dead_hidden: list[int] = field(default_factory=list)
    dead_ffn: dict[int, list[int]] = field(default_factory=dict)      # parent layer -> neurons
    dead_kv: dict[int, list[int]] = field(default_factory=dict)       # parent layer -> kv groups
    dead_q: dict[int, list[int]] = field(default_factory=dict)        # parent layer -> query heads
    dead_layers: list[int] = field(default_factory=list)
    config: dict = field(default_factory=dict)


def _choose(gen, n, k):
    return sorted(torch.randperm(n, generator=gen)[:k].tolist())


def _randomize(model, gen):
    """Weights with real spread (transformers' init is tiny and norms are all ones)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 0:   # a scalar (CLIP's logit_scale): kept as initialized
                continue
            if p.dim() == 1:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen) if "norm" in name.lower() or "ln_" in name
                        else 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def kill_ffn(mlp, gen, n: int, k: int) -> list:
    """k dead FFN neurons of an fc1/fc2 MLP (CLIP, SigLIP): their fc1 rows and biases and fc2
    columns zero. Returns them (sorted by _choose)."""
    fs = _choose(gen, n, k) if k else []
    mlp.fc1.weight[fs] = 0
    mlp.fc1.bias[fs] = 0
    mlp.fc2.weight[:, fs] = 0
    return fs


def kill_heads(attn, gen, nh: int, hd: int, k: int) -> list:
    """k dead heads of a q/k/v/out_proj attention with biases: their q, k, v rows and out_proj columns zero."""
    hs = _choose(gen, nh, k) if k else []
    for h in hs:
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight[h * hd:(h + 1) * hd] = 0
            lin.bias[h * hd:(h + 1) * hd] = 0
        attn.out_proj.weight[:, h * hd:(h + 1) * hd] = 0
    return hs


def kill_layer(attn, mlp) -> None:
    """A dead block: its attention and MLP outputs (out_proj, fc2) zero, so it is the identity."""
    for lin in (attn.out_proj, mlp.fc2):
        lin.weight.zero_()
        lin.bias.zero_()


def plant_blocks(layers, gen, pl: "Planted", n_ffn: int, nh: int, hd: int, dead_ffn: int, dead_heads: int) -> None:
    """CLIP-style blocks (self_attn q/k/v/out_proj, mlp fc1/fc2): dead FFN neurons and heads in every
    layer and the layers pl.dead_layers dead, recorded in pl."""
    for li, layer in enumerate(layers):
        pl.dead_ffn[li] = kill_ffn(layer.mlp, gen, n_ffn, dead_ffn)
        pl.dead_q[li] = kill_heads(layer.self_attn, gen, nh, hd, dead_heads)
        if li in pl.dead_layers:
            kill_layer(layer.self_attn, layer.mlp)


def llama_like(tmp: Path, model_type: str = "llama", *, dead_hidden=16, dead_ffn=32, dead_kv=1, dead_q_per_group=0,
               dead_layers=(2,), tie=False, seed=0, dtype=torch.float32, **overrides) -> Planted:
    """A Llama / Mistral / Qwen2 / Qwen3 parent with planted dead parts."""
    import transformers

    cfg_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
    kw = dict(TINY_LLAMA, tie_word_embeddings=tie, **overrides)
    cfg = cfg_cls(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    H, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    r = nq // nkv
    pl = Planted(tmp)
    pl.dead_hidden = _choose(gen, H, dead_hidden) if dead_hidden else []
    pl.dead_layers = list(dead_layers)
    D = pl.dead_hidden
    sd = model.model
    with torch.no_grad():
        sd.embed_tokens.weight[:, D] = 0
        sd.norm.weight[D] = 0
        if not tie:
            model.lm_head.weight[:, D] = 0
        for li, layer in enumerate(sd.layers):
            a, m = layer.self_attn, layer.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                lin.weight[:, D] = 0
            a.o_proj.weight[D, :] = 0
            m.down_proj.weight[D, :] = 0
            layer.input_layernorm.weight[D] = 0
            layer.post_attention_layernorm.weight[D] = 0
            if dead_ffn:
                fs = _choose(gen, F, dead_ffn)
                pl.dead_ffn[li] = fs
                m.gate_proj.weight[fs] = 0
                m.up_proj.weight[fs] = 0
                m.down_proj.weight[:, fs] = 0
            qheads = []
            if dead_kv:
                gs = _choose(gen, nkv, dead_kv)
                pl.dead_kv[li] = gs
                for g in gs:
                    for lin in (a.k_proj, a.v_proj):
                        lin.weight[g * hd:(g + 1) * hd] = 0
                        if lin.bias is not None:
                            lin.bias[g * hd:(g + 1) * hd] = 0
                    qheads += list(range(g * r, (g + 1) * r))
            if dead_q_per_group:
                for g in range(nkv):
                    if g in pl.dead_kv.get(li, []):
                        continue
                    qheads += [g * r + j for j in _choose(gen, r, dead_q_per_group)]
            pl.dead_q[li] = sorted(qheads)
            for h in qheads:
                a.q_proj.weight[h * hd:(h + 1) * hd] = 0
                if a.q_proj.bias is not None:
                    a.q_proj.bias[h * hd:(h + 1) * hd] = 0
                a.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            if li in pl.dead_layers:
                a.o_proj.weight.zero_()
                m.down_proj.weight.zero_()
    model.to(dtype).save_pretrained(tmp)
    pl.config = model.config.to_dict()
    return pl


def gpt2(tmp: Path, *, dead_ffn=32, dead_layers=(1,), seed=0, n_inner=None, dtype=torch.float32,
         n_positions=64) -> Planted:
    import transformers

    cfg = transformers.GPT2Config(vocab_size=96, n_positions=n_positions, n_embd=64, n_layer=4, n_head=4,
                                  n_inner=n_inner, layer_norm_epsilon=1e-12)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    F = n_inner or 4 * cfg.n_embd
    pl = Planted(tmp, dead_layers=list(dead_layers))
    with torch.no_grad():
        for li, blk in enumerate(model.transformer.h):
            fs = _choose(gen, F, dead_ffn)
            pl.dead_ffn[li] = fs
            blk.mlp.c_fc.weight[:, fs] = 0        # Conv1D: [in, out]
            blk.mlp.c_fc.bias[fs] = 0
            blk.mlp.c_proj.weight[fs, :] = 0
            if li in pl.dead_layers:
                for lin in (blk.attn.c_proj, blk.mlp.c_proj):
                    lin.weight.zero_()
                    lin.bias.zero_()
    model.to(dtype).save_pretrained(tmp)
    pl.config = model.config.to_dict()
    return pl


def bert(tmp: Path, *, dead_ffn=32, dead_layers=(1,), seed=0, mlm=True, dtype=torch.float32,
         max_position_embeddings=64, pooler=True) -> Planted:
    """BERT is post-LayerNorm: a layer is the identity when its attention and FFN outputs are
    zero and its LayerNorms (and the one before it) are the plain (1, 0) normalization."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=max_position_embeddings,
                                  layer_norm_eps=1e-12)
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(cfg) if mlm else transformers.BertModel(cfg, add_pooling_layer=pooler)
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    core = model.bert if mlm else model
    pl = Planted(tmp, dead_layers=list(dead_layers))
    with torch.no_grad():
        for li, layer in enumerate(core.encoder.layer):
            fs = _choose(gen, cfg.intermediate_size, dead_ffn)
            pl.dead_ffn[li] = fs
            layer.intermediate.dense.weight[fs] = 0
            layer.intermediate.dense.bias[fs] = 0
            layer.output.dense.weight[:, fs] = 0
            if li in pl.dead_layers:
                prev = core.encoder.layer[li - 1].output.LayerNorm if li else core.embeddings.LayerNorm
                for ln in (prev, layer.attention.output.LayerNorm, layer.output.LayerNorm):
                    ln.weight.fill_(1.0)
                    ln.bias.zero_()
                for lin in (layer.attention.output.dense, layer.output.dense):
                    lin.weight.zero_()
                    lin.bias.zero_()
    model.to(dtype).save_pretrained(tmp)
    pl.config = model.config.to_dict()
    return pl


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------- BERT-style encoders
def _encoder_classes(kind: str):
    import transformers as T

    return {"bert": (T.BertConfig, T.BertForMaskedLM, T.BertModel),
            "roberta": (T.RobertaConfig, T.RobertaForMaskedLM, T.RobertaModel),
            "xlm-roberta": (T.XLMRobertaConfig, T.XLMRobertaForMaskedLM, T.XLMRobertaModel),
            "distilbert": (T.DistilBertConfig, T.DistilBertForMaskedLM, T.DistilBertModel)}[kind]


def encoder_config(kind: str, **over):
    hidden, ffn, heads, layers = over.pop("hidden", 64), over.pop("ffn", 128), over.pop("heads", 4), over.pop("layers", 4)
    cfg_cls = _encoder_classes(kind)[0]
    if kind == "distilbert":
        return cfg_cls(vocab_size=96, dim=hidden, hidden_dim=ffn, n_heads=heads, n_layers=layers,
                       max_position_embeddings=64, **over)
    return cfg_cls(vocab_size=96, hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
                   num_hidden_layers=layers, max_position_embeddings=66, layer_norm_eps=1e-12, **over)


def _encoder_parts(kind: str, core):
    """(embedding LayerNorm, embedding tables, per layer {q, k, v, o, ln1, up, down, ln2}), by the
    module names of transformers' own classes."""
    emb = core.embeddings
    tables = [m for m in (emb.word_embeddings, emb.position_embeddings, getattr(emb, "token_type_embeddings", None))
              if m is not None]
    layers = []
    if kind == "distilbert":
        for L in core.transformer.layer:
            a = L.attention
            layers.append(dict(q=a.q_lin, k=a.k_lin, v=a.v_lin, o=a.out_lin, ln1=L.sa_layer_norm, up=L.ffn.lin1,
                               down=L.ffn.lin2, ln2=L.output_layer_norm))
    else:
        for L in core.encoder.layer:
            a = L.attention
            layers.append(dict(q=a.self.query, k=a.self.key, v=a.self.value, o=a.output.dense, ln1=a.output.LayerNorm,
                               up=L.intermediate.dense, down=L.output.dense, ln2=L.output.LayerNorm))
    return emb.LayerNorm, tables, layers


def encoder(tmp: Path, kind: str, *, mlm=True, dead_ffn=32, dead_layers=(1,), dead_heads=0, dead_hidden=0, seed=0,
            dtype=torch.float32, **over) -> Planted:
    """A BERT / RoBERTa / XLM-RoBERTa / DistilBERT parent with planted dead parts: FFN neurons,
    whole layers (post-LayerNorm: identity when the attention and FFN outputs are zero and the
    LayerNorms around them are the plain (1, 0) normalization), heads (q, k, v rows and output
    columns zero) and hidden dims (every weight reading or writing them zero). Dead layers and
    dead hidden dims exclude each other (the identity needs the full normalization)."""
    _, mlm_cls, base_cls = _encoder_classes(kind)
    cfg = encoder_config(kind, **over)
    torch.manual_seed(seed)
    model = mlm_cls(cfg) if mlm else base_cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    core = getattr(model, model.base_model_prefix) if mlm else model
    emb_ln, tables, layers = _encoder_parts(kind, core)
    H = emb_ln.weight.shape[0]
    F = layers[0]["up"].weight.shape[0]
    nh = getattr(cfg, "num_attention_heads", None) or cfg.n_heads
    hd = H // nh
    pl = Planted(tmp, dead_layers=list(dead_layers))
    assert not (dead_layers and dead_hidden)
    D = pl.dead_hidden = _choose(gen, H, dead_hidden) if dead_hidden else []
    with torch.no_grad():
        if D:
            for t in tables:
                t.weight[:, D] = 0
            emb_ln.weight[D] = 0
            emb_ln.bias[D] = 0
            for mod in model.modules():  # the pooler and the MLM head's transform read and write hidden
                if isinstance(mod, torch.nn.Linear) and mod.weight.shape == (H, H) and \
                        not any(mod is L[x] for L in layers for x in ("q", "k", "v", "o")):
                    mod.weight[D, :] = 0
                    mod.weight[:, D] = 0
                    mod.bias[D] = 0
                if isinstance(mod, torch.nn.LayerNorm) and mod is not emb_ln:
                    mod.weight[D] = 0
                    mod.bias[D] = 0
        for li, L in enumerate(layers):
            if D:
                for x in ("q", "k", "v", "up"):
                    L[x].weight[:, D] = 0
                for x in ("o", "down"):
                    L[x].weight[D, :] = 0
                    L[x].bias[D] = 0
            if dead_ffn:
                fs = pl.dead_ffn[li] = _choose(gen, F, dead_ffn)
                L["up"].weight[fs] = 0
                L["up"].bias[fs] = 0
                L["down"].weight[:, fs] = 0
            if dead_heads:
                hs = pl.dead_q[li] = _choose(gen, nh, dead_heads)
                for h in hs:
                    rows = slice(h * hd, (h + 1) * hd)
                    for x in ("q", "k", "v"):
                        L[x].weight[rows] = 0
                        L[x].bias[rows] = 0
                    L["o"].weight[:, rows] = 0
            if li in pl.dead_layers:
                for ln in (layers[li - 1]["ln2"] if li else emb_ln, L["ln1"], L["ln2"]):
                    ln.weight.fill_(1.0)
                    ln.bias.zero_()
                for x in ("o", "down"):
                    L[x].weight.zero_()
                    L[x].bias.zero_()
    model.to(dtype).save_pretrained(tmp)
    pl.config = model.config.to_dict()
    return pl


# ---------------------------------------------------------------- cases for bench/families.py
@dataclass
class BenchCase:
    """One family's row in BENCHMARKS.md (bench/families.py): a planted parent and the target
    and drop list under which its child must reproduce the parent exactly, and a tiny real
    parent (random weights from the family's config class) with a width-and-depth target."""

    planted: object                   # callable(path) -> Planted
    target: dict
    drop: list
    output_class: str                 # transformers Auto class whose outputs are compared
    real: object                      # callable(path) -> path
    real_target: dict
    inputs: str = "tokens"            # "tokens" (input_ids) or "pixels" (pixel_values; calibration on random pixels)


def _real_encoder(kind):
    def make(path):
        _, mlm_cls, _ = _encoder_classes(kind)
        torch.manual_seed(0)
        m = mlm_cls(encoder_config(kind))
        _randomize(m, torch.Generator().manual_seed(0))
        m.save_pretrained(path)
        return path
    return make


ENCODER_WIDTH_DEPTH = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
BENCH_CASES: dict[str, BenchCase] = {
    kind: BenchCase(lambda p, kind=kind: encoder(p, kind), dict(intermediate_size=96, num_hidden_layers=3), [1],
                    "AutoModelForMaskedLM", _real_encoder(kind), ENCODER_WIDTH_DEPTH)
    for kind in ("roberta", "xlm-roberta", "distilbert")
}


def _from(module: str, fn: str, *args):
    """A case callable from a family's own test module, imported when the case runs."""
    return lambda path: getattr(__import__(module), fn)(path, *args)


# RMSNorm families cut exactly in every space: hidden dims, FFN neurons, KV groups, layers
RMS_WIDTH_DEPTH = dict(hidden_size=48, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                       num_hidden_layers=3)
for _mt in ("gemma", "gemma2", "gemma3_text"):
    BENCH_CASES[_mt] = BenchCase(_from("test_gemma", "gemma_like", _mt), RMS_WIDTH_DEPTH, [2], "AutoModelForCausalLM",
                                 _from("test_gemma", "real_parent", _mt), RMS_WIDTH_DEPTH)
BENCH_CASES["phi3"] = BenchCase(_from("test_phi3", "phi3_parent"), RMS_WIDTH_DEPTH, [2], "AutoModelForCausalLM",
                                _from("test_phi3", "real_parent"), RMS_WIDTH_DEPTH)
BENCH_CASES["modernbert"] = BenchCase(_from("test_modernbert", "modernbert_parent"),
                                      dict(intermediate_size=64, num_hidden_layers=3), [2], "AutoModelForMaskedLM",
                                      _from("test_modernbert", "real_parent"),
                                      dict(hidden_size=48, num_attention_heads=3, intermediate_size=64,
                                           num_hidden_layers=3))
BENCH_CASES["clip_vision_model"] = BenchCase(_from("test_clip", "clip_parent"), dict(intermediate_size=64,
                                             num_hidden_layers=3), [2], "CLIPVisionModelWithProjection",
                                             _from("test_clip", "real_parent"),
                                             dict(hidden_size=48, num_attention_heads=3, intermediate_size=64,
                                                  num_hidden_layers=3), inputs="pixels")
BENCH_CASES["siglip_vision_model"] = BenchCase(_from("test_siglip", "siglip_parent"), dict(intermediate_size=64,
                                               num_hidden_layers=3), [2], "AutoModel",
                                               _from("test_siglip", "real_parent"),
                                               dict(hidden_size=48, num_attention_heads=3, intermediate_size=64,
                                                    num_hidden_layers=3), inputs="pixels")
for _mt, _cls in (("clip", "CLIPTextModelWithProjection"), ("siglip", "SiglipTextModel")):
    BENCH_CASES[f"{_mt}_text_model"] = BenchCase(_from("test_clip_text", "text_parent", _mt),
                                                 dict(intermediate_size=64, num_hidden_layers=3), [2], _cls,
                                                 _from("test_clip_text", "real_parent", _mt),
                                                 dict(hidden_size=48, num_attention_heads=3, intermediate_size=64,
                                                      num_hidden_layers=3))
# dual encoders: both towers (bench/families.py cuts them with a `towers:` recipe; inputs "dual")
for _mt, _cls in (("clip", "CLIPModel"), ("siglip", "SiglipModel")):
    BENCH_CASES[_mt] = BenchCase(_from("test_dual", "dual_parent", _mt), {}, [], _cls,
                                 _from("test_dual", "real_parent", _mt),
                                 {"text": dict(hidden_size=48, num_attention_heads=3, intermediate_size=64,
                                               num_hidden_layers=3),
                                  "vision": dict(intermediate_size=64, num_hidden_layers=3, **(
                                      {} if _mt == "siglip" else dict(hidden_size=48, num_attention_heads=3)))},
                                 inputs="dual")
BENCH_CASES["olmo2"] = BenchCase(_from("test_olmo2", "olmo2_parent"), RMS_WIDTH_DEPTH, [2], "AutoModelForCausalLM",
                                 _from("test_olmo2", "real_parent"), RMS_WIDTH_DEPTH)


# ---------------------------------------------------------------- vision
VISION_PRE = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
              "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def _dead_ffn_neurons(gen, lin_in, lin_out, F, k, fused=False):
    """Zero k FFN neurons: their input rows and biases (both halves of a fused gate/up) and
    their output columns."""
    fs = _choose(gen, F, k)
    rows = fs + [F + f for f in fs] if fused else fs
    lin_in.weight[rows] = 0
    lin_in.bias[rows] = 0
    lin_out.weight[:, fs] = 0
    return fs


def _dead_heads(gen, q, k_, v, o, nh, hd, k):
    hs = _choose(gen, nh, k)
    for h in hs:
        for lin in (q, k_, v):
            lin.weight[h * hd:(h + 1) * hd] = 0
            lin.bias[h * hd:(h + 1) * hd] = 0
        o.weight[:, h * hd:(h + 1) * hd] = 0
    return hs


def vit(tmp: Path, *, classifier=False, dead_ffn=32, dead_heads=1, dead_layers=(2,), seed=0,
        dtype=torch.float32) -> Planted:
    """A ViT parent (pre-LayerNorm): dead FFN neurons and heads per layer; a dead layer has zero
    attention and FFN outputs (weights and biases), so it is the identity."""
    import json
    import transformers

    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8, num_labels=5, layer_norm_eps=1e-12)
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(cfg) if classifier else transformers.ViTModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    core = model.vit if classifier else model
    pl = Planted(tmp, dead_layers=list(dead_layers))
    with torch.no_grad():
        for li, layer in enumerate(core.layers):
            a, m = layer.attention, layer.mlp
            pl.dead_ffn[li] = _dead_ffn_neurons(gen, m.fc1, m.fc2, cfg.intermediate_size, dead_ffn)
            pl.dead_q[li] = _dead_heads(gen, a.q_proj, a.k_proj, a.v_proj, a.o_proj, 4, 16, dead_heads) \
                if dead_heads else []
            if li in pl.dead_layers:
                for lin in (a.o_proj, m.fc2):
                    lin.weight.zero_()
                    lin.bias.zero_()
    model.to(dtype).save_pretrained(tmp)
    (tmp / "preprocessor_config.json").write_text(json.dumps(VISION_PRE))
    pl.config = model.config.to_dict()
    return pl


def dinov2(tmp: Path, *, swiglu=False, registers=0, dead_ffn=32, dead_heads=1, dead_layers=(2,), seed=0,
           dtype=torch.float32) -> Planted:
    """A DINOv2 parent: dead FFN neurons and heads per layer; a dead layer has both layer scales
    zero (its weights stay random), so it is the identity."""
    import json
    import transformers

    kw = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2 if not swiglu else 3,
              image_size=32, patch_size=8, layer_norm_eps=1e-12, use_swiglu_ffn=swiglu)
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)
        model_cls = transformers.Dinov2WithRegistersModel
    else:
        cfg = transformers.Dinov2Config(**kw)
        model_cls = transformers.Dinov2Model
    torch.manual_seed(seed)
    model = model_cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    _randomize(model, gen)
    pl = Planted(tmp, dead_layers=list(dead_layers))
    with torch.no_grad():
        for li, layer in enumerate(model.encoder.layer):
            a, m = layer.attention, layer.mlp
            if swiglu:
                F = m.down_proj.in_features
                fs = _choose(gen, F, dead_ffn)
                for lin in (m.gate_proj, m.up_proj):
                    lin.weight[fs] = 0
                    lin.bias[fs] = 0
                m.down_proj.weight[:, fs] = 0
                pl.dead_ffn[li] = fs
            else:
                pl.dead_ffn[li] = _dead_ffn_neurons(gen, m.fc1, m.fc2, m.fc1.out_features, dead_ffn)
            pl.dead_q[li] = _dead_heads(gen, a.q_proj, a.k_proj, a.v_proj, a.o_proj, 4, 16, dead_heads) \
                if dead_heads else []
            if li in pl.dead_layers:
                layer.layer_scale1.lambda1.zero_()
                layer.layer_scale2.lambda1.zero_()
    model.to(dtype).save_pretrained(tmp)
    (tmp / "preprocessor_config.json").write_text(json.dumps(VISION_PRE))
    pl.config = model.config.to_dict()
    return pl


def pixels(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(seed))

def _case_from(module: str, planted_fn, target: dict, drop: list, real_fn, real_target: dict) -> BenchCase:
    """A case whose builders live in a family's own test module (imported when run)."""
    import importlib

    return BenchCase(lambda p: planted_fn(importlib.import_module(module), p), target, drop, "AutoModelForCausalLM",
                     lambda p: real_fn(importlib.import_module(module), p), real_target)


def _neox_planted(T, p):
    T.planted_neox(p)
    return Planted(p)


BENCH_CASES["gpt_neox"] = _case_from("test_gpt_neox", _neox_planted, dict(intermediate_size=96, num_hidden_layers=3),
                                     [1], lambda T, p: T.real_parent(p),
                                     dict(hidden_size=32, num_attention_heads=2, intermediate_size=128,
                                          num_hidden_layers=2))
for _mt in ("mixtral", "qwen2_moe", "qwen3_moe"):
    _extra = {"qwen2_moe": dict(intermediate_size=64, shared_expert_intermediate_size=36),
              "qwen3_moe": dict(intermediate_size=64)}.get(_mt, {})
    _moe_target = dict(hidden_size=48, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3,
                       num_experts=4, expert_intermediate_size=24, **_extra)
    BENCH_CASES[_mt] = _case_from("test_moe", lambda T, p, mt=_mt: T.planted_moe(p, mt), _moe_target, [2],
                                  lambda T, p, mt=_mt: T.real_parent(p, mt),
                                  {**_moe_target, "num_experts": 3, "num_experts_per_tok": 1})
# staged (ConvNeXt): dead layers in stages 0 and 2 dropped exactly (widths: LayerNorm is inexact, see
# tests/test_convnext.py); the real parent is cut in every stage's width and depth
for _mt, _v2 in (("convnext", False), ("convnextv2", True)):
    BENCH_CASES[_mt] = BenchCase(
        lambda p, v2=_v2: __import__("test_convnext").convnext_parent(p, v2=v2, classifier=False),
        {"depths": [1, 3, 1]}, [0, 6], "AutoModel",
        lambda p, v2=_v2: __import__("test_convnext").real_parent(p, v2, classifier=False),
        {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 2, 2, 1]}, inputs="pixels")
