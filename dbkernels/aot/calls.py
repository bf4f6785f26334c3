"""The real calls that training SD 1.5, SD 2.x and SDXL makes into dbkernels' Triton kernels.

Each call runs the library's public function (dbkernels.attention forward + backward,
diffusion_loss, add_noise, AdamW8bit.step, AdamW4bit.step) on CPU stand-in tensors with the shapes,
dtypes and memory layouts of the real call, so the JIT specialises exactly as it would
on the GPU:

* attention: every UNet level of each model at its native resolution, batch 2
  (instance + class image), self-attention, cross-attention over the 77 text tokens,
  and self-attention with a key bias over 2x the keys (FABRIC with one reference);
  q, k, v are the (B, L, H, D) projections viewed as (B, H, L, D) as diffusers'
  processors pass them; the gradient arrives in the same layout. fp16, bf16 (autocast)
  and fp32 (no mixed precision).
* diffusion_loss / add_noise: the models' latent sizes, every prediction type, min-SNR
  on/off, noise tensor or seeded noise, offset noise on/off, with and without the
  gradient, the UNet output in fp32 / bf16 / fp16 against fp32 latents; and the
  trainer's masked / robust losses (noise tensor, gradient, min-SNR and offset on/off):
  a (B, 1, H, W) mask on/off x l2 / huber / smooth_l1 with one c or a c per row.
* AdamW8bit and AdamW4bit: fp32 / bf16 / fp16 parameters, 8-bit (4-bit) and fp32 state, every block
  size, stochastic rounding on/off.

`quick` marks the CI subset: each kernel and each value of each constexpr branch once
per architecture (HAS_BIAS, PREC, SM, both head-dim layouts; PRED_TYPE, USE_SNR,
HAS_NOISE, HAS_OFFSET, WRITE_GRAD, HAS_MASK, LOSS_TYPE, ROW_C; QUANT, SR, IS_BF16; the 4-bit SR, IS_BF16).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_TOKENS = 77

# (latent side at the model's native resolution, [(tokens, heads, head dim) per attention level])
MODELS = {
    "sd15": (64, [(64 * 64, 8, 40), (32 * 32, 8, 80), (16 * 16, 8, 160), (8 * 8, 8, 160)]),
    "sd21": (96, [(96 * 96, 5, 64), (48 * 48, 10, 64), (24 * 24, 20, 64), (12 * 12, 20, 64)]),
    "sdxl": (128, [(64 * 64, 10, 64), (32 * 32, 20, 64)]),
}


@dataclass(frozen=True)
class Call:
    id: str
    op: str
    shape: str
    dtype: str
    models: tuple
    fn: Callable = field(compare=False, repr=False)
    quick: bool = False
    head_dim: int | None = None
    sweep: bool = True   # in the --full sweep (attention: one call per head dim, kind and dtype)

    def run(self) -> None:
        self.fn()


# ---------------------------------------------------------------------------- attention

def _attention(b, h, lq, lk, d, dtype, bias, odd_strides=False):
    import dbkernels

    def proj(length):
        if odd_strides:  # a row stride that is not a multiple of 8 elements (kernel constexpr SM = 1)
            base = torch.empty(b * h * length * (d + 1), dtype=dtype)
            return base.as_strided((b, h, length, d), (h * length * (d + 1), length * (d + 1), d + 1, 1))
        return torch.empty(b, length, h * d, dtype=dtype).view(b, length, h, d).transpose(1, 2)

    q, k, v = (proj(n).requires_grad_() for n in (lq, lk, lk))
    kb = torch.zeros(b, lk) if bias else None
    out = dbkernels.attention(q, k, v, key_bias=kb)
    # the gradient comes back through transpose(1, 2).reshape(B, L, H*D), as in a diffusers layer
    out.backward(torch.empty(b, lq, h * d, dtype=dtype).view(b, lq, h, d).transpose(1, 2))


def _attention_calls() -> list[Call]:
    found: dict[tuple, Call] = {}
    for model, (_, levels) in MODELS.items():
        for lq, h, d in levels:
            for kind, lk, bias in (("self", lq, False), ("cross", TEXT_TOKENS, False), ("self+bias", 2 * lq, True)):
                for dt in DTYPES:
                    key = (lq, lk, h, d, dt, bias)
                    if key in found:
                        found[key] = Call(**{**found[key].__dict__, "models": found[key].models + (model,)})
                        continue
                    found[key] = Call(
                        id=f"attention/{model}/L{lq}/{kind}/{dt}", op="attention",
                        shape=f"B2 H{h} Lq{lq} Lk{lk} D{d}{' bias' if bias else ''}", dtype=dt,
                        models=(model,), head_dim=d,
                        fn=lambda a=(2, h, lq, lk, d, DTYPES[dt], bias): _attention(*a))
    calls = list(found.values())
    # The sweep (every config) compiles one call per (head dim, cross / self+bias, bf16 / fp32): the
    # other UNet levels and fp16 differ only in integer specialisations and the element type, and
    # the curated sets picked from the sweep are then compiled for *every* call by the default run.
    first = set()
    for i, c in enumerate(calls):
        kind = c.id.split("/")[3]
        key = (c.head_dim, kind, c.dtype)
        keep = kind in ("cross", "self+bias") and c.dtype in ("bf16", "fp32") and key not in first
        first.add(key)
        calls[i] = Call(**{**c.__dict__, "sweep": keep})
    # the CI subset: split and padded layouts (D=40 has both), bias, bf16, the diffusers layout;
    # then fp32 (PREC ieee), no bias, a row stride that is not a multiple of 8 (SM = 1), cross-attention
    calls.append(Call(id="attention/quick/d40-self-bias-bf16", op="attention", shape="B1 H2 Lq64 Lk64 D40 bias",
                      dtype="bf16", models=(), head_dim=40, quick=True,
                      fn=lambda: _attention(1, 2, 64, 64, 40, torch.bfloat16, True)))
    calls.append(Call(id="attention/quick/d64-cross-fp32-oddstrides", op="attention",
                      shape="B1 H2 Lq64 Lk77 D64 row stride 65", dtype="fp32", models=(), head_dim=64, quick=True,
                      fn=lambda: _attention(1, 2, 64, TEXT_TOKENS, 64, torch.float32, False, odd_strides=True)))
    return calls


# ---------------------------------------------------------------------------- loss / add_noise

# loss variants of the trainer beyond plain l2: "<loss type>" (one c) or "<loss type>-rows" (a c per row)
LOSS_VARIANTS = ("l2", "huber", "huber-rows", "smooth_l1", "smooth_l1-rows")


def _loss(side, pred_dtype, pred_type, snr, seeded, offset, grad, batch=2, num_prior=1, mask=False, loss="l2"):
    import dbkernels

    pred = torch.empty(batch, 4, side, side, dtype=pred_dtype).requires_grad_(grad)
    x0 = torch.empty(batch, 4, side, side)
    noise = None if seeded else torch.empty(batch, 4, side, side)
    t = torch.zeros(batch, dtype=torch.int64)
    ac = torch.ones(1000)
    off = torch.zeros(batch, 4) if offset else None
    loss_type = loss.removesuffix("-rows")
    huber_c = torch.full((batch,), 0.1) if loss.endswith("-rows") else 0.1
    with torch.set_grad_enabled(grad):
        dbkernels.diffusion_loss(pred, x0, noise, t, ac, prediction_type=pred_type, num_prior=num_prior,
                                 snr_gamma=5.0 if snr else None, noise_offset=off, seed=7 if seeded else None,
                                 mask=torch.ones(batch, 1, side, side) if mask else None, loss_type=loss_type,
                                 huber_c=huber_c, validate=False)


def _add_noise(side, dtype, seeded, offset, batch=2):
    import dbkernels

    x0 = torch.empty(batch, 4, side, side, dtype=dtype)
    noise = None if seeded else torch.empty(batch, 4, side, side, dtype=dtype)
    off = torch.zeros(batch, 4) if offset else None
    dbkernels.add_noise(x0, noise, torch.zeros(batch, dtype=torch.int64), torch.ones(1000), noise_offset=off,
                        seed=7 if seeded else None, validate=False)


_QUICK_LOSS = {  # every value of every constexpr branch of the loss kernel, and all three pred dtypes
    ("bf16", "epsilon", True, True, True, True, False, "l2"), ("fp32", "v_prediction", False, False, False, False,
                                                               False, "l2"),
    ("fp16", "sample", True, False, True, True, True, "smooth_l1-rows"),
    ("bf16", "v_prediction", False, False, False, True, False, "huber"),
}
_QUICK_NOISE = {("fp32", True, True), ("bf16", False, False)}


def _robust_loss_call(model, side, dt, pt, snr, offset, mask, loss) -> Call:
    tag = "".join(c for c, on in zip("SOG", (snr, offset, True)) if on) + ("M" if mask else "")
    return Call(
        id=f"diffusion_loss/{model}/{dt}/{pt}/{tag}/{loss}", op="diffusion_loss",
        shape=f"2x4x{side}x{side} {pt} snr={int(snr)} offset={int(offset)} mask={int(mask)} {loss}", dtype=dt,
        models=(model,), quick=model == "sd15" and (dt, pt, snr, False, offset, True, mask, loss) in _QUICK_LOSS,
        fn=lambda a=(side, DTYPES[dt], pt, snr, False, offset, True): _loss(*a, mask=mask, loss=loss))


def _loss_calls() -> list[Call]:
    calls = []
    flags = [(snr, seeded, offset, grad) for snr in (False, True) for seeded in (False, True)
             for offset in (False, True) for grad in (False, True)]
    for model, (side, _) in MODELS.items():
        for dt in DTYPES:
            for pt in ("epsilon", "v_prediction", "sample"):
                for snr, seeded, offset, grad in flags:
                    tag = "".join(c for c, on in zip("SNOG", (snr, seeded, offset, grad)) if on) or "-"
                    calls.append(Call(
                        id=f"diffusion_loss/{model}/{dt}/{pt}/{tag}", op="diffusion_loss",
                        shape=f"2x4x{side}x{side} {pt} snr={int(snr)} seeded={int(seeded)} offset={int(offset)} "
                              f"grad={int(grad)}", dtype=dt, models=(model,),
                        quick=model == "sd15" and (dt, pt, snr, seeded, offset, grad, False, "l2") in _QUICK_LOSS,
                        fn=lambda a=(side, DTYPES[dt], pt, snr, seeded, offset, grad): _loss(*a)))
                # the trainer's masked / robust losses: noise tensor and gradient, as it calls them
                for snr, offset, mask, loss in itertools.product((False, True), (False, True), (False, True),
                                                                 LOSS_VARIANTS):
                    if mask or loss != "l2":
                        calls.append(_robust_loss_call(model, side, dt, pt, snr, offset, mask, loss))
        for dt in DTYPES:
            for seeded in (False, True):
                for offset in (False, True):
                    calls.append(Call(
                        id=f"add_noise/{model}/{dt}/{'seeded' if seeded else 'noise'}{'+offset' if offset else ''}",
                        op="add_noise", shape=f"2x4x{side}x{side} seeded={int(seeded)} offset={int(offset)}",
                        dtype=dt, models=(model,), quick=model == "sd15" and (dt, seeded, offset) in _QUICK_NOISE,
                        fn=lambda a=(side, DTYPES[dt], seeded, offset): _add_noise(*a)))
    return calls


# ---------------------------------------------------------------------------- AdamW8bit / AdamW4bit

def _adamw(dtype, block_size, quantized, sr, optimizer="AdamW8bit"):
    from dbkernels import optim

    n = 320 * 320 if quantized else 320  # an SD attention projection's weight / a bias (fp32 state)
    p = torch.zeros(n, dtype=dtype, requires_grad=True)
    p.grad = torch.zeros_like(p)
    getattr(optim, optimizer)([p], lr=1e-4, block_size=block_size, stochastic_rounding=sr).step()


_QUICK_ADAMW = {("fp32", 256, True, True), ("bf16", 4096, True, True), ("bf16", 32, True, False),
                ("fp16", 256, False, True)}
# 4-bit (its fp32 states run AdamW8bit's kernel): SR and IS_BF16 each both ways, bf16 without SR (the hand
# round to nearest), the paper's block and the largest
_QUICK_ADAMW4 = {("bf16", 128, True, True), ("bf16", 4096, True, False), ("fp16", 256, True, True)}


def _adamw_calls(op="adamw8bit", optimizer="AdamW8bit", bits=8, quick_set=_QUICK_ADAMW) -> list[Call]:
    from dbkernels.optim.adamw8bit import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE

    blocks = [1 << k for k in range(MIN_BLOCK_SIZE.bit_length() - 1, MAX_BLOCK_SIZE.bit_length())]
    calls = []
    for dt in DTYPES:
        for sr in ((True, False) if dt == "bf16" else (True,)):
            for quantized, bs_list in ((True, blocks), (False, [256])):
                for bs in bs_list:
                    calls.append(Call(
                        id=f"{op}/{dt}/{f'{bits}bit' if quantized else 'fp32state'}/bs{bs}/sr{int(sr)}",
                        op=op, shape=f"{320 * 320 if quantized else 320} params block {bs}", dtype=dt,
                        models=tuple(MODELS), quick=(dt, bs, quantized, sr) in quick_set,
                        fn=lambda a=(DTYPES[dt], bs, quantized, sr): _adamw(*a, optimizer=optimizer)))
    return calls


def _adamw4bit_calls() -> list[Call]:
    return _adamw_calls("adamw4bit", "AdamW4bit", 4, _QUICK_ADAMW4)


# ---------------------------------------------------------------------------- EMA (--use_ema)

def _ema(avg_dtype, w_dtype, unaligned):
    import dbkernels

    # one SD layer's tensors: a projection weight, its bias, an odd-sized one; unaligned: a weight at an odd
    # element offset (not 16-byte aligned: the kernel's ALIGNED=False branch)
    shapes = ((320, 320), (320,), (77, 3))
    avgs = [torch.zeros(s, dtype=avg_dtype) for s in shapes]
    ws = [torch.zeros(s, dtype=w_dtype) for s in shapes]
    if unaligned:
        ws[0] = torch.zeros(320 * 320 + 1, dtype=w_dtype)[1:].view(320, 320)
    dbkernels.ema_update_(avgs, ws, 0.9999, step=1)


_QUICK_EMA = {("fp32", "fp32", False), ("bf16", "bf16", True)}  # SR and ALIGNED each both ways


def _ema_calls() -> list[Call]:
    calls = []
    for adt in ("fp32", "bf16"):
        for wdt in DTYPES:
            for unaligned in (False, True):
                calls.append(Call(
                    id=f"ema_update/{adt}/{wdt}{'/unaligned' if unaligned else ''}", op="ema_update",
                    shape="320x320 + 320 + 77x3" + (" unaligned" if unaligned else ""), dtype=adt,
                    models=tuple(MODELS), quick=(adt, wdt, unaligned) in _QUICK_EMA,
                    fn=lambda a=(DTYPES[adt], DTYPES[wdt], unaligned): _ema(*a)))
    return calls


def all_calls() -> list[Call]:
    return _attention_calls() + _loss_calls() + _adamw_calls() + _adamw4bit_calls() + _ema_calls()


def by_id() -> dict[str, Call]:
    return {c.id: c for c in all_calls()}


def select(*, models=None, quick=False, ops=None, sweep=False) -> list[Call]:
    """The calls of `models` (None: all three), or the quick subset, or the sweep's; `ops` filters by op."""
    out = []
    for c in all_calls():
        if ops and c.op not in ops:
            continue
        if sweep and not c.sweep:
            continue
        if quick:
            if c.quick:
                out.append(c)
        elif c.models and (models is None or set(c.models) & set(models)):
            out.append(c)
    return out
