"""Phi-3: fused qkv_proj with grouped-query attention (q is heads * head_dim rows, k and v are
kv_heads * head_dim rows each) and fused gate_up_proj (gate then up, ffn rows each); RMSNorm,
partial rotary (the child keeps head_dim, so the rotary dims are unchanged), optional sliding window."""

import torch

from .base import Block, Family
from .spaces import Fused, Space as S, layer_rule, rule


class Phi3(Family):
    def layer_call(self, bm, layer, x):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        pos = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        cfg = bm.model.config
        make = create_causal_mask if getattr(cfg, "sliding_window", None) is None else create_sliding_window_causal_mask
        mask = make(config=cfg, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos)
        y = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=bm.base.rotary_emb(x, pos))
        return y[0] if isinstance(y, tuple) else y


QKV = Fused((S.Q_HEADS, S.KV_HEADS, S.KV_HEADS))   # sizes from the dims: q, then k, then v
GATE_UP = Fused((S.FFN, S.FFN))
L = "layers"
phi3 = Phi3(
    name="phi3",
    model_types=("phi3",),
    rules=(
        rule("embed_tokens.weight", (S.VOCAB, S.HIDDEN)),
        layer_rule(L, "self_attn.qkv_proj.weight", (QKV, S.HIDDEN)),
        layer_rule(L, "self_attn.qkv_proj.bias", (QKV,)),
        layer_rule(L, "self_attn.o_proj.weight", (S.HIDDEN, S.Q_HEADS)),
        layer_rule(L, "self_attn.o_proj.bias", (S.HIDDEN,)),
        layer_rule(L, "mlp.gate_up_proj.weight", (GATE_UP, S.HIDDEN)),
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
    write_head_dim=True,   # Phi-3 configs derive head_dim from hidden / heads; the child keeps the parent's
    block=Block("AutoModelForCausalLM", "model", "layers",
                observe={S.Q_HEADS: "self_attn.o_proj", S.FFN: "mlp.down_proj"},
                final_norm="norm", head="lm_head", causal=True),
    notes="fused qkv_proj with GQA (q, k, v parts sized from the dims) and gate_up_proj, partial rotary, "
          "sliding window",
)
