"""Run a recipe over a parent checkpoint and stream the child to disk."""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import TypeAdapter, ValidationError

from . import __version__
from .checkpoint.reader import Checkpoint, open_checkpoint
from .checkpoint.writer import Entry, ShardedWriter
from .errors import RecipeError, UsageError
from .families import family_for
from .families.spaces import GLOBAL, LAYER, Space
from .output import Claim, check_inputs, check_out, resolve_out
from .hf import check_config
from .plan import OUT_DTYPES, DTYPE_STR, Plan, check_parent, count_params, own_keys, parent_params, \
                   resolve_target
from .progress import Progress
from .recipe import Recipe, parse_size
from .report import model_card, report_markdown
from .stages.layers import count_from_lists, keep_layers
from .stages.rank import magnitude_scores, outside_spaces, select, spaces_to_rank
from .stages.slice import BLOCK_BYTES, slice_blocks
from .validate import MAX_CACHE, HashCache, loads, read_capped

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "generation_config.json", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json",   # image processor (vision parents)
)


@dataclass
class Result:
    """What a subclone run gives back: the child folder, its report (shrinkit_report.json) and
    plan; `skipped` when --skip-if-current found the child already current (plan is None then)."""

    out: Path
    report: dict
    plan: Plan | None
    skipped: bool = False


def parent_dtype(ckpt: Checkpoint) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for t in ckpt.tensors.values():
        if t.dtype.is_floating_point:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
    return max(counts, key=counts.get) if counts else torch.float32


def needs_transformers(ckpt: Checkpoint, recipe: Recipe, verify: bool, tokenizer=None) -> bool:
    """Whether this run imports transformers anyway (calibration, healing, rotation or a full
    verification; a data-free run's default check reads the child back without it)."""
    rank, drop, heal = recipe.stage("rank_neurons"), recipe.stage("drop_layers"), recipe.stage("heal")
    heals = heal is not None and (heal.when == "always" or _has_text(ckpt, recipe.calibration_for("heal"), tokenizer))
    return bool((verify and recipe.verify is not None) or (drop is not None and drop.strategy == "importance") or
                heals or recipe.stage("rotate_hidden") is not None or
                (rank is not None and (rank.method or default_method(ckpt, tokenizer)) == "activation"))


def prepare(ckpt: Checkpoint, recipe: Recipe, transformers_check: bool = True) -> Plan:
    """Validate the recipe against the parent and build the plan (no ranking yet).

    The shape rules of transformers' config validation that a cut can break are checked here
    directly; with `transformers_check`, the child config also goes through transformers' own
    validation (importing transformers costs ~1-2 s, so a data-free run without verification
    skips it; tests/test_plan.py checks that both agree)."""
    fam, pdims = check_parent(ckpt)  # config by schema, every tensor's shape against it, before any work
    if transformers_check:
        check_config(ckpt.config, parent=True)   # a config transformers rejects as it is: the parent's fault
    solution = None
    recipe = own_keys(fam, recipe)   # target keys in the family's own sense (a config key naming another dimension)
    if recipe.target.budget() is not None:  # a parameter budget: solve the open dims first
        from .budget import apply, solve
        solution = solve(ckpt, fam, pdims, recipe, ckpt.config.get("model_type"))
    drop = recipe.stage("drop_layers")
    child = resolve_target(fam, pdims, apply(recipe, solution) if solution else recipe,
                           count_from_lists(drop, pdims.num_hidden_layers), ckpt.config.get("model_type"))
    out_dtype = OUT_DTYPES[recipe.output.dtype] if recipe.output.dtype else parent_dtype(ckpt)
    plan = Plan(fam, pdims, child, out_dtype, cast=recipe.output.dtype is not None)
    if solution is not None:
        plan.budget = solution.summary()
    if child.num_hidden_layers < pdims.num_hidden_layers and drop is None:
        raise RecipeError(f"the target has {child.num_hidden_layers} of {pdims.num_hidden_layers} layers, "
                          "but the pipeline has no drop_layers stage; add one")
    if recipe.stage("rotate_hidden") is not None:
        from .stages.rotate import check_rotatable
        check_rotatable(plan)
        plan.rotate = True
        plan.untie = fam.tied(ckpt.config)
    if spaces_to_rank(plan) - ({Space.HIDDEN} if plan.rotate else set()) and recipe.stage("rank_neurons") is None:
        raise RecipeError("the target narrows the model, but the pipeline has no rank_neurons stage; add one")
    if drop is not None and drop.strategy != "importance":
        plan.layers = keep_layers(drop, pdims.num_hidden_layers, child.num_hidden_layers)
        fam.check_layers(plan.layers)
    else:  # importance: calibration picks them later; the first N stand in for the config check
        plan.layers = list(range(child.num_hidden_layers))
    rescale = recipe.stage("rescale_norms")
    if rescale is not None:
        f = rescale.factor if rescale.factor is not None else math.sqrt(pdims.hidden_size / child.hidden_size)
        plan.norm_factor = None if f == 1.0 else f
    if transformers_check:
        check_config(plan.child_config(ckpt.config))
    return plan


def data_specs(ckpt: Checkpoint, recipe: Recipe, tokenizer=None, verify: bool = False) -> list:
    """The calibration specs this run will read text with (ranking by activation, importance
    layer dropping, verification)."""
    rank, drop = recipe.stage("rank_neurons"), recipe.stage("drop_layers")
    specs = []
    if rank is not None and (rank.method or default_method(ckpt, tokenizer)) == "activation":
        specs.append(recipe.calibration_for("rank_neurons"))
    if drop is not None and drop.strategy == "importance":
        specs.append(recipe.calibration_for("drop_layers"))
    if verify and recipe.verify is not None and recipe.verify.data is not None:
        specs.append(recipe.verify)
    return specs


def check_data(ckpt: Checkpoint, recipe: Recipe, tokenizer=None, verify: bool = False) -> None:
    """Before any work: every calibration file the run will read exists (RecipeError, exit 2)."""
    fam = family_for(ckpt.config)
    for spec in data_specs(ckpt, recipe, tokenizer, verify):
        fam.check_data(spec.data)


def _sha256_file(p: Path) -> str:
    """sha256 of a file, hashed straight from a read-only mapping (no copy into Python buffers;
    hashlib releases the GIL, so this overlaps the main thread's work)."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as mv:
                for i in range(0, size, 1 << 24):
                    h.update(mv[i:i + (1 << 24)])
    return h.hexdigest()


def _hash_cache_path() -> Path | None:
    if os.environ.get("SHRINKIT_NO_HASH_CACHE"):
        return None
    base = os.environ.get("SHRINKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "shrinkit")
    return Path(base) / "sha256-cache.json"


def _file_key(p: Path) -> str:
    st = os.stat(p)
    return f"{os.path.realpath(p)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def _sha256_all(paths: list[Path], out: dict) -> None:
    """sha256 of every shard, two at a time. A shard whose identity (path, inode, size, mtime,
    ctime) matches an earlier run takes the hash recorded then ($SHRINKIT_CACHE/sha256-cache.json;
    SHRINKIT_NO_HASH_CACHE=1 turns this off): a parent is often cut many times."""
    cache_file = _hash_cache_path()
    cache: dict = {}
    if cache_file is not None:
        try:  # a cache that is unreadable, too large or malformed is ignored (and rewritten)
            cache = TypeAdapter(HashCache).validate_python(loads(read_capped(cache_file, MAX_CACHE)))
        except (OSError, ValueError, ValidationError):
            cache = {}
    keys = {p: _file_key(p) for p in paths}
    todo = [p for p in paths if not isinstance(cache.get(keys[p]), str)]
    for p in paths:
        if p not in todo:
            out[p.name] = cache[keys[p]]
    if todo:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=min(2, len(todo))) as ex:
            for p, h in zip(todo, ex.map(_sha256_file, todo)):
                out[p.name] = h
                cache[keys[p]] = h
        if cache_file is not None:
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
                tmp.write_text(json.dumps(cache))
                os.replace(tmp, cache_file)
            except OSError:
                pass  # the cache is an optimization only


def default_out(parent: str | os.PathLike, recipe: Recipe) -> Path:
    p = Path(parent)
    stem = p.stem if p.is_file() else p.resolve().name
    return Path.cwd() / f"{stem}-{recipe.name or 'child'}"


def run_inputs(ckpt: Checkpoint, recipe: Recipe, tokenizer=None, verify: bool = False) -> tuple[list, list]:
    """What this run reads, as (folders, files) with a label each: the output may not be, contain
    or lie inside an input folder, nor be or contain an input file."""
    folders: list = []
    files: list = [("config", ckpt.config_path)]
    if ckpt.weights_path.is_dir():
        folders.append(("parent folder", ckpt.root))
        for s in ckpt.shard_paths:
            folders.append(("folder of the parent's shard", os.path.dirname(os.path.realpath(s))))
    for s in ckpt.shard_paths:
        files.append(("parent shard", s))
    if tokenizer:
        folders.append(("--tokenizer folder", tokenizer))
    specs = [recipe.calibration_for(n) for n in ("rank_neurons", "drop_layers") if recipe.stage(n) is not None]
    if verify and recipe.verify is not None:
        specs.append(recipe.verify)
    random = family_for(ckpt.config).random_data
    for spec in specs:
        if spec is not None and spec.data not in (None, "builtin", random):
            if os.path.isdir(spec.data):
                folders.append(("calibration data folder", spec.data))
            else:
                files.append(("calibration data", spec.data))
    return folders, files


def subclone(parent: str | os.PathLike, recipe: Recipe, out: str | os.PathLike | None = None, *,
             force: bool = False, config: str | os.PathLike | None = None,
             progress: Progress | None = None, device: str = "cpu", tokenizer: str | os.PathLike | None = None,
             verify: bool = False, source: dict | None = None) -> Result:
    progress = progress or Progress()
    t_start = time.perf_counter()
    ckpt = open_checkpoint(parent, config)
    try:
        plan = prepare(ckpt, recipe, needs_transformers(ckpt, recipe, verify, tokenizer))
        check_data(ckpt, recipe, tokenizer, verify)
        out = resolve_out(out if out is not None else default_out(parent, recipe))
        check_inputs(out, *run_inputs(ckpt, recipe, tokenizer, verify))
        check_out(out, force)
        from .preflight import preflight
        checks = preflight(ckpt, plan, recipe, out, device=device, tokenizer=tokenizer, verify=verify)
        opts = {"device": checks.device, "tokenizer": tokenizer, "verify": verify, "source": source,
                "checks": checks, "parent_arg": str(parent), "out": str(out)}
        with Claim(out, force, progress.log) as claim:
            report = _run(ckpt, plan, recipe, claim.tmp, progress, t_start, opts)
            claim.publish()
    finally:
        ckpt.close()
        progress.close()
    return Result(out, report, plan)


def _run(ckpt: Checkpoint, plan: Plan, recipe: Recipe, tmp: Path, progress: Progress, t_start: float,
         opts: dict) -> dict:
    hashes: dict[str, str] = {}
    hash_error: list[BaseException] = []

    def hash_all():
        try:
            _sha256_all(ckpt.shard_paths, hashes)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            hash_error.append(e)

    hasher = threading.Thread(target=hash_all, daemon=True)
    hasher.start()
    stages = []
    n_parent = plan.parent.num_hidden_layers
    dropped = False
    calib: dict = {}   # one calibration pass per distinct calibration spec
    written: list = []
    for name, stage in recipe.parsed:
        t0 = time.perf_counter()
        info: dict = {"stage": name}
        if name == "rank_neurons":
            method = stage.method or default_method(ckpt, opts["tokenizer"])
            info["method"] = method
            layers = plan.layers if dropped else list(range(n_parent))
            need = spaces_to_rank(plan)
            scores = None
            if need and method == "magnitude":
                progress.phase("rank (magnitude)", ckpt.total_bytes)
                scores = magnitude_scores(ckpt, plan, need, set(layers), progress.advance)
            elif need and method == "activation":
                from .calibrate import activation_scores
                spec = opts["checks"].specs[name]
                info["calibration"] = spec.model_dump()
                scores = activation_scores(_calibration(ckpt, plan, spec, recipe.seed, progress, opts,
                                                        calib, tmp), plan, need)
                if outside_spaces(plan) & need:   # a pooling head outside the blocks: by its weights
                    scores = {**magnitude_scores(ckpt, plan, outside_spaces(plan) & need, set()), **scores}
            select(plan, method, scores, layers, recipe.seed)
        elif name == "drop_layers":
            info["strategy"] = stage.strategy or ("keep" if stage.keep is not None else "drop")
            if stage.strategy == "importance":
                from .calibrate import layer_influence
                spec = opts["checks"].specs[name]
                info["calibration"] = spec.model_dump()
                influence = layer_influence(_calibration(ckpt, plan, spec, recipe.seed, progress, opts,
                                                         calib, tmp))
                info["influence"] = [round(x, 6) for x in influence]
                plan.layers = keep_layers(stage, n_parent, plan.child.num_hidden_layers,
                                          plan.family.pin_influence(influence))
            dropped = True
        if name in ("rotate_hidden", "heal"):  # the spec preflight resolved (top-level block, clamped seq_len)
            stage = stage.model_copy(update={"calibration": opts["checks"].specs.get(name)
                                             or recipe.calibration_for(name)})
        if name == "rotate_hidden":
            from .stages.rotate import rotate_hidden
            if not plan.ranked:
                select(plan, "first", None, plan.layers, recipe.seed)
            info.update(rotate_hidden(ckpt, plan, stage, seed=recipe.seed, device=opts["device"],
                                      tokenizer=opts["tokenizer"], scratch=tmp, progress=progress))
        elif name == "heal":
            info.update(_heal(ckpt, plan, stage, recipe, progress, opts, tmp))
        elif name == "rescale_norms":
            info["factor"] = plan.norm_factor if plan.norm_factor is not None else 1.0
        elif name == "slice_embeddings":
            info.update(_write(ckpt, plan, recipe, tmp, progress, written))
        info["seconds"] = round(time.perf_counter() - t0, 3)
        stages.append(info)
    if not plan.ranked:
        select(plan, "first", None, plan.layers, recipe.seed)  # widths unchanged: keeps everything
    verified = _verify(ckpt, plan, recipe, tmp, progress, opts, written)
    hasher.join()
    if hash_error:
        raise hash_error[0]
    report = build_report(ckpt, plan, recipe, stages, hashes, written, time.perf_counter() - t_start,
                          opts.get("source"))
    if opts["checks"].notes:
        report["notes"] = list(opts["checks"].notes)
    if verified is not None:
        report["verify"] = verified
    (tmp / "shrinkit_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "shrinkit_report.md").write_text(report_markdown(report))
    (tmp / "README.md").write_text(model_card(report))
    return report


def _verify(ckpt: Checkpoint, plan: Plan, recipe: Recipe, tmp: Path, progress: Progress, opts: dict,
            written: list) -> dict | None:
    """The child's check after writing (see shrinkit.preflight for what runs by default). Whatever
    goes wrong here is recorded in the report, never raised: the written child is kept."""
    checks = opts["checks"]
    if checks.verify_mode is None:
        return None
    from .verify import error_result, structural_check, verify_child
    t0 = time.perf_counter()
    try:
        if checks.verify_mode == "structural":
            progress.phase("check (structural)", 0)
            v = structural_check(tmp, {c.name: (c.shape, c.dtype) for c in written}, plan.child.as_dict())
            tok = f" --tokenizer {opts['tokenizer']}" if opts["tokenizer"] else ""
            v["how_to_verify"] = f"shrinkit verify {opts['parent_arg']} {opts['out']}{tok}"
            from .verify import structural_table
            v["table"] = structural_table(v)
        else:
            v = verify_child(ckpt, tmp, checks.verify, device=checks.device, tokenizer=opts["tokenizer"],
                             seed=recipe.seed, scratch=tmp, ids=checks.verify_ids, parent_final=checks.parent_final,
                             gate=checks.gate, progress=progress)
    except Exception as e:  # noqa: BLE001 - recorded in the report; the child stays
        v = error_result(e)
        if opts.get("debug"):
            import traceback
            v["traceback"] = traceback.format_exc()
    v["seconds"] = round(time.perf_counter() - t0, 3)
    return v


def default_method(ckpt: Checkpoint, tokenizer=None) -> str:
    """activation ranking when built-in calibration data can be read for the parent (a
    tokenizer for text, an image processor config for images), else magnitude."""
    return "activation" if family_for(ckpt.config).has_data_source(ckpt.root, tokenizer) else "magnitude"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device {device!r}: use cpu, cuda, cuda:N or auto")
    return device


def _calibration(ckpt, plan, spec, seed, progress, opts, cache: dict, scratch: Path):
    """Calibration statistics, once per distinct spec; the activations' scratch file lives in
    the output's temporary folder (unlinked at once)."""
    from .calibrate import calibrate
    key = spec.model_dump_json()
    if key not in cache:
        checks = opts["checks"]
        extra = checks.verify_ids if checks.share == key and checks.parent_final is None else None
        cache[key] = calibrate(ckpt, plan, spec, seed=seed, progress=progress, device=opts["device"],
                               tokenizer=opts["tokenizer"], scratch=scratch, ids=checks.tokens.get(key),
                               extra_ids=extra)
        if extra is not None:
            checks.parent_final = cache[key].extra_final
            cache[key].extra_final = None
    return cache[key]


def _has_text(ckpt: Checkpoint, spec, tokenizer) -> bool:
    """Whether calibration data can be formed: random tokens, or a tokenizer for the text."""
    from .calibrate import has_tokenizer
    return spec.data == "random_tokens" or bool(tokenizer) or has_tokenizer(ckpt.root)


def _heal(ckpt: Checkpoint, plan: Plan, stage, recipe: Recipe, progress: Progress, opts: dict, tmp: Path) -> dict:
    """The heal stage (shrinkit.stages.heal). `when: auto` (the default pipeline's) heals only a
    child that drops layers, and only when calibration text is at hand (a tokenizer for it, or
    random tokens): see README, "Heal"."""
    if not plan.ranked:
        select(plan, "first", None, plan.layers, recipe.seed)
    if stage.when == "auto":
        b = plan.family.block
        if b is None or not (b.out_proj and b.down_proj):
            return {"skipped": f"heal has no block description for the {plan.family.name} family yet (when: auto)"}
        if b.residual_norm:  # measured worse than no refit on MiniLM (BENCHMARKS.md): opt-in only
            return {"skipped": "post-norm family: heal is opt-in here (`when: always`) (when: auto)"}
        if len(plan.layers) == plan.parent.num_hidden_layers:
            return {"skipped": "no layer is dropped (when: auto)"}
        if not _has_text(ckpt, stage.calibration, opts["tokenizer"]):
            return {"skipped": "no tokenizer for the calibration text (when: auto)"}
    from .stages.heal import heal
    return heal(ckpt, plan, stage, seed=recipe.seed, device=opts["device"], tokenizer=opts["tokenizer"],
                scratch=tmp, progress=progress)


def _child_blocks(plan: Plan, ct, ckpt: Checkpoint):
    """The child tensor's row blocks: sliced from the parent, or the fitted value heal left."""
    rep = plan.replaced.get(ct.name)
    if rep is None:
        yield from slice_blocks(plan, ct, ckpt.get(ct.parent.name))
        return
    from .stages.heal import load_replacement
    t = load_replacement(rep, ct.name).to(ct.dtype)
    if tuple(t.shape) != tuple(ct.shape):  # pragma: no cover - heal writes child-shaped tensors
        raise RuntimeError(f"healed {ct.name} has shape {list(t.shape)}, expected {list(ct.shape)}")
    step = max(1, BLOCK_BYTES // max(1, t[0].numel() * t.element_size())) if t.dim() > 1 else len(t)
    for r0 in range(0, len(t), step):
        yield t[r0:r0 + step].contiguous()


def _write(ckpt: Checkpoint, plan: Plan, recipe: Recipe, tmp: Path, progress: Progress, written: list) -> dict:
    if not plan.ranked:
        if spaces_to_rank(plan):  # pragma: no cover - prepare() refuses this
            raise RecipeError("slice_embeddings needs rank_neurons first")
        select(plan, "first", None, plan.layers, recipe.seed)
    cts = plan.child_tensors(ckpt)
    writer = ShardedWriter(tmp, [Entry(c.name, c.dtype, c.shape) for c in cts], parse_size(recipe.output.max_shard_size))
    progress.phase("slice + write", sum(c.parent.nbytes for c in cts))
    # slicing (main thread) overlaps writing (writer thread); both release the GIL in torch and
    # in write(), and the bounded queue keeps at most a few child tensors in memory
    q: queue.Queue = queue.Queue(maxsize=2)
    failed: list[BaseException] = []

    def consume():
        while (item := q.get()) is not None:
            if not failed:
                try:
                    kind, x = item
                    if kind == "begin":
                        writer.begin(*x)
                    elif kind == "data":
                        writer.write_chunk(x)
                    else:
                        writer.end()
                except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                    failed.append(e)

    th = threading.Thread(target=consume, name="shrinkit-writer", daemon=True)
    th.start()
    try:
        try:
            for ct in cts:
                if failed:
                    break
                q.put(("begin", (ct.name, ct.dtype)))
                for block in _child_blocks(plan, ct, ckpt):
                    q.put(("data", block))
                q.put(("end", None))
                progress.advance(ct.parent.nbytes)
        finally:
            q.put(None)
            th.join()
        if failed:
            raise failed[0]
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    for p in set(plan.replaced.values()):  # heal's scratch files: not part of the child
        Path(p).unlink(missing_ok=True)
    cfg = plan.child_config(ckpt.config)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    src = ckpt.config_path.parent
    for fn in TOKENIZER_FILES:
        for d in dict.fromkeys((ckpt.root, src)):
            if (d / fn).is_file():
                shutil.copyfile(d / fn, tmp / fn)
                break
    written.extend(cts)
    return {"shards": shards, "bytes": writer.total_size}


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the recipe's canonical JSON (every field, defaults filled in; the name left out)."""
    d = recipe.as_dict()
    d.pop("name", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parent_hash(ckpt: Checkpoint, hashes: dict | None = None) -> str:
    """sha256 over the parent's shard sha256s (in shard order) and its config.json's bytes."""
    if hashes is None:
        hashes = {}
        _sha256_all(ckpt.shard_paths, hashes)
    h = hashlib.sha256()
    for s in ckpt.shards:
        h.update(f"{s} {hashes.get(Path(s).name) or _sha256_file(ckpt.root / s)}\n".encode())
    h.update(b"config.json " + hashlib.sha256(ckpt.config_path.read_bytes()).hexdigest().encode())
    return h.hexdigest()


def build_report(ckpt: Checkpoint, plan: Plan, recipe: Recipe, stages: list, hashes: dict, cts: list,
                 seconds: float, source: dict | None = None) -> dict:
    fam = plan.family
    tied = fam.tied(ckpt.config)

    kept = {"layers": list(plan.layers)}
    kept.update(kept_report(plan))
    return {
        "shrinkit_version": __version__,
        "family": fam.name,
        "architecture": (ckpt.config.get("architectures") or [None])[0],
        "base_model": source["repo_id"] if source else base_model_name(ckpt),
        "recipe": recipe.as_dict(),
        "recipe_hash": recipe_hash(recipe),
        "parent_hash": parent_hash(ckpt, hashes),
        "parent": {
            "path": str(ckpt.weights_path),
            **({"repo_id": source["repo_id"], "revision": source["revision"]} if source else {}),
            "dims": plan.parent.as_dict(),
            "params": parent_params(fam, ckpt),
            "bytes": ckpt.total_bytes,
            "dtype": DTYPE_STR.get(parent_dtype(ckpt), str(parent_dtype(ckpt))),
            "shards": [{"file": s, "sha256": hashes.get(Path(s).name)} for s in ckpt.shards],
        },
        "child": {
            "dims": plan.child.as_dict(),
            "params": count_params(cts),
            "bytes": sum(c.nbytes for c in cts),
            "dtype": DTYPE_STR[plan.out_dtype],
            "tied_embeddings": tied and not plan.untie,
            **({"untied_head_params": plan.parent.vocab_size * plan.child.hidden_size} if plan.untie else {}),
        },
        "kept": kept,
        **({"budget": plan.budget} if plan.budget else {}),
        "stages": stages,
        "seconds": round(seconds, 3),
    }


def kept_report(plan: Plan) -> dict:
    """Kept indices of every space of the family, in child numbering: a list (global space), or
    {child layer: list} or {"child layer.child expert": list}; "all" where nothing is cut."""
    out = {}
    for sp in plan.family.spaces():
        if not sp.cut:
            continue
        if sp.per == GLOBAL:
            k = plan.kept.get((sp, None))
            out[sp.name] = k.tolist() if k is not None else (
                "rotated" if sp is Space.HIDDEN and plan.rotation is not None else "all")
            continue
        d = {}
        for ci, p in enumerate(plan.layers):
            if sp.per == LAYER:
                if (sp, p) in plan.kept:
                    d[str(ci)] = plan.kept[(sp, p)].tolist()
                continue
            experts = plan.kept_experts(p)
            for ce, e in enumerate(experts if experts is not None else range(plan.parent.num_experts or 0)):
                if (sp, (p, e)) in plan.kept:
                    d[f"{ci}.{ce}"] = plan.kept[(sp, (p, e))].tolist()
        if sp.per == LAYER and (sp, None) in plan.kept:   # tensors outside the blocks (a pooling head)
            d["outside"] = plan.kept[(sp, None)].tolist()
        out[sp.name] = d or "all"
    return out


def base_model_name(ckpt: Checkpoint) -> str:
    n = ckpt.config.get("_name_or_path")
    if isinstance(n, str) and n and not os.path.isabs(n) and n.count("/") == 1:
        return n
    return ckpt.root.resolve().name
