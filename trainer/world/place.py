"""PLACE: which of the world's places an image shows, told zero-shot by the judge.

An image is given the place whose caption "a <class> <place>" its CLIP(-like) embedding is
nearest to, among all of the world's places (`scenes.CONTEXTS`). PLACE of a set of samples is
the share whose place is the one their prompt named. The same code works with a real CLIP model
(`Scorer(clip_model=...)`), since it only needs image and text embeddings.

`python -m bench place` measures the classifier itself on rendered scenes (every shape, colour and
pattern, the subject included), so a PLACE number can be read against the classifier's own accuracy.
"""
from __future__ import annotations

import torch

from trainer.world import scenes

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
