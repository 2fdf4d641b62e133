"""The recipe: a YAML file that says the child's shape and the pipeline that makes it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveInt, StrictInt, ValidationError, field_validator,
                      model_validator)

from .errors import RecipeError
from .validate import MAX_DEPTH, MAX_RECIPE, TooDeep, TooLarge, depth, read_capped

DTYPE_NAMES = ("float32", "float16", "bfloat16")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


class RankNeurons(Strict):
    method: Optional[Literal["activation", "magnitude", "uniform", "first", "random"]] = None
    calibration: Optional[Calibration] = None   # default: the recipe's top-level calibration


class DropLayers(Strict):
    strategy: Optional[Literal["middle", "first", "last", "importance"]] = None
    drop: Optional[list[StrictInt]] = Field(None, max_length=1 << 16)
    keep: Optional[list[StrictInt]] = Field(None, max_length=1 << 16)
    calibration: Optional[Calibration] = None   # default: the recipe's top-level calibration

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


class Heal(Strict):
    """Least-squares refit of every kept block's attention and MLP output projections."""
    alpha: float = Field(1e-2, gt=0)              # ridge lambda = alpha x mean diagonal of the Gram matrix
    weight: Literal["rms", "none"] = "rms"        # per-token weight: 1 / RMS of the parent's residual
    when: Literal["always", "auto"] = "always"    # auto: only when layers are dropped and there is calibration text
    calibration: Optional[Calibration] = None   # default: the recipe's top-level calibration


class RotateHidden(Strict):
    """Keep the top principal directions of the residual stream instead of a subset of its dims."""
    method: Literal["pca"] = "pca"
    calibration: Optional[Calibration] = None   # default: the recipe's top-level calibration


class RescaleNorms(Strict):
    factor: Optional[float] = Field(None, gt=0, le=100, allow_inf_nan=False,
                                    description="norm scale factor; default sqrt(parent hidden / child hidden)")


STAGES = {
    "rank_neurons": RankNeurons,
    "drop_layers": DropLayers,
    "rotate_hidden": RotateHidden,
    "heal": Heal,
    "slice_embeddings": SliceEmbeddings,
    "rescale_norms": RescaleNorms,
}
Stage = Union[RankNeurons, DropLayers, RotateHidden, Heal, SliceEmbeddings, RescaleNorms]


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
        {"rank_neurons": {}}, {"drop_layers": {}}, {"heal": {"when": "auto"}}, {"slice_embeddings": {}},
        {"rescale_norms": {}}])
    output: Output = Field(default_factory=Output)
    calibration: Optional[Calibration] = None   # serves every stage that needs data; a stage's own block overrides it
    verify: Optional[Verify] = None             # None: the default check (see shrinkit.preflight)
    seed: StrictInt = Field(0, ge=0, lt=1 << 63)
    name: Optional[str] = None

    parsed: list[tuple[str, Stage]] = Field(default_factory=list, exclude=True)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v):
        if v is not None and (not v.strip() or len(v) > 200 or v in (".", "..") or any(c in v for c in "/\\\0")):
            raise ValueError("must be a plain name of at most 200 characters without '/', '\\' or '..' "
                             "(the default output folder is ./<parent>-<name>)")
        return v

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
        for n in ("rank_neurons", "drop_layers", "rotate_hidden", "heal"):
            if n in names and names.index(n) > cut:
                raise ValueError(f"{n} must come before slice_embeddings")
        if "heal" in names:
            for n in ("rank_neurons", "drop_layers", "rotate_hidden"):
                if n in names and names.index(n) > names.index("heal"):
                    raise ValueError(f"heal refits the chosen child, so {n} must come before heal")
        if "rotate_hidden" in names and "heal" in names:
            raise ValueError("rotate_hidden and heal cannot be combined yet: a rotated and healed child diverged in "
                             "training trials and the cause is not understood; keep one of the two stages")
        if "rotate_hidden" in names and "rank_neurons" in names and names.index("rank_neurons") > names.index("rotate_hidden"):
            raise ValueError("rotate_hidden replaces rank_neurons' choice of hidden dims, so rank_neurons must come first")
        self.parsed = parsed
        return self

    def stage(self, name: str):
        for n, s in self.parsed:
            if n == name:
                return s
        return None

    def calibration_for(self, name: str) -> Calibration:
        """The calibration spec of stage `name`: the recipe's top-level `calibration:` block with the
        stage's own block's fields over it (defaults where neither says)."""
        st = self.stage(name)
        own = getattr(st, "calibration", None)
        if self.calibration is None and own is None:
            return Calibration()
        if own is None:
            return self.calibration
        if self.calibration is None:
            return own
        merged = self.calibration.model_copy(update=own.model_dump(exclude_unset=True))
        merged.__pydantic_fields_set__ = set(self.calibration.model_fields_set) | set(own.model_fields_set)
        return merged

    def as_dict(self) -> dict:
        return self.model_dump(exclude={"parsed"}, exclude_none=False)


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


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    try:
        if p.is_dir():
            raise RecipeError(f"recipe {p} is a folder; pass --recipe PATH to a YAML recipe (see recipes/)")
        text = read_capped(p, MAX_RECIPE)
    except FileNotFoundError:
        raise RecipeError(f"recipe {p} not found; pass --recipe PATH to a YAML recipe (see recipes/)") from None
    except TooLarge as e:
        raise RecipeError(f"recipe {p} is {e}; a recipe is a short YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe {p} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    try:
        data = yaml.safe_load(text)
        depth(data)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise RecipeError(f"recipe {p} is not valid YAML{where}: {problem}") from None
    except (RecursionError, TooDeep):
        raise RecipeError(f"recipe {p} is nested more than {MAX_DEPTH} levels deep; a recipe is a short YAML file") from None
    return recipe_from_dict({} if data is None else data, name=p.stem, source=f"recipe {p}")


def recipe_from_dict(data, name: str | None = None, source: str = "recipe") -> Recipe:
    """Validate a recipe given as a mapping (the parsed YAML); RecipeError if it is wrong."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source} must be a mapping with target, stages and output")
    try:
        depth(data)
    except TooDeep:
        raise RecipeError(f"{source} is nested more than {MAX_DEPTH} levels deep") from None
    try:
        r = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source}: {_first_error(e)}") from None
    if r.name is None:
        r.name = name
    return r



def recipe_schema() -> dict:
    """The recipe's JSON Schema, generated from these models (`shrinkit schema` prints it;
    recipes/shrinkit-recipe.schema.json is this, kept in sync by a test)."""
    from pydantic import create_model

    items = [create_model(f"{''.join(w.title() for w in n.split('_'))}Stage", __config__=ConfigDict(extra="forbid"),
                          **{n: (m, ...)}) for n, m in STAGES.items()]

    class RecipeSchema(Recipe):
        stages: list[Union[tuple(items)]] = Field(  # type: ignore[valid-type]
            default_factory=lambda: [], description="the pipeline, in order; each item one stage: "
            "rank_neurons, drop_layers, rotate_hidden, heal, slice_embeddings (required), rescale_norms")

    s = RecipeSchema.model_json_schema()
    s["properties"].pop("parsed", None)
    s["properties"]["stages"].pop("default", None)
    s["title"] = "shrinkit recipe"
    s["description"] = "A shrinkit recipe: the child's shape (target) and the pipeline (stages) that cuts it out of the parent."
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **s}
