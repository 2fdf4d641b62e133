"""The supported families: one module each, listed in FAMILIES.

Adding one: a Family (or a subclass with the methods data cannot express) in its own module
here, listed below, plus its tests; see README.md in this folder for the rules, spaces, fused
parts, config keys, block description, rescale and the planted tests a family needs.
"""

from __future__ import annotations

from ..errors import ParentError
from .base import Dims, Family
from .bert import bert
from .clip import clip_vision_model
from .clip_text import clip_text_model, siglip_text_model
from .convnext import convnext, convnextv2
from .dinov2 import dinov2
from .distilbert import distilbert
from .gemma import gemma, gemma2, gemma3_text
from .gpt2 import gpt2
from .gpt_neox import gpt_neox
from .llama import llama
from .modernbert import modernbert
from .moe import mixtral, qwen2_moe, qwen3_moe
from .olmo2 import olmo2
from .phi3 import phi3
from .roberta import roberta
from .siglip import siglip_vision_model
from .vit import vit

FAMILIES: tuple[Family, ...] = (llama, gpt2, bert, roberta, distilbert, gemma, gemma2, gemma3_text, phi3, vit, dinov2,
                                gpt_neox, mixtral, qwen2_moe, qwen3_moe, olmo2,
                                modernbert, clip_vision_model,
                                siglip_vision_model, clip_text_model, siglip_text_model, convnext, convnextv2)


def family_for(config: dict) -> Family:
    mt = config.get("model_type")
    for fam in FAMILIES:
        if mt in fam.model_types:
            return fam
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else "?"
    from .dual import DUALS
    if any(mt in d.model_types for d in DUALS):
        raise ParentError(f"model_type {mt!r} is a dual encoder (two towers): subclone, plan, inspect and verify take "
                          "it whole, tower by tower; this step takes one tower")
    known = ", ".join([t for f in FAMILIES for t in f.model_types] + [t for d in DUALS for t in d.model_types])
    raise ParentError(f"unsupported architecture: model_type {repr(mt)[:80]} ({str(arch)[:80]}); shrinkit supports {known}")


def families_table() -> list[str]:
    """The README's "Supported families" table, generated from the family modules (a test
    checks that the README holds exactly these lines)."""
    rows = ["| family | model types | notes |", "|---|---|---|"]
    from .dual import DUALS
    for f in (*FAMILIES, *DUALS):
        rows.append(f"| {f.name} | {', '.join(f.model_types)} | {f.notes} |")
    return rows


__all__ = ["Dims", "Family", "FAMILIES", "family_for", "families_table"]
