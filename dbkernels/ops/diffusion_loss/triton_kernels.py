"""Triton kernels for add_noise and the fused DreamBooth loss (spec: reference.py).

Both kernels see the inputs as (B, M) rows (M = numel / B, channel = column // S)
on a (cdiv(M, BLOCK), B) grid. The loss kernel does everything in one launch: each
program writes the gradient of its block and one partial sum, and the last program
to finish (found with an atomic ticket) adds the partials in a fixed order, so the
result is deterministic, then resets the ticket counter to 0 for the next call.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _triton
from . import reference

# Globals used inside @triton.jit must be tl.constexpr: a plain module int compiles under the
# interpreter but is a NameError for the GPU compiler (python -m dbkernels compile checks it).
PHILOX_M0 = tl.constexpr(reference.PHILOX_M0)
PHILOX_M1 = tl.constexpr(reference.PHILOX_M1)
PHILOX_W0 = tl.constexpr(reference.PHILOX_W0)
PHILOX_W1 = tl.constexpr(reference.PHILOX_W1)
PHILOX_ROUNDS = tl.constexpr(reference.PHILOX_ROUNDS)


@triton.jit
def _philox_normal(idx, seed_lo, seed_hi):
    """Philox4x32-10 on counter (idx_lo, idx_hi, 0, 0) + Box-Muller; see reference.philox_normal."""
    c0 = (idx & 0xFFFFFFFF).to(tl.uint32)
    c1 = (idx >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    for r in tl.static_range(PHILOX_ROUNDS):
        p0 = c0.to(tl.uint64) * PHILOX_M0
        p1 = c2.to(tl.uint64) * PHILOX_M1
        hi0 = (p0 >> 32).to(tl.uint32)
        lo0 = p0.to(tl.uint32)
        hi1 = (p1 >> 32).to(tl.uint32)
        lo1 = p1.to(tl.uint32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0).to(tl.uint32)  # wrap mod 2^32 whatever the promotion
        k1 = (k1 + PHILOX_W1).to(tl.uint32)
    u1 = ((c0 >> 8) + 1).to(tl.float32) * (1.0 / 16777216.0)
    u2 = (c1 >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit
def _load_eps(noise_ptr, offset_ptr, gidx, col, row, mask, C, S, seed_lo, seed_hi,
              HAS_NOISE: tl.constexpr, HAS_OFFSET: tl.constexpr):
    if HAS_NOISE:
        eps = tl.load(noise_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
    else:
        eps = _philox_normal(gidx, seed_lo, seed_hi)
    if HAS_OFFSET:
        eps += tl.load(offset_ptr + row * C + col // S, mask=mask, other=0.0).to(tl.float32)
    return eps


@triton.jit
def _abar(t_ptr, ac_ptr, row, n_t):
    """(alphas_cumprod[t_row] or NaN for a t outside [0, n_t), in range flag): never reads out of bounds."""
    t = tl.load(t_ptr + row)
    ok = (t >= 0) & (t < n_t)
    abar = tl.load(ac_ptr + tl.where(ok, t, 0)).to(tl.float32)
    return tl.where(ok, abar, float("nan")), ok


@triton.jit
def _add_noise_kernel(x0_ptr, noise_ptr, offset_ptr, t_ptr, ac_ptr, out_ptr, M, C, S, n_t, seed_lo, seed_hi,
                      HAS_NOISE: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(1)
    col = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = col < M
    gidx = row.to(tl.int64) * M + col
    abar, _ = _abar(t_ptr, ac_ptr, row, n_t)
    x0 = tl.load(x0_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
    eps = _load_eps(noise_ptr, offset_ptr, gidx, col, row, mask, C, S, seed_lo, seed_hi, HAS_NOISE, HAS_OFFSET)
    # sqrt_rn: IEEE square roots, as sqrtf in csrc and the reference (tl.sqrt is approximate)
    xt = tl.sqrt_rn(abar) * x0 + tl.sqrt_rn(1.0 - abar) * eps
    tl.store(out_ptr + gidx, xt.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _diffusion_loss_kernel(pred_ptr, x0_ptr, noise_ptr, offset_ptr, t_ptr, ac_ptr, grad_ptr,
                           partial_ptr, counter_ptr, loss_ptr,
                           M, C, S, n_t, num_partials, n_inst, inst_scale, prior_scale, snr_gamma, seed_lo, seed_hi,
                           PRED_TYPE: tl.constexpr, USE_SNR: tl.constexpr, HAS_NOISE: tl.constexpr,
                           HAS_OFFSET: tl.constexpr, WRITE_GRAD: tl.constexpr,
                           BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    row = tl.program_id(1)
    n_col_blocks = tl.num_programs(0)

    abar, t_ok = _abar(t_ptr, ac_ptr, row, n_t)
    a = tl.sqrt_rn(abar)
    s = tl.sqrt_rn(1.0 - abar)
    w = 1.0
    if USE_SNR:
        snr = abar / (1.0 - abar)
        if PRED_TYPE == 0:
            w = tl.minimum(snr_gamma / snr, 1.0)
        elif PRED_TYPE == 1:
            w = tl.minimum(snr, snr_gamma) / (snr + 1.0)
        else:
            w = tl.minimum(snr, snr_gamma)
    scale = tl.where(row < n_inst, inst_scale, prior_scale)
    coef = tl.where(t_ok, scale * w, float("nan"))  # an out-of-range t poisons its row, as on CUDA

    col = pid_m * BLOCK + tl.arange(0, BLOCK)
    mask = col < M
    gidx = row.to(tl.int64) * M + col
    pred = tl.load(pred_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
    if PRED_TYPE == 0:
        target = _load_eps(noise_ptr, offset_ptr, gidx, col, row, mask, C, S, seed_lo, seed_hi, HAS_NOISE, HAS_OFFSET)
    elif PRED_TYPE == 1:
        eps = _load_eps(noise_ptr, offset_ptr, gidx, col, row, mask, C, S, seed_lo, seed_hi, HAS_NOISE, HAS_OFFSET)
        x0 = tl.load(x0_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
        target = a * eps - s * x0
    else:
        target = tl.load(x0_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
    d = tl.where(mask, pred - target, 0.0)
    if WRITE_GRAD:
        tl.store(grad_ptr + gidx, (2.0 * coef * d).to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + row * n_col_blocks + pid_m, coef * tl.sum(d * d, axis=0))

    # Publish the partial (barrier + release atomic), then the last arrival reduces.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == num_partials - 1:
        acc = tl.zeros((RBLOCK,), dtype=tl.float32)
        for start in range(0, num_partials, RBLOCK):
            offs = start + tl.arange(0, RBLOCK)
            acc += tl.load(partial_ptr + offs, mask=offs < num_partials, other=0.0, cache_modifier=".cg")
        tl.store(loss_ptr, tl.sum(acc, axis=0))
        tl.atomic_xchg(counter_ptr, 0)


PRED_TYPE_CODE = {"epsilon": 0, "v_prediction": 1, "sample": 2}


def _block(m: int) -> int:
    # Whole rows in one program when small; 2048 keeps enough programs in flight at SD sizes.
    return max(128, min(2048, triton.next_power_of_2(m)))


def _geometry(x: torch.Tensor):
    b = x.shape[0]
    m = x.numel() // b
    c = x.shape[1] if x.dim() > 1 else 1
    return b, m, c, max(1, m // c)


def _seed_words(seed: int | None):
    seed = 0 if seed is None else seed
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def add_noise(x0, noise, noise_offset, timesteps, alphas_cumprod, *, seed):
    out = torch.empty_like(x0)
    b, m, c, s = _geometry(x0)
    blk = _block(m)
    lo, hi = _seed_words(seed)
    _triton.launch(
        _add_noise_kernel, (triton.cdiv(m, blk), b), x0.device,
        x0, x0 if noise is None else noise, x0 if noise_offset is None else noise_offset,
        timesteps, alphas_cumprod, out, m, c, s, alphas_cumprod.shape[0], lo, hi,
        HAS_NOISE=noise is not None, HAS_OFFSET=noise_offset is not None, BLOCK=blk,
        num_warps=4 if blk <= 1024 else 8)
    return out


def loss_fwd(pred, x0, noise, noise_offset, timesteps, alphas_cumprod, *, pred_type, n_inst,
             inst_scale, prior_scale, snr_gamma, seed, need_grad, counter):
    b, m, c, s = _geometry(pred)
    blk = _block(m)
    grid = (triton.cdiv(m, blk), b)
    partials = torch.empty(grid[0] * grid[1], device=pred.device, dtype=torch.float32)
    loss = torch.empty((), device=pred.device, dtype=torch.float32)
    grad = torch.empty_like(pred) if need_grad else None
    lo, hi = _seed_words(seed)
    try:
        _triton.launch(
            _diffusion_loss_kernel, grid, pred.device,
            pred, x0, x0 if noise is None else noise, x0 if noise_offset is None else noise_offset,
            timesteps, alphas_cumprod, pred if grad is None else grad, partials, counter, loss,
            m, c, s, alphas_cumprod.shape[0], grid[0] * grid[1], n_inst, inst_scale, prior_scale, max(snr_gamma, 0.0), lo, hi,
            PRED_TYPE=pred_type, USE_SNR=snr_gamma >= 0, HAS_NOISE=noise is not None,
            HAS_OFFSET=noise_offset is not None, WRITE_GRAD=need_grad,
            BLOCK=blk, RBLOCK=min(1024, triton.next_power_of_2(grid[0] * grid[1])),
            num_warps=4 if blk <= 1024 else 8)
    except BaseException:
        counter.zero_()  # an interrupted launch (interpreter) must not leave a stale ticket
        raise
    return loss, grad

