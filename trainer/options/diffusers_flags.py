"""diffusers' example-script flags that dbtrain does its own way, or cannot do here.

A command line copied from examples/dreambooth/train_dreambooth.py, train_dreambooth_lora.py or
textual_inversion.py runs unchanged: `apply` maps each such flag onto ours and says so in one
`dbtrain: note:` line at start (never silently). `resolve_counts` does the parts that need the
image count (--num_train_epochs, --validation_epochs) once the folders are known, and
`check_model_extras` the parts that need the model's config files. No torch here.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

from trainer.errors import UserError
from trainer.options import concepts
from trainer.options.checks import DEFAULT_STEPS, count_images

def say(line: str) -> None:
    """One `dbtrain: note:` line on stderr."""
    print(f"dbtrain: note: {line}", file=sys.stderr, flush=True)


def apply(opts, command: str = "train", *, simulated_ranks: bool = False) -> list[str]:
    """Map diffusers' flags onto ours (changing opts), print one note per mapped/ignored flag, return the notes.

    Call once per run, after the range checks. simulated_ranks: `dbtrain estimate --world_size N` (no torchrun)."""
    notes = []
    optim, memory, log, ckpt = opts.optim, opts.memory, opts.logging, opts.checkpoints
    if optim.use_8bit_adam:
        if optim.optimizer == "adamw":
            raise UserError("--use_8bit_adam and --optimizer adamw contradict each other; drop one")
        if optim.optimizer == "adamw8bit":
            notes.append("--use_8bit_adam -> --optimizer adamw8bit (dbkernels' 8-bit AdamW, already the default; "
                         "--optimizer bnb8bit for bitsandbytes')")
    if memory.enable_xformers_memory_efficient_attention:
        notes.append("--enable_xformers_memory_efficient_attention -> " + (
            "dbtrain's fused attention kernels (--kernels on)" if opts.training.kernels else
            "--kernels off given: PyTorch's attention"))
    if memory.set_grads_to_none:
        notes.append("--set_grads_to_none: already so (gradients are set to None after every step)")
    if memory.pre_compute_text_embeddings:
        if opts.training.train_text_encoder:
            raise UserError("--train_text_encoder cannot be used with --pre_compute_text_embeddings (as in "
                            "diffusers): the prompt embeddings change while the text encoder trains")
        notes.append("--pre_compute_text_embeddings: already so (with a frozen text encoder the prompt embeddings "
                     "are computed once)")
    report = log.report_to  # (not given: tensorboard when installed, no note)
    wanted = set() if report is None else {"tensorboard", "wandb", "comet_ml"} if report == "all" else {report}
    logs = Path(ckpt.output_dir) / log.logging_dir
    if "tensorboard" in wanted and importlib.util.find_spec("tensorboard") is None:
        notes.append(f"--report_to {report}: tensorboard is not installed, so the step log is {logs}/"
                     f"train_log.jsonl only (pip install tensorboard for event files)")
    others = sorted(wanted - {"tensorboard"})
    if others:
        notes.append(f"--report_to {report}: dbtrain does not log to {', '.join(others)}; the step log is {logs}/"
                     f"train_log.jsonl" + (" (TensorBoard event files beside it when tensorboard is installed)"
                                           if report == "all" else ""))
    hub = {"push_to_hub": log.push_to_hub, "hub_token": log.hub_token, "hub_model_id": log.hub_model_id}
    if any(hub.values()):
        given = [f"--{n}" for n, v in hub.items() if v]
        repo = log.hub_model_id or "<user>/<repo>"
        notes.append(f"{' / '.join(given)}: nothing is uploaded (dbtrain needs no network); when training is done, "
                     f"run: huggingface-cli upload {repo} {ckpt.output_dir}")
        log.hub_token = None  # never kept: the options are written into checkpoints and the run's marker
    if opts.data.dataloader_num_workers > 0:
        notes.append(f"--dataloader_num_workers {opts.data.dataloader_num_workers}: ignored, dbtrain has no "
                     f"DataLoader (images are decoded once and their latents cached)")
    _distributed(opts, notes, simulated_ranks)
    if opts.model.revision:
        notes.append(f"--revision {opts.model.revision}: ignored, {opts.model.pretrained_model_name_or_path} is a "
                     f"local folder (it has no revisions); to train on that revision, download it into a folder and "
                     f"pass that")
    if log.validation_images:
        notes.append("--validation_images: not used; Stable Diffusion validation is text-to-image (diffusers' "
                     "script passes them only to image-conditioned pipelines such as DeepFloyd IF's upscaler)")
    if ckpt.skip_save_text_encoder:
        extra = (" (the trained text encoder is not saved either, as in diffusers)"
                 if opts.training.train_text_encoder else "")
        notes.append("--skip_save_text_encoder: the saved folder has no text_encoder/; load it with the base "
                     f"model's text encoder{extra}")
    if command == "textual-inversion":
        if ckpt.save_as_full_pipeline:
            notes.append("--save_as_full_pipeline: the output is the embedding files; dbtrain sample --model "
                         f"{ckpt.output_dir} loads the base model with them (no full copy is written)")
        if ckpt.no_safe_serialization:
            notes.append("--no_safe_serialization: ignored, learned_embeds is always .safetensors (plus the A1111 "
                         ".pt)")
    if optim.scale_lr and command == "train":
        batch, accumulation = opts.training.train_batch_size, opts.training.gradient_accumulation_steps
        lr = optim.learning_rate * accumulation * batch
        notes.append(f"--scale_lr: learning rate {optim.learning_rate:g} x {accumulation} (accumulation) x {batch} "
                     f"(batch) x 1 (process) = {lr:g}")
        optim.learning_rate = lr
        optim.scale_lr = False  # applied: a resumed or re-checked run must not scale it again
    steps, epochs = opts.training.max_train_steps, opts.training.num_train_epochs
    if steps is not None and epochs is not None:
        notes.append(f"--num_train_epochs {epochs}: ignored, --max_train_steps {steps} decides (as in diffusers: a "
                     f"given --max_train_steps wins; textual_inversion.py's default is 5000)")
    for n in notes:
        say(n)
    return notes


def given_flags(parser, argv: list[str]) -> set[str]:
    """The dests the command line (or its --config file) set explicitly: those keep their value whatever
    --diffusers_defaults says."""
    import argparse
    import copy

    from_file = set(parser._defaults)  # (spec.config_file_defaults puts the file's keys here)
    bare = copy.deepcopy(parser)
    bare._defaults = {}
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return from_file | set(vars(bare.parse_known_args(argv)[0]))


def script_of(opts, command: str) -> str:
    """The diffusers example script this run stands for."""
    if command == "textual-inversion":
        return "textual_inversion.py"
    return "train_dreambooth_lora.py" if opts.lora.lora_rank is not None else "train_dreambooth.py"


def _differences(opts, script: str, given: set) -> list[tuple[object, str, object, str]]:
    """(options object or None when no flag of ours gives theirs, field, their value, how the note says it) for
    each default of ours that differs from `script`'s and that the command line left alone."""
    data, optim, training, log = opts.data, opts.optim, opts.training, opts.logging
    out = []

    def differ(obj, dest, ours, theirs, said=None):
        if dest not in given and ours != theirs:
            out.append((obj, dest, theirs, said or f"--{dest} {ours:g} (theirs: {theirs:g}, --{dest} {theirs:g})"
                        if isinstance(theirs, float) else said or f"--{dest} {ours} (theirs: {theirs}, --{dest} "
                        f"{theirs})"))

    resize = data.image_interpolation_mode or "bilinear"
    if script == "textual_inversion.py":  # (TI_DEFAULTS already has its batch, steps, lr, warm-up, optimizer)
        differ(data, "random_flip", data.random_flip, True, "no flip (theirs: random flip p=0.5, --random_flip)")
        differ(data, "image_interpolation_mode", resize, "bicubic",
               f"resize {resize} (theirs: bicubic, --image_interpolation_mode bicubic)")
        crop = "centre" if data.center_crop else "random"
        theirs = "its centre square" if data.center_crop else "the whole image"
        differ(data, "image_fit", data.image_fit, "squash", f"resize to cover, then a {crop} square crop (theirs: "
               f"{theirs} resized to the square, --image_fit squash)")
    else:
        if not optim.use_8bit_adam:  # their --use_8bit_adam is an 8-bit AdamW too
            differ(optim, "optimizer", optim.optimizer, "adamw")
        differ(training, "train_batch_size", training.train_batch_size, 4)
        differ(optim, "lr_warmup_steps", optim.lr_warmup_steps, 500)
        if training.max_train_steps is None and training.num_train_epochs is None:
            differ(training, "num_train_epochs", None, 1, f"{DEFAULT_STEPS} steps (theirs: 1 epoch, "
                                                          "--num_train_epochs 1)")
        if script == "train_dreambooth_lora.py":
            differ(optim, "learning_rate", optim.learning_rate, 5e-4)
            differ(data, "image_interpolation_mode", resize, "lanczos",
                   f"resize {resize} (theirs: lanczos, --image_interpolation_mode lanczos)")
            differ(opts.checkpoints, "output_dir", opts.checkpoints.output_dir, "lora-dreambooth-model")
            if log.validation_prompt and "validation_steps" not in given:
                differ(log, "validation_epochs", log.validation_epochs, 50, f"validation every "
                       f"{log.validation_steps} steps (theirs: every 50 epochs, --validation_epochs 50)")
    if log.validation_prompt:  # (all three validate with DPMSolverMultistep unless told otherwise)
        ours = log.validation_scheduler or "the model's own"
        differ(log, "validation_scheduler", ours, "DPMSolverMultistepScheduler",
               f"validation sampler {ours} (theirs: DPMSolverMultistepScheduler, --validation_scheduler "
               f"DPMSolverMultistepScheduler)")
    return out


def their_defaults(opts, command: str, given: set) -> str | None:
    """The one note line on the defaults of ours that differ from diffusers' script of this method (None: none
    differ); with --diffusers_defaults, theirs are set first (never over a flag the user gave). Call before
    the checks (the step count is filled in there)."""
    script = script_of(opts, command)
    found = _differences(opts, script, given)
    if not found:
        return None
    if not opts.training.diffusers_defaults:
        return (f"where diffusers' {script} differs: " + ", ".join(said for *_, said in found)
                + "; --diffusers_defaults takes all of theirs")
    taken, left = [], []
    for obj, dest, theirs, said in found:
        if obj is None:
            left.append(said)
            continue
        setattr(obj, dest, theirs)
        taken.append(f"--{dest}" if theirs is True else f"--{dest} {theirs:g}" if isinstance(theirs, float)
                     else f"--{dest} {theirs}")
    return (f"using diffusers' {script} defaults: {', '.join(taken)}"
            + (f"; still differs: {', '.join(left)}" if left else ""))


def _distributed(opts, notes: list, simulated_ranks: bool) -> None:
    """torchrun / accelerate launch (WORLD_SIZE > 1): data parallel, see trainer.distributed.data_parallel."""
    world = os.environ.get("WORLD_SIZE", "1")
    world = int(world) if world.isdigit() else 1
    dist = opts.distributed
    if dist.shard and world <= 1 and not simulated_ranks:
        notes.append("--shard: one process, nothing to split; it splits the optimizer state and gradients over "
                     "the ranks of torchrun --nproc_per_node N")
    if dist.ddp_timeout < 1:
        raise UserError(f"--ddp_timeout must be >= 1 second, got {dist.ddp_timeout}")
    if dist.local_rank > -1:
        notes.append(f"--local_rank {dist.local_rank}: ignored, " + (
            "each rank's device comes from torchrun's LOCAL_RANK" if world > 1
            else "dbtrain trains in one process here (choose the GPU with --device cuda:N; several: torchrun)"))


def steps_per_epoch(opts, n_instance: int) -> int:
    """diffusers' num_update_steps_per_epoch: ceil(len(dataloader) / accumulation), len(dataloader) =
    ceil(dataset / batch); DreamBooth's dataset is max(instance, class images), Textual Inversion's
    images x repeats."""
    if opts.method == "textual_inversion":
        n = n_instance * opts.data.repeats
    elif opts.prior.with_prior_preservation:
        n = max(n_instance, class_images_of(opts))
    else:
        n = n_instance
    return math.ceil(math.ceil(n / opts.training.train_batch_size) / opts.training.gradient_accumulation_steps)


def class_images_of(opts) -> int:
    """--num_class_images; with --concepts, every concept's class images."""
    return concepts.class_count(opts) if opts.data.concepts else opts.prior.num_class_images


def resolve_counts(opts) -> None:
    """--num_train_epochs and --validation_epochs in steps (needs the instance folder); idempotent."""
    training, log = opts.training, opts.logging
    epochs, vepochs = training.num_train_epochs, log.validation_epochs
    if training.max_train_steps is not None and vepochs is None:
        return
    # --concepts: each concept's images x its repeats
    n = concepts.instance_count(opts) if opts.data.concepts else count_images(opts.data.instance_data_dir)
    if n == 0:
        return  # trainer.core.images says what is wrong with the folder
    per = steps_per_epoch(opts, n)
    if training.max_train_steps is None:
        training.max_train_steps = epochs * per
        say(f"--num_train_epochs {epochs}: {training.max_train_steps} steps ({per} per epoch: {n} instance image(s)"
            + (f", {class_images_of(opts)} class image(s)" if opts.prior.with_prior_preservation else "")
            + f", batch {training.train_batch_size}, accumulation {training.gradient_accumulation_steps})")
    if vepochs is not None:
        # Textual Inversion: diffusers multiplies by the dataset's length (images x repeats), not steps per epoch
        every = vepochs * (n * opts.data.repeats if opts.method == "textual_inversion" else per)
        log.validation_steps = max(1, every)
        log.validation_epochs = None  # resolved
        say(f"--validation_epochs {vepochs}: validation every {log.validation_steps} steps")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_model_extras(opts) -> None:
    """--tokenizer_name, --tokenizer_max_length, --class_labels_conditioning and
    --pretrained_vae_model_name_or_path against the model's files."""
    model, data = opts.model, opts.data
    root = Path(model.pretrained_model_name_or_path)
    vae = model.pretrained_vae_model_name_or_path
    if vae and not (Path(vae) / "config.json").is_file():
        raise UserError(f"--pretrained_vae_model_name_or_path {vae}: not a local VAE folder (config.json + weights "
                        f"of an AutoencoderKL); nothing is downloaded")
    tok = model.tokenizer_name
    if tok:
        t = Path(tok)
        if not t.is_dir() or not ((t / "vocab.json").is_file() or (t / "tokenizer.json").is_file()):
            raise UserError(f"--tokenizer_name {tok}: not a local tokenizer folder (vocab.json + merges.txt); "
                            f"nothing is downloaded")
    if data.tokenizer_max_length is not None:
        limit = _read_json(root / "text_encoder" / "config.json").get("max_position_embeddings")
        if limit and data.tokenizer_max_length > limit:
            raise UserError(f"--tokenizer_max_length {data.tokenizer_max_length} is more than the text encoder's "
                            f"{limit} positions")
    if opts.training.class_labels_conditioning == "timesteps":
        unet = _read_json(root / "unet" / "config.json")
        if unet.get("class_embed_type") is None and unet.get("num_class_embeds") is None:
            say("--class_labels_conditioning timesteps: this UNet has no class embedding, so the timesteps it "
                "gets as class_labels change nothing (as in diffusers)")
