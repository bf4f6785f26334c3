"""One training step: the run's trainable state (setup) and the step itself (train_step).

Every random draw of a step (which images, crops, flips, VAE samples, noise, timesteps) comes
from generators seeded by (seed, step, micro-step), so a run resumed from a checkpoint continues
exactly as the uninterrupted run would have; under torchrun every rank makes the draws of the
whole global batch and keeps its own rows.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch

import dbkernels
from trainer.core.batches import Batches, step_seed
from trainer.distributed import data_parallel as distributed
from trainer.distributed import shard
from trainer.errors import UserError
from trainer.methods.base import HALF, Method, Trainable


def _fake(t) -> bool:
    """trainer.memory runs the step on fake tensors (shapes, no values): value checks are skipped there."""
    return isinstance(t, torch._subclasses.FakeTensor)


def make_optimizer(opts, params):
    """params: a list of tensors, or of param groups (dicts; a group's own "lr" overrides --learning_rate)."""
    o = opts.optim
    kw = dict(lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.adam_weight_decay,
              eps=o.adam_epsilon)
    if o.optimizer == "adamw8bit":
        from dbkernels.optim import AdamW8bit

        return AdamW8bit(params, **kw)
    if o.optimizer == "adamw4bit":
        from dbkernels.optim import AdamW4bit

        return AdamW4bit(params, **kw)
    if o.optimizer == "bnb8bit":
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
    """Everything a training step needs (built by setup(), used by the loop, the memory estimate and bench)."""

    opts: object  # trainer.options.train.TrainOptions
    method: Method
    device: torch.device
    batches: Batches
    unet: torch.nn.Module
    trainable: Trainable
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    scaler: object
    hook: object  # --step_in_backward's hooks
    alphas_cumprod: torch.Tensor
    prediction_type: str
    n_prior: int
    weights_dtype: torch.dtype
    text_encoders: dict  # {component name: text encoder} of the base model (trained or frozen)
    identifier: str | None = None  # what [V] became (recorded in the LoRA file's metadata)
    shard: object = None  # --shard under torchrun: trainer.distributed.shard.Sharding (optimizer state split)
    guard: object = None  # trainer.core.guard.Guard of the training loop (bench and the estimate run without)
    ema: object = None  # --use_ema: trainer.core.ema's average of the trained weights (made by the loop)

    @property
    def params(self) -> list:
        return self.trainable.params

    @property
    def models(self) -> dict:
        """The checkpoint's items by folder name (unet, text_encoder, unet_lora, text_embedding, ...)."""
        return self.trainable.models


def setup(opts, method: Method, comps, batches: Batches, device, *, dtype_device=None) -> Run:
    """Trainable models on the device, optimizer, lr schedule, loss scaler. dtype_device: the device whose
    dtypes to use (the memory estimate runs on the CPU as if on a GPU)."""
    unet = comps.unet
    weights_dtype = method.weights_dtype(opts, dtype_device or device)
    if not method.trains_unet:
        unet.requires_grad_(False)
    unet.to(device, dtype=weights_dtype).train()
    if opts.memory.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if opts.training.kernels:
        from dbkernels.diffusers import use_fused_attention

        use_fused_attention(unet)
    trainable = method.prepare(opts, comps, device, weights_dtype)
    params = trainable.params

    from diffusers.optimization import get_scheduler

    o = opts.optim
    optimizer = make_optimizer(opts, trainable.groups or params)
    lr_scheduler = get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps,
                                 num_training_steps=opts.training.max_train_steps, num_cycles=o.lr_num_cycles,
                                 power=o.lr_power)
    sharded = (shard.Sharding(params, optimizer) if opts.distributed.shard and distributed.world() > 1
               else None)
    scaler = None
    if opts.memory.mixed_precision == "fp16":  # --shard: every rank must agree on inf/NaN, each seeing its own grads
        scaler = shard.scaler(device) if sharded is not None else torch.amp.GradScaler(device.type)
    in_backward = opts.memory.step_in_backward
    if sharded is not None:  # gradients go to their owners from hooks that run before step_in_backward's
        sharded.reduce_hooks(each=in_backward)
    hook = None
    if in_backward:
        if scaler is not None:
            raise UserError("--step_in_backward cannot unscale fp16 gradients; use --mixed_precision bf16 or no")
        from dbkernels.optim import step_in_backward

        if sharded is None:
            distributed.average_in_backward(params)  # torchrun: these hooks run first, so each update sees the mean
        hook = step_in_backward(torch.nn.ModuleList([getattr(m, "module", m) for m in trainable.models.values()]),
                                optimizer)
        if sharded is not None:  # the owner's update, then its broadcast
            sharded.broadcast_hooks()
    return Run(opts=opts, method=method, device=device, batches=batches, unet=unet, trainable=trainable,
               optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler, hook=hook,
               alphas_cumprod=comps.noise_scheduler.alphas_cumprod.to(device, torch.float32),
               prediction_type=comps.prediction_type,
               n_prior=opts.training.train_batch_size if batches.cls is not None else 0, weights_dtype=weights_dtype,
               text_encoders=comps.named_text_encoders, shard=sharded)


def huber_c(training, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """(B,) c of the huber / smooth_l1 loss per row from its timestep (kohya's --huber_schedule): constant
    huber_c; exponential exp(-alpha t), alpha = -ln(huber_c) / T (1 at t = 0, huber_c at t = T); snr
    (1 - huber_c) / (1 + sigma_t)^2 + huber_c, sigma_t = sqrt((1 - abar_t) / abar_t)."""
    c, schedule = float(training.huber_c), training.huber_schedule
    if schedule == "constant":
        return torch.full(t.shape, c, dtype=torch.float32, device=t.device)
    if schedule == "exponential":
        alpha = -math.log(c) / alphas_cumprod.shape[0]
        return torch.exp(-alpha * t.to(torch.float32))
    abar = alphas_cumprod[t].to(torch.float32)
    sigma = ((1.0 - abar) / abar).sqrt()
    return (1.0 - c) / (1.0 + sigma) ** 2 + c


def loss_options(training, mask, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> dict:
    """diffusion_loss's mask / robust-loss arguments of the step (none for the plain l2 loss without a mask)."""
    out = {} if mask is None else {"mask": mask}
    if training.loss_type != "l2":
        out.update(loss_type=training.loss_type, huber_c=huber_c(training, t, alphas_cumprod))
    return out


@dataclass
class StepResult:
    loss: float
    stepped: bool
    last: tuple  # (pred, latents, noise, t, offset) of the last micro-batch, for the log
    finite_state: bool = True  # False: the update made a trained tensor non-finite and could not be taken back
    loss_options: dict = None  # the last micro-batch's mask / loss_type / huber_c (loss_options), for the log


def train_step(run: Run, step: int) -> StepResult:
    """One optimizer step: gradient_accumulation_steps forward/backward passes, clip, update."""
    opts, device, training = run.opts, run.device, run.opts.training
    precision = opts.memory.mixed_precision
    autocast = torch.autocast(device.type, dtype=HALF[precision]) if precision != "no" else contextlib.nullcontext()
    backend = contextlib.nullcontext() if training.kernels else dbkernels.force_backend("reference")
    accumulation = training.gradient_accumulation_steps
    total, finite = 0.0, True
    if run.guard is not None:  # (before backward: --step_in_backward updates inside it)
        run.guard.before_update()
    if run.trainable.new_tokens:  # pivotal tuning: the new rows train until freeze_at, then stay as they are
        active = step < run.trainable.freeze_at
        for rows_of in run.trainable.new_tokens:
            rows_of.rows.requires_grad_(active)
        if not active and run.batches.embeds is None and run.batches.can_cache():
            run.batches.cache_prompt_embeddings()
    with backend:  # kernels off: every dbkernels op runs its PyTorch reference
        for micro in range(accumulation):
            batch = run.batches.make(step, micro)
            latents, emb = batch.latents, batch.embeds
            extra = run.batches.family.unet_kwargs(batch.conditions, run.weights_dtype) if batch.conditions else {}
            dgen = torch.Generator(device).manual_seed(step_seed(training.seed, step, micro) + 1)
            full = (latents.shape[0] * distributed.world(), *latents.shape[1:])  # torchrun: the global batch's
            noise = torch.randn(full, generator=dgen, device=device)
            offset = (training.offset_noise * torch.randn(full[:2], generator=dgen, device=device)
                      if training.offset_noise else None)
            t = torch.randint(0, run.alphas_cumprod.shape[0], (full[0],), generator=dgen, device=device)
            mine = distributed.my_rows(training.train_batch_size, 2 if run.n_prior else 1, device)
            if mine is not None:  # this rank's rows of the global draws
                noise, t, offset = noise[mine], t[mine], (offset[mine] if offset is not None else None)
            x_t = dbkernels.add_noise(latents, noise, t, run.alphas_cumprod, noise_offset=offset, validate=False)
            with autocast:
                labels = t if training.class_labels_conditioning == "timesteps" else None
                pred = run.unet(x_t.to(run.weights_dtype), t, encoder_hidden_states=emb.to(run.weights_dtype),
                                class_labels=labels, **extra).sample
            robust = loss_options(training, batch.mask, t, run.alphas_cumprod)
            loss = dbkernels.diffusion_loss(pred, latents, noise, t, run.alphas_cumprod,
                                            prediction_type=run.prediction_type, num_prior=run.n_prior,
                                            prior_weight=opts.prior.prior_loss_weight, snr_gamma=training.snr_gamma,
                                            noise_offset=offset, validate=False, **robust)
            # never train on NaN: the whole step is skipped (torchrun: on every rank, before any backward)
            if distributed.any_flag(not _fake(loss) and not bool(torch.isfinite(loss))):
                finite = False
                break
            total += (0.0 if _fake(loss) else loss.item()) / accumulation
            loss = loss / accumulation
            if run.shard is not None:  # gradients go to their owners once, in the last micro-step's backward
                run.shard.reduce_now = micro == accumulation - 1
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
    if run.shard is not None:  # global mean loss; the gradients went to their owners in backward (and the rest now)
        run.shard.flush()
        total, finite = distributed.reduce_loss(total, finite)
    elif distributed.world() > 1:  # global mean loss; gradients averaged over the ranks (when all were finite)
        total, finite = distributed.reduce_step(run.params, total, finite)
    stepped = finite and _optimizer_step(run, training.max_grad_norm)
    if stepped and run.shard is not None and run.hook is None:  # the owners' new values to every rank
        run.shard.broadcast_params()
    finite_state = True
    if stepped and run.guard is not None:  # (every rank sees the same weights here, so all decide alike)
        finite_state = run.guard.update_was_finite()  # an overflowing update: small state is put back,
        stepped = not run.guard.taken_back  # and the step counts as skipped
    if not stepped:
        run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        if run.hook is not None:  # the update ran inside backward, so optimizer.step() was never called
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        run.lr_scheduler.step()
    return StepResult(loss=total if finite else float("nan"), stepped=stepped,
                      last=(pred.detach(), latents, noise, t, offset), finite_state=finite_state, loss_options=robust)


def _optimizer_step(run: Run, max_grad_norm: float) -> bool:
    """Clip and step; False if the step was skipped for non-finite gradients."""
    optimizer, scaler, sharded = run.optimizer, run.scaler, run.shard
    if run.hook is not None:  # the update already happened inside backward
        return True
    if scaler is not None:
        scaler.unscale_(optimizer)
    clip = sharded.clip_grad_norm_ if sharded is not None else (
        lambda m: torch.nn.utils.clip_grad_norm_(run.params, m))  # --shard: the norm of all ranks' gradients
    # the gradients' norm even without clipping, so a non-finite gradient is never applied
    if max_grad_norm > 0 or sharded is not None:
        norm = clip(max_grad_norm if max_grad_norm > 0 else float("inf"))  # (inf: a factor of exactly 1)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in run.params if p.grad is not None])
    if scaler is not None:
        before = scaler.get_scale()
        scaler.step(optimizer)  # skips the update itself on inf/NaN gradients
        scaler.update()
        ok = scaler.get_scale() >= before
    elif not _fake(norm) and not torch.isfinite(norm):
        ok = False
    else:
        optimizer.step()
        ok = True
    optimizer.zero_grad(set_to_none=True)
    return ok
