"""RoBERTa and XLM-RoBERTa (RobertaModel, RobertaForMaskedLM and their XLM twins, the same
modules): BERT's embeddings and blocks under `roberta.`, positions offset past the padding
index (computed by the embeddings block), and an `lm_head` (dense, layer_norm, decoder tied to
the word embeddings)."""

from .bert import EMBEDDINGS_AND_BLOCKS, ENCODER_BLOCK, ENCODER_KEYS, POOLER, Encoder
from .spaces import Space as S, rule

class Roberta(Encoder):
    def max_positions(self, cfg: dict) -> int | None:
        """Positions start past the padding index: max_position_embeddings - pad_token_id - 1 usable."""
        n = super().max_positions(cfg)
        pad = cfg.get("pad_token_id", 1)
        return n - pad - 1 if n is not None and isinstance(pad, int) and n - pad - 1 > 0 else n


roberta = Roberta(
    name="roberta",
    model_types=("roberta", "xlm-roberta"),
    rules=EMBEDDINGS_AND_BLOCKS + POOLER + (
        rule("lm_head.dense.weight", (S.HIDDEN, S.HIDDEN)),
        rule("lm_head.dense.bias", (S.HIDDEN,)),
        rule("lm_head.layer_norm.weight", (S.HIDDEN,), norm=True),
        rule("lm_head.layer_norm.bias", (S.HIDDEN,)),
        rule("lm_head.decoder.weight", (S.VOCAB, S.HIDDEN), tied=True),
        rule("lm_head.decoder.bias", (S.VOCAB,)),
        rule("lm_head.bias", (S.VOCAB,)),
    ),
    keys=ENCODER_KEYS,
    norm="layer",
    tie_default=True,
    head_dim_from_hidden=True,
    block=ENCODER_BLOCK,
    notes="RobertaModel, RobertaForMaskedLM, XLMRobertaModel, XLMRobertaForMaskedLM; BERT's blocks, lm_head tied to the word embeddings",
)
