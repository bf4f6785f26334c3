"""The pieces of the `loss` suite (bench/diffusion_loss.py) that compute and check a step.

* the stock diffusers DreamBooth recipe in plain PyTorch (the `eager` providers): the
  scaled_linear schedule, DDPMSchedule, compute_snr-style min-SNR weights,
  eager_dreambooth_loss; with a mask or a robust loss, kohya's way of writing them
  (conditional_loss(reduction="none") * mask, mean per row);
* the cases (shape, dtype, min-SNR gamma, loss variant) and their inputs;
* the ground truth from the pure-PyTorch reference (dbkernels/ops/diffusion_loss/reference.py);
* the providers (dbkernels backends, eager, eager-stock, torch.compile);
* the pre-timing check of one provider's loss, gradient and x_t against the truth.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

PREDICTION_TYPE = "epsilon"
PRIOR_WEIGHT = 1.0
NUM_TRAIN_TIMESTEPS = 1000
HUBER_C = 0.1  # kohya's default
# loss variants: "[mask+]<l2|huber|smooth_l1>", the mask a (B, 1, H, W) fp32 weight at latent resolution
LOSS_VARIANTS = ("l2", "mask", "huber", "mask+huber", "smooth_l1", "mask+smooth_l1", "mask+l2")

# (loss rel, grad max-err / max|grad_ref|, x_t max-err / max|x_t_ref|). A bf16 gradient
# element may differ by one bf16 ulp (2^-7 relative) between two correct fp32
# computations rounded to bf16; eager's add_noise computes its coefficients in the
# input dtype (as diffusers does), hence the looser x_t tolerance for 16-bit inputs.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5, 1e-5),
    torch.bfloat16: (1e-3, 1.6e-2, 2e-2),
    torch.float16: (1e-3, 4e-3, 4e-3),
}


# ---------------------------------------------------------------------------------
# The stock diffusers DreamBooth recipe, in plain PyTorch
# ---------------------------------------------------------------------------------


def sd_alphas_cumprod(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> torch.Tensor:
    """abar_t of Stable Diffusion's "scaled_linear" DDPM schedule (fp32, CPU)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class DDPMSchedule:
    """What train_dreambooth.py uses of DDPMScheduler: add_noise, get_velocity, alphas_cumprod.

    Same indexing as the scheduler: the schedule is cast to the sample's dtype and
    device, indexed by t, flattened, then unsqueezed to the sample's rank.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod

    def _coefficients(self, sample: torch.Tensor, timesteps: torch.Tensor):
        self.alphas_cumprod = self.alphas_cumprod.to(device=sample.device)
        abar = self.alphas_cumprod.to(dtype=sample.dtype)
        timesteps = timesteps.to(sample.device)
        sqrt_alpha_prod = (abar[timesteps] ** 0.5).flatten()
        while sqrt_alpha_prod.dim() < sample.dim():
            sqrt_alpha_prod = sqrt_alpha_prod.unsqueeze(-1)
        sqrt_one_minus_alpha_prod = ((1 - abar[timesteps]) ** 0.5).flatten()
        while sqrt_one_minus_alpha_prod.dim() < sample.dim():
            sqrt_one_minus_alpha_prod = sqrt_one_minus_alpha_prod.unsqueeze(-1)
        return sqrt_alpha_prod, sqrt_one_minus_alpha_prod

    def add_noise(self, original_samples, noise, timesteps):
        a, s = self._coefficients(original_samples, timesteps)
        return a * original_samples + s * noise

    def get_velocity(self, sample, noise, timesteps):
        a, s = self._coefficients(sample, timesteps)
        return a * noise - s * sample


def make_schedule(alphas_cumprod: torch.Tensor):
    """diffusers' DDPMScheduler if it is installed (checked to hold the same schedule),
    else DDPMSchedule. Returns (schedule, label)."""
    try:
        from diffusers import DDPMScheduler
    except Exception:  # noqa: BLE001 - diffusers absent or broken: same math written out
        return DDPMSchedule(alphas_cumprod.clone()), "bench.DDPMSchedule"
    sched = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012)
    theirs = sched.alphas_cumprod.float().cpu()
    if not torch.allclose(theirs, alphas_cumprod.float().cpu(), rtol=1e-6, atol=0):
        raise RuntimeError("diffusers' scaled_linear schedule differs from sd_alphas_cumprod()")
    return sched, "diffusers.DDPMScheduler"


def compute_snr(schedule, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = (sqrt(abar_t) / sqrt(1 - abar_t))^2, as diffusers.training_utils.compute_snr."""
    abar = schedule.alphas_cumprod
    alpha = (abar ** 0.5).to(device=timesteps.device)[timesteps].float()
    sigma = ((1.0 - abar) ** 0.5).to(device=timesteps.device)[timesteps].float()
    while alpha.dim() < timesteps.dim():
        alpha = alpha[..., None]
        sigma = sigma[..., None]
    alpha = alpha.expand(timesteps.shape)
    sigma = sigma.expand(timesteps.shape)
    return (alpha / sigma) ** 2


def _min_snr_weights(schedule, timesteps, snr_gamma, prediction_type):
    snr = compute_snr(schedule, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        return weights / snr
    if prediction_type == "v_prediction":
        return weights / (snr + 1)
    raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")


def _weighted_mse(model_pred, target, weights):
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * weights
    return loss.mean()


def conditional_loss(model_pred, target, loss_type="l2", huber_c=HUBER_C):
    """kohya's train_util.conditional_loss(..., reduction="none") on fp32 copies."""
    p, t = model_pred.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(p, t, reduction="none")
    if loss_type == "huber":
        return 2 * huber_c * (torch.sqrt((p - t) ** 2 + huber_c ** 2) - huber_c)
    if loss_type == "smooth_l1":
        return 2 * (torch.sqrt((p - t) ** 2 + huber_c ** 2) - huber_c)
    raise ValueError(f"loss_type must be l2, huber or smooth_l1, got {loss_type!r}")


def _row_losses(model_pred, target, mask, loss_type, huber_c):
    """Per-row means of mask * loss (kohya's masked loss: the mask multiplies, the mean is over all pixels)."""
    loss = conditional_loss(model_pred, target, loss_type, huber_c)
    if mask is not None:
        loss = loss * mask
    return loss.mean(dim=list(range(1, loss.dim())))


def eager_dreambooth_loss(pred, x0, noise, timesteps, schedule, *, prediction_type="epsilon",
                          num_prior=0, prior_weight=1.0, snr_gamma=None, snr_weight_prior=True,
                          mask=None, loss_type="l2", huber_c=HUBER_C):
    """The train_dreambooth.py loss step; returns (loss, noisy_latents).

    With a mask or loss_type != "l2" each half is kohya's conditional_loss * mask, averaged
    per row, min-SNR weighted per row, then averaged (_robust_loss).

    pred stands in for the UNet output on noisy_latents (returned so that
    torch.compile cannot drop the add_noise work). With prior preservation the
    batch is [instance half; class half] (num_prior == B // 2). snr_weight_prior:
    weight the class half by its own min-SNR weights too (our spec); False gives
    upstream's behaviour (class half plain MSE).
    """
    noisy_latents = schedule.add_noise(x0, noise, timesteps)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = schedule.get_velocity(x0, noise, timesteps)
    else:
        raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")

    if mask is not None or loss_type != "l2":
        loss = _robust_loss(pred, target, timesteps, schedule, prediction_type, num_prior, prior_weight, snr_gamma,
                            snr_weight_prior, mask, loss_type, huber_c)
        return loss, noisy_latents

    model_pred = pred
    inst_timesteps = timesteps
    if num_prior:
        if 2 * num_prior != pred.shape[0]:
            raise ValueError(f"the recipe chunks the batch in halves: num_prior must be "
                             f"{pred.shape[0] // 2} for batch {pred.shape[0]}, got {num_prior}")
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        inst_timesteps, prior_timesteps = torch.chunk(timesteps, 2, dim=0)
        if snr_gamma is not None and snr_weight_prior:
            prior_loss = _weighted_mse(model_pred_prior, target_prior,
                                       _min_snr_weights(schedule, prior_timesteps, snr_gamma, prediction_type))
        else:
            prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")

    if snr_gamma is None:
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    else:
        loss = _weighted_mse(model_pred, target,
                             _min_snr_weights(schedule, inst_timesteps, snr_gamma, prediction_type))

    if num_prior:
        loss = loss + prior_weight * prior_loss
    return loss, noisy_latents


def _robust_loss(pred, target, timesteps, schedule, prediction_type, num_prior, prior_weight, snr_gamma,
                 snr_weight_prior, mask, loss_type, huber_c):
    n_inst = pred.shape[0] - num_prior
    halves = [(slice(0, n_inst), True, 1.0)] + ([(slice(n_inst, None), snr_weight_prior, prior_weight)]
                                                if num_prior else [])
    total = 0.0
    for rows, weighted, factor in halves:
        m = None if mask is None else mask[rows]
        row_loss = _row_losses(pred[rows], target[rows], m, loss_type, huber_c)
        if snr_gamma is not None and weighted:
            row_loss = row_loss * _min_snr_weights(schedule, timesteps[rows], snr_gamma, prediction_type)
        total = total + factor * row_loss.mean()
    return total


# ---------------------------------------------------------------------------------
# Cases, inputs, ground truth
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    shape_name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    snr_gamma: float | None
    prediction_type: str = PREDICTION_TYPE
    prior_weight: float = PRIOR_WEIGHT
    loss: str = "l2"  # one of LOSS_VARIANTS

    @property
    def masked(self) -> bool:
        return self.loss.startswith("mask")

    @property
    def loss_type(self) -> str:
        kind = self.loss.removeprefix("mask").removeprefix("+")
        return kind or "l2"

    @property
    def loss_kwargs(self) -> dict:
        """diffusion_loss's loss_type / huber_c (the mask comes from the inputs)."""
        return {} if self.loss_type == "l2" else dict(loss_type=self.loss_type, huber_c=HUBER_C)

    @property
    def num_prior(self) -> int:
        return self.shape[0] // 2

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def variant(self) -> str:
        g = "none" if self.snr_gamma is None else f"{self.snr_gamma:g}"
        loss = "" if self.loss == "l2" else f", {self.loss}"
        return f"{self.prediction_type}, snr_gamma={g}{loss}"

    def bytes_model(self, mode: str) -> int:
        """7 N elt (full) or 6 N elt (fwd), plus one read of the fp32 (B, 1, H, W) mask."""
        elt = torch.empty((), dtype=self.dtype).element_size()
        mask_bytes = 4 * self.numel // self.shape[1] if self.masked else 0
        return (7 if mode == "full" else 6) * self.numel * elt + mask_bytes


@dataclasses.dataclass
class Inputs:
    pred: torch.Tensor            # leaf, requires_grad (full mode)
    pred_nograd: torch.Tensor     # same storage, no grad (fwd mode)
    x0: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor       # int64 (B,)
    alphas_cumprod: torch.Tensor  # fp32 (1000,) on the device
    schedule: Any                 # for the eager providers
    mask: torch.Tensor | None = None  # fp32 (B, 1, H, W) in [0, 1] for the masked variants


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(case.shape, generator=g).to(device=device, dtype=case.dtype)
    noise = torch.randn(case.shape, generator=g).to(device=device, dtype=case.dtype)
    pred = torch.randn(case.shape, generator=g).to(device=device, dtype=case.dtype).requires_grad_(True)
    timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (case.shape[0],), generator=g).long().to(device)
    mask = None
    if case.masked:
        mask = torch.rand((case.shape[0], 1, *case.shape[2:]), generator=g).to(device)
    abar = sd_alphas_cumprod()
    schedule, _ = make_schedule(abar)
    return Inputs(pred=pred, pred_nograd=pred.detach(), x0=x0, noise=noise, timesteps=timesteps,
                  alphas_cumprod=abar.to(device), schedule=schedule, mask=mask)


def _reference_module():
    return importlib.import_module("dbkernels.ops.diffusion_loss.reference")


@dataclasses.dataclass
class Truth:
    loss: torch.Tensor
    grad: torch.Tensor
    x_t: torch.Tensor


def reference_truth(case: Case, inp: Inputs, semantics: str = "spec") -> Truth:
    """Loss, d loss / d pred and x_t from the pure-PyTorch reference.

    semantics="stock": upstream diffusers (class rows not min-SNR weighted), built
    from the same reference pieces.
    """
    ref = _reference_module()
    pred = inp.pred.detach().clone().requires_grad_(True)
    args = (inp.x0, inp.noise, inp.timesteps, inp.alphas_cumprod)
    robust = dict(mask=inp.mask, **case.loss_kwargs)
    if semantics == "spec" or case.snr_gamma is None:
        loss = ref.diffusion_loss(pred, *args, prediction_type=case.prediction_type, num_prior=case.num_prior,
                                  prior_weight=case.prior_weight, snr_gamma=case.snr_gamma, **robust)
    elif semantics == "stock":
        weighted = ref.per_sample_loss(pred, *args, prediction_type=case.prediction_type,
                                       snr_gamma=case.snr_gamma, **robust)
        plain = ref.per_sample_loss(pred, *args, prediction_type=case.prediction_type, snr_gamma=None, **robust)
        n_inst = case.shape[0] - case.num_prior
        loss = weighted[:n_inst].mean()
        if case.num_prior:
            loss = loss + case.prior_weight * plain[n_inst:].mean()
    else:
        raise ValueError(f"unknown semantics {semantics!r}")
    loss.backward()
    x_t = ref.add_noise(*args)
    return Truth(loss=loss.detach(), grad=pred.grad.detach(), x_t=x_t.detach())


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().double()
    b = b.detach().double()
    if a.shape != b.shape:
        return math.inf
    denom = b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    if not math.isfinite(err):
        return math.inf
    return err / denom if denom > 0 else err


# ---------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------


class Skip(Exception):
    """A provider cannot run here (the message says why); not a failure."""


def _dbkernels_api():
    """(dbkernels, add_noise, diffusion_loss); raises Skip if the ops have not landed."""
    try:
        dbk = importlib.import_module("dbkernels")
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"import dbkernels failed: {type(exc).__name__}: {exc}") from exc
    add_noise = getattr(dbk, "add_noise", None)
    loss = getattr(dbk, "diffusion_loss", None)
    missing = [n for n, v in (("add_noise", add_noise), ("diffusion_loss", loss),
                              ("force_backend", getattr(dbk, "force_backend", None)),
                              ("BackendUnavailable", getattr(dbk, "BackendUnavailable", None)))
               if v is None]
    if missing:
        raise Skip(f"dbkernels does not provide {', '.join(missing)} (yet)")
    return dbk, add_noise, loss


@dataclasses.dataclass
class Provider:
    name: str
    # make(case, inputs) -> fn(pred) -> (loss, x_t); may raise Skip
    make: Callable[[Case, Inputs], Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    semantics: str = "spec"


def _dbkernels_provider(backend: str) -> Provider:
    state: dict[str, Any] = {}

    def api():
        if "api" not in state:
            state["api"] = _dbkernels_api()
        return state["api"]

    def context():
        try:
            dbk, _, _ = api()
        except Skip:
            return contextlib.nullcontext()
        return dbk.force_backend(backend)

    def make(case: Case, inp: Inputs):
        _, add_noise, diffusion_loss = api()

        def fn(pred):
            x_t = add_noise(inp.x0, inp.noise, inp.timesteps, inp.alphas_cumprod)
            loss = diffusion_loss(pred, inp.x0, inp.noise, inp.timesteps, inp.alphas_cumprod,
                                  prediction_type=case.prediction_type, num_prior=case.num_prior,
                                  prior_weight=case.prior_weight, snr_gamma=case.snr_gamma, validate=False,
                                  mask=inp.mask, **case.loss_kwargs)
            return loss, x_t
        return fn

    return Provider(f"dbkernels-{backend}", make, context)


def _eager_make(snr_weight_prior: bool):
    def make(case: Case, inp: Inputs):
        def fn(pred):
            return eager_dreambooth_loss(pred, inp.x0, inp.noise, inp.timesteps, inp.schedule,
                                         prediction_type=case.prediction_type, num_prior=case.num_prior,
                                         prior_weight=case.prior_weight, snr_gamma=case.snr_gamma,
                                         snr_weight_prior=snr_weight_prior, mask=inp.mask,
                                         loss_type=case.loss_type, huber_c=HUBER_C)
        return fn
    return make


def _compile_make(case: Case, inp: Inputs):
    # A fresh compilation per case: dynamo caches per code object and would
    # otherwise hit its recompile limit across shapes/dtypes and fall back to eager.
    torch._dynamo.reset()
    eager = _eager_make(True)(case, inp)
    return torch.compile(eager)


def make_providers() -> dict[str, Provider]:
    return {
        "eager": Provider("eager", _eager_make(True)),
        "eager-stock": Provider("eager-stock", _eager_make(False), semantics="stock"),
        "torch.compile": Provider("torch.compile", _compile_make),
        "dbkernels-triton": _dbkernels_provider("triton"),
        "dbkernels-cuda": _dbkernels_provider("cuda"),
        "dbkernels-reference": _dbkernels_provider("reference"),
    }


# ---------------------------------------------------------------------------------
# The check before timing
# ---------------------------------------------------------------------------------


def _step(fn, inp: Inputs, mode: str):
    if mode == "full":
        pred = inp.pred

        def step():
            loss, x_t = fn(pred)
            loss.backward()
            return loss, x_t
        return step, [pred]

    def step():
        return fn(inp.pred_nograd)
    return step, None


def check_provider(fn, case: Case, inp: Inputs, truth: Truth, mode: str) -> dict[str, float]:
    """Run one step and compare with the reference; raise AssertionError with details."""
    inp.pred.grad = None
    step, _ = _step(fn, inp, mode)
    loss, x_t = step()
    loss_tol, grad_tol, xt_tol = TOLERANCES.get(case.dtype, TOLERANCES[torch.bfloat16])
    errs = {"loss_rel_err": _max_rel(loss.reshape(()), truth.loss.reshape(())),
            "x_t_rel_err": _max_rel(x_t, truth.x_t)}
    problems = []
    if loss.dim() != 0 or loss.dtype != torch.float32:
        problems.append(f"loss must be a 0-dim fp32 tensor, got shape {tuple(loss.shape)} {loss.dtype}")
    if mode == "full":
        grad = inp.pred.grad
        if grad is None:
            problems.append("pred.grad is None after backward()")
            errs["grad_rel_err"] = math.inf
        else:
            errs["grad_rel_err"] = _max_rel(grad, truth.grad)
    inp.pred.grad = None
    limits = {"loss_rel_err": loss_tol, "grad_rel_err": grad_tol, "x_t_rel_err": xt_tol}
    for key, err in errs.items():
        if not err <= limits[key]:
            problems.append(f"{key}={err:.3g} > {limits[key]:g}")
    if problems:
        raise AssertionError("; ".join(problems))
    return errs
