"""Shared test helpers: run shrinkit, load children with transformers, compare outputs."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from shrinkit.pipeline import subclone
from shrinkit.recipe import Recipe


def recipe(**data) -> Recipe:
    r = Recipe.model_validate(yaml.safe_load(yaml.safe_dump(data)))
    r.name = r.name or "test"
    return r


def run(parent, out, **data):
    return subclone(parent, recipe(**data), out)


def load(path, cls="AutoModelForCausalLM"):
    """Load with transformers; fail on any missing or unexpected key."""
    import transformers

    model, info = getattr(transformers, cls).from_pretrained(str(path), output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info.get("mismatched_keys")
    return model.eval()


def tokens(vocab: int, n: int = 2, seq: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(path: Path | str, ids: torch.Tensor, cls="AutoModelForCausalLM") -> torch.Tensor:
    m = load(path, cls)
    out = m(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def inspect_and_plan(tmp_path: Path, parent, name: str, rec: dict, expect: str = '"hidden_size": 48') -> None:
    """`shrinkit inspect --json` on `parent` names `name`, and `shrinkit plan --json` with the recipe
    `rec` exits 0 and prints `expect`."""
    import json

    from typer.testing import CliRunner

    from shrinkit.cli import app

    r = CliRunner().invoke(app, ["inspect", str(parent), "--json"])
    assert r.exit_code == 0 and name in r.stdout, r.output
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(rec))
    r = CliRunner().invoke(app, ["plan", str(parent), "-r", str(path), "--json"])
    assert r.exit_code == 0 and expect in r.stdout, r.output
