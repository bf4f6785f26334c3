"""Helpers shared by the AdamW8bit tests (tests/test_adamw8bit*.py): the hyperparameters,
parameter and gradient sets (one tensor misaligned by a storage offset), running the
optimizer under a forced backend, comparing two optimizers' states, and a small training
loop.
"""
from __future__ import annotations

import torch

import dbkernels
from dbkernels.optim import AdamW8bit

HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def make_params(dtype, sizes=(3000, 5037, 100, 2048), seed=0, misaligned_last=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        if misaligned_last and i == len(sizes) - 1:
            out.append(torch.randn(n + 1, generator=g).to(dtype)[1:])  # storage offset 1: no vector path
        else:
            out.append(torch.randn(n, generator=g).to(dtype))
    return out


def make_grads(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g).to(p.dtype) for p in params] for _ in range(steps)]


def run_backend(backend, base, grads, device="cpu", **kw):
    params = [torch.nn.Parameter(b.detach().clone().to(device)) for b in base]
    opt = AdamW8bit(params, **{**HP, "min_8bit_size": 1000, **kw})
    with dbkernels.force_backend(backend):
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = None if g is None else g.to(device)
            opt.step()
    return params, opt


def assert_same_states(opt_a, params_a, opt_b, params_b, max_code_flips=0):
    for pa, pb in zip(params_a, params_b):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for k, va in sa.items():
            vb = sb[k]
            if not isinstance(va, torch.Tensor):
                assert va == vb, k
                continue
            va, vb = va.cpu(), vb.cpu()
            if va.dtype == torch.uint8 and max_code_flips:
                assert int((va != vb).sum()) <= max_code_flips, (k, int((va != vb).sum()))
            elif max_code_flips:
                torch.testing.assert_close(va, vb, rtol=1e-3, atol=1e-6)
            else:
                assert torch.equal(va, vb), (k, (va.float() - vb.float()).abs().max())


def _train(params, opt, grads_fn, steps):
    for t in range(steps):
        for p, g in zip(params, grads_fn(t)):
            p.grad = g
        opt.step()
