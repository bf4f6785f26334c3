"""Training options: diffusers' train_dreambooth.py flag names plus ours, and a TOML file.

`--config run.toml` supplies defaults with the same keys as the flags (without the
dashes); flags given on the command line override it.
"""
from __future__ import annotations

import argparse
import tomllib
from pathlib import Path


class UserError(Exception):
    """Bad input the user can fix; the CLI prints the message as one line and exits 2."""


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dbtrain train", description="DreamBooth fine-tuning on our kernels.")
    a = p.add_argument
    a("--config", default=None, help="TOML file with any of these options (flags override it)")
    # --- what diffusers' train_dreambooth.py also has (same names, same meaning) ---
    a("--pretrained_model_name_or_path", required=False, help="local diffusers folder (SD 1.x / 2.x)")
    a("--instance_data_dir", help="folder with the 3-5 subject images")
    a("--instance_prompt", help='e.g. "a photo of [V] dog" ([V] = the identifier)')
    a("--class_data_dir", help="folder of class images (generated there if too few)")
    a("--class_prompt", help='e.g. "a photo of dog"')
    a("--with_prior_preservation", action="store_true")
    a("--prior_loss_weight", type=float, default=1.0)
    a("--num_class_images", type=int, default=100)
    a("--output_dir", default="dreambooth-model")
    a("--seed", type=int, default=0)
    a("--resolution", type=int, default=512)
    a("--center_crop", action="store_true", help="center crop (default: random crop)")
    a("--random_flip", action="store_true", help="random horizontal flip")
    a("--train_text_encoder", action="store_true")
    a("--train_batch_size", type=int, default=1, help="instance images per step (as many class images)")
    a("--max_train_steps", type=int, default=800)
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help='a checkpoint folder or "latest"')
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", action="store_true")
    a("--learning_rate", type=float, default=5e-6)
    a("--lr_scheduler", default="constant",
      choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    a("--lr_warmup_steps", type=int, default=0)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    a("--snr_gamma", type=float, default=None)
    a("--offset_noise", type=float, default=0.0, help="offset-noise strength (0 = off)")
    a("--validation_prompt", default=None)
    a("--validation_steps", type=int, default=100)
    a("--num_validation_images", type=int, default=4)
    a("--sample_batch_size", type=int, default=4, help="batch size for class-image generation")
    # --- ours ---
    a("--optimizer", default="adamw8bit", choices=["adamw8bit", "adamw", "bnb8bit"])
    a("--weights_dtype", default="fp32", choices=["fp32", "bf16"],
      help="fp32 master weights, or pure bf16 weights (stochastic rounding with adamw8bit)")
    a("--step_in_backward", action="store_true", help="optimizer step inside backward (adamw8bit)")
    a("--kernels", type=_bool, default=True, help="on: dbkernels loss/attention; off: PyTorch")
    a("--identifier", default="sks", help='the rare token for [V], or "auto" to pick one from the tokenizer')
    a("--class_inference_steps", type=int, default=50, help="denoising steps per generated class image")
    a("--log_every", type=int, default=10, help="log line interval in steps")
    a("--device", default=None, help="cuda or cpu (default: cuda if available)")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        path = Path(first.config)
        if not path.is_file():
            raise UserError(f"--config {path}: no such file")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"--config {path}: not valid TOML ({e})") from e
        known = {act.dest for act in parser._actions}
        unknown = sorted(set(table) - known)
        if unknown:
            raise UserError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
        parser.set_defaults(**table)
    cfg = parser.parse_args(argv)
    check(cfg)
    return cfg


def check(cfg: argparse.Namespace) -> None:
    """Option errors that need no file access."""
    for name in ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required")
    if cfg.resolution <= 0 or cfg.resolution % 8:
        raise UserError(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), "
                        f"got {cfg.resolution}")
    if cfg.with_prior_preservation:
        if not cfg.class_prompt:
            raise UserError("--with_prior_preservation needs --class_prompt (e.g. \"a photo of dog\")")
        if not cfg.class_data_dir:
            raise UserError("--with_prior_preservation needs --class_data_dir (class images are generated "
                            "there if it holds fewer than --num_class_images)")
    for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps",
                 "sample_batch_size", "log_every", "validation_steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.learning_rate < 0:
        raise UserError(f"--learning_rate must be >= 0, got {cfg.learning_rate}")
    if cfg.step_in_backward:
        if cfg.optimizer != "adamw8bit":
            raise UserError("--step_in_backward needs --optimizer adamw8bit")
        if cfg.gradient_accumulation_steps > 1:
            raise UserError("--step_in_backward cannot accumulate gradients (each is applied and freed in "
                            "backward); use --gradient_accumulation_steps 1")
    if cfg.snr_gamma is not None and cfg.snr_gamma <= 0:
        raise UserError(f"--snr_gamma must be > 0 (5.0 is usual), got {cfg.snr_gamma}")
