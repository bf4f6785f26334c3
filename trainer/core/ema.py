"""--use_ema: an exponential moving average of the trained tensors (diffusers' EMAModel), kept beside the run.

What: run.params, whatever the method trains (the whole UNet, LoRA adapters, new token rows, the text encoders).
When: after every optimizer step that was taken; a skipped step, or one the guard took back, leaves the average as
  it was. The loop updates it after train_step returns: with --step_in_backward the update already ran inside
  backward, under torchrun (--shard too) the new weights are already whole on every rank, so every rank keeps the
  same average and only rank 0 writes it.
Decay: diffusers' warm-up: update n (0-based) uses 0 for n = 0 (the average becomes the weights), then
  min(--ema_decay, (1 + n) / (10 + n)).
Where: --ema_device (not given: the training device; cpu: the weights are copied to host buffers after each step
  and averaged there), --ema_dtype fp32 | bf16 (stochastically rounded: a rounded-to-nearest bf16 average would
  never move). One dbkernels.ema_update_ call per step (one fused launch per dtype group on a GPU), its rounding
  seeded by n, so a resumed run continues bitwise.
Saved: checkpoint-N/ema/ema.safetensors (the averages by position, and n). The exported model and the validation
  images are the average (it is copied into the trained tensors while they are made, the trained values put back
  after); --save_raw_weights also exports the trained tensors themselves into output_dir/raw.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.formats import diffusers_folder, outdir

FOLDER = "ema"  # the checkpoint item (checkpoint-N/ema/)
FILE = "ema.safetensors"
RAW = "raw"  # output_dir/raw: --save_raw_weights
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def warmup_decay(n: int, decay: float) -> float:
    """The decay of update n (0-based) as diffusers' EMAModel warms it up."""
    return 0.0 if n == 0 else min(decay, (1 + n) / (10 + n))


class Ema:
    """The average of `params` (see the module docstring); a checkpoint item (save_pretrained / load_pretrained)."""

    def __init__(self, params: list, *, decay: float, device: torch.device, dtype: torch.dtype, kernels: bool = True):
        self.params, self.decay, self.device, self.dtype, self.kernels = list(params), decay, device, dtype, kernels
        with torch.no_grad():
            self.averages = [p.detach().to(device=device, dtype=dtype, copy=True) for p in self.params]
        self.updates = 0  # n: how many updates the average has had
        self._host = None  # --ema_device cpu from a GPU: pinned copies of the weights

    def decay_at(self, n: int) -> float:
        return warmup_decay(n, self.decay)

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.averages)

    def describe(self) -> str:
        return (f"EMA: decay {self.decay:g} (warm-up), {len(self.averages)} tensors ({self.nbytes() / 2**20:.1f} MB) "
                f"on {self.device.type} in {str(self.dtype).replace('torch.', '')}")

    def _weights(self) -> list:
        weights = [p.detach() for p in self.params]
        if all(w.device == a.device for w, a in zip(weights, self.averages)):
            return weights
        if self._host is None:  # pinned: the copies from the GPU run asynchronously
            pin = torch.cuda.is_available()
            self._host = [torch.empty(w.shape, dtype=w.dtype, pin_memory=pin) for w in weights]
        for h, w in zip(self._host, weights):
            h.copy_(w, non_blocking=True)
        for dev in {w.device for w in weights if w.device.type == "cuda"}:
            torch.cuda.synchronize(dev)
        return self._host

    @torch.no_grad()
    def update(self) -> None:
        """One update from the trained tensors as they are now (after an optimizer step that was taken)."""
        import dbkernels

        backend = contextlib.nullcontext() if self.kernels else dbkernels.force_backend("reference")
        with backend:  # (--kernels off: every dbkernels op runs its PyTorch reference)
            dbkernels.ema_update_(self.averages, self._weights(), self.decay_at(self.updates), step=self.updates)
        self.updates += 1

    def reset(self) -> None:
        """Start again from the trained tensors as they are (a checkpoint without an average)."""
        with torch.no_grad():
            for a, p in zip(self.averages, self.params):
                a.copy_(p.detach())
        self.updates = 0

    # ---- the checkpoint item
    def state_dict(self) -> dict:
        return {f"{i:05d}": a for i, a in enumerate(self.averages)}

    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, folder / FILE,
                  metadata={"updates": str(self.updates), "decay": repr(self.decay), "dtype": str(self.dtype)})

    def load_pretrained(self, folder) -> None:
        from safetensors import safe_open

        from trainer.formats.safe_load import load_tensors, require_finite

        path = Path(folder) / FILE
        state = load_tensors(path)
        mine = self.state_dict()
        if set(state) != set(mine) or any(tuple(state[k].shape) != tuple(mine[k].shape) for k in mine):
            raise UserError(f"{path} holds the average of other tensors ({len(state)} for this run's {len(mine)}); "
                            f"resume with the options it was made with, or choose a new --output_dir")
        require_finite(state, path, "average")
        with safe_open(path, "pt") as f:
            updates = int((f.metadata() or {}).get("updates", 0))
        with torch.no_grad():
            for k, a in mine.items():
                a.copy_(state[k])
        self.updates = updates


def check(opts, device: torch.device) -> None:
    """--ema_device against the training device (before anything loads)."""
    if opts.ema.use_ema and opts.ema.ema_device == "cuda" and device.type != "cuda":
        raise UserError("--ema_device cuda keeps the average on the GPU, but this run trains on the CPU; leave "
                        "--ema_device out (the average then lives where the run trains) or pass --ema_device cpu")


def make(opts, params: list, device: torch.device) -> Ema | None:
    """The run's average (None without --use_ema), starting at the trained tensors as they are."""
    e = opts.ema
    if not e.use_ema:
        return None
    check(opts, device)
    where = torch.device("cpu") if e.ema_device == "cpu" else device
    return Ema(params, decay=e.ema_decay, device=where, dtype=DTYPES[e.ema_dtype], kernels=opts.training.kernels)


@contextlib.contextmanager
def averaged(run):
    """Within: the run's trained tensors hold the average (their trained values wait on the CPU and come back)."""
    ema = run.ema
    if ema is None:
        yield
        return
    with torch.no_grad():
        kept = [p.detach().to("cpu", copy=True) for p in ema.params]
        for p, a in zip(ema.params, ema.averages):
            p.copy_(a)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, k in zip(ema.params, kept):
                p.copy_(k)


def raw_folder(out: Path) -> Path:
    """output_dir/raw, marked as this run's (the method's export writes there as into output_dir)."""
    raw = Path(out) / RAW
    raw.mkdir(exist_ok=True)
    if outdir.read_marker(raw) is None:
        outdir.write_marker(raw, raw_weights_of=str(Path(out).resolve()), exported=[])
    diffusers_folder.remove_temporaries(raw)  # (of an export killed there)
    return raw


def raw_options(opts, raw: Path):
    """The run's options as written of output_dir/raw (its dreambooth.json names the base model from there)."""
    return dataclasses.replace(opts, checkpoints=dataclasses.replace(opts.checkpoints, output_dir=str(raw)))
