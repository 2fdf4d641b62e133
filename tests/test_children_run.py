"""Every family's child runs in transformers as loaded: for every model type shrinkit supports, a
tiny parent (random weights from the model type's own transformers config class) cut to an
awkward but valid shape (odd widths where the family allows them, fewer heads, layers and
experts), loaded with `from_pretrained` and no keyword arguments at all (the default dtype,
attention and experts implementations), one forward pass, finite outputs.

A family added to shrinkit/families without a case here fails test_every_model_type_has_a_case.
The negative control of the forward check itself is in test_moe.py (a child at an expert width
the default experts kernel refuses raises in exactly this forward pass).
"""

from __future__ import annotations

import pytest
import torch

from helpers import run
from planted import _randomize

LM, MLM, BASE = "AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModel"
V = 96
DECODER = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, num_hidden_layers=3, max_position_embeddings=64, tie_word_embeddings=False)
ODD = dict(hidden_size=45, intermediate_size=37, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2)
ENCODER = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3,
               max_position_embeddings=64)
# families whose head_dim is hidden / heads: 3 heads of 16, an odd FFN
HEADS3 = dict(hidden_size=48, intermediate_size=37, num_attention_heads=3, num_hidden_layers=2)
VISION = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=3, image_size=32, patch_size=8)
MOE = dict(DECODER, num_experts_per_tok=2)
MOE_CUT = dict(hidden_size=40, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2, num_experts=3,
               expert_intermediate_size=24)

CONVNEXT = dict(hidden_sizes=[16, 32, 48, 64], depths=[2, 2, 3, 2], image_size=32)
STAGED_CUT = dict(hidden_sizes=[9, 19, 27, 45], depths=[1, 2, 2, 1])

# model type -> (config kwargs, target, Auto class, input kind)
CASES = {
    "llama": (DECODER, dict(ODD, hidden_size=46), LM, "tokens"),     # transformers: hidden % heads == 0
    "mistral": (DECODER, ODD, LM, "tokens"),
    "qwen2": (DECODER, ODD, LM, "tokens"),
    "qwen3": (DECODER, ODD, LM, "tokens"),
    "gemma": (DECODER, ODD, LM, "tokens"),
    "gemma2": (DECODER, dict(ODD, hidden_size=46), LM, "tokens"),     # its config: hidden % heads == 0
    "gemma3_text": (dict(DECODER, sliding_window=8), dict(ODD, hidden_size=46), LM, "tokens"),
    "olmo2": (dict(DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2), ODD, LM, "tokens"),
    "phi3": (dict(DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2), ODD, LM, "tokens"),
    "gpt2": (dict(vocab_size=V, n_embd=64, n_head=4, n_layer=3, n_inner=96, n_positions=64), HEADS3, LM, "tokens"),
    "gpt_neox": (dict(ENCODER, rotary_pct=0.25), HEADS3, LM, "tokens"),
    "bert": (ENCODER, HEADS3, MLM, "tokens"),
    "roberta": (dict(ENCODER, max_position_embeddings=66), HEADS3, MLM, "tokens"),
    "xlm-roberta": (dict(ENCODER, max_position_embeddings=66), HEADS3, MLM, "tokens"),
    "distilbert": (dict(vocab_size=V, dim=64, n_heads=4, hidden_dim=96, n_layers=3, max_position_embeddings=64),
                   HEADS3, MLM, "tokens"),
    "modernbert": (dict(ENCODER, local_attention=8, global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, cls_token_id=1, sep_token_id=2), HEADS3, MLM, "tokens"),
    "vit": (dict(VISION, intermediate_size=96), HEADS3, BASE, "pixels"),
    "dinov2": (dict(VISION, mlp_ratio=2), dict(HEADS3, intermediate_size=48), BASE, "pixels"),
    "dinov2_with_registers": (dict(VISION, mlp_ratio=2, num_register_tokens=2), dict(HEADS3, intermediate_size=48),
                              BASE, "pixels"),
    "clip_vision_model": (dict(VISION, intermediate_size=96, projection_dim=24), HEADS3, BASE, "pixels"),
    "siglip_vision_model": (dict(VISION, intermediate_size=96), HEADS3, BASE, "pixels"),   # with the pooling head
    "clip_text_model": (dict(ENCODER, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=24), HEADS3,
                        "CLIPTextModelWithProjection", "tokens"),
    "siglip_text_model": (dict(ENCODER, bos_token_id=0, eos_token_id=1, pad_token_id=1), HEADS3, "SiglipTextModel",
                          "tokens"),   # not an AutoModel type
    "mixtral": (dict(MOE, num_local_experts=4, intermediate_size=32), MOE_CUT, LM, "tokens"),
    "qwen2_moe": (dict(MOE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                       mlp_only_layers=[1]),
                  dict(MOE_CUT, intermediate_size=37, shared_expert_intermediate_size=37), LM, "tokens"),
    "qwen3_moe": (dict(MOE, num_experts=4, moe_intermediate_size=32, mlp_only_layers=[1]),
                  dict(MOE_CUT, intermediate_size=37), LM, "tokens"),
    # staged: odd stage widths, depths cut per stage
    "convnext": (CONVNEXT, STAGED_CUT, BASE, "pixels"),
    "convnextv2": (CONVNEXT, STAGED_CUT, BASE, "pixels"),
}


def all_cases() -> dict:
    return CASES


def test_every_model_type_has_a_case():
    from shrinkit.families import FAMILIES

    types = {t for f in FAMILIES for t in f.model_types}
    assert types <= set(all_cases()), sorted(types - set(all_cases()))


def _inputs(kind: str):
    g = torch.Generator().manual_seed(0)
    if kind == "pixels":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    return {"input_ids": torch.randint(0, V, (2, 12), generator=g)}


def make_parent(path, model_type: str, kw: dict, cls: str):
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    klass = getattr(transformers, cls)
    model = (getattr(klass, "from_config", None) or klass._from_config)(cfg)
    _randomize(model, torch.Generator().manual_seed(0))
    model.save_pretrained(path)
    return path


def first_output(out) -> torch.Tensor:
    for k in ("logits", "last_hidden_state"):
        if getattr(out, k, None) is not None:
            return getattr(out, k)
    return out[0]


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_child_runs_as_loaded(tmp_path, model_type):
    check_child_runs(tmp_path, model_type, *all_cases()[model_type])


def check_child_runs(tmp_path, model_type, kw, target, cls, kind, builder=None):
    """builder(path, model_type, kw, cls) -> parent path, for parents a config alone cannot make.
    The child is written in float32 and in bfloat16 (the dtype from_pretrained then loads it in:
    kernels' alignment rules count bytes)."""
    parent = (builder or make_parent)(tmp_path / "parent", model_type, kw, cls)
    for dtype in ("float32", "bfloat16"):
        check_child_dtype(tmp_path, parent, target, cls, kind, dtype)


def check_child_dtype(tmp_path, parent, target, cls, kind, dtype):
    import transformers

    stages = [{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"strategy": "middle"}},
              {"slice_embeddings": {}}, {"rescale_norms": {}}]
    res = run(parent, tmp_path / dtype, target=target, stages=stages, output={"dtype": dtype})
    dims = res.report["child"]["dims"]
    for k, v in target.items():
        assert dims[k] == v, (k, dims[k], v)
    model = getattr(transformers, cls).from_pretrained(tmp_path / dtype)   # defaults only
    assert model.dtype == getattr(torch, dtype)
    inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in _inputs(kind).items()}
    with torch.no_grad():
        out = first_output(model(**inputs))
    assert out.shape[0] == 2 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_config_rules_transformers_enforces_are_refused_before_writing(tmp_path, model_type):
    """Gemma 2 and 3 configs validate hidden % heads == 0 when loaded: a data-free run (which skips
    importing transformers) must refuse hidden 45 over 2 heads itself, not write a child that
    from_pretrained rejects."""
    from shrinkit.errors import RecipeError

    kw, target, cls, _ = all_cases()[model_type]
    parent = make_parent(tmp_path / "parent", model_type, kw, cls)
    with pytest.raises(RecipeError, match="multiple of num_attention_heads"):
        run(parent, tmp_path / "child", target=dict(target, hidden_size=45),
            stages=[{"rank_neurons": {"method": "magnitude"}}, {"drop_layers": {"strategy": "middle"}},
                    {"slice_embeddings": {}}])
    assert not (tmp_path / "child").exists()
