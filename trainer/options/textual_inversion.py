"""`dbtrain textual-inversion`: the flag names of diffusers' examples/textual_inversion/textual_inversion.py,
as the options of the one training loop.

The flags are TrainOptions' fields under textual_inversion.py's names and defaults (TI_LAYOUT); only
what is trainable and what is saved differ from `dbtrain train`: the UNet is frozen, the placeholder's
new token rows train, and the output is the embedding files. No torch here.
"""
from __future__ import annotations

from pathlib import Path

from trainer.errors import UserError
from trainer.options import checks, diffusers_flags, spec
from trainer.options.train import TrainOptions

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

# textual_inversion.py's flags that dbtrain maps or notes (the rest of TI_LAYOUT is its core)
TI_DIFFUSERS_FLAGS = ("revision", "variant", "tokenizer_name", "num_train_epochs", "lr_num_cycles",
                      "dataloader_num_workers", "push_to_hub", "hub_token", "hub_model_id", "logging_dir",
                      "allow_tf32", "report_to", "validation_epochs", "local_rank",
                      "enable_xformers_memory_efficient_attention", "save_as_full_pipeline", "no_safe_serialization")
TI_LAYOUT = (
    ("model and data", ("pretrained_model_name_or_path", "instance_data_dir", "placeholder_token", "initializer_token",
                        "num_vectors", "learnable_property", "repeats", "resolution", "center_crop", "output_dir",
                        "seed")),
    ("training", ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "learning_rate", "scale_lr",
                  "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
                  "mixed_precision", "gradient_checkpointing")),
    ("checkpoints, saving and logging", ("save_steps", "checkpointing_steps", "checkpoints_total_limit",
                                         "resume_from_checkpoint", "validation_prompt", "validation_steps",
                                         "num_validation_images")),
    ("more of diffusers' flags (those done another way print a note)", TI_DIFFUSERS_FLAGS),
    ("masks, buckets, robust losses, EMA (as dbtrain train)", (
        "masked_loss", "mask_dir", "mask_min", "mask_normalization", "aspect_ratio_buckets", "enable_bucket",
        "bucket_reso_steps", "loss_type", "huber_c", "huber_schedule", "use_ema", "ema_decay", "ema_device",
        "ema_dtype", "save_raw_weights")),
    ("ours (dbtrain's own)", ("instance_prompt", "caption_extension", "random_flip", "image_interpolation_mode",
                              "image_fit",
                              "max_grad_norm", "snr_gamma", "optimizer", "kernels", "log_every", "device",
                              "ddp_timeout",
                              "prompt_without_identifier", "diffusers_defaults")),
)
TI_NAMES = {"instance_data_dir": "train_data_dir"}
TI_DEFAULTS = {"output_dir": "text-inversion-model", "train_batch_size": 16, "max_train_steps": 5000,
               "learning_rate": 1e-4, "lr_warmup_steps": 500, "save_steps": 500, "max_grad_norm": 0.0,
               "optimizer": "adamw"}
TI_HELP = {
    "pretrained_model_name_or_path": "local diffusers folder of the base model; required",
    "instance_data_dir": "folder with the concept's images; required",
    "placeholder_token": 'the new word, e.g. "<cat-toy>" (must not be in the vocabulary); required',
    "initializer_token": "one-token word whose embedding starts every new row, e.g. toy; required",
    "num_vectors": "embedding vectors (tokens) for the placeholder",
    "output_dir": "a new folder, an empty one, or a previous dbtrain run (with --resume_from_checkpoint)",
    "seed": "seed of every random draw",
    "train_batch_size": "images per step",
    "max_train_steps": "optimizer steps of the run",
    "scale_lr": "multiply the learning rate by batch size x accumulation steps",
    "mixed_precision": "autocast dtype; on a GPU the frozen UNet, VAE and text encoder are stored in it too",
    "save_steps": "write learned_embeds-steps-<N>.safetensors every N steps",
    "checkpointing_steps": "save output_dir/checkpoint-<step> every N steps",
    "resume_from_checkpoint": 'continue from a checkpoint folder, or "latest"',
    "validation_prompt": "prompt of the validation grids (the placeholder or [V] for the new word; not given: none)",
    "instance_prompt": 'one fixed prompt instead of the templates, "[V]" for the placeholder (not given: the '
                       "templates)",
    "caption_extension": "per-image prompts from photo.txt beside photo.png, [V] = the placeholder (not given: "
                         "templates)",
    "image_interpolation_mode": "resize filter of the training images (not given: bilinear; textual_inversion.py's "
                                "is bicubic)",
    "max_grad_norm": "clip the gradient norm (0 = off, as diffusers' script)",
    "snr_gamma": "min-SNR loss weighting gamma (not given: off)",
    "optimizer": "the trained rows are few: adamw (8-bit states save nothing here)",
    "device": "cuda or cpu (not given: cuda if available)",
    "prompt_without_identifier": "train although --instance_prompt or a caption file names neither [V] nor the "
                                 "placeholder (a note says so; not given: such a prompt is refused)",
    "ddp_timeout": "torchrun: seconds a rank waits for the others (a rank that died or hangs ends the run with an "
                   "error after this)",
}


def build_ti_parser():
    p = spec.parser("dbtrain textual-inversion",
                    "Textual Inversion: learn new token embeddings for a placeholder, the model frozen, in dbtrain's "
                    "training loop. The flags are those of diffusers' examples/textual_inversion/textual_inversion.py, "
                    "plus dbtrain's own (last group). Writes learned_embeds.safetensors (diffusers) and "
                    "<name>.safetensors / <name>.pt (A1111, ComfyUI).")
    return spec.build(p, TI_LAYOUT, TrainOptions.fields(), names=TI_NAMES, defaults=TI_DEFAULTS, helps=TI_HELP)


def parse(argv: list[str]) -> TrainOptions:
    """textual_inversion.py's flags as the options of a Textual Inversion run (checked, notes printed)."""
    p = build_ti_parser()
    values = vars(p.parse_args(argv))
    for name, flag in (("pretrained_model_name_or_path", "pretrained_model_name_or_path"),
                       ("instance_data_dir", "train_data_dir"), ("placeholder_token", "placeholder_token"),
                       ("initializer_token", "initializer_token")):
        if not values[name]:
            raise UserError(f"--{flag} is required")
    placeholder, given_prompt = values["placeholder_token"], values["instance_prompt"]
    if values["num_vectors"] < 1:
        raise UserError(f"--num_vectors must be >= 1, got {values['num_vectors']}")
    if values["repeats"] < 1 or values["save_steps"] < 1:
        raise UserError("--repeats and --save_steps must be >= 1")
    if len(values["initializer_token"].split()) != 1:
        raise UserError(f"--initializer_token must be one token, got {values['initializer_token']!r}")
    if len(placeholder.split()) != 1:
        raise UserError(f"--placeholder_token must be one word without spaces, got {placeholder!r}")
    opts = TrainOptions.from_flags(values, method="textual_inversion")
    if opts.optim.scale_lr:  # textual_inversion.py's rule (one process), applied here without a note
        opts.optim.learning_rate *= opts.training.train_batch_size * opts.training.gradient_accumulation_steps
        opts.optim.scale_lr = False
    prompt = given_prompt.replace(placeholder, "[V]") if given_prompt else None
    opts.data.instance_prompt = prompt or "[V]"
    opts.data.prompt_templates = (None if (prompt or opts.data.caption_extension)
                                  else list(TEMPLATES[opts.data.learnable_property]))
    opts.data.identifier = placeholder
    # what makes this run Textual Inversion: only the placeholder's new rows train, for all the steps
    opts.embedding.train_text_embedding = True
    opts.embedding.text_embedding_frac = 1.0
    defaults_note = diffusers_flags.their_defaults(opts, "textual-inversion", diffusers_flags.given_flags(p, argv))
    checks.check(opts)  # (the prompt and caption files must name [V] or the placeholder, unless told otherwise)
    if defaults_note:
        diffusers_flags.say(defaults_note)
    diffusers_flags.apply(opts, "textual-inversion")
    folder = Path(opts.data.instance_data_dir)
    if not folder.is_dir():
        raise UserError(f"--train_data_dir {folder}: no such folder" if not folder.exists()
                        else f"--train_data_dir {folder} is a file, not a folder of images")
    return opts
