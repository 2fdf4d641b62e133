"""Llama family: Llama, Mistral, Qwen2 (qkv biases), Qwen3 (q/k norms). RMSNorm, GQA."""

import torch

from .base import Block, Family
from .spaces import Space as S, layer_rule, rule


class Llama(Family):
    def layer_call(self, bm, layer, x):
        # rotary position embeddings come from the model, once per call
        pos = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        pe = bm.base.rotary_emb(x, pos)
        y = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
        return y[0] if isinstance(y, tuple) else y


L = "layers"
# q/k/v/o projections (GQA, optional biases) and the gated MLP, shared by the families built like Llama
SELF_ATTN = (
    layer_rule(L, "self_attn.q_proj.weight", (S.Q_HEADS, S.HIDDEN)),
    layer_rule(L, "self_attn.q_proj.bias", (S.Q_HEADS,)),
    layer_rule(L, "self_attn.k_proj.weight", (S.KV_HEADS, S.HIDDEN)),
    layer_rule(L, "self_attn.k_proj.bias", (S.KV_HEADS,)),
    layer_rule(L, "self_attn.v_proj.weight", (S.KV_HEADS, S.HIDDEN)),
    layer_rule(L, "self_attn.v_proj.bias", (S.KV_HEADS,)),
    layer_rule(L, "self_attn.o_proj.weight", (S.HIDDEN, S.Q_HEADS)),
    layer_rule(L, "self_attn.o_proj.bias", (S.HIDDEN,)),
)
DENSE_MLP = (
    layer_rule(L, "mlp.gate_proj.weight", (S.FFN, S.HIDDEN)),
    layer_rule(L, "mlp.up_proj.weight", (S.FFN, S.HIDDEN)),
    layer_rule(L, "mlp.down_proj.weight", (S.HIDDEN, S.FFN)),
)
# the config keys of Llama-style decoders: each canonical dimension under its own name
LLAMA_KEYS = {k: k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                             "num_hidden_layers", "vocab_size", "max_position_embeddings")}

llama = Llama(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    rules=(
        rule("embed_tokens.weight", (S.VOCAB, S.HIDDEN)),
        *SELF_ATTN,
        layer_rule(L, "self_attn.q_norm.weight", (None,)),   # over head_dim, shared by heads
        layer_rule(L, "self_attn.k_norm.weight", (None,)),
        layer_rule(L, "self_attn.rotary_emb.inv_freq", (None,), drop=True),
        *DENSE_MLP,
        layer_rule(L, "input_layernorm.weight", (S.HIDDEN,), norm=True),
        layer_rule(L, "post_attention_layernorm.weight", (S.HIDDEN,), norm=True),
        rule("norm.weight", (S.HIDDEN,), norm=True),
        rule("lm_head.weight", (S.VOCAB, S.HIDDEN), tied=True),
    ),
    keys=dict(LLAMA_KEYS),
    norm="rms",
    tie_default=False,
    write_head_dim=True,
    heads_divide_hidden=("llama",),
    block=Block("AutoModelForCausalLM", "model", "layers",
                observe={S.Q_HEADS: "self_attn.o_proj", S.FFN: "mlp.down_proj"},
                final_norm="norm", head="lm_head", causal=True,
                out_proj="self_attn.o_proj", down_proj="mlp.down_proj"),
    norm_readers={
        "input_layernorm.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "post_attention_layernorm.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        "norm.weight": ("lm_head.weight",),
    },
    notes="RMSNorm, GQA, qkv biases (Qwen2), q/k norms (Qwen3), tied or untied head",
)
