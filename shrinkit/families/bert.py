"""BERT (BertModel, BertForMaskedLM, BertForPreTraining; MiniLM): post-LayerNorm encoder."""

from .base import Block, Family
from .spaces import Space as S, layer_rule, rule


class Encoder(Family):
    """BERT-style encoders: the embeddings block (word + position + token type, LayerNorm)
    forms a block input; blocks are post-LayerNorm and see no attention mask."""

    embed_as_stored = False  # the embeddings block has a LayerNorm: everything in float32

    def embedding_modules(self, bm):
        return [bm.base.embeddings]

    def embed(self, bm, ids):
        return bm.base.embeddings(input_ids=ids)


E = "encoder.layer"
# the embeddings block and the encoder blocks, shared by BERT, RoBERTa and XLM-RoBERTa
EMBEDDINGS_AND_BLOCKS = (
    rule("embeddings.word_embeddings.weight", (S.VOCAB, S.HIDDEN)),
    rule("embeddings.position_embeddings.weight", (None, S.HIDDEN)),
    rule("embeddings.token_type_embeddings.weight", (None, S.HIDDEN)),
    rule("embeddings.LayerNorm.weight", (S.HIDDEN,), norm=True),
    rule("embeddings.LayerNorm.bias", (S.HIDDEN,)),
    rule("embeddings.position_ids", (None, None)),          # integer buffer, passes through
    rule("embeddings.token_type_ids", (None, None)),
    layer_rule(E, "attention.self.query.weight", (S.Q_HEADS, S.HIDDEN)),
    layer_rule(E, "attention.self.query.bias", (S.Q_HEADS,)),
    layer_rule(E, "attention.self.key.weight", (S.Q_HEADS, S.HIDDEN)),
    layer_rule(E, "attention.self.key.bias", (S.Q_HEADS,)),
    layer_rule(E, "attention.self.value.weight", (S.Q_HEADS, S.HIDDEN)),
    layer_rule(E, "attention.self.value.bias", (S.Q_HEADS,)),
    layer_rule(E, "attention.output.dense.weight", (S.HIDDEN, S.Q_HEADS)),
    layer_rule(E, "attention.output.dense.bias", (S.HIDDEN,)),
    layer_rule(E, "attention.output.LayerNorm.weight", (S.HIDDEN,), norm=True),
    layer_rule(E, "attention.output.LayerNorm.bias", (S.HIDDEN,)),
    layer_rule(E, "intermediate.dense.weight", (S.FFN, S.HIDDEN)),
    layer_rule(E, "intermediate.dense.bias", (S.FFN,)),
    layer_rule(E, "output.dense.weight", (S.HIDDEN, S.FFN)),
    layer_rule(E, "output.dense.bias", (S.HIDDEN,)),
    layer_rule(E, "output.LayerNorm.weight", (S.HIDDEN,), norm=True),
    layer_rule(E, "output.LayerNorm.bias", (S.HIDDEN,)),
)
POOLER = (
    rule("pooler.dense.weight", (S.HIDDEN, S.HIDDEN)),
    rule("pooler.dense.bias", (S.HIDDEN,)),
)
# keys, block description: the same for BERT, RoBERTa and XLM-RoBERTa
ENCODER_KEYS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": None,
    "num_hidden_layers": "num_hidden_layers",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
}
ENCODER_BLOCK = Block("AutoModel", "", "encoder.layer",
                      observe={S.Q_HEADS: "attention.output.dense", S.FFN: "output.dense"}, causal=False,
                      out_proj="attention.output.dense", down_proj="output.dense", residual_norm="output.LayerNorm")

bert = Encoder(
    name="bert",
    model_types=("bert",),
    rules=EMBEDDINGS_AND_BLOCKS + POOLER + (
        rule("cls.predictions.transform.dense.weight", (S.HIDDEN, S.HIDDEN)),
        rule("cls.predictions.transform.dense.bias", (S.HIDDEN,)),
        rule("cls.predictions.transform.LayerNorm.weight", (S.HIDDEN,), norm=True),
        rule("cls.predictions.transform.LayerNorm.bias", (S.HIDDEN,)),
        rule("cls.predictions.decoder.weight", (S.VOCAB, S.HIDDEN), tied=True),
        rule("cls.predictions.decoder.bias", (S.VOCAB,)),
        rule("cls.predictions.bias", (S.VOCAB,)),
        rule("cls.seq_relationship.weight", (None, S.HIDDEN)),
        rule("cls.seq_relationship.bias", (None,)),
    ),
    keys=ENCODER_KEYS,
    norm="layer",
    tie_default=True,
    head_dim_from_hidden=True,
    block=ENCODER_BLOCK,
    notes="BertModel, BertForMaskedLM, BertForPreTraining (MiniLM); integer buffers pass through",
)
