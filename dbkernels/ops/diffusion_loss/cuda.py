"""CUDA backend of add_noise / the fused DreamBooth loss: thin glue to the compiled ops
`torch.ops.dbkernels.cuda_diffusion_loss_fwd` / `cuda_add_noise` (csrc/diffusion_loss.cu).

The op module validates and calls these after checking that every tensor is on the same
CUDA device and contiguous: pred / x0 / noise float32, float16 or bfloat16 (each its own),
timesteps int64 (B,), alphas_cumprod float32 1-D, noise_offset None or float32 (B, C),
noise None when the noise is generated in the kernel from `seed` (Philox, as
reference.philox_normal).
"""
from __future__ import annotations

import torch

from dbkernels import _ext

_U64 = 1 << 64
_I63 = 1 << 63


def _seed_i64(seed) -> int:
    """The seed as the int64 with the same low 64 bits (the Philox key words)."""
    if seed is None:
        return 0
    return ((int(seed) + _I63) % _U64) - _I63


def loss_fwd(pred, x0, noise, noise_offset, timesteps, alphas_cumprod, *, pred_type: int, n_inst: int,
             inst_scale: float, prior_scale: float, snr_gamma: float, seed: int, need_grad: bool,
             counter: torch.Tensor, mask: torch.Tensor | None = None, loss_type: int = 0, huber_c: float = 0.1,
             huber_c_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss: 0-dim float32, d loss / d pred like pred or None). One kernel launch.

    inst_scale / prior_scale already include 1/M; snr_gamma < 0 means no min-SNR weight;
    `counter` is a 1-element int32 device tensor that is 0 at rest (left 0 again).
    mask: None or contiguous fp32 (Bm, Cm, S) with Bm in {1, B}, Cm in {1, C} (the kernel
    reads a size-1 dimension with stride 0); loss_type 0 l2, 1 huber, 2 smooth_l1 with c =
    huber_c, or huber_c_rows (fp32 (B,)) when given.
    """
    loss, grad = _ext.load().cuda_diffusion_loss_fwd(
        pred, x0, noise, noise_offset, timesteps, alphas_cumprod, counter,
        int(pred_type), int(n_inst), float(inst_scale), float(prior_scale),
        -1.0 if snr_gamma is None else float(snr_gamma), _seed_i64(seed), bool(need_grad),
        mask, int(loss_type), float(huber_c), huber_c_rows)
    return loss, (grad if need_grad else None)


def add_noise(x0, noise, noise_offset, timesteps, alphas_cumprod, *, seed: int) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps in x0's dtype."""
    return _ext.load().cuda_add_noise(x0, noise, noise_offset, timesteps, alphas_cumprod, _seed_i64(seed))
