"""Pure-PyTorch reference for the fused DreamBooth loss. This file is the spec.

Every backend (Triton, CUDA) must compute exactly these functions:

    a_i = sqrt(abar[t_i]),  s_i = sqrt(1 - abar[t_i]),  eps_i = noise_i (+ offset[i, c])
    x_t = a_i * x0_i + s_i * eps_i
    target = eps (epsilon) | a_i * eps - s_i * x0 (v_prediction) | x0 (sample)
    e_ij = pred_ij - target_ij
    loss = sum_i scale_i * w_i * mean_j mask_ij * l(e_ij)      (mean over the row's M elements)
    l(e) = e^2 (l2) | 2 c_i q(e) (huber) | 2 q(e) (smooth_l1),   q(e) = sqrt(e^2 + c_i^2) - c_i
    scale_i = 1 / n_inst for instance rows, prior_weight / num_prior for the last
              num_prior rows (the class / prior-preservation samples)
    w_i = 1, or min-SNR: epsilon min(SNR, g)/SNR, v_prediction min(SNR, g)/(SNR+1),
          sample min(SNR, g);  SNR = abar / (1 - abar)

mask (default: ones) is a per-element weight broadcast to pred. Normalisation is kohya's:
the plain mean of mask * l over all M elements of the row, the mask's own mean is NOT
divided out, so a half-masked row weighs half as much; a caller who wants a weighted mean
divides the mask by its per-row mean first. A mask of ones gives exactly the unmasked bits.
huber / smooth_l1 are kohya's and diffusers' pseudo-Huber losses; c_i is one positive
huber_c for all rows or one per row. q is evaluated as e^2 / (sqrt(e^2 + c^2) + c): equal
to sqrt(e^2 + c^2) - c, without its cancellation for |e| << c. The gradient is
d l / d e = 2e (l2), 2 c e / sqrt(e^2 + c^2) (huber), 2 e / sqrt(e^2 + c^2) (smooth_l1),
times scale_i * w_i / M and the mask.

The epsilon weight is evaluated as min(g / SNR, 1), which equals min(SNR, g)/SNR
everywhere it is defined and takes its limit (1) at SNR = 0 instead of NaN.
Everything is computed in fp32 whatever the input dtypes.
"""
from __future__ import annotations

import math

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LOSS_TYPES = ("l2", "huber", "smooth_l1")

# Philox4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_U32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a < 2^32 and m < 2^32, so a*m fits in 64 bits; torch int64 wraps, and the
    # wrapped bit pattern still holds the right high and low words.
    p = a * m
    return (p >> 32) & _U32, p & _U32


def philox_normal(index: torch.Tensor, seed: int) -> torch.Tensor:
    """One standard normal per int64 element index, from Philox4x32-10 + Box-Muller.

    counter = (index_lo, index_hi, 0, 0), key = (seed_lo, seed_hi). The first two
    output words give u1 = ((r0 >> 8) + 1) / 2^24 in (0, 1] and u2 = (r1 >> 8) / 2^24
    in [0, 1) (both exact in fp32), and z = sqrt(-2 ln u1) * cos(2 pi u2).
    """
    index = index.to(torch.int64)
    c0 = index & _U32
    c1 = (index >> 32) & _U32
    c2 = torch.zeros_like(index)
    c3 = torch.zeros_like(index)
    k0 = seed & _U32
    k1 = (seed >> 32) & _U32
    for r in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r + 1 < PHILOX_ROUNDS:
            k0 = (k0 + PHILOX_W0) & _U32
            k1 = (k1 + PHILOX_W1) & _U32
    u1 = ((c0 >> 8) + 1).to(torch.float32) * (1.0 / 16777216.0)
    u2 = (c1 >> 8).to(torch.float32) * (1.0 / 16777216.0)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def seeded_noise(shape, seed: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The noise tensor that the kernels generate in place for `seed` (row-major index)."""
    numel = math.prod(shape)
    idx = torch.arange(numel, device=device, dtype=torch.int64)
    return philox_normal(idx, seed).reshape(shape).to(dtype)


def _effective_noise(x0, noise, seed, noise_offset):
    eps = seeded_noise(x0.shape, seed, device=x0.device) if noise is None else noise.float()
    if noise_offset is not None:
        eps = eps + noise_offset.float().reshape(*noise_offset.shape, *([1] * (x0.dim() - 2)))
    return eps


def abar_of(timesteps, alphas_cumprod):
    """alphas_cumprod[t] in fp32; NaN for a t outside [0, len) (as the kernels: validate=False
    skips the range check, and such a row must poison the loss, never read out of bounds)."""
    t = timesteps.long()
    n = alphas_cumprod.shape[0]
    ok = (t >= 0) & (t < n)
    abar = alphas_cumprod.float()[t.clamp(0, n - 1)]
    return torch.where(ok, abar, torch.full_like(abar, float("nan")))


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt, as the kernels' sqrtf: torch's vectorized CPU sqrt is not
    (an ulp off in ~20% of elements on an AVX-512 build); sqrt in float64 rounded once is exact."""
    return torch.sqrt(x.double()).float()


def _coefficients(timesteps, alphas_cumprod):
    abar = abar_of(timesteps, alphas_cumprod)
    return abar, _sqrt_rn(abar), _sqrt_rn(1.0 - abar)


def row_weights(abar, prediction_type, snr_gamma):
    """w_i, NaN where abar is (an out-of-range timestep), whatever the weighting."""
    return snr_weights(abar, prediction_type, snr_gamma) + 0.0 * abar


def _bcast(v, like):
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(x0, noise, timesteps, alphas_cumprod, *, noise_offset=None, seed=None):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, returned in x0's dtype."""
    _, a, s = _coefficients(timesteps, alphas_cumprod)
    eps = _effective_noise(x0, noise, seed, noise_offset)
    return (_bcast(a, x0) * x0.float() + _bcast(s, x0) * eps).to(x0.dtype)


def snr_weights(abar, prediction_type, snr_gamma):
    if snr_gamma is None:
        return torch.ones_like(abar)
    snr = abar / (1.0 - abar)
    if prediction_type == "epsilon":
        return torch.clamp(snr_gamma / snr, max=1.0)
    if prediction_type == "v_prediction":
        return torch.clamp(snr, max=snr_gamma) / (snr + 1.0)
    return torch.clamp(snr, max=snr_gamma)


def sample_scales(batch, num_prior, prior_weight, device):
    n_inst = batch - num_prior
    scale = torch.empty(batch, dtype=torch.float32, device=device)
    if n_inst:
        scale[:n_inst] = 1.0 / n_inst
    if num_prior:
        scale[n_inst:] = prior_weight / num_prior
    return scale


def diffusion_target(x0, noise, timesteps, alphas_cumprod, prediction_type, *, noise_offset=None, seed=None):
    eps = _effective_noise(x0, noise, seed, noise_offset)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0.float()
    _, a, s = _coefficients(timesteps, alphas_cumprod)
    return _bcast(a, x0) * eps - _bcast(s, x0) * x0.float()


def _row_c(huber_c, like):
    """c per row as an fp32 tensor broadcast against `like` (B, ...)."""
    if isinstance(huber_c, torch.Tensor):
        return _bcast(huber_c.float(), like)
    return torch.tensor(float(huber_c), dtype=torch.float32, device=like.device)


def elementwise_loss(e, loss_type="l2", huber_c=0.1):
    """l(e) in fp32 (see the module docstring); huber_c a float or a (B,) tensor."""
    if loss_type == "l2":
        return e * e
    c = _row_c(huber_c, e)
    q = e * e / (_sqrt_rn(e * e + c * c) + c)
    return (2.0 * c) * q if loss_type == "huber" else 2.0 * q


def elementwise_grad(e, loss_type="l2", huber_c=0.1):
    """d l / d e in fp32."""
    if loss_type == "l2":
        return 2.0 * e
    c = _row_c(huber_c, e)
    k = 2.0 * c if loss_type == "huber" else torch.tensor(2.0, device=e.device)
    return k * (e / _sqrt_rn(e * e + c * c))


def per_sample_loss(pred, x0, noise, timesteps, alphas_cumprod, *, prediction_type="epsilon",
                    snr_gamma=None, noise_offset=None, seed=None, mask=None, loss_type="l2", huber_c=0.1):
    """w_i * mean_j mask_ij * l(pred_ij - target_ij) per row, fp32 (B,)."""
    target = diffusion_target(x0, noise, timesteps, alphas_cumprod, prediction_type,
                              noise_offset=noise_offset, seed=seed)
    el = elementwise_loss(pred.float() - target, loss_type, huber_c)
    if mask is not None:
        el = mask.float() * el
    rows = el.flatten(1).mean(1)
    return row_weights(abar_of(timesteps, alphas_cumprod), prediction_type, snr_gamma) * rows


def diffusion_loss(pred, x0, noise, timesteps, alphas_cumprod, *, prediction_type="epsilon",
                   num_prior=0, prior_weight=1.0, snr_gamma=None, noise_offset=None, seed=None,
                   mask=None, loss_type="l2", huber_c=0.1):
    """The loss as a differentiable fp32 0-dim tensor (autograd gives the gradient)."""
    rows = per_sample_loss(pred, x0, noise, timesteps, alphas_cumprod, prediction_type=prediction_type,
                           snr_gamma=snr_gamma, noise_offset=noise_offset, seed=seed, mask=mask,
                           loss_type=loss_type, huber_c=huber_c)
    return (sample_scales(pred.shape[0], num_prior, prior_weight, pred.device) * rows).sum()


def loss_and_grad(pred, x0, noise, timesteps, alphas_cumprod, *, prediction_type="epsilon", num_prior=0,
                  prior_weight=1.0, snr_gamma=None, noise_offset=None, seed=None, need_grad=True,
                  mask=None, loss_type="l2", huber_c=0.1):
    """What the kernels compute: (loss fp32 0-dim, d loss / d pred in pred's dtype or None).

    mask multiplies last (after l and after 2 coef l'), so a mask of ones changes no bit."""
    target = diffusion_target(x0, noise, timesteps, alphas_cumprod, prediction_type,
                              noise_offset=noise_offset, seed=seed)
    d = pred.float() - target
    m = pred[0].numel()
    coef = sample_scales(pred.shape[0], num_prior, prior_weight, pred.device) * row_weights(
        abar_of(timesteps, alphas_cumprod), prediction_type, snr_gamma) / m
    el = elementwise_loss(d, loss_type, huber_c)
    if mask is not None:
        el = el * mask.float()
    loss = (coef * el.flatten(1).sum(1)).sum()
    grad = None
    if need_grad:
        grad = _bcast(coef, d) * elementwise_grad(d, loss_type, huber_c)
        if mask is not None:
            grad = grad * mask.float()
        grad = grad.to(pred.dtype)
    return loss, grad
