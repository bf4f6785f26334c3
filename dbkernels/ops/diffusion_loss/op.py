"""add_noise and the fused DreamBooth loss: checks, torch.library ops, autograd, public API.

Layers (FlashAttention style): backend functions (triton_kernels / cuda / reference)
-> torch.library custom ops `dbkernels::add_noise` and `dbkernels::diffusion_loss_fwd`
(opaque to torch.compile, with fake implementations) -> `_DiffusionLoss`
(autograd.Function) -> the documented functions `add_noise` and `diffusion_loss`.

The forward kernel writes d loss / d pred while it computes the loss (Liger style),
so backward only multiplies that buffer by the incoming scalar gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _backend, _checks, _workspace
from . import reference

PREDICTION_TYPES = reference.PREDICTION_TYPES
LOSS_TYPES = reference.LOSS_TYPES
# Unmeasured so far: CUDA first as the hand-fitted kernel; reorder from bench/results.
_backend.register_op("diffusion_loss", ("cuda", "triton", "reference"))
_backend.register_op("add_noise", ("cuda", "triton", "reference"))
_SEED_LIMIT = 1 << 63  # seeds travel through torch.library as int64


class _ReferenceBackend:
    """The reference behind the kernel modules' call signature."""

    @staticmethod
    def add_noise(x0, noise, noise_offset, timesteps, alphas_cumprod, *, seed):
        return reference.add_noise(x0, noise, timesteps, alphas_cumprod, noise_offset=noise_offset, seed=seed)

    @staticmethod
    def loss_fwd(pred, x0, noise, noise_offset, timesteps, alphas_cumprod, *, pred_type, n_inst,
                 inst_scale, prior_scale, snr_gamma, seed, need_grad, counter, mask=None, loss_type=0,
                 huber_c=0.1, huber_c_rows=None):
        del inst_scale, counter
        num_prior = pred.shape[0] - n_inst
        # The kernels get prior_weight folded into prior_scale = prior_weight / (num_prior * M).
        prior_weight = prior_scale * num_prior * (pred.numel() // pred.shape[0]) if num_prior else 0.0
        if mask is not None:  # the kernels' (Bm, Cm, S) layout back to a shape that broadcasts to pred
            mask = mask.reshape(mask.shape[0], mask.shape[1], *pred.shape[2:])
        return reference.loss_and_grad(
            pred, x0, noise, timesteps, alphas_cumprod, prediction_type=PREDICTION_TYPES[pred_type],
            num_prior=num_prior, prior_weight=prior_weight, snr_gamma=None if snr_gamma < 0 else snr_gamma,
            noise_offset=noise_offset, seed=seed, need_grad=need_grad, mask=mask,
            loss_type=LOSS_TYPES[loss_type], huber_c=huber_c if huber_c_rows is None else huber_c_rows)


def _impl(op: str, device: torch.device):
    name = _backend.choose(op, device.type)
    if name == "reference":
        return _ReferenceBackend
    if name == "triton":
        return _backend.import_triton_kernels("dbkernels.ops.diffusion_loss.triton_kernels")
    from . import cuda

    return cuda


# ---------------------------------------------------------------- torch.library ops

@torch.library.custom_op("dbkernels::add_noise", mutates_args=())
def _add_noise_op(x0: torch.Tensor, noise: Optional[torch.Tensor], noise_offset: Optional[torch.Tensor],
                  timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, seed: int) -> torch.Tensor:
    impl = _impl("add_noise", x0.device)
    return impl.add_noise(x0, noise, noise_offset, timesteps, alphas_cumprod, seed=seed)


@_add_noise_op.register_fake
def _(x0, noise, noise_offset, timesteps, alphas_cumprod, seed):
    return torch.empty_like(x0)


@torch.library.custom_op("dbkernels::diffusion_loss_fwd", mutates_args=())
def _loss_fwd_op(pred: torch.Tensor, x0: torch.Tensor, noise: Optional[torch.Tensor],
                 noise_offset: Optional[torch.Tensor], timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                 pred_type: int, num_prior: int, prior_weight: float, snr_gamma: float, seed: int,
                 need_grad: bool, mask: Optional[torch.Tensor] = None, loss_type: int = 0, huber_c: float = 0.1,
                 huber_c_rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    b = pred.shape[0]
    m = pred.numel() // b
    n_inst = b - num_prior
    impl = _impl("diffusion_loss", pred.device)
    loss, grad = impl.loss_fwd(
        pred, x0, noise, noise_offset, timesteps, alphas_cumprod, pred_type=pred_type, n_inst=n_inst,
        inst_scale=1.0 / (n_inst * m) if n_inst else 0.0,
        prior_scale=prior_weight / (num_prior * m) if num_prior else 0.0,
        snr_gamma=snr_gamma, seed=seed, need_grad=need_grad, counter=_workspace.ticket_counter(pred.device),
        mask=mask, loss_type=loss_type, huber_c=huber_c, huber_c_rows=huber_c_rows)
    return loss, (grad if grad is not None else pred.new_empty(0))


@_loss_fwd_op.register_fake
def _(pred, x0, noise, noise_offset, timesteps, alphas_cumprod, pred_type, num_prior, prior_weight,
      snr_gamma, seed, need_grad, mask=None, loss_type=0, huber_c=0.1, huber_c_rows=None):
    loss = pred.new_empty((), dtype=torch.float32)
    return loss, (torch.empty_like(pred) if need_grad else pred.new_empty(0))


class _DiffusionLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, x0, noise, noise_offset, timesteps, alphas_cumprod, pred_type, num_prior,
                prior_weight, snr_gamma, seed, mask, loss_type, huber_c, huber_c_rows):
        need_grad = ctx.needs_input_grad[0]
        loss, grad = _loss_fwd_op(pred, x0, noise, noise_offset, timesteps, alphas_cumprod, pred_type,
                                  num_prior, prior_weight, snr_gamma, seed, need_grad, mask, loss_type, huber_c,
                                  huber_c_rows)
        if need_grad:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        # Out of place so a second backward (retain_graph=True) still sees the saved buffer.
        return (grad * grad_loss,) + (None,) * 14


# ---------------------------------------------------------------- argument checks

def _prepare(x0, noise, timesteps, alphas_cumprod, noise_offset, seed, validate, *, pred=None):
    """Check everything, return the tensors as the kernels want them."""
    lead = "pred" if pred is not None else "x0"
    if pred is not None:
        _checks.tensor("pred", pred, min_ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("x0", x0, min_ndim=2, dtypes=_checks.FLOAT_DTYPES)
    if pred is not None:
        _checks.same_shape("x0", x0, "pred", pred)
    if x0.shape[0] == 0 or x0.numel() == 0:
        raise ValueError(f"x0 must not be empty, got shape {tuple(x0.shape)}")
    if noise is None and seed is None:
        raise ValueError("pass the noise tensor, or noise=None with seed=<int> to generate it in the kernel")
    if noise is not None and seed is not None:
        raise ValueError("pass either noise or seed, not both (seed generates the noise in the kernel)")
    if noise is not None:
        _checks.tensor("noise", noise, dtypes=_checks.FLOAT_DTYPES)
        _checks.same_shape("noise", noise, "x0", x0)
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    _checks.tensor("timesteps", timesteps, ndim=1, kind="integer")
    if timesteps.shape[0] != x0.shape[0]:
        raise ValueError(f"timesteps must have shape ({x0.shape[0]},) (one per batch row), "
                         f"got {tuple(timesteps.shape)}")
    _checks.tensor("alphas_cumprod", alphas_cumprod, ndim=1, kind="floating")
    if noise_offset is not None:
        _checks.tensor("noise_offset", noise_offset, ndim=2, kind="floating")
        if tuple(noise_offset.shape) != tuple(x0.shape[:2]):
            raise ValueError(f"noise_offset must have shape (batch, channels) = {tuple(x0.shape[:2])}, "
                             f"got {tuple(noise_offset.shape)}")
    _checks.same_device({lead: pred if pred is not None else x0, "x0": x0, "noise": noise,
                         "timesteps": timesteps, "alphas_cumprod": alphas_cumprod,
                         "noise_offset": noise_offset})
    if validate and not _checks.is_compiling():
        n = alphas_cumprod.shape[0]
        # One host sync; pass validate=False in a loop that draws timesteps itself.
        if bool(((timesteps < 0) | (timesteps >= n)).any()):
            bad = timesteps[(timesteps < 0) | (timesteps >= n)][:4].tolist()
            raise ValueError(f"timesteps must lie in [0, len(alphas_cumprod)) = [0, {n}), got e.g. {bad}")
    return (x0.contiguous(), None if noise is None else noise.contiguous(),
            timesteps.to(torch.int64).contiguous(), alphas_cumprod.to(torch.float32).contiguous(),
            None if noise_offset is None else noise_offset.to(torch.float32).contiguous())


# ---------------------------------------------------------------- public API

def add_noise(x0: torch.Tensor, noise: Optional[torch.Tensor], timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor, *, noise_offset: Optional[torch.Tensor] = None,
              seed: Optional[int] = None, validate: bool = True) -> torch.Tensor:
    """Forward diffusion: x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps, in x0's dtype.

    x0, noise: (B, C, ...) float32/float16/bfloat16 (any strides). timesteps: (B,)
    integers in [0, len(alphas_cumprod)). eps = noise, or with noise=None and seed=<int>
    the Philox stream `dbkernels.seeded_noise(x0.shape, seed)` generated in the kernel;
    noise_offset (B, C) is added per channel (offset noise; pass the already-scaled
    offsets, e.g. 0.1 * torch.randn(B, C)). Use the same noise/seed/noise_offset for
    diffusion_loss. validate=False skips the timesteps range check (a host sync).
    """
    x0c, noise_c, t, ac, off = _prepare(x0, noise, timesteps, alphas_cumprod, noise_offset, seed, validate)
    return _add_noise_op(x0c, noise_c, off, t, ac, 0 if seed is None else seed)


def _prepare_mask(mask, pred) -> Optional[torch.Tensor]:
    """mask broadcastable to pred -> contiguous fp32 (Bm, Cm, S), Bm in {1, B}, Cm in {1, C}.

    The kernels index it with a row stride of 0 when Bm == 1 and a channel stride of 0 when
    Cm == 1; spatial broadcasting (e.g. (B, 1, 1, 1)) is materialised here (at most B*C*S floats)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if not mask.dtype.is_floating_point:
        raise ValueError(f"mask must be a floating-point tensor (a per-element loss weight), got {mask.dtype}; "
                         f"pass mask.float()")
    if mask.device != pred.device:
        raise ValueError(f"mask is on {mask.device} but pred is on {pred.device}; move all inputs to one device")
    shape = (1,) * (pred.dim() - mask.dim()) + tuple(mask.shape)
    if mask.dim() > pred.dim() or any(m not in (1, p) for m, p in zip(shape, pred.shape)):
        raise ValueError(f"mask must broadcast to pred's shape {tuple(pred.shape)} (e.g. (B, 1, H, W) at latent "
                         f"resolution, (B, C, H, W), (1, 1, H, W) or (B, 1, 1, 1)), got {tuple(mask.shape)}")
    b, c = pred.shape[0], pred.shape[1]
    s = pred.numel() // (b * c)
    m = mask.detach().reshape(shape).to(torch.float32)
    return m.expand(shape[0], shape[1], *pred.shape[2:]).contiguous().reshape(shape[0], shape[1], s)


def _prepare_huber_c(huber_c, loss_type, pred, validate):
    """(scalar c, per-row c tensor or None) as the kernels take them."""
    if isinstance(huber_c, torch.Tensor):
        b = pred.shape[0]
        if not huber_c.dtype.is_floating_point:
            raise TypeError(f"huber_c must be a float or a floating-point (B,) tensor, got {huber_c.dtype}")
        if tuple(huber_c.shape) != (b,):
            raise ValueError(f"huber_c must be a positive float or a ({b},) tensor (one c per batch row), "
                             f"got shape {tuple(huber_c.shape)}")
        if huber_c.device != pred.device:
            raise ValueError(f"huber_c is on {huber_c.device} but pred is on {pred.device}; "
                             f"move all inputs to one device")
        if torch.is_grad_enabled() and huber_c.requires_grad:
            raise ValueError("diffusion_loss is differentiable w.r.t. pred only, but huber_c requires grad; "
                             "pass huber_c.detach()")
        rows = huber_c.detach().to(torch.float32).contiguous()
        if validate and loss_type != "l2" and not _checks.is_compiling() and not bool((rows > 0).all()):
            raise ValueError(f"huber_c must be > 0 in every row, got e.g. {rows[~(rows > 0)][:4].tolist()}")
        return 0.1, rows
    if isinstance(huber_c, bool) or not isinstance(huber_c, (int, float)):
        raise TypeError(f"huber_c must be a float or a (B,) tensor, got {type(huber_c).__name__}")
    if loss_type != "l2" and not (0 < float(huber_c) < float("inf")):
        raise ValueError(f"huber_c must be a positive finite float (0.1 is kohya's default), got {huber_c}")
    return float(huber_c), None


def diffusion_loss(pred: torch.Tensor, x0: torch.Tensor, noise: Optional[torch.Tensor],
                   timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, *, prediction_type: str = "epsilon",
                   num_prior: int = 0, prior_weight: float = 1.0, snr_gamma: Optional[float] = None,
                   noise_offset: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                   mask: Optional[torch.Tensor] = None, loss_type: str = "l2",
                   huber_c: float | torch.Tensor = 0.1, validate: bool = True) -> torch.Tensor:
    """Both DreamBooth loss terms in one pass; a 0-dim fp32 tensor differentiable w.r.t. pred.

    loss = sum_i s_i * w(t_i) * mean_j mask_ij * l(pred_ij - target_ij), where the last
    `num_prior` rows are class (prior-preservation) samples: s_i = 1/n_inst for
    instance rows, prior_weight/num_prior for class rows. target is the noise
    (epsilon), sqrt(abar) eps - sqrt(1-abar) x0 (v_prediction) or x0 (sample).
    w = 1, or with snr_gamma the min-SNR weight min(SNR, g)/SNR (epsilon),
    min(SNR, g)/(SNR + 1) (v_prediction), min(SNR, g) (sample).

    loss_type: "l2" l(e) = e^2; "huber" 2c(sqrt(e^2 + c^2) - c); "smooth_l1"
    2(sqrt(e^2 + c^2) - c) (kohya's and diffusers' pseudo-Huber definitions), with c =
    huber_c: a positive float, or a (B,) float tensor with one c per row (a huber schedule
    that computes c from t). Ignored for "l2".

    mask: None, or a float tensor broadcastable to pred, typically (B, 1, H, W) at latent
    resolution (also (B, C, H, W), (1, 1, H, W), (B, 1, 1, 1)); a weight multiplying each
    element's loss. The row is the plain mean over all its M elements of mask * l: the
    mask's own mean is not divided out (kohya's masked loss), so a row that is mostly
    masked away contributes less, as its few pixels are all it has to teach. For a
    weighted mean instead, divide the mask by its per-row mean before passing it. A mask
    of ones gives exactly (bitwise) the unmasked loss and gradient. The mask gets no
    gradient; it is read in fp32.

    Computed in fp32 for any input dtype; the gradient comes back in pred's dtype.
    Other arguments as add_noise; validate=False also skips the huber_c > 0 check of a
    per-row tensor (a host sync).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if isinstance(num_prior, bool) or not isinstance(num_prior, int):
        raise TypeError(f"num_prior must be an int, got {type(num_prior).__name__}")
    _checks.tensor("pred", pred, min_ndim=2, dtypes=_checks.FLOAT_DTYPES)
    b = pred.shape[0]
    if not 0 <= num_prior <= b:
        raise ValueError(f"num_prior must be in [0, batch={b}] (the last num_prior rows are class samples), "
                         f"got {num_prior}")
    prior_weight = float(prior_weight)
    if prior_weight < 0:
        raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
    if snr_gamma is not None and not float(snr_gamma) > 0:
        raise ValueError(f"snr_gamma must be None or > 0 (5.0 is the usual choice), got {snr_gamma}")
    x0c, noise_c, t, ac, off = _prepare(x0, noise, timesteps, alphas_cumprod, noise_offset, seed, validate,
                                        pred=pred)
    mask_c = _prepare_mask(mask, pred)
    c_scalar, c_rows = _prepare_huber_c(huber_c, loss_type, pred, validate)
    if torch.is_grad_enabled():
        for name, x in (("x0", x0), ("noise", noise), ("noise_offset", noise_offset), ("mask", mask)):
            if x is not None and x.requires_grad:
                raise ValueError(f"diffusion_loss is differentiable w.r.t. pred only, but {name} requires grad; "
                                 f"pass {name}.detach() (e.g. latents encoded by a frozen VAE)")
    return _DiffusionLoss.apply(pred.contiguous(), x0c, noise_c, off, t, ac,
                                PREDICTION_TYPES.index(prediction_type), num_prior, prior_weight,
                                -1.0 if snr_gamma is None else float(snr_gamma), 0 if seed is None else seed,
                                mask_c, LOSS_TYPES.index(loss_type), c_scalar, c_rows)
