"""What vision transformers share: images in, pixel embeddings (a patch convolution whose output
channels are the hidden space, a CLS token, learned position embeddings), no vocabulary, and
transformers module names that differ from the names their checkpoints store."""

from __future__ import annotations

import re

from .base import Dims, Family


class Vision(Family):
    """A family whose parents read images. Subclasses set `renames`: (regex over a transformers
    module parameter name, replacement giving the stored name, (part, parts) or None)."""

    renames: tuple = ()
    random_data = "random_pixels"
    data_kinds = "builtin, random_pixels or a folder of images"
    embed_as_stored = False  # the embeddings module (patch conv, CLS, positions) runs in float32

    def check_config(self, cfg: dict, where: str = "config.json") -> None:
        super().check_config({**cfg, "vocab_size": 1}, where)  # no vocabulary to check

    def dims(self, cfg: dict) -> Dims:
        return super().dims({**cfg, "vocab_size": 0})  # no vocabulary

    # ------------------------------------------------------------------ data: images
    def has_data_source(self, root, tokenizer=None) -> bool:
        from ..images import has_preprocessor
        return has_preprocessor(root)

    def check_data(self, data: str) -> None:
        import os

        from ..errors import RecipeError
        if data == "random_tokens":
            raise RecipeError("`data: random_tokens` is for text parents; this parent takes images: " + self.data_kinds)
        if data not in ("builtin", self.random_data) and not os.path.isdir(data):
            what = "a file" if os.path.exists(data) else "neither builtin, random_pixels nor a folder"
            raise RecipeError(f"calibration data {data!r} is {what}; this parent takes images: {self.data_kinds}")

    def calibration_inputs(self, ckpt, spec, dims, *, seed, split="calib", tokenizer=None):
        from ..images import calibration_pixels
        return calibration_pixels(ckpt.root, spec.data, spec.samples, seed=seed, split=split,
                                  image_size=ckpt.config.get("image_size"))

    def extra_tokens(self, cfg: dict) -> int:
        """Positions besides the patches: the CLS token (and register tokens)."""
        return 1

    def input_len(self, cfg: dict, inputs) -> int:
        p = int(cfg.get("patch_size") or 16)
        return (inputs.shape[-2] // p) * (inputs.shape[-1] // p) + self.extra_tokens(cfg)

    def describe_inputs(self, inputs) -> str:
        return f"{inputs.shape[0]} images of {inputs.shape[-2]}x{inputs.shape[-1]} pixels"

    # ------------------------------------------------------------------ block-at-a-time forward
    def embedding_modules(self, bm) -> list:
        return [bm.base.embeddings]

    def checkpoint_name(self, param: str):
        for pat, repl, chunk in self.renames:
            name, n = re.subn(pat, repl, param)
            if n:
                return name, chunk
        return None
