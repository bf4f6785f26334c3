"""Pure-PyTorch reference for fused attention. This file is the spec.

For one (batch b, head h), with s = scale (default 1/sqrt(D)) and bias = key_bias[b, (h,) :]:

    S[i, j]  = s * <q_i, k_j> + bias[j]                      (natural-log domain)
    lse[i]   = log sum_j exp(S[i, j])                         (saved, fp32, shape (B, H, Lq))
    P[i, j]  = exp(S[i, j] - lse[i])
    out[i]   = sum_j P[i, j] v_j                              (returned in q's dtype)

Backward (FlashAttention-2 formulas; P recomputed from q, k and lse):

    delta[i] = <dout_i, out_i>
    dV       = P^T dout
    dS       = P * (dout V^T - delta[:, None])
    dQ       = s * dS K,    dK = s * dS^T Q

key_bias gets no gradient. Everything is computed in fp32 whatever the input dtype;
the queries are processed in chunks so no full Lq x Lk matrix is held at once.
"""
from __future__ import annotations

import math

import torch

# Rows of Lq per chunk are chosen so one chunk's score matrix stays under this many elements.
_CHUNK_ELEMENTS = 1 << 24


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def _chunks(lq: int, lk: int, bh: int):
    rows = max(1, _CHUNK_ELEMENTS // max(1, lk * bh))
    for start in range(0, lq, rows):
        yield start, min(lq, start + rows)


def _bias(key_bias, b, h, lk, device):
    """key_bias as fp32 (B, H, 1, Lk) or None."""
    if key_bias is None:
        return None
    kb = key_bias.float()
    if kb.dim() == 2:
        kb = kb[:, None, :]
    return kb.expand(b, h, lk).reshape(b, h, 1, lk).to(device)


def _scores(qc, k32, scale, bias):
    s = torch.matmul(qc, k32.transpose(-1, -2)) * scale
    return s if bias is None else s + bias


def attention_fwd(q, k, v, key_bias=None, scale=None):
    """(out in q's dtype with q's layout, lse fp32 (B, H, Lq))."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = default_scale(d) if scale is None else scale
    k32, v32 = k.float(), v.float()
    bias = _bias(key_bias, b, h, lk, q.device)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, lq, device=q.device, dtype=torch.float32)
    for i0, i1 in _chunks(lq, lk, b * h):
        s = _scores(q[:, :, i0:i1].float(), k32, scale, bias)
        m = torch.logsumexp(s, dim=-1)
        out[:, :, i0:i1] = torch.matmul(torch.exp(s - m[..., None]), v32).to(q.dtype)
        lse[:, :, i0:i1] = m
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, key_bias=None, scale=None):
    """(dq, dk, dv) in the dtypes of q, k, v."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = default_scale(d) if scale is None else scale
    k32, v32 = k.float(), v.float()
    bias = _bias(key_bias, b, h, lk, q.device)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    for i0, i1 in _chunks(lq, lk, b * h):
        qc = q[:, :, i0:i1].float()
        doc = dout[:, :, i0:i1].float()
        p = torch.exp(_scores(qc, k32, scale, bias) - lse[:, :, i0:i1, None])
        delta = (doc * out[:, :, i0:i1].float()).sum(-1, keepdim=True)
        dv += torch.matmul(p.transpose(-1, -2), doc)
        ds = p * (torch.matmul(doc, v32.transpose(-1, -2)) - delta)
        dq[:, :, i0:i1] = (torch.matmul(ds, k32) * scale).to(q.dtype)
        dk += torch.matmul(ds.transpose(-1, -2), qc) * scale
    # Outputs take the layout of their inputs (like torch.empty_like), as the kernels' do.
    return dq, torch.empty_like(k).copy_(dk), torch.empty_like(v).copy_(dv)


def math_attention(q, k, v, key_bias=None, scale=None):
    """Textbook attention (softmax of the full score matrix) in q's dtype; autograd-friendly.

    The test yardstick: in fp32 it is the truth, in fp16/bf16 it is "PyTorch's own
    same-precision computation" of the 2x rule.
    """
    b, h, lq, d = q.shape
    scale = default_scale(d) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_bias is not None:
        s = s + _bias(key_bias, b, h, k.shape[2], q.device).to(s.dtype)
    return torch.matmul(torch.softmax(s, dim=-1), v)
