"""The 8-bit AdamW update in PyTorch. This file is the spec every backend matches.

One step of one parameter p (flat, n elements) with gradient g, at step t (1-based):

    scalars (host, float64 then rounded once to fp32):
        step_size = lr / (1 - b1^t)       inv_sqrt_bc2 = 1 / sqrt(1 - b2^t)
        decay = 1 - lr * wd               b1, 1 - b1, b2, 1 - b2, eps
    per element, every operation in fp32 rounded to nearest (no fused multiply-add):
        m = deq_signed(c1) * absmax1[blk]         (8-bit state; fp32 state: m as stored)
        v = deq_unsigned(c2) * absmax2[blk]
        m = m * b1 + g * (1 - b1)
        v = v * b2 + (g * g) * (1 - b2)
        denom = sqrt(v) * inv_sqrt_bc2 + eps
        x = p * decay
        x = x - step_size * (m / denom)
        p = x in p's dtype: fp32 as is, fp16 round to nearest, bf16 stochastic rounding
            (or round to nearest with stochastic_rounding=False)
    requantize (8-bit state): absmax1[blk] = max |m| over the block, c1 = the code of
    m / absmax1[blk] in the signed map, stochastically rounded with the uniform u_m;
    the same for v with the unsigned map and u_v (dbkernels.optim.quant).

Stochastic rounding of an fp32 x to bf16: r = the low 16 bits of
hash(element index i, key), key = fmix32(seed + t * 0x9E3779B9) (uint32 arithmetic),
hash = fmix32((i * 0x9E3779B1) ^ key) with fmix32 = MurmurHash3's 32-bit finalizer;
bits(x) + r, truncated to the top 16 bits (NaN passes unchanged). Rounds up with
probability equal to the dropped fraction: unbiased. The state codes use a second hash
r2 = fmix32(r ^ 0x68E31DA4) of the full 32-bit r: u_m = (r2 & 0xFFFF) / 2^16,
u_v = (r2 >> 16) / 2^16. `seed` is per parameter (stored in the optimizer state), so
every backend draws the same bits.
"""
from __future__ import annotations

import math
import struct

import numpy as np
import torch

from . import quant

IS_REFERENCE = True  # (the optimizers pass it gradients in their own dtype)
GOLDEN_STEP = 0x9E3779B9
GOLDEN_INDEX = 0x9E3779B1
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35
STATE_SALT = 0x68E31DA4
_U32 = 0xFFFFFFFF


def f32(x: float) -> float:
    """x rounded to the nearest fp32 value (as a Python float)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def hyperparams(lr: float, b1: float, b2: float, eps: float, wd: float, step: int) -> dict:
    """The fp32 scalars of one step (see the module docstring)."""
    return {
        "b1": f32(b1), "omb1": f32(1.0 - b1), "b2": f32(b2), "omb2": f32(1.0 - b2), "eps": f32(eps),
        "step_size": f32(lr / (1.0 - b1 ** step)),
        "inv_sqrt_bc2": f32(1.0 / math.sqrt(1.0 - b2 ** step)),
        "decay": f32(1.0 - lr * wd),
    }


def fmix32_int(h: int) -> int:
    h &= _U32
    h ^= h >> 16
    h = (h * FMIX_C1) & _U32
    h ^= h >> 13
    h = (h * FMIX_C2) & _U32
    h ^= h >> 16
    return h


def sr_key(seed: int, step: int) -> int:
    """uint32 key of the stochastic-rounding hash for one parameter and step."""
    return fmix32_int((seed + step * GOLDEN_STEP) & _U32)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # int64 tensors holding uint32 values; products < 2^64 wrap in int64 but the low 32
    # bits are right after masking.
    h = h ^ (h >> 16)
    h = (h * FMIX_C1) & _U32
    h = h ^ (h >> 13)
    h = (h * FMIX_C2) & _U32
    return h ^ (h >> 16)


def sr_bits(n: int, key: int, device=None) -> torch.Tensor:
    """The 32 hash bits (int64 holding uint32) of element indices 0..n-1 for `key`."""
    i = torch.arange(n, device=device, dtype=torch.int64)
    return _fmix32(((i * GOLDEN_INDEX) & _U32) ^ key)


def state_uniforms(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u_m, u_v): fp32 uniforms in [0, 1) with 16 bits each, from the element hashes r."""
    r2 = _fmix32(r ^ STATE_SALT)
    return ((r2 & 0xFFFF).to(torch.float32) * (1.0 / 65536.0),
            (r2 >> 16).to(torch.float32) * (1.0 / 65536.0))


def stochastic_round_bf16(x: torch.Tensor, key: int, r: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 flat x -> bf16 with the random bits of `key` (see module docstring)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & _U32
    r = (sr_bits(x.numel(), key, x.device) if r is None else r) & 0xFFFF
    out = ((bits + r) & 0xFFFF0000).to(torch.int32).view(torch.float32)   # int64 -> int32 keeps the low 32 bits
    out = torch.where(torch.isnan(x), x, out)
    return out.to(torch.bfloat16)


def write_param(x: torch.Tensor, dtype: torch.dtype, *, stochastic_rounding: bool, key: int,
                r: torch.Tensor | None = None) -> torch.Tensor:
    if dtype == torch.float32:
        return x
    if dtype == torch.bfloat16 and stochastic_rounding:
        return stochastic_round_bf16(x, key, r)
    return x.to(dtype)


def sqrt_rn(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt (torch's vectorized CPU sqrt is not, by an ulp at times).
    On CPU numpy's float32 sqrt, which is the IEEE operation (correctly rounded) and 5-10x
    faster than a float64 sqrt in torch; elsewhere sqrt in float64 rounded once to fp32,
    which is exact: 53 >= 2 * 24 + 2 bits. Both give the same bits."""
    if v.device.type == "cpu":
        return torch.from_numpy(np.sqrt(v.detach().contiguous().numpy()))
    return torch.sqrt(v.double()).float()


def adam_math(x, g, m, v, h):
    """fp32 flat tensors -> (x, m, v) updated; one rounding per operation."""
    m = m * h["b1"] + g * h["omb1"]
    v = v * h["b2"] + (g * g) * h["omb2"]
    denom = sqrt_rn(v) * h["inv_sqrt_bc2"] + h["eps"]
    x = x * h["decay"]
    x = x - (m / denom) * h["step_size"]
    return x, m, v


class EightBit:
    """The 8-bit state format (quant.py) as update_ reads and writes it; quant4 is the 4-bit one."""

    @staticmethod
    def dequantize_blockwise(codes, absmax, n: int, block_size: int, signed: bool) -> torch.Tensor:
        return quant.dequantize_blockwise(codes, absmax, block_size, signed)

    quantize_blockwise = staticmethod(quant.quantize_blockwise)


def update_(p: torch.Tensor, g: torch.Tensor, state: dict, *, lr: float, betas, eps: float,
            weight_decay: float, step: int, block_size: int, stochastic_rounding: bool,
            state_format=EightBit) -> None:
    """One step of one parameter, in place on p (contiguous) and the state tensors.

    state holds either quantized tensors {"state1", "absmax1", "state2", "absmax2"} (codes of `state_format`)
    or fp32 {"exp_avg", "exp_avg_sq"} (flat), plus "seed" (int, stochastic rounding).
    """
    h = hyperparams(lr, betas[0], betas[1], eps, weight_decay, step)
    n = p.numel()
    x = p.detach().reshape(-1).float()
    gf = g.reshape(-1).float()
    quantized = "state1" in state
    if quantized:
        m = state_format.dequantize_blockwise(state["state1"], state["absmax1"], n, block_size, signed=True)
        v = state_format.dequantize_blockwise(state["state2"], state["absmax2"], n, block_size, signed=False)
    else:
        m, v = state["exp_avg"], state["exp_avg_sq"]
    x, m, v = adam_math(x, gf, m, v, h)
    key = sr_key(state["seed"], step)
    r = sr_bits(n, key, p.device)
    p.detach().view(-1).copy_(write_param(x, p.dtype, stochastic_rounding=stochastic_rounding, key=key, r=r))
    if quantized:
        u_m, u_v = state_uniforms(r)
        c1, a1 = state_format.quantize_blockwise(m, block_size, signed=True, u=u_m)
        c2, a2 = state_format.quantize_blockwise(v, block_size, signed=False, u=u_v)
        state["state1"].copy_(c1)
        state["absmax1"].copy_(a1)
        state["state2"].copy_(c2)
        state["absmax2"].copy_(a2)
    else:
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)
