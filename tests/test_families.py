"""The family design: spaces declared once, fused axes with unequal or per-head parts, experts
renumbered like layers, the README's family table generated from the family modules, and no
module outside shrinkit/families/ naming a model type."""

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from shrinkit.errors import ParentError
from shrinkit.families import FAMILIES, Dims, Family, families_table
from shrinkit.families.spaces import SPACES, Fused, Space as S, expert_rule, layer_rule, rule
from shrinkit.plan import Plan, check_fused
from shrinkit.stages.rank import select, spaces_to_rank

ROOT = Path(__file__).resolve().parents[1]


def test_readme_family_table_is_generated_from_the_modules():
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Supported families"):]
    rows = [line for line in block.splitlines() if line.startswith("|")]
    n = len(families_table())
    assert rows[:n] == families_table(), "README table should be:\n" + "\n".join(families_table())
    assert rows[n:n + 1] == []  # no stale row after the generated ones


def test_readme_table_negative_control():
    """A family whose notes differ from the README would fail the check above."""
    rows = families_table()
    assert rows[2] != rows[2].replace(FAMILIES[0].notes, FAMILIES[0].notes + " (changed)")


def test_no_module_outside_families_names_a_model_type():
    names = {t for f in FAMILIES for t in f.model_types} | {f.name for f in FAMILIES}
    names |= {"gemma", "phi3", "mixtral", "neox", "vit", "dinov2", "roberta"}
    pat = re.compile("|".join(sorted(names)), re.I)
    bad = []
    for p in (ROOT / "shrinkit").rglob("*.py"):
        if "families" in p.relative_to(ROOT / "shrinkit").parts:
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if pat.search(line):
                bad.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, bad


def test_every_space_declared_once():
    assert len({s.name for s in SPACES}) == len(SPACES)
    for s in SPACES:
        assert s.per in ("global", "layer", "expert", "stage") and s.unit in ("index", "head")
        assert s.size in Dims.__dataclass_fields__
        assert s.within is None or s.within in SPACES


# ---------------------------------------------------------------- fused axes and experts
DIMS = Dims(hidden_size=8, intermediate_size=6, num_attention_heads=4, num_key_value_heads=2, head_dim=2,
            num_hidden_layers=2, vocab_size=10, num_experts=3, num_experts_per_tok=2, expert_intermediate_size=4)
CHILD = Dims(hidden_size=8, intermediate_size=3, num_attention_heads=2, num_key_value_heads=1, head_dim=2,
             num_hidden_layers=2, vocab_size=10, num_experts=2, num_experts_per_tok=2, expert_intermediate_size=2)

QKV = Fused((S.Q_HEADS, S.KV_HEADS, S.KV_HEADS))          # Phi-3 qkv_proj: 8 + 4 + 4 rows
GATE_UP = Fused((S.FFN, S.FFN))                             # fused gate_up: 2 * ffn
NEOX = Fused((S.Q_HEADS,) * 3, layout="heads")             # GPT-NeoX query_key_value: [heads, 3, head_dim]
TOY = Family(
    name="toy", model_types=("toy",),
    rules=(rule("embed.weight", (S.VOCAB, S.HIDDEN)),
           layer_rule("layers", "qkv.weight", (QKV, S.HIDDEN)),
           layer_rule("layers", "neox.weight", (NEOX, S.HIDDEN)),
           layer_rule("layers", "gate_up.weight", (GATE_UP, S.HIDDEN)),
           layer_rule("layers", "router.weight", (S.EXPERTS, S.HIDDEN)),
           expert_rule("layers", "experts", "w1.weight", (S.EXPERT_FFN, S.HIDDEN))),
    keys={}, norm="rms", tie_default=False)


def toy_plan() -> Plan:
    plan = Plan(TOY, DIMS, CHILD, torch.float32)
    plan.layers = [0, 1]
    return plan


def test_fused_parts_follow_the_dims():
    assert QKV.part_sizes(DIMS) == (8, 4, 4)
    assert GATE_UP.part_sizes(DIMS) == (6, 6)
    plan = toy_plan()
    plan.kept = {(S.Q_HEADS, 0): torch.tensor([2, 3]), (S.KV_HEADS, 0): torch.tensor([1]),
                 (S.FFN, 0): torch.tensor([0, 4, 5])}
    # q heads 2,3 -> rows 4..7; kv head 1 -> rows 8 + 2..3 and 12 + 2..3
    assert plan.axis_index(QKV, 0, 16).tolist() == [4, 5, 6, 7, 10, 11, 14, 15]
    assert plan.axis_index(GATE_UP, 0, 12).tolist() == [0, 4, 5, 6, 10, 11]
    # per-head interleaved: head h owns rows h*6 .. h*6+5 (q, k, v of that head)
    assert plan.axis_index(NEOX, 0, 24).tolist() == list(range(12, 24))
    # an equal split (the old rule) would cut q/k/v at row 16/3: the wrong rows
    assert plan.axis_index(QKV, 0, 16).tolist() != [4, 5, 6, 7, 8, 9, 12, 13]


@dataclass
class Info:
    name: str
    shape: tuple


def test_fused_mismatch_is_a_parent_error_naming_the_tensor():
    r = TOY.match("layers.0.qkv.weight")[0]
    check_fused(TOY, DIMS, Info("layers.0.qkv.weight", (16, 8)), r)
    with pytest.raises(ParentError, match="layers.0.qkv.weight"):
        check_fused(TOY, DIMS, Info("layers.0.qkv.weight", (24, 8)), r)  # q, k, v equal: not this config


def test_experts_selected_per_layer_and_renumbered():
    plan = toy_plan()
    need = spaces_to_rank(plan)
    assert {S.FFN, S.Q_HEADS, S.KV_HEADS, S.EXPERTS, S.EXPERT_FFN} <= need
    scores = {(S.EXPERTS, 0): torch.tensor([1.0, 0.0, 2.0]), (S.EXPERTS, 1): torch.tensor([0.0, 2.0, 1.0])}
    for l in (0, 1):
        scores.update({(S.FFN, l): torch.arange(6.0), (S.Q_HEADS, l): torch.arange(4.0),
                       (S.HIDDEN, None): torch.arange(8.0)})
        for e in range(3):
            scores[(S.EXPERT_FFN, (l, e))] = torch.arange(4.0)
    scores[(S.EXPERT_FFN, (0, 2))] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    select(plan, "magnitude", scores, [0, 1], 0)
    assert plan.kept_experts(0) == [0, 2] and plan.kept_experts(1) == [1, 2]
    assert (S.EXPERT_FFN, (0, 1)) not in plan.kept           # a dropped expert's neurons are not chosen
    assert plan.kept[(S.EXPERT_FFN, (0, 2))].tolist() == [1, 3]

    class Ckpt:
        config = {}
        shards = ["a"]
        tensors = {}

    from shrinkit.checkpoint.reader import TensorInfo
    names = [f"layers.{l}.experts.{e}.w1.weight" for l in (0, 1) for e in range(3)]
    for i, n in enumerate(names):
        Ckpt.tensors[n] = TensorInfo(n, "a", torch.float32, (4, 8), i, i + 1)
    cts = plan.child_tensors(Ckpt)
    assert [(c.name, c.shape) for c in cts] == [
        ("layers.0.experts.0.w1.weight", (2, 8)), ("layers.0.experts.1.w1.weight", (2, 8)),
        ("layers.1.experts.0.w1.weight", (2, 8)), ("layers.1.experts.1.w1.weight", (2, 8))]
    assert [c.expert for c in cts] == [0, 2, 1, 2]
