"""PLACE: which of the world's places an image shows, told zero-shot by the judge.

An image is given the place whose caption "a <class> <place>" its CLIP(-like) embedding is
nearest to, among all of the world's places (`scenes.CONTEXTS`). PLACE of a set of samples is
the share whose place is the one their prompt named. The same code works with a real CLIP model
(`Scorer(clip_model=...)`), since it only needs image and text embeddings.

`validate` measures the classifier itself on rendered scenes (every shape, colour and pattern,
the subject included), so a PLACE number can be read against the classifier's own accuracy.
"""
from __future__ import annotations

import random

import torch

from . import scenes

PLACES = scenes.CONTEXTS


def place_of(prompt: str, places=PLACES) -> str | None:
    """The place a prompt ends with ("a sks star in space" -> "in space"), or None."""
    for p in places:
        if prompt.rstrip().endswith(" " + p):
            return p
    return None


class PlaceClassifier:
    """Zero-shot over the place captions of one class noun."""

    def __init__(self, scorer, noun: str, places=PLACES):
        self.places = tuple(places)
        self.text = scorer.texts([f"a {noun} {p}" for p in self.places])

    def predict(self, clip_embeddings: torch.Tensor) -> list[str]:
        idx = (clip_embeddings @ self.text.T).argmax(dim=1).tolist()
        return [self.places[i] for i in idx]


def validation_scenes(per_place: int, seed: int = 0) -> list[tuple[object, str]]:
    """(image, place) pairs: random objects (a third patterned) in every place, plus the subject
    (orange, striped star) in every place, background details from the seed."""
    rng = random.Random(seed)
    out = []
    for place in PLACES:
        for k in range(per_place):
            s = scenes.sample_scene(rng, p_texture=0.3)
            if k % 4 == 0:  # the subject itself, also in places its pictures never show
                s = scenes.Scene("star", "orange", "big", place, s.x, s.y, s.angle, "striped")
            s = scenes.Scene(**{**s.__dict__, "context": place})
            out.append((scenes.render(s, seed=rng.randrange(1 << 30)), place))
    return out


def validate(scorer, per_place: int = 40, seed: int = 0, noun: str = "star") -> dict[str, float]:
    """{place: accuracy} of the classifier on rendered scenes (`validation_scenes`)."""
    pairs = validation_scenes(per_place, seed)
    clf = PlaceClassifier(scorer, noun)
    pred = clf.predict(scorer.images([im for im, _ in pairs])["clip"])
    acc = {}
    for place in PLACES:
        hits = [p == t for p, (_, t) in zip(pred, pairs) if t == place]
        acc[place] = sum(hits) / len(hits)
    return acc
