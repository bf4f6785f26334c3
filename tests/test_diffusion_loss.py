"""add_noise / diffusion_loss: every backend against the reference (the spec).

CPU: the reference and the Triton kernels under the interpreter. GPU (marker gpu):
the CUDA extension and compiled Triton, at SD latent sizes. fp32 must match the
fp32 reference to 1e-5 relative; fp16/bf16 inputs follow the 2x-of-PyTorch rule:
our error against the fp32 reference is at most twice that of PyTorch computing
the same thing in the input precision.
"""
import math

import pytest
import torch

import dbkernels
from dbkernels import _backend, _workspace
from dbkernels.ops.diffusion_loss import op as loss_op
from dbkernels.ops.diffusion_loss import reference as R

PRED_TYPES = R.PREDICTION_TYPES
SD_ALPHAS = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0).float()


def make_inputs(shape, dtype, device="cpu", seed=0, t_max=1000):
    g = torch.Generator().manual_seed(seed)
    pred, x0, noise = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    t = torch.randint(0, t_max, (shape[0],), generator=g).to(device)
    return pred, x0, noise, t, SD_ALPHAS.to(device)


def run(backend, pred, x0, noise, t, ac, **kw):
    pred = pred.detach().clone().requires_grad_(True)
    with dbkernels.force_backend(backend):
        loss = dbkernels.diffusion_loss(pred, x0, noise, t, ac, **kw)
    loss.backward()
    return loss.detach(), pred.grad


def reference_fp32(pred, x0, noise, t, ac, **kw):
    """The spec, autograd for the gradient, on fp32 copies of the inputs."""
    pred32 = pred.detach().float().requires_grad_(True)
    noise32 = None if noise is None else noise.float()
    loss = R.diffusion_loss(pred32, x0.float(), noise32, t, ac, **kw)
    loss.backward()
    return loss.detach(), pred32.grad


def torch_lowp(pred, x0, noise, t, ac, *, prediction_type="epsilon", num_prior=0, prior_weight=1.0,
               snr_gamma=None):
    """What plain PyTorch computes when it stays in the input precision (the 2x rule's yardstick)."""
    pred = pred.detach().clone().requires_grad_(True)
    dt = pred.dtype
    abar = ac[t].to(dt)
    shape = (-1,) + (1,) * (pred.dim() - 1)
    a, s = abar.sqrt().reshape(shape), (1 - abar).sqrt().reshape(shape)
    target = {"epsilon": noise, "v_prediction": a * noise - s * x0, "sample": x0}[prediction_type]
    rows = (pred - target).pow(2).flatten(1).mean(1)
    w = R.snr_weights(ac[t], prediction_type, snr_gamma).to(dt)
    scale = R.sample_scales(pred.shape[0], num_prior, prior_weight, pred.device).to(dt)
    loss = (scale * w * rows).sum()
    loss.backward()
    return loss.detach(), pred.grad


def assert_close_to_reference(backend, pred, x0, noise, t, ac, **kw):
    loss, grad = run(backend, pred, x0, noise, t, ac, **kw)
    ref_loss, ref_grad = reference_fp32(pred, x0, noise, t, ac, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    grad_err = (grad.float() - ref_grad).abs().max().item()
    loss_err = abs(loss.item() - ref_loss.item())
    gscale = ref_grad.abs().max().item()
    if pred.dtype == torch.float32:
        assert loss_err <= 1e-5 * abs(ref_loss.item()) + 1e-12, (loss.item(), ref_loss.item())
        assert grad_err <= 1e-5 * gscale + 1e-12, grad_err / gscale
    else:
        pt_loss, pt_grad = torch_lowp(pred, x0, noise, t, ac, **kw)
        pt_loss_err = abs(pt_loss.float().item() - ref_loss.item())
        pt_grad_err = (pt_grad.float() - ref_grad).abs().max().item()
        assert loss_err <= 2 * pt_loss_err + 1e-6 * abs(ref_loss.item()), (loss_err, pt_loss_err)
        assert grad_err <= 2 * pt_grad_err + 1e-6 * gscale, (grad_err, pt_grad_err)


# ------------------------------------------------------------------ CPU grid

GRID_SHAPES = [(4, 4, 37, 41), (1, 4, 9, 7)]  # numel not a multiple of any block; batch 1


def prior_counts(batch):
    return sorted({0, batch // 2, batch})


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", GRID_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_loss_matches_reference_cpu(backend, shape, dtype, snr_gamma, prediction_type, request):
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    pred, x0, noise, t, ac = make_inputs(shape, dtype)
    for num_prior in prior_counts(shape[0]):
        assert_close_to_reference(backend, pred, x0, noise, t, ac, prediction_type=prediction_type,
                                  num_prior=num_prior, prior_weight=0.7, snr_gamma=snr_gamma)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_add_noise_matches_reference(backend, request):
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    for dtype in (torch.float32, torch.bfloat16):
        pred, x0, noise, t, ac = make_inputs((3, 4, 13, 11), dtype, seed=1)
        with dbkernels.force_backend(backend):
            xt = dbkernels.add_noise(x0, noise, t, ac)
        ref = R.add_noise(x0, noise, t, ac)
        assert xt.dtype == dtype and xt.shape == x0.shape
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(xt.float(), ref.float(), rtol=tol, atol=tol)
        # and the reference is the textbook formula
        abar = ac[t].reshape(-1, 1, 1, 1)
        torch.testing.assert_close(ref.float(), (abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()).to(
            dtype).float())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_seeded_noise_and_offset(backend, request):
    """seed=... must equal passing dbkernels.seeded_noise(shape, seed) as the noise tensor."""
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    pred, x0, _, t, ac = make_inputs((3, 4, 10, 9), torch.float32, seed=2)
    offset = 0.1 * torch.randn(3, 4)
    noise = dbkernels.seeded_noise(x0.shape, 1234)
    with dbkernels.force_backend(backend):
        xt_seed = dbkernels.add_noise(x0, None, t, ac, seed=1234, noise_offset=offset)
        xt_tensor = dbkernels.add_noise(x0, noise, t, ac, noise_offset=offset)
    torch.testing.assert_close(xt_seed, xt_tensor, rtol=1e-6, atol=1e-6)
    for pt in PRED_TYPES:
        ls, gs = run(backend, pred, x0, None, t, ac, seed=1234, noise_offset=offset, prediction_type=pt,
                     num_prior=1)
        lt, gt = run(backend, pred, x0, noise, t, ac, noise_offset=offset, prediction_type=pt, num_prior=1)
        torch.testing.assert_close(ls, lt, rtol=1e-5, atol=0)
        torch.testing.assert_close(gs, gt, rtol=1e-5, atol=1e-9)
    # offset noise really shifts eps per (sample, channel)
    xt0 = dbkernels.add_noise(x0, noise, t, ac)
    abar = ac[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(xt_tensor - xt0, ((1 - abar).sqrt() * offset[:, :, None, None]).expand_as(x0),
                               rtol=1e-4, atol=1e-5)


def test_seeded_noise_is_standard_normal_and_seed_dependent():
    a = dbkernels.seeded_noise((1 << 18,), 7)
    b = dbkernels.seeded_noise((1 << 18,), 8)
    assert abs(a.mean().item()) < 0.01 and abs(a.std().item() - 1) < 0.01
    assert not torch.equal(a, b)
    assert torch.equal(a, dbkernels.seeded_noise((1 << 18,), 7))
    # Philox4x32-10 known-answer vector (Random123): key (0, 0), counter 0 -> first words
    # 0x6627e8d5, 0xe169c58d; so z for index 0, seed 0 is fixed by the spec.
    u1 = ((0x6627E8D5 >> 8) + 1) / 2 ** 24
    u2 = (0xE169C58D >> 8) / 2 ** 24
    z = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
    assert abs(dbkernels.seeded_noise((1,), 0).item() - z) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_non_contiguous_inputs(backend, request):
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    pred, x0, noise, t, ac = make_inputs((2, 4, 12, 10), torch.float32, seed=3)
    pred_nc = pred.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    x0_nc = torch.cat([x0, x0], dim=3)[..., :10]
    noise_nc = noise.contiguous(memory_format=torch.channels_last)
    assert not pred_nc.is_contiguous() and not x0_nc.is_contiguous() and not noise_nc.is_contiguous()
    l1, g1 = run(backend, pred_nc, x0_nc, noise_nc, t, ac, num_prior=1, prediction_type="v_prediction")
    l2, g2 = run(backend, pred, x0, noise, t, ac, num_prior=1, prediction_type="v_prediction")
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backward_scaling_retain_graph_and_no_grad(backend, request):
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    pred, x0, noise, t, ac = make_inputs((2, 4, 8, 8), torch.float32, seed=4)
    _, g1 = run(backend, pred, x0, noise, t, ac, num_prior=1)
    p = pred.clone().requires_grad_(True)
    with dbkernels.force_backend(backend):
        loss = dbkernels.diffusion_loss(p, x0, noise, t, ac, num_prior=1)
        (3.0 * loss).backward(retain_graph=True)
        torch.testing.assert_close(p.grad, 3 * g1)
        p.grad = None
        loss.backward()  # the saved gradient buffer is intact for a second backward
        torch.testing.assert_close(p.grad, g1)
        with torch.no_grad():
            l_ng = dbkernels.diffusion_loss(pred, x0, noise, t, ac, num_prior=1)
    assert not l_ng.requires_grad
    torch.testing.assert_close(l_ng, loss.detach())


def test_triton_is_deterministic_and_resets_its_counter(cpu_triton):
    pred, x0, noise, t, ac = make_inputs((3, 4, 37, 41), torch.float32, seed=5)
    l1, g1 = run(cpu_triton, pred, x0, noise, t, ac, num_prior=1, snr_gamma=5.0)
    l2, g2 = run(cpu_triton, pred, x0, noise, t, ac, num_prior=1, snr_gamma=5.0)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert _workspace.ticket_counter(torch.device("cpu")).item() == 0


def test_min_snr_weights_and_limits():
    abar = torch.tensor([0.0, 0.2, 0.5, 0.99, 1.0])
    snr = abar / (1 - abar)
    eps = R.snr_weights(abar, "epsilon", 5.0)
    assert eps[0] == 1.0 and eps[-1] == 0.0  # limits at SNR 0 and inf, not NaN
    torch.testing.assert_close(eps[1:4], torch.minimum(snr, torch.tensor(5.0))[1:4] / snr[1:4])
    torch.testing.assert_close(R.snr_weights(abar, "v_prediction", 5.0)[:4],
                               torch.minimum(snr, torch.tensor(5.0))[:4] / (snr[:4] + 1))
    assert torch.equal(R.snr_weights(abar, "epsilon", None), torch.ones(5))


def test_loss_is_the_dreambooth_objective():
    """Instance mean + prior_weight * class mean, written out the way diffusers does."""
    pred, x0, noise, t, ac = make_inputs((4, 4, 6, 6), torch.float32, seed=6)
    loss = dbkernels.diffusion_loss(pred, x0, noise, t, ac, num_prior=2, prior_weight=0.5)
    p_inst, p_prior = pred.chunk(2)
    n_inst, n_prior = noise.chunk(2)
    expect = torch.nn.functional.mse_loss(p_inst, n_inst) + 0.5 * torch.nn.functional.mse_loss(p_prior, n_prior)
    torch.testing.assert_close(loss, expect)
    all_prior = dbkernels.diffusion_loss(pred, x0, noise, t, ac, num_prior=4, prior_weight=0.5)
    torch.testing.assert_close(all_prior, 0.5 * torch.nn.functional.mse_loss(pred, noise))


# ------------------------------------------------------------------ dispatcher, torch.library

def test_backend_env_and_force(monkeypatch):
    assert _backend.choose("diffusion_loss", "cpu") == "reference"
    monkeypatch.setenv("DBKERNELS_BACKEND", "cuda")
    with pytest.raises(dbkernels.BackendUnavailable, match="cuda"):
        _backend.choose("diffusion_loss", "cpu")
    pred, x0, noise, t, ac = make_inputs((1, 4, 4, 4), torch.float32)
    with pytest.raises(dbkernels.BackendUnavailable, match="CUDA tensors"):
        dbkernels.diffusion_loss(pred, x0, noise, t, ac)
    monkeypatch.setenv("DBKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DBKERNELS_BACKEND"):
        _backend.choose("diffusion_loss", "cpu")
    monkeypatch.setenv("DBKERNELS_BACKEND", "reference")
    with dbkernels.force_backend("triton"):  # the context manager wins over the environment
        assert _backend.forced_backend() == "triton"
    with pytest.raises(ValueError):
        with dbkernels.force_backend("numba"):
            pass


def test_env_triton_runs_the_triton_kernels(monkeypatch, cpu_triton):
    import dbkernels.ops.diffusion_loss.triton_kernels as tk

    calls = []
    real = tk.loss_fwd
    monkeypatch.setattr(tk, "loss_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("DBKERNELS_BACKEND", "triton")
    pred, x0, noise, t, ac = make_inputs((2, 4, 4, 4), torch.float32)
    dbkernels.diffusion_loss(pred, x0, noise, t, ac)
    assert calls == [1]


def test_custom_ops_pass_opcheck():
    pred, x0, noise, t, ac = make_inputs((2, 4, 5, 3), torch.float32)
    off = torch.randn(2, 4)
    torch.library.opcheck(loss_op._loss_fwd_op, (pred, x0, noise, off, t, ac, 1, 1, 0.5, 5.0, 0, True))
    torch.library.opcheck(loss_op._loss_fwd_op, (pred, x0, None, None, t, ac, 0, 0, 1.0, -1.0, 3, False))
    torch.library.opcheck(loss_op._add_noise_op, (x0, noise, off, t, ac, 0))


def test_torch_compile_traces_it_fullgraph():
    pred, x0, noise, t, ac = make_inputs((2, 4, 6, 6), torch.float32)

    def step(p):
        xt = dbkernels.add_noise(x0, noise, t, ac)
        return dbkernels.diffusion_loss(p + 0 * xt, x0, noise, t, ac, num_prior=1, snr_gamma=5.0)

    p1 = pred.clone().requires_grad_(True)
    p2 = pred.clone().requires_grad_(True)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    l1 = compiled(p1)
    l1.backward()
    l2 = step(p2)
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(p1.grad, p2.grad)


# ------------------------------------------------------------------ bad input

def _bad(**over):
    pred, x0, noise, t, ac = make_inputs((2, 4, 4, 4), torch.float32)
    args = dict(pred=pred, x0=x0, noise=noise, timesteps=t, alphas_cumprod=ac)
    kw = {}
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return lambda: dbkernels.diffusion_loss(args["pred"], args["x0"], args["noise"], args["timesteps"],
                                            args["alphas_cumprod"], **kw)


@pytest.mark.parametrize("over, exc, match", [
    (dict(x0=torch.randn(2, 4, 4, 5)), ValueError, "x0 must have the shape of pred"),
    (dict(noise=torch.randn(2, 4, 5, 4)), ValueError, "noise must have the shape"),
    (dict(timesteps=torch.tensor([0, 1000])), ValueError, r"timesteps must lie in .* = \[0, 1000\), got e.g. \[1000\]"),
    (dict(timesteps=torch.tensor([-1, 3])), ValueError, "timesteps must lie"),
    (dict(timesteps=torch.tensor([1.0, 2.0])), TypeError, "timesteps must be an integer tensor"),
    (dict(timesteps=torch.tensor([1, 2, 3])), ValueError, r"timesteps must have shape \(2,\)"),
    (dict(num_prior=3), ValueError, r"num_prior must be in \[0, batch=2\]"),
    (dict(num_prior=-1), ValueError, "num_prior"),
    (dict(prediction_type="eps"), ValueError, "prediction_type must be one of"),
    (dict(pred=torch.ones(2, 4, 4, 4, dtype=torch.int32)), TypeError, "pred must have dtype"),
    (dict(x0=torch.ones(2, 4, 4, 4, dtype=torch.int64)), TypeError, "x0 must have dtype"),
    (dict(noise=torch.randn(2, 4, 4, 4, dtype=torch.float64)), TypeError, "noise must have dtype"),
    (dict(alphas_cumprod=torch.arange(10)), TypeError, "alphas_cumprod must be a floating"),
    (dict(x0=torch.randn(2, 4, 4, 4, device="meta")), ValueError, "x0 is on meta but pred is on cpu"),
    (dict(noise=None), ValueError, "seed"),
    (dict(seed=3), ValueError, "either noise or seed"),
    (dict(noise=None, seed=-1), ValueError, "seed must be an int"),
    (dict(snr_gamma=0), ValueError, "snr_gamma"),
    (dict(prior_weight=-1), ValueError, "prior_weight"),
    (dict(noise_offset=torch.randn(2, 3)), ValueError, r"noise_offset must have shape \(batch, channels\)"),
    (dict(pred=torch.randn(8)), ValueError, "pred must have at least 2 dimensions"),
    (dict(pred=[1.0]), TypeError, "pred must be a torch.Tensor"),
    (dict(x0=torch.randn(2, 4, 4, 4, requires_grad=True)), ValueError, "w.r.t. pred only, but x0 requires grad"),
])
def test_bad_input_names_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**over)()


def test_add_noise_bad_input():
    _, x0, noise, t, ac = make_inputs((2, 4, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="noise must have the shape"):
        dbkernels.add_noise(x0, noise[:1], t, ac)
    with pytest.raises(ValueError, match="timesteps must lie"):
        dbkernels.add_noise(x0, noise, t + 5000, ac)
    dbkernels.add_noise(x0, noise, t + 5000, torch.rand(6000), validate=True)  # in range of a longer schedule


# ------------------------------------------------------------------ GPU

SD_SHAPES = [(2, 4, 64, 64), (2, 4, 128, 128), (3, 4, 37, 41), (1, 4, 9, 7)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_loss_matches_reference_gpu(backend, shape, dtype, prediction_type):
    pred, x0, noise, t, ac = make_inputs(shape, dtype, device="cuda")
    for snr_gamma in (None, 5.0):
        for num_prior in prior_counts(shape[0]):
            assert_close_to_reference(backend, pred, x0, noise, t, ac, prediction_type=prediction_type,
                                      num_prior=num_prior, prior_weight=0.7, snr_gamma=snr_gamma)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_seeded_offset_mixed_dtypes_and_counter(backend):
    pred, x0, _, t, ac = make_inputs((4, 4, 33, 65), torch.bfloat16, device="cuda", seed=9)
    x0 = x0.float()  # mixed precision: bf16 prediction, fp32 latents
    offset = 0.1 * torch.randn(4, 4, device="cuda")
    noise = dbkernels.seeded_noise(x0.shape, 42, device="cuda")
    for pt in PRED_TYPES:
        ls, gs = run(backend, pred, x0, None, t, ac, seed=42, noise_offset=offset, prediction_type=pt, num_prior=2)
        lr, gr = reference_fp32(pred, x0, noise, t, ac, noise_offset=offset, prediction_type=pt, num_prior=2)
        torch.testing.assert_close(ls, lr, rtol=1e-4, atol=0)
        torch.testing.assert_close(gs.float(), gr, rtol=1e-2, atol=1e-2 * gr.abs().max().item())
    with dbkernels.force_backend(backend):
        xt = dbkernels.add_noise(x0, None, t, ac, seed=42, noise_offset=offset)
    torch.testing.assert_close(xt, R.add_noise(x0, noise, t, ac, noise_offset=offset), rtol=1e-5, atol=1e-5)
    torch.cuda.synchronize()
    assert _workspace.ticket_counter(x0.device).item() == 0


@pytest.mark.gpu
def test_gpu_backends_agree_bitwise_on_seeded_noise_and_are_deterministic():
    pred, x0, _, t, ac = make_inputs((8, 4, 64, 64), torch.float32, device="cuda", seed=10)
    outs = {}
    for backend in ("cuda", "triton"):
        with dbkernels.force_backend(backend):
            outs[backend] = dbkernels.add_noise(x0, None, t, ac, seed=5)
        l1, _ = run(backend, pred, x0, None, t, ac, seed=5)
        l2, _ = run(backend, pred, x0, None, t, ac, seed=5)
        assert torch.equal(l1, l2)
    torch.testing.assert_close(outs["cuda"], outs["triton"], rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_gpu_large_batch_and_timestep_edges():
    pred, x0, noise, t, ac = make_inputs((64, 4, 32, 32), torch.bfloat16, device="cuda", seed=11)
    t[0], t[-1] = 0, 999
    for backend in ("cuda", "triton"):
        assert_close_to_reference(backend, pred, x0, noise, t, ac, num_prior=32, snr_gamma=5.0)
