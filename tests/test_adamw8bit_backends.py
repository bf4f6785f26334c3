"""AdamW8bit: the backends against the reference (the spec).

CPU: the Triton kernel under the interpreter (bit-exact: same fp32 operations) and the
vectorised multi-tensor CPU step (dbkernels/optim/multi_tensor.py) against the
per-tensor reference, bit for bit. GPU (marker gpu): the CUDA extension and compiled
Triton against the reference, allowing a few code flips per tensor (bitsandbytes style),
state dicts across devices, and the peak-memory drop of step_in_backward.
"""
from __future__ import annotations

import copy

import pytest
import torch

from adamw8bit_helpers import HP, _train, assert_same_states, make_grads, make_params, run_backend
from dbkernels.optim import AdamW8bit, step_in_backward
from dbkernels.optim import reference as R


# ----------------------------------------------------------------------------- backends on CPU

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_reference_bitwise(cpu_triton, dtype):
    base = make_params(dtype)
    grads = make_grads(base, 3)
    pr, orf = run_backend("reference", base, grads)
    pt, otr = run_backend("triton", base, grads)
    for a, b in zip(pr, pt):
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()
    assert_same_states(orf, pr, otr, pt)


def test_triton_block_sizes_and_no_sr(cpu_triton):
    base = make_params(torch.bfloat16, sizes=(4096 + 7, 300))
    grads = make_grads(base, 2)
    for bs in (32, 1024):
        pr, orf = run_backend("reference", base, grads, block_size=bs, stochastic_rounding=False)
        pt, otr = run_backend("triton", base, grads, block_size=bs, stochastic_rounding=False)
        assert all(torch.equal(a, b) for a, b in zip(pr, pt))
        assert_same_states(orf, pr, otr, pt)


# --- the vectorised CPU step (multi_tensor.py) against the per-tensor reference ----------

def run_per_tensor_reference(base, grads, **kw):
    """The spec as it is written: reference.update_ on one tensor at a time (the path of
    step_in_backward), with the optimizer's state initialisation."""
    from dbkernels.optim import adamw8bit as A

    params = [torch.nn.Parameter(b.detach().clone()) for b in base]
    opt = AdamW8bit(params, **{**HP, "min_8bit_size": 1000, **kw})
    group = opt.param_groups[0]
    for gs in grads:
        for i, (p, g) in enumerate(zip(params, gs)):
            if g is None:
                continue
            if not opt.state[p]:
                opt._init_state(p, group, i)
            st = opt.state[p]
            st["step"] += 1
            A._update_one(R, p.data, g, st, group, st["step"])
    return params, opt


def assert_bitwise(a, b):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x.detach().reshape(-1).view(torch.uint8), y.detach().reshape(-1).view(torch.uint8))
        sa, sb = oa.state[x], ob.state[y]
        assert sa.keys() == sb.keys()
        for k, v in sa.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v.view(torch.uint8), sb[k].view(torch.uint8)), k
            else:
                assert v == sb[k], k


def _mixed_case(dtype, steps=3, seed=0):
    """Small (fp32 state) and large (8-bit) tensors, sizes that are not multiples of any
    block size, tensors larger than a work chunk, zero blocks, values far below 2^EMIN of
    their block's absmax, large gradients (absmax > 2^8), a parameter without a gradient
    in one step."""
    g = torch.Generator().manual_seed(seed)
    sizes = [3000, 5037, 100, 2048, 30001, 1, 999, 8192 + 7, 4096, 257, 1000]
    base = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    grads = []
    for t in range(steps):
        gs = [(torch.randn(n, generator=g) * (1e-2, 1e4, 1.0)[t % 3]).to(dtype) for n in sizes]
        gs[2] = torch.zeros(sizes[2], dtype=dtype)
        gs[4][:5000] = 0                      # whole zero blocks
        gs[0][:10] = 1e-30                    # far below the block's absmax
        gs[1][::7] *= 1e-6
        if t == 1:
            gs[3] = None                      # no gradient this step
        grads.append(gs)
    return base, grads


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block_size", [32, 256, 4096])
@pytest.mark.parametrize("dtype,sr", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False),
                                      (torch.float16, True)])
def test_multi_tensor_cpu_step_matches_per_tensor_reference_bitwise(monkeypatch, dtype, sr, block_size, threads):
    from dbkernels.optim import multi_tensor as MT

    monkeypatch.setattr(MT, "CHUNK", 8192)    # several chunks, tensors cut across chunks
    calls = []
    monkeypatch.setattr(R, "update_", lambda *a, **k: calls.append(1))   # the vectorised path must not use it
    base, grads = _mixed_case(dtype)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = run_backend("reference", base, grads, block_size=block_size, stochastic_rounding=sr)
    finally:
        torch.set_num_threads(old_threads)
    assert not calls
    monkeypatch.undo()
    assert_bitwise(ours, run_per_tensor_reference(base, grads, block_size=block_size, stochastic_rounding=sr))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_tensor_non_finite_and_non_contiguous(monkeypatch, dtype, threads):
    from dbkernels.optim import multi_tensor as MT

    monkeypatch.setattr(MT, "CHUNK", 2048)
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(5000, generator=g), torch.randn(600, generator=g), torch.randn(80, 60, generator=g).t()]
    base = [b.to(dtype) for b in base]
    grads = [[torch.randn(b.shape, generator=g).to(dtype) for b in base] for _ in range(4)]
    grads[1][0][7] = float("nan")
    grads[2][0][4000] = float("inf")
    grads[1][1][3] = float("inf")
    grads[3][0][100:200] = 3e30               # v = g^2 overflows to inf (fp32)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = run_backend("reference", base, grads)
    finally:
        torch.set_num_threads(old_threads)
    assert not ours[0][2].is_contiguous()
    assert_bitwise(ours, run_per_tensor_reference(base, grads))


def test_multi_tensor_falls_back_when_subnormals_are_flushed():
    from dbkernels.optim import multi_tensor as MT

    assert MT.subnormals_work()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert not MT.subnormals_work()
        base, grads = _mixed_case(torch.float32, steps=2)
        ours = run_backend("reference", base, grads)
        ref = run_per_tensor_reference(base, grads)
    finally:
        torch.set_flush_denormal(False)
    assert_bitwise(ours, ref)


def test_sqrt_rn_is_correctly_rounded():
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.rand(200000, generator=g) * torch.exp(torch.randn(200000, generator=g) * 20),
                   torch.tensor([0.0, 1e-45, 1e-40, 2.0 ** -126, 1.0, 2.0, 3.4e38, float("inf")])]).float()
    assert torch.equal(R.sqrt_rn(v), torch.sqrt(v.double()).float())


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


def _gpu_compare(backend, dtype, block_size=256):
    base = make_params(dtype, sizes=(3000, 5037, 100, 2048, 1 << 20))
    grads = make_grads(base, 3)
    pr, orf = run_backend("reference", base, grads, block_size=block_size)
    pg, og = run_backend(backend, base, grads, device="cuda", block_size=block_size)
    # a few code flips per tensor (division / sqrt on the device may round differently)
    assert_same_states(orf, pr, og, pg, max_code_flips=max(4, base[-1].numel() // 20000))
    for a, b in zip(pr, pg):
        tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
        torch.testing.assert_close(b.cpu().float(), a.float(), rtol=tol, atol=tol * 1e-2)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backend_matches_reference(backend, dtype):
    _gpu_compare(backend, dtype)


@gpu
@pytest.mark.parametrize("block_size", [128, 512, 1024])
def test_gpu_cuda_block_sizes(block_size):
    _gpu_compare("cuda", torch.bfloat16, block_size)


@gpu
def test_gpu_state_dict_across_devices():
    base = make_params(torch.bfloat16, sizes=(5000, 300), misaligned_last=False)
    grads = make_grads(base, 6)
    params = [torch.nn.Parameter(b.cuda()) for b in base]
    opt = AdamW8bit(params, min_8bit_size=1000)
    _train(params, opt, lambda t: [g.cuda() for g in grads[t]], 3)
    sd = copy.deepcopy(opt.state_dict())
    cpu_params = [torch.nn.Parameter(p.detach().cpu()) for p in params]
    cpu_opt = AdamW8bit(cpu_params, min_8bit_size=1000)
    cpu_opt.load_state_dict(sd)
    assert cpu_opt.state[cpu_params[0]]["state1"].device.type == "cpu"
    _train(cpu_params, cpu_opt, lambda t: grads[3 + t], 3)
    _train(params, opt, lambda t: [g.cuda() for g in grads[3 + t]], 3)
    for a, b in zip(cpu_params, params):
        torch.testing.assert_close(b.cpu().float(), a.float(), rtol=2 ** -7, atol=1e-3)


@gpu
def test_gpu_step_in_backward_saves_gradient_memory():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)]).cuda()
    x = torch.randn(16, 2048, device="cuda")
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def peak(use_sib):
        opt = AdamW8bit(model.parameters(), lr=1e-4)
        handle = step_in_backward(model, opt) if use_sib else None
        for _ in range(2):  # second step: states exist in both runs
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model(x).square().mean().backward()
            if not use_sib:
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            out = torch.cuda.max_memory_allocated() - base
        if handle:
            handle.remove()
        return out

    plain, sib = peak(False), peak(True)
    assert plain - sib >= 0.7 * grad_bytes, (plain, sib, grad_bytes)
