"""Training images: finding them, refusing bad ones clearly, and turning them into tensors.

Images are read as an image viewer shows them: EXIF orientation applied, an embedded ICC
profile converted to sRGB, 16-bit and float images scaled to 8 bits (not clipped), CMYK,
palette and grayscale images as RGB, and transparent areas composited on white. What
changes the input is said in one line per folder on stderr: images with transparency,
images below half the training resolution (they are upscaled), images wider or taller
than 5:1 (a square crop keeps a small part of them), files skipped (not images, broken
links, HEIC/HEIF photos, with how to convert those). Errors are one-line UserErrors.

Preprocessing is diffusers' DreamBooth recipe (torchvision's arithmetic, so a view equals the scripts'): resize
the short side to `resolution` (bilinear), center or random crop to a square, optional horizontal flip, scale to
[-1, 1]; or (--image_fit squash) textual_inversion.py's: the whole image, or its centre square with
--center_crop, resized to the square (distorting a non-square image), scaled in float64 as it does; with
aspect-ratio buckets (trainer.core.buckets) the same at the bucket's (h, w): resized to cover it, then
cropped. Each view's geometry (the image's size and where the crop sits) is what SDXL conditions on
(time ids). --masked_loss takes the alpha channel before compositing (load_alpha) as the image's mask.
"""
from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.errors import UserError
from trainer.options.checks import IMAGE_SUFFIXES

_ALPHA_MODES = {"RGBA", "LA", "RGBa", "La", "PA"}
HEIF_SUFFIXES = {".heic", ".heif", ".hif"}  # phones' photo formats Pillow does not read
EXTREME_ASPECT = 5.0  # wider or taller than this: a square crop keeps under 1/5 of the image, said in a note
_said: set[str] = set()


def _say(kind: str, message: str) -> None:
    """One line on stderr ("dbtrain: note: ..." / "dbtrain: warning: ..."), once per process."""
    line = f"dbtrain: {kind}: {message}"
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr, flush=True)


def _names(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def list_images(folder, what: str, *, allow_empty: bool = False, captions: str | None = None) -> list[Path]:
    """Image files in `folder`, sorted. Other files and broken links are skipped and named
    in a warning line (caption files with the suffix `captions` are expected, not named);
    no image at all is a UserError."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{what} folder {path} does not exist")
    files, skipped, broken, heif = [], [], [], []
    for f in sorted(path.iterdir()):
        if f.name.startswith("."):
            continue
        if f.is_symlink() and not f.exists():
            broken.append(f)
        elif f.is_file():
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
            elif f.suffix.lower() in HEIF_SUFFIXES:
                heif.append(f)
            elif not (captions and f.name.endswith(captions)):
                skipped.append(f)
    why = []
    if heif:
        first = heif[0]
        why.append(f"{len(heif)} HEIC/HEIF photo(s) Pillow cannot read: {_names([f.name for f in heif])}; convert "
                   f"them to JPEG first, e.g. heif-convert {first.name} {first.stem}.jpg (libheif's tool), or open and "
                   f"save them as .jpg with Pillow after pip install pillow-heif (pillow_heif.register_heif_opener())")
    if skipped:
        why.append(f"{len(skipped)} file(s) that are not images: {_names([f.name for f in skipped])}")
    if broken:
        why.append(f"{len(broken)} broken link(s): {_names([f'{f.name} -> {_link_target(f)}' for f in broken])}")
    if not files and not allow_empty:   # one line: the error says what was skipped
        skips = f"; skipped {'; '.join(why)}" if why else ""
        raise UserError(f"{what} folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}){skips}")
    for w in why:
        _say("warning", f"{what} folder {path}: skipping {w}")
    return files


def caption_suffix(ext: str) -> str:
    """".txt" for "txt" or ".txt" (kohya writes the dot; users often leave it out)."""
    ext = str(ext).strip()
    return ext if ext.startswith(".") else "." + ext


def read_captions(files: list[Path], ext: str, fallback: str = "the instance prompt") -> list[str | None]:
    """Per image, the first non-empty line of `<stem><ext>` beside it (kohya's convention), or None
    where there is no caption file or it is empty (`fallback` is used there: the instance prompt, or for
    class images the class prompt); one note line says how many were captioned."""
    ext = caption_suffix(ext)
    out, empty = [], []
    for f in files:
        path = f.with_name(f.stem + ext)
        if not path.is_file():
            out.append(None)
            continue
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserError(f"caption file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
        except OSError as e:
            raise UserError(f"cannot read caption file {path}: {e.strerror or e}") from e
        line = next((x.strip() for x in text.splitlines() if x.strip()), None)
        if line is None:
            empty.append(path.name)
        out.append(line)
    found = sum(c is not None for c in out)
    where = _folder_of(files)
    missing = [f.name for f, c in zip(files, out) if c is None]
    _say("note", f"{where}: {found} of {len(files)} image(s) captioned by their {ext} file"
                 + (f"; {fallback} for {_names(missing)}" if missing else "")
                 + (f" ({len(empty)} empty caption file(s): {_names(empty)})" if empty else ""))
    return out


def class_prompts(files: list[Path], ext: str | None, class_prompt: str) -> list[str]:
    """The prompt of each class image: its caption file's (`x.txt` beside `x.png`, --caption_extension;
    the kohya convention for regularisation images too, used as written), else --class_prompt."""
    if not ext:
        return [class_prompt] * len(files)
    return [c or class_prompt for c in read_captions(files, ext, fallback="the class prompt")]


def _link_target(f: Path) -> str:
    try:
        return str(f.readlink())
    except OSError:
        return "?"


def _to_8bit(im: Image.Image) -> Image.Image:
    """Integer (16-bit) and float single-channel images as 8-bit "L", scaled, not clipped."""
    a = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.max() > 255):
        # 16-bit range (PNG, TIFF, PGM): 65535 -> 255
        a = np.clip(a.astype(np.float64), 0, 65535) / 257.0
    elif im.mode == "F":
        a = a.astype(np.float64)
        a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a   # [0, 1] floats, else already 0..255
    a = np.nan_to_num(np.clip(np.rint(a), 0, 255)).astype(np.uint8)
    return Image.fromarray(a)   # 2-D uint8: mode "L"


def _to_srgb(im: Image.Image) -> Image.Image:
    """Convert the colour channels with the embedded ICC profile to sRGB (alpha kept);
    the image unchanged when there is no profile or it cannot be used."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA", "L", "LA", "CMYK"):
        return im
    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        alpha = im.getchannel("A") if im.mode in ("RGBA", "LA") else None
        base = im.convert({"RGBA": "RGB", "LA": "L"}.get(im.mode, im.mode))
        out = ImageCms.profileToProfile(base, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception:  # a broken or unusable profile: the pixels as they are, as most viewers do
        return im
    if out is None:
        return im
    if alpha is not None:
        out.putalpha(alpha)
    return out


def _open_viewed(path: Path) -> Image.Image:
    """The image as a viewer shows it, before transparency is composited (RGB, RGBA, L, LA, ...)."""
    try:
        with Image.open(path) as im:
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # unreadable EXIF: keep the stored orientation
                pass
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                im = _to_8bit(im)
            if im.mode == "P" or (im.mode in ("RGB", "L") and "transparency" in im.info):
                im = im.convert("RGBA" if "transparency" in im.info or im.palette.mode == "RGBA" else "RGB")
            if im.mode in ("RGBa", "La", "PA"):
                im = im.convert("RGBA")
            return _to_srgb(im)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {type(e).__name__}: {e} (remove or replace the file)") from e


def load_image(path: Path) -> tuple[Image.Image, bool]:
    """(8-bit RGB image as a viewer shows it, whether transparent areas were composited on white)."""
    im = _open_viewed(path)
    composited = False
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgba = Image.alpha_composite(white, rgba)
            composited = True
        im = rgba
    return im.convert("RGB"), composited


def load_alpha(path: Path) -> Image.Image | None:
    """The image's alpha channel ("L", oriented as load_image's pixels), None where it is fully opaque
    (--masked_loss uses it as the image's mask)."""
    im = _open_viewed(path)
    if im.mode not in _ALPHA_MODES:
        return None
    alpha = im.convert("RGBA").getchannel("A")
    return alpha if alpha.getextrema()[0] < 255 else None


def open_rgb(path: Path) -> Image.Image:
    """The image as 8-bit RGB, as a viewer shows it (see load_image)."""
    return load_image(path)[0]


# --image_interpolation_mode (train_dreambooth_lora.py's names, torchvision's, which resize PIL images with these)
RESAMPLE = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "nearest_exact": Image.NEAREST,
            "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def _size_hw(size) -> tuple[int, int]:
    """(height, width) of a training view: `resolution` (a square) or an aspect-ratio bucket (h, w)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


SQUASH_WHOLE, SQUASH_CENTER = "whole", "center"  # --image_fit squash without / with --center_crop


def _squash_box(width: int, height: int, squash: str) -> tuple[int, int, int, int]:
    """(left, top, w, h) of what a squashed view resizes: the whole image, or (SQUASH_CENTER) its centre square
    with textual_inversion.py's integer arithmetic."""
    if squash != SQUASH_CENTER:
        return 0, 0, width, height
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def _cover_box(width: int, height: int, size, crop_xy):
    """(resized w, h, crop left, top) of a view: the image resized to cover the (h, w) target (the short
    side to `resolution` for a square), the target cropped at the relative position crop_xy (None: centre)."""
    th, tw = _size_hw(size)
    if isinstance(size, int):  # torchvision's Resize(int): the long side truncated, as diffusers' scripts resize
        nw, nh = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    else:
        scale = max(tw / width, th / height)
        nw, nh = max(tw, round(width * scale)), max(th, round(height * scale))
    fx, fy = (0.5, 0.5) if crop_xy is None else crop_xy
    return nw, nh, int(round((nw - tw) * fx)), int(round((nh - th) * fy))


def fit(img: Image.Image, size, *, crop_xy, flip: bool, resample=Image.BILINEAR, squash: str | None = None
        ) -> Image.Image:
    """The view of `img` at `size` (an int: square; or (h, w)): resized to cover it, cropped, flipped; with
    squash (SQUASH_WHOLE / SQUASH_CENTER) textual_inversion.py's: the whole image or its centre square resized to
    `size`. A mask goes through this with its image's arguments, so it follows the pixels exactly."""
    th, tw = _size_hw(size)
    if squash:
        left, top, side_w, side_h = _squash_box(*img.size, squash)
        img = img.crop((left, top, left + side_w, top + side_h)).resize((tw, th), resample)
        return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img
    nw, nh, left, top = _cover_box(*img.size, size, crop_xy)
    img = img.resize((nw, nh), resample).crop((left, top, left + tw, top + th))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img


def to_tensor(img: Image.Image, resolution, *, crop_xy: tuple[float, float] | None, flip: bool,
              resample=Image.BILINEAR, squash: str | None = None) -> torch.Tensor:
    """(3, h, w) float in [-1, 1] of fit(); resolution: an int (a square) or (h, w). crop_xy None = center
    crop, else the crop's relative position."""
    view = fit(img, resolution, crop_xy=crop_xy, flip=flip, resample=resample, squash=squash)
    if squash:  # textual_inversion.py scales in float64, then rounds to float32 (differs in the last bit)
        arr = (np.asarray(view, dtype=np.uint8) / 127.5 - 1.0).astype(np.float32)
    else:  # float32 throughout: bitwise torchvision's ToTensor() + Normalize([0.5], [0.5])
        arr = np.asarray(view, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def resized_size(width: int, height: int, resolution) -> tuple[int, int]:
    """(width, height) after to_tensor's resize: the short side to `resolution` (or covering (h, w))."""
    return _cover_box(width, height, resolution, None)[:2]


def crop_geometry(width: int, height: int, resolution, crop_xy=None, *, flip: bool = False,
                  squash: str | None = None):
    """((orig_h, orig_w), (crop_top, crop_left)) of to_tensor's view of a width x height image.

    Same arithmetic as to_tensor: resized to cover `resolution` (a square, or (h, w)), the crop at the
    relative position crop_xy (None: centered). With flip, the crop's left edge is given in the mirrored
    resized image, as diffusers' train_dreambooth_lora_sdxl.py does (it flips before cropping). Squashed views
    give the square's place in the original image (0, 0 for the whole image).
    """
    if squash:
        left, top, side, _ = _squash_box(width, height, squash)
        return (height, width), (top, width - side - left if flip else left)
    nw, _, left, top = _cover_box(width, height, resolution, crop_xy)
    if flip:
        left = nw - _size_hw(resolution)[1] - left
    return (height, width), (top, left)


class ImageSet:
    """The images of one folder, with the augmentation of the run.

    `deterministic` says whether an image always gives the same tensor (center crop or
    square after resize, no flip); then its latents can be cached once. With random
    flip each image has two variants and both are cached; with a random crop of a
    non-square image there are too many variants, and that image is not cached.
    """

    def __init__(self, files: list[Path], resolution: int, *, center_crop: bool, random_flip: bool,
                 interpolation: str | None = None, buckets: list[tuple[int, int]] | None = None,
                 image_fit: str = "cover"):
        self.files = files
        self.resample = RESAMPLE[interpolation or "bilinear"]
        self.resolution = resolution
        self.center_crop = center_crop
        self.squash = (SQUASH_CENTER if center_crop else SQUASH_WHOLE) if image_fit == "squash" else None
        self.random_flip = random_flip
        loaded = [load_image(f) for f in files]  # opened once: bad files fail before training
        self.images = [im for im, _ in loaded]
        self.square = [im.size[0] == im.size[1] for im in self.images]
        where = _folder_of(files)
        alpha = [f.name for f, (_, a) in zip(files, loaded) if a]
        if alpha:
            _say("note", f"{where}: {len(alpha)} image(s) with transparent areas, composited on white: "
                         f"{_names(alpha)}")
        small = [f"{f.name} ({im.size[0]}x{im.size[1]})" for f, im in zip(files, self.images)
                 if min(im.size) * 2 < resolution]
        if small:
            _say("warning", f"{where}: {len(small)} image(s) smaller than half the training resolution "
                            f"{resolution} (short side < {resolution / 2:g}), upscaled: {_names(small)}")
        if self.squash == SQUASH_WHOLE:
            odd = [f"{f.name} ({im.size[0]}x{im.size[1]})" for f, im in zip(files, self.images)
                   if im.size[0] != im.size[1]]
            if odd:
                _say("note", f"{where}: {len(odd)} image(s) not square, squashed to the square (--image_fit squash, "
                             f"as textual_inversion.py; their proportions change): {_names(odd)}")
        else:
            self._note_extreme_aspect(where, buckets)

    def _note_extreme_aspect(self, where: str, buckets) -> None:
        """Panoramas and the like: each training view is a square (or the nearest bucket), so it keeps short/long of
        the image (of the ratios)."""
        extreme = []
        shapes = [w / h for h, w in buckets] if buckets else [1.0]
        for f, im in zip(self.files, self.images):
            long, short = max(im.size), min(im.size)
            aspect = im.size[0] / im.size[1]
            view = min(shapes, key=lambda r: abs(r - aspect))  # (trainer.core.buckets.nearest's rule)
            kept = min(aspect / view, view / aspect)
            if kept < 1 / EXTREME_ASPECT:
                ratio = f"{long / short:.3g}:1" if im.size[0] >= im.size[1] else f"1:{long / short:.3g}"
                extreme.append(f"{f.name} ({ratio}, {100 * kept:.0f}%)")
        if extreme:
            at = "at the center" if self.center_crop else "at a random place each step"
            shape = "crop of the nearest bucket" if buckets else "square crop"
            off = " off the shape of every bucket" if buckets else ""
            _say("note", f"{where}: {len(extreme)} image(s) more than {EXTREME_ASPECT:g}:1{off}; each training view "
                         f"is a {shape} ({at}) that keeps only about this share of the image: {_names(extreme)}; "
                         f"crop them around the subject yourself to train on all of it")

    def __len__(self):
        return len(self.images)

    def cacheable(self, i: int, size=None) -> bool:
        """Whether image i's view at `size` (None: the resolution square; or a bucket (h, w)) is always the
        same: centre crops, squashed views, and images of the view's own aspect ratio (nothing to crop)."""
        if self.squash or self.center_crop:
            return True
        if size is None:
            return self.square[i]
        w, h = self.images[i].size
        return w * size[0] == h * size[1]

    def variants(self, i: int) -> list[bool]:
        return [False, True] if self.random_flip else [False]

    def fixed_view(self, i: int, flip: bool, size=None) -> torch.Tensor:
        """The pixels of a cacheable image i (center crop), flipped or not."""
        return self.pixels(i, None, flip, size)

    def pixels(self, i: int, crop_xy, flip: bool, size=None) -> torch.Tensor:
        """(3, h, w) pixels of image i's view at `size` (None: the resolution square) for a drawn crop/flip."""
        return to_tensor(self.images[i], self.resolution if size is None else size, crop_xy=crop_xy, flip=flip,
                         resample=self.resample, squash=self.squash)

    def tensor(self, i: int, gen: torch.Generator) -> tuple[torch.Tensor, bool]:
        """A training view of image i drawn with `gen`: (pixels, flipped)."""
        return self.view(i, gen)[:2]

    def draw(self, i: int, gen: torch.Generator, size=None) -> tuple[tuple[float, float] | None, bool]:
        """(crop_xy, flip) of a view of image i drawn with `gen`: the flip, then (views that are not fixed)
        the crop's x and y; crop_xy None for a fixed (centre) view."""
        flip = bool(torch.randint(0, 2, (), generator=gen)) if self.random_flip else False
        if self.cacheable(i, size):
            return None, flip
        return (float(torch.rand((), generator=gen)), float(torch.rand((), generator=gen))), flip

    def view(self, i: int, gen: torch.Generator, size=None):
        """A training view of image i drawn with `gen` (the flip, then the crop's x and y):
        (pixels, flipped, its geometry)."""
        crop, flip = self.draw(i, gen, size)
        return self.pixels(i, crop, flip, size), flip, self.geometry(i, crop, flip, size)

    def geometry(self, i: int, crop_xy=None, flip: bool = False, size=None):
        """crop_geometry of image i for the crop it drew (None for its cached center-cropped views); at a
        bucket `size` with the bucket (h, w) as a third item, the view's target size (SDXL's time ids)."""
        w, h = self.images[i].size
        crop = None if self.cacheable(i, size) else crop_xy
        if size is None:
            return crop_geometry(w, h, self.resolution, crop, flip=flip, squash=self.squash)
        return (*crop_geometry(w, h, size, crop, flip=flip), tuple(size))


def _folder_of(files: list[Path]) -> str:
    parents = {str(f.parent) for f in files}
    return parents.pop() if len(parents) == 1 else "images"


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    return grid
