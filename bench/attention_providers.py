"""The providers of the `attention` suite (bench/attention.py) and how one shape is run.

* the providers: dbkernels.attention under a forced backend, SDPA restricted to one
  backend, flash-attn and xformers (each may raise Skip where it cannot run);
* the inputs of one shape ((B, L, H, D) leaves handed over as (B, H, L, D) views) and
  the fp32 ground truth from dbkernels/ops/attention/reference.py;
* the pre-timing check of a provider's output and gradients against the truth, and the
  timed measurement of one provider on one shape and mode.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
from typing import Callable

import torch

from . import common

FULL_FLOPS_FACTOR = 3.5  # fwd+bwd FLOPs over the forward's


@dataclasses.dataclass(frozen=True)
class AttnShape:
    """One attention call of a UNet forward (trainer-independent; bench.attention counts them per config)."""

    kind: str  # "self" | "cross"
    batch: int
    heads: int
    lq: int
    lk: int
    head_dim: int

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        return (self.batch, self.heads, self.lq, self.lk, self.head_dim)

    def flops(self, mode: str) -> float:
        fwd = 4.0 * self.batch * self.heads * self.lq * self.lk * self.head_dim
        return fwd * (FULL_FLOPS_FACTOR if mode == "full" else 1.0)


# max |err| / max |truth| allowed in the pre-timing check (the tests hold the 2x rule)
TOLERANCES = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}


# ---------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------


class Skip(Exception):
    """A provider cannot run here or this shape (the message says why); not a failure."""


@dataclasses.dataclass
class Provider:
    name: str
    # make() -> fn(q, k, v) -> out, all (B, H, L, D); may raise Skip
    make: Callable[[], Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def _dbkernels_provider(backend: str) -> Provider:
    def make():
        try:
            dbk = importlib.import_module("dbkernels")
            attention = importlib.import_module("dbkernels.ops.attention").attention
        except Exception as exc:  # noqa: BLE001
            raise Skip(f"dbkernels attention unavailable: {type(exc).__name__}: {exc}") from exc

        def fn(q, k, v):
            with dbk.force_backend(backend):
                return attention(q, k, v)
        return fn

    return Provider(f"dbkernels-{backend}", make)


def _sdpa_provider(name: str, backend_attr: str) -> Provider:
    def context():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, backend_attr)])

    def make():
        from torch.nn.attention import SDPBackend

        if not hasattr(SDPBackend, backend_attr):
            raise Skip(f"this torch has no SDPBackend.{backend_attr}")
        return torch.nn.functional.scaled_dot_product_attention

    return Provider(name, make, context)


def _flash_attn_make():
    try:
        from flash_attn import flash_attn_func
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"flash-attn not installed ({type(exc).__name__})") from exc

    def fn(q, k, v):  # our views' transposes are the contiguous (B, L, H, D) tensors
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return fn


def _xformers_make():
    try:
        import xformers.ops as xops
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"xformers not installed ({type(exc).__name__})") from exc

    def fn(q, k, v):
        return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2)).transpose(1, 2)
    return fn


def make_providers() -> dict[str, Provider]:
    return {
        "dbkernels-triton": _dbkernels_provider("triton"),
        "dbkernels-reference": _dbkernels_provider("reference"),
        "sdpa-flash": _sdpa_provider("sdpa-flash", "FLASH_ATTENTION"),
        "sdpa-efficient": _sdpa_provider("sdpa-efficient", "EFFICIENT_ATTENTION"),
        "sdpa-cudnn": _sdpa_provider("sdpa-cudnn", "CUDNN_ATTENTION"),
        "sdpa-math": _sdpa_provider("sdpa-math", "MATH"),
        "flash-attn": Provider("flash-attn", _flash_attn_make),
        "xformers": Provider("xformers", _xformers_make),
    }


def is_baseline(provider: str) -> bool:
    return not provider.startswith("dbkernels")


# ---------------------------------------------------------------------------------
# Inputs, truth, measurement
# ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Inputs:
    q: torch.Tensor  # (B, L, H, D) leaves; the providers get .transpose(1, 2) views
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor  # (B, H, Lq, D)

    def views(self):
        return self.q.transpose(1, 2), self.k.transpose(1, 2), self.v.transpose(1, 2)

    @property
    def leaves(self):
        return [self.q, self.k, self.v]


def make_inputs(shape: AttnShape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, h, lq, lk, d = shape.dims

    def rn(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    return Inputs(rn(b, lq, h, d).requires_grad_(True), rn(b, lk, h, d).requires_grad_(True),
                  rn(b, lk, h, d).requires_grad_(True), rn(b, h, lq, d))


@dataclasses.dataclass
class Truth:
    out: torch.Tensor
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # dq, dk, dv as (B, H, L, D)


def reference_truth(inp: Inputs) -> Truth:
    from dbkernels.ops.attention import reference as R

    q, k, v = (x.detach().float() for x in inp.views())
    out, lse = R.attention_fwd(q, k, v)
    grads = R.attention_bwd(inp.dout.float(), q, k, v, out, lse)
    return Truth(out, grads)


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    denom = ref.abs().max().item()
    return (x.float() - ref).abs().max().item() / (denom if denom > 0 else 1.0)


@dataclasses.dataclass
class Measurement:
    provider: str
    model: str
    shape: AttnShape
    count: int
    dtype: torch.dtype
    mode: str
    ms: tuple[float, float, float]
    peak_bytes: int | None
    launches: int | None
    check: dict[str, float]


def _step(fn, inp: Inputs, mode: str):
    if mode == "full":
        def step():
            out = fn(*inp.views())
            out.backward(inp.dout)
            return out
        return step, inp.leaves

    def step_fwd():
        with torch.no_grad():
            return fn(*inp.views())
    return step_fwd, None


def _is_rejection(exc: BaseException) -> bool:
    """SDPA backends (and friends) say they do not take a shape/dtype with a RuntimeError."""
    msg = str(exc).lower()
    return isinstance(exc, (RuntimeError, NotImplementedError, ValueError)) and any(
        s in msg for s in ("no available kernel", "no viable backend", "not supported", "unsupported", "only supports",
                           "expected", "must be", "requires"))


def check_provider(fn, inp: Inputs, truth: Truth, mode: str) -> dict[str, float]:
    for t in inp.leaves:
        t.grad = None
    step, _ = _step(fn, inp, mode)
    out = step()
    errs = {"out_rel_err": _rel_err(out.detach(), truth.out)}
    if mode == "full":
        for name, leaf, ref in zip(("dq", "dk", "dv"), inp.leaves, truth.grads):
            if leaf.grad is None:
                raise AssertionError(f"{name} is None after backward()")
            errs[f"{name}_rel_err"] = _rel_err(leaf.grad.transpose(1, 2), ref)
    for t in inp.leaves:
        t.grad = None
    tol = TOLERANCES.get(inp.q.dtype, 4e-2)
    bad = [f"{k}={v:.3g} > {tol:g}" for k, v in errs.items() if not v <= tol]
    if bad:
        raise AssertionError("; ".join(bad))
    return errs


def measure(provider: str, fn, model: str, shape: AttnShape, count: int, inp: Inputs, truth: Truth, mode: str,
            device: torch.device, budget: common.TimingBudget) -> Measurement:
    check = check_provider(fn, inp, truth, mode)
    step, grads = _step(fn, inp, mode)
    ms = common.time_ms(step, device, budget, grad_to_none=grads)
    peak = common.peak_bytes(step, device, grad_to_none=grads)
    launches = common.count_launches(step, device, grad_to_none=grads)
    for t in inp.leaves:
        t.grad = None
    return Measurement(provider, model, shape, count, inp.q.dtype, mode, ms, peak, launches, check)
