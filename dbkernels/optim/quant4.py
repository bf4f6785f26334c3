"""The 4-bit state format of `dbkernels.optim.AdamW4bit`, in PyTorch: the spec the Triton and CUDA steps match.

After Li, Chen and Zhu, "Memory Efficient Optimizers with 4-bit States" (NeurIPS 2023): both moments in
blocks of 128 elements (one fp32 absmax each), the first moment on a signed dynamic-exponent map, the second
on an unsigned map *without zero*. Two codes share a byte: element 2j in the low nibble of byte j, element
2j + 1 in the high nibble (a block of 128 elements is 64 bytes; an odd last element leaves its byte's high
nibble 0).

* first moment m, normalised to [-1, 1] by the block absmax: bit 3 the sign, bits 0-2 a magnitude code
  k = 0..7 with value 0 (k = 0) or 2^(k - 7): 0, 1/64, 1/32, ..., 1/2, 1. Powers of two only (an exponent
  field, no mantissa bits): the paper's finding is that m needs range (a dynamic-exponent map) more than
  resolution, and with 3 magnitude bits one mantissa bit would cost the smallest value 1/8 of the block's
  largest. -0 (code 8) decodes to -0.0 and is never produced.
* second moment v, normalised to [0, 1]: a code s = 0..15 with the value of the small-float code c = s + 1
  (1 mantissa bit, exponent from -8): 2^-8, 2^-7, 1.5 * 2^-7, 2^-6, ..., 0.5, 0.75, 1. No code is 0: the
  paper's "zero-point problem" is that a v quantised to 0 under a nonzero m turns the update m / (sqrt(v) +
  eps) into m / eps, a step of lr * m / 1e-8; with a 4-bit map most small entries of a block would get
  there. Here an entry below 2^-8 of its block's largest is read as 2^-8 of it (its update is damped, never
  blown up). (The paper normalises v by rank-1 statistics, a row and a column maximum; a block of 128 with a
  zero-free map is its other stable choice, and keeps the step one pass over memory, as AdamW8bit's.)

Encoding is the closed form of dbkernels.optim.quant (the maps are small floating-point formats, so the
nearest code, or the two neighbours for stochastic rounding, come from the exponent and a floor): with
`MBITS` mantissa bits and the exponent clamped below at `EMIN`, code = (e - EMIN) * 2^MBITS + floor(x *
2^(MBITS - e) + u). The optimizer rounds stochastically (u uniform in [0, 1), the bits of reference's
element hash): at 4 bits a step's change of v is far below half a code step, so rounding to nearest would
freeze the states. Unbiased, except that v below 2^-8 of its block's largest is rounded up (zero-free).
"""
from __future__ import annotations

import torch

from .quant import _blocks, decode_magnitude, normalized_blocks, num_blocks

BLOCK_SIZE = 128                 # the paper's block for both moments
M_MBITS, M_EMIN, M_MAX = 0, -6, 7     # m: magnitude code 7 is 1.0 (2^(7 - 7)); code 1 is 2^-6
V_MBITS, V_EMIN, V_MAX = 1, -7, 16    # v: small-float code 16 is 1.0; code 1 (stored 0) is 2^-8
M_SIGN = 8


def _decode(c: torch.Tensor, mbits: int, emin: int) -> torch.Tensor:
    """fp32 value of small-float code c (int32) with `mbits` mantissa bits (quant.decode_magnitude's formula)."""
    if mbits == 4:
        return decode_magnitude(c, emin)
    c = c.to(torch.int32)
    hi = c >> mbits
    lo = c & ((1 << mbits) - 1)
    e = torch.clamp(hi - 1, min=0) + emin - mbits
    mant = torch.where(hi > 0, lo + (1 << mbits), lo).to(torch.float32)
    return mant * ((e + 127) << 23).view(torch.float32)


def _encode(x: torch.Tensor, mbits: int, emin: int, max_code: int, u: torch.Tensor | None) -> torch.Tensor:
    """int32 code of fp32 x in [0, 1]: u None = the nearest (ties up), else stochastic (quant.encode_magnitude)."""
    bits = x.contiguous().view(torch.int32)
    e = torch.clamp(((bits >> 23) & 0xFF) - 127, min=emin)
    y = x * ((127 + mbits - e) << 23).view(torch.float32)   # x * 2^(mbits - e), exact
    q = torch.floor(y + (0.5 if u is None else u)).to(torch.int32)
    return torch.clamp((e - emin) * (1 << mbits) + q, 0, max_code)


def decode_m(nib: torch.Tensor) -> torch.Tensor:
    """fp32 values of m nibbles (int32 0..15)."""
    nib = nib.to(torch.int32)
    mag = _decode(nib & 7, M_MBITS, M_EMIN)
    return torch.where(nib >= M_SIGN, -mag, mag)


def encode_m(x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """int32 nibbles of x in [-1, 1] (fp32)."""
    x = x.float()
    mag = _encode(x.abs(), M_MBITS, M_EMIN, M_MAX, u)
    return torch.where(x < 0, mag + M_SIGN, mag)


def decode_v(nib: torch.Tensor) -> torch.Tensor:
    """fp32 values of v nibbles (int32 0..15): never 0."""
    return _decode(nib.to(torch.int32) + 1, V_MBITS, V_EMIN)


def encode_v(x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """int32 nibbles of x in [0, 1] (fp32); x below the smallest value gets it (no zero)."""
    return torch.clamp(_encode(x.float(), V_MBITS, V_EMIN, V_MAX, u), min=1) - 1


def m_map() -> torch.Tensor:
    """The 16 values of the m map (index = nibble)."""
    return decode_m(torch.arange(16, dtype=torch.int32))


def v_map() -> torch.Tensor:
    """The 16 values of the v map (index = nibble)."""
    return decode_v(torch.arange(16, dtype=torch.int32))


# ----------------------------------------------------------------------------- packing, blockwise

def packed_bytes(numel: int) -> int:
    return (numel + 1) // 2


def pack(nibbles: torch.Tensor) -> torch.Tensor:
    """Flat int nibbles (0..15) -> uint8, element 2j in the low nibble of byte j."""
    n = nibbles.numel()
    x = nibbles.reshape(-1).to(torch.int32)
    if n % 2:
        x = torch.cat([x, x.new_zeros(1)])
    x = x.view(-1, 2)
    return (x[:, 0] | (x[:, 1] << 4)).to(torch.uint8)


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 bytes -> flat int32 nibbles (numel of them)."""
    b = packed.reshape(-1).to(torch.int32)
    return torch.stack([b & 15, b >> 4], dim=1).reshape(-1)[:numel]


def quantize_blockwise(x: torch.Tensor, block_size: int, signed: bool,
                       u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 codes, ceil(n / 2) bytes; fp32 absmax per block) of flat fp32 x. u: None (nearest code)
    or flat fp32 uniforms like x (stochastic rounding)."""
    n = x.numel()
    xn, absmax = normalized_blocks(x, block_size)
    if u is not None:
        u = _blocks(u, block_size)
    nib = encode_m(xn, u) if signed else encode_v(xn, u)
    return pack(nib.reshape(-1)[:n]), absmax


def dequantize_blockwise(packed: torch.Tensor, absmax: torch.Tensor, n: int, block_size: int,
                         signed: bool) -> torch.Tensor:
    """Flat fp32 values (n of them): map value * the block's absmax."""
    nib = unpack(packed, n)
    vals = decode_m(nib) if signed else decode_v(nib)
    return (_blocks(vals, block_size) * absmax.float()[:, None]).reshape(-1)[:n]


__all__ = ["BLOCK_SIZE", "num_blocks", "packed_bytes", "pack", "unpack", "quantize_blockwise",
           "dequantize_blockwise", "encode_m", "decode_m", "encode_v", "decode_v", "m_map", "v_map"]
