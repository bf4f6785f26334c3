"""The dropped photos as the trainer will read them: EXIF orientation applied, transparent areas on white, the
mask (a file of the same stem, or the alpha channel with masked loss on) laid over the picture, read with the
trainer's own functions (trainer.core.images, trainer.core.masks). No Gradio here."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from trainer.core.images import load_alpha, load_image
from trainer.core.masks import read_mask
from trainer.errors import UserError

PREVIEW = 256  # pixels on the long side


def _rotated(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            return im.getexif().get(0x0112, 1) not in (1, None)  # EXIF Orientation
    except Exception:
        return False


def _shade(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The picture where the mask trains (white), darkened where it does not (black)."""
    dark = Image.blend(image, Image.new("RGB", image.size, (0, 0, 0)), 0.7)
    return Image.composite(image, dark, mask.convert("L"))


def preview(photos: list[Path], masks: dict[str, Path], masked_loss: bool) -> list[tuple[Image.Image, str]]:
    """(picture, caption) per photo; an unreadable file or a mask of another size is the trainer's one-line
    UserError."""
    out = []
    for p in photos:
        image, on_white = load_image(p)
        notes = []
        if _rotated(p):
            notes.append("turned upright (EXIF)")
        if on_white:
            notes.append("transparent areas on white")
        mask = None
        if p.stem in masks:
            mask = read_mask(masks[p.stem], p, image.size)
            notes.append(f"mask {masks[p.stem].name}")
        elif masked_loss:
            mask = load_alpha(p)
            notes.append("mask from alpha" if mask is not None else "no mask: trains everywhere")
        size = f"{image.width}x{image.height}"
        if mask is not None:
            image = _shade(image, mask)
        image.thumbnail((PREVIEW, PREVIEW))
        out.append((image, f"{p.name} {size}" + (": " + ", ".join(notes) if notes else "")))
    return out


def match_masks(photos: list[Path], masks: list[Path]) -> dict[str, Path]:
    """Mask files by their photo's stem (kohya's --conditioning_data_dir convention); a mask without a photo is a
    one-line UserError."""
    stems = {p.stem for p in photos}
    out = {}
    for m in masks:
        if m.stem not in stems:
            raise UserError(f"mask {m.name} has no photo of the same name (a mask must share its photo's name, "
                            f"e.g. dog1.png for dog1.jpg)")
        out[m.stem] = m
    return out
