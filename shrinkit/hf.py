"""Optional checks against transformers' own config validation (imported lazily)."""

from __future__ import annotations

from .errors import ParentError, RecipeError

# the files beside a parent's weights that a child takes along (tokenizer, generation settings,
# image processor), and that a Hub download of a parent fetches
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "generation_config.json", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json",   # image processor (vision parents)
)


def check_config(cfg: dict, parent: bool = False) -> None:
    """Refuse a child config that transformers would reject (RecipeError), or with `parent`, a
    parent config it rejects (ParentError: the parent is at fault, not the recipe). No-op
    without transformers."""
    try:
        from transformers import AutoConfig
    except ImportError:  # pragma: no cover - transformers is a dependency, but the core does not need it
        return
    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    try:
        c = AutoConfig.for_model(cfg["model_type"], **kw)
        if hasattr(c, "validate"):
            c.validate()
    except Exception as e:  # transformers raises several types here
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        msg = lines[-1] if lines else type(e).__name__
        msg = msg.removeprefix("ValueError: ")
        if parent:
            raise ParentError(f"transformers rejects the parent's config: {msg}; fix the parent's config.json") from None
        raise RecipeError(f"transformers rejects the child's config: {msg}; change the target") from None
