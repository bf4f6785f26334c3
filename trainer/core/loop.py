"""The DreamBooth training loop, top to bottom.

Every random draw of a step (which images, crops, flips, VAE samples, noise,
timesteps) comes from generators seeded by (seed, step, micro-step), so a run resumed
from a checkpoint continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import contextlib
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import dbkernels

from trainer.core import checkpoint, images as data, inputs, interrupts, runlog
from trainer.options import train as config
from trainer.distributed import data_parallel as distributed, shard
from trainer.methods import embeddings, lora
from trainer.formats import outdir
from trainer.families import sdxl
from trainer.core.batches import Batches, step_seed
from trainer.core.checkpoint import prepare_output_dir, resume_run
from trainer.errors import Resumable, UserError
from trainer.core.images import ImageSet, list_images
from trainer.core.export import export, export_embedding, export_single_file
from trainer.families.sd import load_components, pick_identifier
from trainer.core.class_images import generate_class_images

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
# fp16 autocast against fp32 training steps on this repository's 2-core CPU, built-in model at 64 px
# (README, "Training"): CPUs have no fast fp16 matmuls, bf16 has them.
# Median over 3-5 interleaved rounds of 10 steps: 2.0x, 2.2x and 2.6x; bf16 0.8-0.9x of fp32's time.
FP16_CPU_NOTE = ("note: --mixed_precision fp16 on a CPU runs about {x} slower than fp32 (measured on a 2-core "
                 "CPU: CPUs have no fast fp16 math); use --mixed_precision bf16 or no")
FP16_CPU_FACTOR = "2-3x"


def _fake(t) -> bool:
    """trainer.estimate runs the step on fake tensors (shapes, no values): value checks are skipped there."""
    return isinstance(t, torch._subclasses.FakeTensor)


def make_optimizer(cfg, params):
    """params: a list of tensors, or of param groups (dicts; a group's own "lr" overrides --learning_rate)."""
    kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
              eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw8bit":
        from dbkernels.optim import AdamW8bit

        return AdamW8bit(params, **kw)
    if cfg.optimizer == "bnb8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise UserError("--optimizer bnb8bit needs bitsandbytes (pip install bitsandbytes)") from e
        return bnb.optim.AdamW8bit(params, **kw)
    flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    fused = all(p.is_cuda and p.dtype == torch.float32 for p in flat)
    return torch.optim.AdamW(params, fused=fused or None, **kw)


@dataclass
class Run:
    """Everything a training step needs (built by setup(), used by train() and bench)."""

    cfg: object
    device: torch.device
    batches: Batches
    unet: torch.nn.Module
    te: torch.nn.Module
    models: dict
    params: list
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    scaler: object
    hook: object
    alphas_cumprod: torch.Tensor
    prediction_type: str
    n_prior: int
    weights_dtype: torch.dtype
    new_tokens: object = None  # trainer.embeddings.NewTokenEmbedding when new token rows are trained
    freeze_at: int = 0  # the step from which they are frozen (pivotal tuning)
    identifier: str | None = None  # what [V] became (recorded in the LoRA file's metadata)
    te2: torch.nn.Module | None = None  # SDXL's second text encoder
    new_tokens_2: object = None  # SDXL: the new rows of the second text encoder
    shard: object = None  # --shard under torchrun: trainer.shard.Sharding (optimizer state split over ranks)


def setup(cfg, comps, batches: Batches, device) -> Run:
    """Trainable models on the device, optimizer, lr schedule, loss scaler."""
    unet, te, te2 = comps.unet, comps.text_encoder, getattr(comps, "text_encoder_2", None)
    encoders = [e for e in (te, te2) if e is not None]
    weights_dtype = torch.bfloat16 if cfg.weights_dtype == "bf16" else torch.float32
    train_unet = getattr(cfg, "train_unet", True)
    use_lora = bool(getattr(cfg, "lora_rank", None))
    if not train_unet or use_lora:  # TI, LoRA: the base is frozen, so it is stored in half precision where it can be
        weights_dtype = torch.bfloat16 if use_lora and cfg.weights_dtype == "bf16" else frozen_dtype(cfg, device)
        unet.requires_grad_(False)
    unet.to(device, dtype=weights_dtype).train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.kernels:
        from dbkernels.diffusers import use_fused_attention

        use_fused_attention(unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    models = {"unet": unet} if train_unet else {}
    new = embeddings.new_tokens_of(te)
    new2 = embeddings.new_tokens_of(te2) if te2 is not None else None
    freeze_at = 0
    if use_lora:  # adapters on the frozen base: only they train and only they are saved
        if new is not None:
            raise UserError("--train_text_embedding cannot be combined with --lora_rank yet; train the LoRA with "
                            "--train_text_encoder, or the embedding without --lora_rank")
        for enc in encoders if cfg.train_text_encoder else []:
            _train_mode_text_encoder(cfg, enc, device, weights_dtype)
            if cfg.gradient_checkpointing:  # the frozen embeddings would cut the gradient to the adapters
                enc.enable_input_require_grads()
        params, models = lora.add_adapters(cfg, unet, te, train_text_encoder=cfg.train_text_encoder, te2=te2)
    elif new is not None:  # only the new rows train; the table and the rest of the encoder stay frozen
        for enc, rows_of, key in ((te, new, "text_embedding"), (te2, new2, "text_embedding_2")):
            if rows_of is None:
                continue
            rows = rows_of.rows.detach().clone()
            enc.requires_grad_(False)
            enc.to(device, dtype=weights_dtype).train()
            rows_of.rows.data = rows.to(device)  # fp32 master copy, whatever the frozen dtype
            rows_of.rows.requires_grad_(True)
            params.append(rows_of.rows)
            models[key] = rows_of
        frac = getattr(cfg, "text_embedding_frac", 1.0)
        freeze_at = cfg.max_train_steps if frac >= 1 else max(1, round(frac * cfg.max_train_steps))
    elif cfg.train_text_encoder:  # SDXL: both encoders
        for name, enc in zip(("text_encoder", "text_encoder_2"), encoders):
            _train_mode_text_encoder(cfg, enc, device, weights_dtype)
            params += [p for p in enc.parameters() if p.requires_grad]
            models[name] = enc
    else:
        for enc in encoders:
            enc.requires_grad_(False)

    from diffusers.optimization import get_scheduler

    groups = params
    lr_rows = getattr(cfg, "text_embedding_lr", None)
    if lr_rows is not None and new is not None and not use_lora:  # the new rows learn at their own rate
        rows = {id(m.rows) for m in (new, new2) if m is not None}
        groups = [{"params": [p for p in params if id(p) not in rows]},
                  {"params": [p for p in params if id(p) in rows], "lr": lr_rows}]
        groups = [g for g in groups if g["params"]]
    optimizer = make_optimizer(cfg, groups)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps,
                                 num_cycles=getattr(cfg, "lr_num_cycles", 1), power=getattr(cfg, "lr_power", 1.0))
    sharded = shard.Sharding(params, optimizer) if getattr(cfg, "shard", False) and distributed.world() > 1 else None
    scaler = None
    if cfg.mixed_precision == "fp16":  # --shard: every rank must agree on inf/NaN, each seeing its own gradients
        scaler = shard.scaler(device) if sharded is not None else torch.amp.GradScaler(device.type)
    if sharded is not None:  # gradients go to their owners from hooks that run before step_in_backward's
        sharded.reduce_hooks(each=bool(cfg.step_in_backward))
    hook = None
    if cfg.step_in_backward:
        if scaler is not None:
            raise UserError("--step_in_backward cannot unscale fp16 gradients; use --mixed_precision bf16 or no")
        from dbkernels.optim import step_in_backward

        if sharded is None:
            distributed.average_in_backward(params)  # torchrun: these hooks run first, so each update sees the mean
        hook = step_in_backward(torch.nn.ModuleList([getattr(m, "module", m) for m in models.values()]), optimizer)
        if sharded is not None:  # the owner's update, then its broadcast
            sharded.broadcast_hooks()
    return Run(cfg=cfg, device=device, batches=batches, unet=unet, te=te, models=models, params=params,
               optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler, hook=hook,
               alphas_cumprod=comps.noise_scheduler.alphas_cumprod.to(device, torch.float32),
               prediction_type=comps.prediction_type,
               n_prior=cfg.train_batch_size if batches.cls is not None else 0, weights_dtype=weights_dtype,
               new_tokens=new, freeze_at=freeze_at, te2=te2, new_tokens_2=new2, shard=sharded)


def _train_mode_text_encoder(cfg, te, device, dtype) -> None:
    te.to(device, dtype=dtype).train()
    if cfg.gradient_checkpointing:  # transformers 5 renamed it
        (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()


def frozen_dtype(cfg, device) -> torch.dtype:
    """The dtype of frozen weights: the autocast dtype on a GPU; bf16 on a CPU only when asked (CPUs lack fp16 math)."""
    if device.type == "cuda":
        return HALF.get(cfg.mixed_precision, torch.float32)
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32


@dataclass
class StepResult:
    loss: float
    stepped: bool
    last: tuple  # (pred, latents, noise, t, offset) of the last micro-batch, for the log


def train_step(run: Run, step: int) -> StepResult:
    """One optimizer step: gradient_accumulation_steps forward/backward passes, clip, update."""
    cfg, device = run.cfg, run.device
    autocast = (torch.autocast(device.type, dtype=HALF[cfg.mixed_precision])
                if cfg.mixed_precision != "no" else contextlib.nullcontext())
    backend = contextlib.nullcontext() if cfg.kernels else dbkernels.force_backend("reference")
    total, finite = 0.0, True
    if run.new_tokens is not None:  # pivotal tuning: the new rows train until freeze_at, then stay as they are
        active = step < run.freeze_at
        for rows_of in filter(None, (run.new_tokens, run.new_tokens_2)):
            rows_of.rows.requires_grad_(active)
        if not active and run.batches.embeds is None and run.batches.can_cache():
            run.batches.cache_prompt_embeddings()
    with backend:  # kernels off: every dbkernels op runs its PyTorch reference
        for micro in range(cfg.gradient_accumulation_steps):
            batch = run.batches.make(step, micro)  # SDXL: a 4th item, the UNet's added conditions
            latents, emb, added = batch[0], batch[1], sdxl.unet_kwargs(batch, run.weights_dtype)
            dgen = torch.Generator(device).manual_seed(step_seed(cfg.seed, step, micro) + 1)
            full = (latents.shape[0] * distributed.world(), *latents.shape[1:])  # torchrun: the global batch's
            noise = torch.randn(full, generator=dgen, device=device)
            offset = (cfg.offset_noise * torch.randn(full[:2], generator=dgen, device=device)
                      if cfg.offset_noise else None)
            t = torch.randint(0, run.alphas_cumprod.shape[0], (full[0],), generator=dgen, device=device)
            mine = distributed.my_rows(cfg.train_batch_size, 2 if run.n_prior else 1, device)
            if mine is not None:  # this rank's rows of the global draws
                noise, t, offset = noise[mine], t[mine], (offset[mine] if offset is not None else None)
            x_t = dbkernels.add_noise(latents, noise, t, run.alphas_cumprod, noise_offset=offset, validate=False)
            with autocast:
                labels = t if getattr(cfg, "class_labels_conditioning", None) == "timesteps" else None
                pred = run.unet(x_t.to(run.weights_dtype), t, encoder_hidden_states=emb.to(run.weights_dtype),
                                class_labels=labels, **added).sample
            loss = dbkernels.diffusion_loss(pred, latents, noise, t, run.alphas_cumprod,
                                            prediction_type=run.prediction_type, num_prior=run.n_prior,
                                            prior_weight=cfg.prior_loss_weight, snr_gamma=cfg.snr_gamma,
                                            noise_offset=offset, validate=False)
            # never train on NaN: the whole step is skipped (torchrun: on every rank, before any backward)
            if distributed.any_flag(not _fake(loss) and not bool(torch.isfinite(loss))):
                finite = False
                break
            total += (0.0 if _fake(loss) else loss.item()) / cfg.gradient_accumulation_steps
            loss = loss / cfg.gradient_accumulation_steps
            if run.shard is not None:  # gradients go to their owners once, in the last micro-step's backward
                run.shard.reduce_now = micro == cfg.gradient_accumulation_steps - 1
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
    if run.shard is not None:  # global mean loss; the gradients went to their owners in backward (and the rest now)
        run.shard.flush()
        total, finite = distributed.reduce_loss(total, finite)
    elif distributed.world() > 1:  # global mean loss; gradients averaged over the ranks (when all were finite)
        total, finite = distributed.reduce_step(run.params, total, finite)
    stepped = finite and _optimizer_step(cfg, run.optimizer, run.scaler, run.params, run.hook, run.shard)
    if stepped and run.shard is not None and run.hook is None:  # the owners' new values to every rank
        run.shard.broadcast_params()
    if not stepped:
        run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        if run.hook is not None:  # the update ran inside backward, so optimizer.step() was never called
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        run.lr_scheduler.step()
    return StepResult(loss=total if finite else float("nan"), stepped=stepped,
                      last=(pred.detach(), latents, noise, t, offset))


def _note_first_step_compile(bar) -> None:
    """Say once how much of the first step was Triton compiling and autotuning (a one-time cost, cached)."""
    from dbkernels import _triton

    stats = _triton.first_call_stats()
    if stats["launches_compiled"]:
        bar.write(f"first step: {stats['compile_tune_s']:.1f} s compiling/autotuning {stats['launches_compiled']} "
                  f"Triton kernel launch(es); cached for later steps and runs")


def train(cfg) -> Path:
    """Run DreamBooth as configured; returns the output folder."""
    progress = {"step": 0}
    try:
        return _train(cfg, progress)
    except torch.cuda.OutOfMemoryError as e:
        raise UserError(runlog.oom_advice(cfg)) from e
    except Exception as e:  # torchrun: a collective failed because another rank died or hung -> one line
        msg = distributed.stopped_message(e, progress["step"])
        if msg is None:
            raise
        raise Resumable(msg) from e
    finally:
        distributed.shutdown()


def _train(cfg, progress: dict) -> Path:
    # torchrun (WORLD_SIZE > 1): join the process group; only rank 0 writes (distributed.on_rank0)
    device = distributed.init(cfg) or torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if getattr(cfg, "allow_tf32", False):  # diffusers' --allow_tf32: TF32 matmuls/convolutions (Ampere+)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg.output_dir)
    inputs.check_paths(cfg)  # (the CLI ran these before importing torch; callers of train() may not have)
    if device.type == "cpu" and cfg.mixed_precision == "fp16":
        print(FP16_CPU_NOTE.format(x=FP16_CPU_FACTOR), file=sys.stderr, flush=True)
    resume = distributed.on_rank0(prepare_output_dir, cfg)
    distributed.on_rank0(outdir.check_space, cfg)
    # the step's estimated peak (trainer.estimate, on the CPU) against the free memory; torchrun: rank 0 for all
    if device.type == "cuda" and distributed.is_main():
        from trainer.memory.estimate import preflight

        warning = preflight(cfg, device)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    captions = data.caption_suffix(cfg.caption_extension) if getattr(cfg, "caption_extension", None) else None
    inst_files = list_images(cfg.instance_data_dir, "instance image", captions=captions)
    inst = ImageSet(inst_files, cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                    interpolation=getattr(cfg, "image_interpolation_mode", None))  # bad images fail before the model
    captioned = data.read_captions(inst_files, captions) if captions else [None] * len(inst_files)
    torch.manual_seed(cfg.seed)
    comps = load_components(cfg.pretrained_model_name_or_path, cfg)

    # --- prompts, with [V] replaced by the identifier ---
    class_word = cfg.class_prompt.split()[-1] if cfg.class_prompt else None
    ident = pick_identifier(comps.tokenizer, class_word, cfg.seed) if cfg.identifier == "auto" else cfg.identifier
    word = ident
    if getattr(cfg, "train_text_embedding", False):  # Textual Inversion / pivotal tuning: [V] is new token(s)
        ident = cfg.placeholder_token or f"<{ident}>"
        init = cfg.initializer_token or (None if cfg.identifier == ident else word)
        embeddings.add_new_tokens(comps.tokenizer, comps.text_encoder, ident, cfg.num_vectors, init, seed=cfg.seed)
        if getattr(comps, "text_encoder_2", None) is not None:  # SDXL: the same new tokens in both encoders
            embeddings.add_new_tokens(comps.tokenizer_2, comps.text_encoder_2, ident, cfg.num_vectors, init,
                                      seed=cfg.seed + 1)
        word = embeddings.expand(ident, ident, cfg.num_vectors)
        print(f"placeholder: {ident} ({cfg.num_vectors} new token(s), initialised from "
              f"{init if init else 'random rows'})")
    else:
        print(f"identifier: {ident}")
    sub = (lambda s: s.replace("[V]", word) if s else s)
    prompts = {"inst": sub(cfg.instance_prompt)}
    if cfg.with_prior_preservation:
        prompts["cls"] = cfg.class_prompt

    # --- data (class images generated first if missing) ---
    half = HALF.get(cfg.mixed_precision) if device.type == "cuda" else None
    cls = cls_prompts = None
    if cfg.with_prior_preservation:
        made = generate_class_images(cfg, device, half or torch.float32)
        if made:
            print(f"generated {made} class image(s) in {cfg.class_data_dir}")
        files = list_images(cfg.class_data_dir, "class image", captions=captions)[: cfg.num_class_images]
        cls = ImageSet(files, cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                       interpolation=getattr(cfg, "image_interpolation_mode", None))
        cls_prompts = data.class_prompts(files, captions, cfg.class_prompt)  # kohya: captions beside them too
    inst_prompts = [sub(c) if c is not None else prompts["inst"] for c in captioned]
    batches = Batches(cfg, comps, inst, cls, prompts, device, half or torch.float32, inst_prompts=inst_prompts,
                      templates=getattr(cfg, "prompt_templates", None), word=word, cls_prompts=cls_prompts)
    distributed.on_rank0(outdir.claim, out, cfg_dict(cfg))  # only once the inputs are known to be good

    run = setup(cfg, comps, batches, device)
    run.identifier = ident
    start = resume_run(run, resume) if resume is not None else 0
    log = runlog.RunLog(out, cfg, files=distributed.is_main())
    if device.type == "cuda" and distributed.is_main():  # the estimate beside the measured peak in the log lines
        from trainer.memory.estimate import log_fields

        try:
            log.estimate = log_fields(cfg)
        except Exception:  # noqa: BLE001 - advisory only, as the preflight
            log.estimate = {}
    skipped, done = 0, start

    from tqdm.auto import tqdm

    bar = tqdm(range(start, cfg.max_train_steps), initial=start, total=cfg.max_train_steps, desc="train",
               unit="step", disable=not distributed.is_main())
    with interrupts.StopRequests() as stop:
        try:
            for step in bar:
                t0 = time.perf_counter()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                res = train_step(run, step)
                if step == start:
                    _note_first_step_compile(bar)
                if not res.stepped:
                    skipped += 1
                done = progress["step"] = step + 1
                if done % cfg.log_every == 0 or done == cfg.max_train_steps:
                    terms = distributed.mean_terms(runlog.loss_terms(run, res))  # torchrun: over all ranks
                    rec = log.write(done, res.loss, terms, run.lr_scheduler.get_last_lr()[0],
                                    (time.perf_counter() - t0) * 1000, device, skipped)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", skipped=skipped)
                    bar.write(runlog.log_line(rec))
                saved = None
                save_every = getattr(cfg, "save_steps", None)
                if save_every and run.new_tokens is not None and done % save_every == 0:  # diffusers' --save_steps
                    distributed.on_rank0(export_embedding, out, run.new_tokens, done, a1111=False,
                                         name=f"learned_embeds-steps-{done}", second=run.new_tokens_2)
                if done % cfg.checkpointing_steps == 0 and done < cfg.max_train_steps:
                    saved = _checkpoint(run, out, done)
                if cfg.validation_prompt and done % cfg.validation_steps == 0:
                    distributed.on_rank0(runlog.validate, cfg, run.unet, run.te, sub(cfg.validation_prompt), device,
                                         out / "validation", f"step-{done:06d}", te2=run.te2,
                                         tokenizer=run.batches.tokenizers if run.new_tokens is not None else None)
                # torchrun: a stop request that reached some ranks stops all of them at this step
                if distributed.any_flag(stop.signum is not None) and done < cfg.max_train_steps:
                    signum = stop.signum or interrupts.signal.SIGTERM
                    saved = saved or _checkpoint(run, out, done)
                    raise Resumable(f"{interrupts.signal_name(signum)} at step {done} of "
                                    f"{cfg.max_train_steps}; saved {saved}{distributed.resume_note()}",
                                    kind="interrupted", exit_code=128 + signum)
            if skipped > cfg.max_train_steps // 2:
                raise UserError(f"{skipped} of {cfg.max_train_steps} steps had a non-finite loss or gradient and "
                                f"were skipped; lower --learning_rate or use --mixed_precision bf16")
        finally:
            bar.close()
            log.close()
            if run.hook is not None:
                run.hook.remove()
            if run.shard is not None:
                run.shard.remove()
        with _whole_state(run):  # --shard: a failed export saves a checkpoint, with the whole state
            distributed.on_rank0(save_model, run, out, done)
    distributed.on_rank0(runlog.record_subject, out, ident, class_word, prompts["inst"], cfg, run)
    distributed.on_rank0(outdir.write_marker, out, finished=True)
    what = ("the LoRA weights" if "unet_lora" in run.models else "the trained model" if "unet" in run.models
            else "the embedding files")
    print(f"saved {what} to {out} ({skipped} skipped step(s))")
    return out


def _whole_state(run: Run):
    """--shard: rank 0 holds every rank's optimizer state within (a collective: all ranks enter it)."""
    return run.shard.gathered() if run.shard is not None else contextlib.nullcontext()


def _checkpoint(run: Run, out: Path, step: int) -> Path:
    with _whole_state(run):
        return distributed.on_rank0(save_checkpoint, run, out, step)


def save_checkpoint(run: Run, out: Path, step: int) -> Path:
    """checkpoint-<step>; on a full disk a one-line error naming the last good checkpoint."""
    try:
        return checkpoint.save(out, step, models=run.models, optimizer=run.optimizer, lr_scheduler=run.lr_scheduler,
                               scaler=run.scaler, config=cfg_dict(run.cfg), total_limit=run.cfg.checkpoints_total_limit)
    except outdir.NoSpace as e:
        last = checkpoint.newest_intact(out)
        kept = f"kept the last good checkpoint {last}" if last else "no checkpoint saved yet"
        raise Resumable(f"{e}; {kept}; free some space, then resume") from e


def save_model(run: Run, out: Path, step: int) -> None:
    """The final export; if it fails, the trained state goes into checkpoint-<step> so nothing is lost."""
    try:
        if "unet_lora" in run.models:
            lora.export_lora(run.cfg, run.unet, run.te if "text_encoder_lora" in run.models else None, out, step,
                             run.identifier, te2=run.te2 if "text_encoder_2_lora" in run.models else None)
        elif "unet" in run.models:  # Textual Inversion stores nothing for the (frozen) model
            trained_te = run.cfg.train_text_encoder
            export(run.cfg, run.unet, run.te if trained_te else None, out, te2=run.te2 if trained_te else None)
        if getattr(run.cfg, "save_single_file", False) and ("unet" in run.models or "unet_lora" in run.models):
            lora_file = out / lora.DIFFUSERS_FILE if "unet_lora" in run.models else None
            print(f"single file: {out / export_single_file(run.cfg, out, lora_file)}")
        if run.new_tokens is not None:  # the embedding files, never the extended text encoder
            export_embedding(out, run.new_tokens, step, base_model=run.cfg.pretrained_model_name_or_path,
                             second=run.new_tokens_2)
    except UserError as e:
        where = out / f"checkpoint-{step}"
        if checkpoint.verify(where) is not None:
            try:
                checkpoint.save(out, step, models=run.models, optimizer=run.optimizer, lr_scheduler=run.lr_scheduler,
                                scaler=run.scaler, config=cfg_dict(run.cfg), total_limit=None)
            except outdir.NoSpace:
                where = checkpoint.newest_intact(out)
        kept = (f"the trained state is saved in {where}" if where is not None and where.name.endswith(f"-{step}")
                else f"the last good checkpoint is {where}" if where is not None else "no checkpoint could be saved")
        raise Resumable(f"{e}; {kept}; fix that, then resume to write the model") from e


def _optimizer_step(cfg, optimizer, scaler, params, hook, sharded=None) -> bool:
    """Clip and step; False if the step was skipped for non-finite gradients."""
    if hook is not None:  # the update already happened inside backward
        return True
    if scaler is not None:
        scaler.unscale_(optimizer)
    clip = sharded.clip_grad_norm_ if sharded is not None else (
        lambda m: torch.nn.utils.clip_grad_norm_(params, m))  # --shard: the norm of all ranks' gradients
    norm = clip(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    if scaler is not None:
        before = scaler.get_scale()
        scaler.step(optimizer)  # skips the update itself on inf/NaN gradients
        scaler.update()
        ok = scaler.get_scale() >= before
    elif norm is not None and not _fake(norm) and not torch.isfinite(norm):
        ok = False
    else:
        optimizer.step()
        ok = True
    optimizer.zero_grad(set_to_none=True)
    return ok


def cfg_dict(cfg) -> dict:
    return dict(vars(cfg))
