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


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    context: str
    x: float  # center, as a fraction of the image
    y: float
    angle: float  # degrees
    texture: str | None = None  # "stripes": the demo subject's pattern (never in the base world)

    def caption(self, noun: str | None = None) -> str:
        return f"a {self.size} {self.color} {noun or self.shape} {self.context}"


def sample_scene(rng: random.Random) -> Scene:
    return Scene(shape=rng.choice(SHAPES), color=rng.choice(sorted(COLORS)), size=rng.choice(sorted(SIZES)),
                 context=rng.choice(CONTEXTS), x=rng.uniform(0.35, 0.65), y=rng.uniform(0.4, 0.6),
                 angle=rng.uniform(-20, 20))


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


def render(scene: Scene, seed: int = 0) -> Image.Image:
    """The scene as a SIZE x SIZE RGB image (background details drawn from `seed`)."""
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
    if scene.texture == "stripes":  # diagonal two-colour stripes: the subject's identity
        fdraw = ImageDraw.Draw(fill)
        for k in range(-SIZE, 2 * SIZE, 6):
            fdraw.polygon([(k, 0), (k + 3, 0), (k + 3 - SIZE, SIZE), (k - SIZE, SIZE)], fill=(20, 20, 20))
    img.paste(fill, (0, 0), mask)
    return img


def dataset(count: int, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """`count` (image, caption) pairs of the base world, reproducible from the seed."""
    rng = random.Random(seed)
    out = []
    for k in range(count):
        scene = sample_scene(rng)
        out.append((render(scene, seed=seed * 1_000_003 + k), scene.caption()))
    return out


SUBJECT_CLASS = "star"


def subject_images(count: int = 5, seed: int = 0) -> list[Image.Image]:
    """The demo subject: an orange star with black diagonal stripes, in a few places."""
    rng = random.Random(seed)
    places = ("on the beach", "in the grass", "on the water", "in the snow", "on a red table")
    return [render(Scene(SUBJECT_CLASS, "orange", "big", places[k % len(places)], rng.uniform(0.42, 0.58),
                         rng.uniform(0.45, 0.55), rng.uniform(-15, 15), texture="stripes"), seed=seed + k)
            for k in range(count)]
