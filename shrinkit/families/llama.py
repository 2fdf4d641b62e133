"""Llama family: Llama, Mistral, Qwen2 (qkv biases), Qwen3 (q/k norms). RMSNorm, GQA."""

from .base import Family
from .spaces import Space as S, layer_rule, rule

L = "layers"
llama = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    rules=(
        rule("embed_tokens.weight", (S.VOCAB, S.HIDDEN)),
        layer_rule(L, "self_attn.q_proj.weight", (S.Q_HEADS, S.HIDDEN)),
        layer_rule(L, "self_attn.q_proj.bias", (S.Q_HEADS,)),
        layer_rule(L, "self_attn.k_proj.weight", (S.KV_HEADS, S.HIDDEN)),
        layer_rule(L, "self_attn.k_proj.bias", (S.KV_HEADS,)),
        layer_rule(L, "self_attn.v_proj.weight", (S.KV_HEADS, S.HIDDEN)),
        layer_rule(L, "self_attn.v_proj.bias", (S.KV_HEADS,)),
        layer_rule(L, "self_attn.o_proj.weight", (S.HIDDEN, S.Q_HEADS)),
        layer_rule(L, "self_attn.o_proj.bias", (S.HIDDEN,)),
        layer_rule(L, "self_attn.q_norm.weight", (None,)),   # over head_dim, shared by heads
        layer_rule(L, "self_attn.k_norm.weight", (None,)),
        layer_rule(L, "self_attn.rotary_emb.inv_freq", (None,), drop=True),
        layer_rule(L, "mlp.gate_proj.weight", (S.FFN, S.HIDDEN)),
        layer_rule(L, "mlp.up_proj.weight", (S.FFN, S.HIDDEN)),
        layer_rule(L, "mlp.down_proj.weight", (S.HIDDEN, S.FFN)),
        layer_rule(L, "input_layernorm.weight", (S.HIDDEN,), norm=True),
        layer_rule(L, "post_attention_layernorm.weight", (S.HIDDEN,), norm=True),
        rule("norm.weight", (S.HIDDEN,), norm=True),
        rule("lm_head.weight", (S.VOCAB, S.HIDDEN), tied=True),
    ),
    keys={
        "hidden_size": "hidden_size",
        "intermediate_size": "intermediate_size",
        "num_attention_heads": "num_attention_heads",
        "num_key_value_heads": "num_key_value_heads",
        "num_hidden_layers": "num_hidden_layers",
        "vocab_size": "vocab_size",
    },
    norm="rms",
    tie_default=False,
    write_head_dim=True,
    heads_divide_hidden=("llama",),
)
