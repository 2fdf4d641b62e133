"""What a stage is: its recipe block, what it reads, when it skips, what it does to the plan and
what it does when it runs. The registry (shrinkit.stages.STAGES) lists the stages; the recipe,
the preflight checks, the output-ownership checks and the run all ask it, so they cannot
disagree about a stage (see shrinkit/stages/README.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..specs import Calibration, Strict

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint.reader import Checkpoint
    from ..plan import Plan
    from ..progress import Progress
    from ..recipe import Recipe


@dataclass(frozen=True)
class Read:
    """Data a stage reads: the stage's label (its name and the mode that reads, e.g.
    "drop_layers (importance)"), what it reads (e.g. "calibration text") and the spec."""

    stage: str
    label: str
    what: str
    spec: Calibration


@dataclass
class Context:
    """Everything a stage sees. Before the run (preflight, plan) only ckpt, recipe and tokenizer
    are set, and plan once prepared; the run fills in the rest."""

    ckpt: "Checkpoint"
    recipe: "Recipe"
    tokenizer: str | os.PathLike | None = None
    plan: "Plan | None" = None
    device: str = "cpu"
    scratch: Path | None = None
    progress: "Progress | None" = None
    checks: object = None          # shrinkit.preflight.Checks: resolved specs, token windows, verification
    calib: dict = field(default_factory=dict)   # spec json -> calibration statistics (one pass per spec)
    written: list = field(default_factory=list)  # the child tensors, once written
    files: dict = field(default_factory=dict)    # child file -> {"size", "sha256"}, recorded as written
    layers_chosen: bool = False    # a stage has chosen the child's layers (ranking then sees only those)

    @property
    def seed(self) -> int:
        return self.recipe.seed

    def spec(self, stage: str) -> Calibration:
        """The calibration spec stage `stage` runs with: the one preflight resolved (top-level block
        under the stage's own, seq_len clamped), else the recipe's."""
        specs = getattr(self.checks, "specs", None) or {}
        return specs.get(stage) or self.recipe.calibration_for(stage)

    def calibration(self, stage: str):
        """Calibration statistics of the parent on stage `stage`'s spec: one pass per distinct
        spec, shared by the stages that name the same one (its scratch file lives in the output's
        temporary folder, unlinked at once). The pass that preflight chose to carry
        verification's held-out windows computes their final states too."""
        from ..calibrate import calibrate
        spec = self.spec(stage)
        key = spec.model_dump_json()
        if key not in self.calib:
            ck = self.checks
            extra = ck.verify_ids if ck.share == key and ck.parent_final is None else None
            self.calib[key] = calibrate(self.ckpt, self.plan, spec, seed=self.seed, progress=self.progress,
                                        device=self.device, tokenizer=self.tokenizer, scratch=self.scratch,
                                        ids=ck.tokens.get(key), extra_ids=extra)
            if extra is not None:
                ck.parent_final = self.calib[key].extra_final
                self.calib[key].extra_final = None
        return self.calib[key]

    def selected(self) -> "Plan":
        """The plan with kept indices chosen: a plan no ranking stage filled keeps the first units
        of every space it cuts (see shrinkit.ranking.ensure_selected)."""
        from ..ranking import ensure_selected
        ensure_selected(self.plan, self.seed)
        return self.plan


class Stage:
    """One pipeline stage. A subclass sets `name` and `config` and overrides what it does; the
    defaults are a stage that reads nothing, never skips and changes nothing."""

    name: ClassVar[str]
    config: ClassVar[type[Strict]]
    default: ClassVar[dict | None] = None      # its block in the default pipeline (None: not in it)
    # pipeline order, as data: capabilities this stage provides, and for capabilities of other
    # stages the message when one of them comes in the wrong place ({self}: this stage's name,
    # {other}: the other's)
    provides: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[dict[str, str]] = {}      # capability -> message: this stage runs before every provider
    after: ClassVar[dict[str, str]] = {}       # capability -> message: this stage runs after every provider
    excludes: ClassVar[dict[str, str]] = {}    # capability -> message if a stage providing it is present
    required: ClassVar[str | None] = None      # message if the pipeline lacks this stage
    shares_heldout: ClassVar[bool] = False     # its calibration pass can carry verification's held-out windows

    # -- before any work
    def child_layers(self, cfg, n_parent: int) -> int | None:
        """The number of layers this stage's block fixes (an explicit list), else None."""
        return None

    def listed(self, cfg, n_parent: int) -> list[int] | None:
        """The parent layers this stage's block lists as kept (an explicit list), else None."""
        return None

    def prepare(self, cfg, ctx: Context) -> None:
        """Plan-time: what the stage decides from the recipe alone (ctx.plan is set)."""

    def skip_reason(self, cfg, ctx: Context) -> str | None:
        """Why this stage will not run (recorded in the report), or None. ctx.plan may be None
        (before the plan exists): then only what the recipe and parent say is considered."""
        return None

    def reads(self, cfg, ctx: Context) -> list[Read]:
        """The data this stage will read when it runs (none when it skips)."""
        return []

    def inputs(self, cfg, ctx: Context) -> list[Calibration]:
        """Every data spec this stage's block can name (the output may not lie inside any of them)."""
        return [ctx.recipe.calibration_for(self.name)] if hasattr(cfg, "calibration") else []

    # -- the run
    def run(self, cfg, ctx: Context) -> dict:
        """Do the stage's work; returns its entry in the report (besides "stage" and "seconds")."""
        return {}


def data_what(ctx: Context) -> str:
    """What a stage that runs the parent on calibration data reads from this parent."""
    from ..families import family_for
    return "calibration text" if family_for(ctx.ckpt.config).random_data == "random_tokens" else "calibration images"
