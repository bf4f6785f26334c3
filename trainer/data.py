"""Training images: finding them, refusing bad ones clearly, and turning them into tensors.

Preprocessing is diffusers' DreamBooth recipe: resize the short side to `resolution`
(bilinear), center or random crop to a square, optional horizontal flip, scale to [-1, 1].
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(folder, what: str, *, allow_empty: bool = False) -> list[Path]:
    """Image files in `folder`, sorted; other files are skipped with a warning."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{what} folder {path} does not exist")
    files, skipped = [], []
    for f in sorted(path.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            (files if f.suffix.lower() in IMAGE_SUFFIXES else skipped).append(f)
    if skipped:
        names = ", ".join(f.name for f in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        warnings.warn(f"{what} folder {path}: skipping {len(skipped)} file(s) that are not images: {names}",
                      stacklevel=2)
    if not files and not allow_empty:
        raise UserError(f"{what} folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {type(e).__name__}: {e} (remove or replace the file)") from e


def to_tensor(img: Image.Image, resolution: int, *, crop_xy: tuple[float, float] | None, flip: bool) -> torch.Tensor:
    """(3, res, res) float in [-1, 1]. crop_xy None = center crop, else the crop's relative position."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    fx, fy = (0.5, 0.5) if crop_xy is None else crop_xy
    left, top = int(round((nw - resolution) * fx)), int(round((nh - resolution) * fy))
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageSet:
    """The images of one folder, with the augmentation of the run.

    `deterministic` says whether an image always gives the same tensor (center crop or
    square after resize, no flip); then its latents can be cached once. With random
    flip each image has two variants and both are cached; with a random crop of a
    non-square image there are too many variants, and that image is not cached.
    """

    def __init__(self, files: list[Path], resolution: int, *, center_crop: bool, random_flip: bool):
        self.files = files
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.images = [open_rgb(f) for f in files]  # opened once: bad files fail before training
        self.square = [im.size[0] == im.size[1] for im in self.images]

    def __len__(self):
        return len(self.images)

    def cacheable(self, i: int) -> bool:
        return self.center_crop or self.square[i]

    def variants(self, i: int) -> list[bool]:
        return [False, True] if self.random_flip else [False]

    def fixed_view(self, i: int, flip: bool) -> torch.Tensor:
        """The pixels of a cacheable image i (center crop), flipped or not."""
        return to_tensor(self.images[i], self.resolution, crop_xy=None, flip=flip)

    def tensor(self, i: int, gen: torch.Generator) -> tuple[torch.Tensor, bool]:
        """A training view of image i drawn with `gen`: (pixels, flipped)."""
        flip = bool(torch.randint(0, 2, (), generator=gen)) if self.random_flip else False
        if self.cacheable(i):
            return self.fixed_view(i, flip), flip
        crop = (float(torch.rand((), generator=gen)), float(torch.rand((), generator=gen)))
        return to_tensor(self.images[i], self.resolution, crop_xy=crop, flip=flip), flip


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    return grid
