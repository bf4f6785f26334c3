"""Triton step of AdamW8bit (spec: reference.py, quant.py).

One launch per parameter tensor (not multi-tensor: a Triton kernel cannot take a table
of pointers of mixed element types portably, and the CUDA backend is the multi-tensor
path). Each program owns ROWS quantization blocks as a (ROWS, BLOCK) tile: it
dequantizes m and v, applies the update in fp32 registers, writes the parameter
(bf16: stochastic rounding), takes the new absmax of each block row and requantizes,
all in one pass over memory; the state codes are rounded stochastically with hash bits.
Launched with enable_fp_fusion=False and the _rn division
and square root so it computes exactly the reference's fp32 operations.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _triton
from . import quant, reference
from .reference import hyperparams, sr_key

# Globals used inside @triton.jit must be tl.constexpr objects: a plain module int (or an
# annotation `X: tl.constexpr = 4`) runs under the interpreter but is a NameError for the GPU
# compiler (python -m dbkernels compile checks every kernel for sm_86 / sm_90).
MBITS = tl.constexpr(quant.MBITS)
MANT_ONE = tl.constexpr(1 << quant.MBITS)        # (the interpreter has no int << constexpr)
MANT_MASK = tl.constexpr((1 << quant.MBITS) - 1)
FMIX_C1 = tl.constexpr(reference.FMIX_C1)
FMIX_C2 = tl.constexpr(reference.FMIX_C2)
GOLDEN_INDEX = tl.constexpr(reference.GOLDEN_INDEX)
STATE_SALT = tl.constexpr(reference.STATE_SALT)


@triton.jit
def _fmix32(h):
    # h: uint32. The casts keep the arithmetic mod 2^32 whatever the literals promote to.
    h = h ^ (h >> 16)
    h = (h * FMIX_C1).to(tl.uint32)
    h = h ^ (h >> 13)
    h = (h * FMIX_C2).to(tl.uint32)
    return h ^ (h >> 16)


@triton.jit
def _decode(c, EMIN: tl.constexpr):
    """int32 magnitude code -> fp32 map value (quant.decode_magnitude)."""
    hi = c >> MBITS
    lo = c & MANT_MASK
    e = tl.maximum(hi - 1, 0) + (EMIN - MBITS)
    mant = tl.where(hi > 0, lo + MANT_ONE, lo).to(tl.float32)
    return mant * ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _encode(x, u, EMIN: tl.constexpr, MAXC: tl.constexpr):
    """fp32 x in [0, 1], uniform u -> int32 stochastically rounded code (quant.encode_magnitude)."""
    bits = x.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, EMIN)
    y = x * ((127 - e + MBITS) << 23).to(tl.float32, bitcast=True)  # tensor first: constexpr - tensor is not a tensor in the interpreter
    q = tl.floor(y + u).to(tl.int32)
    return tl.minimum(tl.maximum((e - EMIN) * MANT_ONE + q, 0), MAXC)


@triton.jit
def _adamw8bit_kernel(p_ptr, g_ptr, s1_ptr, a1_ptr, s2_ptr, a2_ptr, n,
                      b1, omb1, b2, omb2, eps, step_size, inv_sqrt_bc2, decay, key,
                      QUANT: tl.constexpr, SR: tl.constexpr, IS_BF16: tl.constexpr,
                      BLOCK: tl.constexpr, ROWS: tl.constexpr,
                      UEMIN: tl.constexpr, UMAX: tl.constexpr, SEMIN: tl.constexpr, SMAX: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < n

    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if QUANT:
        rmask = rows * BLOCK < n
        am1 = tl.load(a1_ptr + rows, mask=rmask, other=0.0)
        am2 = tl.load(a2_ptr + rows, mask=rmask, other=0.0)
        c1 = tl.load(s1_ptr + offs, mask=mask, other=0).to(tl.int32)
        c2 = tl.load(s2_ptr + offs, mask=mask, other=0).to(tl.int32)
        mag1 = _decode(c1 & 127, SEMIN)
        m = tl.where(c1 >= 128, -mag1, mag1) * am1[:, None]
        v = _decode(c2, UEMIN) * am2[:, None]
    else:
        m = tl.load(s1_ptr + offs, mask=mask, other=0.0)
        v = tl.load(s2_ptr + offs, mask=mask, other=0.0)

    m = m * b1 + g * omb1
    v = v * b2 + (g * g) * omb2
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
    x = x * decay
    x = x - tl.div_rn(m, denom) * step_size

    idx = offs.to(tl.uint32)
    r = _fmix32((idx * GOLDEN_INDEX).to(tl.uint32) ^ key.to(tl.uint32))
    if SR:
        bits = x.to(tl.uint32, bitcast=True)
        y = ((bits + (r & 0xFFFF)).to(tl.uint32) >> 16) << 16
        y = y.to(tl.uint32).to(tl.float32, bitcast=True)
        x = tl.where(x != x, x, y)
    elif IS_BF16:
        # round to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates
        bits = x.to(tl.uint32, bitcast=True)
        y = ((bits + 0x7FFF + ((bits >> 16) & 1)).to(tl.uint32) >> 16) << 16
        y = y.to(tl.uint32).to(tl.float32, bitcast=True)
        x = tl.where(x != x, x, y)
    tl.store(p_ptr + offs, x.to(p_ptr.dtype.element_ty), mask=mask)

    if QUANT:
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
        n1 = tl.max(tl.abs(m), axis=1)
        n2 = tl.max(v, axis=1)
        d1 = tl.where(n1 > 0, n1, 1.0)
        d2 = tl.where(n2 > 0, n2, 1.0)
        xm = tl.div_rn(m, d1[:, None])
        xv = tl.div_rn(v, d2[:, None])
        r2 = _fmix32(r ^ STATE_SALT)
        u_m = (r2 & 0xFFFF).to(tl.float32) * (1.0 / 65536.0)
        u_v = (r2 >> 16).to(tl.float32) * (1.0 / 65536.0)
        q1 = _encode(tl.abs(xm), u_m, SEMIN, SMAX)
        q1 = tl.where(xm < 0, q1 + 128, q1)
        q2 = _encode(xv, u_v, UEMIN, UMAX)
        q2 = tl.where(xv > 0, tl.maximum(q2, 1), q2)
        tl.store(s1_ptr + offs, q1.to(tl.uint8), mask=mask)
        tl.store(s2_ptr + offs, q2.to(tl.uint8), mask=mask)
        tl.store(a1_ptr + rows, n1, mask=rmask)
        tl.store(a2_ptr + rows, n2, mask=rmask)
    else:
        tl.store(s1_ptr + offs, m, mask=mask)
        tl.store(s2_ptr + offs, v, mask=mask)


def _i32(u: int) -> int:
    """uint32 -> the int32 with the same bits (Triton then types the argument i32 always)."""
    return u - (1 << 32) if u >= (1 << 31) else u


def _rows(block_size: int) -> int:
    # ~2048 elements per program on a GPU; under the interpreter 1 row keeps tiles small.
    return max(1, min(64, 2048 // block_size))


def update_(p, g, state, *, lr, betas, eps, weight_decay, step, block_size, stochastic_rounding):
    """One parameter (contiguous p, g like p); same contract as reference.update_."""
    h = hyperparams(lr, betas[0], betas[1], eps, weight_decay, step)
    n = p.numel()
    quantized = "state1" in state
    blk = block_size if quantized else 1024
    rows = _rows(blk)
    grid = (triton.cdiv(n, blk * rows),)
    sr = bool(stochastic_rounding) and p.dtype == torch.bfloat16
    if quantized:
        s1, a1, s2, a2 = state["state1"], state["absmax1"], state["state2"], state["absmax2"]
    else:
        s1, s2 = state["exp_avg"], state["exp_avg_sq"]
        a1 = a2 = s1
    _triton.launch(
        _adamw8bit_kernel, grid, p.device,
        p, g, s1, a1, s2, a2, n,
        h["b1"], h["omb1"], h["b2"], h["omb2"], h["eps"], h["step_size"], h["inv_sqrt_bc2"], h["decay"],
        _i32(sr_key(state["seed"], step)),
        QUANT=quantized, SR=sr, IS_BF16=p.dtype == torch.bfloat16, BLOCK=blk, ROWS=rows,
        UEMIN=quant.UNSIGNED_EMIN, UMAX=quant.UNSIGNED_MAX_CODE, SEMIN=quant.SIGNED_EMIN,
        SMAX=quant.SIGNED_MAX_MAG, num_warps=4 if blk * rows <= 2048 else 8, enable_fp_fusion=False)
