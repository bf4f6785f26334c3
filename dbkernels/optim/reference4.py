"""The AdamW4bit update in PyTorch: reference.py's update with the 4-bit states of quant4.py. The spec the
Triton and CUDA steps match.

Everything but the state format is reference.py's: the fp32 scalars, the per-element operations (one rounding
each), the parameter write (bf16: stochastic rounding with the element hash r), and the uniforms of the state
codes (u_m, u_v from r). The states: m and v dequantized from their nibbles times the block absmax, updated,
then each block's new absmax taken and the nibbles re-encoded stochastically (quant4).
"""
from __future__ import annotations

import torch

from . import quant4, reference

IS_REFERENCE = True  # (the optimizers pass it gradients in their own dtype)


def update_(p: torch.Tensor, g: torch.Tensor, state: dict, *, lr: float, betas, eps: float,
            weight_decay: float, step: int, block_size: int, stochastic_rounding: bool) -> None:
    """One step of one parameter, in place on p (contiguous) and the state tensors.

    state holds 4-bit tensors {"state1", "absmax1", "state2", "absmax2"} (packed nibbles, ceil(n / 2) bytes;
    fp32 absmax per block) or fp32 {"exp_avg", "exp_avg_sq"} (flat), plus "seed"."""
    reference.update_(p, g, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, step=step,
                      block_size=block_size, stochastic_rounding=stochastic_rounding, state_format=quant4)
