"""SigLIP's vision tower (`siglip_vision_model`: SiglipVisionModel): a pre-LayerNorm ViT without a
CLS token (patch convolution with bias, learned positions), a LayerNorm over every position
(`post_layernorm`) and, with `vision_use_head`, a pooling head: a learned probe attending over
the positions (`head.attention`, a torch MultiheadAttention with fused q/k/v `in_proj_weight`,
num_attention_heads heads of head_dim), a LayerNorm and an MLP of intermediate_size.

The head is outside the blocks but cut in the blocks' spaces: its attention keeps whole heads and
its MLP neurons of its own (kept sets keyed None, ranked by `magnitude` from the head's weights;
`activation` ranking keeps the head's first heads and neurons, since calibration runs the blocks,
not the head). Verification compares mean-pooled `post_layernorm` outputs (not the head's).

LayerNorm subtracts the mean over the hidden dims, so cutting hidden dims is not exact; the
planted tests check FFN neurons and layers exactly (the head's output included) and heads by their
kept indices.
"""

from .base import Block
from .clip import BLOCKS, OBSERVE, VISION_KEYS, L
from .spaces import Fused, Space as S, rule
from .vision import Vision


class SiglipVision(Vision):
    def extra_tokens(self, cfg: dict) -> int:
        return 0   # no CLS token

    def embed(self, bm, pixels):
        return bm.base.embeddings(pixels, interpolate_pos_encoding=True)


HEAD_QKV = Fused((S.Q_HEADS, S.Q_HEADS, S.Q_HEADS))
siglip_vision_model = SiglipVision(
    name="siglip_vision_model",
    model_types=("siglip_vision_model",),
    rules=(
        rule("embeddings.patch_embedding.weight", (S.HIDDEN, None, None, None)),
        rule("embeddings.patch_embedding.bias", (S.HIDDEN,)),
        rule("embeddings.position_embedding.weight", (None, S.HIDDEN)),
        rule("embeddings.position_ids", (None, None), drop=True),   # a buffer older checkpoints hold
        *BLOCKS,
        rule("post_layernorm.weight", (S.HIDDEN,), norm=True),
        rule("post_layernorm.bias", (S.HIDDEN,)),
        rule("head.probe", (None, None, S.HIDDEN)),
        rule("head.attention.in_proj_weight", (HEAD_QKV, S.HIDDEN)),
        rule("head.attention.in_proj_bias", (HEAD_QKV,)),
        rule("head.attention.out_proj.weight", (S.HIDDEN, S.Q_HEADS)),
        rule("head.attention.out_proj.bias", (S.HIDDEN,)),
        rule("head.layernorm.weight", (S.HIDDEN,), norm=True),
        rule("head.layernorm.bias", (S.HIDDEN,)),
        rule("head.mlp.fc1.weight", (S.FFN, S.HIDDEN)),
        rule("head.mlp.fc1.bias", (S.FFN,)),
        rule("head.mlp.fc2.weight", (S.HIDDEN, S.FFN)),
        rule("head.mlp.fc2.bias", (S.HIDDEN,)),
    ),
    keys=VISION_KEYS,
    norm="layer",
    tie_default=False,
    head_dim_from_hidden=True,
    block=Block("AutoModel", "", L, observe=OBSERVE, final_norm="post_layernorm", causal=False, pool="mean",
                input_name="pixel_values", call_kwargs={"interpolate_pos_encoding": True}),
    notes="SiglipVisionModel: no CLS token, post_layernorm over every position; the attention-pooling head "
          "(probe, fused in_proj, MLP) keeps whole heads and neurons of its own",
)
