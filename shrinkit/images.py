"""Image calibration and verification data: pixel batches for vision parents.

`data` is `builtin` (crops of public-domain and CC0 photographs shipped in shrinkit/data/images/),
`random_pixels` (standard-normal pixel values, already in the normalized space), or a folder of
images. Images are read with PIL and preprocessed by the parent's own preprocessor_config.json
through transformers' image processor, so the parent sees them as it was trained to.

Splits: calibration uses the builtin `calib-*` images (60 crops of 10 photographs) or the first
90% of a folder's files (sorted by name); verification (`heldout`) uses the builtin
`heldout-*` images (20 other crops, two of every photograph) or the folder's last 10% (a
folder of fewer than ten images serves both). When a split has fewer images than `samples`, it is repeated, mirrored
left-right on every other pass.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .errors import ParentError, RecipeError, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
PREPROCESSOR = "preprocessor_config.json"
DATA_KINDS = "builtin, random_pixels or a folder of images"
PROCESS_BATCH = 16  # images decoded and preprocessed at a time


def has_preprocessor(folder: Path) -> bool:
    return (Path(folder) / PREPROCESSOR).is_file()


def check_processor(root: Path, required: bool = True) -> dict | None:
    """The parent's preprocessor_config.json, read with a size cap and checked by schema
    (validate.ImageProcessorConfig: sizes positive, means and stds finite, one per channel, stds
    positive, flags booleans): ParentError (exit 3) naming the field. Without one: UsageError when
    `required`, else None."""
    from pydantic import ValidationError

    from .validate import MAX_CONFIG, ImageProcessorConfig, TooDeep, TooLarge, field_error, loads, read_capped

    root = Path(root)
    path = root / PREPROCESSOR
    if not has_preprocessor(root):
        if not required:
            return None
        raise UsageError(f"the parent {root} has no {PREPROCESSOR} to preprocess calibration images; copy the "
                         "model's preprocessor_config.json into it, use `data: random_pixels`, or rank with "
                         "`method: magnitude`")
    try:
        cfg = loads(read_capped(path, MAX_CONFIG))
    except OSError as e:
        raise ParentError(f"{path} cannot be read ({e.strerror}); check its permissions") from None
    except (TooLarge, TooDeep) as e:
        raise ParentError(f"{path} is not a usable image processor config: {e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ParentError(f"{path} is not a usable image processor config: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ParentError(f"{path} is not a usable image processor config: not a JSON object")
    try:
        ImageProcessorConfig.model_validate(cfg)
    except ValidationError as e:
        raise ParentError(f"{path} is not a usable image processor config: {field_error(e)}; fix the parent's "
                          f"{PREPROCESSOR}") from None
    return cfg


def image_processor(root: Path):
    """The parent's transformers image processor, from its preprocessor_config.json (checked by
    schema first: check_processor)."""
    root = Path(root)
    check_processor(root)
    from transformers import AutoImageProcessor
    from transformers.utils import logging

    logging.set_verbosity_error()
    try:
        return AutoImageProcessor.from_pretrained(str(root))
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ParentError(f"{root / PREPROCESSOR} is not a usable image processor config: {msg}") from None


def check_sizes(root: Path, files: list) -> None:
    """Images that the parent's processor does not resize (do_resize: false, no center crop)
    must share one size to form a batch: RecipeError (exit 2) naming two that differ. Reads only
    the image headers."""
    cfg = check_processor(root, required=False) or {}
    if cfg.get("do_resize", True) is not False or cfg.get("do_center_crop") is True:
        return
    from PIL import Image, UnidentifiedImageError

    sizes: dict = {}
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.setdefault(im.size, f)
        except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RecipeError(f"calibration image {f} cannot be read ({msg}); remove or replace it") from None
        if len(sizes) > 1:
            (a, fa), (b, fb) = list(sizes.items())[:2]
            raise RecipeError(f"calibration images {Path(fa).name} ({a[0]}x{a[1]}) and {Path(fb).name} ({b[0]}x{b[1]}) "
                              f"differ in size and the parent's {PREPROCESSOR} has do_resize: false, so they cannot "
                              "form one batch; give images of one size, or use `data: builtin` or `data: random_pixels`")


def _builtin_files(split: str) -> list:
    folder = resources.files("shrinkit").joinpath("data/images")
    return sorted((f for f in folder.iterdir() if f.name.startswith(f"{split}-") and f.name.endswith(".jpg")),
                  key=lambda f: f.name)


def _folder_files(data: str, split: str) -> list[Path]:
    folder = Path(data)
    if not folder.exists():
        raise RecipeError(f"calibration data {data!r} is neither {DATA_KINDS.replace(' or a', ' nor a')}")
    if not folder.is_dir():
        raise RecipeError(f"calibration data {data!r} is a file; this parent takes images: {DATA_KINDS}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RecipeError(f"calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                          "add some, or use `data: builtin`")
    if len(files) < 10:
        return files
    cut = len(files) - max(1, len(files) // 10)
    return files[:cut] if split == "calib" else files[cut:]


def _open(f):
    from PIL import Image, UnidentifiedImageError

    try:
        with f.open("rb") as fh:
            im = Image.open(fh)
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(f"calibration image {f} cannot be read ({msg}); remove or replace it") from None


def _size(proc) -> tuple[int, int]:
    """(height, width) of the processor's output, from one blank image."""
    from PIL import Image

    out = proc(images=[Image.new("RGB", (64, 64))], return_tensors="pt")["pixel_values"]
    return int(out.shape[-2]), int(out.shape[-1])


def random_pixels(n: int, size: tuple[int, int], seed: int, split: str = "calib") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + (1 if split == "heldout" else 0))
    return torch.randn((n, 3, *size), generator=g)


def calibration_pixels(root: Path, data: str, samples: int, *, seed: int = 0, split: str = "calib",
                       image_size: int | None = None) -> torch.Tensor:
    """[samples, channels, height, width] float32 pixel values for the parent in folder `root`.
    random_pixels: `image_size` (the parent config's) unless a preprocessor config says otherwise."""
    if data == "random_tokens":
        raise RecipeError("`data: random_tokens` is for text parents; this parent takes images: " + DATA_KINDS)
    if data == "random_pixels":
        if has_preprocessor(root):
            size = _size(image_processor(root))
        elif image_size:
            size = (int(image_size), int(image_size))
        else:
            raise ParentError(f"the parent {root} states no image size (config image_size or {PREPROCESSOR})")
        return random_pixels(samples, size, seed, split)
    files = _builtin_files(split) if data == "builtin" else _folder_files(data, split)
    proc = image_processor(root)
    from PIL import ImageOps

    order = [(files[i % len(files)], (i // len(files)) % 2 == 1) for i in range(samples)]
    out = None
    if data != "builtin":
        check_sizes(root, files)
    for s in range(0, samples, PROCESS_BATCH):
        ims = []
        for f, mirror in order[s:s + PROCESS_BATCH]:
            im = _open(f)
            ims.append(ImageOps.mirror(im) if mirror else im)
        px = proc(images=ims, return_tensors="pt")["pixel_values"].float()
        if out is None:
            out = torch.empty((samples, *px.shape[1:]), dtype=torch.float32)
        out[s:s + len(ims)] = px
    return out
