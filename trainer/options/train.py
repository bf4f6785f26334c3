"""Training options: diffusers' train_dreambooth.py flag names plus ours, and a TOML file.

`--config run.toml` supplies defaults with the same keys as the flags (without the
dashes); flags given on the command line override it.
"""
from __future__ import annotations

import argparse
import math
import re
import tomllib
from pathlib import Path

from trainer.options import diffusers_flags as flag_notes
from trainer.errors import UserError

# the image suffixes trainer.data reads (kept here too: this module imports no torch / PIL)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

class HelpFormatter(argparse.HelpFormatter):
    """Every option's default at the end of its help line (on/off for switches)."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=38)

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is argparse.SUPPRESS or action.required or "%(default)" in text
                or not action.option_strings or action.dest == "help"):
            return text
        d = action.default
        if d is None:
            return text  # the help line says what "not given" means
        shown = ("on" if d else "off") if isinstance(d, bool) else d
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)


def option_adder(group):
    """group.add_argument with short metavars: N for counts, X for numbers."""
    def add(*names, **kw):
        if "metavar" not in kw and not kw.get("choices") and kw.get("type") in (int, float):
            kw["metavar"] = "N" if kw["type"] is int else "X"
        return group.add_argument(*names, **kw)
    return add


LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]


def add_adam_flags(g) -> None:
    """diffusers' AdamW flags, shared by `dbtrain train` and `dbtrain textual-inversion`."""
    g("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g("--adam_weight_decay", type=float, default=1e-2, help="AdamW decoupled weight decay")
    g("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dbtrain train", formatter_class=HelpFormatter,
        description="DreamBooth fine-tuning on our kernels. The flags are those of diffusers' "
                    "examples/dreambooth/train_dreambooth.py, plus dbtrain's own (last group).")
    # "-1e-4", "-inf" are values, not flags (argparse alone only knows "-1" and "-.5"), so that
    # `--learning_rate -1e-4` gets the range message instead of "expected one argument"
    p._negative_number_matcher = _NEGATIVE_NUMBER
    g = option_adder(p.add_argument_group("model and data"))
    g("--pretrained_model_name_or_path", metavar="DIR",
      help="local diffusers folder of the base model (SD 1.x / 2.x); required, nothing is downloaded")
    g("--instance_data_dir", metavar="DIR", help="folder with the 3-5 subject images; required")
    g("--instance_prompt", metavar="TEXT", help='prompt of the subject images, e.g. "a photo of [V] dog" '
      "([V] becomes --identifier); required")
    g("--caption_extension", default=None, metavar="EXT",
      help="per-image captions (kohya's convention): photo.txt beside photo.png is that image's instance prompt "
           "([V] substituted); images without one use --instance_prompt (not given: --instance_prompt for all)")
    g("--output_dir", default="dreambooth-model", metavar="DIR",
      help="where the model, checkpoints and logs go: a new folder, an empty one, or a previous dbtrain run "
           "(then with --resume_from_checkpoint latest)")
    g("--resolution", type=int, default=512, help="training image size in pixels (a multiple of 8)")
    g("--center_crop", action="store_true", help="crop non-square images at the center instead of at random")
    g("--seed", type=int, default=0, help="seed of every random draw (same seed, same run)")
    flag_notes.add_flags(g, ("revision", "variant", "tokenizer_name", "image_interpolation_mode",
                             "pretrained_vae_model_name_or_path"))
    g = option_adder(p.add_argument_group("prior preservation"))
    g("--with_prior_preservation", action="store_true",
      help="also train on class images of the frozen model (keeps the class prior)")
    g("--class_data_dir", metavar="DIR", help="folder of class images; missing ones are generated there")
    g("--class_prompt", metavar="TEXT", help='prompt of the class images, e.g. "a photo of dog"')
    g("--num_class_images", type=int, default=100, help="class images to use (generated if fewer exist)")
    g("--prior_loss_weight", type=float, default=1.0, help="weight of the class term of the loss")
    g("--sample_batch_size", type=int, default=4, help="batch size when generating class images")
    flag_notes.add_flags(g, ("prior_generation_precision",))
    g = option_adder(p.add_argument_group("training"))
    g("--train_text_encoder", action="store_true", help="fine-tune the text encoder too")
    g("--train_batch_size", type=int, default=1, help="instance images per step (as many class images)")
    g("--max_train_steps", type=int, default=None, help=f"optimizer steps of the run; not given: from "
      f"--num_train_epochs if that is given (default: {flag_notes.DEFAULT_STEPS})")
    flag_notes.add_flags(g, ("num_train_epochs",))
    g("--gradient_accumulation_steps", type=int, default=1, help="forward/backward passes per optimizer step")
    g("--learning_rate", type=float, default=5e-6, help="peak learning rate")
    g("--lr_scheduler", default="constant", help="learning-rate schedule", choices=LR_SCHEDULERS)
    g("--lr_warmup_steps", type=int, default=0, help="steps of linear warm-up")
    flag_notes.add_flags(g, ("lr_num_cycles", "lr_power", "scale_lr"))
    add_adam_flags(g)
    g("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this (0 = no clipping)")
    g("--snr_gamma", type=float, default=None, help="min-SNR loss weighting gamma, e.g. 5.0 (not given: off)")
    g("--offset_noise", type=float, nargs="?", const=0.1, default=0.0,
      help="offset-noise strength; alone it means diffusers' switch, 0.1 (0 = off)")
    flag_notes.add_flags(g, ("tokenizer_max_length", "text_encoder_use_attention_mask", "class_labels_conditioning"))
    g = option_adder(p.add_argument_group("memory and speed"))
    g("--gradient_checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    g("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
      help="autocast dtype; on a CPU fp16 runs 2-3x slower than no (bf16 about as fast as no)")
    flag_notes.add_flags(g, ("allow_tf32",))
    g = option_adder(p.add_argument_group("checkpoints and logging"))
    g("--checkpointing_steps", type=int, default=500,
      help="save output_dir/checkpoint-<step> every this many steps (and on Ctrl-C / SIGTERM)")
    g("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints "
      "(not given: keep all)")
    g("--resume_from_checkpoint", default=None, metavar="PATH|latest",
      help='continue from a checkpoint folder, or "latest" (the newest intact one; none yet: start at step 0)')
    g("--validation_prompt", default=None, metavar="TEXT",
      help="prompt of the validation grids in output_dir/validation (not given: no validation)")
    g("--validation_steps", type=int, default=100, help="validation grid every this many steps")
    g("--num_validation_images", type=int, default=4, help="images per validation grid")
    flag_notes.add_flags(g, ("validation_scheduler", "validation_epochs", "validation_images", "logging_dir",
                             "report_to", "skip_save_text_encoder"))
    g = option_adder(p.add_argument_group("LoRA (train_dreambooth_lora.py's and kohya's names)"))
    flag_notes.add_lora_flags(g)
    g = option_adder(p.add_argument_group("diffusers' flags that dbtrain does its own way (each prints a note)"))
    flag_notes.add_flags(g, ("use_8bit_adam", "enable_xformers_memory_efficient_attention", "set_grads_to_none",
                             "pre_compute_text_embeddings", "dataloader_num_workers", "local_rank", "push_to_hub",
                             "hub_token", "hub_model_id"))
    g = option_adder(p.add_argument_group("ours (dbtrain's own, not in diffusers' train_dreambooth.py)"))
    g("--config", default=None, metavar="TOML", help="TOML file with any of these options, same keys without "
      "the dashes (flags given here override it)")
    g("--identifier", default="sks", metavar="WORD",
      help='the rare token that replaces [V], or "auto" to pick one from the tokenizer as the paper does')
    g("--random_flip", action="store_true", help="random horizontal flip of the training images")
    g("--train_text_embedding", action="store_true",
      help="pivotal tuning: [V] becomes new token(s) whose embeddings train with the UNet for the first "
           "--text_embedding_frac of the steps, then freeze; learned_embeds.safetensors is written beside the model")
    g("--text_embedding_frac", type=float, default=0.5, help="fraction of the steps that train the new embeddings")
    g("--text_embedding_lr", type=float, default=None, metavar="LR",
      help="learning rate of the new embeddings (not given: --learning_rate); Textual Inversion uses ~5e-3")
    g("--placeholder_token", default=None, metavar="TOKEN",
      help="the new token of --train_text_embedding (not given: <identifier>, e.g. <sks>)")
    g("--initializer_token", default=None, metavar="WORD",
      help="one-token word whose embedding starts the new rows (not given: the identifier)")
    g("--num_vectors", type=int, default=1, help="embedding vectors (tokens) of --train_text_embedding")
    g("--class_inference_steps", type=int, default=50, help="denoising steps per generated class image")
    g("--optimizer", default="adamw8bit", choices=["adamw8bit", "adamw", "bnb8bit"],
      help="adamw8bit: ours (8-bit states); adamw: torch.optim.AdamW; bnb8bit: bitsandbytes")
    g("--weights_dtype", default="fp32", choices=["fp32", "bf16"],
      help="fp32 master weights, or pure bf16 weights (stochastic rounding with adamw8bit)")
    g("--step_in_backward", action="store_true", help="optimizer step inside backward, gradients freed at once "
      "(adamw8bit; less memory)")
    g("--kernels", type=_bool, default="on", metavar="on|off",
      help="on: dbkernels loss and attention; off: PyTorch's")
    g("--log_every", type=int, default=10, help="a log line every this many steps")
    g("--device", default=None, metavar="cuda|cpu", help="cuda or cpu (not given: cuda if available; under "
      "torchrun each rank takes cuda:LOCAL_RANK)")
    g("--ddp_timeout", type=int, default=1800, metavar="S", help="torchrun: seconds a rank waits for the others "
      "(a rank that died or hangs ends the run with an error after this; rank 0's export must fit in it)")
    g("--shard", action="store_true", help="torchrun: split the optimizer state and the gradients over the ranks "
      "(ZeRO stage 2: each rank updates its share of the parameters; the weights stay whole on every rank)")
    return p


def config_file_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """--config run.toml: its keys become the parser's defaults, so flags given on the line override them."""
    first, _ = parser.parse_known_args(argv)
    if not first.config:
        return
    path = Path(first.config)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config {path}: not valid TOML ({e})") from e
    unknown = sorted(set(table) - {act.dest for act in parser._actions})
    if unknown:
        raise UserError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    parser.set_defaults(**table)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    config_file_defaults(parser, argv)
    cfg = parser.parse_args(argv)
    check(cfg)
    flag_notes.apply(cfg, UserError)
    return cfg


def check(cfg: argparse.Namespace) -> None:
    """Option errors that need no file access (run before anything is loaded)."""
    for name in ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required")
    ext = getattr(cfg, "caption_extension", None)
    if ext is not None and (not str(ext).strip(".").strip() or "/" in str(ext) or str(ext).strip().lower().lstrip(".")
                            in {s.lstrip(".") for s in IMAGE_SUFFIXES}):
        raise UserError(f"--caption_extension must be a file suffix such as .txt or .caption, got {ext!r}")
    if cfg.resolution <= 0 or cfg.resolution % 8:
        raise UserError(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), "
                        f"got {cfg.resolution}")
    if cfg.with_prior_preservation:
        if not cfg.class_prompt:
            raise UserError("--with_prior_preservation needs --class_prompt (e.g. \"a photo of dog\")")
        if not cfg.class_data_dir:
            raise UserError("--with_prior_preservation needs --class_data_dir (class images are generated "
                            "there if it holds fewer than --num_class_images)")
        if cfg.num_class_images < 1:
            raise UserError(f"--num_class_images must be >= 1, got {cfg.num_class_images}")
    if isinstance(cfg.offset_noise, bool):  # `offset_noise = true` in a --config file: diffusers' switch, 0.1
        cfg.offset_noise = 0.1 if cfg.offset_noise else 0.0
    if cfg.max_train_steps is None and getattr(cfg, "num_train_epochs", None) is None:
        cfg.max_train_steps = flag_notes.DEFAULT_STEPS
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                 "sample_batch_size", "log_every", "validation_steps", "num_validation_images",
                 "class_inference_steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_train_steps is not None and cfg.max_train_steps < 1:
        raise UserError(f"--max_train_steps must be >= 1, got {cfg.max_train_steps}")
    flag_notes.check_numbers(cfg, UserError)
    flag_notes.check_lora(cfg, UserError)
    for name in ("num_class_images", "lr_warmup_steps", "seed"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise UserError(f"--checkpoints_total_limit must be >= 1 (or not given: keep all), "
                        f"got {cfg.checkpoints_total_limit}")
    _check_numbers(cfg)
    if not str(cfg.identifier).strip() or len(str(cfg.identifier).split()) != 1:
        raise UserError(f"--identifier must be one word (or auto), got {cfg.identifier!r}")
    if cfg.step_in_backward:
        if cfg.optimizer != "adamw8bit":
            raise UserError("--step_in_backward needs --optimizer adamw8bit")
        if cfg.gradient_accumulation_steps > 1:
            raise UserError("--step_in_backward cannot accumulate gradients (each is applied and freed in "
                            "backward); use --gradient_accumulation_steps 1")
        if cfg.mixed_precision == "fp16":
            raise UserError("--step_in_backward cannot unscale fp16 gradients; use --mixed_precision bf16 or no")
    if getattr(cfg, "text_embedding_lr", None) is not None and not getattr(cfg, "train_text_embedding", False):
        raise UserError("--text_embedding_lr is the learning rate of --train_text_embedding's new token rows; add "
                        "--train_text_embedding, or leave it out")
    if getattr(cfg, "train_text_embedding", False):
        if cfg.train_text_encoder and getattr(cfg, "train_unet", True):
            raise UserError("--train_text_embedding trains new token rows of a frozen text encoder; it cannot be "
                            "combined with --train_text_encoder")
        frac = cfg.text_embedding_frac
        if not math.isfinite(frac) or not 0 < frac <= 1:
            raise UserError(f"--text_embedding_frac must be > 0 and <= 1, got {frac}")
        if cfg.num_vectors < 1:
            raise UserError(f"--num_vectors must be >= 1, got {cfg.num_vectors}")
        for name in ("placeholder_token", "initializer_token"):
            v = getattr(cfg, name)
            if v is not None and (not str(v).strip() or len(str(v).split()) != 1):
                raise UserError(f"--{name} must be one word without spaces, got {v!r}")
    if cfg.device is not None and str(cfg.device).split(":")[0] not in ("cuda", "cpu"):
        raise UserError(f"--device must be cuda, cuda:N or cpu, got {cfg.device!r}")


# (flag, lowest allowed, lowest is allowed, highest or None, highest is allowed); every one must be finite
_RANGES = (("learning_rate", 0, True, None, False), ("prior_loss_weight", 0, True, None, False),
           ("adam_beta1", 0, True, 1, False), ("adam_beta2", 0, True, 1, False),
           ("adam_weight_decay", 0, True, None, False), ("adam_epsilon", 0, False, None, False),
           ("max_grad_norm", 0, True, None, False), ("offset_noise", 0, True, None, False),
           ("snr_gamma", 0, False, None, False), ("text_embedding_lr", 0, False, None, False))


def _check_numbers(cfg) -> None:
    for name, lo, lo_ok, hi, hi_ok in _RANGES:
        v = getattr(cfg, name)
        if v is None:
            continue
        if not math.isfinite(v):
            raise UserError(f"--{name} must be a finite number, got {v}")
        if v < lo or (v == lo and not lo_ok) or (hi is not None and (v > hi or (v == hi and not hi_ok))):
            rng = (f"{'>=' if lo_ok else '>'} {lo}" + (f" and {'<=' if hi_ok else '<'} {hi}" if hi is not None
                                                        else ""))
            raise UserError(f"--{name} must be {rng}, got {v}")
