"""Triton step of AdamW4bit (spec: reference4.py, quant4.py).

triton_kernels.py's step (AdamW8bit) with the 4-bit states: one launch per parameter, each
program owns ROWS quantization blocks. Two codes share a byte (element 2j in the low nibble of
byte j), so a program works on a block's even and odd elements as two (ROWS, BLOCK / 2) tiles:
the parameter and gradient at offsets 2j and 2j + 1, the state bytes at j. The block absmax is
the max over both halves; the new codes of the two halves are packed back into one byte.
Launched with enable_fp_fusion=False and the _rn division and square root so it computes
exactly the reference's fp32 operations, with the same hash bits for the stochastic rounding of
bf16 weights and of the state codes. fp32 states (small tensors) are AdamW8bit's: that kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _triton
from . import quant4, reference, triton_kernels
from .reference import hyperparams, sr_key
from .triton_kernels import _fmix32, _i32, _rows

# Globals used inside @triton.jit must be tl.constexpr objects (see triton_kernels.py): a plain
# module int runs under the interpreter but is a NameError for the GPU compiler.
M_MBITS = tl.constexpr(quant4.M_MBITS)
M_ONE = tl.constexpr(1 << quant4.M_MBITS)        # (the interpreter has no int << constexpr)
M_MASK = tl.constexpr((1 << quant4.M_MBITS) - 1)
M_EMIN = tl.constexpr(quant4.M_EMIN)
M_MAX = tl.constexpr(quant4.M_MAX)
M_SIGN = tl.constexpr(quant4.M_SIGN)
V_MBITS = tl.constexpr(quant4.V_MBITS)
V_ONE = tl.constexpr(1 << quant4.V_MBITS)
V_MASK = tl.constexpr((1 << quant4.V_MBITS) - 1)
V_EMIN = tl.constexpr(quant4.V_EMIN)
V_MAX = tl.constexpr(quant4.V_MAX)
GOLDEN_INDEX = tl.constexpr(reference.GOLDEN_INDEX)
STATE_SALT = tl.constexpr(reference.STATE_SALT)


@triton.jit
def _decode(c, MBITS: tl.constexpr, ONE: tl.constexpr, MASK: tl.constexpr, EMIN: tl.constexpr):
    """int32 small-float code -> fp32 value (quant4._decode)."""
    hi = c >> MBITS
    lo = c & MASK
    e = tl.maximum(hi - 1, 0) + (EMIN - MBITS)
    mant = tl.where(hi > 0, lo + ONE, lo).to(tl.float32)
    return mant * ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _encode(x, u, MBITS: tl.constexpr, ONE: tl.constexpr, EMIN: tl.constexpr, MAXC: tl.constexpr):
    """fp32 x in [0, 1], uniform u -> int32 stochastically rounded code (quant4._encode)."""
    bits = x.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, EMIN)
    y = x * ((127 - e + MBITS) << 23).to(tl.float32, bitcast=True)  # tensor first (see triton_kernels.py)
    q = tl.floor(y + u).to(tl.int32)
    return tl.minimum(tl.maximum((e - EMIN) * ONE + q, 0), MAXC)


@triton.jit
def _decode_m(nib):
    mag = _decode(nib & 7, M_MBITS, M_ONE, M_MASK, M_EMIN)
    return tl.where(nib >= M_SIGN, -mag, mag)


@triton.jit
def _decode_v(nib):
    return _decode(nib + 1, V_MBITS, V_ONE, V_MASK, V_EMIN)


@triton.jit
def _hash(offs, key):
    """The element hash r of reference.sr_bits (uint32)."""
    return _fmix32((offs.to(tl.uint32) * GOLDEN_INDEX).to(tl.uint32) ^ key.to(tl.uint32))


@triton.jit
def _adam(x, g, m, v, b1, omb1, b2, omb2, eps, step_size, inv_sqrt_bc2, decay):
    """reference.adam_math, one rounding per operation."""
    m = m * b1 + g * omb1
    v = v * b2 + (g * g) * omb2
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
    x = x * decay
    x = x - tl.div_rn(m, denom) * step_size
    return x, m, v


@triton.jit
def _round_param(x, r, SR: tl.constexpr, IS_BF16: tl.constexpr):
    """fp32 x -> the value stored in the parameter (reference.write_param; the cast follows)."""
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
    return x


@triton.jit
def _uniforms(r):
    """(u_m, u_v) of reference.state_uniforms."""
    r2 = _fmix32(r ^ STATE_SALT)
    return (r2 & 0xFFFF).to(tl.float32) * (1.0 / 65536.0), (r2 >> 16).to(tl.float32) * (1.0 / 65536.0)


@triton.jit
def _encode_m(xm, u):
    q = _encode(tl.abs(xm), u, M_MBITS, M_ONE, M_EMIN, M_MAX)
    return tl.where(xm < 0, q + M_SIGN, q)


@triton.jit
def _encode_v(xv, u):
    return tl.maximum(_encode(xv, u, V_MBITS, V_ONE, V_EMIN, V_MAX), 1) - 1


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _block_max(a, b):
    """Max over each row of two tiles, NaN if any element is NaN (as torch.amax; tl.max drops NaNs)."""
    return _max_nan(tl.reduce(a, 1, _max_nan), tl.reduce(b, 1, _max_nan))


@triton.jit
def _adamw4bit_kernel(p_ptr, g_ptr, s1_ptr, a1_ptr, s2_ptr, a2_ptr, n,
                      b1, omb1, b2, omb2, eps, step_size, inv_sqrt_bc2, decay, key,
                      SR: tl.constexpr, IS_BF16: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr,
                      ROWS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    j = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]   # byte index; elements 2j and 2j + 1
    ev = 2 * j
    od = ev + 1
    bmask = ev < n
    omask = od < n
    rmask = rows * BLOCK < n

    c1 = tl.load(s1_ptr + j, mask=bmask, other=0).to(tl.int32)
    c2 = tl.load(s2_ptr + j, mask=bmask, other=0).to(tl.int32)
    am1 = tl.load(a1_ptr + rows, mask=rmask, other=0.0)[:, None]
    am2 = tl.load(a2_ptr + rows, mask=rmask, other=0.0)[:, None]
    m_e = _decode_m(c1 & 15) * am1
    m_o = _decode_m(c1 >> 4) * am1
    v_e = _decode_v(c2 & 15) * am2
    v_o = _decode_v(c2 >> 4) * am2

    g_e = tl.load(g_ptr + ev, mask=bmask, other=0.0).to(tl.float32)
    g_o = tl.load(g_ptr + od, mask=omask, other=0.0).to(tl.float32)
    x_e = tl.load(p_ptr + ev, mask=bmask, other=0.0).to(tl.float32)
    x_o = tl.load(p_ptr + od, mask=omask, other=0.0).to(tl.float32)
    x_e, m_e, v_e = _adam(x_e, g_e, m_e, v_e, b1, omb1, b2, omb2, eps, step_size, inv_sqrt_bc2, decay)
    x_o, m_o, v_o = _adam(x_o, g_o, m_o, v_o, b1, omb1, b2, omb2, eps, step_size, inv_sqrt_bc2, decay)

    r_e = _hash(ev, key)
    r_o = _hash(od, key)
    x_e = _round_param(x_e, r_e, SR, IS_BF16)
    x_o = _round_param(x_o, r_o, SR, IS_BF16)
    tl.store(p_ptr + ev, x_e.to(p_ptr.dtype.element_ty), mask=bmask)
    tl.store(p_ptr + od, x_o.to(p_ptr.dtype.element_ty), mask=omask)

    # the new absmax of each block over both halves (elements past n count as 0, as in the reference)
    m_e = tl.where(bmask, m_e, 0.0)
    m_o = tl.where(omask, m_o, 0.0)
    v_e = tl.where(bmask, v_e, 0.0)
    v_o = tl.where(omask, v_o, 0.0)
    n1 = _block_max(tl.abs(m_e), tl.abs(m_o))
    n2 = _block_max(v_e, v_o)
    nz1 = n1[:, None] > 0
    nz2 = n2[:, None] > 0
    d1 = tl.where(nz1, n1[:, None], 1.0)
    d2 = tl.where(nz2, n2[:, None], 1.0)
    um_e, uv_e = _uniforms(r_e)
    um_o, uv_o = _uniforms(r_o)
    q1_e = _encode_m(tl.where(nz1, tl.div_rn(m_e, d1), 0.0), um_e)
    q1_o = _encode_m(tl.where(nz1, tl.div_rn(m_o, d1), 0.0), um_o)
    q2_e = _encode_v(tl.where(nz2, tl.div_rn(v_e, d2), 0.0), uv_e)
    q2_o = _encode_v(tl.where(nz2, tl.div_rn(v_o, d2), 0.0), uv_o)
    # an odd last element leaves its byte's high nibble 0
    q1_o = tl.where(omask, q1_o, 0)
    q2_o = tl.where(omask, q2_o, 0)
    tl.store(s1_ptr + j, (q1_e | (q1_o << 4)).to(tl.uint8), mask=bmask)
    tl.store(s2_ptr + j, (q2_e | (q2_o << 4)).to(tl.uint8), mask=bmask)
    tl.store(a1_ptr + rows, n1, mask=rmask)
    tl.store(a2_ptr + rows, n2, mask=rmask)


def update_(p, g, state, *, lr, betas, eps, weight_decay, step, block_size, stochastic_rounding):
    """One parameter (contiguous p, g like p); same contract as reference4.update_."""
    if "state1" not in state:  # fp32 states: AdamW8bit's kernel computes exactly reference4's update
        return triton_kernels.update_(p, g, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      step=step, block_size=block_size, stochastic_rounding=stochastic_rounding)
    h = hyperparams(lr, betas[0], betas[1], eps, weight_decay, step)
    n = p.numel()
    rows = _rows(block_size)
    grid = (triton.cdiv(n, block_size * rows),)
    sr = bool(stochastic_rounding) and p.dtype == torch.bfloat16
    # 8 warps for AdamW8bit's 2048 elements per program: two halves of everything at 4 warps take ~220
    # registers a thread (ptxas, sm_86 / sm_90), at 8 about 100
    _triton.launch(
        _adamw4bit_kernel, grid, p.device,
        p, g, state["state1"], state["absmax1"], state["state2"], state["absmax2"], n,
        h["b1"], h["omb1"], h["b2"], h["omb2"], h["eps"], h["step_size"], h["inv_sqrt_bc2"], h["decay"],
        _i32(sr_key(state["seed"], step)),
        SR=sr, IS_BF16=p.dtype == torch.bfloat16, BLOCK=block_size, HALF=block_size // 2, ROWS=rows,
        num_warps=8 if block_size * rows <= 2048 else 16, enable_fp_fusion=False)
