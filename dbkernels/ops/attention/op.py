"""Fused attention: checks, torch.library ops, autograd, public API.

Layers (FlashAttention style): backend functions (triton_kernels / reference) ->
torch.library custom ops `dbkernels::attention_fwd` (returns out and the fp32
log-sum-exp) and `dbkernels::attention_bwd` (returns dq, dk, dv), opaque to
torch.compile with fake implementations -> `_Attention` (autograd.Function) ->
the documented function `attention`.

Coverage: head dims D <= 256 with D % 8 == 0 (every SD / SDXL UNet head dim),
fp32 / fp16 / bf16, any Lq, Lk >= 1, any strides. Inputs outside that coverage get
a ValueError / TypeError from `attention`; callers that prefer to keep running use
`attention_or_sdpa` (or test `is_supported` themselves), which sends uncovered
shapes to torch.nn.functional.scaled_dot_product_attention with the key bias as an
additive mask. dbkernels.diffusers.FusedAttnProcessor does exactly that.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ... import _backend, _checks
from . import reference

# No CUDA implementation yet; reorder if one is added and measured faster.
_backend.register_op("attention", ("triton", "reference"))

MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8
DTYPES = _checks.FLOAT_DTYPES


class _ReferenceBackend:
    attention_fwd = staticmethod(reference.attention_fwd)
    attention_bwd = staticmethod(reference.attention_bwd)


def _impl(device: torch.device):
    name = _backend.choose("attention", device.type)
    if name == "reference":
        return _ReferenceBackend
    return _backend.import_triton_kernels("dbkernels.ops.attention.triton_kernels")


# ---------------------------------------------------------------- torch.library ops

@torch.library.custom_op("dbkernels::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: Optional[torch.Tensor],
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(q.device).attention_fwd(q, k, v, key_bias, scale)


@_attention_fwd_op.register_fake
def _(q, k, v, key_bias, scale):
    b, h, lq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, lq), dtype=torch.float32)


@torch.library.custom_op("dbkernels::attention_bwd", mutates_args=())
def _attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, key_bias: Optional[torch.Tensor],
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _impl(q.device).attention_bwd(dout, q, k, v, out, lse, key_bias, scale)


@_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, key_bias, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_bias, scale):
        out, lse = _attention_fwd_op(q, k, v, key_bias, scale)
        ctx.save_for_backward(q, k, v, out, lse, key_bias)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, key_bias = ctx.saved_tensors
        dq, dk, dv = _attention_bwd_op(dout, q, k, v, out, lse, key_bias, ctx.scale)
        return dq, dk, dv, None, None


# ---------------------------------------------------------------- argument checks

def _check_shapes(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, x, ndim=4, dtypes=DTYPES)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must have one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    _checks.same_device({"q": q, "k": k, "v": v})
    b, h, lq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, H, Lk, D), got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"k must have shape (B, H, Lk, D) = ({b}, {h}, Lk, {d}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"q and k must not be empty, got q {tuple(q.shape)}, k {tuple(k.shape)}")


def _head_dim_problem(d: int) -> str | None:
    if d > MAX_HEAD_DIM or d % HEAD_DIM_MULTIPLE:
        return (f"head dim D={d} is not supported: dbkernels.attention needs D <= {MAX_HEAD_DIM} and "
                f"D % {HEAD_DIM_MULTIPLE} == 0; use dbkernels.ops.attention.attention_or_sdpa to fall back "
                f"to torch.nn.functional.scaled_dot_product_attention for such shapes")
    return None


def _prepare_bias(key_bias, q, k):
    """key_bias (B, Lk) or (B, H, Lk) (size-1 batch/head dims broadcast) -> fp32 contiguous (B, H, Lk)."""
    if key_bias is None:
        return None
    b, h, _, _ = q.shape
    lk = k.shape[2]
    _checks.tensor("key_bias", key_bias, kind="floating")
    if key_bias.device != q.device:
        raise ValueError(f"key_bias is on {key_bias.device} but q is on {q.device}; move all inputs to one device")
    kb = key_bias
    if kb.dim() == 2:
        kb = kb[:, None, :]
    ok = (kb.dim() == 3 and kb.shape[0] in (1, b) and kb.shape[1] in (1, h) and kb.shape[2] == lk)
    if not ok:
        raise ValueError(f"key_bias must have shape (B, Lk) = ({b}, {lk}) or (B, H, Lk) = ({b}, {h}, {lk}), "
                         f"got {tuple(key_bias.shape)}")
    return kb.detach().to(torch.float32).expand(b, h, lk).contiguous()


def _resolve_scale(scale, d):
    if scale is None:
        return reference.default_scale(d)
    scale = float(scale)
    if not (scale == scale and abs(scale) != float("inf")):
        raise ValueError(f"scale must be a finite number or None (1/sqrt(D)), got {scale}")
    return scale


def is_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True if `attention` covers these inputs (it raises otherwise)."""
    try:
        _check_shapes(q, k, v)
    except (TypeError, ValueError):
        return False
    return _head_dim_problem(q.shape[-1]) is None


# ---------------------------------------------------------------- public API

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
              key_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused softmax attention, FlashAttention-2 style; differentiable in q, k and v.

    Same layout and meaning as torch.nn.functional.scaled_dot_product_attention
    without masks or dropout: q (B, H, Lq, D), k and v (B, H, Lk, D), any strides (a
    transposed (B, L, H, D) view works without a copy); returns (B, H, Lq, D) in q's
    dtype (with q's memory layout when q is dense). scale defaults to 1/sqrt(D).

    key_bias (B, Lk) or (B, H, Lk) is added to every score of that key before the
    softmax: softmax(scale * q k^T + key_bias[..., None, :]). FABRIC weights reference
    keys with it (bias = log w). It gets no gradient.

    Covered: D <= 256 with D % 8 == 0, fp32 / fp16 / bf16 (one dtype for q, k, v),
    any Lq and Lk. Other head dims raise ValueError; use `attention_or_sdpa` for the
    documented SDPA fallback. The backend follows dbkernels.force_backend /
    DBKERNELS_BACKEND (triton | reference); the reference is the CPU default.
    Softmax in fp32 with the log-sum-exp saved; backward recomputes the
    probabilities and never holds an Lq x Lk matrix (Triton backend).
    """
    _check_shapes(q, k, v)
    why = _head_dim_problem(q.shape[-1])
    if why:
        raise ValueError(why)
    bias = _prepare_bias(key_bias, q, k)
    return _Attention.apply(q, k, v, bias, _resolve_scale(scale, q.shape[-1]))


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                   key_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same function computed by torch.nn.functional.scaled_dot_product_attention (the fallback)."""
    mask = None
    if key_bias is not None:
        kb = key_bias if key_bias.dim() == 3 else key_bias[:, None, :]
        mask = kb.detach()[:, :, None, :].to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def attention_or_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                      key_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`attention` where it covers the inputs, else scaled_dot_product_attention (same result).

    The fallback is taken for head dims outside D <= 256, D % 8 == 0 (and other shapes
    `attention` rejects, e.g. v with another head dim than q); SDPA raises its own
    errors for inputs that are wrong for it too.
    """
    if is_supported(q, k, v):
        return attention(q, k, v, scale=scale, key_bias=key_bias)
    return sdpa_attention(q, k, v, scale=scale, key_bias=key_bias)
