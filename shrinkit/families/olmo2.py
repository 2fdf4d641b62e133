"""OLMo 2: a Llama-shaped decoder with post-norms (the blocks read the raw residual stream; each
sublayer's output is RMS-normalized before it is added back: `post_attention_layernorm`,
`post_feedforward_layernorm`), and q/k norms over the *whole* projection width
(`q_norm`: num_attention_heads * head_dim, `k_norm`: num_key_value_heads * head_dim; Qwen3's are
per head and shared).

What cutting changes in the forward, and what is exact:
- hidden dims: the post-norms and the final norm average over fewer dims. With the cut dims
  zero in what they normalize, rms grows by sqrt(H_parent / H_child), which rescale_norms'
  default factor undoes exactly (as for Llama's pre-norms).
- heads: q_norm's mean square is over all heads' q. With q_norm's weight (and k_norm's) scaled by
  c = sqrt(parent heads / child heads) (always applied, like Gemma's embedding scale: the dims
  themselves change the forward), the child's normalized q on a kept head is the parent's times
  sqrt(E_all / E_kept), E the sum of squares of the token's q over all / over the kept heads.
  That is 1 (exact) when the dropped heads' q is zero on the token; otherwise the kept heads'
  q (and k, by the same rule over kv heads) grow by that per-token factor, which sharpens that
  token's attention. The planted tests check the exact case and that leaving c out breaks it.

Not supported: heal (the output projections write into a norm, not the residual stream) and
rotate_hidden (no pre-norm whose scale could be folded into its readers).
"""

from __future__ import annotations

import math

from .base import Block
from .llama import DENSE_MLP, LLAMA_KEYS, SELF_ATTN, Llama
from .spaces import Space as S, layer_rule, rule


class Olmo2(Llama):
    def adjust(self, plan, rule, t):
        if rule.tag in ("q_norm", "k_norm"):
            n = "num_attention_heads" if rule.tag == "q_norm" else "num_key_value_heads"
            c = math.sqrt(getattr(plan.parent, n) / getattr(plan.child, n))
            return t if c == 1.0 else t.float() * c
        return super().adjust(plan, rule, t)


L = "layers"
olmo2 = Olmo2(
    name="olmo2",
    model_types=("olmo2",),
    rules=(
        rule("embed_tokens.weight", (S.VOCAB, S.HIDDEN)),
        *SELF_ATTN,
        layer_rule(L, "self_attn.q_norm.weight", (S.Q_HEADS,), tag="q_norm"),    # over all heads' q
        layer_rule(L, "self_attn.k_norm.weight", (S.KV_HEADS,), tag="k_norm"),
        layer_rule(L, "self_attn.rotary_emb.inv_freq", (None,), drop=True),
        *DENSE_MLP,
        layer_rule(L, "post_attention_layernorm.weight", (S.HIDDEN,), norm=True),
        layer_rule(L, "post_feedforward_layernorm.weight", (S.HIDDEN,), norm=True),
        rule("norm.weight", (S.HIDDEN,), norm=True),
        rule("lm_head.weight", (S.VOCAB, S.HIDDEN), tied=True),
    ),
    keys=dict(LLAMA_KEYS),
    norm="rms",
    tie_default=False,
    write_head_dim=True,   # transformers reads head_dim from the config, else hidden / heads
    block=Block("AutoModelForCausalLM", "model", "layers",
                observe={S.Q_HEADS: "self_attn.o_proj", S.FFN: "mlp.down_proj"},
                final_norm="norm", head="lm_head", causal=True),
    notes="post-norms (blocks read the raw residual), q/k RMSNorms over all heads' width: their scale "
          "takes sqrt(parent/child heads), exact when the dropped heads' q/k are zero",
)
