"""The text towers of CLIP and SigLIP: `clip_text_model` (CLIPTextModel, the text encoder of
Stable Diffusion 1.x and of CLIP; CLIPTextModelWithProjection) and `siglip_text_model`
(SiglipTextModel).

Both are pre-LayerNorm transformers over token and learned position embeddings, with the
encoder blocks of their vision towers (q/k/v/out projections with biases, fc1/fc2, two
LayerNorms) and a `final_layer_norm`. CLIP's attention is causal and its text embedding is the
state at the end-of-text token (the last position of an unpadded sequence), projected by
`text_projection` ([projection_dim, hidden]); SigLIP's attention is bidirectional and it pools
the last position through `head` ([projection_size, hidden], with a bias). Both projections keep
their output axis, so the child's text embeddings stay in the space of the image tower the user
keeps; SigLIP's `projection_size` (null in older configs: the hidden size) is written into the
child's config so that a narrower child keeps it.

LayerNorm subtracts the mean over the hidden dims, so cutting hidden dims is not exact; the
planted tests check FFN neurons and layers exactly, and heads (which go with the hidden size)
by their kept indices. Verification pools the last position after the final norm (`pool:
last`), where both models read their text embedding.
"""

from __future__ import annotations

import torch

from .base import Block, Family
from .clip import BLOCKS, OBSERVE, VISION_KEYS, L
from .spaces import Space as S, rule


class TextTower(Family):
    embed_as_stored = False   # token + position embeddings summed in float32

    def embedding_modules(self, bm) -> list:
        return [bm.base.embeddings]

    def embed(self, bm, ids):
        return bm.base.embeddings(input_ids=ids)


class ClipText(TextTower):
    def layer_call(self, bm, layer, x):
        """A block with CLIP's causal mask (additive, so every attention implementation takes it)."""
        t = x.shape[1]
        mask = torch.full((t, t), float("-inf"), dtype=x.dtype, device=x.device).triu(1)[None, None]
        y = layer(x, attention_mask=mask)
        return y[0] if isinstance(y, tuple) else y


class SiglipText(TextTower):
    def child_config(self, cfg: dict, child, kept_layers: list[int], dtype_name: str) -> dict:
        out = super().child_config(cfg, child, kept_layers, dtype_name)
        # the head's output axis is kept: a null projection_size meant the parent's hidden size
        out["projection_size"] = cfg.get("projection_size") or cfg["hidden_size"]
        return out


EMBEDDINGS = (
    rule("embeddings.token_embedding.weight", (S.VOCAB, S.HIDDEN)),
    rule("embeddings.position_embedding.weight", (None, S.HIDDEN)),
    rule("embeddings.position_ids", (None, None), drop=True),   # a buffer older checkpoints hold
)
FINAL = (
    rule("final_layer_norm.weight", (S.HIDDEN,), norm=True),
    rule("final_layer_norm.bias", (S.HIDDEN,)),
)
TEXT_KEYS = {**VISION_KEYS, "max_position_embeddings": "max_position_embeddings"}


def _block(auto: str) -> Block:
    return Block(auto, "", L, observe=OBSERVE, final_norm="final_layer_norm", causal=False, pool="last")


clip_text_model = ClipText(
    name="clip_text_model",
    model_types=("clip_text_model",),
    rules=(*EMBEDDINGS, *BLOCKS, *FINAL,
           rule("text_projection.weight", (None, S.HIDDEN))),   # projection_dim kept: embeddings stay comparable
    keys=TEXT_KEYS,
    norm="layer",
    tie_default=False,
    head_dim_from_hidden=True,
    block=_block("AutoModel"),
    notes="CLIPTextModel (Stable Diffusion 1.x's text encoder), CLIPTextModelWithProjection: causal attention, "
          "final_layer_norm; `text_projection` keeps projection_dim",
)

siglip_text_model = SiglipText(
    name="siglip_text_model",
    model_types=("siglip_text_model",),
    rules=(*EMBEDDINGS, *BLOCKS, *FINAL,
           rule("head.weight", (None, S.HIDDEN)),                    # projection_size kept
           rule("head.bias", (None,))),
    keys=TEXT_KEYS,
    norm="layer",
    tie_default=False,
    head_dim_from_hidden=True,
    block=_block("SiglipTextModel"),   # not an AutoModel type in transformers
    notes="SiglipTextModel: bidirectional attention, final_layer_norm, last-position `head` keeps "
          "projection_size",
)
