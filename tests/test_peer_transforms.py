"""A copied diffusers command line with --diffusers_defaults builds the script's own training views (issue 29).

The comparison against the scripts themselves needs a diffusers checkout's examples folder and torchvision
(DBTRAIN_DIFFUSERS_EXAMPLES=DIR; `python -m bench peers transforms` writes the same rows). The tests after it
need neither: they pin the arithmetic those scripts use (torchvision's Resize(int) truncates the long side,
textual_inversion.py crops its centre square with // 2, resizes the square and scales in float64), so a change
back to other arithmetic fails here, in CI.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import peer_transforms
from trainer.core import images
from trainer.core.masks import Masks
from trainer.errors import UserError
from trainer.options import textual_inversion as ti_config
from trainer.options import train as config
from trainer.world.tiny import MODEL_DIR

EXAMPLES = os.environ.get("DBTRAIN_DIFFUSERS_EXAMPLES")


def _torchvision_missing() -> str | None:
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed"
    try:
        __import__("torchvision")  # (PyPI's wheel beside a local CPU torch build fails to import)
    except Exception as e:  # noqa: BLE001
        return f"torchvision does not import here ({type(e).__name__}: {e})"
    return None


@pytest.mark.skipif(not EXAMPLES, reason="set DBTRAIN_DIFFUSERS_EXAMPLES to a diffusers checkout's examples folder")
def test_every_view_equals_the_scripts_own(tmp_path):
    missing = _torchvision_missing()
    if missing:
        pytest.skip(missing + ": the scripts' datasets need it")
    rows = peer_transforms.compare(Path(EXAMPLES), MODEL_DIR, tmp_path)
    assert {r["script"] for r in rows} == set(peer_transforms.SCRIPTS.values())
    assert any(r["their_crop"] and r["their_crop"] != [0, 0] for r in rows)  # random crops off the corner
    assert any(r["flip"] for r in rows)
    bad = [r for r in rows if not r["equal"]]
    assert not bad, bad[:3]


def _picture(tmp_path: Path, w: int, h: int) -> Path:
    return peer_transforms.write_pictures(tmp_path / "p")[peer_transforms.SIZES.index((w, h))]


def test_cover_resize_truncates_the_long_side_as_torchvision(tmp_path):
    # 333 x 200 to 64: 64 * 333 / 200 = 106.56, torchvision's Resize(64) gives 106 (rounding would give 107)
    assert images.resized_size(333, 200, 64) == (106, 64)
    assert images.resized_size(150, 211, 64) == (64, 90)  # 90.03
    assert images.resized_size(41, 130, 64) == (64, 202)  # 202.9: truncated, not 203
    path = _picture(tmp_path, 333, 200)
    img = Image.open(path).convert("RGB")
    x = images.to_tensor(img, 64, crop_xy=None, flip=False)
    left = int(round((106 - 64) / 2.0))  # CenterCrop's offset
    want = np.asarray(img.resize((106, 64), Image.BILINEAR).crop((left, 0, left + 64, 64)), dtype=np.float32)
    want = torch.from_numpy(want).div(255).sub(0.5).div(0.5).permute(2, 0, 1)  # ToTensor + Normalize([.5], [.5])
    assert torch.equal(x, want)


@pytest.mark.parametrize("center_crop", [False, True])
@pytest.mark.parametrize("size", [(150, 211), (333, 200), (64, 64)])
def test_squash_is_textual_inversion_arithmetic(tmp_path, size, center_crop):
    path = _picture(tmp_path, *size)
    ours = images.ImageSet([path], 64, center_crop=center_crop, random_flip=True, interpolation="bicubic",
                           image_fit="squash")
    arr = np.array(Image.open(path).convert("RGB")).astype(np.uint8)
    if center_crop:
        c = min(arr.shape[:2])
        h, w = arr.shape[:2]
        arr = arr[(h - c) // 2:(h + c) // 2, (w - c) // 2:(w + c) // 2]
    view = Image.fromarray(arr).resize((64, 64), resample=Image.BICUBIC)
    for flip in (False, True):
        pic = view.transpose(Image.FLIP_LEFT_RIGHT) if flip else view
        want = torch.from_numpy((np.array(pic).astype(np.uint8) / 127.5 - 1.0).astype(np.float32)).permute(2, 0, 1)
        assert ours.cacheable(0)
        assert torch.equal(ours.pixels(0, None, flip), want)
    gen = torch.Generator().manual_seed(0)
    assert {ours.draw(0, gen)[0] for _ in range(8)} == {None}  # no crop to draw: the whole view is fixed


def test_a_mask_is_squashed_with_its_image(tmp_path):
    path = _picture(tmp_path, 333, 200)
    ours = images.ImageSet([path], 64, center_crop=False, random_flip=False, image_fit="squash")
    mask = Image.new("L", (333, 200), 0)
    mask.paste(255, (0, 0, 111, 200))  # the left third
    m = Masks(ours, [mask], mask_min=0.0, normalization="none", vae_factor=8).pixels(0, None, False)
    assert m.shape == (64, 64) and m[:, :20].min() == 1 and m[:, 23:].max() == 0  # 111 / 333 * 64 = 21.3


def test_squash_geometry_for_sdxl_time_ids():
    assert images.crop_geometry(333, 200, 64, squash=images.SQUASH_WHOLE) == ((200, 333), (0, 0))
    assert images.crop_geometry(333, 200, 64, squash=images.SQUASH_CENTER) == ((200, 333), (0, 66))
    assert images.crop_geometry(333, 200, 64, squash=images.SQUASH_CENTER, flip=True) == ((200, 333), (0, 67))


def test_textual_inversion_defaults_squash_and_buckets_refuse_it(tmp_path, capsys):
    pictures = peer_transforms.write_pictures(tmp_path / "p")[0].parent
    argv = peer_transforms.command_line("ti", MODEL_DIR, pictures, tmp_path / "o", False)
    opts = ti_config.parse(argv + ["--diffusers_defaults"])
    assert (opts.data.image_fit, opts.data.random_flip, opts.data.image_interpolation_mode) == (
        "squash", True, "bicubic")
    assert ti_config.parse(argv + ["--diffusers_defaults", "--image_fit", "cover"]).data.image_fit == "cover"
    full = peer_transforms.command_line("full", MODEL_DIR, pictures, tmp_path / "o2", False)
    with pytest.raises(UserError, match="--image_fit squash resizes every image"):
        config.parse(full + ["--image_fit", "squash", "--enable_bucket"])
