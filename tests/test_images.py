"""Image calibration data: builtin, folders (PIL + the parent's own image processor), random pixels,
and the one-line errors for bad image data."""

import json

import pytest
import torch
from PIL import Image

from shrinkit.errors import ParentError, RecipeError, UsageError
from shrinkit.images import calibration_pixels

PRE = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
       "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


@pytest.fixture
def parent(tmp_path):
    d = tmp_path / "parent"
    d.mkdir()
    (d / "preprocessor_config.json").write_text(json.dumps(PRE))
    return d


def _images(folder, n, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (10 * i, 255 - 10 * i, 128)).save(folder / f"img{i:02d}.png")
    return folder


def test_builtin_splits_are_preprocessed_and_disjoint(parent):
    calib = calibration_pixels(parent, "builtin", 6)
    held = calibration_pixels(parent, "builtin", 6, split="heldout")
    assert calib.shape == held.shape == (6, 3, 32, 32) and calib.dtype == torch.float32
    assert -1.0001 <= float(calib.min()) and float(calib.max()) <= 1.0001   # normalized by mean/std 0.5
    assert not any(torch.equal(c, h) for c in calib for h in held)         # held-out photographs differ
    # more samples than images: the set repeats, mirrored
    many = calibration_pixels(parent, "builtin", 100, split="heldout")
    assert torch.equal(many[20], many[0].flip(-1)) and torch.equal(many[40], many[0])


def test_folder_matches_the_processor_and_holds_out_the_last_tenth(parent, tmp_path):
    folder = _images(tmp_path / "imgs", 20)
    (folder / "notes.txt").write_text("not an image, ignored")
    calib = calibration_pixels(parent, str(folder), 18)
    held = calibration_pixels(parent, str(folder), 2, split="heldout")
    from transformers import AutoImageProcessor
    proc = AutoImageProcessor.from_pretrained(parent)
    want = proc(images=[Image.open(folder / f"img{i:02d}.png").convert("RGB") for i in (18, 19)],
                return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(held, want)
    assert not any(torch.equal(c, h) for c in calib for h in held)


def test_random_pixels_take_the_processor_size_or_the_config_size(parent, tmp_path):
    assert calibration_pixels(parent, "random_pixels", 3).shape == (3, 3, 32, 32)
    bare = tmp_path / "bare"
    bare.mkdir()
    x = calibration_pixels(bare, "random_pixels", 2, image_size=16)
    assert x.shape == (2, 3, 16, 16)
    assert not torch.equal(x, calibration_pixels(bare, "random_pixels", 2, image_size=16, split="heldout"))


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300
    return msg


def test_corrupt_image_is_one_line(parent, tmp_path):
    folder = _images(tmp_path / "imgs", 3)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(RecipeError) as e:
        calibration_pixels(parent, str(folder), 4)
    assert "broken.jpg cannot be read" in _one_line(e)
    # truncated real image: PIL opens the header, decoding fails
    good = folder / "img00.png"
    (folder / "cut.png").write_bytes(good.read_bytes()[:60])
    (folder / "broken.jpg").unlink()
    with pytest.raises(RecipeError) as e:
        calibration_pixels(parent, str(folder), 4)
    assert "cut.png cannot be read" in _one_line(e)


def test_empty_folder_missing_folder_and_text_file(parent, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    with pytest.raises(RecipeError) as e:
        calibration_pixels(parent, str(empty), 4)
    assert "holds no images" in _one_line(e)
    with pytest.raises(RecipeError) as e:
        calibration_pixels(parent, str(tmp_path / "nope"), 4)
    assert "neither builtin, random_pixels nor a folder" in _one_line(e)
    txt = tmp_path / "t.txt"
    txt.write_text("words")
    with pytest.raises(RecipeError) as e:
        calibration_pixels(parent, str(txt), 4)
    assert "takes images" in _one_line(e)
    with pytest.raises(RecipeError) as e:
        calibration_pixels(parent, "random_tokens", 4)
    assert "for text parents" in _one_line(e)


def test_parent_without_or_with_a_broken_preprocessor(parent, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(UsageError) as e:
        calibration_pixels(bare, "builtin", 4)
    assert "no preprocessor_config.json" in _one_line(e) and "random_pixels" in str(e.value)
    with pytest.raises(ParentError) as e:
        calibration_pixels(bare, "random_pixels", 4)   # no size anywhere
    _one_line(e)
    (bare / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ParentError) as e:
        calibration_pixels(bare, "builtin", 4)
    assert "not a usable image processor config" in _one_line(e)
