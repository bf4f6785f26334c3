"""AdamW4bit: the 4-bit maps and packing (quant4), the optimizer contract on the reference backend
(against a float64 AdamW, state bytes, dtypes, param groups, resume, foreign state dicts,
step_in_backward), and the Triton step under the interpreter against the reference, bit for bit.
"""
from __future__ import annotations

import io

import pytest
import torch

import dbkernels
from adamw8bit_helpers import HP, _train, assert_same_states, make_grads, make_params
from dbkernels.optim import AdamW4bit, AdamW8bit, quant4, reference, reference4, step_in_backward

# the maps as the format defines them (quant4's docstring), written out independently of its code
M_VALUES = [0.0] + [2.0 ** (k - 7) for k in range(1, 8)]
V_VALUES = [2.0 ** -8] + [f * 2.0 ** e for e in range(-7, 0) for f in (1.0, 1.5)] + [1.0]


def _neighbour_step(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The gap between the two map values around each |x| (float64)."""
    t = table.double()
    i = torch.searchsorted(t, x.abs().double().clamp(max=1.0), right=True).clamp(1, len(t) - 1)
    return t[i] - t[i - 1]


# ----------------------------------------------------------------------------- quant4: maps and codes

def test_maps_have_the_specified_values():
    m, v = quant4.m_map(), quant4.v_map()
    assert m.dtype == v.dtype == torch.float32
    assert m[:8].tolist() == M_VALUES
    assert m[8:].tolist() == [-x for x in M_VALUES] and str(m[8].item()) == "-0.0"
    assert v.tolist() == V_VALUES and bool((v > 0).all())


def test_every_code_round_trips_and_encoding_is_the_nearest_code():
    codes = torch.arange(16, dtype=torch.int32)
    for u in (None, torch.zeros(16), torch.full((16,), 0.999)):  # an exact map value has no neighbour to round to
        assert torch.equal(quant4.encode_v(quant4.v_map(), u), codes)
        got = quant4.encode_m(quant4.m_map(), u)
        assert torch.equal(got[codes != 8], codes[codes != 8]) and got[8] == 0  # -0 is never produced
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(20000, generator=g) ** p for p in (1, 4, 12)] + [torch.tensor([0.0, 1.0, 1e-30])])
    for table, enc in ((torch.tensor(M_VALUES), quant4.encode_m), (torch.tensor(V_VALUES), quant4.encode_v)):
        mids = (table[1:] + table[:-1]) / 2
        xs = torch.cat([x, mids, table])
        err = (table[enc(xs).long()] - xs).abs()
        best = (table[None, :] - xs[:, None]).abs().min(dim=1).values
        assert torch.equal(err, best), "the closed form is not a nearest code"
    neg = quant4.encode_m(-x)
    assert torch.equal(quant4.decode_m(neg), -quant4.decode_m(quant4.encode_m(x)))
    assert bool((neg[x > 2.0 ** -7] >= 8).all())


@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_rounding_is_unbiased(signed):
    # every u = k / N: the mean of the decoded codes is x within 1 / N of the gap around x
    n_u = 1024
    g = torch.Generator().manual_seed(1)
    lo = -1.0 if signed else 2.0 ** -8   # v below its smallest value is rounded up (the zero-free map)
    x = lo + (1.0 - lo) * torch.rand(3000, generator=g)
    x = torch.cat([x, torch.tensor([2.0 ** -6 * 0.3, -2.0 ** -9, 0.7, 1.0])]) if signed else x
    enc, dec, table = ((quant4.encode_m, quant4.decode_m, M_VALUES) if signed else
                       (quant4.encode_v, quant4.decode_v, V_VALUES))
    xs = x[:, None].expand(-1, n_u).contiguous()
    y = dec(enc(xs, (torch.arange(n_u) / n_u)[None, :].expand_as(xs)))
    mean = y.double().mean(dim=1)
    moved = (y != dec(enc(x))[:, None]).any(dim=1)
    gap = _neighbour_step(x, torch.tensor(table))
    assert bool(((mean - x.double()).abs() <= gap / n_u * 1.001 + 1e-12).all())
    assert moved.float().mean() > 0.9  # it does round to both neighbours


def test_v_has_no_zero():
    tiny = torch.tensor([0.0, 1e-30, 2.0 ** -20, 2.0 ** -9, 2.0 ** -8 * 0.99])
    for u in (None, torch.zeros(5), torch.full((5,), 0.9999)):
        assert quant4.encode_v(tiny, u).tolist() == [0] * 5
    assert bool((quant4.decode_v(quant4.encode_v(tiny)) == 2.0 ** -8).all())
    v = torch.cat([torch.tensor([4.0, 0.0, 1e-20]), torch.zeros(125), torch.zeros(128)])  # block 2: all zero
    packed, absmax = quant4.quantize_blockwise(v, 128, signed=False)
    back = quant4.dequantize_blockwise(packed, absmax, v.numel(), 128, signed=False)
    assert back[0] == 4.0 and bool((back[1:128] == 4.0 * 2.0 ** -8).all())   # damped, never 0
    assert absmax[1] == 0 and bool((back[128:] == 0).all())


@pytest.mark.parametrize("n", [1, 2, 3, 127, 128, 129, 255])
def test_packing_of_any_length(n):
    g = torch.Generator().manual_seed(n)
    nib = torch.randint(0, 16, (n,), generator=g, dtype=torch.int32)
    packed = quant4.pack(nib)
    assert packed.dtype == torch.uint8 and packed.numel() == quant4.packed_bytes(n) == (n + 1) // 2
    assert torch.equal(quant4.unpack(packed, n), nib)
    b = packed.to(torch.int32)
    assert torch.equal(b & 15, nib[0::2]) and torch.equal((b >> 4)[: n // 2], nib[1::2])
    if n % 2:
        assert int(b[-1] >> 4) == 0
    assert quant4.pack(torch.tensor([1, 2, 3])).tolist() == [0x21, 0x03]


@pytest.mark.parametrize("block_size", [128, 256])
@pytest.mark.parametrize("n", [5, 300, 513])
def test_blockwise_round_trip_of_map_values(block_size, n):
    # x = map values times a per-block scale, with +-1 (or 1) in every block: the round trip is exact and
    # decodes with this block size's absmax only
    g = torch.Generator().manual_seed(n + block_size)
    nb = quant4.num_blocks(n, block_size)
    # 9-bit mantissas over many binades: a map value times the scale is exact in fp32
    scale = (1 + torch.randint(0, 256, (nb,), generator=g) / 256) * 2.0 ** torch.randint(-20, 20, (nb,), generator=g)
    for signed, table in ((True, quant4.m_map()), (False, quant4.v_map())):
        idx = torch.randint(0, 16, (n,), generator=g)
        idx[::block_size] = 7 if signed else 15
        x = table[idx] * scale.repeat_interleave(block_size)[:n]
        packed, absmax = quant4.quantize_blockwise(x, block_size, signed=signed)
        assert packed.numel() == (n + 1) // 2 and absmax.shape == (nb,) and absmax.dtype == torch.float32
        assert torch.equal(absmax, scale)
        assert torch.equal(quant4.dequantize_blockwise(packed, absmax, n, block_size, signed=signed), x)


# ----------------------------------------------------------------------------- the optimizer (reference)

def run4(backend, base, grads, **kw):
    params = [torch.nn.Parameter(b.detach().clone()) for b in base]
    opt = AdamW4bit(params, **{**HP, "min_4bit_size": 1000, **kw})
    with dbkernels.force_backend(backend):
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = None if g is None else g
            opt.step()
    return params, opt


def _adamw_float64(base, grads, lr, b1=0.9, b2=0.999, eps=1e-8, wd=1e-2):
    x, m, v = base.double().clone(), torch.zeros(base.numel(), dtype=torch.float64), 0
    for t, g in enumerate(grads, 1):
        g = g.double()
        x = x * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = x - lr / (1 - b1 ** t) * m / ((v / (1 - b2 ** t)).sqrt() + eps)
    return x


def test_close_to_a_float64_adamw():
    g = torch.Generator().manual_seed(0)
    n, steps, lr = 5000, 20, 1e-3
    base = [torch.randn(n, generator=g), torch.randn(300, generator=g)]
    scale, mean = torch.exp(torch.randn(n, generator=g)), torch.randn(n, generator=g)  # per-element gradient scales
    grads = [[(mean + torch.randn(n, generator=g)) * scale, torch.randn(300, generator=g)] for _ in range(steps)]
    (big, small), opt = run4("reference", base, grads, lr=lr)
    assert "state1" in opt.state[big] and "exp_avg" in opt.state[small]
    ref = _adamw_float64(base[0], [gs[0] for gs in grads], lr)
    moved, got = ref - base[0].double(), big.detach().double() - base[0].double()
    # measured 0.31-0.36 over seeds; a v map off by one code gives 0.65, a wrong m sign 0.88, m * 0.7 0.62
    assert (got - moved).abs().mean() < 0.45 * moved.abs().mean()
    assert torch.corrcoef(torch.stack([got, moved]))[0, 1] > 0.85
    torch.testing.assert_close(small.detach().double(), _adamw_float64(base[1], [gs[1] for gs in grads], lr),
                               rtol=1e-5, atol=1e-6)   # fp32 states: AdamW up to fp32 rounding


def test_state_bytes():
    sizes = [(64, 100), (5001,), (300,), (4096,)]  # 4-bit, 4-bit odd, fp32 (small), 4-bit at min_4bit_size
    params = [torch.nn.Parameter(torch.zeros(s)) for s in sizes]
    opt = AdamW4bit(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    expected = 0
    for n in (6400, 5001, 4096):
        expected += 2 * ((n + 1) // 2) + 2 * 4 * -(-n // 128)
    expected += 8 * 300
    assert opt.state_bytes() == expected
    st = opt.state[params[1]]
    assert st["state1"].dtype == torch.uint8 and st["state1"].shape == (2501,) and st["absmax1"].shape == (40,)
    big = [torch.nn.Parameter(torch.zeros(256, 256)) for _ in range(2)]
    opt = AdamW4bit(big)
    for p in big:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state_bytes() / sum(p.numel() for p in big) == 1 + 8 / 128


def test_param_dtypes_share_states_and_round_the_weights():
    # the states depend on the gradients only: fp32, bf16 and fp16 weights with the same (bf16-exact)
    # gradients get the same codes; the weights differ from the fp32 run by the rounding of their dtype
    g = torch.Generator().manual_seed(2)

    def exact(shape):  # bf16 values away from fp16's subnormals: the same numbers in all three dtypes
        x = torch.randn(shape, generator=g)
        return (x + 0.01 * torch.sign(x)).to(torch.bfloat16).float()

    base = [exact(3001), exact(200)]
    grads = [[exact(b.shape) for b in base] for _ in range(4)]
    p32, o32 = run4("reference", base, grads)
    for dtype, rel in ((torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)):
        pl, ol = run4("reference", [b.to(dtype) for b in base], [[x.to(dtype) for x in gs] for gs in grads])
        for a, b in zip(pl, p32):
            assert a.dtype == dtype
            # below one unit in the last place per step (4 steps)
            assert bool(((a.float() - b).abs() <= 4 * rel * (b.detach().abs() + 0.05)).all())
        st = ol.state[pl[0]]
        assert st["absmax1"].dtype == torch.float32 and ol.state[pl[1]]["exp_avg"].dtype == torch.float32
        for k in ("state1", "state2"):
            assert torch.equal(st[k], o32.state[p32[0]][k]), k


def test_param_groups_and_scheduler():
    def make():
        a = torch.nn.Parameter(torch.linspace(-1, 1, 5000))
        b = torch.nn.Parameter(torch.linspace(-2, 2, 3000))
        c = torch.nn.Parameter(torch.ones(50))
        opt = AdamW4bit([{"params": [a], "lr": 1e-2}, {"params": [b, c], "lr": 0.0, "weight_decay": 0.0}],
                        lr=1e-3, min_4bit_size=1000)
        return (a, b, c), opt

    (a, b, c), opt = make()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    (a2, b2, c2), opt2 = make()  # the same lr values set by hand
    a0, b0 = a.detach().clone(), b.detach().clone()
    g = torch.Generator().manual_seed(3)
    for t in range(4):
        ga, gb = torch.randn(5000, generator=g), torch.randn(3000, generator=g)
        a.grad, b.grad, a2.grad, b2.grad = ga, gb, ga.clone(), gb.clone()
        opt.step()
        opt2.param_groups[0]["lr"] = 1e-2 * 0.5 ** t
        opt2.step()
        if t == 0:  # Adam's first step moves every element by lr (exact m and v), plus the decay
            torch.testing.assert_close((a0 * (1 - 1e-2 * 1e-2) - a).abs().mean().item(), 1e-2, rtol=1e-3, atol=0)
        sched.step()
    assert opt.param_groups[0]["lr"] == 1e-2 * 0.5 ** 4 and opt.param_groups[1]["lr"] == 0.0
    assert torch.equal(a, a2) and torch.equal(b, b0) and c not in opt.state
    assert opt.state[b]["step"] == 4 and "state1" in opt.state[b]


def test_state_dict_resumes_bitwise():
    base = make_params(torch.bfloat16, sizes=(5001, 300, 2049), misaligned_last=False)
    grads = make_grads(base, 8)
    params = [torch.nn.Parameter(b.clone()) for b in base]
    opt = AdamW4bit(params, **HP, min_4bit_size=1000)
    _train(params, opt, lambda t: grads[t], 4)
    saved = [p.detach().clone() for p in params]
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    _train(params, opt, lambda t: grads[4 + t], 4)

    params2 = [torch.nn.Parameter(p.clone()) for p in saved]
    opt2 = AdamW4bit(params2, lr=123.0, min_4bit_size=1000)   # hyperparameters come from the state dict
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.param_groups[0]["lr"] == HP["lr"]
    st = opt2.state[params2[0]]
    assert st["state1"].dtype == torch.uint8 and st["state1"].numel() == 2501 and st["absmax1"].dtype == torch.float32
    _train(params2, opt2, lambda t: grads[4 + t], 4)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    assert_same_states(opt, params, opt2, params2)


def test_foreign_state_dicts_are_refused_in_one_line():
    def trained(cls, **kw):
        p = torch.nn.Parameter(torch.randn(5000))
        p.grad = torch.randn(5000)
        opt = cls([p], **kw)
        opt.step()
        return opt.state_dict()

    mine = AdamW4bit([torch.nn.Parameter(torch.randn(5000))])
    for sd, says in ((trained(AdamW8bit), "saved by AdamW8bit"), (trained(torch.optim.AdamW), "torch.optim.AdamW")):
        with pytest.raises(ValueError, match=says) as e:
            mine.load_state_dict(sd)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="saved by AdamW4bit") as e:
        AdamW8bit([torch.nn.Parameter(torch.randn(5000))]).load_state_dict(trained(AdamW4bit))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_in_backward_equals_ordinary_steps(dtype):
    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 96), torch.nn.GELU(), torch.nn.Linear(96, 64),
                                   torch.nn.GELU(), torch.nn.Linear(64, 4)).to(dtype)

    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(32, 16, generator=g).to(dtype), torch.randn(32, 4, generator=g).to(dtype)) for _ in range(4)]
    m1, m2 = mlp(), mlp()
    o1 = AdamW4bit(m1.parameters(), lr=1e-2, min_4bit_size=1000)
    o2 = AdamW4bit(m2.parameters(), lr=1e-2, min_4bit_size=1000)
    for x, y in data:
        torch.nn.functional.mse_loss(m1(x), y).backward()
        o1.step()
        o1.zero_grad()
    with step_in_backward(m2, o2):
        for x, y in data:
            torch.nn.functional.mse_loss(m2(x), y).backward()
            assert all(p.grad is None for p in m2.parameters())
    assert "state1" in o2.state[m2[2].weight] and "exp_avg" in o2.state[m2[0].bias]
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert_same_states(o1, list(m1.parameters()), o2, list(m2.parameters()))


# ----------------------------------------------------------------------------- Triton under the interpreter

def _mixed(dtype, steps=3):
    """4-bit tensors of odd and even sizes that are no multiple of a block, one spanning two programs at a
    storage offset; fp32-state ones; whole zero blocks, values far below their block's absmax, large
    gradients, a parameter without a gradient once."""
    base = make_params(dtype, sizes=(1001, 300, 1, 1282, 2051))
    g = torch.Generator().manual_seed(4)
    grads = []
    for t in range(steps):
        gs = [(torch.randn(b.shape, generator=g) * (1.0, 1e4, 1e-2)[t % 3]).to(dtype) for b in base]
        gs[0][256:512] = 0
        gs[4][:9] = 1e-6 * gs[4][:9]
        if t == 1:
            gs[2] = None
        grads.append(gs)
    return base, grads


@pytest.mark.parametrize("block_size", [128, 256])
@pytest.mark.parametrize("dtype,sr", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False),
                                      (torch.float16, True), (torch.float16, False)])
def test_triton_matches_reference_bitwise(cpu_triton, monkeypatch, dtype, sr, block_size):
    from dbkernels.optim import adamw4bit

    base, grads = _mixed(dtype)
    pr, orf = run4("reference", base, grads, block_size=block_size, stochastic_rounding=sr)

    def refused(*a, **k):
        raise AssertionError("the triton run used a reference step")
    monkeypatch.setattr(reference4, "update_", refused)
    monkeypatch.setattr(reference, "update_", refused)
    with dbkernels.force_backend("triton"):
        assert adamw4bit._impl(torch.device("cpu"), block_size)[0] == "triton"
    pt, otr = run4("triton", base, grads, block_size=block_size, stochastic_rounding=sr)
    for a, b in zip(pr, pt):
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a.detach().view(torch.uint8), b.detach().view(torch.uint8)), (a - b).abs().max()
    assert "state1" in otr.state[pt[3]] and "exp_avg" in otr.state[pt[1]]
    assert_same_states(orf, pr, otr, pt)  # packed codes, absmax, fp32 moments, step, seed


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, except that any NaN matches any NaN (payloads differ between CPU libraries)."""
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = a.isnan()
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(ints), b[~nan].view(ints))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, on the interpreter's NaN arithmetic
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference_with_non_finite_gradients(cpu_triton, dtype):
    # a NaN or inf gradient makes its block's absmax NaN / inf in the reference (torch.amax); tl.max alone
    # would drop the NaN
    base, grads = _mixed(dtype)
    grads[1][0][7] = float("nan")
    grads[1][4][300] = float("inf")
    grads[2][4][1000] = float("-inf")
    grads[1][1][3] = float("nan")
    runs = [run4(backend, base, grads) for backend in ("reference", "triton")]
    (pr, orf), (pt, otr) = runs
    assert orf.state[pr[0]]["absmax1"].isnan().any() and orf.state[pr[4]]["absmax2"].isinf().any()
    for a, b in zip(pr, pt):
        assert _same_bits(a, b)
        for k, v in orf.state[a].items():
            assert _same_bits(v, otr.state[b][k]) if isinstance(v, torch.Tensor) else v == otr.state[b][k], k


@pytest.mark.parametrize("n", [769, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_step_from_arbitrary_states(cpu_triton, dtype, n):
    # every nibble in both positions (-0 included), a zero block, absmax over many binades: the decode side
    from dbkernels.optim import triton_kernels4

    g = torch.Generator().manual_seed(n)
    nbytes, nb = (n + 1) // 2, quant4.num_blocks(n, 128)
    state = {"state1": torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8),
             "state2": torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8),
             "absmax1": torch.exp(torch.randn(nb, generator=g) * 4),
             "absmax2": torch.exp(torch.randn(nb, generator=g) * 4), "seed": 12345}
    state["state1"][:16] = torch.arange(16, dtype=torch.uint8) * 17
    if n % 2:
        state["state1"][-1] &= 15
        state["state2"][-1] &= 15
    state["absmax1"][1] = 0
    p = torch.randn(n, generator=g).to(dtype)
    grad = torch.randn(n, generator=g).to(dtype)
    outs = []
    for impl in (reference4, triton_kernels4):
        st = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        x = p.clone()
        impl.update_(x, grad, st, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, step=7, block_size=128,
                     stochastic_rounding=True)
        outs.append((x, st))
    (xr, sr_), (xt, st_) = outs
    assert torch.equal(xr, xt)
    for k in ("state1", "absmax1", "state2", "absmax2"):
        assert torch.equal(sr_[k], st_[k]), k
    assert not torch.equal(sr_["state1"], state["state1"])
