"""A procedural text-to-image world: simple objects in simple places, with captions.

Scenes are a shape of some colour and size at some position in a context, drawn at
64x64 and captioned "a big blue star on the beach". Everything is a function of the
seed, so a data set is reproducible from (seed, count). The demo subject is an object
of a known class (a star) with a texture no scene of the world has (two-colour
stripes), which is what DreamBooth must learn to bind to an identifier.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
          "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SIZES = {"small": 0.22, "big": 0.38}
CONTEXTS = ("on the beach", "in the snow", "on a red table", "in the grass", "in space", "on the water")
# Surface patterns. The base world (what the text-to-image model learns) has none; the VAE and the
# judge see them, as SD's VAE and CLIP have seen far more than any one fine-tuning subject.
TEXTURES = ("striped", "dotted", "checked")
SUBJECT_CLASS = "star"
# The subject's own pairing of class and pattern: the textured stage of the base world draws patterns on
# every shape and stars with every other pattern, never a striped star (`scenes(..., hold_out=True)`).
HELD_OUT = (SUBJECT_CLASS, "striped")


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    context: str
    x: float  # center, as a fraction of the image
    y: float
    angle: float  # degrees
    texture: str | None = None  # one of TEXTURES; never in the base world (the UNet's training data)
    texture_color: str = "black"

    def caption(self, noun: str | None = None) -> str:
        tex = f" {self.texture}" if self.texture else ""
        return f"a {self.size} {self.color}{tex} {noun or self.shape} {self.context}"

    def partial_caption(self, rng: random.Random, p_size: float = 0.5, p_color: float = 0.3,
                        p_texture: float = 0.3, p_context: float = 0.3) -> str:
        """The caption with some attributes left out (each with its probability), so that short
        prompts like "a star" or "a star in the snow" are in the training distribution."""
        words = ["a"]
        if rng.random() >= p_size:
            words.append(self.size)
        if rng.random() >= p_color:
            words.append(self.color)
        if self.texture and rng.random() >= p_texture:
            words.append(self.texture)
        words.append(self.shape)
        if rng.random() >= p_context:
            words.append(self.context)
        return " ".join(words)


def sample_scene(rng: random.Random, p_texture: float = 0.0, hold_out: bool = False) -> Scene:
    """A random scene; with probability p_texture its object gets a random pattern (hold_out: never
    the HELD_OUT shape with the HELD_OUT pattern; that pattern goes to the next one)."""
    scene = Scene(shape=rng.choice(SHAPES), color=rng.choice(sorted(COLORS)), size=rng.choice(sorted(SIZES)),
                  context=rng.choice(CONTEXTS), x=rng.uniform(0.35, 0.65), y=rng.uniform(0.4, 0.6),
                  angle=rng.uniform(-20, 20))
    if p_texture and rng.random() < p_texture:
        second = rng.choice([c for c in sorted(COLORS) if c != scene.color])
        texture = rng.choice(TEXTURES)
        if hold_out and (scene.shape, texture) == HELD_OUT:
            texture = TEXTURES[(TEXTURES.index(texture) + 1) % len(TEXTURES)]
        scene = Scene(**{**scene.__dict__, "texture": texture, "texture_color": second})
    return scene


def _background(draw: ImageDraw.ImageDraw, context: str, rng: random.Random) -> None:
    s = SIZE
    if context == "on the beach":
        draw.rectangle((0, 0, s, s * 0.45), fill=(120, 190, 245))
        draw.rectangle((0, s * 0.45, s, s), fill=(230, 205, 140))
    elif context == "in the snow":
        draw.rectangle((0, 0, s, s * 0.4), fill=(170, 180, 195))
        draw.rectangle((0, s * 0.4, s, s), fill=(250, 250, 255))
        for _ in range(12):
            x, y = rng.uniform(0, s), rng.uniform(0, s * 0.4)
            draw.ellipse((x, y, x + 1.5, y + 1.5), fill=(255, 255, 255))
    elif context == "on a red table":
        draw.rectangle((0, 0, s, s), fill=(235, 225, 210))
        draw.rectangle((0, s * 0.55, s, s * 0.8), fill=(170, 30, 35))
        draw.rectangle((s * 0.1, s * 0.8, s * 0.18, s), fill=(110, 20, 25))
        draw.rectangle((s * 0.82, s * 0.8, s * 0.9, s), fill=(110, 20, 25))
    elif context == "in the grass":
        draw.rectangle((0, 0, s, s * 0.35), fill=(150, 205, 250))
        draw.rectangle((0, s * 0.35, s, s), fill=(70, 150, 60))
        for _ in range(25):
            x = rng.uniform(0, s)
            y = rng.uniform(s * 0.4, s)
            draw.line((x, y, x + rng.uniform(-1.5, 1.5), y - 3), fill=(40, 110, 35))
    elif context == "in space":
        draw.rectangle((0, 0, s, s), fill=(8, 8, 25))
        for _ in range(30):
            x, y = rng.uniform(0, s), rng.uniform(0, s)
            draw.point((x, y), fill=(255, 255, 230))
    elif context == "on the water":
        draw.rectangle((0, 0, s, s * 0.4), fill=(200, 225, 250))
        draw.rectangle((0, s * 0.4, s, s), fill=(30, 90, 170))
        for k in range(6):
            y = s * 0.45 + k * 5.5
            draw.arc((rng.uniform(-8, 8), y, s, y + 6), 200, 340, fill=(120, 170, 230))
    else:
        raise ValueError(f"unknown context {context!r}; choose from {CONTEXTS}")


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def rot(pts):
        a = math.radians(angle)
        return [(cx + px * math.cos(a) - py * math.sin(a), cy + px * math.sin(a) + py * math.cos(a))
                for px, py in pts]

    if shape == "square":
        return rot([(-r, -r), (r, -r), (r, r), (-r, r)])
    if shape == "triangle":
        return rot([(0, -r), (r * 0.95, r * 0.7), (-r * 0.95, r * 0.7)])
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            th = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(th), rad * math.sin(th)))
        return rot(pts)
    if shape == "cross":
        w = r * 0.35
        return rot([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
                    (-r, -w), (-w, -w)])
    raise ValueError(shape)


def _draw_texture(draw: ImageDraw.ImageDraw, texture: str, color: tuple[int, int, int]) -> None:
    # Periods of 8 px: coarse enough for a VAE that downsamples 4x to keep.
    if texture == "striped":  # diagonal stripes
        for k in range(-SIZE, 2 * SIZE, 8):
            draw.polygon([(k, 0), (k + 4, 0), (k + 4 - SIZE, SIZE), (k - SIZE, SIZE)], fill=color)
    elif texture == "dotted":
        for y in range(2, SIZE, 8):
            for x in range(2 + (y // 8 % 2) * 4, SIZE, 8):
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
    elif texture == "checked":
        for y in range(0, SIZE, 4):
            for x in range((y // 4 % 2) * 4, SIZE, 8):
                draw.rectangle((x, y, x + 3, y + 3), fill=color)
    else:
        raise ValueError(f"unknown texture {texture!r}; choose from {TEXTURES}")


def render(scene: Scene, seed: int = 0) -> Image.Image:
    """The scene as a SIZE x SIZE RGB image (background details drawn from `seed`)."""
    return render_with_mask(scene, seed)[0]


def render_with_mask(scene: Scene, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """`render`'s image and the object's mask: an "L" image, 255 where the object is drawn, 0 elsewhere."""
    rng = random.Random(seed)
    img = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(img)
    _background(draw, scene.context, rng)
    cx, cy, r = scene.x * SIZE, scene.y * SIZE, SIZES[scene.size] * SIZE
    color = COLORS[scene.color]
    mask = Image.new("L", (SIZE, SIZE), 0)
    mdraw = ImageDraw.Draw(mask)
    if scene.shape == "circle":
        mdraw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif scene.shape == "ring":
        mdraw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        mdraw.ellipse((cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55), fill=0)
    else:
        mdraw.polygon(_shape_points(scene.shape, cx, cy, r, scene.angle), fill=255)
    fill = Image.new("RGB", (SIZE, SIZE), color)
    if scene.texture:
        _draw_texture(ImageDraw.Draw(fill), scene.texture, COLORS[scene.texture_color])
    img.paste(fill, (0, 0), mask)
    return img, mask


def scenes(count: int, seed: int = 0, p_texture: float = 0.0, hold_out: bool = False) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, p_texture, hold_out) for _ in range(count)]


def render_seed(seed: int, k: int) -> int:
    """The background seed of scene k of the data set with `seed`."""
    return seed * 1_000_003 + k


def dataset(count: int, seed: int = 0, p_texture: float = 0.0) -> list[tuple[Image.Image, str]]:
    """`count` (image, caption) pairs, reproducible from the seed (p_texture=0: the base world)."""
    return [(render(s, seed=render_seed(seed, k)), s.caption())
            for k, s in enumerate(scenes(count, seed, p_texture))]


SUBJECT_CONTEXTS = ("on the beach", "in the grass", "on the water", "in the snow", "on a red table")


def subject_place(k: int) -> str:
    """The place subject picture k shows."""
    return SUBJECT_CONTEXTS[k % len(SUBJECT_CONTEXTS)]


def subject_images(count: int = 5, seed: int = 0) -> list[Image.Image]:
    """The demo subject: an orange star with black diagonal stripes, in a few places."""
    rng = random.Random(seed)
    return [render(Scene(SUBJECT_CLASS, "orange", "big", subject_place(k),
                         rng.uniform(0.42, 0.58), rng.uniform(0.45, 0.55), rng.uniform(-15, 15),
                         texture="striped"), seed=seed + k)
            for k in range(count)]


def object_images(shape: str, color: str, texture: str | None = None, texture_color: str = "black",
                  count: int = 5, seed: int = 0) -> list[Image.Image]:
    """Pictures of any object of the world, placed as the demo subject's (picture k in `subject_place(k)`):
    a user's own subject on the built-in model, e.g. a purple cross with yellow dots (tests/test_own_subject.py)."""
    if shape not in SHAPES or color not in COLORS or texture_color not in COLORS:
        raise ValueError(f"shape one of {SHAPES}, colours of {sorted(COLORS)}; got {shape!r}, {color!r}, "
                         f"{texture_color!r}")
    rng = random.Random(seed)
    return [render(Scene(shape, color, "big", subject_place(k), rng.uniform(0.42, 0.58), rng.uniform(0.45, 0.55),
                         rng.uniform(-15, 15), texture=texture, texture_color=texture_color), seed=seed + k)
            for k in range(count)]


# ---------------------------------------------------------------- data sets of the feature experiments (bench.features)

def _subject_scene(rng: random.Random, place: str) -> Scene:
    """The demo subject in `place`, at subject_images' random position and angle (three draws of `rng`)."""
    return Scene(SUBJECT_CLASS, "orange", "big", place, rng.uniform(0.42, 0.58), rng.uniform(0.45, 0.55),
                 rng.uniform(-15, 15), texture="striped")


def subject_in_one_place(count: int = 5, place: str = "on the beach", seed: int = 0) -> list[tuple[Image.Image,
                                                                                                   Image.Image]]:
    """(picture, mask) pairs of the demo subject, every picture in the same `place` (mask: 255 on the star, 0 on
    the background): a set whose background never changes, so that an unmasked model learns the place with the
    subject (bench.features masks)."""
    if place not in CONTEXTS:
        raise ValueError(f"place must be one of {CONTEXTS}, got {place!r}")
    rng = random.Random(seed)
    return [render_with_mask(_subject_scene(rng, place), seed=seed + k) for k in range(count)]


# (height, width) in pixels of the five pictures: 1:1, then 2:3 (tall) and 3:2 (wide) twice each; every side a multiple
# of 16, which the built-in model's latents (4x smaller) and its UNet (3 levels: multiples of 4 latents) take
ASPECT_SHAPES = ((SIZE, SIZE), (SIZE * 3 // 2, SIZE), (SIZE, SIZE * 3 // 2), (SIZE * 3 // 2, SIZE),
                 (SIZE, SIZE * 3 // 2))
# their places: the subject's but the red table, whose red a colour measure of the subject would take for it
ASPECT_PLACES = SUBJECT_CONTEXTS[:4]


def subject_aspect_images(count: int = 5, seed: int = 0, shapes=ASPECT_SHAPES,
                          margin: int = 6) -> list[tuple[Image.Image, Image.Image]]:
    """(picture, mask) pairs of the demo subject on canvases of several aspect ratios: picture k has
    shapes[k % len(shapes)] (height, width) and shows ASPECT_PLACES[k % 4]. On a long canvas the star sits at one end
    of the long side (the two ends in turn for pictures of one shape), `margin` pixels from the border: the whole
    picture holds it, but a centre square crop cuts it. The background is the place's square background stretched
    to the canvas."""
    rng = random.Random(seed)
    r = SIZES["big"] * SIZE  # the star's outer radius; its points reach at most r from its centre
    out = []
    for k in range(count):
        h, w = shapes[k % len(shapes)]
        if min(h, w) < 2 * (r + margin):
            raise ValueError(f"shape {h}x{w} cannot hold the subject (radius {r:.0f} px) {margin} px from the border")
        scene = _subject_scene(rng, ASPECT_PLACES[k % len(ASPECT_PLACES)])
        tile, tile_mask = render_with_mask(Scene(**{**scene.__dict__, "x": 0.5, "y": 0.5}), seed=seed + k)
        cx, cy = scene.x * w, scene.y * h  # a square canvas: where subject_images would put it
        end = sum(shapes[j % len(shapes)] == (h, w) for j in range(k)) % 2  # which end of the long side
        if w > h:
            cx = w - margin - r if end else margin + r
        elif h > w:
            cy = h - margin - r if end else margin + r
        background = Image.new("RGB", (SIZE, SIZE))
        _background(ImageDraw.Draw(background), scene.context, random.Random(seed + k))
        img = background.resize((w, h), Image.BILINEAR) if (h, w) != (SIZE, SIZE) else background
        mask = Image.new("L", (w, h), 0)
        at = (round(cx - SIZE / 2), round(cy - SIZE / 2))
        img.paste(tile, at, tile_mask)
        mask.paste(tile_mask, at)
        out.append((img, mask))
    return out


def subject_images_with_outlier(count: int = 5, outlier: int = 2, shape: str = "square", color: str = "blue",
                                seed: int = 0) -> list[Image.Image]:
    """The demo subject's pictures with picture `outlier` replaced by another object (shape, colour, no pattern)
    in the same place and position: one wrong picture in the set, as a user's mislabelled photo."""
    if not 0 <= outlier < count:
        raise ValueError(f"outlier must be in [0, {count}), got {outlier}")
    if (shape, color) == (SUBJECT_CLASS, "orange"):
        raise ValueError("the outlier must differ from the subject in shape or colour")
    images = subject_images(count, seed)
    images[outlier] = object_images(shape, color, count=outlier + 1, seed=seed)[outlier]
    return images
