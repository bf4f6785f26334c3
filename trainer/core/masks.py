"""Masked loss (--masked_loss, --mask_dir, --mask_min, --mask_normalization): a per-pixel weight of the loss.

Each instance image's mask is the image of the same file stem in --mask_dir (any image suffix; kohya's
conditioning_data_dir convention), else the image's own alpha channel; gray levels 0..255 are weights 0..1
(white = train, black = ignore). A mask goes through exactly its image's resize, crop and flip
(trainer.core.images.fit with the same arguments), is averaged down to the latents' resolution (area), then
floored: m = mask_min + (1 - mask_min) * m; with --mask_normalization mean each row's mask is divided by its mean,
so a small subject trains as strongly as a large one. Rows without a mask (and class rows) weigh 1 everywhere.
"""
from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.core.images import _folder_of, _say, _to_8bit, fit, load_alpha
from trainer.errors import UserError
from trainer.options.checks import IMAGE_SUFFIXES


def mask_file(image: Path, folder) -> Path | None:
    """The mask of `image` in `folder`: the file with the image's stem and any image suffix (the first by name)."""
    if not folder:
        return None
    found = sorted(f for f in Path(folder).glob(f"{glob.escape(image.stem)}.*")  # ("dog[1].jpg" is a name)
                   if f.stem == image.stem and f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    return found[0] if found else None


def read_mask(path: Path, image: Path, size: tuple[int, int]) -> Image.Image:
    """The mask file as 8-bit gray ("L"), oriented by its EXIF as its image is; another size than the image's
    (w, h) is a one-line UserError naming both files."""
    try:
        with Image.open(path) as im:
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # unreadable EXIF: the stored orientation
                pass
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                im = _to_8bit(im)
            mask = im.convert("L")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read mask {path}: {type(e).__name__}: {e} (--mask_dir)") from e
    if mask.size != tuple(size):
        raise UserError(f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image {image} is {size[0]}x{size[1]}; "
                        f"a mask must have its image's size (--mask_dir)")
    return mask


def load_masks(files: list[Path], sizes: list[tuple[int, int]], mask_dirs: list) -> list[Image.Image | None]:
    """Per instance image its mask ("L") from its mask folder, else its alpha channel, else None; one note line
    "masked loss: N of M instance images have masks"."""
    out, from_alpha = [], 0
    for f, size, folder in zip(files, sizes, mask_dirs):
        path = mask_file(f, folder)
        mask = read_mask(path, f, size) if path is not None else load_alpha(f)
        from_alpha += path is None and mask is not None
        out.append(mask)
    found = sum(m is not None for m in out)
    alpha = f" ({from_alpha} from the image's alpha channel)" if from_alpha else ""
    _say("note", f"masked loss: {found} of {len(files)} instance images have masks{alpha}"
                 + ("" if found == len(files) else f"; the others in {_folder_of(files)} train everywhere"))
    return out


def to_latent(mask: torch.Tensor, latent_hw: tuple[int, int], mask_min: float, normalization: str) -> torch.Tensor:
    """(1, 1, h, w) weights of a (H, W) pixel mask in [0, 1]: averaged over each latent's pixels (area),
    floored at mask_min, divided by its mean with normalization "mean" (an all-zero mask stays zero)."""
    m = F.interpolate(mask[None, None].float(), size=tuple(latent_hw), mode="area")
    if mask_min:
        m = mask_min + (1.0 - mask_min) * m
    if normalization == "mean":
        m = m / m.mean().clamp_min(1e-12)
    return m


class Masks:
    """The instance images' masks as the loss weights of their views (cached for fixed views)."""

    def __init__(self, images, masks: list[Image.Image | None], *, mask_min: float, normalization: str,
                 vae_factor: int):
        self.images, self.masks = images, masks
        self.mask_min, self.normalization, self.factor = float(mask_min), normalization, vae_factor
        self._fixed: dict[tuple, torch.Tensor] = {}

    def has(self, i: int) -> bool:
        return self.masks[i] is not None

    def pixels(self, i: int, crop_xy, flip: bool, size=None) -> torch.Tensor:
        """(H, W) in [0, 1]: image i's mask through its view's resize, crop and flip."""
        im = self.images
        view = fit(self.masks[i], im.resolution if size is None else size, crop_xy=crop_xy, flip=flip,
                   resample=im.resample, squash=im.squash)
        return torch.from_numpy(np.asarray(view, dtype=np.float32) / 255.0)

    def latent(self, i: int, crop_xy, flip: bool, size=None) -> torch.Tensor:
        """(1, 1, h, w) loss weights of image i's view (crop_xy None: its fixed centre view); ones without a mask."""
        h, w = (self.images.resolution,) * 2 if size is None else size
        hw = (h // self.factor, w // self.factor)
        if not self.has(i):
            return torch.ones((1, 1, *hw))
        key = (i, None if size is None else tuple(size), flip)
        if crop_xy is None and key in self._fixed:
            return self._fixed[key]
        out = to_latent(self.pixels(i, crop_xy, flip, size), hw, self.mask_min, self.normalization)
        if crop_xy is None:
            self._fixed[key] = out
        return out


def for_run(data, inst, vae_factor: int, mask_dirs: list | None = None) -> Masks | None:
    """The run's Masks of the instance ImageSet (None without --masked_loss); mask_dirs: each image's mask folder
    (several concepts), else --mask_dir for all."""
    if not data.masked_loss:
        return None
    dirs = list(mask_dirs) if mask_dirs is not None else [data.mask_dir] * len(inst)
    masks = load_masks(inst.files, [im.size for im in inst.images], dirs)
    return Masks(inst, masks, mask_min=data.mask_min, normalization=data.mask_normalization, vae_factor=vae_factor)
