"""One training step of `dbtrain train` on fake tensors (or on real CPU tensors, the tests' reference), every
storage tracked: the trainer's own setup and train_step (trainer.core.step) with the models built from their
configs, the batches of the right shapes (StepBatches), and the optimizer step as it runs on a GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
from types import SimpleNamespace

import torch

from trainer.core.batches import Batch
from trainer.families import family_with_text_encoders
from trainer.memory.tracker import PHASES, StorageTracker, track_backward
from trainer.options.buckets import buckets_of

ROUND = 512  # the CUDA caching allocator's block granularity


class _Tokenizer:
    """Stands in for the tokenizer: ids of the right shape (the values do not change memory)."""

    def __init__(self, length: int):
        self.model_max_length = length

    def __call__(self, prompts, **_kw):
        return SimpleNamespace(input_ids=torch.zeros(len(prompts), self.model_max_length, dtype=torch.long))


class StepBatches:
    """trainer.core.batches.Batches' interface for one step: latents, prompt embeddings and the family's extra
    conditions of the right shapes. Latents come from the cache (as for square or center-cropped images);
    prompt embeddings too unless the text encoders train, then the family's encode_prompt runs them. make()
    also marks the start of a forward pass."""

    def __init__(self, train, family, text_encoders, tracker, *, latent_size, seq_len: int):
        self.opts, self.family, self.text_encoders, self.tracker = train, family, list(text_encoders), tracker
        self.tokenizers = [_Tokenizer(seq_len)] * len(self.text_encoders)
        self.cls = True if train.prior.with_prior_preservation else None
        h, w = latent_size if isinstance(latent_size, tuple) else (latent_size, latent_size)
        self.shape = (4, h, w)
        self.emb_shape = (seq_len, sum(te.config.hidden_size for te in self.text_encoders))
        last = self.text_encoders[-1].config
        self.pooled = last.projection_dim if len(self.text_encoders) > 1 else 0
        self.embeds = None if train.training.train_text_encoder else {}
        self.vae = None  # the stock recipes: a resident VAE encodes the step's images (track_step sets it)

    def can_cache(self) -> bool:
        return not self.opts.training.train_text_encoder

    def _encode_images(self, rows: int) -> None:
        """diffusers' scripts encode every step's images (no gradient) right before the UNet; at SDXL's 1024
        in float32 that transient can exceed the step's own peak. The latents of the right shape follow."""
        px = self.opts.data.resolution
        with torch.no_grad():
            self.vae.encode(torch.randn((rows, 3, px, px), dtype=self.vae.dtype)).latent_dist.sample()

    def make(self, step: int, micro: int) -> Batch:
        self.tracker.set_phase("forward")
        rows = self.opts.training.train_batch_size * (2 if self.cls is not None else 1)
        gen = torch.Generator().manual_seed(step * 1009 + micro)
        if self.vae is not None:
            self._encode_images(rows)
        latents = torch.randn((rows, *self.shape))
        if self.opts.training.train_text_encoder:
            emb, pooled = self.family.encode_prompt(self.tokenizers, self.text_encoders, [""] * rows,
                                                    torch.device("cpu"))
        else:  # cached: the frozen encoders' output dtype (SDXL: cast to the second encoder's, as it does)
            emb = torch.randn((rows, *self.emb_shape))
            pooled = torch.randn((rows, self.pooled)) if self.pooled else None
        views = [((self.opts.data.resolution,) * 2, (0, 0))] * rows
        return Batch(latents, emb, gen, self.family.unet_conditions(pooled, views, self.opts.data.resolution,
                                                                    torch.device("cpu")))


def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


class swappable:
    """Module.to() swaps fake parameters (torch.utils.swap_tensors), which refuses tensors that have weak
    references, and the fake converter's memo holds weak references to what it made. Within this context the
    memo is emptied right before each swap (it only saves converting the same tensor twice)."""

    def __init__(self, mode):
        self.conv = mode.fake_tensor_converter.meta_converter

    def __enter__(self):
        self.orig = orig = torch.utils.swap_tensors
        conv = self.conv

        def swap(t1, t2):
            conv.tensor_memo.clear()
            conv.storage_memo.clear()
            return orig(t1, t2)

        torch.utils.swap_tensors = swap
        return self

    def __exit__(self, *exc):
        torch.utils.swap_tensors = self.orig
        return False


def _build_fake(make, mode):
    with mode:
        return make()


def fake_components(confs: dict):
    """setup's components from configs: UNet and text encoder(s) as fake tensors, the real noise schedule;
    the text encoders are the family's classes (SDXL's second: CLIPTextModelWithProjection, its pooled
    projection)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from trainer.families.base import Components

    sched = DDPMScheduler.from_config(confs["scheduler"])
    mode = fake_mode()
    family = family_with_text_encoders(len(confs["text_encoder"]))  # one config per text encoder
    unet = _build_fake(lambda: UNet2DConditionModel.from_config(confs["unet"]), mode)
    encoders = []
    for cls, conf in zip(family.text_encoder_classes(), confs["text_encoder"]):
        kw = {k: v for k, v in conf.items() if k not in ("architectures", "model_type")}
        encoders.append(_build_fake(lambda cls=cls, kw=kw: cls(CLIPTextConfig(**kw)), mode))
    vae = confs.get("vae") or {}
    factor = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
    comps = Components(unet=unet, vae=None, text_encoder=encoders[0], tokenizer=None, noise_scheduler=sched,
                       prediction_type=confs["scheduler"].get("prediction_type", "epsilon"),
                       text_encoder_2=encoders[1] if len(encoders) > 1 else None)
    return comps, family, factor, mode


class _FakeScaler:
    """GradScaler's memory without its data-dependent checks (fake tensors have no values)."""

    def scale(self, loss):
        return loss * 65536.0

    def unscale_(self, optimizer):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch._foreach_mul_(grads, 1 / 65536.0)

    def step(self, optimizer):
        optimizer.step()

    def update(self):
        pass

    def get_scale(self):
        return 65536.0


def _stock_resident(train, confs, encoders, mode) -> list:
    """What diffusers' scripts keep on the GPU besides the trained models. train_dreambooth.py: the VAE and
    the frozen text encoder in the autocast dtype. SDXL (train_dreambooth_lora_sdxl.py): the VAE in float32
    (its own VAE overflows in float16); the frozen text encoders in the autocast dtype, except that the LoRA
    script frees them once the prompts are encoded (fixed prompts)."""
    from diffusers import AutoencoderKL

    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(train.memory.mixed_precision, torch.float32)
    xl = len(encoders) == 2
    with mode:
        vae = AutoencoderKL.from_config(confs["vae"]).to(dtype=torch.float32 if xl else half)
        out = [vae]
        if not train.training.train_text_encoder and not (xl and train.uses_lora):
            out += [te.to(dtype=half) for te in encoders]
    return out


def _as_on_gpu(run, fake: bool, foreach: bool = False) -> list:
    """Make the optimizer step as it would be on a GPU; returns the patches to undo."""
    from dbkernels.optim import adamw8bit, multi_tensor

    opt = run.optimizer
    undo = []
    if isinstance(opt, torch.optim.AdamW):  # make_optimizer: fused for fp32 CUDA params, torch: foreach otherwise
        fused = all(p.dtype == torch.float32 for p in run.params) and not foreach
        for g in opt.param_groups:
            g["fused"], g["foreach"] = (True, None) if fused else (None, True)
    if fake:
        if run.scaler is not None:
            run.scaler = _FakeScaler()
        # AdamW8bit's CUDA kernel updates in place; its CPU paths read values (numpy) and cannot run on fakes
        for mod, name in ((multi_tensor, "step_"), (adamw8bit, "_update_one")):
            undo.append((mod, name, getattr(mod, name)))
            setattr(mod, name, lambda *a, **k: None)
    return undo


STOCK_NOTE = ("stock recipe: diffusers' train_dreambooth.py keeps the VAE and the frozen text encoder on the GPU in "
              "the autocast dtype; the VAE encodes every step's images (no_grad, before the UNet's forward; counted "
              "in the forward phase); torch AdamW without fused/foreach arguments (foreach on a GPU)")
STOCK_NOTE_XL = ("stock recipe: as diffusers' train_dreambooth_lora_sdxl.py, the VAE stays on the GPU in float32 and "
                 "encodes every step's images (no_grad, before the UNet's forward; counted in the forward phase); "
                 "frozen text encoders in the autocast dtype (the LoRA script frees them after encoding its fixed "
                 "prompts); torch AdamW without fused/foreach arguments (foreach on a GPU)")


def track_step(opts, *, confs: dict | None = None, comps=None, fake: bool = True) -> dict:
    """Run setup and one train_step of an EstimateOptions' training run with every storage tracked; phase peaks
    and categories."""
    from trainer.core import step as steps
    from trainer.families import family_of
    from trainer.methods import method_for

    train = opts.train
    device = torch.device("cpu")
    notes = []
    if comps is None:
        comps, family, factor, mode = fake_components(confs)
        seq_len = confs["text_encoder"][0].get("max_position_embeddings", 77)
    else:
        family = family_of(train.model.pretrained_model_name_or_path)
        factor = 2 ** (len(comps.vae.config.block_out_channels) - 1)
        seq_len = comps.tokenizer.model_max_length
        mode = contextlib.nullcontext()
        if fake:
            mode = fake_mode()
            comps.unet = _faked(comps.unet, mode)
            comps.text_encoder = _faked(comps.text_encoder, mode)
            if comps.text_encoder_2 is not None:
                comps.text_encoder_2 = _faked(comps.text_encoder_2, mode)
    if train.optim.optimizer == "bnb8bit":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            train = dataclasses.replace(train, optim=dataclasses.replace(train.optim, optimizer="adamw8bit"))
            notes.append("bitsandbytes is not installed: its 8-bit AdamW was estimated as ours (2 B of state per "
                         "parameter, as bitsandbytes keeps)")
    stock = opts.stock_recipe and fake and confs is not None
    if stock:
        notes.append(STOCK_NOTE_XL if comps.text_encoder_2 is not None else STOCK_NOTE)
    tracker = StorageTracker()
    encoders = comps.text_encoders
    largest = max(buckets_of(train.data) or [(train.data.resolution,) * 2], key=lambda hw: hw[0] * hw[1])
    batches = StepBatches(train, family, encoders, tracker, latent_size=(largest[0] // factor, largest[1] // factor),
                          seq_len=seq_len)
    undo = []
    with mode:
        with swappable(mode) if fake else contextlib.nullcontext():
            # a frozen base is stored in the autocast dtype on a GPU (trainer.methods.base.frozen_dtype)
            run = steps.setup(train, method_for(train), comps, batches, device,
                              dtype_device=torch.device("cuda") if fake else None)
        resident = []  # diffusers' recipe keeps the VAE and a frozen text encoder on the GPU, in half precision
        if stock:
            with swappable(mode):
                resident = _stock_resident(train, confs, encoders, mode)
            batches.vae = resident[0]
        try:
            undo = _as_on_gpu(run, fake, foreach=stock)
            with tracker:
                # (--shuffle_caption: the frozen encoders stay too, each step's shuffled prompts are encoded)
                kept = train.training.train_text_encoder or run.trainable.new_tokens or train.data.shuffle_caption
                on_gpu = [run.unet] + (encoders if kept else [])
                weights = [t for m in on_gpu + resident for t in (*m.parameters(), *m.buffers())]
                for t in weights:
                    tracker.add(t)
                tracker.add(run.alphas_cumprod)
                with track_backward(tracker, run.params, run.optimizer):
                    steps.train_step(run, 0)
                tracker.finish()
        finally:
            for mod, name, orig in undo:
                setattr(mod, name, orig)
            if run.hook is not None:
                run.hook.remove()
        weight_keys = {tracker.key(t) for t in weights} - {None}
        state = [v for s in run.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        state_keys = {tracker.key(t) for t in state} - {None}
        state_bytes = sum(t.untyped_storage().nbytes() for t in state)
        n_params = sum(p.numel() for m in (run.unet, *encoders) for p in m.parameters())
        n_train = sum(p.numel() for p in run.params)
        ema = ema_sizes(train, run.params)
    phases = {}
    for ph in PHASES:
        live = tracker.peaks.get(ph)
        if live is None or live.at_peak is None:
            continue
        cats = tracker.classify(live.at_peak, weight_keys, state_keys)
        # steady state: the states of earlier steps are alive in every phase (step 1 creates them)
        cats["optimizer_state"] = state_bytes
        if ema:  # --use_ema: the average, resident from setup on (its fused update makes no temporaries)
            cats["ema"] = sum(ema)
        rounding = sum(-n % ROUND for k, n in live.at_peak.items() if k not in state_keys)
        rounding += sum(-t.untyped_storage().nbytes() % ROUND for t in state) + sum(-n % ROUND for n in ema)
        phases[ph] = {"peak_bytes": sum(cats.values()), "by_category": cats, "rounding_bytes": rounding}
    return {"phases": phases, "params": n_params, "trainable_params": n_train, "notes": notes}


def ema_sizes(train, params) -> list[int]:
    """Bytes of each tensor of --use_ema's average on the GPU (none with --ema_device cpu or without --use_ema)."""
    e = train.ema
    if not e.use_ema or e.ema_device == "cpu":
        return []
    size = 2 if e.ema_dtype == "bf16" else 4
    return [p.numel() * size for p in params]


def _faked(module, mode):
    """The same model (class and config) built again with fake tensors."""
    if hasattr(module, "from_config"):  # diffusers
        return _build_fake(lambda: type(module).from_config(module.config), mode)
    return _build_fake(lambda: type(module)(module.config), mode)
