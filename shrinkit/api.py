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

from .errors import RecipeError, UsageError

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


_PATH = (str, os.PathLike)
_KINDS = {  # argument -> (accepted types, what to pass)
    "parent": (_PATH, "a path or a Hub id string"), "child": (_PATH, "a path"),
    "out": (_PATH + (type(None),), "a path or None"), "config": (_PATH + (type(None),), "a path or None"),
    "tokenizer": (_PATH + (type(None),), "a path or None"), "revision": ((str, type(None)), "a string or None"),
    "device": ((str,), "a string: cpu, cuda, cuda:N or auto"), "data": ((str,), "a string"),
    "force": ((bool,), "True or False"), "verify": ((bool,), "True or False"),
    "skip_if_current": ((bool,), "True or False"), "quiet": ((bool,), "True or False"),
    "samples": ((int,), "an integer"), "batch_size": ((int,), "an integer"),
    "seq_len": ((int, type(None)), "an integer or None"), "gate": ((dict, type(None)), "a dict or None"),
    "device_memory": ((int, str, type(None)), "bytes (an integer), a size like 40GB, or None"),
}


def _check_args(fn: str, **args) -> None:
    """The Python API's arguments by type (UsageError, exit 2, naming the argument), so a wrong
    one is the API's typed error rather than an AttributeError deep inside."""
    import math

    from .errors import UsageError

    for name, v in args.items():
        types, what = _KINDS[name]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise UsageError(f"shrinkit.{fn}: {name} must be {what}, not {type(v).__name__} {str(v)[:60]!r}")
        if isinstance(v, (str, os.PathLike)) and ("\0" in os.fspath(v) or (not os.fspath(v) and name != "revision")):
            raise UsageError(f"shrinkit.{fn}: {name} {os.fspath(v)!r} is not a usable path or name")
    gate = args.get("gate")
    if gate:
        for k, x in gate.items():
            if k not in ("max_kl", "max_perplexity_ratio", "min_similarity"):
                raise UsageError(f"shrinkit.{fn}: gate key {k!r} is unknown; use max_kl, max_perplexity_ratio or "
                                 "min_similarity")
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise UsageError(f"shrinkit.{fn}: gate {k} must be a finite number, not {x!r}")


def _check_progress(progress) -> None:
    from .errors import UsageError

    if progress is not None and not all(callable(getattr(progress, m, None)) for m in ("phase", "advance", "log")):
        raise UsageError("shrinkit.subclone: progress must be None or a shrinkit.progress.Progress "
                         f"(phase, advance, log), not {type(progress).__name__}")


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
    hashes) by this recipe (same canonical JSON) and this shrinkit version, and every file the
    report lists is in OUT with its recorded size and sha256; else None."""
    rep, why = _current(Path(out), _resolve(parent, revision, True, None).path, load_recipe(recipe), config)
    return rep if why is None else None


def _current(out: Path, parent: Path, r: "Recipe", config) -> tuple[dict | None, str | None]:
    """(report, None): OUT holds this child, intact. (report, why): OUT's report says it is this
    child but a file is missing or differs. (None, None): OUT holds no current child (no report,
    a malformed one: checked by schema, validate.Report, or another parent, recipe or version)."""
    from pydantic import ValidationError

    from .childfiles import not_intact
    from .hashing import parent_hash, recipe_hash
    from .version import __version__
    from .validate import Report, TooDeep, loads, read_capped
    from .output import MAX_REPORT, REPORT

    try:
        raw = loads(read_capped(out / REPORT, MAX_REPORT))
        rep = Report.model_validate(raw)
    except (OSError, ValueError, TooDeep, ValidationError, UnicodeDecodeError, RecursionError):
        return None, None
    if rep.shrinkit_version != __version__ or rep.recipe_hash != recipe_hash(r):
        return None, None
    from .checkpoint.reader import open_checkpoint

    with open_checkpoint(parent, config) as ck:
        if rep.parent_hash != parent_hash(ck):
            return None, None
    return raw, not_intact(out, {k: v.model_dump() for k, v in rep.files.items()})


def subclone(parent: PathLike, recipe: RecipeLike, out: PathLike | None = None, *, force: bool = False,
             config: PathLike | None = None, revision: str | None = None, device: str = "cpu",
             tokenizer: PathLike | None = None, verify: bool = True, skip_if_current: bool = False,
             progress: "Progress | None" = None, quiet: bool = True,
             device_memory: "int | str | None" = None) -> "Result":
    """Cut a child out of PARENT (a local folder, a .safetensors file or a Hub id ``org/name``) by
    RECIPE and write it to OUT (default ``./<parent name>-<recipe name>``).

    Returns a Result: ``.out`` (the child folder), ``.report`` (the dict written to
    shrinkit_report.json), ``.plan`` and ``.skipped`` (True when ``skip_if_current`` found OUT
    already holding this child, every file intact as the report recorded it; nothing was written
    then; a stale child in OUT still needs ``force`` to be replaced, and a current child whose
    files are not intact is a UsageError without ``force``, rebuilt with it). Arguments of the
    wrong type are a UsageError naming them. ``device_memory`` (bytes, or a size like ``"40GB"``)
    is the block runtime's memory budget on ``device`` (default: a share of a GPU's free memory,
    the flat CPU budget on the CPU); it changes speed and memory, not results. ``verify``
    measures the child on
    held-out text (the command line's default too). ``quiet`` hides the Hub's download bars.
    """
    _check_args("subclone", parent=parent, out=out, force=force, config=config, revision=revision, device=device,
                tokenizer=tokenizer, verify=verify, skip_if_current=skip_if_current, quiet=quiet,
                device_memory=device_memory)
    _check_progress(progress)
    _runtime()
    from .pipeline import Result, default_out, subclone as run

    r = load_recipe(recipe)
    src = _resolve(parent, revision, quiet, progress)
    if out is None:
        out = default_out(src.repo_id.split("/")[1] if src.repo_id else src.path, r)
    out = Path(out)
    if skip_if_current:
        rep, broken = _current(out, src.path, r, config)
        if rep is not None and broken is None:
            return Result(out, rep, None, skipped=True)
        if rep is not None and not force:
            raise UsageError(f"--out {out} holds this child's report, but the child is not intact ({broken}); "
                             "pass --force to rebuild it")
    return run(src.path, r, out, force=force, config=config,
               progress=progress, device=device, tokenizer=tokenizer, verify=verify,
               source=src.as_dict() if src.repo_id else None, device_memory=device_memory)


def plan(parent: PathLike, recipe: RecipeLike, *, config: PathLike | None = None,
         revision: str | None = None, tokenizer: PathLike | None = None) -> dict:
    """Dry run: validate RECIPE against PARENT and return the child's shape, parameter count,
    bytes and shards (and, for a budget target, the solver's choice and its nearest
    alternatives). Writes nothing."""
    _check_args("plan", parent=parent, config=config, revision=revision, tokenizer=tokenizer)
    _runtime()
    from .inspect import plan_summary

    r = load_recipe(recipe)
    src = _resolve(parent, revision, True, None)
    return plan_summary(src.path, r, config, source=src.as_dict() if src.repo_id else None, tokenizer=tokenizer)


def inspect(parent: PathLike, *, config: PathLike | None = None, revision: str | None = None) -> dict:
    """Describe a checkpoint: family, dims, parameters, dtypes, shards, tied embeddings."""
    _check_args("inspect", parent=parent, config=config, revision=revision)
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
    _check_args("verify", parent=parent, child=child, data=data, samples=samples, seq_len=seq_len,
                batch_size=batch_size, config=config, revision=revision, device=device, tokenizer=tokenizer, gate=gate,
                device_memory=device_memory)
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
    from .verify import check_child, heldout_spec, verify_child

    check_child(Path(child))
    try:  # the recipe's bounds (seq_len resolved below, against the parent)
        Calibration(data=data, samples=samples, seq_len=seq_len or 1, batch_size=batch_size)
    except ValidationError as e:
        raise UsageError(f"verify: {field_error(e)}") from None
    dev = resolve_device(device)
    budget = resolve_budget(dev, device_memory)
    src = _resolve(parent, revision, True, None)
    with open_checkpoint(src.path, config) as ck:
        from .families.dual import dual_for
        dual = dual_for(ck.config)
        if dual is not None:   # each tower against the child's, on its own data (shrinkit.towers)
            from .towers import verify_dual
            with budget_scope(budget):
                return verify_dual(ck, dual, Path(child), data=data, samples=samples, seq_len=seq_len,
                                   batch_size=batch_size, device=dev, tokenizer=tokenizer, gate=gate)
        check_pair(ck, child)   # same family, vocabulary and tokenizer; child within the parent; safetensors only
        spec = heldout_spec(family_for(ck.config), ck.config, data, samples, seq_len, batch_size)
        with budget_scope(budget):
            return verify_child(ck, Path(child), spec, device=dev, tokenizer=tokenizer, gate=gate)


def schema() -> dict:
    """The recipe's JSON Schema (recipes/shrinkit-recipe.schema.json)."""
    from .recipe import recipe_schema

    return recipe_schema()
