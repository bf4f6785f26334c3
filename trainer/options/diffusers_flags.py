"""diffusers' example-script flags that dbtrain does its own way, or cannot do here (issue 16).

A command line copied from examples/dreambooth/train_dreambooth.py, train_dreambooth_lora.py or
textual_inversion.py runs unchanged: each such flag is defined here once, and `apply` maps it onto
ours and says so in one `dbtrain: note:` line at start (never silently). `resolve_counts` does the
parts that need the image count (--num_train_epochs, --validation_epochs) once the folders are known.
No torch here: these run before anything is loaded.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

DEFAULT_STEPS = 800  # dbtrain train's --max_train_steps when neither it nor --num_train_epochs is given
INTERPOLATIONS = ("bilinear", "nearest", "nearest_exact", "bicubic", "box", "hamming", "lanczos")


def _spec(g, name):
    """Define diffusers' flag `name` on the option group adder `g`."""
    specs = {
        "revision": dict(default=None, metavar="REV", help="hub revision of the base model: a local folder has "
                         "none, so it is ignored with a note (check that revision out into a folder instead)"),
        "variant": dict(default=None, metavar="NAME", help="load the base model's weight variant, e.g. fp16: "
                        "the *.fp16.safetensors files of its folders (not given: the plain files)"),
        "tokenizer_name": dict(default=None, metavar="DIR", help="a local tokenizer folder to use instead of "
                               "the base model's tokenizer/ (not given: the model's)"),
        "num_train_epochs": dict(type=int, default=None, help="passes over the images; --max_train_steps = "
                                 "epochs x ceil(ceil(images / batch) / accumulation), as diffusers (a given "
                                 "--max_train_steps wins)"),
        "scale_lr": dict(action="store_true", help="multiply the learning rate by accumulation steps x batch "
                         "size x processes (1)"),
        "lr_num_cycles": dict(type=int, default=1, help="cycles of cosine_with_restarts"),
        "lr_power": dict(type=float, default=1.0, help="power of the polynomial schedule"),
        "use_8bit_adam": dict(action="store_true", help="diffusers' switch: our 8-bit AdamW (--optimizer "
                              "adamw8bit, already the default)"),
        "dataloader_num_workers": dict(type=int, default=0, help="accepted: dbtrain has no DataLoader (images "
                                       "are decoded once, their latents cached)"),
        "push_to_hub": dict(action="store_true", help="accepted, nothing is uploaded (no network); upload "
                            "output_dir afterwards with huggingface-cli upload"),
        "hub_token": dict(default=None, metavar="TOKEN", help="accepted, never used nor stored"),
        "hub_model_id": dict(default=None, metavar="ID", help="accepted: the repo name shown in the upload hint"),
        "logging_dir": dict(default="logs", metavar="DIR", help="step log (train_log.jsonl) and TensorBoard "
                            "folder, relative to output_dir"),
        "allow_tf32": dict(action="store_true", help="TF32 matmuls and convolutions on Ampere+ GPUs"),
        "report_to": dict(default=None, metavar="NAME", help="tensorboard (event files when tensorboard is "
                          "installed), wandb, comet_ml or all; the JSONL step log is always written (not given: "
                          "tensorboard, without a note when it is not installed)"),
        "local_rank": dict(type=int, default=-1, help="accepted: under torchrun each rank's device comes "
                           "from LOCAL_RANK (data parallel, see --ddp_timeout)"),
        "enable_xformers_memory_efficient_attention": dict(action="store_true", help="diffusers' switch: our "
                                                           "fused attention kernels (--kernels on) instead"),
        "set_grads_to_none": dict(action="store_true", help="accepted: gradients are always set to None"),
        "pre_compute_text_embeddings": dict(action="store_true", help="accepted: with a frozen text encoder the "
                                            "prompt embeddings are always computed once"),
        "tokenizer_max_length": dict(type=int, default=None, help="tokens per prompt (not given: the tokenizer's "
                                     "model_max_length, 77 for CLIP)"),
        "text_encoder_use_attention_mask": dict(action="store_true", help="pass the padding mask to the text "
                                                "encoder"),
        "skip_save_text_encoder": dict(action="store_true", help="save the pipeline without its text_encoder/"),
        "validation_images": dict(nargs="+", default=None, metavar="FILE", help="accepted: input images of "
                                  "image-conditioned pipelines; SD text-to-image validation uses none"),
        "class_labels_conditioning": dict(default=None, choices=["timesteps"], help="pass the timesteps as the "
                                          "UNet's class_labels (for UNets with a class embedding)"),
        "validation_scheduler": dict(default=None, choices=["DPMSolverMultistepScheduler", "DDPMScheduler"],
                                     help="sampler of the validation grids (not given: the model's own)"),
        "prior_generation_precision": dict(default=None, choices=["no", "fp32", "fp16", "bf16"],
                                           help="dtype of the pipeline that draws the class images (not given "
                                                "or no: the --mixed_precision dtype on a GPU, fp32 on a CPU)"),
        "validation_epochs": dict(type=int, default=None, help="validation every this many epochs (sets "
                                  "--validation_steps; not given: --validation_steps)"),
        "image_interpolation_mode": dict(default=None, choices=list(INTERPOLATIONS),
                                         help="resize filter of the training images (not given: bilinear, as "
                                              "train_dreambooth.py; train_dreambooth_lora.py's is lanczos)"),
        "pretrained_vae_model_name_or_path": dict(default=None, metavar="DIR", help="a local VAE folder "
                                                  "(AutoencoderKL) to use instead of the model's vae/, e.g. an "
                                                  "fp16-safe SDXL VAE (train_dreambooth_lora_sdxl.py's flag)"),
        "save_as_full_pipeline": dict(action="store_true", help="accepted: the output is the embedding files; "
                                      "dbtrain sample --model OUTPUT_DIR loads them on the base model"),
        "no_safe_serialization": dict(action="store_true", help="accepted: embeddings are always written as "
                                      ".safetensors (plus the A1111 .pt)"),
    }
    return g("--" + name, **specs[name])


# what each diffusers script has that dbtrain's parser defines here (the rest it defines itself)
TRAIN_FLAGS = ("revision", "variant", "tokenizer_name", "num_train_epochs", "scale_lr", "lr_num_cycles", "lr_power",
               "use_8bit_adam", "dataloader_num_workers", "push_to_hub", "hub_token", "hub_model_id", "logging_dir",
               "allow_tf32", "report_to", "prior_generation_precision", "local_rank",
               "enable_xformers_memory_efficient_attention", "set_grads_to_none", "pre_compute_text_embeddings",
               "tokenizer_max_length", "text_encoder_use_attention_mask", "skip_save_text_encoder",
               "validation_images", "class_labels_conditioning", "validation_scheduler",
               # train_dreambooth_lora.py's own
               "validation_epochs", "image_interpolation_mode",
               # train_dreambooth_lora_sdxl.py's
               "pretrained_vae_model_name_or_path")
TI_FLAGS = ("revision", "variant", "tokenizer_name", "num_train_epochs", "lr_num_cycles", "dataloader_num_workers",
            "push_to_hub", "hub_token", "hub_model_id", "logging_dir", "allow_tf32", "report_to", "validation_epochs",
            "local_rank", "enable_xformers_memory_efficient_attention", "save_as_full_pipeline",
            "no_safe_serialization")


def add_flags(g, names) -> None:
    for name in names:
        _spec(g, name)


def add_lora_flags(g) -> None:
    """LoRA (kohya's and train_dreambooth_lora.py's names); the loop decides what they do."""
    g("--lora_rank", "--rank", dest="lora_rank", type=int, default=None,
      help="train LoRA adapters of this rank instead of the full UNet (not given: full fine-tuning; "
           "train_dreambooth_lora.py's default is 4, so add --rank 4 to its command lines that have none)")
    g("--lora_alpha", type=float, default=None, help="LoRA scale numerator: updates are scaled by alpha / rank "
      "(not given: = rank, scale 1)")
    g("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA branch, in [0, 1)")
    g("--lora_conv", action="store_true", help="also adapt the 3x3 resnet convolutions (kohya's conv_dim)")
    g("--lora_conv_rank", type=int, default=None, help="rank of the conv adapters (not given: --lora_rank)")
    g("--save_single_file", action="store_true", help="also write the single-file .safetensors at the end")
    g("--single_file_half", action="store_true", help="write that single file in fp16")


def say(line: str) -> None:
    print(f"dbtrain: note: {line}", file=sys.stderr, flush=True)


def check_lora(cfg, UserError) -> None:
    rank = getattr(cfg, "lora_rank", None)
    if rank is not None and rank < 1:
        raise UserError(f"--lora_rank must be >= 1 (or not given: full fine-tuning), got {rank}")
    given = [n for n in ("lora_alpha", "lora_conv_rank") if getattr(cfg, n, None) is not None]
    given += [n for n in ("lora_dropout", "lora_conv") if getattr(cfg, n, None)]
    if given and rank is None:  # (a train_dreambooth_lora.py line without --rank relied on its default, 4)
        raise UserError(f"--{given[0]} needs --lora_rank (LoRA training; train_dreambooth_lora.py's default "
                        f"rank is 4: add --rank 4)")
    alpha = getattr(cfg, "lora_alpha", None)
    if alpha is not None and (not math.isfinite(alpha) or alpha <= 0):
        raise UserError(f"--lora_alpha must be > 0, got {alpha}")
    drop = getattr(cfg, "lora_dropout", 0.0)
    if not math.isfinite(drop) or not 0 <= drop < 1:
        raise UserError(f"--lora_dropout must be >= 0 and < 1, got {drop}")
    conv = getattr(cfg, "lora_conv_rank", None)
    if conv is not None and conv < 1:
        raise UserError(f"--lora_conv_rank must be >= 1, got {conv}")
    if conv is not None and not getattr(cfg, "lora_conv", False):
        raise UserError("--lora_conv_rank needs --lora_conv (the 3x3 convolutions are adapted only with it)")
    if getattr(cfg, "single_file_half", False) and not getattr(cfg, "save_single_file", False):
        raise UserError("--single_file_half needs --save_single_file")


def check_numbers(cfg, UserError) -> None:
    """Ranges of the flags defined here (no file access)."""
    for name in ("num_train_epochs", "validation_epochs", "tokenizer_max_length"):
        v = getattr(cfg, name, None)
        if v is not None and v < 1:
            raise UserError(f"--{name} must be >= 1, got {v}")
    if getattr(cfg, "lr_num_cycles", 1) < 1:
        raise UserError(f"--lr_num_cycles must be >= 1, got {cfg.lr_num_cycles}")
    power = getattr(cfg, "lr_power", 1.0)
    if not math.isfinite(power) or power <= 0:
        raise UserError(f"--lr_power must be > 0, got {power}")
    if getattr(cfg, "dataloader_num_workers", 0) < 0:
        raise UserError(f"--dataloader_num_workers must be >= 0, got {cfg.dataloader_num_workers}")
    logdir = getattr(cfg, "logging_dir", "logs")
    if not str(logdir).strip():
        raise UserError("--logging_dir must name a folder (default logs, inside output_dir)")


def _check_distributed(cfg, UserError, notes: list) -> None:
    """torchrun / accelerate launch (WORLD_SIZE > 1): data parallel, see trainer.distributed."""
    world = os.environ.get("WORLD_SIZE", "1")
    world = int(world) if world.isdigit() else 1
    if getattr(cfg, "shard", False) and world <= 1 and not hasattr(cfg, "world_size"):
        notes.append("--shard: one process, nothing to split; it splits the optimizer state and gradients over "
                     "the ranks of torchrun --nproc_per_node N")
    if getattr(cfg, "ddp_timeout", 1800) < 1:
        raise UserError(f"--ddp_timeout must be >= 1 second, got {cfg.ddp_timeout}")
    if getattr(cfg, "local_rank", -1) > -1:
        notes.append(f"--local_rank {cfg.local_rank}: ignored, " + (
            "each rank's device comes from torchrun's LOCAL_RANK" if world > 1
            else "dbtrain trains in one process here (choose the GPU with --device cuda:N; several: torchrun)"))


def _upload_hint(cfg) -> str:
    repo = getattr(cfg, "hub_model_id", None) or "<user>/<repo>"
    return f"huggingface-cli upload {repo} {cfg.output_dir}"


def apply(cfg, UserError, command: str = "train") -> list[str]:
    """Map diffusers' flags onto ours (changing cfg), print one note per mapped/ignored flag, return the notes.

    Call once per run, after the range checks.
    """
    notes = []
    if getattr(cfg, "use_8bit_adam", False):
        if cfg.optimizer == "adamw":
            raise UserError("--use_8bit_adam and --optimizer adamw contradict each other; drop one")
        if cfg.optimizer == "adamw8bit":
            notes.append("--use_8bit_adam -> --optimizer adamw8bit (dbkernels' 8-bit AdamW, already the default; "
                         "--optimizer bnb8bit for bitsandbytes')")
    if getattr(cfg, "enable_xformers_memory_efficient_attention", False):
        notes.append("--enable_xformers_memory_efficient_attention -> " + (
            "dbtrain's fused attention kernels (--kernels on)" if cfg.kernels else
            "--kernels off given: PyTorch's attention"))
    if getattr(cfg, "set_grads_to_none", False):
        notes.append("--set_grads_to_none: already so (gradients are set to None after every step)")
    if getattr(cfg, "pre_compute_text_embeddings", False):
        if cfg.train_text_encoder:
            raise UserError("--train_text_encoder cannot be used with --pre_compute_text_embeddings (as in "
                            "diffusers): the prompt embeddings change while the text encoder trains")
        notes.append("--pre_compute_text_embeddings: already so (with a frozen text encoder the prompt embeddings "
                     "are computed once)")
    report = getattr(cfg, "report_to", None)  # (not given: tensorboard when installed, no note)
    wanted = set() if report is None else {"tensorboard", "wandb", "comet_ml"} if report == "all" else {report}
    logs = Path(cfg.output_dir) / getattr(cfg, "logging_dir", "logs")
    if "tensorboard" in wanted and importlib.util.find_spec("tensorboard") is None:
        notes.append(f"--report_to {report}: tensorboard is not installed, so the step log is {logs}/"
                     f"train_log.jsonl only (pip install tensorboard for event files)")
    others = sorted(wanted - {"tensorboard"})
    if others:
        notes.append(f"--report_to {report}: dbtrain does not log to {', '.join(others)}; the step log is {logs}/"
                     f"train_log.jsonl" + (" (TensorBoard event files beside it when tensorboard is installed)"
                                           if report == "all" else ""))
    if getattr(cfg, "push_to_hub", False) or getattr(cfg, "hub_token", None) or getattr(cfg, "hub_model_id", None):
        given = [f"--{n}" for n in ("push_to_hub", "hub_token", "hub_model_id") if getattr(cfg, n, None)]
        notes.append(f"{' / '.join(given)}: nothing is uploaded (dbtrain needs no network); when training is done, "
                     f"run: {_upload_hint(cfg)}")
        cfg.hub_token = None  # never kept: the options are written into checkpoints and the run's marker
    if getattr(cfg, "dataloader_num_workers", 0) > 0:
        notes.append(f"--dataloader_num_workers {cfg.dataloader_num_workers}: ignored, dbtrain has no DataLoader "
                     f"(images are decoded once and their latents cached)")
    _check_distributed(cfg, UserError, notes)
    if getattr(cfg, "revision", None):
        notes.append(f"--revision {cfg.revision}: ignored, {cfg.pretrained_model_name_or_path} is a local folder "
                     f"(it has no revisions); to train on that revision, download it into a folder and pass that")
    if getattr(cfg, "validation_images", None):
        notes.append("--validation_images: not used; Stable Diffusion validation is text-to-image (diffusers' "
                     "script passes them only to image-conditioned pipelines such as DeepFloyd IF's upscaler)")
    if getattr(cfg, "skip_save_text_encoder", False):
        extra = " (the trained text encoder is not saved either, as in diffusers)" if cfg.train_text_encoder else ""
        notes.append("--skip_save_text_encoder: the saved folder has no text_encoder/; load it with the base "
                     f"model's text encoder{extra}")
    if command == "textual-inversion":
        if getattr(cfg, "save_as_full_pipeline", False):
            notes.append("--save_as_full_pipeline: the output is the embedding files; dbtrain sample --model "
                         f"{cfg.output_dir} loads the base model with them (no full copy is written)")
        if getattr(cfg, "no_safe_serialization", False):
            notes.append("--no_safe_serialization: ignored, learned_embeds is always .safetensors (plus the A1111 "
                         ".pt)")
    if getattr(cfg, "scale_lr", False) and command == "train":
        lr = cfg.learning_rate * cfg.gradient_accumulation_steps * cfg.train_batch_size
        notes.append(f"--scale_lr: learning rate {cfg.learning_rate:g} x {cfg.gradient_accumulation_steps} "
                     f"(accumulation) x {cfg.train_batch_size} (batch) x 1 (process) = {lr:g}")
        cfg.learning_rate = lr
        cfg.scale_lr = False  # applied: a resumed or re-checked config must not scale it again
        cfg.scaled_lr = True
    for n in notes:
        say(n)
    return notes


def _count_images(folder) -> int:
    from trainer.options.train import IMAGE_SUFFIXES

    return sum(1 for f in Path(folder).iterdir()
               if not f.name.startswith(".") and f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def steps_per_epoch(cfg, n_instance: int) -> int:
    """diffusers' num_update_steps_per_epoch: ceil(len(dataloader) / accumulation), len(dataloader) =
    ceil(dataset / batch); DreamBooth's dataset is max(instance, class images), Textual Inversion's
    images x repeats."""
    if getattr(cfg, "method", None) == "textual_inversion":
        n = n_instance * getattr(cfg, "repeats", 1)
    else:
        n = max(n_instance, cfg.num_class_images) if cfg.with_prior_preservation else n_instance
    return math.ceil(math.ceil(n / cfg.train_batch_size) / cfg.gradient_accumulation_steps)


def resolve_counts(cfg, UserError) -> None:
    """--num_train_epochs and --validation_epochs in steps (needs the instance folder); idempotent."""
    epochs, vepochs = getattr(cfg, "num_train_epochs", None), getattr(cfg, "validation_epochs", None)
    if cfg.max_train_steps is not None and epochs is not None and not getattr(cfg, "epochs_noted", False):
        cfg.epochs_noted = True
        say(f"--num_train_epochs {epochs}: ignored, --max_train_steps {cfg.max_train_steps} decides (as in "
            f"diffusers: a given --max_train_steps wins; textual_inversion.py's default is 5000)")
    if cfg.max_train_steps is not None and vepochs is None:
        return
    n = _count_images(cfg.instance_data_dir)
    if n == 0:
        return  # trainer.data says what is wrong with the folder
    per = steps_per_epoch(cfg, n)
    if cfg.max_train_steps is None:
        cfg.max_train_steps = epochs * per
        say(f"--num_train_epochs {epochs}: {cfg.max_train_steps} steps ({per} per epoch: {n} instance image(s)"
            + (f", {cfg.num_class_images} class image(s)" if cfg.with_prior_preservation else "")
            + f", batch {cfg.train_batch_size}, accumulation {cfg.gradient_accumulation_steps})")
    if vepochs is not None:
        # Textual Inversion: diffusers multiplies by the dataset's length (images x repeats), not steps per epoch
        every = vepochs * (n * cfg.repeats if getattr(cfg, "method", None) == "textual_inversion" else per)
        cfg.validation_steps = max(1, every)
        cfg.validation_epochs = None  # resolved
        say(f"--validation_epochs {vepochs}: validation every {cfg.validation_steps} steps")


def check_model_extras(cfg, UserError) -> None:
    """--tokenizer_name, --tokenizer_max_length, --class_labels_conditioning and
    --pretrained_vae_model_name_or_path against the model's files."""
    root = Path(cfg.pretrained_model_name_or_path)
    vae = getattr(cfg, "pretrained_vae_model_name_or_path", None)
    if vae and not (Path(vae) / "config.json").is_file():
        raise UserError(f"--pretrained_vae_model_name_or_path {vae}: not a local VAE folder (config.json + weights "
                        f"of an AutoencoderKL); nothing is downloaded")
    tok = getattr(cfg, "tokenizer_name", None)
    if tok:
        t = Path(tok)
        if not t.is_dir() or not ((t / "vocab.json").is_file() or (t / "tokenizer.json").is_file()):
            raise UserError(f"--tokenizer_name {tok}: not a local tokenizer folder (vocab.json + merges.txt); "
                            f"nothing is downloaded")
    max_len = getattr(cfg, "tokenizer_max_length", None)
    if max_len is not None:
        try:
            te = json.loads((root / "text_encoder" / "config.json").read_text())
        except (OSError, ValueError):
            te = {}
        limit = te.get("max_position_embeddings")
        if limit and max_len > limit:
            raise UserError(f"--tokenizer_max_length {max_len} is more than the text encoder's "
                            f"{limit} positions")
    if getattr(cfg, "class_labels_conditioning", None) == "timesteps" and not getattr(cfg, "class_labels_noted", 0):
        try:
            unet = json.loads((root / "unet" / "config.json").read_text())
        except (OSError, ValueError):
            unet = {}
        cfg.class_labels_noted = True
        if unet.get("class_embed_type") is None and unet.get("num_class_embeds") is None:
            say("--class_labels_conditioning timesteps: this UNet has no class embedding, so the timesteps it "
                "gets as class_labels change nothing (as in diffusers)")
