"""`dbtrain fabric`'s options: FABRIC's feedback settings (the reference implementation's defaults), sampling,
the simulated user, output. No torch here."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError
from trainer.options import spec
from trainer.options.sampling import BUILTIN_MODEL
from trainer.options.spec import flag

# The reference implementation's defaults (the diffusers community pipeline uses 0.33/0.66/0.05/0.8/0.5).
FEEDBACK_START, FEEDBACK_END, MIN_WEIGHT, MAX_WEIGHT, NEG_SCALE = 0.0, 0.8, 0.0, 0.8, 0.5


@dataclass
class FabricOptions:
    model: str = flag(str(BUILTIN_MODEL), "a local diffusers SD 1.x/2.x folder", metavar="DIR")
    prompt: str = flag(None, "what to draw; required", metavar="TEXT")
    negative_prompt: str | None = flag(None, "what not to draw (not given: none)", metavar="TEXT")
    liked: list[str] = flag([], "images to move toward", nargs="+", metavar="PNG")
    disliked: list[str] = flag([], "images to move away from", nargs="+", metavar="PNG")
    feedback_start: float = flag(FEEDBACK_START, "start of the feedback window (fraction of steps)", type=float)
    feedback_end: float = flag(FEEDBACK_END, "end of the feedback window (fraction of steps)", type=float)
    min_weight: float = flag(MIN_WEIGHT, "reference weight outside the window", type=float)
    max_weight: float = flag(MAX_WEIGHT, "reference weight inside the window", type=float)
    neg_scale: float = flag(NEG_SCALE, "disliked weight = weight * neg_scale", type=float)
    num_images: int = flag(4, "images (per round)", type=int)
    steps: int = flag(20, "denoising steps", type=int)
    guidance_scale: float = flag(7.5, "classifier-free guidance scale", type=float)
    seed: int = flag(0, "image k uses seed + k (round r: seed + r * num_images + k)", type=int)
    resolution: int | None = flag(None, "image size in pixels (not given: the model's)", type=int)
    scheduler: str | None = flag(None, "a diffusers scheduler class, e.g. DDIMScheduler (not given: the model's "
                                 "own)", metavar="NAME")
    device: str | None = flag(None, "not given: cuda if available", metavar="cuda|cpu")
    attention: str = flag("dbkernels", "self-attention with references: dbkernels.attention + key bias, or torch "
                          "SDPA + broadcast mask", choices=("dbkernels", "sdpa"))
    rounds: int = flag(1, "rounds of feedback; > 1 needs --auto_feedback", type=int)
    auto_feedback: str | None = flag(None, "each round, like the images closest to this target and dislike the "
                                     "farthest (judge embeddings)", metavar="TARGET.png")
    likes_per_round: int = flag(1, "images liked per round", type=int)
    dislikes_per_round: int = flag(1, "images disliked per round", type=int)
    judge: str | None = flag(None, "judge folder (not given: trainer/world/assets/tiny-world-judge)", metavar="DIR")
    judge_embedding: str = flag("clip", "which judge embedding measures closeness", choices=("clip", "dino"))
    out: str = flag("fabric-out", "folder for the PNGs, grid.png and fabric.json", metavar="DIR")


FABRIC_LAYOUT = (
    ("model and prompt", ("model", "prompt", "negative_prompt")),
    ("feedback", ("liked", "disliked", "feedback_start", "feedback_end", "min_weight", "max_weight", "neg_scale")),
    ("sampling", ("num_images", "steps", "guidance_scale", "seed", "resolution", "scheduler", "device", "attention")),
    ("simulated user (measuring)", ("rounds", "auto_feedback", "likes_per_round", "dislikes_per_round", "judge",
                                    "judge_embedding")),
    ("output", ("out",)),
)


def build_parser() -> argparse.ArgumentParser:
    p = spec.parser("dbtrain fabric", "FABRIC: images steered by liked / disliked images through the UNet's "
                                      "self-attention (no training). Writes the images, grid.png and fabric.json.")
    return spec.build(p, FABRIC_LAYOUT, spec.flag_fields(FabricOptions), required=("prompt",))


def check_settings(feedback_start, feedback_end, min_weight, max_weight, neg_scale) -> None:
    for name, v in (("feedback_start", feedback_start), ("feedback_end", feedback_end)):
        if not (0.0 <= v <= 1.0):
            raise UserError(f"--{name} must be in [0, 1] (a fraction of the steps), got {v}")
    if feedback_start > feedback_end:
        raise UserError(f"--feedback_start {feedback_start} is after --feedback_end {feedback_end}")
    for name, v in (("min_weight", min_weight), ("max_weight", max_weight), ("neg_scale", neg_scale)):
        if not (math.isfinite(v) and v >= 0):
            raise UserError(f"--{name} must be a finite number >= 0, got {v}")


def parse(argv: list[str]) -> FabricOptions:
    """The flags, checked (the images named must exist; the model and --out are checked by the command)."""
    a = spec.pick(FabricOptions, vars(build_parser().parse_args(argv)))
    check_settings(a.feedback_start, a.feedback_end, a.min_weight, a.max_weight, a.neg_scale)
    if a.num_images < 1 or a.steps < 1 or a.rounds < 1:
        raise UserError("--num_images, --steps and --rounds must be >= 1")
    if a.resolution is not None and (a.resolution <= 0 or a.resolution % 8):
        raise UserError(f"--resolution must be a positive multiple of 8, got {a.resolution}")
    if not math.isfinite(a.guidance_scale):
        raise UserError(f"--guidance_scale must be a finite number, got {a.guidance_scale}")
    if a.rounds > 1 and not a.auto_feedback:
        raise UserError("--rounds > 1 needs --auto_feedback TARGET.png (the simulated user); for your own picks "
                        "run again with --liked / --disliked from the previous round's images")
    if a.auto_feedback and a.likes_per_round + a.dislikes_per_round > a.num_images:
        raise UserError("--likes_per_round + --dislikes_per_round must be <= --num_images")
    for what, paths in (("--liked", a.liked), ("--disliked", a.disliked),
                        ("--auto_feedback", [a.auto_feedback] if a.auto_feedback else [])):
        for f in paths:
            if not Path(f).is_file():
                raise UserError(f"{what} image {f} does not exist")
    return a
