"""Aspect-ratio buckets of the training images (kohya's bucketing; the sizes come from trainer.options.buckets).

Each instance image belongs to the bucket whose aspect ratio (w / h) is nearest its own; its view is the image
resized to cover the bucket and cropped to it (trainer.core.images.fit). A step's batch is one bucket: its first
instance row is drawn as without buckets, the others among the images of that row's bucket, and the class rows
are viewed at that bucket too (class images are generated square: they are resized and cropped to it).
"""
from __future__ import annotations

from trainer.core.images import _say
from trainer.options.buckets import check_latent_sides


def nearest(width: int, height: int, sizes: list[tuple[int, int]]) -> int:
    """Index of the bucket (h, w) whose aspect ratio w / h is nearest width / height (kohya's rule: the smallest
    absolute difference of the ratios; the first such bucket on a tie)."""
    ratio = width / height
    errors = [abs(w / h - ratio) for h, w in sizes]
    return errors.index(min(errors))


class Buckets:
    """The run's buckets and which images belong to each.

    sizes: the buckets (h, w) in the options' order; of_image[i]: the bucket index of instance image i;
    members[k]: the instance images of bucket k (sorted); used: the indices of buckets with images."""

    def __init__(self, sizes: list[tuple[int, int]], image_sizes: list[tuple[int, int]]):
        self.sizes = [tuple(s) for s in sizes]
        self.of_image = [nearest(w, h, self.sizes) for w, h in image_sizes]
        self.members: dict[int, list[int]] = {}
        for i, k in enumerate(self.of_image):
            self.members.setdefault(k, []).append(i)
        self.used = sorted(self.members)

    def size_of(self, i: int) -> tuple[int, int]:
        return self.sizes[self.of_image[i]]

    def summary(self) -> str:
        """"buckets: 64x64: 3 image(s), 48x80: 2 image(s)" (height x width; buckets with images only)."""
        parts = [f"{h}x{w}: {len(self.members[k])} image(s)" for k in self.used for h, w in [self.sizes[k]]]
        return "buckets: " + ", ".join(parts)

    def note(self) -> None:
        _say("note", self.summary())


def for_run(data, inst, vae_factor: int, unet) -> Buckets | None:
    """The run's Buckets of the instance ImageSet (None without --aspect_ratio_buckets / --enable_bucket),
    refusing buckets the UNet cannot take; the note line said."""
    from trainer.options.buckets import buckets_of

    sizes = buckets_of(data)
    if not sizes:
        return None
    unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
    check_latent_sides(sizes, vae_factor, unet_factor)
    out = Buckets(sizes, [im.size for im in inst.images])
    out.note()
    return out
