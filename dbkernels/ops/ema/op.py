"""ema_update_: checks, the torch.library op, the public function.

Layers: backend functions (triton_kernels: one launch per (average dtype, weight dtype)
group; reference: the spec, always used for CPU tensors) -> the torch.library custom op
`dbkernels::ema_update_` (mutates `averages`; a no-op fake implementation, so
torch.compile traces around it) -> the documented function `ema_update_`.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from ... import _backend, _checks
from . import reference

# No CUDA implementation: one memory-bound pass, the Triton kernel is the GPU path.
_backend.register_op("ema_update", ("triton", "reference"))
_SEED_LIMIT = 1 << 32
_STEP_LIMIT = 1 << 63  # steps travel through torch.library as int64


def _groups(averages, weights) -> dict:
    """{(average dtype, weight dtype): [positions]}, in list order."""
    out = defaultdict(list)
    for i, (a, w) in enumerate(zip(averages, weights)):
        if a.numel():
            out[(a.dtype, w.dtype)].append(i)
    return out


@torch.library.custom_op("dbkernels::ema_update_", mutates_args=("averages",))
def _ema_update_op(averages: list[torch.Tensor], weights: list[torch.Tensor], decay: float, step: int,
                   seed: int) -> None:
    backend = _backend.choose("ema_update", averages[0].device.type)
    if backend == "reference":
        reference.update_(averages, weights, decay, step=step, seed=seed)
        return
    kernels = _backend.import_triton_kernels("dbkernels.ops.ema.triton_kernels")
    for idx in _groups(averages, weights).values():
        kernels.update_([averages[i] for i in idx], [weights[i] for i in idx], idx, decay, step=step, seed=seed)


@_ema_update_op.register_fake
def _(averages, weights, decay, step, seed):
    return None


def _check(averages, weights, decay, step, seed) -> tuple[list, list]:
    for name, xs in (("averages", averages), ("weights", weights)):
        if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got {type(xs).__name__}")
    if len(averages) != len(weights):
        raise ValueError(f"weights must have one tensor per average: got {len(weights)} weights for "
                         f"{len(averages)} averages")
    for i, (a, w) in enumerate(zip(averages, weights)):
        _checks.tensor(f"averages[{i}]", a, dtypes=reference.AVERAGE_DTYPES)
        _checks.tensor(f"weights[{i}]", w, dtypes=reference.WEIGHT_DTYPES)
        _checks.same_shape(f"weights[{i}]", w, f"averages[{i}]", a)
        if not a.is_contiguous():
            raise ValueError(f"averages[{i}] must be contiguous (it is updated in place), got strides "
                             f"{tuple(a.stride())} for shape {tuple(a.shape)}")
    if averages:
        _checks.same_device({**{f"averages[{i}]": a for i, a in enumerate(averages)},
                             **{f"weights[{i}]": w for i, w in enumerate(weights)}})
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (math.isfinite(decay)
                                                                              and 0 <= decay <= 1):
        raise ValueError(f"decay must be a number in [0, 1] (0.9999 is diffusers' default), got {decay!r}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < _STEP_LIMIT:
        raise ValueError(f"step must be an int in [0, 2**63) (the update's number: it seeds the rounding), "
                         f"got {step!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    return [a.detach() for a in averages], [w.detach().contiguous() for w in weights]


def ema_update_(averages: list[torch.Tensor], weights: list[torch.Tensor], decay: float, *, step: int,
                seed: int = 0) -> None:
    """Exponential moving average, in place: averages[i] <- decay * averages[i] + (1 - decay) * weights[i].

    Computed as averages[i] + (1 - decay) * (weights[i] - averages[i]) in fp32 (torch.lerp's value,
    diffusers' EMAModel update), with one Triton launch per (average dtype, weight dtype) group on a
    GPU (a table of the tensors' addresses: hundreds of tensors cost one launch) and the PyTorch
    reference on CPU tensors. averages: contiguous float32 or bfloat16 tensors; weights: float32,
    bfloat16 or float16 tensors of the same shapes (any strides), all on one device.

    bfloat16 averages are written with stochastic rounding: with decay 0.9999 the increment is far
    below bf16's resolution and a rounded-to-nearest average would never move; rounded stochastically
    it follows the fp32 average in expectation. The rounding bits are a hash of (seed, position in
    the list, step, element index): pass the update's number as `step` (e.g. 0, 1, 2, ...) and the
    same `seed`, and a resumed run's average is bitwise the uninterrupted one's.
    """
    averages, weights = _check(averages, weights, decay, step, seed)
    if not any(a.numel() for a in averages):
        return
    with torch.no_grad():
        _ema_update_op(averages, weights, float(decay), step, seed)
