"""GPT-NeoX (Pythia): q, k and v fused per head in `query_key_value` (rows [heads, 3, head_dim]),
parallel residual (`use_parallel_residual`), partial rotary (`rotary_pct`), LayerNorm with
biases, an untied `embed_out` head. head_dim is hidden / heads, so heads are cut together
with the hidden size; the rotary fraction applies to head_dim, which is never cut."""

from .base import Block
from .llama import Llama
from .spaces import Fused, Space as S, layer_rule, rule



class GPTNeoX(Llama):
    """Blocks take rotary position embeddings from the base model, as Llama's do; the output
    head is `lm_head` in transformers' modules and `embed_out` in checkpoints."""

    def checkpoint_name(self, param):
        return ("embed_out.weight", None) if param.endswith("lm_head.weight") else None


QKV = Fused((S.Q_HEADS,) * 3, layout="heads")
L = "layers"
gpt_neox = GPTNeoX(
    name="gpt_neox",
    model_types=("gpt_neox",),
    rules=(
        rule("embed_in.weight", (S.VOCAB, S.HIDDEN)),
        layer_rule(L, "input_layernorm.weight", (S.HIDDEN,), norm=True),
        layer_rule(L, "input_layernorm.bias", (S.HIDDEN,)),
        layer_rule(L, "post_attention_layernorm.weight", (S.HIDDEN,), norm=True),
        layer_rule(L, "post_attention_layernorm.bias", (S.HIDDEN,)),
        layer_rule(L, "attention.query_key_value.weight", (QKV, S.HIDDEN)),
        layer_rule(L, "attention.query_key_value.bias", (QKV,)),
        layer_rule(L, "attention.dense.weight", (S.HIDDEN, S.Q_HEADS)),
        layer_rule(L, "attention.dense.bias", (S.HIDDEN,)),
        layer_rule(L, "attention.bias", (None, None, None, None), drop=True),        # causal-mask buffers
        layer_rule(L, "attention.masked_bias", (), drop=True),
        layer_rule(L, "attention.rotary_emb.inv_freq", (None,), drop=True),
        layer_rule(L, "mlp.dense_h_to_4h.weight", (S.FFN, S.HIDDEN)),
        layer_rule(L, "mlp.dense_h_to_4h.bias", (S.FFN,)),
        layer_rule(L, "mlp.dense_4h_to_h.weight", (S.HIDDEN, S.FFN)),
        layer_rule(L, "mlp.dense_4h_to_h.bias", (S.HIDDEN,)),
        rule("final_layer_norm.weight", (S.HIDDEN,), norm=True),
        rule("final_layer_norm.bias", (S.HIDDEN,)),
        rule("embed_out.weight", (S.VOCAB, S.HIDDEN), tied=True),
        rule("lm_head.weight", (S.VOCAB, S.HIDDEN), tied=True),
    ),
    keys={
        "hidden_size": "hidden_size",
        "intermediate_size": "intermediate_size",
        "num_attention_heads": "num_attention_heads",
        "num_key_value_heads": None,
        "num_hidden_layers": "num_hidden_layers",
        "vocab_size": "vocab_size",
    },
    norm="layer",
    tie_default=False,
    head_dim_from_hidden=True,
    block=Block("AutoModelForCausalLM", "gpt_neox", "layers",
                observe={S.Q_HEADS: "attention.dense", S.FFN: "mlp.dense_4h_to_h"},
                final_norm="final_layer_norm", head="lm_head", causal=True),
    notes="q/k/v fused per head (`query_key_value` rows [heads, 3, head_dim]), parallel residual, partial "
          "rotary, LayerNorm with biases",
)
