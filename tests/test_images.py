"""trainer.core.images reads photos as an image viewer shows them (issue 12).

Each case builds its image with PIL in tmp_path: EXIF-rotated JPEGs, 16-bit PNGs,
transparency (RGBA, LA, palette), a tiny image, broken links, CMYK, palette, grayscale,
an embedded ICC profile. Notes and warnings are single lines on stderr.
"""
from __future__ import annotations

import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.core import images as data
from trainer.errors import UserError


@pytest.fixture(autouse=True)
def _fresh_notes(monkeypatch):
    monkeypatch.setattr(data, "_said", set(), raising=False)   # said once per process; each test anew


def halves(w, h, left=(255, 0, 0), right=(0, 0, 255)):
    """w x h RGB image: left half `left`, right half `right`."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = left
    a[:, w // 2:] = right
    return Image.fromarray(a)


def stderr_lines(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


# ----------------------------------------------------------------------------- orientation

@pytest.mark.parametrize("orientation,top,bottom", [
    (6, (255, 0, 0), (0, 0, 255)),     # rotate 90 clockwise to view: the left half goes on top
    (8, (0, 0, 255), (255, 0, 0)),     # rotate 90 counter-clockwise: the right half goes on top
])
def test_exif_orientation_is_applied(tmp_path, orientation, top, bottom):
    exif = Image.Exif()
    exif[0x0112] = orientation
    halves(48, 24).save(tmp_path / "phone.jpg", quality=95, exif=exif.tobytes())
    img = data.open_rgb(tmp_path / "phone.jpg")
    assert img.size == (24, 48)   # portrait, as a viewer shows it
    s = data.ImageSet([tmp_path / "phone.jpg"], 16, center_crop=True, random_flip=False)
    x = s.fixed_view(0, False)    # (3, 16, 16) in [-1, 1]
    to_rgb = lambda t: ((t.mean(dim=(1, 2)) + 1) * 127.5).tolist()  # noqa: E731
    np.testing.assert_allclose(to_rgb(x[:, :3]), top, atol=30)
    np.testing.assert_allclose(to_rgb(x[:, -3:]), bottom, atol=30)


def test_exif_orientation_180(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 3
    halves(40, 20).save(tmp_path / "upside.jpg", quality=95, exif=exif.tobytes())
    a = np.asarray(data.open_rgb(tmp_path / "upside.jpg")).astype(int)
    assert a.shape == (20, 40, 3)
    assert a[:, :15, 2].mean() > 200 and a[:, -15:, 0].mean() > 200   # blue on the left now


# ----------------------------------------------------------------------------- range

def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None, :].repeat(8, 0)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    a = np.asarray(data.open_rgb(tmp_path / "ramp16.png")).astype(int)
    expect = np.rint(ramp / 257.0).astype(int)
    assert np.abs(a[..., 0] - expect).max() <= 1
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all()
    x = data.ImageSet([tmp_path / "ramp16.png"], 8, center_crop=True, random_flip=False).fixed_view(0, False)
    assert -0.2 < x.mean().item() < 0.2      # a mid-grey ramp, not white (clipped: ~1.0)


def test_32bit_integer_image_with_16bit_values(tmp_path):
    ramp = np.linspace(0, 65535, 64).astype(np.int32)[None, :].repeat(4, 0)
    Image.fromarray(ramp).save(tmp_path / "ramp.tif")
    assert Image.open(tmp_path / "ramp.tif").mode == "I"
    a = np.asarray(data.open_rgb(tmp_path / "ramp.tif"))[..., 0].astype(int)
    assert np.abs(a - np.rint(ramp / 257.0)).max() <= 1


def _png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (PIL does not write those), by hand."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_rgb_png(tmp_path):
    g = np.random.default_rng(0)
    arr = g.integers(0, 65536, (6, 7, 3)).astype(np.uint16)
    (tmp_path / "rgb16.png").write_bytes(_png16_rgb(arr))
    a = np.asarray(data.open_rgb(tmp_path / "rgb16.png")).astype(int)
    assert np.abs(a - arr / 257.0).max() <= 1   # PIL keeps the high byte: within one step of value / 257


def test_float_image(tmp_path):
    ramp = np.linspace(0, 1, 32, dtype=np.float32)[None, :].repeat(4, 0)
    Image.fromarray(ramp).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    a = np.asarray(data.open_rgb(tmp_path / "f.tif"))[..., 0].astype(int)
    assert np.abs(a - ramp * 255).max() <= 1


# ----------------------------------------------------------------------------- transparency

def _transparent_half(mode: str) -> Image.Image:
    """Left half opaque red (grey for LA), right half fully transparent black."""
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)
    im = Image.fromarray(rgba)
    if mode == "LA":
        return im.convert("LA")
    if mode == "P":
        p = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        black = p.getpixel((15, 5))
        p.info["transparency"] = black
        return p
    return im


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_areas_become_white_with_one_note(tmp_path, capsys, mode):
    folder = tmp_path / "inst"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        _transparent_half(mode).save(folder / name)
    halves(20, 10).save(folder / "opaque.png")
    RGBA_opaque = Image.new("RGBA", (20, 10), (0, 128, 0, 255))    # alpha channel, nothing transparent
    RGBA_opaque.save(folder / "solid.png")
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        files = data.list_images(folder, "instance image")
        s = data.ImageSet(files, 8, center_crop=True, random_flip=False)
        data.ImageSet(files, 8, center_crop=True, random_flip=False)   # the same folder again: said once
    a = np.asarray(s.images[files.index(folder / "a.png")]).astype(int)
    assert (a[:, 12:] == 255).all(), "transparent half is not white"
    assert (a[:, :8] < 200).any(axis=-1).all(), "the opaque half is not kept"
    assert (np.asarray(s.images[files.index(folder / "solid.png")]) == (0, 128, 0)).all()
    lines = stderr_lines(capsys)
    notes = [ln for ln in lines if "transparent" in ln]
    assert len(notes) == 1, lines
    assert notes[0].startswith("dbtrain: note:") and "2 image(s)" in notes[0] and "a.png, b.png" in notes[0]
    assert str(folder) in notes[0]


# ----------------------------------------------------------------------------- size

def test_tiny_images_are_named_in_one_warning(tmp_path, capsys):
    folder = tmp_path / "inst"
    folder.mkdir()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "tiny.png")
    Image.new("RGB", (100, 20), (10, 200, 10)).save(folder / "strip.png")     # short side 20 < 32
    Image.new("RGB", (32, 40), (10, 10, 200)).save(folder / "fine.png")       # short side 32 = half: fine
    capsys.readouterr()
    s = data.ImageSet(data.list_images(folder, "instance image"), 64, center_crop=True, random_flip=False)
    assert s.fixed_view(0, False).shape == (3, 64, 64)   # still used (upscaled)
    lines = stderr_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith("dbtrain: warning:")
    assert "2 image(s) smaller than half the training resolution 64" in lines[0]
    assert "tiny.png (1x1)" in lines[0] and "strip.png (100x20)" in lines[0] and "fine.png" not in lines[0]


# ----------------------------------------------------------------------------- links

@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks here")
def test_broken_symlink_is_named(tmp_path, capsys):
    folder = tmp_path / "inst"
    folder.mkdir()
    halves(8, 8).save(folder / "a.png")
    os.symlink(tmp_path / "gone.jpg", folder / "b.jpg")
    capsys.readouterr()
    assert data.list_images(folder, "instance image") == [folder / "a.png"]
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("dbtrain: warning:") and "broken link" in lines[0]
    assert "b.jpg -> " in lines[0] and "gone.jpg" in lines[0]
    (folder / "a.png").unlink()
    with pytest.raises(UserError) as e:      # nothing left: the error says why
        data.list_images(folder, "instance image")
    msg = str(e.value)
    assert "\n" not in msg and "holds no images" in msg and "broken link" in msg and "b.jpg" in msg


def test_non_image_files_are_one_line(tmp_path, capsys):
    folder = tmp_path / "inst"
    folder.mkdir()
    halves(8, 8).save(folder / "a.png")
    (folder / "notes.txt").write_text("x")
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.list_images(folder, "instance image")
        data.list_images(folder, "instance image")
    lines = stderr_lines(capsys)
    assert lines == [f"dbtrain: warning: instance image folder {folder}: skipping 1 file(s) that are not images: "
                     "notes.txt"]


# ----------------------------------------------------------------------------- modes

def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)   # red in CMYK
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    a = np.asarray(data.open_rgb(tmp_path / "cmyk.jpg")).astype(int).reshape(-1, 3).mean(0)
    np.testing.assert_allclose(a, (255, 0, 0), atol=12)


def test_palette_grayscale_and_bilevel(tmp_path):
    halves(20, 10).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(tmp_path / "p.png")
    a = np.asarray(data.open_rgb(tmp_path / "p.png")).astype(int)
    assert (a[:, :10] == (255, 0, 0)).all() and (a[:, 10:] == (0, 0, 255)).all()
    Image.fromarray(np.arange(0, 250, 10, dtype=np.uint8)[None, :].repeat(3, 0)).save(tmp_path / "l.png")
    a = np.asarray(data.open_rgb(tmp_path / "l.png")).astype(int)
    assert (a[..., 0] == np.arange(0, 250, 10)).all() and (a[..., 0] == a[..., 2]).all()
    Image.new("1", (8, 8), 1).save(tmp_path / "b.png")
    assert (np.asarray(data.open_rgb(tmp_path / "b.png")) == 255).all()


def _swapped_primaries_icc() -> bytes:
    """A minimal ICC v2 RGB display profile whose red and green colorants are sRGB's green
    and red (D50), gamma 2.2: pure red in it is green on screen."""
    def s15(x):
        return struct.pack(">i", round(x * 65536))

    def xyz(x, y, z):
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    curv = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(2.2 * 256)) + b"\0\0"
    text = b"swapped\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 12 + b"\0\0\0" + b"\0" * 67
    tags = [(b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", xyz(0.3851, 0.7169, 0.0971)), (b"gXYZ", xyz(0.4361, 0.2225, 0.0139)),
            (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)), (b"rTRC", curv), (b"gTRC", curv), (b"bTRC", curv)]
    offset = 128 + 4 + 12 * len(tags)
    table, blobs = b"", b""
    for sig, blob in tags:
        blob += b"\0" * (-len(blob) % 4)
        table += sig + struct.pack(">II", offset + len(blobs), len(blob))
        blobs += blob
    size = offset + len(blobs)
    header = (struct.pack(">I", size) + b"none" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 24 + b"\0\0\0\0" + s15(0.9642) + s15(1.0) + s15(0.8249)
              + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + blobs


def test_embedded_icc_profile_is_converted_to_srgb(tmp_path):
    pytest.importorskip("PIL.ImageCms")
    icc = _swapped_primaries_icc()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "wide.png", icc_profile=icc)
    a = np.asarray(data.open_rgb(tmp_path / "wide.png")).astype(int).reshape(-1, 3).mean(0)
    assert a[1] > 200 and a[0] < 80, a       # shown green, as a colour-managed viewer shows it
    # an unusable profile: the pixels as stored, no error
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "bad.png", icc_profile=b"not a profile")
    assert np.asarray(data.open_rgb(tmp_path / "bad.png"))[0, 0].tolist() == [255, 0, 0]


def test_corrupt_image_is_one_line_user_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(UserError) as e:
        data.open_rgb(tmp_path / "x.png")
    assert "x.png" in str(e.value) and "\n" not in str(e.value)


def test_to_tensor_range_and_shape(tmp_path):
    halves(30, 20).save(tmp_path / "a.png")
    x = data.to_tensor(data.open_rgb(tmp_path / "a.png"), 16, crop_xy=None, flip=False)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min().item() >= -1.0 and x.max().item() <= 1.0
