"""AdamW4bit: AdamW with blockwise 4-bit states (dbkernels.optim.quant4), AdamW8bit's contract.

The same optimizer as AdamW8bit (param groups, schedulers, state_dict resume bitwise, fp32 / bf16 / fp16
parameters, stochastic rounding of bf16 weights, small tensors in fp32 state, state_bytes(), step_in_backward);
only the state format differs: two 4-bit codes per byte and one fp32 absmax per block of 128, about 1.06 bytes
of state per parameter instead of 2.03. Backends (dispatcher op "adamw4bit"): `cuda` = AdamW8bit's
multi-tensor launch with state_bits=4 (csrc/adamw8bit.cu), `triton` = one launch per parameter
(triton_kernels4.py), `reference` = PyTorch (reference4.py, the spec; also the CPU path).
"""
from __future__ import annotations

import torch

from .. import _backend
from . import quant4, reference4
from .adamw8bit import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, AdamW8bit, choose_backend

_backend.register_op("adamw4bit", ("cuda", "triton", "reference"))

def _impl(device: torch.device, block_size: int):
    return choose_backend("adamw4bit", device, block_size, bits=4, reference_module=reference4,
                          triton_module="dbkernels.optim.triton_kernels4")


class AdamW4bit(AdamW8bit):
    """AdamW (decoupled weight decay) with 4-bit blockwise-quantized moments.

    m on a signed dynamic-exponent map, v on an unsigned map without zero, one fp32 absmax per `block_size`
    elements (128, the paper's), two codes per byte: 1 + 8 / block_size bytes of state per parameter (1.06 at
    128). Parameters with fewer than `min_4bit_size` elements keep fp32 moments. Everything else is AdamW8bit's
    (see its docstring); the format and why: dbkernels/optim/quant4.py.
    """

    _CPU_MULTI_TENSOR = False  # multi_tensor.py is AdamW8bit's; the CPU step here is reference4 per tensor
    _MIN_SIZE = "min_4bit_size"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, block_size: int = quant4.BLOCK_SIZE, min_4bit_size: int = 4096,
                 stochastic_rounding: bool = True):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, block_size=block_size,
                        min_4bit_size=min_4bit_size, stochastic_rounding=stochastic_rounding, state_bits=4)
        self._start(params, defaults)

    @staticmethod
    def _check_hyper(g: dict) -> None:
        AdamW8bit._check_hyper({**g, "min_8bit_size": g["min_4bit_size"]})
        if g["block_size"] % 2 or not MIN_BLOCK_SIZE <= g["block_size"] <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be an even power of two, got {g['block_size']!r}")

    @staticmethod
    def _backend(device: torch.device, block_size: int):
        return _impl(device, block_size)

    @staticmethod
    def _codes_numel(n: int) -> int:
        return quant4.packed_bytes(n)

    @staticmethod
    def _check_saved_by(saved_groups) -> None:
        if any("amsgrad" in g for g in saved_groups):
            raise ValueError("this optimizer state was saved by torch.optim.AdamW (fp32 states of another "
                             "layout); AdamW4bit cannot continue it: start the optimizer afresh")
        if not all(g.get("state_bits") == 4 for g in saved_groups):
            raise ValueError("this optimizer state was saved by AdamW8bit (8-bit states); load it into "
                             "dbkernels.optim.AdamW8bit, or start AdamW4bit afresh")
