"""The AdamW4bit update in PyTorch: reference.py's update with the 4-bit states of quant4.py. The spec the
Triton and CUDA steps match.

Everything but the state format is reference.py's: the fp32 scalars, the per-element operations (one rounding
each), the parameter write (bf16: stochastic rounding with the element hash r), and the uniforms of the state
codes (u_m, u_v from r). The states: m and v dequantized from their nibbles times the block absmax, updated,
then each block's new absmax taken and the nibbles re-encoded stochastically (quant4).
"""
from __future__ import annotations

import torch

from . import quant4
from .reference import adam_math, hyperparams, sr_bits, sr_key, state_uniforms, write_param

IS_REFERENCE = True  # (the optimizers pass it gradients in their own dtype)


def update_(p: torch.Tensor, g: torch.Tensor, state: dict, *, lr: float, betas, eps: float,
            weight_decay: float, step: int, block_size: int, stochastic_rounding: bool) -> None:
    """One step of one parameter, in place on p (contiguous) and the state tensors.

    state holds 4-bit tensors {"state1", "absmax1", "state2", "absmax2"} (packed nibbles, ceil(n / 2) bytes;
    fp32 absmax per block) or fp32 {"exp_avg", "exp_avg_sq"} (flat), plus "seed"."""
    h = hyperparams(lr, betas[0], betas[1], eps, weight_decay, step)
    n = p.numel()
    x = p.detach().reshape(-1).float()
    gf = g.reshape(-1).float()
    quantized = "state1" in state
    if quantized:
        m = quant4.dequantize_blockwise(state["state1"], state["absmax1"], n, block_size, signed=True)
        v = quant4.dequantize_blockwise(state["state2"], state["absmax2"], n, block_size, signed=False)
    else:
        m, v = state["exp_avg"], state["exp_avg_sq"]
    x, m, v = adam_math(x, gf, m, v, h)
    key = sr_key(state["seed"], step)
    r = sr_bits(n, key, p.device)
    p.detach().view(-1).copy_(write_param(x, p.dtype, stochastic_rounding=stochastic_rounding, key=key, r=r))
    if quantized:
        u_m, u_v = state_uniforms(r)
        c1, a1 = quant4.quantize_blockwise(m, block_size, signed=True, u=u_m)
        c2, a2 = quant4.quantize_blockwise(v, block_size, signed=False, u=u_v)
        state["state1"].copy_(c1)
        state["absmax1"].copy_(a1)
        state["state2"].copy_(c2)
        state["absmax2"].copy_(a2)
    else:
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)
