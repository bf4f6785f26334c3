"""Peak bytes of live tensor storages, by phase and by category (trainer.estimate).

A TorchDispatchMode sees every op's outputs; each new storage is counted until the
Python storage object dies (weakref callback: torch keeps one Python object per storage
while it lives). The same tracker runs on fake tensors (the estimate) and on real CPU
tensors (tests compare the two), so both sides are counted the same way.

Sizes are the storages' own byte counts, without the CUDA caching allocator's rounding
(trainer.estimate adds that as part of its allowance).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

PHASES = ("forward", "backward", "optimizer")
CATEGORIES = ("weights", "gradients", "optimizer_state", "activations", "temporaries")


class _Live:
    """What one phase's peak looked like."""

    def __init__(self):
        self.peak = 0
        self.at_peak: dict[int, int] | None = None   # storage key -> bytes, when the peak was reached


class StorageTracker(TorchDispatchMode):
    """Counts live storages; `phase` is set by the caller (or by track_backward)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}        # storage key -> bytes
        self.born: dict[int, str] = {}        # storage key -> phase it was created in
        self._refs: dict[int, weakref.ref] = {}
        self._serial_of: dict[int, int] = {}  # storage address -> serial of the live storage there
        self._next = 0
        self.current = 0
        self.phase = "setup"
        self.peaks: dict[str, _Live] = {}
        self.grad_keys: set[int] = set()      # storages that were some parameter's .grad
        self._dirty: _Live | None = None      # a phase whose new peak is not snapshotted yet
        self._saved: dict[int, dict] = {}     # snapshots' keys -> (bytes, phase born), kept for classify()

    # ------------------------------------------------------------------ counting
    def key(self, t: torch.Tensor) -> int | None:
        """The serial number of t's storage while it lives (addresses are reused, serials are not)."""
        return self._serial_of.get(t.untyped_storage()._cdata)

    def add(self, t: torch.Tensor) -> None:
        """Count a tensor's storage if it is new (also weights made before the tracker started)."""
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        addr = st._cdata
        if addr in self._serial_of:
            return
        self._next += 1
        k = self._next
        self._serial_of[addr] = k
        n = st.nbytes()
        self.live[k] = n
        self.born[k] = self.phase
        self._refs[k] = weakref.ref(st, lambda _r, k=k, addr=addr: self._free(k, addr))
        self.current += n
        self._note_peak()

    def _free(self, k: int, addr: int) -> None:
        n = self.live.pop(k, None)
        if n is None:
            return
        if self._serial_of.get(addr) == k:
            del self._serial_of[addr]
        self._snapshot()   # the peak is a maximum just before something is freed
        self.current -= n
        self._refs.pop(k, None)

    def _note_peak(self) -> None:
        p = self.peaks.setdefault(self.phase, _Live())
        if self.current > p.peak:
            p.peak = self.current
            self._dirty = p

    def _snapshot(self) -> None:
        if self._dirty is not None:
            self._dirty.at_peak = dict(self.live)
            for k in self.live:
                self._saved[k] = (self.live[k], self.born.get(k, "setup"))
            self._dirty = None

    def set_phase(self, phase: str) -> None:
        self._snapshot()
        self.phase = phase
        self._note_peak()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out

    # ------------------------------------------------------------------ results
    def finish(self) -> None:
        self._snapshot()

    def note_grads(self, params) -> None:
        for p in params:
            if p.grad is not None and self.key(p.grad) is not None:
                self.grad_keys.add(self.key(p.grad))

    def classify(self, snapshot: dict[int, int], weight_keys: set[int], state_keys: set[int]) -> dict[str, int]:
        """Bytes per category of one snapshot. Weights, gradients and optimizer state by identity; the
        rest is an activation when the forward made it (saved for backward), else a temporary."""
        out = dict.fromkeys(CATEGORIES, 0)
        for k, n in snapshot.items():
            if k in weight_keys:
                cat = "weights"
            elif k in self.grad_keys:
                cat = "gradients"
            elif k in state_keys:
                cat = "optimizer_state"
            elif self._saved.get(k, (0, "setup"))[1] in ("setup", "forward"):
                cat = "activations"
            else:
                cat = "temporaries"
            out[cat] += n
        return out


class track_backward:
    """Within this context every Tensor.backward() call sets the tracker's phase to backward, and to
    optimizer once it returns; the parameters' gradients are noted as they are accumulated."""

    def __init__(self, tracker: StorageTracker, params, optimizer=None):
        self.tracker, self.params, self.optimizer = tracker, list(params), optimizer
        self._orig = None
        self._hooks = []

    def __enter__(self):
        tr = self.tracker
        orig = self._orig = torch.Tensor.backward

        def backward(t, *a, **kw):
            tr.set_phase("backward")
            try:
                return orig(t, *a, **kw)
            finally:
                tr.note_grads(self.params)
                tr.set_phase("optimizer")

        torch.Tensor.backward = backward
        for p in self.params:
            self._hooks.append(p.register_post_accumulate_grad_hook(lambda p: tr.note_grads([p])))
        opt = self.optimizer
        if opt is not None and hasattr(opt, "_step_param"):  # step_in_backward frees each grad in its own hook
            inner = opt._step_param

            def step_param(p, group):
                tr.note_grads([p])
                return inner(p, group)

            opt._step_param = step_param
        return self

    def __exit__(self, *exc):
        torch.Tensor.backward = self._orig
        for h in self._hooks:
            h.remove()
        opt = self.optimizer
        if opt is not None and "_step_param" in vars(opt):
            del opt._step_param
        return False


# ---------------------------------------------------------------- one training step, tracked

class _Tokenizer:
    """Stands in for the tokenizer: ids of the right shape (the values do not change memory)."""

    def __init__(self, length: int):
        self.model_max_length = length

    def __call__(self, prompts, **_kw):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.zeros(len(prompts), self.model_max_length, dtype=torch.long))


class StepBatches:
    """loop.Batches' interface for one step: latents and prompt embeddings of the right shapes.
    Latents come from the cache (as for square or center-cropped images); prompt embeddings too unless the
    text encoders train, then batches.encode_prompt (SDXL: sdxl.encode_prompt_sdxl) runs them. SDXL batches have
    loop.Batches' 4th item, the UNet's added conditions (pooled embeddings, float32 time ids). make() also
    marks the start of a forward pass."""

    def __init__(self, cfg, text_encoders, tracker, *, latent_size: int, seq_len: int):
        self.cfg, self.text_encoders, self.tracker = cfg, list(text_encoders), tracker
        self.text_encoder = self.text_encoders[0]
        self.sdxl = len(self.text_encoders) == 2
        self.tokenizer = _Tokenizer(seq_len)
        self.cls = True if cfg.with_prior_preservation else None
        self.shape = (4, latent_size, latent_size)
        self.emb_shape = (seq_len, sum(te.config.hidden_size for te in self.text_encoders))
        self.pooled = self.text_encoders[-1].config.projection_dim if self.sdxl else 0
        self.embeds = None if cfg.train_text_encoder else {}
        self.vae = None  # the stock recipes: a resident VAE encodes the step's images (track_step sets it)

    def can_cache(self) -> bool:
        return not self.cfg.train_text_encoder

    def _encode_images(self, rows: int) -> None:
        """diffusers' scripts encode every step's images (no gradient) right before the UNet; at SDXL's 1024
        in float32 that transient can exceed the step's own peak. The latents of the right shape follow."""
        px = self.cfg.resolution
        with torch.no_grad():
            self.vae.encode(torch.randn((rows, 3, px, px), dtype=self.vae.dtype)).latent_dist.sample()

    def make(self, step: int, micro: int):
        from trainer.core import batches
        from trainer.families import sdxl

        self.tracker.set_phase("forward")
        rows = self.cfg.train_batch_size * (2 if self.cls is not None else 1)
        gen = torch.Generator().manual_seed(step * 1009 + micro)
        if self.vae is not None:
            self._encode_images(rows)
        latents = torch.randn((rows, *self.shape))
        if self.cfg.train_text_encoder and self.sdxl:
            emb, pooled = sdxl.encode_prompt_sdxl([self.tokenizer] * 2, self.text_encoders, [""] * rows,
                                                  torch.device("cpu"))
        elif self.cfg.train_text_encoder:
            emb = batches.encode_prompt(self.tokenizer, self.text_encoder, [""] * rows, torch.device("cpu"))
        else:  # cached: the frozen encoders' output dtype (SDXL: cast to the second encoder's, as sdxl does)
            emb = torch.randn((rows, *self.emb_shape))
            pooled = torch.randn((rows, self.pooled)) if self.sdxl else None
        if not self.sdxl:
            return latents, emb, gen
        return latents, emb, gen, {"text_embeds": pooled, "time_ids": torch.zeros((rows, 6))}


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


def fake_components(cfg, confs: dict):
    """loop.setup's components from configs: UNet and text encoder(s) as fake tensors, the real noise schedule.
    Two text encoder configs (SDXL): the second is a CLIPTextModelWithProjection (its pooled projection)."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sched = DDPMScheduler.from_config(confs["scheduler"])
    mode = fake_mode()
    unet = _build_fake(lambda: UNet2DConditionModel.from_config(confs["unet"]), mode)
    encoders = []
    for cls, conf in zip((CLIPTextModel, CLIPTextModelWithProjection), confs["text_encoder"]):
        kw = {k: v for k, v in conf.items() if k not in ("architectures", "model_type")}
        encoders.append(_build_fake(lambda cls=cls, kw=kw: cls(CLIPTextConfig(**kw)), mode))
    vae = confs.get("vae") or {}
    factor = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
    return SimpleNamespace(unet=unet, text_encoder=encoders[0],
                           text_encoder_2=encoders[1] if len(encoders) > 1 else None, vae=None,
                           noise_scheduler=sched, prediction_type=confs["scheduler"].get("prediction_type", "epsilon"),
                           vae_factor=factor, fake_mode=mode)


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


def _stock_resident(cfg, confs, encoders, mode) -> list:
    """What diffusers' scripts keep on the GPU besides the trained models. train_dreambooth.py: the VAE and
    the frozen text encoder in the autocast dtype. SDXL (train_dreambooth_lora_sdxl.py): the VAE in float32
    (its own VAE overflows in float16); the frozen text encoders in the autocast dtype, except that the LoRA
    script frees them once the prompts are encoded (fixed prompts)."""
    from diffusers import AutoencoderKL

    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    xl = len(encoders) == 2
    with mode:
        vae = AutoencoderKL.from_config(confs["vae"]).to(dtype=torch.float32 if xl else half)
        out = [vae]
        if not cfg.train_text_encoder and not (xl and getattr(cfg, "lora_rank", None)):
            out += [te.to(dtype=half) for te in encoders]
    return out


def _as_on_gpu(run, fake: bool, foreach: bool = False) -> list:
    """Make the optimizer step as it would be on a GPU; returns the patches to undo."""
    from dbkernels.optim import adamw8bit, multi_tensor

    opt = run.optimizer
    undo = []
    if isinstance(opt, torch.optim.AdamW):  # loop.make_optimizer: fused for fp32 CUDA params, torch: foreach else
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


def track_step(cfg, *, confs: dict | None = None, comps=None, fake: bool = True) -> dict:
    """Run loop.setup and one loop.train_step with every storage tracked; phase peaks and categories."""
    import contextlib

    from trainer.core import loop

    device = torch.device("cpu")
    notes = []
    if comps is None:
        comps = fake_components(cfg, confs)
        factor, seq_len = comps.vae_factor, confs["text_encoder"][0].get("max_position_embeddings", 77)
        mode = comps.fake_mode
    else:
        factor = 2 ** (len(comps.vae.config.block_out_channels) - 1)
        seq_len = comps.tokenizer.model_max_length
        mode = contextlib.nullcontext()
        if fake:
            mode = fake_mode()
            comps.unet = _faked(comps.unet, mode)
            comps.text_encoder = _faked(comps.text_encoder, mode)
            if getattr(comps, "text_encoder_2", None) is not None:
                comps.text_encoder_2 = _faked(comps.text_encoder_2, mode)
    if getattr(cfg, "optimizer", "") == "bnb8bit":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            cfg = argparse_copy(cfg, optimizer="adamw8bit")
            notes.append("bitsandbytes is not installed: its 8-bit AdamW was estimated as ours (2 B of state per "
                         "parameter, as bitsandbytes keeps)")
    stock = bool(getattr(cfg, "stock_recipe", False)) and fake and confs is not None
    if stock:
        notes.append(STOCK_NOTE_XL if getattr(comps, "text_encoder_2", None) is not None else STOCK_NOTE)
    tracker = StorageTracker()
    te = comps.text_encoder
    encoders = [e for e in (te, getattr(comps, "text_encoder_2", None)) if e is not None]
    batches = StepBatches(cfg, encoders, tracker, latent_size=cfg.resolution // factor, seq_len=seq_len)
    undo = []
    with mode:
        frozen = loop.frozen_dtype
        if fake:  # a frozen base is stored in the autocast dtype on a GPU (loop.frozen_dtype)
            loop.frozen_dtype = lambda cfg, _device: frozen(cfg, torch.device("cuda"))
        try:
            with swappable(mode) if fake else contextlib.nullcontext():
                run = loop.setup(cfg, comps, batches, device)
        finally:
            loop.frozen_dtype = frozen
        resident = []  # diffusers' recipe keeps the VAE and a frozen text encoder on the GPU, in half precision
        if stock:
            with swappable(mode):
                resident = _stock_resident(cfg, confs, encoders, mode)
            batches.vae = resident[0]
        try:
            undo = _as_on_gpu(run, fake, foreach=stock)
            with tracker:
                on_gpu = [run.unet] + (encoders if cfg.train_text_encoder or run.new_tokens is not None else [])
                weights = [t for m in on_gpu + resident for t in (*m.parameters(), *m.buffers())]
                for t in weights:
                    tracker.add(t)
                tracker.add(run.alphas_cumprod)
                with track_backward(tracker, run.params, run.optimizer):
                    loop.train_step(run, 0)
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
    phases = {}
    for ph in PHASES:
        live = tracker.peaks.get(ph)
        if live is None or live.at_peak is None:
            continue
        cats = tracker.classify(live.at_peak, weight_keys, state_keys)
        # steady state: the states of earlier steps are alive in every phase (step 1 creates them)
        cats["optimizer_state"] = state_bytes
        rounding = sum(-n % ROUND for k, n in live.at_peak.items() if k not in state_keys)
        rounding += sum(-t.untyped_storage().nbytes() % ROUND for t in state)
        phases[ph] = {"peak_bytes": sum(cats.values()), "by_category": cats, "rounding_bytes": rounding}
    return {"phases": phases, "params": n_params, "trainable_params": n_train, "notes": notes}


ROUND = 512  # the CUDA caching allocator's block granularity


def _faked(module, mode):
    """The same model (class and config) built again with fake tensors."""
    if hasattr(module, "from_config"):  # diffusers
        return _build_fake(lambda: type(module).from_config(module.config), mode)
    return _build_fake(lambda: type(module)(module.config), mode)


def argparse_copy(ns, **changes):
    import argparse

    return argparse.Namespace(**{**vars(ns), **changes})
