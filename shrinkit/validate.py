"""Input schemas: every file shrinkit reads is parsed with a size cap and bounded nesting, and
checked by a typed model, so a malformed field is one line naming the file and the field.

The models here cover the generic files (a safetensors header entry, the shard index, the
sha256 cache, calibration rows, the common keys of config.json); the shape keys each family
needs are checked by the family (shrinkit.families.base.Family.check_config).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

MAX_CONFIG = 16 << 20       # config.json
MAX_INDEX = 256 << 20       # model.safetensors.index.json
MAX_RECIPE = 1 << 20        # a recipe
MAX_CACHE = 64 << 20        # the sha256 cache
MAX_DEPTH = 64              # nesting of any JSON or YAML document
MAX_DIMS = 16               # axes of one tensor


class TooLarge(ValueError):
    pass


class TooDeep(ValueError):
    pass


def read_capped(path: str | Path, cap: int, binary: bool = False):
    """At most `cap` bytes of a file; TooLarge if there is more (a FIFO or /dev/zero included)."""
    with open(path, "rb") as f:
        raw = f.read(cap + 1)
    if len(raw) > cap:
        raise TooLarge(f"larger than {_size(cap)}")
    return raw if binary else raw.decode("utf-8")


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB"


def depth(x: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a parsed document (iterative: never recurses); TooDeep past `limit`."""
    best = 0
    stack = [(x, 1)]
    seen: set[int] = set()   # YAML aliases share containers: each is walked once
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            items = v.values()
        elif isinstance(v, list):
            items = v
        else:
            continue
        if id(v) in seen:
            continue
        seen.add(id(v))
        if d > limit:
            raise TooDeep(f"nested more than {limit} levels deep")
        best = max(best, d)
        stack.extend((c, d + 1) for c in items)
    return best


def loads(raw: str | bytes) -> Any:
    """json.loads with bounded nesting (a deep document is a clean error, not a RecursionError)."""
    _brackets(raw)
    try:
        v = json.loads(raw)
    except RecursionError:
        raise TooDeep(f"nested more than {MAX_DEPTH} levels deep") from None
    return v


def _brackets(raw: str | bytes, limit: int = MAX_DEPTH) -> None:
    """Fast pre-check of JSON nesting on the raw text (strings skipped), so a document of a
    million '[' never reaches the parser."""
    b = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if b.count(b"[") + b.count(b"{") <= limit:
        return
    d = 0
    in_str = esc = False
    for c in b:
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:
                esc = True
            elif c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):
            d += 1
            if d > limit:
                raise TooDeep(f"nested more than {limit} levels deep")
        elif c in (0x5D, 0x7D):
            d -= 1


def field_error(e: ValidationError, prefix: str = "") -> str:
    """The first error of a pydantic validation as `field.path: message`."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in (*([prefix] if prefix else []), *err["loc"]))
    msg = err["msg"].removeprefix("Value error, ")
    return f"field {loc}: {msg}" if loc else msg


# ------------------------------------------------------------------ models

NonNeg = Annotated[StrictInt, Field(ge=0)]


class HeaderEntry(BaseModel):
    """One tensor of a safetensors header."""

    model_config = ConfigDict(extra="ignore")
    dtype: StrictStr
    shape: Annotated[list[NonNeg], Field(max_length=MAX_DIMS)]
    data_offsets: Annotated[list[NonNeg], Field(min_length=2, max_length=2)]


class Index(BaseModel):
    model_config = ConfigDict(extra="allow")
    metadata: Optional[dict] = None
    weight_map: Annotated[dict[StrictStr, StrictStr], Field(min_length=1)]


class Row(BaseModel):
    """One .jsonl calibration row."""

    model_config = ConfigDict(extra="allow")
    text: StrictStr


class ConfigCommon(BaseModel):
    """The keys of config.json that shrinkit reads for every family (shape keys: the family)."""

    model_config = ConfigDict(extra="allow")
    model_type: StrictStr
    architectures: Optional[Annotated[list[StrictStr], Field(max_length=64)]] = None
    tie_word_embeddings: Optional[StrictBool] = None


HASH = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
HashCache = dict[StrictStr, HASH]
