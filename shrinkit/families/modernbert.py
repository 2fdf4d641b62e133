"""ModernBERT (ModernBertModel, ModernBertForMaskedLM, ...ForSequenceClassification): a pre-norm
encoder with a fused q/k/v projection (`attn.Wqkv`, rows [3, heads, head_dim]), a fused GeGLU
(`mlp.Wi`: the activation's input half, then the gate half), LayerNorms without biases by default,
rotary positions, and attention that alternates between local (a sliding window of
`local_attention` tokens) and global layers (`layer_types`, or every `global_attn_every_n_layers`-th
layer in older configs). No biases by default (`attention_bias`, `mlp_bias`, `norm_bias` false);
a bias that a config turns on follows its weight's output axis.

Layer 0 has no attention norm (transformers builds it as an identity), so the child keeps parent
layer 0 as its layer 0: a drop list or strategy that drops it is refused, and importance dropping
never picks it. The child's `layer_types` are the kept parent layers' types, written out even when
the parent config gives only the every-n pattern (the child's own count would start over).

LayerNorm subtracts the mean over the hidden dims, so cutting hidden dims is not exact; the
planted tests check FFN neurons (both GeGLU halves), heads (kept indices) and layers exactly.
"""

from __future__ import annotations

import math

import torch

from ..errors import RecipeError
from .base import Block, Family
from .spaces import Fused, Space as S, layer_rule, rule


class ModernBert(Family):
    embed_as_stored = False   # the embeddings block ends in a LayerNorm

    def embedding_modules(self, bm):
        return [bm.base.embeddings]

    def embed(self, bm, ids):
        return bm.base.embeddings(input_ids=ids)

    def layer_call(self, bm, layer, x):
        from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

        pos = torch.arange(x.shape[1], device=x.device)[None]
        kind = getattr(layer, "attention_type", "full_attention")
        make = create_bidirectional_sliding_window_mask if kind == "sliding_attention" else create_bidirectional_mask
        mask = make(config=bm.model.config, inputs_embeds=x, attention_mask=None)
        y = layer(x, attention_mask=mask, position_embeddings=bm.base.rotary_emb(x, pos, kind))
        return y[0] if isinstance(y, tuple) else y

    # ---- layer 0 (no attention norm) stays layer 0; layer types follow the kept layers
    def layer_types(self, cfg: dict) -> list[str]:
        v = cfg.get("layer_types")
        if isinstance(v, list):
            return v
        n = int(cfg.get("global_attn_every_n_layers") or 3)
        return ["sliding_attention" if i % n else "full_attention" for i in range(self.dims(cfg).num_hidden_layers)]

    def check_layers(self, kept_layers: list[int]) -> None:
        if kept_layers and kept_layers[0] != 0:
            raise RecipeError(f"{self.name} layer 0 has no attention norm (transformers builds it as an identity), so "
                              "the child must keep parent layer 0; drop other layers")

    def pin_influence(self, influence: list[float]) -> list[float]:
        return [math.inf, *influence[1:]] if influence else influence

    def child_config(self, cfg, child, kept_layers, dtype_name):
        self.check_layers(kept_layers)
        out = super().child_config(cfg, child, kept_layers, dtype_name)
        types = self.layer_types(cfg)
        out["layer_types"] = [types[i] for i in kept_layers]
        return out


L = "layers"
QKV = Fused((S.Q_HEADS, S.Q_HEADS, S.Q_HEADS))   # q, k, v: heads x head_dim rows each
GEGLU = Fused((S.FFN, S.FFN))                     # the activation's input half, then the gate half
HEAD = (
    rule("head.dense.weight", (S.HIDDEN, S.HIDDEN)),
    rule("head.dense.bias", (S.HIDDEN,)),
    rule("head.norm.weight", (S.HIDDEN,), norm=True),
    rule("head.norm.bias", (S.HIDDEN,)),
    rule("decoder.weight", (S.VOCAB, S.HIDDEN), tied=True),
    rule("decoder.bias", (S.VOCAB,)),
    rule("classifier.weight", (None, S.HIDDEN)),
    rule("classifier.bias", (None,)),
)
modernbert = ModernBert(
    name="modernbert",
    model_types=("modernbert",),
    rules=(
        rule("embeddings.tok_embeddings.weight", (S.VOCAB, S.HIDDEN)),
        rule("embeddings.norm.weight", (S.HIDDEN,), norm=True),
        rule("embeddings.norm.bias", (S.HIDDEN,)),
        layer_rule(L, "attn_norm.weight", (S.HIDDEN,), norm=True),   # every layer but 0
        layer_rule(L, "attn_norm.bias", (S.HIDDEN,)),
        layer_rule(L, "attn.Wqkv.weight", (QKV, S.HIDDEN)),
        layer_rule(L, "attn.Wqkv.bias", (QKV,)),
        layer_rule(L, "attn.Wo.weight", (S.HIDDEN, S.Q_HEADS)),
        layer_rule(L, "attn.Wo.bias", (S.HIDDEN,)),
        layer_rule(L, "mlp_norm.weight", (S.HIDDEN,), norm=True),
        layer_rule(L, "mlp_norm.bias", (S.HIDDEN,)),
        layer_rule(L, "mlp.Wi.weight", (GEGLU, S.HIDDEN)),
        layer_rule(L, "mlp.Wi.bias", (GEGLU,)),
        layer_rule(L, "mlp.Wo.weight", (S.HIDDEN, S.FFN)),
        layer_rule(L, "mlp.Wo.bias", (S.HIDDEN,)),
        rule("final_norm.weight", (S.HIDDEN,), norm=True),
        rule("final_norm.bias", (S.HIDDEN,)),
        *HEAD,
    ),
    keys={
        "hidden_size": "hidden_size",
        "intermediate_size": "intermediate_size",
        "num_attention_heads": "num_attention_heads",
        "num_key_value_heads": None,
        "num_hidden_layers": "num_hidden_layers",
        "vocab_size": "vocab_size",
        "max_position_embeddings": "max_position_embeddings",
    },
    norm="layer",
    tie_default=True,
    head_dim_from_hidden=True,
    block=Block("AutoModel", "", "layers", observe={S.Q_HEADS: "attn.Wo", S.FFN: "mlp.Wo"},
                final_norm="final_norm", causal=False),
    notes="fused Wqkv and GeGLU Wi, LayerNorm (no biases by default), local/global `layer_types` cut with the "
          "layers; layer 0 (no attention norm) always kept",
)
