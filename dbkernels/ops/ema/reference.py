"""The EMA update in PyTorch. This file is the spec every backend matches.

`update_(averages, weights, decay, step=t, seed=s)`, for every pair (a, w) of the two lists
(a: float32 or bfloat16, w: float32 / bfloat16 / float16, same shape), element by element:

    omd = 1 - decay                  (host, float64, then rounded once to fp32)
    x = a + (w - a) * omd            if omd < 0.5
    x = w + (w - a) * (omd - 1)      otherwise (omd - 1 is exact), so decay 0 gives w itself
    a = x                            float32 averages
    a = SR(x)                        bfloat16 averages: stochastic rounding
every operation in fp32, rounded to nearest, no fused multiply-add. This is torch.lerp(a, w,
1 - decay)'s two-sided formula (torch fuses its multiply-add; we do not, so every backend
gets the same bits), and for decay > 0.5 bit for bit diffusers' EMAModel update
a - (1 - decay) * (a - w) of an fp32 average (negation is exact).

Stochastic rounding of x to bf16 (the scheme of dbkernels.optim.reference): r = the low 16
bits of fmix32((j * 0x9E3779B1) ^ key) for element j of the tensor (j mod 2^32, uint32
arithmetic, fmix32 = MurmurHash3's finalizer); bits(x) + r truncated to the top 16 bits
(NaN passes unchanged). It rounds up with probability equal to the dropped fraction, so
E[a] follows the fp32 average; round to nearest would freeze a bf16 average whose
increment (1 - decay) * (w - a) is below half a bf16 step, which at decay 0.9999 is almost
always. key = fmix32(pair_seed(seed, i) + t * 0x9E3779B9) for the pair's position i in
the lists: deterministic in (seed, i, t, j), so a resumed run rounds as the uninterrupted
one did (pass the same step numbers).
"""
from __future__ import annotations

import struct

import torch

from ...optim.reference import GOLDEN_INDEX, GOLDEN_STEP, fmix32_int

AVERAGE_DTYPES = (torch.float32, torch.bfloat16)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK = 1 << 20  # elements per pass: bounds the temporaries of a large tensor (the hash bits are int64)
_U32 = 0xFFFFFFFF
_PAIR_SALT = 0x632BE5AB


def f32(x: float) -> float:
    """x rounded to the nearest fp32 value (as a Python float)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def one_minus_decay(decay: float) -> float:
    """The fp32 weight of the new value (see the module docstring)."""
    return f32(1.0 - float(decay))


def lerp_coefficients(decay: float) -> tuple[float, bool]:
    """(coeff, from_w): x = (w if from_w else a) + (w - a) * coeff, torch.lerp's two sides."""
    omd = one_minus_decay(decay)
    return (omd, False) if omd < 0.5 else (omd - 1.0, True)  # (Sterbenz: omd - 1 is exact in fp32)


def pair_seed(seed: int, i: int) -> int:
    """uint32 seed of the i-th (average, weight) pair."""
    return fmix32_int((seed ^ fmix32_int(i * _PAIR_SALT + 1)) & _U32)


def step_mix(step: int) -> int:
    """uint32 t * 0x9E3779B9 (what each pair's seed is offset by at step t)."""
    return (step * GOLDEN_STEP) & _U32


def pair_key(seed: int, i: int, step: int) -> int:
    """uint32 key of the stochastic-rounding hash of pair i at step t."""
    return fmix32_int((pair_seed(seed, i) + step_mix(step)) & _U32)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # int64 tensors holding uint32 values; the products wrap in int64 but their low 32 bits are right
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _U32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _U32
    return h ^ (h >> 16)


def round_bits(start: int, n: int, key: int, device=None) -> torch.Tensor:
    """The 16 random bits (int64) of elements start .. start + n - 1 of a tensor for `key`."""
    j = torch.arange(start, start + n, device=device, dtype=torch.int64) & _U32
    return _fmix32(((j * GOLDEN_INDEX) & _U32) ^ key) & 0xFFFF


def stochastic_round_bf16(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """fp32 flat x -> bf16, rounded up with probability (dropped bits) / 2^16 using the bits r."""
    bits = x.view(torch.int32).to(torch.int64) & _U32
    out = ((bits + r) & 0xFFFF0000).to(torch.int32).view(torch.float32)  # (the low 32 bits)
    return torch.where(torch.isnan(x), x, out).to(torch.bfloat16)  # exact: the low 16 bits are zero


def lerp_f32(a: torch.Tensor, w: torch.Tensor, coeff: float, from_w: bool) -> torch.Tensor:
    """(w if from_w else a) + (w - a) * coeff in fp32, one rounding per operation (fp32 a and w)."""
    d = w - a
    d.mul_(coeff)
    return d.add_(w if from_w else a)


def update_(averages, weights, decay: float, *, step: int, seed: int = 0) -> None:
    """One EMA update of every average in place (contiguous averages; weights like them); the spec."""
    coeff, from_w = lerp_coefficients(decay)
    for i, (a, w) in enumerate(zip(averages, weights)):
        flat_a, flat_w = a.view(-1), w.reshape(-1)
        n = flat_a.numel()
        key = pair_key(seed, i, step) if a.dtype == torch.bfloat16 else None
        for s in range(0, n, CHUNK):
            pa, pw = flat_a[s:s + CHUNK], flat_w[s:s + CHUNK]
            x = lerp_f32(pa.float(), pw.float(), coeff, from_w)
            if key is None:
                pa.copy_(x)
            else:
                pa.copy_(stochastic_round_bf16(x, round_bits(s, x.numel(), key, x.device)))
