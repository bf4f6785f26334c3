"""AdamW8bit: quantization maps, the Optimizer contract, stochastic rounding,
step_in_backward and the benchmark suite's CPU smoke run.

The backends against the reference are in test_adamw8bit_backends.py (Triton under the
interpreter, the vectorised CPU step, the GPU) and test_adamw8bit_cuda_emu.py (the CUDA
kernel compiled for the host against a CUDA emulation); convergence parity with
torch.optim.AdamW is in test_adamw8bit_convergence.py.
"""
from __future__ import annotations

import io

import pytest
import torch

from adamw8bit_helpers import HP, _train, assert_same_states, make_grads, make_params, run_backend
from dbkernels.optim import AdamW8bit, quant, step_in_backward
from dbkernels.optim import reference as R


# ----------------------------------------------------------------------------- maps

def test_maps_are_sorted_exact_and_closed_form_is_nearest():
    um, sm = quant.unsigned_map(), quant.signed_map()
    used_u = um[: quant.UNSIGNED_MAX_CODE + 1]
    assert used_u[0] == 0 and used_u[-1] == 1.0 and bool((used_u[1:] > used_u[:-1]).all())
    mags = sm[: quant.SIGNED_MAX_MAG + 1]
    assert mags[-1] == 1.0 and bool((mags[1:] > mags[:-1]).all())
    assert torch.equal(sm[128:128 + quant.SIGNED_MAX_MAG + 1], -mags)
    assert um[1].item() == 2.0 ** -18 and mags[1].item() == 2.0 ** -10
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(20000, generator=g) ** p for p in (1, 4, 16)] +
                  [used_u, (used_u[1:] + used_u[:-1]) / 2, torch.tensor([0.0, 1.0])])
    x = x[(x == 0) | (x >= 2.0 ** -19)]  # below half the smallest code: the v guard (next lines)
    tiny = torch.tensor([2.0 ** -40, 2.0 ** -20, 1e-30])
    assert quant.quantize_unsigned_codes(tiny).tolist() == [1, 1, 1]  # positive v never becomes 0
    for table, enc, emax in ((used_u, quant.quantize_unsigned_codes, quant.UNSIGNED_MAX_CODE),
                             (mags, quant.quantize_signed_codes, quant.SIGNED_MAX_MAG)):
        c = enc(x).long()
        assert int(c.max()) <= emax
        err = (table[c] - x).abs()
        best = (table[None, :] - x[:, None]).abs().min(dim=1).values
        assert torch.equal(err, best), "closed-form code is not a nearest code"
    neg = quant.quantize_signed_codes(-x).long()
    assert torch.equal(sm[neg], -mags[quant.quantize_signed_codes(x).long()])


@pytest.mark.parametrize("block_size", [64, 256, 2048])
@pytest.mark.parametrize("numel", [1, 255, 5037])
def test_quantize_dequantize_roundtrip_error_bounds(block_size, numel):
    g = torch.Generator().manual_seed(numel)
    m = torch.randn(numel, generator=g) * torch.exp(2 * torch.randn(numel, generator=g))
    v = m * m
    for x, signed in ((m, True), (v, False)):
        codes, absmax = quant.quantize_blockwise(x, block_size, signed=signed)
        assert codes.dtype == torch.uint8 and codes.shape == (numel,)
        assert absmax.shape == (quant.num_blocks(numel, block_size),) and absmax.dtype == torch.float32
        y = quant.dequantize_blockwise(codes, absmax, block_size, signed=signed)
        a = absmax[torch.arange(numel) // block_size]
        emin = quant.SIGNED_EMIN if signed else quant.UNSIGNED_EMIN
        mb = quant.MBITS
        normal = x.abs() >= a * 2.0 ** emin
        rel = ((y - x).abs() / x.abs())[normal]
        assert rel.numel() == 0 or rel.max().item() <= 2.0 ** -(mb + 1) + 1e-7   # half a mantissa step
        sub = ~normal
        tiny = (y - x).abs()[sub] / a[sub]
        # half a subnormal step; unsigned: up to one step (positive values never round to 0)
        bound = 2.0 ** (emin - mb - (1 if signed else 0))
        assert tiny.numel() == 0 or tiny.max().item() <= bound * (1 + 1e-6)
        assert bool((torch.sign(y) == torch.sign(x))[y != 0].all())
        amax_pos = (x.abs() == a)  # the absmax element is exact
        assert torch.equal(y[amax_pos].abs(), x[amax_pos].abs())
    zero_codes, zero_absmax = quant.quantize_blockwise(torch.zeros(300), 256, signed=True)
    assert int(zero_codes.max()) == 0 and float(zero_absmax.max()) == 0.0


def test_state_bytes_per_parameter():
    # SD-like mix: big matrices and a few small vectors (fp32 state below min_8bit_size);
    # SD1.5's UNet: 0.04% of its parameters are in tensors below 4096 elements.
    shapes = [(640, 640)] * 6 + [(320, 320, 3, 3)] * 2 + [(1280,)] * 5 + [(320,)] * 5
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = AdamW8bit(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    per_param = opt.state_bytes() / sum(p.numel() for p in params)
    assert per_param <= 2.05, per_param
    big = opt.state[params[0]]
    assert big["state1"].dtype == torch.uint8 and big["absmax1"].dtype == torch.float32
    assert "exp_avg" in opt.state[params[-1]] and opt.state[params[-1]]["exp_avg"].dtype == torch.float32


# ----------------------------------------------------------------------------- optimizer contract

def test_fp32_state_path_matches_torch_adamw():
    base = make_params(torch.float32, sizes=(500, 700), misaligned_last=False)
    grads = make_grads(base, 10)
    ours, _ = run_backend("reference", base, grads)  # both below min_8bit_size: fp32 state
    ref = [torch.nn.Parameter(b.clone()) for b in base]
    opt = torch.optim.AdamW(ref, **HP)
    for gs in grads:
        for p, g in zip(ref, gs):
            p.grad = g.clone()
        opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_8bit_step_close_to_torch_adamw():
    base = make_params(torch.float32, sizes=(20000,), misaligned_last=False)
    grads = make_grads(base, 20)
    (ours,), _ = run_backend("reference", base, grads, lr=1e-3)
    ref = torch.nn.Parameter(base[0].clone())
    opt = torch.optim.AdamW([ref], **{**HP, "lr": 1e-3})
    for gs in grads:
        ref.grad = gs[0].clone()
        opt.step()
    moved = (ref - base[0]).abs().mean()
    assert (ours - ref).abs().mean() < 0.05 * moved


def test_param_groups_schedulers_skipped_params_zero_grad():
    a = torch.nn.Parameter(torch.randn(5000))
    b = torch.nn.Parameter(torch.randn(50))
    c = torch.nn.Parameter(torch.randn(50))  # never gets a gradient
    opt = AdamW8bit([{"params": [a]}, {"params": [b, c], "lr": 0.0, "weight_decay": 0.0}], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    b0, c0 = b.detach().clone(), c.detach().clone()
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    a0 = a.detach().clone()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5e-2
    assert torch.equal(b, b0) and torch.equal(c, c0) and c not in opt.state
    # first Adam step moves every element by ~lr (plus decay)
    torch.testing.assert_close((a0 * (1 - 1e-2 * 1e-2) - a).mean().item(), 1e-2, rtol=1e-3, atol=0)
    opt.zero_grad()
    assert a.grad is None and b.grad is None
    opt.step()  # no grads: nothing happens
    assert opt.state[a]["step"] == 1


def test_bad_inputs():
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match="lr must be >= 0"):
        AdamW8bit([p], lr=-1.0)
    for bs in (100, 0, 16, 8192, 256.0):
        with pytest.raises(ValueError, match="block_size must be a power of two"):
            AdamW8bit([p], block_size=bs)
    with pytest.raises(ValueError, match="betas"):
        AdamW8bit([p], betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="complex"):
        AdamW8bit([torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        AdamW8bit([torch.nn.Parameter(torch.randn(4, dtype=torch.float64))])
    with pytest.raises(ValueError, match="block_size"):
        AdamW8bit([p]).add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "block_size": 3})
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = AdamW8bit(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_non_contiguous_param():
    base = torch.randn(80, 60)
    p = torch.nn.Parameter(base.t())  # non-contiguous view
    q = torch.nn.Parameter(base.t().contiguous())
    g = torch.randn(60, 80)
    for x in (p, q):
        x.grad = g.clone()
        AdamW8bit([x], min_8bit_size=100).step()
    assert torch.equal(p, q)


def test_state_dict_roundtrip_resumes_bitwise():
    dtype = torch.bfloat16
    base = make_params(dtype, sizes=(5000, 300, 2049), misaligned_last=False)
    grads = make_grads(base, 10)
    params = [torch.nn.Parameter(b.clone()) for b in base]
    opt = AdamW8bit(params, **HP, min_8bit_size=1000)
    _train(params, opt, lambda t: grads[t], 5)
    saved_params = [p.detach().clone() for p in params]
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    _train(params, opt, lambda t: grads[5 + t], 5)

    params2 = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = AdamW8bit(params2, lr=123.0, min_8bit_size=1000)  # hyperparameters come from the state dict
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.param_groups[0]["lr"] == HP["lr"]
    assert opt2.state[params2[0]]["absmax1"].dtype == torch.float32  # not cast to bf16
    _train(params2, opt2, lambda t: grads[5 + t], 5)
    for a, b in zip(params, params2):
        assert torch.equal(a, b)
    assert_same_states(opt, params, opt2, params2)
    with pytest.raises(ValueError, match="parameters"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3))]).load_state_dict(opt.state_dict())


# ----------------------------------------------------------------------------- stochastic rounding

def test_stochastic_rounding_is_unbiased_and_deterministic():
    # values strictly between bf16 neighbours, rounded with many keys
    g = torch.Generator().manual_seed(0)
    x = (1.0 + torch.rand(512, generator=g) * 2.0 ** -7).float()  # in [1, 1 + 1 ulp)
    x = torch.cat([x, -x, x * 1e-20])
    n_keys = 400
    acc = torch.zeros_like(x, dtype=torch.float64)
    for k in range(n_keys):
        y = R.stochastic_round_bf16(x, R.sr_key(12345, k + 1))
        assert bool(((y.float() - x).abs() <= x.abs() * 2.0 ** -7).all())
        acc += y.double()
    mean = acc / n_keys
    ulp = x.abs().double() * 2.0 ** -7
    # std of one rounding <= ulp / 2: the mean of n is within 5 sigma
    assert bool(((mean - x.double()).abs() <= 5 * 0.5 * ulp / n_keys ** 0.5).all())
    bias = ((mean - x.double()) / ulp).mean().item()
    assert abs(bias) < 0.01
    a = R.stochastic_round_bf16(x, 7)
    assert torch.equal(a, R.stochastic_round_bf16(x, 7))
    assert not torch.equal(a, R.stochastic_round_bf16(x, 8))
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    out = R.stochastic_round_bf16(special, 3)
    assert out[0] == float("inf") and out[1] == float("-inf") and out[2].isnan() and out[3] == 0


def test_pure_bf16_training_small_updates_need_sr():
    # lr * update << bf16 ulp at 1.0: round-to-nearest never moves, SR moves by the right mean
    base = [torch.ones(8192, dtype=torch.bfloat16)]
    steps = 50
    grads = [[torch.ones(8192, dtype=torch.bfloat16)] for _ in range(steps)]
    kw = dict(lr=1e-4, weight_decay=0.0)
    (rn,), _ = run_backend("reference", base, grads, stochastic_rounding=False, **kw)
    (sr,), _ = run_backend("reference", base, grads, stochastic_rounding=True, **kw)
    assert torch.equal(rn, base[0])
    # Adam with a constant gradient moves by lr per step
    torch.testing.assert_close(sr.float().mean().item(), 1.0 - steps * 1e-4, rtol=0, atol=steps * 1e-4 * 0.05)


# ----------------------------------------------------------------------------- step_in_backward

def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 96), torch.nn.GELU(), torch.nn.Linear(96, 64),
                               torch.nn.GELU(), torch.nn.Linear(64, 4)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_in_backward_matches_ordinary_step(dtype):
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(32, 16, generator=g).to(dtype), torch.randn(32, 4, generator=g).to(dtype)) for _ in range(5)]
    m1, m2 = _mlp(dtype=dtype), _mlp(dtype=dtype)
    o1 = AdamW8bit(m1.parameters(), lr=1e-2, min_8bit_size=1000)
    o2 = AdamW8bit(m2.parameters(), lr=1e-2, min_8bit_size=1000)
    for x, y in data:
        torch.nn.functional.mse_loss(m1(x), y).backward()
        o1.step()
        o1.zero_grad()
    handle = step_in_backward(m2, o2)
    for x, y in data:
        torch.nn.functional.mse_loss(m2(x), y).backward()
        assert all(p.grad is None for p in m2.parameters())
    with pytest.raises(RuntimeError, match="step_in_backward is active"):
        o2.step()
    handle.remove()
    assert not handle.active
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert_same_states(o1, list(m1.parameters()), o2, list(m2.parameters()))
    o2.step()  # ordinary steps work again (no grads: no-op)


def test_step_in_backward_misuse_and_per_tensor_clipping():
    m = _mlp()
    opt = AdamW8bit(m.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="gradient accumulation"):
        step_in_backward(m, opt, gradient_accumulation_steps=4)
    with pytest.raises(TypeError, match="AdamW8bit"):
        step_in_backward(m, torch.optim.AdamW(m.parameters()))
    m(torch.randn(2, 16)).sum().backward()
    with pytest.raises(RuntimeError, match="already hold a gradient"):
        step_in_backward(m, opt)
    opt.zero_grad()
    with step_in_backward(m, opt, max_grad_norm_per_tensor=1e-3) as h:
        with pytest.raises(RuntimeError, match="already active"):
            step_in_backward(m, opt)
        (1e6 * m(torch.randn(8, 16)).sum()).backward()
    assert not h.active and opt._sib_handle is None
    assert all(opt.state[p]["step"] == 1 for p in m.parameters())


# ----------------------------------------------------------------------------- benchmark suite

def test_sd15_state_bytes_per_parameter_from_shapes():
    pytest.importorskip("diffusers")
    import math

    from bench import optim as B

    shapes = B.sd15_shapes()
    numel = [math.prod(s) for s in shapes]
    assert len(shapes) == 686 and 859_000_000 < sum(numel) < 860_000_000
    state = sum(2 * n + 8 * quant.num_blocks(n, 256) if n >= 4096 else 8 * n for n in numel)
    assert state / sum(numel) <= 2.05


def test_bench_suite_cpu_smoke(tmp_path):
    import argparse

    from bench import common
    from bench import optim as B

    opts = argparse.Namespace(device=torch.device("cpu"), dtypes=[torch.float32], providers=["dbkernels-reference"],
                              quick=True, memory="off")
    writer = common.ResultWriter(tmp_path)
    assert B.run(opts, writer) == 0
    (row,) = writer.written
    assert row["op"] == "adamw8bit" and row["mode"] == "step" and row["extras"]["check"] == "ok"
    assert row["extras"]["state_bytes_per_param"] < 2.1
