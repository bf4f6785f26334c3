"""`dbtrain textual-inversion` options: the flag names of diffusers' examples/textual_inversion/
textual_inversion.py, turned into the options of the one training loop (trainer.loop).

Only what is trainable and what is saved differ from `dbtrain train`: the UNet is frozen, the
placeholder's new token rows are trained, and the output is the embedding files. No torch here:
`--help` and flag errors come back at once.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from trainer.options import diffusers_flags as flag_notes
from trainer.options.train import _NEGATIVE_NUMBER, LR_SCHEDULERS, HelpFormatter, add_adam_flags, build_parser, check, option_adder
from trainer.errors import UserError

# The prompt templates of the original Textual Inversion work (Gal et al. 2022): one is drawn per
# image and step; "{}" is the placeholder.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a good painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def build_ti_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dbtrain textual-inversion", formatter_class=HelpFormatter,
        description="Textual Inversion: learn new token embeddings for a placeholder, the model frozen, in "
                    "dbtrain's training loop. The flags are those of diffusers' examples/textual_inversion/"
                    "textual_inversion.py, plus dbtrain's own (last group). Writes learned_embeds.safetensors "
                    "(diffusers) and <name>.safetensors / <name>.pt (A1111, ComfyUI).")
    p._negative_number_matcher = _NEGATIVE_NUMBER
    g = option_adder(p.add_argument_group("model and data"))
    g("--pretrained_model_name_or_path", metavar="DIR", help="local diffusers folder of the base model; required")
    g("--train_data_dir", metavar="DIR", help="folder with the concept's images; required")
    g("--placeholder_token", metavar="TOKEN", help='the new word, e.g. "<cat-toy>" (must not be in the '
      "vocabulary); required")
    g("--initializer_token", metavar="WORD", help="one-token word whose embedding starts every new row, e.g. "
      "toy; required")
    g("--num_vectors", type=int, default=1, help="embedding vectors (tokens) for the placeholder")
    g("--learnable_property", default="object", choices=["object", "style"],
      help="prompt templates of the original work: objects or styles")
    g("--repeats", type=int, default=100, help="accepted for diffusers' command lines; dbtrain draws images at "
      "random every step, so steps (not epochs) count")
    g("--resolution", type=int, default=512, help="training image size in pixels (a multiple of 8)")
    g("--center_crop", action="store_true", help="crop non-square images at the center instead of at random")
    g("--output_dir", default="text-inversion-model", metavar="DIR",
      help="a new folder, an empty one, or a previous dbtrain run (with --resume_from_checkpoint)")
    g("--seed", type=int, default=0, help="seed of every random draw")
    g = option_adder(p.add_argument_group("training"))
    g("--train_batch_size", type=int, default=16, help="images per step")
    g("--max_train_steps", type=int, default=5000, help="optimizer steps of the run")
    g("--gradient_accumulation_steps", type=int, default=1, help="forward/backward passes per optimizer step")
    g("--learning_rate", type=float, default=1e-4, help="peak learning rate")
    g("--scale_lr", action="store_true", help="multiply the learning rate by batch size x accumulation steps")
    g("--lr_scheduler", default="constant", help="learning-rate schedule", choices=LR_SCHEDULERS)
    g("--lr_warmup_steps", type=int, default=500, help="steps of linear warm-up")
    add_adam_flags(g)
    g("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
      help="autocast dtype; on a GPU the frozen UNet, VAE and text encoder are stored in it too")
    g("--gradient_checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    g = option_adder(p.add_argument_group("checkpoints, saving and logging"))
    g("--save_steps", type=int, default=500, help="write learned_embeds-steps-<N>.safetensors every N steps")
    g("--checkpointing_steps", type=int, default=500, help="save output_dir/checkpoint-<step> every N steps")
    g("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints "
      "(not given: keep all)")
    g("--resume_from_checkpoint", default=None, metavar="PATH|latest",
      help='continue from a checkpoint folder, or "latest"')
    g("--validation_prompt", default=None, metavar="TEXT",
      help="prompt of the validation grids (the placeholder or [V] for the new word; not given: none)")
    g("--validation_steps", type=int, default=100, help="validation grid every this many steps")
    g("--num_validation_images", type=int, default=4, help="images per validation grid")
    g = option_adder(p.add_argument_group("more of diffusers' flags (those done another way print a note)"))
    flag_notes.add_flags(g, flag_notes.TI_FLAGS)
    g = option_adder(p.add_argument_group("ours (dbtrain's own)"))
    g("--instance_prompt", default=None, metavar="TEXT",
      help='one fixed prompt instead of the templates, "[V]" for the placeholder (not given: the templates)')
    g("--caption_extension", default=None, metavar="EXT",
      help="per-image prompts from photo.txt beside photo.png, [V] = the placeholder (not given: templates)")
    g("--random_flip", action="store_true", help="random horizontal flip of the training images")
    g("--max_grad_norm", type=float, default=0.0, help="clip the gradient norm (0 = off, as diffusers' script)")
    g("--snr_gamma", type=float, default=None, help="min-SNR loss weighting gamma (not given: off)")
    g("--optimizer", default="adamw", choices=["adamw8bit", "adamw", "bnb8bit"],
      help="the trained rows are few: adamw (8-bit states save nothing here)")
    g("--kernels", default="on", metavar="on|off", help="on: dbkernels loss and attention; off: PyTorch's")
    g("--log_every", type=int, default=10, help="a log line every this many steps")
    g("--device", default=None, metavar="cuda|cpu", help="cuda or cpu (not given: cuda if available)")
    g("--ddp_timeout", type=int, default=1800, metavar="S", help="torchrun: seconds a rank waits for the others "
      "(a rank that died or hangs ends the run with an error after this)")
    return p


def to_train_config(a: argparse.Namespace) -> argparse.Namespace:
    """The options of trainer.loop for this Textual Inversion run (dbtrain train's defaults elsewhere)."""
    for name in ("pretrained_model_name_or_path", "train_data_dir", "placeholder_token", "initializer_token"):
        if not getattr(a, name):
            raise UserError(f"--{name} is required")
    if a.num_vectors < 1:
        raise UserError(f"--num_vectors must be >= 1, got {a.num_vectors}")
    if a.repeats < 1 or a.save_steps < 1:
        raise UserError("--repeats and --save_steps must be >= 1")
    if len(a.initializer_token.split()) != 1:
        raise UserError(f"--initializer_token must be one token, got {a.initializer_token!r}")
    if len(a.placeholder_token.split()) != 1:
        raise UserError(f"--placeholder_token must be one word without spaces, got {a.placeholder_token!r}")
    if a.instance_prompt is not None and "[V]" not in a.instance_prompt and a.placeholder_token not in \
            a.instance_prompt:
        raise UserError(f"--instance_prompt {a.instance_prompt!r} has no [V] (where the placeholder goes)")
    cfg = build_parser().parse_args(["--pretrained_model_name_or_path", a.pretrained_model_name_or_path,
                                     "--instance_data_dir", a.train_data_dir, "--instance_prompt", "[V]"])
    shared = ("resolution", "center_crop", "output_dir", "seed", "train_batch_size", "max_train_steps",
              "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1",
              "adam_beta2", "adam_weight_decay", "adam_epsilon", "mixed_precision", "gradient_checkpointing",
              "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint", "validation_prompt",
              "validation_steps", "num_validation_images", "caption_extension", "random_flip", "max_grad_norm",
              "snr_gamma", "optimizer", "log_every", "device")
    for name in shared + flag_notes.TI_FLAGS:
        setattr(cfg, name, getattr(a, name))
    from trainer.options.train import _bool

    try:
        cfg.kernels = _bool(a.kernels)
    except argparse.ArgumentTypeError as e:
        raise UserError(f"--kernels: {e}") from e
    if a.scale_lr:
        cfg.learning_rate = a.learning_rate * a.train_batch_size * a.gradient_accumulation_steps
    prompt = a.instance_prompt.replace(a.placeholder_token, "[V]") if a.instance_prompt else None
    cfg.instance_prompt = prompt or "[V]"
    # what makes this run Textual Inversion in the loop
    cfg.method = "textual_inversion"
    cfg.train_unet = False
    cfg.train_text_embedding = True
    cfg.text_embedding_frac = 1.0
    cfg.placeholder_token = a.placeholder_token
    cfg.initializer_token = a.initializer_token
    cfg.num_vectors = a.num_vectors
    cfg.prompt_templates = None if (prompt or a.caption_extension) else list(TEMPLATES[a.learnable_property])
    cfg.learnable_property = a.learnable_property
    cfg.save_steps = a.save_steps
    cfg.identifier = a.placeholder_token
    cfg.repeats = a.repeats  # diffusers' epoch length: images x repeats (--num_train_epochs, --validation_epochs)
    check(cfg)
    flag_notes.apply(cfg, UserError, "textual-inversion")
    if not Path(a.train_data_dir).is_dir():
        raise UserError(f"--train_data_dir {a.train_data_dir}: no such folder" if not Path(a.train_data_dir).exists()
                        else f"--train_data_dir {a.train_data_dir} is a file, not a folder of images")
    return cfg


def parse(argv: list[str]) -> argparse.Namespace:
    return to_train_config(build_ti_parser().parse_args(argv))
