"""CLIP's vision tower (`clip_vision_model`: CLIPVisionModel, CLIPVisionModelWithProjection): a
pre-LayerNorm ViT with a CLS token (`class_embedding`), learned positions, a patch convolution
without bias, a LayerNorm before the blocks (`pre_layrnorm`) and one on the pooled CLS
(`post_layernorm`). The projection (`visual_projection`, [projection_dim, hidden]) keeps its output
axis, so the child's image embeddings stay in the space of the text tower the user keeps.

LayerNorm subtracts the mean over the hidden dims, so cutting hidden dims is not exact; the
planted tests check FFN neurons and layers exactly, and heads (which go with the hidden size)
by their kept indices.
"""

from .base import Block
from .spaces import Space as S, layer_rule, rule
from .vision import Vision


class ClipVision(Vision):
    def embedding_modules(self, bm) -> list:
        return [bm.base.embeddings, bm.base.pre_layrnorm]

    def embed(self, bm, pixels):
        return bm.base.pre_layrnorm(bm.base.embeddings(pixels, interpolate_pos_encoding=True))


L = "encoder.layers"
# the encoder blocks CLIP and SigLIP share (q/k/v/out projections with biases, fc1/fc2, two LayerNorms)
BLOCKS = (
    layer_rule(L, "layer_norm1.weight", (S.HIDDEN,), norm=True),
    layer_rule(L, "layer_norm1.bias", (S.HIDDEN,)),
    *(layer_rule(L, f"self_attn.{p}_proj.weight", (S.Q_HEADS, S.HIDDEN)) for p in "qkv"),
    *(layer_rule(L, f"self_attn.{p}_proj.bias", (S.Q_HEADS,)) for p in "qkv"),
    layer_rule(L, "self_attn.out_proj.weight", (S.HIDDEN, S.Q_HEADS)),
    layer_rule(L, "self_attn.out_proj.bias", (S.HIDDEN,)),
    layer_rule(L, "layer_norm2.weight", (S.HIDDEN,), norm=True),
    layer_rule(L, "layer_norm2.bias", (S.HIDDEN,)),
    layer_rule(L, "mlp.fc1.weight", (S.FFN, S.HIDDEN)),
    layer_rule(L, "mlp.fc1.bias", (S.FFN,)),
    layer_rule(L, "mlp.fc2.weight", (S.HIDDEN, S.FFN)),
    layer_rule(L, "mlp.fc2.bias", (S.HIDDEN,)),
)
VISION_KEYS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": None,
    "num_hidden_layers": "num_hidden_layers",
    "vocab_size": "vocab_size",
}
OBSERVE = {S.Q_HEADS: "self_attn.out_proj", S.FFN: "mlp.fc2"}

clip_vision_model = ClipVision(
    name="clip_vision_model",
    model_types=("clip_vision_model",),
    rules=(
        rule("embeddings.class_embedding", (S.HIDDEN,)),
        rule("embeddings.patch_embedding.weight", (S.HIDDEN, None, None, None)),
        rule("embeddings.position_embedding.weight", (None, S.HIDDEN)),
        rule("embeddings.position_ids", (None, None), drop=True),   # a buffer older checkpoints hold
        rule("pre_layrnorm.weight", (S.HIDDEN,), norm=True),
        rule("pre_layrnorm.bias", (S.HIDDEN,)),
        *BLOCKS,
        rule("post_layernorm.weight", (S.HIDDEN,), norm=True),
        rule("post_layernorm.bias", (S.HIDDEN,)),
        rule("visual_projection.weight", (None, S.HIDDEN)),   # projection_dim kept: embeddings stay comparable
    ),
    keys=VISION_KEYS,
    norm="layer",
    tie_default=False,
    head_dim_from_hidden=True,
    block=Block("AutoModel", "", L, observe=OBSERVE, final_norm="post_layernorm", causal=False, pool="first",
                input_name="pixel_values", call_kwargs={"interpolate_pos_encoding": True}),
    notes="CLIPVisionModel, CLIPVisionModelWithProjection: CLS token, pre_layrnorm, post_layernorm on the pooled "
          "CLS; `visual_projection` keeps projection_dim",
)
