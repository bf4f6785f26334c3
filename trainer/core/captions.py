"""Per-step caption augmentation (kohya's): caption dropout and shuffling the comma-separated parts.

Every draw comes from the step's generator, so a resumed run sees the same prompts as the uninterrupted one.
--caption_dropout P: each row (instance and class) trains on the empty prompt "" with probability P (it learns
the unconditional prediction classifier-free guidance uses). --shuffle_caption: the parts of "a, b, c" (split
at commas, stripped) are shuffled every step, the first --keep_tokens parts staying in front, joined with ", ".
"""
from __future__ import annotations

import torch

SEPARATOR = ","


def dropped(p: float, gen: torch.Generator) -> bool:
    """Whether this row's caption is dropped (one draw when p > 0, none otherwise)."""
    return p > 0 and float(torch.rand((), generator=gen)) < p


def shuffle(caption: str, keep: int, gen: torch.Generator) -> str:
    """The caption's comma-separated parts with all but the first `keep` in a random order (drawn only when
    there are two or more parts to shuffle)."""
    parts = [t.strip() for t in caption.strip().split(SEPARATOR)]
    fixed, flex = parts[:keep], parts[keep:]
    if len(flex) > 1:
        flex = [flex[k] for k in torch.randperm(len(flex), generator=gen).tolist()]
    return ", ".join(fixed + flex)


class CaptionOps:
    """The run's caption augmentation (DataOptions: caption_dropout, shuffle_caption, keep_tokens)."""

    def __init__(self, dropout: float = 0.0, shuffle_parts: bool = False, keep: int = 0):
        self.dropout, self.shuffle_parts, self.keep = float(dropout), bool(shuffle_parts), int(keep)

    @classmethod
    def of(cls, data) -> CaptionOps:
        return cls(data.caption_dropout, data.shuffle_caption, data.keep_tokens)

    @property
    def active(self) -> bool:
        return self.dropout > 0 or self.shuffle_parts

    def __call__(self, caption: str, gen: torch.Generator) -> str:
        """This step's prompt of a row: "" when dropped, else shuffled when asked (no draw when neither is on)."""
        if dropped(self.dropout, gen):
            return ""
        return shuffle(caption, self.keep, gen) if self.shuffle_parts else caption
