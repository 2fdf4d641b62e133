"""The recipe's building blocks: the target, calibration and verification blocks, output
settings and the size and count parsers. The recipe itself (shrinkit.recipe) puts them together
with the stages' own blocks, which each stage module declares (shrinkit.stages)."""

from __future__ import annotations

import re
from typing import Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, PositiveInt, StrictInt, ValidationError, field_validator,
                      model_validator)

DTYPE_NAMES = ("float32", "float16", "bfloat16")


class Strict(BaseModel):
    """Unknown keys are refused, and every number is finite (NaN and infinity are refused in
    every field: a recipe float ends up in the report, which is strict JSON)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


Count = Union[PositiveInt, str]
BUDGETS = ("params", "params_ratio", "non_embedding_params")


class Target(Strict):
    """The child's shape: explicit dims, a parameter budget, or a budget with some dims fixed."""

    hidden_size: Optional[PositiveInt] = None
    intermediate_size: Optional[PositiveInt] = None
    num_attention_heads: Optional[PositiveInt] = None
    num_key_value_heads: Optional[PositiveInt] = None
    num_hidden_layers: Optional[PositiveInt] = None
    # mixture-of-experts parents only
    num_experts: Optional[PositiveInt] = Field(
        None, description="experts per MoE layer: the least-used (activation: router load on calibration data; "
                          "magnitude: smallest weights) are dropped")
    num_experts_per_tok: Optional[PositiveInt] = Field(
        None, description="experts each token is routed to (default: the parent's, at most num_experts)")
    expert_intermediate_size: Optional[PositiveInt] = Field(None, description="FFN width of every routed expert")
    shared_expert_intermediate_size: Optional[PositiveInt] = Field(None, description="FFN width of a shared expert")
    # hierarchical (staged) parents only: one entry per stage
    hidden_sizes: Optional[list[PositiveInt]] = Field(None, max_length=64, description="the width of each stage")
    depths: Optional[list[PositiveInt]] = Field(None, max_length=64, description="the layers of each stage")
    params: Optional[Count] = Field(None, description="total parameter budget: 40M, 1.3B or an integer")
    params_ratio: Optional[float] = Field(None, gt=0, le=1, description="budget as a fraction of the parent's parameters")
    non_embedding_params: Optional[Count] = Field(
        None, description="budget for the parameters outside the tensors with a vocabulary axis (embeddings, head)")
    multiple_of: Optional[PositiveInt] = Field(
        None, le=1 << 20, description="with a budget: solved hidden and intermediate sizes are multiples of this (default 64)")

    @model_validator(mode="after")
    def _budget(self):
        given = [k for k in BUDGETS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget, not {' and '.join(given)}")
        for k in ("params", "non_embedding_params"):
            if getattr(self, k) is not None:
                parse_count(getattr(self, k), k)
        if self.multiple_of is not None and not given:
            raise ValueError("multiple_of applies only with a budget (params, params_ratio or non_embedding_params)")
        return self

    def budget(self) -> tuple[str, float] | None:
        """(kind, value) of the budget, or None for an explicit shape."""
        for k in BUDGETS:
            v = getattr(self, k)
            if v is not None:
                return k, (v if k == "params_ratio" else parse_count(v, k))
        return None


MAX_SAMPLES, MAX_SEQ_LEN, MAX_BATCH = 1 << 16, 1 << 17, 1 << 12


class Calibration(Strict):
    data: str = Field("builtin", min_length=1, max_length=4096)  # builtin | random_tokens | PATH (.txt or .jsonl with "text"); images: builtin | random_pixels | FOLDER
    samples: PositiveInt = Field(64, le=MAX_SAMPLES)
    seq_len: PositiveInt = Field(256, le=MAX_SEQ_LEN)
    batch_size: PositiveInt = Field(8, le=MAX_BATCH)  # sequences per forward call at most (fewer for wide blocks)

    @field_validator("data")
    @classmethod
    def _no_nul(cls, v):
        if "\0" in v:
            raise ValueError("must not contain a NUL character")
        return v


class Verify(Strict):
    """Held-out verification. Fields left out follow the run's calibration (data, seq_len) or the
    defaults in shrinkit.preflight; `tokens` sets the budget as samples = tokens / seq_len. The gate
    fields (any of them) make the run exit 4, child kept, when the child misses them."""
    data: Optional[str] = Field(None, min_length=1, max_length=4096)
    samples: Optional[PositiveInt] = Field(None, le=MAX_SAMPLES)
    seq_len: Optional[PositiveInt] = Field(None, le=MAX_SEQ_LEN)
    tokens: Optional[PositiveInt] = Field(None, le=MAX_SAMPLES * MAX_SEQ_LEN)
    batch_size: PositiveInt = Field(4, le=MAX_BATCH)
    # causal LMs: child KL(parent || child) per token; child perplexity / parent perplexity
    max_kl: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    max_perplexity_ratio: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    # encoders: Pearson r of the child's pairwise cosine similarities against the parent's
    min_similarity: Optional[float] = Field(None, ge=-1, le=1, allow_inf_nan=False)

    @field_validator("data")
    @classmethod
    def _no_nul(cls, v):
        if v is not None and "\0" in v:
            raise ValueError("must not contain a NUL character")
        return v

    @model_validator(mode="after")
    def _budget(self):
        if self.tokens is not None and self.samples is not None:
            raise ValueError("give tokens or samples, not both")
        return self

    def gate(self) -> dict:
        return {k: getattr(self, k) for k in ("max_kl", "max_perplexity_ratio", "min_similarity")
                if getattr(self, k) is not None}


class Output(Strict):
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None
    max_shard_size: Union[StrictInt, str] = "2GB"

    @model_validator(mode="after")
    def _size(self):
        parse_size(self.max_shard_size)
        return self


def parse_size(s: str | int) -> int:
    if isinstance(s, int):
        if s <= 0:
            raise ValueError("max_shard_size must be positive")
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(s), re.I)
    if not m:
        raise ValueError(f"max_shard_size {str(s)[:40]!r} is not a size like 2GB or 500MB")
    num = float(m.group(1))
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    if not num * mult < 2**62:
        raise ValueError(f"max_shard_size {str(s)[:24]}... is too large")
    n = int(num * mult)
    if n <= 0:
        raise ValueError("max_shard_size must be positive")
    return n


def parse_count(s: str | int, what: str = "params") -> int:
    """A parameter count: an integer, or a number with K, M, B (or G) or T, e.g. 40M, 1.3B."""
    if isinstance(s, int) and not isinstance(s, bool):
        if s <= 0:
            raise ValueError(f"{what} must be positive")
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMBGT]?)\s*", str(s).replace("_", ""), re.I)
    if not m:
        raise ValueError(f"{what} {s!r} is not a count like 40M, 1.3B or 40000000")
    x = float(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}[m.group(2).upper()]
    if not x < 2**62:
        raise ValueError(f"{what} {str(s)[:24]}... is too large")
    n = int(round(x))
    if n <= 0:
        raise ValueError(f"{what} must be positive")
    return n


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


first_error = _first_error
