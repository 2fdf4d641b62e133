"""Input schemas: every file shrinkit reads is parsed with a size cap and bounded nesting, and
checked by a typed model, so a malformed field is one line naming the file and the field.

The models here cover the generic files (a safetensors header entry, the shard index, the
sha256 cache, calibration rows, the common keys of config.json); the shape keys each family
needs are checked by the family (shrinkit.families.base.Family.check_config).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Optional, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)

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


# ------------------------------------------------------------------ shrinkit's own report

class FileRecord(BaseModel):
    """One child file in the report: its size and sha256 as written."""

    model_config = ConfigDict(extra="forbid")
    size: NonNeg
    sha256: HASH


def _child_file_name(v: str) -> str:
    from .output import CHILD_FILES, REPORT

    if not CHILD_FILES.fullmatch(v) or v == REPORT:
        raise ValueError(f"{v[:80]!r} is not a file shrinkit writes into a child")
    return v


ChildFileName = Annotated[StrictStr, AfterValidator(_child_file_name)]


class ReportChild(BaseModel):
    model_config = ConfigDict(extra="allow")
    dims: dict[StrictStr, Optional[StrictInt]]
    params: NonNeg
    bytes: NonNeg
    dtype: StrictStr


class ReportParent(BaseModel):
    model_config = ConfigDict(extra="allow")
    path: StrictStr
    repo_id: Optional[StrictStr] = None
    revision: Optional[StrictStr] = None
    params: NonNeg
    bytes: NonNeg


class Report(BaseModel):
    """The fields of shrinkit_report.json that --skip-if-current and --json read. A report that
    fails this (edited, truncated, from another tool) describes no current child."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    shrinkit_version: StrictStr
    recipe_hash: HASH
    parent_hash: HASH
    parent: ReportParent
    child: ReportChild
    files: Annotated[dict[ChildFileName, FileRecord], Field(min_length=2)]
    verify: Optional[dict] = None
    gate: Optional[dict] = None
    budget: Optional[dict] = None
    notes: list[StrictStr] = []
    seconds: Optional[Annotated[float, Field(ge=0)]] = None

    @model_validator(mode="after")
    def _loadable(self):
        if "config.json" not in self.files or not any(n.endswith(".safetensors") for n in self.files):
            raise ValueError("files must list config.json and the weight files")
        return self


# ------------------------------------------------------------------ image processor config

MAX_PIXELS = 1 << 13     # a side of an image the processor makes
Side = Annotated[StrictInt, Field(gt=0, le=MAX_PIXELS)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class ImageSize(BaseModel):
    """`size` / `crop_size`: {height, width}, {shortest_edge[, longest_edge]} or {longest_edge}."""

    model_config = ConfigDict(extra="forbid")
    height: Optional[Side] = None
    width: Optional[Side] = None
    shortest_edge: Optional[Side] = None
    longest_edge: Optional[Side] = None

    @model_validator(mode="after")
    def _form(self):
        hw = (self.height is None, self.width is None)
        if hw[0] != hw[1]:
            raise ValueError("give both height and width")
        if self.height is None and self.shortest_edge is None:
            raise ValueError("give height and width, or shortest_edge")
        return self


def _size_field(v, name: str):
    if v is None or isinstance(v, ImageSize):
        return v
    if isinstance(v, dict):
        if name == "crop_size" and set(v) - {"height", "width"}:
            raise ValueError("must be a pixel count or {height, width} (a crop has both)")
        try:
            return ImageSize.model_validate(v)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise ValueError((f"{loc}: " if loc else "") + err["msg"].removeprefix("Value error, ")) from None
    if type(v) is int and 0 < v <= MAX_PIXELS:
        return v
    raise ValueError(f"must be a positive pixel count up to {MAX_PIXELS} or {{height, width}} / {{shortest_edge}}, "
                     f"not {str(v)[:40]!r}")


def _channels(v):
    """image_mean / image_std: one finite number, or one per channel (1 or 3)."""
    if v is None:
        return v
    vals = v if isinstance(v, list) else [v]
    if not 1 <= len(vals) <= 3 or len(vals) == 2 or not all(
            type(x) in (int, float) and math.isfinite(x) for x in vals):
        raise ValueError(f"must be a finite number or a list of 1 or 3 finite numbers (one per channel), "
                         f"not {str(v)[:40]!r}")
    return v


class ImageProcessorConfig(BaseModel):
    """The keys of preprocessor_config.json that decide the pixels a vision parent sees."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    image_processor_type: Optional[StrictStr] = None
    do_resize: Optional[StrictBool] = None
    size: Any = None
    resample: Optional[Annotated[StrictInt, Field(ge=0, le=5)]] = None
    do_center_crop: Optional[StrictBool] = None
    crop_size: Any = None
    do_rescale: Optional[StrictBool] = None
    rescale_factor: Optional[Annotated[float, Field(gt=0, allow_inf_nan=False)]] = None
    do_normalize: Optional[StrictBool] = None
    image_mean: Any = None
    image_std: Any = None
    do_convert_rgb: Optional[StrictBool] = None

    @field_validator("size", "crop_size")
    @classmethod
    def _sizes(cls, v, info):
        return _size_field(v, info.field_name)

    @field_validator("image_mean", "image_std")
    @classmethod
    def _chan(cls, v):
        return _channels(v)

    @model_validator(mode="after")
    def _flags(self):
        """A key given as null is used as null (not the processor's default), so it may be null
        only when its step is off; a center crop needs its crop_size."""
        for flag, keys in (("do_resize", ("size", "resample")), ("do_center_crop", ("crop_size",)),
                           ("do_rescale", ("rescale_factor",)), ("do_normalize", ("image_mean", "image_std"))):
            for k in keys:
                if k in self.model_fields_set and getattr(self, k) is None and getattr(self, flag) is not False:
                    raise ValueError(f"{k} is null while {flag} is not false; give a {k} or leave the key out")
        if self.do_center_crop and self.crop_size is None:
            raise ValueError("do_center_crop is true but crop_size is missing; give crop_size {height, width}")
        return self

    @model_validator(mode="after")
    def _std(self):
        std = self.image_std if isinstance(self.image_std, list) else [self.image_std]
        if any(s is not None and s <= 0 for s in std):
            raise ValueError("image_std must be positive (pixels are divided by it)")
        return self
