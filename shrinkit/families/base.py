"""A family: the architecture map of one model family, as data."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import ParentError
from .spaces import Rule


@dataclass(frozen=True)
class Dims:
    """The canonical shape of a model, whatever its family calls the config keys."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


CANONICAL = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    rules: tuple[Rule, ...]
    # canonical name -> the family's config key (None: the family has no such key)
    keys: dict[str, str | None]
    norm: str                        # "rms" or "layer"
    tie_default: bool                # transformers' default for tie_word_embeddings
    head_dim_from_hidden: bool = False   # head_dim = hidden / heads (GPT-2, BERT); else explicit
    write_head_dim: bool = False         # write head_dim into the child's config
    ffn_default_factor: int | None = None  # GPT-2: n_inner null means 4 * n_embd
    layer_lists: tuple[str, ...] = ("layer_types", "mlp_layer_types")  # per-layer config lists, cut with the layers
    # model types whose transformers config requires hidden_size % num_attention_heads == 0
    heads_divide_hidden: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- config <-> dims
    def _get(self, cfg: dict, canon: str):
        key = self.keys.get(canon)
        return cfg.get(key) if key else None

    def dims(self, cfg: dict) -> Dims:
        try:
            hidden = int(self._get(cfg, "hidden_size"))
            heads = int(self._get(cfg, "num_attention_heads"))
            layers = int(self._get(cfg, "num_hidden_layers"))
            vocab = int(self._get(cfg, "vocab_size"))
        except (TypeError, ValueError) as e:
            raise ParentError(f"config.json of this {self.name} parent lacks a shape key ({e}); "
                              f"expected {', '.join(k for k in self.keys.values() if k)}") from e
        ffn = self._get(cfg, "intermediate_size")
        if ffn is None and self.ffn_default_factor:
            ffn = self.ffn_default_factor * hidden
        kv = self._get(cfg, "num_key_value_heads") or heads
        hd = None if self.head_dim_from_hidden else cfg.get("head_dim")
        if hd is None:
            if hidden % heads:
                raise ParentError(f"parent hidden size {hidden} is not divisible by its {heads} heads")
            hd = hidden // heads
        return Dims(hidden, int(ffn), heads, int(kv), int(hd), layers, vocab)

    def child_config(self, cfg: dict, child: Dims, kept_layers: list[int], dtype_name: str) -> dict:
        out = dict(cfg)
        for canon in CANONICAL:
            key = self.keys.get(canon)
            if key:
                out[key] = getattr(child, canon)
        if self.write_head_dim:
            out["head_dim"] = child.head_dim
        n_parent = self.dims(cfg).num_hidden_layers
        for k in self.layer_lists:
            v = cfg.get(k)
            if isinstance(v, list) and len(v) == n_parent:
                out[k] = [v[i] for i in kept_layers]
        for k in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]:
            out[k] = dtype_name
        return out

    def tied(self, cfg: dict) -> bool:
        return bool(cfg.get("tie_word_embeddings", self.tie_default))

    # ---------------------------------------------------------------- tensor rules
    def match(self, name: str) -> tuple[Rule, re.Match] | None:
        for r in self.rules:
            m = r.regex.search(name)
            if m:
                return r, m
        return None
