"""The checks of a training run's options before anything loads: ranges, required flags, combinations.

Each bad option is a one-line UserError naming the flag. Run once, right after parsing; besides
refusing, `check` fills in two defaults that depend on other flags (the step count, and
--offset_noise given as a switch in a --config file). Where the instance folder exists, two checks
look at files too: the class folder must be a folder of its own, and the prompts (the instance prompt
and caption files) must name the subject ([V] or its word). No torch here.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

from trainer.errors import UserError

DEFAULT_STEPS = 800  # --max_train_steps when neither it nor --num_train_epochs is given
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # what trainer.core.images reads


def count_images(folder) -> int:
    """Image files in `folder` as trainer.core.images.list_images finds them (not hidden, by suffix), without
    opening any; 0 for a folder that does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return sum(1 for f in folder.iterdir()
               if not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())


def check(opts) -> None:
    """UserError for the first bad option of a TrainOptions (no file access)."""
    data, prior, training, optim = opts.data, opts.prior, opts.training, opts.optim
    required = [("pretrained_model_name_or_path", opts.model.pretrained_model_name_or_path)]
    if not data.concepts:  # (a concepts file names each subject's folder and prompts instead)
        required += [("instance_data_dir", data.instance_data_dir), ("instance_prompt", data.instance_prompt)]
    for name, value in required:
        if not value:
            raise UserError(f"--{name} is required")
    ext = data.caption_extension
    if ext is not None and (not str(ext).strip(".").strip() or "/" in str(ext) or str(ext).strip().lower().lstrip(".")
                            in {s.lstrip(".") for s in IMAGE_SUFFIXES}):
        raise UserError(f"--caption_extension must be a file suffix such as .txt or .caption, got {ext!r}")
    if data.resolution <= 0 or data.resolution % 8:
        raise UserError(f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), "
                        f"got {data.resolution}")
    if prior.with_prior_preservation and not data.concepts:  # (a concepts file: each concept's own, checked there)
        if not prior.class_prompt:
            raise UserError("--with_prior_preservation needs --class_prompt (e.g. \"a photo of dog\")")
        if not prior.class_data_dir:
            raise UserError("--with_prior_preservation needs --class_data_dir (class images are generated "
                            "there if it holds fewer than --num_class_images)")
        if prior.num_class_images < 1:
            raise UserError(f"--num_class_images must be >= 1, got {prior.num_class_images}")
    if isinstance(training.offset_noise, bool):  # `offset_noise = true` in a --config file: diffusers' switch, 0.1
        training.offset_noise = 0.1 if training.offset_noise else 0.0
    if training.max_train_steps is None and training.num_train_epochs is None:
        training.max_train_steps = DEFAULT_STEPS
    _at_least(1, train_batch_size=training.train_batch_size,
              gradient_accumulation_steps=training.gradient_accumulation_steps,
              checkpointing_steps=opts.checkpoints.checkpointing_steps, sample_batch_size=prior.sample_batch_size,
              log_every=training.log_every, validation_steps=opts.logging.validation_steps,
              num_validation_images=opts.logging.num_validation_images,
              class_inference_steps=prior.class_inference_steps)
    if training.max_train_steps is not None and training.max_train_steps < 1:
        raise UserError(f"--max_train_steps must be >= 1, got {training.max_train_steps}")
    _diffusers_numbers(opts)
    _lora(opts)
    for name, value in (("num_class_images", prior.num_class_images), ("lr_warmup_steps", optim.lr_warmup_steps),
                        ("seed", training.seed)):
        if value < 0:
            raise UserError(f"--{name} must be >= 0, got {value}")
    limit = opts.checkpoints.checkpoints_total_limit
    if limit is not None and limit < 1:
        raise UserError(f"--checkpoints_total_limit must be >= 1 (or not given: keep all), got {limit}")
    _ranges(opts)
    if not str(data.identifier).strip() or len(str(data.identifier).split()) != 1:
        raise UserError(f"--identifier must be one word (or auto), got {data.identifier!r}")
    if opts.memory.step_in_backward:
        if optim.optimizer not in ("adamw8bit", "adamw4bit"):
            raise UserError("--step_in_backward needs --optimizer adamw8bit or adamw4bit")
        if training.gradient_accumulation_steps > 1:
            raise UserError("--step_in_backward cannot accumulate gradients (each is applied and freed in "
                            "backward); use --gradient_accumulation_steps 1")
        if opts.memory.mixed_precision == "fp16":
            raise UserError("--step_in_backward cannot unscale fp16 gradients; use --mixed_precision bf16 or no")
    _embedding(opts)
    device = opts.distributed.device
    if device is not None and str(device).split(":")[0] not in ("cuda", "cpu"):
        raise UserError(f"--device must be cuda, cuda:N or cpu, got {device!r}")
    _features(opts)
    if not data.concepts:  # (--concepts: trainer.options.concepts.check runs these for each concept, after this)
        _class_folder(opts)
        _prompts_name_the_subject(opts)


def _at_least(low: int, **values) -> None:
    for name, value in values.items():
        if value < low:
            raise UserError(f"--{name} must be >= {low}, got {value}")


def _given(section, *names: str) -> list[str]:
    """Those of the fields `names` of an options dataclass that differ from their defaults (were given)."""
    defaults = {f.name: f.default for f in dataclasses.fields(section)}
    return [n for n in names if getattr(section, n) != defaults[n]]


def _features(opts) -> None:
    """Masks, buckets, caption dropout and shuffling, robust losses, EMA."""
    from trainer.options import buckets

    data, training, ema = opts.data, opts.training, opts.ema
    if data.mask_dir:
        data.masked_loss = True  # (a mask folder says what is meant)
        if not Path(data.mask_dir).is_dir():
            raise UserError(f"--mask_dir {data.mask_dir} is not a folder (it holds one mask image per instance image, "
                            f"with the same file name)")
    for name, v, hi_ok in (("mask_min", data.mask_min, False), ("caption_dropout", data.caption_dropout, True)):
        if not math.isfinite(v) or v < 0 or v > 1 or (v == 1 and not hi_ok):
            raise UserError(f"--{name} must be >= 0 and {'<=' if hi_ok else '<'} 1, got {v}")
    mask_given = _given(data, "mask_min", "mask_normalization")
    if mask_given and not data.masked_loss and not data.concepts:  # (a concept's mask_dir: checked with the file)
        raise UserError(f"--{mask_given[0]} shapes --masked_loss's weights; add --masked_loss (or --mask_dir)")
    if data.bucket_reso_steps < buckets.SIDE_MULTIPLE or data.bucket_reso_steps % buckets.SIDE_MULTIPLE:
        raise UserError(f"--bucket_reso_steps must be a positive multiple of {buckets.SIDE_MULTIPLE}, got "
                        f"{data.bucket_reso_steps}")
    if data.enable_bucket and data.aspect_ratio_buckets and str(data.aspect_ratio_buckets).strip().lower() != "auto":
        raise UserError("--enable_bucket means --aspect_ratio_buckets auto; give one of them")
    spec = data.aspect_ratio_buckets or ("auto" if data.enable_bucket else None)
    automatic = spec is not None and str(spec).strip().lower() == "auto"
    if _given(data, "bucket_reso_steps") and not automatic:
        raise UserError("--bucket_reso_steps sets the sides of automatic buckets; add --aspect_ratio_buckets auto "
                        "(a bucket list gives its own sides)")
    if automatic and data.bucket_reso_steps > data.resolution:
        raise UserError(f"--bucket_reso_steps {data.bucket_reso_steps} is more than --resolution {data.resolution}: "
                        f"no bucket side fits; use e.g. --bucket_reso_steps {max(8, data.resolution // 8 // 8 * 8)}")
    if spec and data.image_fit == "squash":
        raise UserError("--image_fit squash resizes every image to the --resolution square; buckets keep each "
                        "image's shape instead: drop one of them")
    buckets.buckets_of(data)  # (a list that does not parse: its one line)
    if data.keep_tokens < 0:
        raise UserError(f"--keep_tokens must be >= 0, got {data.keep_tokens}")
    if data.keep_tokens and not data.shuffle_caption:
        raise UserError("--keep_tokens keeps the first N parts in front when --shuffle_caption shuffles the rest; "
                        "add --shuffle_caption")
    robust = _given(training, "huber_c", "huber_schedule")
    if robust and training.loss_type == "l2":
        raise UserError(f"--{robust[0]} applies to --loss_type huber or smooth_l1, not l2")
    if not math.isfinite(training.huber_c) or training.huber_c <= 0:
        raise UserError(f"--huber_c must be > 0, got {training.huber_c}")
    if training.huber_schedule == "exponential" and training.huber_c > 1:
        raise UserError(f"--huber_schedule exponential decays c from 1 to --huber_c, which must be <= 1, got "
                        f"{training.huber_c}")
    if not math.isfinite(ema.ema_decay) or not 0 < ema.ema_decay < 1:
        raise UserError(f"--ema_decay must be > 0 and < 1 (0.9999 is diffusers'), got {ema.ema_decay}")
    given = _given(ema, "save_raw_weights", "ema_device", "ema_decay", "ema_dtype")
    if given and not ema.use_ema:
        raise UserError(f"--{given[0]} needs --use_ema")


def _embedding(opts) -> None:
    emb = opts.embedding
    if emb.text_embedding_lr is not None and not emb.train_text_embedding:
        raise UserError("--text_embedding_lr is the learning rate of --train_text_embedding's new token rows; add "
                        "--train_text_embedding, or leave it out")
    if not emb.train_text_embedding:
        return
    if opts.training.train_text_encoder and opts.trains_unet:
        raise UserError("--train_text_embedding trains new token rows of a frozen text encoder; it cannot be "
                        "combined with --train_text_encoder")
    if opts.lora.lora_rank is not None:
        raise UserError("--train_text_embedding cannot be combined with --lora_rank yet; train the LoRA with "
                        "--train_text_encoder, or the embedding without --lora_rank")
    if not math.isfinite(emb.text_embedding_frac) or not 0 < emb.text_embedding_frac <= 1:
        raise UserError(f"--text_embedding_frac must be > 0 and <= 1, got {emb.text_embedding_frac}")
    if emb.num_vectors < 1:
        raise UserError(f"--num_vectors must be >= 1, got {emb.num_vectors}")
    for name, v in (("placeholder_token", emb.placeholder_token), ("initializer_token", emb.initializer_token)):
        if v is not None and (not str(v).strip() or len(str(v).split()) != 1):
            raise UserError(f"--{name} must be one word without spaces, got {v!r}")


def _lora(opts) -> None:
    lo = opts.lora
    if lo.lora_rank is not None and lo.lora_rank < 1:
        raise UserError(f"--lora_rank must be >= 1 (or not given: full fine-tuning), got {lo.lora_rank}")
    given = [n for n, v in (("lora_alpha", lo.lora_alpha), ("lora_conv_rank", lo.lora_conv_rank)) if v is not None]
    given += [n for n, v in (("lora_dropout", lo.lora_dropout), ("lora_conv", lo.lora_conv)) if v]
    if given and lo.lora_rank is None:  # (a train_dreambooth_lora.py line without --rank relied on its default, 4)
        raise UserError(f"--{given[0]} needs --lora_rank (LoRA training; train_dreambooth_lora.py's default "
                        f"rank is 4: add --rank 4)")
    if lo.lora_alpha is not None and (not math.isfinite(lo.lora_alpha) or lo.lora_alpha <= 0):
        raise UserError(f"--lora_alpha must be > 0, got {lo.lora_alpha}")
    if not math.isfinite(lo.lora_dropout) or not 0 <= lo.lora_dropout < 1:
        raise UserError(f"--lora_dropout must be >= 0 and < 1, got {lo.lora_dropout}")
    if lo.lora_conv_rank is not None and lo.lora_conv_rank < 1:
        raise UserError(f"--lora_conv_rank must be >= 1, got {lo.lora_conv_rank}")
    if lo.lora_conv_rank is not None and not lo.lora_conv:
        raise UserError("--lora_conv_rank needs --lora_conv (the 3x3 convolutions are adapted only with it)")
    if opts.checkpoints.single_file_half and not opts.checkpoints.save_single_file:
        raise UserError("--single_file_half needs --save_single_file")


def _diffusers_numbers(opts) -> None:
    """Ranges of diffusers' flags that dbtrain maps or notes."""
    for name, v in (("num_train_epochs", opts.training.num_train_epochs),
                    ("validation_epochs", opts.logging.validation_epochs),
                    ("tokenizer_max_length", opts.data.tokenizer_max_length)):
        if v is not None and v < 1:
            raise UserError(f"--{name} must be >= 1, got {v}")
    if opts.optim.lr_num_cycles < 1:
        raise UserError(f"--lr_num_cycles must be >= 1, got {opts.optim.lr_num_cycles}")
    power = opts.optim.lr_power
    if not math.isfinite(power) or power <= 0:
        raise UserError(f"--lr_power must be > 0, got {power}")
    if opts.data.dataloader_num_workers < 0:
        raise UserError(f"--dataloader_num_workers must be >= 0, got {opts.data.dataloader_num_workers}")
    if not str(opts.logging.logging_dir).strip():
        raise UserError("--logging_dir must name a folder (default logs, inside output_dir)")


def _ranges(opts) -> None:
    """Every one finite, within (lowest, lowest allowed?, highest or None, highest allowed?)."""
    optim = opts.optim
    for name, v, lo, lo_ok, hi, hi_ok in (
            ("learning_rate", optim.learning_rate, 0, True, None, False),
            ("prior_loss_weight", opts.prior.prior_loss_weight, 0, True, None, False),
            ("adam_beta1", optim.adam_beta1, 0, True, 1, False), ("adam_beta2", optim.adam_beta2, 0, True, 1, False),
            ("adam_weight_decay", optim.adam_weight_decay, 0, True, None, False),
            ("adam_epsilon", optim.adam_epsilon, 0, False, None, False),
            ("max_grad_norm", opts.training.max_grad_norm, 0, True, None, False),
            ("offset_noise", opts.training.offset_noise, 0, True, None, False),
            ("snr_gamma", opts.training.snr_gamma, 0, False, None, False),
            ("text_embedding_lr", opts.embedding.text_embedding_lr, 0, False, None, False)):
        if v is None:
            continue
        if not math.isfinite(v):
            raise UserError(f"--{name} must be a finite number, got {v}")
        if v < lo or (v == lo and not lo_ok) or (hi is not None and (v > hi or (v == hi and not hi_ok))):
            rng = f"{'>=' if lo_ok else '>'} {lo}" + (f" and {'<=' if hi_ok else '<'} {hi}" if hi is not None else "")
            raise UserError(f"--{name} must be {rng}, got {v}")


def _class_folder(opts) -> None:
    """--class_data_dir must not be, hold or sit inside --instance_data_dir (symlinks resolved): class images
    are counted from and generated into it, and would mix with the subject's photos."""
    inst, cls = opts.data.instance_data_dir, opts.prior.class_data_dir
    if not (opts.prior.with_prior_preservation and cls and Path(inst).is_dir()):
        return
    i, c = Path(os.path.realpath(inst)), Path(os.path.realpath(cls))
    how = ("is the same folder as" if i == c else "is inside" if i in c.parents else
           "holds" if c in i.parents else None)
    if how is None:
        return
    raise UserError(f"--class_data_dir {cls} {how} --instance_data_dir {inst}: class images are read from and "
                    f"generated into it, so they would mix with the subject's photos; give the class images a folder "
                    f"of its own, e.g. --class_data_dir {i.parent / (i.name + '-class')}")


def subject_markers(opts) -> tuple[str, ...]:
    """What an instance prompt may name the subject with: [V], and the word [V] stands for where that is known
    before the model loads (the identifier; with new tokens the placeholder, as the identifier stays a word)."""
    data, emb = opts.data, opts.embedding
    word = None if data.identifier == "auto" else data.identifier
    if emb.train_text_embedding:  # pivotal tuning / Textual Inversion: [V] becomes the new token(s)
        word = emb.placeholder_token or (f"<{word}>" if word else None)
    return ("[V]", word) if word else ("[V]",)


def names_subject(text: str, markers) -> bool:
    """Whether `text` holds one of `markers` as a word of its own ("sks," yes, "asks" no)."""
    return any(m in text if m == "[V]" else re.search(rf"(?<![\w<>-]){re.escape(m)}(?![\w<>-])", text)
               for m in markers)


def _subject_word(opts) -> str:
    """How a message names what [V] becomes."""
    markers = subject_markers(opts)
    if opts.method == "textual_inversion":
        return f"the placeholder {markers[-1]}"
    if opts.embedding.train_text_embedding:
        return f"--train_text_embedding's new token(s){' ' + markers[-1] if len(markers) > 1 else ''}"
    if len(markers) == 1:
        return "the identifier that --identifier auto picks later"
    return f"the identifier {markers[-1]}"


def _prompts_name_the_subject(opts) -> None:
    """The instance prompt and each caption file must name the subject ([V] or its word), unless
    --prompt_without_identifier says it is on purpose (the run prints a note then)."""
    data = opts.data
    if data.prompt_without_identifier:
        return
    markers, fix = subject_markers(opts), "add --prompt_without_identifier to train on it as written"
    prompt = data.instance_prompt
    if prompt and not names_subject(prompt, markers):
        has = f"names neither [V] nor {markers[1]}" if len(markers) > 1 else "has no [V]"
        raise UserError(f"--instance_prompt {prompt!r} {has}: write [V] where {_subject_word(opts)} goes, e.g. "
                        f"\"a photo of [V] dog\", or {fix}")
    folder = Path(data.instance_data_dir or "")
    if not data.caption_extension or not folder.is_dir():
        return
    ext = str(data.caption_extension).strip()
    ext = ext if ext.startswith(".") else "." + ext
    bad = []
    for image in sorted(folder.iterdir()):
        caption = image.with_name(image.stem + ext)
        if image.name.startswith(".") or image.suffix.lower() not in IMAGE_SUFFIXES or not caption.is_file():
            continue
        try:  # (unreadable ones are named when the run reads them)
            line = next((x.strip() for x in caption.read_text(encoding="utf-8-sig").splitlines() if x.strip()), None)
        except (OSError, UnicodeDecodeError):
            continue
        if line is not None and not names_subject(line, markers):
            bad.append((caption, line))
    if bad:
        (first, line), more = bad[0], (f" ({len(bad) - 1} more caption file(s) like it)" if len(bad) > 1 else "")
        raise UserError(f"caption file {first} ({line!r}) has no [V]: write [V] where {_subject_word(opts)} goes"
                        f"{more}, or {fix}")
