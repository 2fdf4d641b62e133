"""The recipe: a YAML file that says the child's shape and the pipeline that makes it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, StrictInt, ValidationError, model_validator

from .errors import RecipeError

DTYPE_NAMES = ("float32", "float16", "bfloat16")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Target(Strict):
    hidden_size: Optional[PositiveInt] = None
    intermediate_size: Optional[PositiveInt] = None
    num_attention_heads: Optional[PositiveInt] = None
    num_key_value_heads: Optional[PositiveInt] = None
    num_hidden_layers: Optional[PositiveInt] = None
    # mixture-of-experts parents only
    num_experts: Optional[PositiveInt] = None
    num_experts_per_tok: Optional[PositiveInt] = None
    expert_intermediate_size: Optional[PositiveInt] = None


class Calibration(Strict):
    data: str = "builtin"            # builtin | random_tokens | PATH (.txt or .jsonl with "text")
    samples: PositiveInt = 64
    seq_len: PositiveInt = 256
    batch_size: PositiveInt = 8       # sequences per forward call at most (fewer for wide blocks)


class Verify(Calibration):
    samples: PositiveInt = 16
    batch_size: PositiveInt = 4


class RankNeurons(Strict):
    method: Optional[Literal["activation", "magnitude", "uniform", "first", "random"]] = None
    calibration: Calibration = Field(default_factory=Calibration)


class DropLayers(Strict):
    strategy: Optional[Literal["middle", "first", "last", "importance"]] = None
    drop: Optional[list[int]] = None
    keep: Optional[list[int]] = None
    calibration: Calibration = Field(default_factory=Calibration)

    @model_validator(mode="after")
    def _one_way(self):
        given = [k for k in ("strategy", "drop", "keep") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of strategy, drop or keep, not {' and '.join(given)}")
        for k in ("drop", "keep"):
            v = getattr(self, k)
            if v is not None and len(set(v)) != len(v):
                raise ValueError(f"{k} lists a layer twice")
        if not given:
            self.strategy = "middle"
        return self


class SliceEmbeddings(Strict):
    pass


class RescaleNorms(Strict):
    factor: Optional[float] = None


STAGES = {
    "rank_neurons": RankNeurons,
    "drop_layers": DropLayers,
    "slice_embeddings": SliceEmbeddings,
    "rescale_norms": RescaleNorms,
}
Stage = Union[RankNeurons, DropLayers, SliceEmbeddings, RescaleNorms]


class Output(Strict):
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None
    max_shard_size: Union[StrictInt, str] = "2GB"

    @model_validator(mode="after")
    def _size(self):
        parse_size(self.max_shard_size)
        return self


class Recipe(Strict):
    target: Target = Field(default_factory=Target)
    stages: list[dict] = Field(default_factory=lambda: [
        {"rank_neurons": {}}, {"drop_layers": {}}, {"slice_embeddings": {}}, {"rescale_norms": {}}])
    output: Output = Field(default_factory=Output)
    verify: Verify = Field(default_factory=Verify)
    seed: int = 0
    name: Optional[str] = None

    parsed: list[tuple[str, Stage]] = Field(default_factory=list, exclude=True)

    @model_validator(mode="after")
    def _stages(self):
        parsed = []
        for i, item in enumerate(self.stages):
            if not isinstance(item, dict) or len(item) != 1:
                raise ValueError(f"stages[{i}] must be a mapping with one stage name, one of {', '.join(STAGES)}")
            (name, body), = item.items()
            if name not in STAGES:
                raise ValueError(f"stages[{i}]: unknown stage {name!r}; known: {', '.join(STAGES)}")
            try:
                parsed.append((name, STAGES[name].model_validate(body or {})))
            except ValidationError as e:
                raise ValueError(f"stages[{i}].{name}: {_first_error(e)}") from None
        names = [n for n, _ in parsed]
        for n in set(names):
            if names.count(n) > 1:
                raise ValueError(f"stage {n} appears twice")
        if "slice_embeddings" not in names:
            raise ValueError("the pipeline has no slice_embeddings stage, so it would write nothing; add `- slice_embeddings: {}`")
        cut = names.index("slice_embeddings")
        for n in ("rank_neurons", "drop_layers"):
            if n in names and names.index(n) > cut:
                raise ValueError(f"{n} must come before slice_embeddings")
        self.parsed = parsed
        return self

    def stage(self, name: str):
        for n, s in self.parsed:
            if n == name:
                return s
        return None

    def as_dict(self) -> dict:
        return self.model_dump(exclude={"parsed"}, exclude_none=False)


def parse_size(s: str | int) -> int:
    if isinstance(s, int):
        if s <= 0:
            raise ValueError("max_shard_size must be positive")
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(s), re.I)
    if not m:
        raise ValueError(f"max_shard_size {s!r} is not a size like 2GB or 500MB")
    num = float(m.group(1))
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    n = int(num * mult)
    if n <= 0:
        raise ValueError("max_shard_size must be positive")
    return n


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe {p} not found; pass --recipe PATH to a YAML recipe (see recipes/)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe {p} cannot be read ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe {p} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {p} must be a YAML mapping with target, stages and output")
    try:
        r = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"recipe {p}: {_first_error(e)}") from None
    if r.name is None:
        r.name = p.stem
    return r
