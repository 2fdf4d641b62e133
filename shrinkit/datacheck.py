"""The calibration-data checks that preflight makes for every data source a run reads (`subclone`
and `plan` both run preflight, so a dry run refuses exactly the data a run would refuse:
RecipeError / UsageError, exit 2, one line naming the file and the stage that reads it).

For a text parent, each data source a run reads is checked: it names something the family reads
(builtin, random_tokens, an existing file), the file is readable, not empty, UTF-8, every
`.jsonl` row is an object with a "text" string (validate.Row), the rows together hold some text
(not only empty strings or whitespace), and a tokenizer for it loads (the parent's or
--tokenizer). For an image parent: the data names builtin, random_pixels or a folder, and the
parent's preprocessor_config.json passes its schema (validate.ImageProcessorConfig), and a folder's
images share one size when that config does not resize them.
"""

from __future__ import annotations


def check_specs(ckpt, specs: list, tokenizer=None) -> None:
    """Refuse, before any work, calibration or verification data that the run could not read."""
    from . import text as C
    from .families import family_for

    fam = family_for(ckpt.config)
    seen: set = set()
    for spec in specs:
        data = spec.data
        if data in seen:
            continue
        seen.add(data)
        fam.check_data(data)
        if fam.random_data == "random_tokens":   # a family that reads text
            C.check_data(data)
            if data not in ("builtin", "random_tokens") and not C._text(data).strip():
                from .errors import RecipeError
                raise RecipeError(f"calibration data {data} holds no text (every row's text is empty or "
                                  "whitespace); give a file with text in it")
            if data != "random_tokens":
                C.load_tokenizer(ckpt, tokenizer)
        else:
            from .images import _folder_files, check_processor, check_sizes
            if data != fam.random_data or _has_processor(ckpt.root):
                check_processor(ckpt.root, required=data != fam.random_data)
            if data not in ("builtin", fam.random_data):
                check_sizes(ckpt.root, _folder_files(data, "calib") + _folder_files(data, "heldout"))


def _has_processor(root) -> bool:
    from .images import has_preprocessor
    return has_preprocessor(root)
