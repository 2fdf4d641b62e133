"""Gemma family: (1 + w) RMSNorms and embeddings multiplied by sqrt(hidden_size) in the forward.

Cutting the hidden size changes two things the forward computes from the dims:
- every RMSNorm averages over fewer dims: with the cut dims zero, rms(x) grows by
  s = sqrt(H_parent / H_child) and x / rms(x) shrinks by s on the kept dims, which rescale_norms'
  factor f (default s) undoes: 1 + w' = (1 + w) * f, so w' = (1 + w) * f - 1 (not w * f);
- the embedding lookup is multiplied by sqrt(H_child) instead of sqrt(H_parent): the child's
  embedding rows are scaled by e = sqrt(H_parent / H_child), so block 0 sees the parent's input
  exactly. The output head sees the final norm's output; a tied head is those same rows, now
  e times larger, so the final norm takes 1 / e: 1 + w' = (1 + w) * f / e. An untied head is
  scaled by e too, so the final norm's rule is the same whether or not the config ties.
The embedding and head compensation is exact and applies whenever the hidden size is cut (with
or without a rescale_norms stage); only the norms' factor f is rescale_norms' choice.
"""

import dataclasses
import math

import torch

from .base import Block, Family
from .llama import DENSE_MLP, SELF_ATTN
from .spaces import Space as S, layer_rule, rule


class Gemma(Family):
    def rescale(self, rule, t, factor):
        """A (1 + w) norm: 1 + w' = (1 + w) * factor."""
        if not rule.norm:
            return t
        return (1.0 + t.float()) * factor - 1.0

    def magnitude(self, rule, t):
        """A (1 + w) norm's scale is 1 + w: a dim with w = -1 is dead, one with w = 0 is not."""
        return 1.0 + t.float() if rule.norm else t

    def adjust(self, plan, rule, t):
        e = math.sqrt(plan.parent.hidden_size / plan.child.hidden_size)   # embedding normalizer ratio
        f = plan.norm_factor                                              # rescale_norms (None: off)
        if rule.tag in ("embed", "head"):
            return t if e == 1.0 else t.float() * e
        if rule.tag == "final_norm":
            g = (f or 1.0) / e
            return t if g == 1.0 else self.rescale(rule, t, g)
        return t if f is None else self.rescale(rule, t, f)

    def child_config(self, cfg, child, kept_layers, dtype_name):
        """Layer types cut with the layers; a parent config without the list (older Gemma 2/3
        configs give only the sliding-window pattern) gets the explicit list of the kept layers,
        since the child's own pattern would count from its renumbered layers."""
        out = super().child_config(cfg, child, kept_layers, dtype_name)
        pattern = self.extra.get("sliding_pattern")
        if pattern and not isinstance(cfg.get("layer_types"), list):
            pattern = int(cfg.get("sliding_window_pattern") or pattern)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                     for i in range(self.dims(cfg).num_hidden_layers)]
            out["layer_types"] = [types[i] for i in kept_layers]
        return out

    def logits(self, bm, h):
        z = super().logits(bm, h)
        cap = getattr(bm.model.config, "final_logit_softcapping", None)
        return torch.tanh(z / cap) * cap if cap else z

    def embed(self, bm, ids):
        emb = bm.model.get_input_embeddings()
        x = emb(ids)
        if "forward" in vars(emb):  # a lookup that replaced the scaled embedding's own forward
            x = x * emb.embed_scale.to(x.dtype)
        return x

    # -- one block: rotary embeddings and the causal (or sliding-window) mask its layer type needs
    def rope(self, bm, x, pos, kind):
        return bm.base.rotary_emb(x, pos)

    def layer_call(self, bm, layer, x):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        pos = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        kind = getattr(layer.self_attn, "layer_type", None) or "full_attention"
        mk = dict(config=bm.model.config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos)
        mask = (create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask)(**mk)
        y = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=self.rope(bm, x, pos, kind))
        return y[0] if isinstance(y, tuple) else y


L = "layers"
KEYS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "num_hidden_layers": "num_hidden_layers",
    "vocab_size": "vocab_size",
}
ATTN = SELF_ATTN + DENSE_MLP
ENDS = (
    rule("embed_tokens.weight", (S.VOCAB, S.HIDDEN), tag="embed"),
    rule("norm.weight", (S.HIDDEN,), norm=True, tag="final_norm"),
    rule("lm_head.weight", (S.VOCAB, S.HIDDEN), tied=True, tag="head"),
)
BLOCK = Block("AutoModelForCausalLM", "model", "layers",
              observe={S.Q_HEADS: "self_attn.o_proj", S.FFN: "mlp.down_proj"},
              final_norm="norm", head="lm_head", causal=True)

gemma = Gemma(
    name="gemma",
    model_types=("gemma",),
    rules=ATTN + (
        layer_rule(L, "input_layernorm.weight", (S.HIDDEN,), norm=True),
        layer_rule(L, "post_attention_layernorm.weight", (S.HIDDEN,), norm=True),
    ) + ENDS,
    keys=KEYS,
    norm="rms",
    tie_default=True,
    write_head_dim=True,
    block=BLOCK,
    notes="(1 + w) RMSNorm, embeddings x sqrt(hidden) (compensated in the embedding and final norm), "
          "explicit head_dim, GQA",
)


class Gemma3(Gemma):
    def rope(self, bm, x, pos, kind):
        # one rotary table per layer type (local base for sliding layers, global base for full ones)
        return bm.base.rotary_emb(x, pos, kind)


SANDWICH = (
    layer_rule(L, "input_layernorm.weight", (S.HIDDEN,), norm=True),
    layer_rule(L, "post_attention_layernorm.weight", (S.HIDDEN,), norm=True),     # on the attention output
    layer_rule(L, "pre_feedforward_layernorm.weight", (S.HIDDEN,), norm=True),
    layer_rule(L, "post_feedforward_layernorm.weight", (S.HIDDEN,), norm=True),   # on the FFN output
)

gemma2 = Gemma(
    name="gemma2",
    model_types=("gemma2",),
    rules=ATTN + SANDWICH + ENDS,
    keys=KEYS,
    norm="rms",
    heads_divide_hidden=("gemma2",),   # its transformers config validates hidden % heads == 0
    tie_default=True,
    write_head_dim=True,
    block=Block("AutoModelForCausalLM", "model", "layers",
                observe={S.Q_HEADS: "self_attn.o_proj", S.FFN: "mlp.down_proj"},
                final_norm="norm", head="lm_head", causal=True, attn="eager",  # soft-capping: no sdpa
                out_proj="self_attn.o_proj", down_proj="mlp.down_proj", down_norm="post_feedforward_layernorm"),
    notes="Gemma's rules plus sandwich norms (pre/post attention and feedforward), attention and final "
          "logit soft-capping, sliding/global `layer_types` cut with the layers",
    extra={"sliding_pattern": 2},
)

gemma3_text = Gemma3(
    name="gemma3_text",
    model_types=("gemma3_text",),
    rules=ATTN + (
        layer_rule(L, "self_attn.q_norm.weight", (None,)),   # (1 + w) over head_dim, shared by heads: never cut
        layer_rule(L, "self_attn.k_norm.weight", (None,)),
    ) + SANDWICH + ENDS,
    keys=KEYS,
    norm="rms",
    heads_divide_hidden=("gemma3_text",),   # its transformers config validates hidden % heads == 0
    tie_default=True,
    write_head_dim=True,
    block=dataclasses.replace(BLOCK, out_proj="self_attn.o_proj", down_proj="mlp.down_proj",
                              down_norm="post_feedforward_layernorm"),
    notes="Gemma 2's rules plus q/k norms, local and global rotary bases per layer type (Gemma3ForCausalLM)",
    extra={"sliding_pattern": 6},
)
