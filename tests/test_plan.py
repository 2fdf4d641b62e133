"""Shape rules: shrinkit refuses exactly the child shapes that transformers' config validation
rejects (it checks them itself, so a data-free run need not import transformers)."""

import itertools

import pytest

from helpers import recipe
from shrinkit.errors import RecipeError
from shrinkit.families import family_for
from shrinkit.hf import check_config
from shrinkit.plan import resolve_target

PARENTS = {
    "llama": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8, intermediate_size=96,
                  num_hidden_layers=4, vocab_size=96),
    "mistral": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8, intermediate_size=96,
                    num_hidden_layers=4, vocab_size=96),
    "qwen2": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, intermediate_size=96,
                  num_hidden_layers=4, vocab_size=96),
    "qwen3": dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, head_dim=8, intermediate_size=96,
                  num_hidden_layers=4, vocab_size=96),
    "gpt2": dict(n_embd=64, n_head=8, n_layer=4, vocab_size=96),
    "bert": dict(hidden_size=64, num_attention_heads=8, intermediate_size=96, num_hidden_layers=4, vocab_size=96),
    "roberta": dict(hidden_size=64, num_attention_heads=8, intermediate_size=96, num_hidden_layers=4, vocab_size=96),
    "xlm-roberta": dict(hidden_size=64, num_attention_heads=8, intermediate_size=96, num_hidden_layers=4,
                        vocab_size=96),
    "distilbert": dict(dim=64, n_heads=8, hidden_dim=96, n_layers=4, vocab_size=96),
}


def parent_config(mt):
    from transformers import AutoConfig
    return AutoConfig.for_model(mt, **PARENTS[mt]).to_dict()


@pytest.mark.parametrize("mt", sorted(PARENTS))
def test_shrinkit_and_transformers_agree_on_child_shapes(mt):
    cfg = parent_config(mt)
    fam = family_for(cfg)
    parent = fam.dims(cfg)
    checked = 0
    for hidden, heads, kv, layers in itertools.product((64, 48, 40, 36, 32), (8, 6, 4, 3, 2), (4, 2, 1, None), (4, 3)):
        r = recipe(target=dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                               num_hidden_layers=layers))
        try:
            structural = resolve_target(fam, parent, r, None, None)  # shrinkit's own rules, transformers' left out
        except RecipeError:
            continue
        try:
            resolve_target(fam, parent, r, None, mt)
            ours = True
        except RecipeError:
            ours = False
        try:
            check_config(fam.child_config(cfg, structural, list(range(structural.num_hidden_layers)), "float32"))
            theirs = True
        except RecipeError:
            theirs = False
        assert ours == theirs, (mt, hidden, heads, kv, layers, ours, theirs)
        checked += 1
    assert checked >= 5


def test_layer_type_lists_are_cut():
    cfg = parent_config("qwen2")
    cfg["layer_types"] = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    fam = family_for(cfg)
    child = resolve_target(fam, fam.dims(cfg), recipe(target=dict(num_hidden_layers=2)), 2, "qwen2")
    out = fam.child_config(cfg, child, [1, 2], "float32")
    assert out["layer_types"] == ["sliding_attention", "full_attention"]
    check_config(out)
