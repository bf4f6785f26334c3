"""dbkernels.ema_update_: the Triton kernel (under the interpreter on CPU) against the reference (the spec) bit for
bit, the reference against its formula, stochastic rounding of bf16 averages (unbiased, and moving where round to
nearest would freeze), one launch per dtype group, torch.library registration, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

import dbkernels
from dbkernels import _backend, _triton
from dbkernels.ops.ema import reference as R

ODD_SIZES = (1, 7, 77 * 3, 4095, 4096, 4097, 3 * 4096 + 5)


def _pairs(avg_dtype, w_dtype, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    avgs = [torch.randn(n, generator=g).to(avg_dtype) for n in sizes]
    ws = [(a.float() + 0.01 * torch.randn(n, generator=g)).to(w_dtype) for a, n in zip(avgs, sizes)]
    return avgs, ws


def _run(backend, avgs, ws, decays, first_step=0, seed=0):
    out = [a.clone() for a in avgs]
    with dbkernels.force_backend(backend):
        for k, d in enumerate(decays):
            dbkernels.ema_update_(out, ws, d, step=first_step + k, seed=seed)
    return out


def _warmup(n):
    return [min(0.9999, (1 + k) / (10 + k)) for k in range(n)]


@pytest.mark.parametrize("avg_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_reference_bitwise(cpu_triton, avg_dtype, w_dtype):
    avgs, ws = _pairs(avg_dtype, w_dtype, ODD_SIZES)
    decays = [1.0] + _warmup(3) + [0.9999]
    ref, tri = _run("reference", avgs, ws, decays), _run("triton", avgs, ws, decays)
    for k, (a, b) in enumerate(zip(ref, tri)):
        assert a.dtype == avg_dtype and torch.equal(a, b), (k, (a.float() - b.float()).abs().max())


def test_many_tensors_of_mixed_dtypes_and_sizes_one_launch_per_group(cpu_triton, monkeypatch):
    g = torch.Generator().manual_seed(1)
    kinds = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
    avgs, ws = [], []
    for i in range(60):
        n = int(torch.randint(0, 9000, (1,), generator=g))
        ad, wd = kinds[i % 3]
        avgs.append(torch.randn(n, generator=g).to(ad))
        ws.append(torch.randn(n, generator=g).to(wd))
    launches = []
    real = _triton.launch
    monkeypatch.setattr(_triton, "launch", lambda *a, **k: (launches.append(a[0]), real(*a, **k)))
    tri = _run("triton", avgs, ws, [0.99])
    assert len(launches) == 3  # one per (average dtype, weight dtype)
    ref = _run("reference", avgs, ws, [0.99])
    assert all(torch.equal(a, b) for a, b in zip(ref, tri))


def test_strided_weights_and_shapes(cpu_triton):
    g = torch.Generator().manual_seed(2)
    avgs = [torch.randn(33, 17, generator=g), torch.randn(5, 3, 7, generator=g).bfloat16()]
    ws = [torch.randn(17, 33, generator=g).t(), torch.randn(5, 7, 3, generator=g).transpose(1, 2)]
    ref, tri = _run("reference", avgs, ws, [0.9]), _run("triton", avgs, ws, [0.9])
    assert all(torch.equal(a, b) for a, b in zip(ref, tri))
    assert torch.equal(ref[0], avgs[0] + (ws[0].contiguous() - avgs[0]) * R.one_minus_decay(0.9))
    copied = _run("triton", avgs, ws, [0.0])  # decay 0: the weights themselves (bf16: rounded stochastically)
    assert torch.equal(copied[0], ws[0]) and torch.equal(copied[1], _run("reference", avgs, ws, [0.0])[1])


def test_reference_is_torch_lerp_in_fp32():
    """torch.lerp's two sides without its fused multiply-add: within an ulp of torch.lerp, decay 0 the weights."""
    avgs, ws = _pairs(torch.float32, torch.float16, (1000,))
    a, w = avgs[0], ws[0].float()
    for decay in (0.999, 0.3):
        out = _run("reference", avgs, ws, [decay])[0]
        omd = R.one_minus_decay(decay)
        formula = a + (w - a) * omd if omd < 0.5 else w + (w - a) * (omd - 1)
        assert torch.equal(out, formula)
        torch.testing.assert_close(out, torch.lerp(a, w, omd), rtol=2.0 ** -23, atol=1e-7)
        exact = a.double() * decay + w.double() * (1 - decay)
        assert (out.double() - exact).abs().max() <= 4e-7 * exact.abs().max()
    assert torch.equal(_run("reference", avgs, ws, [0.0])[0], w)


def test_bf16_rounding_is_unbiased():
    """One update of 2^16 elements: each result is one of the two bf16 neighbours of the fp32 result, the upper
    one (in magnitude) about as often as the dropped fraction says, so the errors average out to zero."""
    n = 1 << 16
    g = torch.Generator().manual_seed(3)
    a = torch.randn(n, generator=g).bfloat16()
    w = a.float() + 0.05 * torch.randn(n, generator=g)
    out = _run("reference", [a], [w], [0.99])[0].float()
    exact = a.float() + (w - a.float()) * R.one_minus_decay(0.99)
    bits = exact.view(torch.int32)
    down = (bits & ~0xFFFF).view(torch.float32)        # the neighbour towards zero
    up = (bits.to(torch.int64) + 0x10000 & ~0xFFFF).to(torch.int32).view(torch.float32)
    frac = (bits & 0xFFFF).float() / 65536
    went_up = out == up
    assert bool(((out == down) | went_up).all())
    for lo in (0.0, 0.25, 0.5, 0.75):  # P(up) = the dropped fraction, small fractions too (nearest: never up)
        sel = (frac >= lo) & (frac < lo + 0.25)
        m = int(sel.sum())
        assert abs(float(went_up[sel].float().mean() - frac[sel].mean())) < 4 * 0.5 / math.sqrt(m)
    err = (out - exact) / (up - down)                  # in units of the local bf16 step
    assert abs(float(err.mean())) < 4 * 0.5 / math.sqrt(n)


def test_bf16_average_moves_where_round_to_nearest_freezes():
    """decay 0.99, the weights one bf16 step above the average: each increment is 1% of a step, so an average rounded
    to nearest stays where it started. Rounded stochastically it follows the fp32 average, over the elements and over
    the steps."""
    n, steps, d = 4096, 300, 0.99
    a = torch.ones(n, dtype=torch.bfloat16)
    w = torch.full((n,), 1.0 + 2.0 ** -7)  # bf16's next value above 1
    sr, fp32, nearest = a.clone(), a.float(), a.clone()
    history = []
    for k in range(steps):
        dbkernels.ema_update_([sr], [w], d, step=k)
        dbkernels.ema_update_([fp32], [w], d, step=k)
        nearest = (nearest.float() + (w - nearest.float()) * R.one_minus_decay(d)).bfloat16()
        history.append(sr.float().mean() - fp32.mean())
    assert torch.equal(nearest, a)                                      # round to nearest never moves
    gap = float(fp32.mean() - 1.0)
    assert gap > 0.9 * 2.0 ** -7                                        # the fp32 average went ~all the way
    assert abs(float(sr.float().mean() - fp32.mean())) < 0.02 * gap     # the bf16 average with it
    assert abs(float(torch.stack(history).mean())) < 0.02 * gap         # unbiased along the way


def test_bf16_rounding_is_deterministic_and_resumes_bitwise():
    avgs, ws = _pairs(torch.bfloat16, torch.float32, (5000, 300))
    whole = _run("reference", avgs, ws, _warmup(6))
    again = _run("reference", avgs, ws, _warmup(6))
    first = _run("reference", avgs, ws, _warmup(6)[:3])
    resumed = _run("reference", [a.clone() for a in first], ws, _warmup(6)[3:], first_step=3)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(whole, again, resumed))
    other_seed = _run("reference", avgs, ws, _warmup(6), seed=5)
    assert not torch.equal(whole[0], other_seed[0])
    shifted = _run("reference", avgs, ws, _warmup(6), first_step=1)  # other steps: other rounding
    assert not torch.equal(whole[0], shifted[0])


def test_empty_and_zero_size_inputs():
    dbkernels.ema_update_([], [], 0.5, step=0)
    a = [torch.zeros(0), torch.ones(3)]
    dbkernels.ema_update_(a, [torch.zeros(0), torch.zeros(3)], 0.5, step=0)
    assert torch.equal(a[1], torch.full((3,), 0.5))


def test_registered_op_and_compile():
    from dbkernels.ops.ema.op import _ema_update_op

    for adt in (torch.float32, torch.bfloat16):
        avgs, ws = _pairs(adt, torch.float32, (5, 9))
        torch.library.opcheck(_ema_update_op, (avgs, ws, 0.9, 3, 0))

    @torch.compile(fullgraph=True, backend="eager")
    def step(avgs, ws):
        dbkernels.ema_update_(avgs, ws, 0.5, step=1)
        return avgs[0] * 2

    avgs, ws = _pairs(torch.float32, torch.float32, (6,))
    compiled = [a.clone() for a in avgs]
    step(compiled, ws)
    assert torch.equal(compiled[0], _run("reference", avgs, ws, [0.5], first_step=1)[0])


def test_forced_cuda_backend_fails_clearly(monkeypatch):
    monkeypatch.setenv("DBKERNELS_BACKEND", "cuda")
    with pytest.raises(_backend.BackendUnavailable, match="ema_update has no cuda implementation"):
        dbkernels.ema_update_([torch.zeros(3)], [torch.ones(3)], 0.5, step=0)


@pytest.mark.parametrize("call, err, names", [
    (lambda: dbkernels.ema_update_(torch.zeros(3), [torch.zeros(3)], 0.5, step=0), TypeError, "averages"),
    (lambda: dbkernels.ema_update_([torch.zeros(3)], [], 0.5, step=0), ValueError, "weights"),
    (lambda: dbkernels.ema_update_([torch.zeros(3), torch.zeros(2, dtype=torch.float16)],
                                   [torch.zeros(3), torch.zeros(2)], 0.5, step=0), TypeError, "averages[1]"),
    (lambda: dbkernels.ema_update_([torch.zeros(3)], [torch.zeros(3, dtype=torch.int64)], 0.5, step=0),
     TypeError, "weights[0]"),
    (lambda: dbkernels.ema_update_([torch.zeros(3)], [[0.0, 1.0, 2.0]], 0.5, step=0), TypeError, "weights[0]"),
    (lambda: dbkernels.ema_update_([torch.zeros(3), torch.zeros(4)], [torch.zeros(3), torch.zeros(2, 2)], 0.5,
                                   step=0), ValueError, "weights[1]"),
    (lambda: dbkernels.ema_update_([torch.zeros(4, 3).t()], [torch.zeros(3, 4)], 0.5, step=0),
     ValueError, "averages[0] must be contiguous"),
    (lambda: dbkernels.ema_update_([torch.zeros(3)], [torch.zeros(3, device="meta")], 0.5, step=0),
     ValueError, "weights[0] is on meta"),
    (lambda: dbkernels.ema_update_([torch.zeros(3)], [torch.zeros(3)], 1.5, step=0), ValueError, "decay"),
    (lambda: dbkernels.ema_update_([torch.zeros(3)], [torch.zeros(3)], float("nan"), step=0), ValueError, "decay"),
    (lambda: dbkernels.ema_update_([torch.zeros(3)], [torch.zeros(3)], 0.5, step=-1), ValueError, "step"),
    (lambda: dbkernels.ema_update_([torch.zeros(3)], [torch.zeros(3)], 0.5, step=1.0), ValueError, "step"),
    (lambda: dbkernels.ema_update_([torch.zeros(3)], [torch.zeros(3)], 0.5, step=0, seed=2**32), ValueError, "seed"),
])
def test_bad_input_names_the_argument(call, err, names):
    with pytest.raises(err, match=names.replace("[", r"\[").replace("]", r"\]")):
        call()


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("avg_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_triton_matches_reference_bitwise(avg_dtype, w_dtype):
    """Compiled for the GPU (no fused multiply-add), the kernel computes the reference's bits, whole blocks
    (vectorised) and tails, an unaligned view included."""
    sizes = ODD_SIZES + (1 << 20,)
    avgs, ws = _pairs(avg_dtype, w_dtype, sizes)
    ref = _run("reference", avgs, ws, _warmup(4))
    ws_gpu = [w.cuda() for w in ws]
    ws_gpu[2] = torch.cat([ws_gpu[2].new_zeros(1), ws_gpu[2]])[1:]  # a weight at an unaligned address
    gpu = _run("triton", [a.cuda() for a in avgs], ws_gpu, _warmup(4))
    for a, b in zip(ref, gpu):
        assert torch.equal(a, b.cpu())
