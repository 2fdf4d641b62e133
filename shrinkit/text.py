"""Calibration text: the built-in English text, .txt and .jsonl files, the parent's tokenizer,
and the token windows cut from them (calibration and held-out splits)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from pydantic import ValidationError

from .checkpoint.reader import Checkpoint
from .errors import RecipeError, UsageError
from .specs import Calibration
from .validate import Row, field_error, loads

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
MAX_TEXT_CHARS = 16_000_000


def has_tokenizer(folder: Path) -> bool:
    return any((folder / m).is_file() for m in TOKENIZER_MARKERS)


# ------------------------------------------------------------------ calibration data
def _text(data: str) -> str:
    if data == "builtin":
        return resources.files("shrinkit").joinpath("data/english.txt").read_text(encoding="utf-8")
    p = Path(data)
    if not p.is_file():
        raise RecipeError(f"calibration data {data!r} is neither builtin, random_tokens nor an existing .txt/.jsonl file")
    if p.suffix == ".jsonl":
        # at most MAX_TEXT_CHARS characters of text, read in bounded binary chunks (one huge line
        # never lands in memory whole); every row checked by schema (validate.Row)
        parts, n = [], 0
        with open(p, "rb") as f:
            for i, line in enumerate(iter(lambda: f.readline(4 * MAX_TEXT_CHARS + 1), b"")):
                if len(line) > 4 * MAX_TEXT_CHARS:
                    raise RecipeError(f"{p}:{i + 1}: the line is longer than {4 * MAX_TEXT_CHARS} bytes; "
                                      "split the text into rows")
                if not line.strip():
                    continue
                try:
                    t = Row.model_validate(loads(line.decode("utf-8"))).text
                except (ValueError, UnicodeDecodeError, ValidationError) as e:
                    why = field_error(e) if isinstance(e, ValidationError) else "not a JSON object"
                    raise RecipeError(f"{p}:{i + 1}: {why}; each .jsonl line must be an object with a "
                                      "\"text\" string") from None
                parts.append(t)
                n += len(t)
                if n > MAX_TEXT_CHARS:
                    break
        return "\n\n".join(parts)
    with open(p, encoding="utf-8", errors="replace") as f:
        return f.read(MAX_TEXT_CHARS)


def check_data(data: str) -> None:
    """A calibration file exists, is readable, is not empty and decodes (UTF-8 text, or .jsonl
    lines with a "text" field): a cheap look at its start, before any work."""
    if data in ("builtin", "random_tokens"):
        return
    p = Path(data)
    if not p.exists():
        raise RecipeError(f"calibration data {data!r} is neither builtin, random_tokens nor an existing .txt/.jsonl file")
    if not p.is_file():
        raise RecipeError(f"calibration data {data} is not a file; give a .txt or .jsonl file")
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 20)
    except OSError as e:
        raise RecipeError(f"calibration data {data} cannot be read ({e.strerror or e}); check its permissions") from None
    if not head.strip():
        raise RecipeError(f"calibration data {data} is empty; give a file with text in it")
    import codecs
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < (1 << 20))
    except UnicodeDecodeError as e:
        raise RecipeError(f"calibration data {data} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if p.suffix == ".jsonl":  # the first row, checked as _text() checks every row
        lines = text.splitlines()
        complete = lines if len(head) < (1 << 20) else lines[:-1]
        for i, ln in enumerate(complete):
            if not ln.strip():
                continue
            try:
                Row.model_validate(loads(ln))
            except (ValueError, ValidationError) as e:
                why = field_error(e) if isinstance(e, ValidationError) else "not a JSON object"
                raise RecipeError(f"{p}:{i + 1}: {why}; each .jsonl line must be an object with a "
                                  "\"text\" string") from None
            break


_TOKENIZERS: dict = {}


def load_tokenizer(ckpt: Checkpoint, tokenizer: str | Path | None):
    folder = Path(tokenizer) if tokenizer else ckpt.root
    if not has_tokenizer(folder):
        if tokenizer:
            raise UsageError(f"--tokenizer {tokenizer} holds no tokenizer files")
        raise UsageError(f"the parent {ckpt.root} has no tokenizer for calibration text; pass --tokenizer PATH, "
                         "use `calibration: {data: random_tokens}`, or rank with `method: magnitude`")
    key = str(folder.resolve())
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer
        try:
            _TOKENIZERS[key] = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:  # transformers raises several types for a broken tokenizer
            msg = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise UsageError(f"the tokenizer in {folder} cannot be loaded ({msg}); pass --tokenizer PATH "
                             "or use `calibration: {data: random_tokens}`") from None
    return _TOKENIZERS[key]


def calibration_tokens(ckpt: Checkpoint, spec: Calibration, vocab: int, *, seed: int, split: str = "calib",
                       tokenizer: str | Path | None = None) -> torch.Tensor:
    """[samples, seq_len] token ids. Text is split 90/10: calibration windows come from the first
    90%, held-out windows (split="heldout") from the last 10%."""
    if spec.data == "random_tokens":
        g = torch.Generator().manual_seed(seed + (1 if split == "heldout" else 0))
        return torch.randint(0, vocab, (spec.samples, spec.seq_len), generator=g)
    text = _text(spec.data)
    cut = int(len(text) * 0.9)
    text = text[:cut] if split == "calib" else text[cut:]
    tok = load_tokenizer(ckpt, tokenizer)
    tok.model_max_length = 1 << 60  # one long text, cut into windows below; silences the length warning
    ids = tok(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if len(ids) < spec.seq_len:
        raise RecipeError(f"calibration data gives only {len(ids)} tokens for the {split} split, fewer than seq_len "
                          f"{spec.seq_len}; use more text or a shorter seq_len")
    ids = torch.tensor(ids, dtype=torch.long)
    starts = torch.linspace(0, len(ids) - spec.seq_len, spec.samples).long()
    return torch.stack([ids[s:s + spec.seq_len] for s in starts.tolist()])
