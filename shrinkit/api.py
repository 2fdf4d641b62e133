"""The Python API: what the command line does, as functions.

    import shrinkit
    res = shrinkit.subclone("HuggingFaceTB/SmolLM2-135M", {"target": {"params": "40M"}}, out="student")
    print(res.out, res.report["child"]["params"])

Each function raises the typed errors of shrinkit.errors that the command line maps to exit
codes (RecipeError / UsageError: 2, ParentError: 3, VerifyGateError: 4 where present, other
ShrinkitError: 1). The first call applies the same allocator setting as the command line
(shrinkit.malloc.bounded: freed multi-MB blocks go back to the system, so peak memory tracks
what is live); set SHRINKIT_NO_MALLOC_TUNING=1 to keep the process's own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from .errors import RecipeError

if TYPE_CHECKING:
    from .pipeline import Result
    from .progress import Progress
    from .recipe import Recipe

PathLike = Union[str, "os.PathLike[str]"]
RecipeLike = Union[PathLike, Mapping[str, Any], "Recipe"]

__all__ = ["subclone", "plan", "verify", "inspect", "schema", "load_recipe", "current_report"]


def _runtime() -> None:
    from .malloc import bounded

    bounded()


def load_recipe(recipe: RecipeLike, name: str | None = None) -> "Recipe":
    """A Recipe from a YAML path, a mapping (the YAML's content) or a Recipe (returned as is)."""
    from .recipe import Recipe, load_recipe as load_file, recipe_from_dict

    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return recipe_from_dict(dict(recipe), name=name or "recipe")
    if isinstance(recipe, (str, os.PathLike)):
        r = load_file(recipe)
        if name:
            r.name = name
        return r
    raise RecipeError(f"recipe must be a path, a mapping or a shrinkit Recipe, not {type(recipe).__name__}")


def _resolve(parent: PathLike, revision: str | None, quiet: bool, progress: "Progress | None"):
    from .hub import resolve

    return resolve(parent, revision, quiet=quiet, log=progress.log if progress is not None else None)


def current_report(out: PathLike, parent: PathLike, recipe: RecipeLike, *, config: PathLike | None = None,
                   revision: str | None = None) -> dict | None:
    """The report of the child in OUT if it was cut from this very parent (same shard and config
    hashes) by this recipe (same canonical JSON) and this shrinkit version; else None."""
    from .hashing import parent_hash, recipe_hash
    from .version import __version__
    from .validate import MAX_CONFIG, loads, read_capped

    rep_path = Path(out) / "shrinkit_report.json"
    try:
        rep = loads(read_capped(rep_path, MAX_CONFIG))
    except (OSError, ValueError):
        return None
    r = load_recipe(recipe)
    if not isinstance(rep, dict) or rep.get("shrinkit_version") != __version__ or rep.get("recipe_hash") != recipe_hash(r):
        return None
    src = _resolve(parent, revision, True, None)
    from .checkpoint.reader import open_checkpoint

    with open_checkpoint(src.path, config) as ck:
        h = parent_hash(ck)
    return rep if rep.get("parent_hash") == h else None


def subclone(parent: PathLike, recipe: RecipeLike, out: PathLike | None = None, *, force: bool = False,
             config: PathLike | None = None, revision: str | None = None, device: str = "cpu",
             tokenizer: PathLike | None = None, verify: bool = True, skip_if_current: bool = False,
             progress: "Progress | None" = None, quiet: bool = True,
             device_memory: "int | str | None" = None) -> "Result":
    """Cut a child out of PARENT (a local folder, a .safetensors file or a Hub id ``org/name``) by
    RECIPE and write it to OUT (default ``./<parent name>-<recipe name>``).

    Returns a Result: ``.out`` (the child folder), ``.report`` (the dict written to
    shrinkit_report.json), ``.plan`` and ``.skipped`` (True when ``skip_if_current`` found OUT
    already holding this child; nothing was written then; a stale child in OUT still needs
    ``force`` to be replaced). ``device_memory`` (bytes, or a size like ``"40GB"``) is the block
    runtime's memory budget on ``device`` (default: a share of a GPU's free memory, the flat CPU
    budget on the CPU); it changes speed and memory, not results. ``verify`` measures the child on
    held-out text (the command line's default too). ``quiet`` hides the Hub's download bars.
    """
    _runtime()
    from .pipeline import Result, default_out, subclone as run

    r = load_recipe(recipe)
    src = _resolve(parent, revision, quiet, progress)
    if out is None:
        out = default_out(src.repo_id.split("/")[1] if src.repo_id else src.path, r)
    out = Path(out)
    if skip_if_current:
        rep = current_report(out, src.path, r, config=config)
        if rep is not None:
            return Result(out, rep, None, skipped=True)
    return run(src.path, r, out, force=force, config=config,
               progress=progress, device=device, tokenizer=tokenizer, verify=verify,
               source=src.as_dict() if src.repo_id else None, device_memory=device_memory)


def plan(parent: PathLike, recipe: RecipeLike, *, config: PathLike | None = None,
         revision: str | None = None) -> dict:
    """Dry run: validate RECIPE against PARENT and return the child's shape, parameter count,
    bytes and shards (and, for a budget target, the solver's choice and its nearest
    alternatives). Writes nothing."""
    _runtime()
    from .inspect import plan_summary

    r = load_recipe(recipe)
    src = _resolve(parent, revision, True, None)
    return plan_summary(src.path, r, config, source=src.as_dict() if src.repo_id else None)


def inspect(parent: PathLike, *, config: PathLike | None = None, revision: str | None = None) -> dict:
    """Describe a checkpoint: family, dims, parameters, dtypes, shards, tied embeddings."""
    _runtime()
    from .inspect import inspect_summary

    src = _resolve(parent, revision, True, None)
    s = inspect_summary(src.path, config)
    if src.repo_id:
        s["model"].update(src.as_dict())
    return s


def verify(parent: PathLike, child: PathLike, *, data: str = "builtin", samples: int = 16,
           seq_len: int | None = None, batch_size: int = 4, config: PathLike | None = None,
           revision: str | None = None, device: str = "cpu", tokenizer: PathLike | None = None,
           gate: dict | None = None, device_memory: "int | str | None" = None) -> dict:
    """Measure how much of PARENT survived in CHILD on held-out text, against a random-init
    child of the same shape. Returns the verification summary (also its ``table`` lines).
    ``seq_len`` defaults to 256, or the parent's maximum positions when fewer (a longer explicit
    one is an error). ``gate``: {max_kl, max_perplexity_ratio, min_similarity}; a child that
    misses it has ``status`` "gate_missed" (the command line exits 4)."""
    _runtime()
    from .checkpoint.reader import open_checkpoint
    from .errors import UsageError
    from .families import family_for
    from .preflight import resolve_budget, resolve_device
    from .runtime import budget_scope
    from pydantic import ValidationError

    from .pair import check_pair
    from .recipe import Calibration
    from .validate import field_error
    from .verify import check_child, verify_child

    check_child(Path(child))
    try:  # the recipe's bounds (seq_len resolved below, against the parent)
        Calibration(data=data, samples=samples, seq_len=seq_len or 1, batch_size=batch_size)
    except ValidationError as e:
        raise UsageError(f"verify: {field_error(e)}") from None
    dev = resolve_device(device)
    budget = resolve_budget(dev, device_memory)
    src = _resolve(parent, revision, True, None)
    with open_checkpoint(src.path, config) as ck:
        check_pair(ck, child)   # same family, vocabulary and tokenizer; child within the parent; safetensors only
        mp = family_for(ck.config).max_positions(ck.config)
        if seq_len is not None and mp is not None and seq_len > mp:
            raise UsageError(f"--seq-len {seq_len} is longer than the parent's {mp} positions; use {mp} or less")
        n = seq_len or (min(256, mp) if mp else 256)
        spec = Calibration(data=data, samples=samples, seq_len=n, batch_size=batch_size)
        with budget_scope(budget):
            return verify_child(ck, Path(child), spec, device=dev, tokenizer=tokenizer, gate=gate)


def schema() -> dict:
    """The recipe's JSON Schema (recipes/shrinkit-recipe.schema.json)."""
    from .recipe import recipe_schema

    return recipe_schema()
