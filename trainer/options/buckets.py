"""Aspect-ratio buckets as options: a bucket list "h,w;h,w;..." (diffusers' syntax) or "auto" (kohya's: every
shape at the training area). Sizes are (height, width) in pixels. No torch here."""
from __future__ import annotations

import math

from trainer.errors import UserError

SIDE_MULTIPLE = 8  # the VAE downsamples by 8


def parse_bucket_list(text: str) -> list[tuple[int, int]]:
    """[(h, w), ...] of "h,w;h,w;..." in the order given (duplicates dropped); a one-line UserError otherwise."""
    out: list[tuple[int, int]] = []
    for part in str(text).replace(" ", "").strip(";").split(";"):
        bits = part.split(",")
        if len(bits) != 2 or not all(b.isdigit() for b in bits):
            raise UserError(f'--aspect_ratio_buckets must be "auto" or a list like "512,512;448,576;576,448" (height,'
                            f"width in pixels; pairs split by ;), got {text!r} (at {part!r})")
        h, w = int(bits[0]), int(bits[1])
        if h <= 0 or w <= 0 or h % SIDE_MULTIPLE or w % SIDE_MULTIPLE:
            raise UserError(f"--aspect_ratio_buckets: bucket {h},{w} must have positive sides that are multiples of "
                            f"{SIDE_MULTIPLE} pixels (the VAE downsamples by 8)")
        if (h, w) not in out:
            out.append((h, w))
    return out


def auto_buckets(resolution: int, step: int) -> list[tuple[int, int]]:
    """kohya's buckets: sides multiples of `step` between resolution/2 and 2 x resolution, for each height the widest
    width with h x w <= resolution^2, both orientations; the square first, then from tall to wide."""
    lo = max(step, -(-resolution // 2 // step) * step)
    hi = 2 * resolution
    area = resolution * resolution
    widest: dict[int, int] = {}
    for w in range(lo, hi + 1, step):
        h = area // w // step * step
        if lo <= h <= hi:
            widest[h] = max(widest.get(h, 0), w)
    out = {(resolution // step * step,) * 2}
    for h, w in widest.items():
        out.update({(h, w), (w, h)})
    return sorted(out, key=lambda hw: (hw[0] != hw[1], hw[1] / hw[0]))


def buckets_of(data) -> list[tuple[int, int]] | None:
    """The run's buckets (DataOptions), or None without bucketing."""
    spec = "auto" if data.enable_bucket and not data.aspect_ratio_buckets else data.aspect_ratio_buckets
    if not spec:
        return None
    if str(spec).strip().lower() == "auto":
        return auto_buckets(data.resolution, data.bucket_reso_steps)
    return parse_bucket_list(spec)


def check_latent_sides(sizes: list[tuple[int, int]], vae_factor: int, unet_factor: int) -> None:
    """One line for the first bucket whose latent sides the UNet cannot take (each a multiple of unet_factor:
    the UNet halves them that many times and adds the skips back)."""
    multiple = vae_factor * unet_factor
    for h, w in sizes:
        if h % multiple or w % multiple:
            lat = f"{h // vae_factor}x{w // vae_factor}"
            raise UserError(f"bucket {h}x{w} (height x width) gives {lat} latents, but this model's UNet needs "
                            f"latent sides that are multiples of {unet_factor} (image sides multiples of {multiple}); "
                            f"use a --bucket_reso_steps that is a multiple of {multiple} (e.g. "
                            f"{math.lcm(multiple, 8)}), or buckets with such sides in --aspect_ratio_buckets")
