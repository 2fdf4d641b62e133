"""The recipe: a YAML file that says the child's shape (target) and the pipeline (stages) that
makes it. Each stage's block is declared by its own module (shrinkit.stages); this module puts the
recipe together and validates the pipeline's order from what the stages declare."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .specs import (BUDGETS, DTYPE_NAMES, MAX_BATCH, MAX_SAMPLES, MAX_SEQ_LEN, Calibration, Output, Strict,  # noqa: F401
                     Target, Verify, _first_error, parse_count, parse_size)
from .stages import STAGES, check_order, default_pipeline
from .validate import MAX_DEPTH, MAX_RECIPE, TooDeep, TooLarge, depth, read_capped


class Recipe(Strict):
    target: Target = Field(default_factory=Target)
    stages: list[dict] = Field(default_factory=default_pipeline)
    output: Output = Field(default_factory=Output)
    calibration: Optional[Calibration] = None   # serves every stage that needs data; a stage's own block overrides it
    verify: Optional[Verify] = None             # None: the default check (see shrinkit.preflight)
    seed: StrictInt = Field(0, ge=0, lt=1 << 63)
    name: Optional[str] = None
    # dual-encoder parents (clip, siglip): one recipe per tower, keyed by tower name (text, vision)
    towers: Optional[dict[str, "Recipe"]] = None

    parsed: list[tuple[str, Any]] = Field(default_factory=list, exclude=True)   # (stage name, its block)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v):
        if v is not None and (not v.strip() or len(v) > 200 or v in (".", "..") or any(c in v for c in "/\\\0")):
            raise ValueError("must be a plain name of at most 200 characters without '/', '\\' or '..' "
                             "(the default output folder is ./<parent>-<name>)")
        return v

    @field_validator("towers")
    @classmethod
    def _flat_towers(cls, v):
        if v is not None:
            if not v:
                raise ValueError("must name at least one tower (text, vision)")
            for k, r in v.items():
                if r.towers is not None:
                    raise ValueError(f"{k}: a tower's recipe cannot have towers of its own")
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
                parsed.append((name, STAGES[name].config.model_validate(body or {})))
            except ValidationError as e:
                raise ValueError(f"stages[{i}].{name}: {_first_error(e)}") from None
        check_order([n for n, _ in parsed])
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


Recipe.model_rebuild()


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
                          **{n: (st.config, ...)}) for n, st in STAGES.items()]

    class RecipeSchema(Recipe):
        stages: list[Union[tuple(items)]] = Field(  # type: ignore[valid-type]
            default_factory=lambda: [], description="the pipeline, in order; each item one stage: "
            + ", ".join(n + (" (required)" if st.required else "") for n, st in STAGES.items()))

    s = RecipeSchema.model_json_schema()
    s["properties"].pop("parsed", None)
    s["properties"]["stages"].pop("default", None)
    tower = s.get("$defs", {}).get("Recipe")   # a tower's recipe (under `towers:`): the same stages, no towers
    if tower is not None:
        tower["properties"].pop("parsed", None)
        tower["properties"].pop("towers", None)
        tower["properties"]["stages"] = s["properties"]["stages"]
    s["title"] = "shrinkit recipe"
    s["description"] = "A shrinkit recipe: the child's shape (target) and the pipeline (stages) that cuts it out of the parent."
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **s}
