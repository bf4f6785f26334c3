"""Triton kernels for add_noise and the fused DreamBooth loss (spec: reference.py).

Both kernels see the inputs as (B, M) rows (M = numel / B, channel = column // S)
on a (cdiv(M, BLOCK), B) grid. The loss kernel does everything in one launch: each
program writes the gradient of its block and one partial sum, and the last program
to finish (found with an atomic ticket) adds the partials in a fixed order, so the
result is deterministic, then resets the ticket counter to 0 for the next call.
The loss kernel's constexprs HAS_MASK (an fp32 (Bm, Cm, S) mask read with stride 0 over a
broadcast row / channel), LOSS_TYPE (0 l2, 1 huber, 2 smooth_l1) and ROW_C (a c per row)
add the masked and robust losses; LOSS_TYPE=0 without a mask is the plain kernel.
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
def _elementwise(d, c, coef, LOSS_TYPE: tl.constexpr):
    """(a, b, g): the element's loss is a * b, its gradient g (spec: reference.elementwise_loss/_grad).

    The loss is returned as two factors so that a mask multiplies the first one: (1 * a) * b is
    a * b bit for bit, also where the GPU compiler fuses the product into the row sum's add."""
    if LOSS_TYPE == 0:
        a = d
        b = d
        g = 2.0 * coef * d
    else:
        dd = d * d
        r = tl.sqrt_rn(dd + c * c)
        if LOSS_TYPE == 1:
            k = 2.0 * c
        else:
            k = 2.0
        a = k
        b = dd / (r + c)  # = sqrt(d^2 + c^2) - c without the cancellation
        g = coef * (k * (d / r))
    return a, b, g


@triton.jit
def _diffusion_loss_kernel(pred_ptr, x0_ptr, noise_ptr, offset_ptr, t_ptr, ac_ptr, grad_ptr,
                           partial_ptr, counter_ptr, loss_ptr, mask_ptr, c_ptr,
                           M, C, S, n_t, num_partials, n_inst, inst_scale, prior_scale, snr_gamma, seed_lo, seed_hi,
                           huber_c, mask_row_stride, mask_ch_stride,
                           PRED_TYPE: tl.constexpr, USE_SNR: tl.constexpr, HAS_NOISE: tl.constexpr,
                           HAS_OFFSET: tl.constexpr, WRITE_GRAD: tl.constexpr,
                           HAS_MASK: tl.constexpr, LOSS_TYPE: tl.constexpr, ROW_C: tl.constexpr,
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
    if ROW_C:
        c = tl.load(c_ptr + row).to(tl.float32)
    else:
        c = huber_c

    col = pid_m * BLOCK + tl.arange(0, BLOCK)
    in_row = col < M
    gidx = row.to(tl.int64) * M + col
    pred = tl.load(pred_ptr + gidx, mask=in_row, other=0.0).to(tl.float32)
    if PRED_TYPE == 0:
        target = _load_eps(noise_ptr, offset_ptr, gidx, col, row, in_row, C, S, seed_lo, seed_hi, HAS_NOISE,
                           HAS_OFFSET)
    elif PRED_TYPE == 1:
        eps = _load_eps(noise_ptr, offset_ptr, gidx, col, row, in_row, C, S, seed_lo, seed_hi, HAS_NOISE,
                        HAS_OFFSET)
        x0 = tl.load(x0_ptr + gidx, mask=in_row, other=0.0).to(tl.float32)
        target = a * eps - s * x0
    else:
        target = tl.load(x0_ptr + gidx, mask=in_row, other=0.0).to(tl.float32)
    d = tl.where(in_row, pred - target, 0.0)
    la, lb, g = _elementwise(d, c, coef, LOSS_TYPE)
    if HAS_MASK:
        # (Bm, Cm, S) fp32; a stride of 0 broadcasts over the rows / channels
        ch = col // S
        midx = row.to(tl.int64) * mask_row_stride + ch * mask_ch_stride + (col - ch * S)
        mk = tl.load(mask_ptr + midx, mask=in_row, other=0.0)
        la = mk * la
        g = g * mk
    if WRITE_GRAD:
        tl.store(grad_ptr + gidx, g.to(grad_ptr.dtype.element_ty), mask=in_row)
    tl.store(partial_ptr + row * n_col_blocks + pid_m, coef * tl.sum(la * lb, axis=0))

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


def _mask_strides(mask, b, c, s):
    """Row and channel strides of the (Bm, Cm, S) mask: 0 where it broadcasts."""
    if mask is None:
        return 0, 0
    return (mask.shape[1] * s if mask.shape[0] != 1 else 0), (s if mask.shape[1] != 1 else 0)


def loss_fwd(pred, x0, noise, noise_offset, timesteps, alphas_cumprod, *, pred_type, n_inst,
             inst_scale, prior_scale, snr_gamma, seed, need_grad, counter, mask=None, loss_type=0,
             huber_c=0.1, huber_c_rows=None):
    b, m, c, s = _geometry(pred)
    mask_rs, mask_cs = _mask_strides(mask, b, c, s)
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
            alphas_cumprod if mask is None else mask, alphas_cumprod if huber_c_rows is None else huber_c_rows,
            m, c, s, alphas_cumprod.shape[0], grid[0] * grid[1], n_inst, inst_scale, prior_scale, max(snr_gamma, 0.0), lo, hi,
            float(huber_c), mask_rs, mask_cs,
            PRED_TYPE=pred_type, USE_SNR=snr_gamma >= 0, HAS_NOISE=noise is not None,
            HAS_OFFSET=noise_offset is not None, WRITE_GRAD=need_grad,
            HAS_MASK=mask is not None, LOSS_TYPE=loss_type, ROW_C=loss_type != 0 and huber_c_rows is not None,
            BLOCK=blk, RBLOCK=min(1024, triton.next_power_of_2(grid[0] * grid[1])),
            num_warps=4 if blk <= 1024 else 8)
    except BaseException:
        counter.zero_()  # an interrupted launch (interpreter) must not leave a stale ticket
        raise
    return loss, grad

