"""DistilBERT (DistilBertModel, DistilBertForMaskedLM, DistilBertForSequenceClassification):
a post-LayerNorm encoder like BERT with its own names (q_lin/k_lin/v_lin/out_lin, sa_layer_norm,
ffn.lin1/lin2, output_layer_norm), no token-type embeddings, config keys dim / hidden_dim /
n_heads / n_layers, and an MLM head (vocab_transform, vocab_layer_norm, vocab_projector tied to
the word embeddings). Sinusoidal position tables (sinusoidal_pos_embds) are stored weights and
are cut like learned ones."""

from .base import Block
from .bert import Encoder
from .spaces import Space as S, layer_rule, rule

T = "transformer.layer"
distilbert = Encoder(
    name="distilbert",
    model_types=("distilbert",),
    rules=(
        rule("embeddings.word_embeddings.weight", (S.VOCAB, S.HIDDEN)),
        rule("embeddings.position_embeddings.weight", (None, S.HIDDEN)),
        rule("embeddings.LayerNorm.weight", (S.HIDDEN,), norm=True),
        rule("embeddings.LayerNorm.bias", (S.HIDDEN,)),
        rule("embeddings.position_ids", (None, None)),          # integer buffer, passes through
        layer_rule(T, "attention.q_lin.weight", (S.Q_HEADS, S.HIDDEN)),
        layer_rule(T, "attention.q_lin.bias", (S.Q_HEADS,)),
        layer_rule(T, "attention.k_lin.weight", (S.Q_HEADS, S.HIDDEN)),
        layer_rule(T, "attention.k_lin.bias", (S.Q_HEADS,)),
        layer_rule(T, "attention.v_lin.weight", (S.Q_HEADS, S.HIDDEN)),
        layer_rule(T, "attention.v_lin.bias", (S.Q_HEADS,)),
        layer_rule(T, "attention.out_lin.weight", (S.HIDDEN, S.Q_HEADS)),
        layer_rule(T, "attention.out_lin.bias", (S.HIDDEN,)),
        layer_rule(T, "sa_layer_norm.weight", (S.HIDDEN,), norm=True),
        layer_rule(T, "sa_layer_norm.bias", (S.HIDDEN,)),
        layer_rule(T, "ffn.lin1.weight", (S.FFN, S.HIDDEN)),
        layer_rule(T, "ffn.lin1.bias", (S.FFN,)),
        layer_rule(T, "ffn.lin2.weight", (S.HIDDEN, S.FFN)),
        layer_rule(T, "ffn.lin2.bias", (S.HIDDEN,)),
        layer_rule(T, "output_layer_norm.weight", (S.HIDDEN,), norm=True),
        layer_rule(T, "output_layer_norm.bias", (S.HIDDEN,)),
        rule("vocab_transform.weight", (S.HIDDEN, S.HIDDEN)),
        rule("vocab_transform.bias", (S.HIDDEN,)),
        rule("vocab_layer_norm.weight", (S.HIDDEN,), norm=True),
        rule("vocab_layer_norm.bias", (S.HIDDEN,)),
        rule("vocab_projector.weight", (S.VOCAB, S.HIDDEN), tied=True),
        rule("vocab_projector.bias", (S.VOCAB,)),
        rule("pre_classifier.weight", (S.HIDDEN, S.HIDDEN)),
        rule("pre_classifier.bias", (S.HIDDEN,)),
        rule("classifier.weight", (None, S.HIDDEN)),
        rule("classifier.bias", (None,)),
    ),
    keys={
        "hidden_size": "dim",
        "intermediate_size": "hidden_dim",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": None,
        "num_hidden_layers": "n_layers",
        "vocab_size": "vocab_size",
        "max_position_embeddings": "max_position_embeddings",
    },
    norm="layer",
    tie_default=True,
    head_dim_from_hidden=True,
    block=Block("AutoModel", "", "transformer.layer",
                observe={S.Q_HEADS: "attention.out_lin", S.FFN: "ffn.lin2"}, causal=False,
                out_proj="attention.out_lin", down_proj="ffn.lin2", residual_norm="output_layer_norm"),
    notes="DistilBertModel, DistilBertForMaskedLM, ...ForSequenceClassification; keys dim, hidden_dim, n_heads, n_layers",
)
