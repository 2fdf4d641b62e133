"""`shrinkit verify PARENT CHILD` checks its pair before any model is built: the child is a
safetensors folder that shrinkit's reader accepts (nothing is ever unpickled), of the parent's
family, with the parent's vocabulary and tokenizer, and no dimension larger than the parent's."""

from __future__ import annotations

from pathlib import Path

from .checkpoint.reader import PICKLE_SUFFIXES, Checkpoint, open_checkpoint
from .errors import ShrinkitError, UsageError
from .plan import check_parent

TOKENIZER_DATA = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model")
SHAPE = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
         "num_experts", "expert_intermediate_size")


def check_pair(parent: Checkpoint, child: str | Path, child_ck: Checkpoint | None = None) -> None:
    """UsageError (exit 2) unless `child` can be verified against `parent` (`child_ck`: the child
    already open, or one tower's view of it)."""
    child = Path(child)
    if not child.is_dir():
        raise UsageError(f"child {child} is not a folder; pass the folder that shrinkit subclone wrote")
    if not (child / "config.json").is_file():
        raise UsageError(f"child {child} has no config.json; pass the folder that shrinkit subclone wrote")
    pickles = sorted(x.name for x in child.iterdir() if x.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UsageError(f"child {child} holds pickle weights ({', '.join(pickles)}); shrinkit verifies only "
                         "safetensors children and never unpickles")
    try:
        if child_ck is not None:
            ck = child_ck
            cfam, cdims = check_parent(ck)
        else:
            with open_checkpoint(child) as ck:
                cfam, cdims = check_parent(ck)
    except ShrinkitError as e:
        mt = _model_type(child) if child_ck is None else child_ck.config.get("model_type")
        if mt is not None and mt != parent.config.get("model_type"):   # e.g. a dual encoder against one tower
            raise UsageError(f"child {child} is a {mt} model, the parent a {parent.config.get('model_type')}; "
                             "verify a child against the parent it was cut from") from None
        raise UsageError(f"child {child}: {e}") from None
    pfam, pdims = check_parent(parent)
    if cfam.name != pfam.name or ck.config.get("model_type") != parent.config.get("model_type"):
        raise UsageError(f"child {child} is a {ck.config.get('model_type')} model, the parent a "
                         f"{parent.config.get('model_type')}; verify a child against the parent it was cut from")
    if cdims.vocab_size != pdims.vocab_size:
        raise UsageError(f"child {child} has a vocabulary of {cdims.vocab_size} tokens, the parent {pdims.vocab_size}; "
                         "verify a child against the parent it was cut from")
    if cdims.head_dim != pdims.head_dim:
        raise UsageError(f"child {child} has head_dim {cdims.head_dim}, the parent {pdims.head_dim}; "
                         "verify a child against the parent it was cut from")
    for k in SHAPE:
        c, p = getattr(cdims, k), getattr(pdims, k)
        if c is not None and (p is None or c > p):
            raise UsageError(f"child {child} has {k} {c}, larger than the parent's {p}; verify a child against "
                             "the parent it was cut from")
    for fn in TOKENIZER_DATA:
        a, b = parent.root / fn, child / fn
        if a.is_file() and b.is_file() and not _same_file(a, b):
            raise UsageError(f"child {child} has another tokenizer than the parent ({fn} differs); verify a child "
                             "against the parent it was cut from")


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _model_type(child: Path):
    try:
        with open_checkpoint(child) as ck:
            return ck.config.get("model_type")
    except ShrinkitError:
        return None
