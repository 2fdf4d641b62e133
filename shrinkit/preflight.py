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
from .errors import RecipeError, UsageError
from .plan import Plan
from .recipe import Calibration, Recipe

DEFAULT_VERIFY_SAMPLES = 16     # a full verification without calibration to follow
DEFAULT_VERIFY_SEQ_LEN = 256
SHARED = ("rank_neurons", "drop_layers")   # stages whose calibration pass can carry the held-out windows
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


def calibrating_stages(ckpt: Checkpoint, plan: Plan, recipe: Recipe, tokenizer) -> list[str]:
    """The stages that will run the parent on calibration data, in pipeline order."""
    from .pipeline import default_method
    from .stages.rank import spaces_to_rank

    out = []
    for name, st in recipe.parsed:
        if name == "rank_neurons" and (st.method or default_method(ckpt, tokenizer)) == "activation" \
                and spaces_to_rank(plan):
            out.append(name)
        elif name == "drop_layers" and st.strategy == "importance":
            out.append(name)
        elif name == "rotate_hidden":
            out.append(name)
        elif name == "heal" and (st.when == "always" or _heal_auto_runs(ckpt, plan, recipe, tokenizer)):
            out.append(name)
    return out


def _heal_auto_runs(ckpt: Checkpoint, plan: Plan, recipe: Recipe, tokenizer) -> bool:
    """heal `when: auto` runs on a child that drops layers when there is text for it."""
    from .pipeline import _has_text

    b = plan.family.block
    return bool(b is not None and b.out_proj and b.down_proj
                and plan.child.num_hidden_layers < plan.parent.num_hidden_layers
                and _has_text(ckpt, recipe.calibration_for("heal"), tokenizer))


def preflight(ckpt: Checkpoint, plan: Plan, recipe: Recipe, out: Path, *, device: str = "cpu",
              tokenizer=None, verify: bool = True) -> Checks:
    from .pipeline import resolve_device

    ck = Checks(device=resolve_device(device))
    fam = plan.family
    ck.max_positions = fam.max_positions(ckpt.config)
    pos_key = fam.keys.get("max_position_embeddings") or "max_position_embeddings"
    notes = ck.notes

    # -- calibration specs, one per calibrating stage (the top-level block under each stage's own)
    for name in calibrating_stages(ckpt, plan, recipe, tokenizer):
        spec = recipe.calibration_for(name)
        ck.specs[name] = _clamp(spec, "seq_len" in spec.model_fields_set, ck.max_positions,
                                f"{name} calibration", pos_key, notes)

    # -- verification: mode and held-out spec
    v = recipe.verify
    if not verify:
        ck.verify_mode = None
    elif v is not None or ck.specs:
        ck.verify_mode = "full"
    else:
        ck.verify_mode = "structural"
    if ck.verify_mode == "full":
        if fam.block is None:
            raise UsageError(f"verification does not support the {fam.name} family yet; pass --no-verify")
        base = next(iter(ck.specs.values()), None) or recipe.calibration
        v = v or _default_verify()
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
        spec = _clamp(spec, explicit_len, ck.max_positions, "verify", pos_key, notes)
        if v.tokens is not None and spec.seq_len != seq_len:
            spec = spec.model_copy(update={"samples": max(2, math.ceil(v.tokens / spec.seq_len))})
        if spec.data == "builtin" and v.data is None and (base is None or "data" not in base.model_fields_set) \
                and not fam.has_data_source(ckpt.root, tokenizer):
            spec = spec.model_copy(update={"data": fam.random_data})
            notes.append(f"verify: the parent has no data source for builtin data, so the held-out check runs on "
                         f"{fam.random_data.replace('_', ' ')}")
        ck.verify = spec
        ck.gate = v.gate()
        causal = fam.block.causal
        wrong = [k for k in ck.gate if (k == "min_similarity") == causal]
        if wrong:
            kind = "causal LM" if causal else "encoder"
            raise RecipeError(f"verify: {wrong[0]} does not apply to this {kind} parent; use "
                              + ("max_kl or max_perplexity_ratio" if causal else "min_similarity"))

    # -- the output: a writable folder with room for the child and the scratch activations
    anc = _writable_ancestor(out)
    probe = replace(plan, _cache={})
    from .stages.rank import select
    select(probe, "first", None, plan.layers, recipe.seed)  # shapes only; ranking does not change them
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

    # -- data: files, tokenizer, enough text; the windows themselves (made once, used later)
    from .datacheck import check_specs   # the same checks as `plan` makes
    check_specs(ckpt, list(ck.specs.values()) + ([ck.verify] if ck.verify is not None else []), tokenizer)
    for spec in ck.specs.values():
        if _key(spec) not in ck.tokens:
            ck.tokens[_key(spec)] = fam.calibration_inputs(ckpt, spec, plan.parent, seed=recipe.seed,
                                                           tokenizer=tokenizer)
    if ck.verify is not None:
        ck.verify_ids = fam.calibration_inputs(ckpt, ck.verify, plan.parent, seed=recipe.seed, split="heldout",
                                               tokenizer=tokenizer)
        first = next((sp for n, sp in ck.specs.items() if n in SHARED), None)
        if first is not None and first.data == ck.verify.data and first.seq_len == ck.verify.seq_len:
            ck.share = _key(first)
    return ck


def _default_verify():
    from .recipe import Verify
    return Verify()
