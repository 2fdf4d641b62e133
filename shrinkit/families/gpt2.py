"""GPT-2: Conv1D weights stored transposed ([in, out]), fused c_attn, LayerNorm, tied head."""

import torch

from .base import Block, Family
from .spaces import Fused, Space as S, layer_rule, rule


class GPT2(Family):
    """Token plus learned position embeddings form a block input."""

    def embedding_modules(self, bm):
        return [bm.base.wte, bm.base.wpe]

    def embed(self, bm, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        return bm.base.wte(ids).float() + bm.base.wpe(pos).float()


QKV = Fused((S.Q_HEADS, S.Q_HEADS, S.Q_HEADS))
H = "h"
gpt2 = GPT2(
    name="gpt2",
    model_types=("gpt2",),
    rules=(
        rule("wte.weight", (S.VOCAB, S.HIDDEN)),
        rule("wpe.weight", (None, S.HIDDEN)),
        layer_rule(H, "ln_1.weight", (S.HIDDEN,), norm=True),
        layer_rule(H, "ln_1.bias", (S.HIDDEN,)),
        layer_rule(H, "attn.c_attn.weight", (S.HIDDEN, QKV)),
        layer_rule(H, "attn.c_attn.bias", (QKV,)),
        layer_rule(H, "attn.c_proj.weight", (S.Q_HEADS, S.HIDDEN)),
        layer_rule(H, "attn.c_proj.bias", (S.HIDDEN,)),
        layer_rule(H, "attn.bias", (None, None, None, None), drop=True),         # causal-mask buffers
        layer_rule(H, "attn.masked_bias", (), drop=True),
        layer_rule(H, "ln_2.weight", (S.HIDDEN,), norm=True),
        layer_rule(H, "ln_2.bias", (S.HIDDEN,)),
        layer_rule(H, "mlp.c_fc.weight", (S.HIDDEN, S.FFN)),
        layer_rule(H, "mlp.c_fc.bias", (S.FFN,)),
        layer_rule(H, "mlp.c_proj.weight", (S.FFN, S.HIDDEN)),
        layer_rule(H, "mlp.c_proj.bias", (S.HIDDEN,)),
        rule("ln_f.weight", (S.HIDDEN,), norm=True),
        rule("ln_f.bias", (S.HIDDEN,)),
        rule("lm_head.weight", (S.VOCAB, S.HIDDEN), tied=True),
    ),
    keys={
        "hidden_size": "n_embd",
        "intermediate_size": "n_inner",
        "num_attention_heads": "n_head",
        "num_key_value_heads": None,
        "num_hidden_layers": "n_layer",
        "vocab_size": "vocab_size",
        "max_position_embeddings": "n_positions",
    },
    norm="layer",
    tie_default=True,
    head_dim_from_hidden=True,
    ffn_default_factor=4,
    block=Block("AutoModelForCausalLM", "transformer", "h",
                observe={S.Q_HEADS: "attn.c_proj", S.FFN: "mlp.c_proj"}, in_first=True,
                final_norm="ln_f", head="lm_head", causal=True,
                out_proj="attn.c_proj", down_proj="mlp.c_proj"),
    notes="Conv1D weights stored [in, out], fused c_attn, tied head, `n_inner` may be null",
)
