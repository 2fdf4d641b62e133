"""Every check that can be made before any work: before the first forward pass or written byte.

preflight() resolves what the run will do with data (each calibrating stage's spec, the
verification's mode and held-out spec), makes the token windows, and refuses, with one line and
exit code 2, what would fail later: a missing or broken tokenizer for a stage that reads text,
a calibration file that is missing, unreadable, empty or not UTF-8, too little text for the
windows, an explicit seq_len beyond the parent's positions, a --device that is not there, an
output folder that cannot be written, and too little free disk for the child and the scratch
activations.

The default check, when the recipe has no `verify:` block (measured in BENCHMARKS.md):
- a run that calibrates (activation ranking, importance layer dropping) verifies on held-out
  windows of its calibration data: samples = max(2, calibration samples // 8) at the same
  seq_len, and the parent's pass over them rides along with the calibration pass;
- a data-free run (first, uniform, random, magnitude; layer dropping by position) reads its
  written child back instead: tensors finite, names and shapes as planned, config as planned;
  the report says how to run the full check.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .checkpoint.reader import Checkpoint
from .errors import RecipeError, ShrinkitError, UsageError
from .plan import Plan
from .ranking import ensure_selected
from .specs import Calibration, Verify
from .stages import STAGES, Context, Read

DEFAULT_VERIFY_SAMPLES = 16     # a full verification without calibration to follow
DEFAULT_VERIFY_SEQ_LEN = 256
DEFAULT_VERIFY_FRACTION = 8     # a calibrated run's default: calibration samples // 8 held-out windows
SLACK_BYTES = 16 << 20          # headers, config, tokenizer files, report


@dataclass
class Checks:
    device: str
    specs: dict[str, Calibration] = field(default_factory=dict)   # calibrating stage -> its spec
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # spec json -> calibration windows
    verify_mode: str | None = None    # "full" | "structural" | None (--no-verify)
    verify: Calibration | None = None  # the held-out spec of a full verification
    verify_ids: torch.Tensor | None = None
    gate: dict = field(default_factory=dict)
    share: str | None = None          # spec json of the calibration pass that also runs the held-out windows
    parent_final: torch.Tensor | None = None   # filled by that pass
    max_positions: int | None = None
    notes: list[str] = field(default_factory=list)
    need_bytes: int = 0
    budget: object = None             # shrinkit.runtime.Budget of the device


def _key(spec: Calibration) -> str:
    return spec.model_dump_json()


def _clamp(spec: Calibration, explicit: bool, max_pos: int | None, where: str, key: str, notes: list) -> Calibration:
    if max_pos is None or spec.seq_len <= max_pos:
        return spec
    if explicit:
        raise RecipeError(f"{where}: seq_len {spec.seq_len} is longer than the parent's {max_pos} positions "
                          f"({key} in config.json); use seq_len: {max_pos} or less")
    notes.append(f"{where}: seq_len {spec.seq_len} clamped to the parent's {max_pos} positions ({key})")
    return spec.model_copy(update={"seq_len": max_pos})


def _writable_ancestor(out: Path) -> Path:
    p = out
    for d in [*out.parents]:
        if d.exists():
            if not d.is_dir():
                raise UsageError(f"--out {p}: {d} is a file, not a folder; choose another --out")
            if not os.access(d, os.W_OK | os.X_OK):
                raise UsageError(f"--out {p}: {d} is not writable; choose another --out")
            return d
    return Path("/")  # pragma: no cover


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def stage_reads(ckpt: Checkpoint, plan: Plan, recipe, tokenizer) -> list[Read]:
    """What every stage that will run reads, in pipeline order (the registry's reads())."""
    ctx = Context(ckpt, recipe, tokenizer, plan=plan)
    return [r for name, cfg in recipe.parsed for r in STAGES[name].reads(cfg, ctx)]


def calibrating_stages(ckpt: Checkpoint, plan: Plan, recipe, tokenizer) -> list[str]:
    """The stages that will run the parent on calibration data, in pipeline order."""
    return list(dict.fromkeys(r.stage for r in stage_reads(ckpt, plan, recipe, tokenizer)))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device {device!r}: use cpu, cuda, cuda:N or auto")
    return device


def resolve_budget(device: str, memory: int | str | None = None):
    """The block runtime's memory budget on `device` (shrinkit.runtime.Budget): --device-memory
    when given (a size like 40GB), else the device's default."""
    from .runtime import Budget
    from .specs import parse_size

    if memory is not None:
        try:
            memory = parse_size(memory)
        except ValueError as e:
            raise UsageError(f"--device-memory: {e}") from None
        if memory < (64 << 20):
            raise UsageError(f"--device-memory {memory} bytes is below the 64 MB the runtime needs; give more")
    return Budget.for_device(device, memory)


class _Reading:
    """Re-raises a data error of one reader with what reads it: `drop_layers (importance) reads
    calibration text (builtin): ...`, and where another stage has its own calibration block that
    this one does not share, how a top-level `calibration:` serves both."""

    def __init__(self, read: Read, recipe):
        self.read, self.recipe = read, recipe

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or not isinstance(e, ShrinkitError) or getattr(e, "_reader", False):
            return False
        r = self.read
        msg = f"{r.label} reads {r.what} ({r.spec.data}): {e}"
        own = getattr(self.recipe.stage(r.stage), "calibration", None) if r.stage in STAGES else None
        others = [n for n, cfg in self.recipe.parsed if n != r.stage and getattr(cfg, "calibration", None) is not None]
        if self.recipe.calibration is None and own is None and others:
            msg += (f" (the `calibration:` block under {others[0]} serves that stage only; a top-level "
                    "`calibration:` beside `stages:` serves every stage)")
        err = type(e)(msg)
        err._reader = True
        raise err from None


def preflight(ckpt: Checkpoint, plan: Plan, recipe, out: Path | None, *, device: str = "cpu",
              tokenizer=None, verify: bool = True, device_memory: int | None = None) -> Checks:
    """Every check before the first forward pass or written byte, in four phases: each reading
    stage's calibration spec, the verification's mode and held-out spec, the output folder and
    its free space, then the data itself (files, tokenizer, enough text: the windows are made here,
    once)."""
    ck = Checks(device=resolve_device(device))
    ck.budget = resolve_budget(ck.device, device_memory)
    fam = plan.family
    ck.max_positions = fam.max_positions(ckpt.config)
    pos_key = fam.keys.get("max_position_embeddings") or "max_position_embeddings"
    reads = _specs(ck, ckpt, plan, recipe, tokenizer, pos_key)
    ck.verify_mode = None if not verify else "full" if (recipe.verify is not None or ck.specs) else "structural"
    if ck.verify_mode == "full":
        _verify_spec(ck, ckpt, fam, recipe, tokenizer, pos_key)
    if out is not None:   # None: a dry run (`plan`) with no output folder to check
        _disk(ck, ckpt, plan, recipe, out)
    _data(ck, ckpt, plan, recipe, tokenizer, reads)
    return ck


def _specs(ck: Checks, ckpt, plan, recipe, tokenizer, pos_key) -> dict:
    """Calibration specs, one per calibrating stage (the top-level block under each stage's own,
    seq_len clamped to the parent's positions); returns stage -> its Read with that spec."""
    reads = {}
    for r in stage_reads(ckpt, plan, recipe, tokenizer):
        if r.stage in ck.specs:
            continue
        ck.specs[r.stage] = _clamp(r.spec, "seq_len" in r.spec.model_fields_set, ck.max_positions,
                                   f"{r.stage} calibration", pos_key, ck.notes)
        reads[r.stage] = Read(r.stage, r.label, r.what, ck.specs[r.stage])
    return reads


def _verify_spec(ck: Checks, ckpt, fam, recipe, tokenizer, pos_key) -> None:
    """A full verification's held-out spec and gate (defaults from the first calibration spec)."""
    if fam.block is None:
        raise UsageError(f"verification does not support the {fam.name} family yet; pass --no-verify")
    base = next(iter(ck.specs.values()), None) or recipe.calibration
    v = recipe.verify or _default_verify()
    explicit_len = v.seq_len is not None or (base is not None and "seq_len" in base.model_fields_set)
    seq_len = v.seq_len or (base.seq_len if base is not None else DEFAULT_VERIFY_SEQ_LEN)
    if v.tokens is not None:
        samples = max(2, math.ceil(v.tokens / seq_len))
    elif v.samples is not None:
        samples = max(2, v.samples)
    elif ck.specs:
        samples = max(2, base.samples // DEFAULT_VERIFY_FRACTION)
    else:
        samples = DEFAULT_VERIFY_SAMPLES
    data = v.data or (base.data if base is not None else "builtin")
    spec = Calibration(data=data, samples=samples, seq_len=seq_len, batch_size=v.batch_size)
    spec = _clamp(spec, explicit_len, ck.max_positions, "verify", pos_key, ck.notes)
    if v.tokens is not None and spec.seq_len != seq_len:
        spec = spec.model_copy(update={"samples": max(2, math.ceil(v.tokens / spec.seq_len))})
    if spec.data == "builtin" and v.data is None and (base is None or "data" not in base.model_fields_set) \
            and not fam.has_data_source(ckpt.root, tokenizer):
        spec = spec.model_copy(update={"data": fam.random_data})
        ck.notes.append(f"verify: the parent has no data source for builtin data, so the held-out check runs on "
                        f"{fam.random_data.replace('_', ' ')}")
    ck.verify = spec
    ck.gate = v.gate()
    causal = fam.block.causal
    wrong = [k for k in ck.gate if (k == "min_similarity") == causal]
    if wrong:
        kind = "causal LM" if causal else "encoder"
        raise RecipeError(f"verify: {wrong[0]} does not apply to this {kind} parent; use "
                          + ("max_kl or max_perplexity_ratio" if causal else "min_similarity"))


def _disk(ck: Checks, ckpt, plan, recipe, out: Path) -> None:
    """The output: a writable folder with room for the child and the scratch activations."""
    anc = _writable_ancestor(out)
    probe = ensure_selected(replace(plan, _cache={}), recipe.seed)  # shapes only; ranking does not change them
    child_bytes = sum(c.nbytes for c in probe.child_tensors(ckpt))
    scratch = 0
    H = plan.parent.hidden_size
    nv = ck.verify.samples * ck.verify.seq_len if ck.verify is not None else 0
    for spec in ck.specs.values():  # a pass's residual stream (held-out windows riding along: twice)
        scratch = max(scratch, (spec.samples * spec.seq_len + 2 * nv) * H * 4)
    scratch += nv * (H + 2 * plan.child.hidden_size) * 4   # the three models' final states
    ck.need_bytes = child_bytes + scratch + SLACK_BYTES
    free = shutil.disk_usage(anc).free
    if free < ck.need_bytes:
        raise UsageError(f"not enough free disk space in {anc}: the child needs {_gb(child_bytes)}"
                         + (f" plus {_gb(scratch)} of scratch activations" if scratch else "")
                         + f", {_gb(free)} is free; free some space or choose another --out")


def _data(ck: Checks, ckpt, plan, recipe, tokenizer, reads: dict) -> None:
    """Data: files, tokenizer, enough text; the windows themselves (made once, used later). An
    error names the stage that reads the data (_Reading)."""
    from .datacheck import check_specs

    fam = plan.family
    text = fam.random_data == "random_tokens"
    ver = [Read("verify", "verify", "held-out text" if text else "held-out images", ck.verify)] \
        if ck.verify is not None else []
    for r in list(reads.values()) + ver:
        with _Reading(r, recipe):
            check_specs(ckpt, [r.spec], tokenizer)
    for r in reads.values():
        if _key(r.spec) not in ck.tokens:
            with _Reading(r, recipe):
                ck.tokens[_key(r.spec)] = fam.calibration_inputs(ckpt, r.spec, plan.parent, seed=recipe.seed,
                                                                 tokenizer=tokenizer)
    if ck.verify is not None:
        with _Reading(ver[0], recipe):
            ck.verify_ids = fam.calibration_inputs(ckpt, ck.verify, plan.parent, seed=recipe.seed,
                                                   split="heldout", tokenizer=tokenizer)
        first = next((sp for n, sp in ck.specs.items() if STAGES[n].shares_heldout), None)
        if first is not None and first.data == ck.verify.data and first.seq_len == ck.verify.seq_len:
            ck.share = _key(first)


def _default_verify():
    return Verify()
