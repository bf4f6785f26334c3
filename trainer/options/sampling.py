"""The options of `dbtrain sample`, `dbtrain eval` and `dbtrain demo`: the commands that draw images from a model.

One set of sampler defaults for the three, and the demo's recipe (its defaults). No torch here:
`--help` and flag errors come back at once, before any model is loaded.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from trainer.options import spec
from trainer.options.spec import flag

BUILTIN_MODEL = Path(__file__).resolve().parents[1] / "world" / "assets" / "tiny-world-sd"

# The demo's training recipe, measured on the 2-core CPU (docs: the built-in world).
STEPS = 300
# 2e-4 without class images of every place made samples follow the seed, not the prompt (PLACE 0.64, base
# 0.96); bench/results/demo/recipes.md, pivotal-orange-plain-lr1e-4
LEARNING_RATE = 1e-4
NUM_CLASS_IMAGES = 50
# more `dbtrain train` flags of the demo recipe: per-image captions naming each picture's place (read for the
# class images too), and pivotal tuning: [V] is a new token <sks> started from the word "orange" (which the base
# model draws in every place, "in space" too), trained with the UNet for the first half of the steps at its own
# lr 5e-3 (at the UNet's 1e-4 it hardly left "orange", and "a star" drifted more: recipes.md,
# pivotal-plain-telr5e-3). Training the whole text encoder instead never drew the subject in space (docs, "How
# the recipe was found").
DEMO_EXTRA_FLAGS: tuple[str, ...] = ("--caption_extension", ".txt", "--train_text_embedding",
                                     "--initializer_token", "orange", "--text_embedding_lr", "5e-3")
# the demo's class images: None = all drawn from the class prompt "a star"; "places" = the base model's
# "a star <place>" for every place of the world, each with its caption file (read back by --caption_extension),
# so the class term keeps "a star in space" itself; "places+plain" = those and "a star" (world.demo.CLASS_KINDS)
DEMO_CLASS_IMAGES: str | None = "places+plain"
DEMO_OUT = "dbtrain-demo"  # git-ignored, so a demo run inside the repository leaves no untracked files

# One set of sampler defaults for `dbtrain sample`, `eval` and `demo`, and the fixed seeds of every
# measured sample: image k of a prompt starts from the noise of seed EVAL_SEED + k.
SAMPLE_STEPS = 20
GUIDANCE = 5.0
EVAL_SEED = 10_000
EVAL_IMAGES = 20  # the demo's 95% intervals at most a third of its effects (docs, the targets table)

# `dbtrain eval` prompt templates: {V} the identifier, {C} the class noun. The contexts are the built-in world's.
DEFAULT_PROMPTS = ("a {V} {C} on the beach", "a {V} {C} in the snow", "a {V} {C} in space")
CLASS_PROMPT = "a {C}"

_EMBEDDING_HELP = ("Textual Inversion embedding(s) on top of --model: diffusers' learned_embeds.safetensors or an "
                   "A1111/ComfyUI .safetensors/.pt, read safely; a textual-inversion or pivotal-tuning output folder "
                   "given as --model loads its own")
_LORA_HELP = ("LoRA file(s) fused into --model: diffusers' pytorch_lora_weights.safetensors or a kohya/A1111 "
              ".safetensors (or a dbtrain LoRA output folder); a LoRA output folder given as --model loads its own")


@dataclass
class ModelToSample:
    """A model folder with the embeddings and LoRA files to add to it (sample's and eval's)."""

    model: str = flag(None, "a diffusers folder (a dbtrain train output_dir); required", metavar="DIR")
    embedding: list[str] | None = flag(None, _EMBEDDING_HELP, nargs="+", metavar="FILE")
    lora: list[str] | None = flag(None, _LORA_HELP, nargs="+", metavar="FILE")
    lora_scale: float = flag(1.0, "strength of the --lora file(s) (1 = as trained)", type=float)


@dataclass
class SampleOptions(ModelToSample):
    prompt: str = flag(None, "what to draw, e.g. \"a photo of sks dog\"; required", metavar="TEXT")
    negative_prompt: str | None = flag(None, "what not to draw (not given: none)", metavar="TEXT")
    num_images: int = flag(4, "how many images", type=int)
    steps: int = flag(SAMPLE_STEPS, "denoising steps (eval's and demo's too)", type=int)
    guidance: float = flag(GUIDANCE, "classifier-free guidance scale (eval's and demo's too)", type=float)
    seed: int = flag(0, "image k uses seed + k", type=int)
    resolution: int | None = flag(None, "image size in pixels (not given: the model's)", type=int)
    device: str | None = flag(None, "not given: cuda if available", metavar="cuda|cpu")
    out: str = flag("samples", "folder for the PNGs (000.png, ...) and grid.png", metavar="DIR")


@dataclass
class EvalOptions(ModelToSample):
    instance_data_dir: str | None = flag(None, "the subject's real images; required, except for a --concepts run "
                                         "(not given: each concept against its own)", metavar="DIR")
    identifier: str | None = flag(None, "[V] (not given: what dbtrain train recorded in the model's dreambooth.json)",
                                  metavar="WORD")
    class_noun: str | None = flag(None, "the class, e.g. dog (not given: recorded in the model's dreambooth.json)",
                                  metavar="WORD")
    prompts: list[str] | None = flag(None, "templates with {V} and {C} (not given: "
                                     + "; ".join(DEFAULT_PROMPTS).replace("%", "%%") + "; plus \"a {C}\" always)",
                                     nargs="+", metavar="TEMPLATE")
    num_images: int = flag(EVAL_IMAGES, "images per prompt (the 95%% intervals are bootstrapped over them)", type=int)
    steps: int = flag(SAMPLE_STEPS, "denoising steps (sample's and demo's too)", type=int)
    guidance: float = flag(GUIDANCE, "classifier-free guidance scale (sample's and demo's too)", type=float)
    seed: int = flag(EVAL_SEED, "image k of every prompt uses seed + k (the demo's too)", type=int)
    base_model: str | None = flag(None, "also score this model (the one fine-tuned) on the prompts without the "
                                  "identifier, as the reference row (not given: no reference)", metavar="DIR")
    device: str | None = flag(None, "not given: cuda if available", metavar="cuda|cpu")
    judge: str | None = flag(None, "judge folder (not given: the built-in one)", metavar="DIR")
    clip_model: str | None = flag(None, "local CLIP folder (transformers) for CLIP-I / CLIP-T (not given: the "
                                  "judge's)", metavar="DIR")
    dino_model: str | None = flag(None, "local DINO/ViT folder (transformers) for DINO / PRES (not given: the "
                                  "judge's)", metavar="DIR")
    out: str | None = flag(None, "folder for samples, metrics.json and metrics.md (not given: only printed)",
                           metavar="DIR")


@dataclass
class DemoOptions:
    out: str = flag(DEMO_OUT, "a new or empty folder for everything the demo writes, or an unfinished demo to "
                    "continue", metavar="DIR")
    model: str | None = flag(None, "the base model (not given: the built-in one, trainer/world/assets/tiny-world-sd)",
                             metavar="DIR")
    judge: str | None = flag(None, "the judge folder (not given: the built-in one)", metavar="DIR")
    device: str | None = flag(None, "not given: cuda if available", metavar="cuda|cpu")
    steps: int = flag(STEPS, "training steps", type=int)
    learning_rate: float = flag(LEARNING_RATE, "learning rate", type=float)
    num_class_images: int = flag(NUM_CLASS_IMAGES, "class images drawn by the base model", type=int)
    no_prior_preservation: bool = flag(False, "train without the class term")
    eval_images: int = flag(EVAL_IMAGES, f"images per prompt for the metrics (seeds {EVAL_SEED} + k, k < N)",
                            type=int)
    sample_steps: int = flag(SAMPLE_STEPS, "denoising steps of every image the demo draws (class images and "
                             "samples)", type=int)
    seed: int = flag(0, "seed of training and sampling", type=int)


SAMPLE_LAYOUT = (("model and prompt", ("model", "embedding", "lora", "lora_scale", "prompt", "negative_prompt")),
                 ("sampling", ("num_images", "steps", "guidance", "seed", "resolution", "device")),
                 ("output", ("out",)))
EVAL_LAYOUT = (("model and subject", ("model", "embedding", "lora", "lora_scale", "instance_data_dir", "identifier",
                                      "class_noun")),
               ("sampling", ("prompts", "num_images", "steps", "guidance", "seed", "base_model", "device")),
               ("embeddings and output", ("judge", "clip_model", "dino_model", "out")))
DEMO_LAYOUT = (("where", ("out", "model", "judge", "device")),
               ("recipe", ("steps", "learning_rate", "num_class_images", "no_prior_preservation", "eval_images",
                           "sample_steps", "seed")))


def sample_parser() -> argparse.ArgumentParser:
    p = spec.parser("dbtrain sample", "Images from a trained model folder (or any diffusers SD folder).")
    return spec.build(p, SAMPLE_LAYOUT, spec.flag_fields(SampleOptions), required=("model", "prompt"))


def eval_parser() -> argparse.ArgumentParser:
    p = spec.parser("dbtrain eval", "DINO, CLIP-I, CLIP-T, PRES and DIV of a model, on images it generates now.")
    return spec.build(p, EVAL_LAYOUT, spec.flag_fields(EvalOptions), required=("model",))


def demo_parser() -> argparse.ArgumentParser:
    p = spec.parser("dbtrain demo", "DreamBooth with prior preservation on the built-in tiny model and subject; "
                                    "writes a before/after grid and the paper's metrics. Stopped (Ctrl-C), the same "
                                    "command continues it.")
    return spec.build(p, DEMO_LAYOUT, spec.flag_fields(DemoOptions))


def parse_sample(argv: list[str]) -> SampleOptions:
    return spec.pick(SampleOptions, vars(sample_parser().parse_args(argv)))


def parse_eval(argv: list[str]) -> EvalOptions:
    return spec.pick(EvalOptions, vars(eval_parser().parse_args(argv)))


def parse_demo(argv: list[str]) -> DemoOptions:
    return spec.pick(DemoOptions, vars(demo_parser().parse_args(argv)))
