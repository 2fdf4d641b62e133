"""A whole stage in one module: what tests/test_stages.py registers to show that adding a stage
takes this module and one registry line (shrinkit/stages/README.md)."""

from shrinkit.specs import Strict
from shrinkit.stages.base import Stage


class Noop(Strict):
    note: str = ""


class NoopStage(Stage):
    name = "noop"
    config = Noop
    before = {"writes": "{self} must come before {other}"}

    def run(self, cfg, ctx):
        return {"note": cfg.note, "layers": ctx.plan.parent.num_hidden_layers}


STAGE = NoopStage()
