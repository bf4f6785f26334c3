"""Dynamic (non-linear) 8-bit quantization maps and blockwise (de)quantization, in PyTorch.

This file is the spec of the state format of `dbkernels.optim.AdamW8bit`; the Triton and
CUDA kernels implement the same integer/float operations.

The maps are small floating-point formats ("dynamic exponent" maps): a code is an
exponent field plus a mantissa field, with gradual underflow (subnormals) below the
smallest exponent, so codes are dense near zero and geometric elsewhere, and every map
value is an exact fp32 number. Both maps are sorted by code (the signed one by magnitude
within each sign half), so *the nearest code* has a closed form instead of a binary
search over 256 values: take the exponent e of x (clamped below at EMIN), scale x by the
power of two 2^(MBITS - e) (exact), round half up to an integer q, and the code is
(e - EMIN) * 2^MBITS + q. Within one binade the codes are evenly spaced, so this is the
nearest code there; q = 2^(MBITS+1) carries into the next binade's first code, which is
again the nearest. Ties go up.

* unsigned map (second moment v, normalised to [0, 1] by the block absmax):
  4 exponent bits, 4 mantissa bits, EMIN = -14. Codes 0..240 are used: code 240 is 1.0,
  the smallest positive value is 2^-18 (code 1). A positive x never gets code 0 (it
  gets at least code 1): a v rounded to 0 under a nonzero m would turn the update
  m / (sqrt(v) + eps) into m / eps.
* signed map (first moment m, normalised to [-1, 1]): sign bit (bit 7) + 3 exponent bits
  + 4 mantissa bits, EMIN = -6. Magnitude codes 0..112 are used: 112 is 1.0, the
  smallest positive magnitude is 2^-10. Code 128 (-0) decodes to -0.0 and is never
  produced (x < 0 decides the sign).

Rounding to nearest, the relative error is at most 2^-5 (3.1%) of a value in the
normal range, the absolute error of tiny values at most half a subnormal step. (These
formats were chosen by measurement: 3 mantissa bits for v, or 5 exponent bits, gave a
visibly biased effective learning rate in the convergence-parity tests.)

The optimizer requantizes its states with *stochastic* rounding between the two
neighbouring codes (floor(y + u) instead of floor(y + 0.5), u uniform in [0, 1)): with
beta2 = 0.999 a step changes v by ~0.1%, far less than half a code step, so
round-to-nearest would freeze v (it could neither grow nor decay); stochastic rounding
keeps E[state] on the exact trajectory.

Blockwise: a flat tensor is cut into blocks of `block_size` consecutive elements (the
last one may be short); each block stores one fp32 absmax and x / absmax is quantized
(division rounded to nearest, so |x / absmax| <= 1 exactly). absmax == 0 gives code 0.
"""
from __future__ import annotations

import torch

MBITS = 4
UNSIGNED_EMIN = -14
SIGNED_EMIN = -6
UNSIGNED_MAX_CODE = (0 - UNSIGNED_EMIN) * 16 + 16   # 240: the code of 1.0
SIGNED_MAX_MAG = (0 - SIGNED_EMIN) * 16 + 16        # 112: the magnitude code of 1.0
SIGN_BIT = 128


def _ldexp_f32(mant: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """mant (exact small integers as fp32) * 2^e for int32 e in the fp32 normal range, exact."""
    scale = ((e + 127) << 23).view(torch.float32)
    return mant * scale


def decode_magnitude(c: torch.Tensor, emin: int) -> torch.Tensor:
    """fp32 value of magnitude code c (int32 tensor, 0 <= c < 2^(EBITS+3))."""
    c = c.to(torch.int32)
    hi = c >> MBITS
    lo = c & ((1 << MBITS) - 1)
    e = torch.clamp(hi - 1, min=0) + emin - MBITS
    mant = torch.where(hi > 0, lo + (1 << MBITS), lo).to(torch.float32)
    return _ldexp_f32(mant, e)


def encode_magnitude(x: torch.Tensor, emin: int, max_code: int, u: torch.Tensor | None = None) -> torch.Tensor:
    """Code of fp32 x in [0, 1]; int32. u=None: the nearest code (ties up). u = fp32
    uniforms in [0, 1) (one per element): stochastic rounding between the two
    neighbouring codes, the upper one with probability proportional to the distance
    from the lower one (unbiased: E[value] = x)."""
    bits = x.contiguous().view(torch.int32)
    e = torch.clamp(((bits >> 23) & 0xFF) - 127, min=emin)
    y = x * ((127 + MBITS - e) << 23).view(torch.float32)   # x * 2^(MBITS - e), exact
    q = torch.floor(y + (0.5 if u is None else u)).to(torch.int32)
    return torch.clamp((e - emin) * (1 << MBITS) + q, 0, max_code)


def encode_unsigned(x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """Unsigned-map code (int32) of x in [0, 1]; positive x gets at least code 1."""
    c = encode_magnitude(x, UNSIGNED_EMIN, UNSIGNED_MAX_CODE, u)
    return torch.where(x > 0, torch.clamp(c, min=1), c)


def dequantize_unsigned_codes(c: torch.Tensor) -> torch.Tensor:
    return decode_magnitude(c.to(torch.int32), UNSIGNED_EMIN)


def quantize_unsigned_codes(x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """x in [0, 1] (fp32) -> uint8 codes of the unsigned map (u: see encode_magnitude)."""
    return encode_unsigned(x.float(), u).to(torch.uint8)


def dequantize_signed_codes(c: torch.Tensor) -> torch.Tensor:
    c = c.to(torch.int32)
    mag = decode_magnitude(c & 127, SIGNED_EMIN)
    return torch.where(c >= SIGN_BIT, -mag, mag)


def quantize_signed_codes(x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """x in [-1, 1] (fp32) -> uint8 codes of the signed map (bit 7 = sign; u: see
    encode_magnitude, applied to |x|)."""
    x = x.float()
    mag = encode_magnitude(x.abs(), SIGNED_EMIN, SIGNED_MAX_MAG, u)
    return torch.where(x < 0, mag + SIGN_BIT, mag).to(torch.uint8)


def unsigned_map() -> torch.Tensor:
    """The 256 values of the unsigned map (index = code); codes > 240 are unused (> 1)."""
    return dequantize_unsigned_codes(torch.arange(256, dtype=torch.int32))


def signed_map() -> torch.Tensor:
    """The 256 values of the signed map (index = code); magnitudes > 112 are unused."""
    return dequantize_signed_codes(torch.arange(256, dtype=torch.int32))


# ----------------------------------------------------------------------------- blockwise

def num_blocks(numel: int, block_size: int) -> int:
    return (numel + block_size - 1) // block_size


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat fp32 x as (nblocks, block_size), zero padded (zeros never change an absmax)."""
    x = x.reshape(-1).float()
    n = x.numel()
    pad = num_blocks(n, block_size) * block_size - n
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, block_size)


def normalized_blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / its block's absmax as (nblocks, block_size), zero padded; fp32 absmax per block); an all-zero
    block stays zero (both state formats quantize these)."""
    xb = _blocks(x, block_size)
    absmax = xb.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return torch.where(absmax[:, None] > 0, xb / safe[:, None], torch.zeros_like(xb)), absmax


def quantize_blockwise(x: torch.Tensor, block_size: int, signed: bool,
                       u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes, flat like x; fp32 absmax per block). u: None (nearest code) or flat
    fp32 uniforms like x (stochastic rounding, see encode_magnitude)."""
    n = x.numel()
    xn, absmax = normalized_blocks(x, block_size)
    if u is not None:
        u = _blocks(u, block_size)
    codes = quantize_signed_codes(xn, u) if signed else quantize_unsigned_codes(xn, u)
    return codes.reshape(-1)[:n].contiguous(), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, block_size: int,
                         signed: bool) -> torch.Tensor:
    """Flat fp32 values codes -> map value * absmax of the block."""
    n = codes.numel()
    vals = dequantize_signed_codes(codes) if signed else dequantize_unsigned_codes(codes)
    return (_blocks(vals, block_size) * absmax.float()[:, None]).reshape(-1)[:n]
