"""The flags of `dbtrain sample`, `dbtrain eval` and `dbtrain demo` (train's are in config.py).

No torch here: `--help` and flag errors come back at once, before any model is loaded.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from trainer.options.train import HelpFormatter, option_adder

BUILTIN_MODEL = Path(__file__).resolve().parents[1] / "world" / "assets" / "tiny-world-sd"

# The demo's training recipe, measured on the 2-core CPU (see README, "The built-in world").
STEPS = 300
# 2e-4 without class images of every place made samples follow the seed, not the prompt (PLACE 0.64, base
# 0.96); bench/results/demo/recipes.md, pivotal-orange-plain-lr1e-4
LEARNING_RATE = 1e-4
NUM_CLASS_IMAGES = 50
# more `dbtrain train` flags of the demo recipe: per-image captions naming each picture's place (read for the
# class images too), and pivotal tuning: [V] is a new token <sks> started from the word "orange" (which the base
# model draws in every place, "in space" too), trained with the UNet for the first half of the steps at its own
# lr 5e-3 (at the UNet's 1e-4 it hardly left "orange", and "a star" drifted more: recipes.md,
# pivotal-plain-telr5e-3). Training the whole text encoder instead never drew the subject in space (README,
# "How the recipe was found").
DEMO_EXTRA_FLAGS: tuple[str, ...] = ("--caption_extension", ".txt", "--train_text_embedding",
                                     "--initializer_token", "orange", "--text_embedding_lr", "5e-3")
# the demo's class images: None = all drawn from the class prompt "a star"; "places" = the base model's
# "a star <place>" for every place of the world, each with its caption file (read back by --caption_extension),
# so the class term keeps "a star in space" itself; "places+plain" = those and "a star" (demo.CLASS_KINDS)
DEMO_CLASS_IMAGES: str | None = "places+plain"
DEMO_OUT = "dbtrain-demo"  # git-ignored, so a demo run inside the repository leaves no untracked files

# One set of sampler defaults for `dbtrain sample`, `eval` and `demo` (issue 15), and the fixed seeds
# of every measured sample: image k of a prompt starts from the noise of seed EVAL_SEED + k.
SAMPLE_STEPS = 20
GUIDANCE = 5.0
EVAL_SEED = 10_000
EVAL_IMAGES = 20  # the demo's 95% intervals at most a third of its effects (README, the targets table)

# `dbtrain eval` prompt templates: {V} the identifier, {C} the class noun. The contexts are the built-in world's.
DEFAULT_PROMPTS = ("a {V} {C} on the beach", "a {V} {C} in the snow", "a {V} {C} in space")
CLASS_PROMPT = "a {C}"


def add_lora_flags(a) -> None:
    a("--lora", nargs="+", default=None, metavar="FILE",
      help="LoRA file(s) fused into --model: diffusers' pytorch_lora_weights.safetensors or a kohya/A1111 "
           ".safetensors (or a dbtrain LoRA output folder); a LoRA output folder given as --model loads its own")
    a("--lora_scale", type=float, default=1.0, help="strength of the --lora file(s) (1 = as trained)")


def sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dbtrain sample", formatter_class=HelpFormatter,
                                description="Images from a trained model folder (or any diffusers SD folder).")
    a = option_adder(p.add_argument_group("model and prompt"))
    a("--model", required=True, metavar="DIR", help="a diffusers folder (a dbtrain train output_dir); required")
    a("--embedding", nargs="+", default=None, metavar="FILE",
      help="Textual Inversion embedding(s) on top of --model: diffusers' learned_embeds.safetensors or an "
           "A1111/ComfyUI .safetensors/.pt, read safely; a textual-inversion or pivotal-tuning output folder "
           "given as --model loads its own")
    add_lora_flags(a)
    a("--prompt", required=True, metavar="TEXT", help="what to draw, e.g. \"a photo of sks dog\"; required")
    a("--negative_prompt", default=None, metavar="TEXT", help="what not to draw (not given: none)")
    a = option_adder(p.add_argument_group("sampling"))
    a("--num_images", type=int, default=4, help="how many images")
    a("--steps", type=int, default=SAMPLE_STEPS, help="denoising steps (eval's and demo's too)")
    a("--guidance", type=float, default=GUIDANCE, help="classifier-free guidance scale (eval's and demo's too)")
    a("--seed", type=int, default=0, help="image k uses seed + k")
    a("--resolution", type=int, default=None, help="image size in pixels (not given: the model's)")
    a("--device", default=None, metavar="cuda|cpu", help="not given: cuda if available")
    a = option_adder(p.add_argument_group("output"))
    a("--out", default="samples", metavar="DIR", help="folder for the PNGs (000.png, ...) and grid.png")
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dbtrain eval", formatter_class=HelpFormatter,
                                description="DINO, CLIP-I, CLIP-T, PRES and DIV of a model, on images it "
                                            "generates now.")
    a = option_adder(p.add_argument_group("model and subject"))
    a("--model", required=True, metavar="DIR", help="a diffusers folder (a dbtrain train output_dir); required")
    a("--embedding", nargs="+", default=None, metavar="FILE",
      help="Textual Inversion embedding(s) on top of --model: diffusers' learned_embeds.safetensors or an "
           "A1111/ComfyUI .safetensors/.pt, read safely; a textual-inversion or pivotal-tuning output folder "
           "given as --model loads its own")
    add_lora_flags(a)
    a("--instance_data_dir", required=True, metavar="DIR", help="the subject's real images; required")
    a("--identifier", default=None, metavar="WORD",
      help="[V] (not given: what dbtrain train recorded in the model's dreambooth.json)")
    a("--class_noun", default=None, metavar="WORD",
      help="the class, e.g. dog (not given: recorded in the model's dreambooth.json)")
    a = option_adder(p.add_argument_group("sampling"))
    a("--prompts", nargs="+", default=None, metavar="TEMPLATE",
      help="templates with {V} and {C} (not given: " + "; ".join(DEFAULT_PROMPTS).replace("%", "%%") +
           "; plus \"a {C}\" always)")
    a("--num_images", type=int, default=EVAL_IMAGES, help="images per prompt (the 95%% intervals are "
      "bootstrapped over them)")
    a("--steps", type=int, default=SAMPLE_STEPS, help="denoising steps (sample's and demo's too)")
    a("--guidance", type=float, default=GUIDANCE, help="classifier-free guidance scale (sample's and demo's too)")
    a("--seed", type=int, default=EVAL_SEED, help="image k of every prompt uses seed + k (the demo's too)")
    a("--base_model", default=None, metavar="DIR", help="also score this model (the one fine-tuned) on the "
      "prompts without the identifier, as the reference row (not given: no reference)")
    a("--device", default=None, metavar="cuda|cpu", help="not given: cuda if available")
    a = option_adder(p.add_argument_group("embeddings and output"))
    a("--judge", default=None, metavar="DIR", help="judge folder (not given: the built-in one)")
    a("--clip_model", default=None, metavar="DIR",
      help="local CLIP folder (transformers) for CLIP-I / CLIP-T (not given: the judge's)")
    a("--dino_model", default=None, metavar="DIR",
      help="local DINO/ViT folder (transformers) for DINO / PRES (not given: the judge's)")
    a("--out", default=None, metavar="DIR", help="folder for samples, metrics.json and metrics.md "
      "(not given: only printed)")
    return p


def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dbtrain demo", formatter_class=HelpFormatter,
        description="DreamBooth with prior preservation on the built-in tiny model and subject; writes a "
                    "before/after grid and the paper's metrics. Stopped (Ctrl-C), the same command continues it.")
    a = option_adder(p.add_argument_group("where"))
    a("--out", default=DEMO_OUT, metavar="DIR",
      help="a new or empty folder for everything the demo writes, or an unfinished demo to continue")
    a("--model", default=None, metavar="DIR",
      help="the base model (not given: the built-in one, trainer/world/assets/tiny-world-sd)")
    a("--judge", default=None, metavar="DIR", help="the judge folder (not given: the built-in one)")
    a("--device", default=None, metavar="cuda|cpu", help="not given: cuda if available")
    a = option_adder(p.add_argument_group("recipe"))
    a("--steps", type=int, default=STEPS, help="training steps")
    a("--learning_rate", type=float, default=LEARNING_RATE, help="learning rate")
    a("--num_class_images", type=int, default=NUM_CLASS_IMAGES, help="class images drawn by the base model")
    a("--no_prior_preservation", action="store_true", help="train without the class term")
    a("--eval_images", type=int, default=EVAL_IMAGES, help="images per prompt for the metrics (seeds "
      f"{EVAL_SEED} + k, k < N)")
    a("--sample_steps", type=int, default=SAMPLE_STEPS, help="denoising steps of every image the demo draws (class "
      "images and samples)")
    a("--seed", type=int, default=0, help="seed of training and sampling")
    return p
