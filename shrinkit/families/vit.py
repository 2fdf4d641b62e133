"""ViT (ViTModel, ViTForImageClassification): pre-LayerNorm encoder over image patches.

Checkpoints store BERT-style names (encoder.layer.N.attention.attention.query, ...,
intermediate.dense, output.dense); transformers' modules call them layers.N.attention.q_proj,
..., mlp.fc1, mlp.fc2 and map the names when loading, so calibration maps them back here."""

from .base import Block
from .spaces import Space as S, layer_rule, rule
from .vision import Vision


class ViT(Vision):
    renames = (
        (r"(^|\.)layers\.(\d+)\.attention\.q_proj\.", r"\1encoder.layer.\2.attention.attention.query.", None),
        (r"(^|\.)layers\.(\d+)\.attention\.k_proj\.", r"\1encoder.layer.\2.attention.attention.key.", None),
        (r"(^|\.)layers\.(\d+)\.attention\.v_proj\.", r"\1encoder.layer.\2.attention.attention.value.", None),
        (r"(^|\.)layers\.(\d+)\.attention\.o_proj\.", r"\1encoder.layer.\2.attention.output.dense.", None),
        (r"(^|\.)layers\.(\d+)\.mlp\.fc1\.", r"\1encoder.layer.\2.intermediate.dense.", None),
        (r"(^|\.)layers\.(\d+)\.mlp\.fc2\.", r"\1encoder.layer.\2.output.dense.", None),
        (r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2.", None),
    )

    def block_for(self, cfg: dict):
        if any(a.endswith("ForImageClassification") for a in cfg.get("architectures") or ()):
            return CLASSIFIER
        return self.block

    def child_config(self, cfg, child, kept_layers, dtype_name):
        out = super().child_config(cfg, child, kept_layers, dtype_name)
        # the pooler's output keeps its size (transformers' default would follow hidden_size)
        out.setdefault("pooler_output_size", self.dims(cfg).hidden_size)
        return out

    def embed(self, bm, pixels):
        return bm.base.embeddings(pixels, interpolate_pos_encoding=True)


E = "encoder.layer"
OBSERVE = {S.Q_HEADS: "attention.o_proj", S.FFN: "mlp.fc2"}
CALL = {"interpolate_pos_encoding": True}
BACKBONE = Block("AutoModel", "", "layers", observe=OBSERVE, final_norm="layernorm", causal=False, pool="first",
                 input_name="pixel_values", call_kwargs=CALL)
CLASSIFIER = Block("AutoModelForImageClassification", "vit", "layers", observe=OBSERVE, final_norm="layernorm",
                   head="classifier", causal=False, pool="first", input_name="pixel_values", call_kwargs=CALL)

vit = ViT(
    name="vit",
    model_types=("vit",),
    rules=(
        rule("embeddings.cls_token", (None, None, S.HIDDEN)),
        rule("embeddings.mask_token", (None, None, S.HIDDEN)),
        rule("embeddings.position_embeddings", (None, None, S.HIDDEN)),
        rule("embeddings.patch_embeddings.projection.weight", (S.HIDDEN, None, None, None)),
        rule("embeddings.patch_embeddings.projection.bias", (S.HIDDEN,)),
        layer_rule(E, "layernorm_before.weight", (S.HIDDEN,), norm=True),
        layer_rule(E, "layernorm_before.bias", (S.HIDDEN,)),
        layer_rule(E, "attention.attention.query.weight", (S.Q_HEADS, S.HIDDEN)),
        layer_rule(E, "attention.attention.query.bias", (S.Q_HEADS,)),
        layer_rule(E, "attention.attention.key.weight", (S.Q_HEADS, S.HIDDEN)),
        layer_rule(E, "attention.attention.key.bias", (S.Q_HEADS,)),
        layer_rule(E, "attention.attention.value.weight", (S.Q_HEADS, S.HIDDEN)),
        layer_rule(E, "attention.attention.value.bias", (S.Q_HEADS,)),
        layer_rule(E, "attention.output.dense.weight", (S.HIDDEN, S.Q_HEADS)),
        layer_rule(E, "attention.output.dense.bias", (S.HIDDEN,)),
        layer_rule(E, "layernorm_after.weight", (S.HIDDEN,), norm=True),
        layer_rule(E, "layernorm_after.bias", (S.HIDDEN,)),
        layer_rule(E, "intermediate.dense.weight", (S.FFN, S.HIDDEN)),
        layer_rule(E, "intermediate.dense.bias", (S.FFN,)),
        layer_rule(E, "output.dense.weight", (S.HIDDEN, S.FFN)),
        layer_rule(E, "output.dense.bias", (S.HIDDEN,)),
        rule("layernorm.weight", (S.HIDDEN,), norm=True),
        rule("layernorm.bias", (S.HIDDEN,)),
        rule("pooler.dense.weight", (None, S.HIDDEN)),      # output: pooler_output_size, kept
        rule("pooler.dense.bias", (None,)),
        rule("classifier.weight", (None, S.HIDDEN)),        # class axis kept, hidden axis cut
        rule("classifier.bias", (None,)),
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
    block=BACKBONE,
    notes="ViTModel (pooler), ViTForImageClassification (class axis kept); images via the parent's "
          "preprocessor_config.json",
)
