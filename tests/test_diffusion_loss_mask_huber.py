"""diffusion_loss with a mask and the robust losses (huber, smooth_l1): the spec against a
plain eager formula, every backend against the spec, and the bad inputs.

The eager formula is written the way kohya's train_util.conditional_loss and its masked
loss write it (fp64, autograd for the gradient); the reference (reference.py) is the spec;
the Triton kernels run under the interpreter on CPU and the CUDA kernels on a GPU.
"""
import pytest
import torch

import dbkernels
from dbkernels.ops.diffusion_loss import op as loss_op
from dbkernels.ops.diffusion_loss import reference as R

SD_ALPHAS = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0).float()
LOSS_TYPES = R.LOSS_TYPES
PRED_TYPES = R.PREDICTION_TYPES
SHAPE = (3, 4, 9, 7)  # 189 elements per channel, 252 per row: no block size divides it
# mask shapes broadcast to SHAPE; a wrong row / channel stride in a kernel shows on each of them
MASK_SHAPES = [(3, 1, 9, 7), (3, 4, 9, 7), (1, 1, 9, 7), (3, 1, 1, 1), (1, 4, 1, 1), (4, 1, 7)]
ULP = {torch.float32: 2 ** -23, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


def make_inputs(shape=SHAPE, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    pred, x0, noise = (torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    t = torch.randint(0, 1000, (shape[0],), generator=g).to(device)
    return pred, x0, noise, t, SD_ALPHAS.to(device)


def make_mask(mshape, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(mshape, generator=g).to(device)


def row_c(batch, seed=2, device="cpu"):
    """Distinct c per row, from small to large against |e| ~ 1 (both regimes of the pseudo-Huber)."""
    g = torch.Generator().manual_seed(seed)
    return (0.02 + 2.0 * torch.rand(batch, generator=g)).to(device)


def run(backend, pred, x0, noise, t, ac, **kw):
    pred = pred.detach().clone().requires_grad_(True)
    with dbkernels.force_backend(backend):
        loss = dbkernels.diffusion_loss(pred, x0, noise, t, ac, **kw)
    loss.backward()
    return loss.detach(), pred.grad


def eager(pred, x0, noise, t, ac, *, prediction_type="epsilon", num_prior=0, prior_weight=1.0, snr_gamma=None,
          mask=None, loss_type="l2", huber_c=0.1):
    """kohya's conditional_loss + masked loss, in fp64 with autograd: (loss, d loss / d pred)."""
    p = pred.detach().double().requires_grad_(True)
    abar = ac.double()[t].reshape(-1, 1, 1, 1)
    eps, x = noise.double(), x0.double()
    target = {"epsilon": eps, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x, "sample": x}[prediction_type]
    c = huber_c.double().reshape(-1, 1, 1, 1) if isinstance(huber_c, torch.Tensor) else huber_c
    if loss_type == "l2":
        el = torch.nn.functional.mse_loss(p, target, reduction="none")
    elif loss_type == "huber":
        el = 2 * c * (torch.sqrt((p - target) ** 2 + c ** 2) - c)
    else:
        el = 2 * (torch.sqrt((p - target) ** 2 + c ** 2) - c)
    if mask is not None:
        el = el * mask.double()
    rows = el.mean([1, 2, 3])  # the plain mean over the row: the mask's mean is not divided out
    w = R.snr_weights(ac[t], prediction_type, snr_gamma).double()
    scale = R.sample_scales(pred.shape[0], num_prior, prior_weight, pred.device).double()
    loss = (scale * w * rows).sum()
    loss.backward()
    return loss.detach(), p.grad


# ------------------------------------------------------------------ the spec

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_reference_is_kohyas_formula(loss_type, prediction_type):
    pred, x0, noise, t, ac = make_inputs()
    for mshape in (None, *MASK_SHAPES):
        mask = None if mshape is None else make_mask(mshape)
        for c in (0.1, row_c(3)):
            kw = dict(prediction_type=prediction_type, num_prior=1, prior_weight=0.7, snr_gamma=5.0, mask=mask,
                      loss_type=loss_type, huber_c=c)
            want_loss, want_grad = eager(pred, x0, noise, t, ac, **kw)
            # the spec's autograd function and its closed-form gradient (what the kernels compute)
            p = pred.clone().requires_grad_(True)
            loss = R.diffusion_loss(p, x0, noise, t, ac, **kw)
            loss.backward()
            loss2, grad2 = R.loss_and_grad(pred, x0, noise, t, ac, **kw)
            for lv, gv in ((loss, p.grad), (loss2, grad2)):
                torch.testing.assert_close(lv.double(), want_loss, rtol=2e-6, atol=0)
                torch.testing.assert_close(gv.double(), want_grad, rtol=1e-5, atol=1e-6 * want_grad.abs().max().item())


def test_huber_limits_and_cancellation_free_form():
    """huber -> e^2 for |e| << c (and its gradient 2e), -> 2c|e| for |e| >> c; no cancellation at tiny e."""
    e = torch.tensor([1e-6, 1e-3, 0.05, 3.0, 1e4])
    c = 0.5
    hub = R.elementwise_loss(e, "huber", c)
    torch.testing.assert_close(hub[:2], e[:2] ** 2, rtol=1e-5, atol=0)  # the direct form gives 0 at 1e-6
    assert hub[0] > 0
    torch.testing.assert_close(hub[-1], 2 * c * e[-1] - 2 * c * c, rtol=1e-6, atol=0)
    torch.testing.assert_close(R.elementwise_grad(e, "huber", c)[:2], 2 * e[:2], rtol=1e-5, atol=0)
    torch.testing.assert_close(R.elementwise_loss(e, "smooth_l1", c), hub / c)
    e64 = e.double()
    exact = 2 * c * e64 ** 2 / (torch.sqrt(e64 ** 2 + c ** 2) + c)  # fp64, no cancellation either
    torch.testing.assert_close(hub.double(), exact, rtol=4e-7, atol=0)
    direct32 = 2 * c * (torch.sqrt(e ** 2 + c ** 2) - c)  # what the division form avoids
    assert direct32[0] == 0


def test_mask_semantics_weighted_not_renormalised():
    pred, x0, noise, t, ac = make_inputs()
    full = dbkernels.diffusion_loss(pred, x0, noise, t, ac, num_prior=1)
    half = dbkernels.diffusion_loss(pred, x0, noise, t, ac, num_prior=1, mask=torch.full((1, 1, 9, 7), 0.5))
    torch.testing.assert_close(half, 0.5 * full)  # a plain weight: half the mask, half the loss
    # zero the class rows' mask: only the instance term is left
    rows = torch.tensor([1.0, 1.0, 0.0]).reshape(3, 1, 1, 1)
    inst = dbkernels.diffusion_loss(pred, x0, noise, t, ac, num_prior=1, mask=rows)
    torch.testing.assert_close(inst, torch.nn.functional.mse_loss(pred[:2], noise[:2]))
    # a mask of ones on half the pixels: the mean over all pixels (kohya), not over the kept ones
    keep = torch.zeros(1, 1, 9, 7)
    keep[..., :4, :] = 1
    got = dbkernels.diffusion_loss(pred, x0, noise, t, ac, mask=keep)
    torch.testing.assert_close(got, ((pred - noise) ** 2 * keep).mean())


def test_per_row_c_is_each_rows_own_c():
    pred, x0, noise, t, ac = make_inputs()
    c = row_c(3)
    for loss_type in ("huber", "smooth_l1"):
        got = R.per_sample_loss(pred, x0, noise, t, ac, loss_type=loss_type, huber_c=c)
        for i in range(3):
            one = R.per_sample_loss(pred[i:i + 1], x0[i:i + 1], noise[i:i + 1], t[i:i + 1], ac,
                                    loss_type=loss_type, huber_c=float(c[i]))
            torch.testing.assert_close(got[i], one[0], rtol=1e-6, atol=0)


# ------------------------------------------------------------------ backends against the spec

def assert_matches_reference(backend, pred, x0, noise, t, ac, **kw):
    loss, grad = run(backend, pred, x0, noise, t, ac, **kw)
    want_loss, want_grad = run("reference", pred, x0, noise, t, ac, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == pred.dtype and grad.shape == pred.shape
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=1e-9)
    # both round the same fp32 gradient into pred's dtype: at most a rounding apart (fp32: a few ulp)
    ulp = ULP[pred.dtype] * (4 if pred.dtype == torch.float32 else 1)
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=ulp, atol=ulp * want_grad.abs().max().item())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("prediction_type", PRED_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_matches_reference_cpu(cpu_triton, loss_type, prediction_type, dtype):
    pred, x0, noise, t, ac = make_inputs(dtype=dtype)
    x0 = x0.float()  # mixed precision as in training: a low-precision prediction, fp32 latents
    cases = [(m, c, n) for m in (None, *MASK_SHAPES) for c in (0.1, row_c(3)) for n in (0, 1, 3)]
    # every 4th of the mask x c x prior-count grid: each mask shape, both kinds of c, all prior counts
    for mshape, c, num_prior in cases[::4]:
        mask = None if mshape is None else make_mask(mshape)
        assert_matches_reference(cpu_triton, pred, x0, noise, t, ac, prediction_type=prediction_type,
                                 num_prior=num_prior, prior_weight=0.7, snr_gamma=5.0, mask=mask,
                                 loss_type=loss_type, huber_c=c)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_every_mask_shape_and_c_on_odd_sizes(backend, request):
    """All mask layouts x c kinds, seeded noise + offset, on a row that spans several blocks with a tail."""
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    shape = (2, 4, 37, 41)
    pred, x0, _, t, ac = make_inputs(shape)
    off = 0.1 * torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    for mshape in ((2, 1, 37, 41), (1, 4, 37, 41), (1, 1, 1, 41), (2, 4, 1, 1)):
        for loss_type, c in (("huber", row_c(2)), ("smooth_l1", 0.3), ("l2", 0.1)):
            kw = dict(prediction_type="v_prediction", num_prior=1, mask=make_mask(mshape), loss_type=loss_type,
                      huber_c=c, seed=77, noise_offset=off)
            loss, grad = run(backend, pred, x0, None, t, ac, **kw)
            noise = dbkernels.seeded_noise(shape, 77)
            kw.pop("seed")
            want_loss, want_grad = eager(pred, x0, noise + off[:, :, None, None], t, ac,
                                         **{k: v for k, v in kw.items() if k != "noise_offset"})
            torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=0)
            torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-5 * want_grad.abs().max().item())


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_ones_mask_is_bitwise_the_unmasked_loss(backend, loss_type, request):
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    for dtype in (torch.float32, torch.bfloat16):
        for pt in PRED_TYPES:
            pred, x0, noise, t, ac = make_inputs(dtype=dtype, seed=4)
            kw = dict(prediction_type=pt, num_prior=1, snr_gamma=5.0, loss_type=loss_type, huber_c=row_c(3))
            loss, grad = run(backend, pred, x0, noise, t, ac, **kw)
            for ones in ((3, 1, 9, 7), (1, 1, 1, 1), (3, 4, 9, 7), (9, 7)):
                lm, gm = run(backend, pred, x0, noise, t, ac, mask=torch.ones(ones), **kw)
                assert torch.equal(lm, loss) and torch.equal(gm, grad), (dtype, pt, ones)


def test_l2_without_mask_keeps_its_bits(cpu_triton):
    """loss_type='l2' with no mask is today's kernel: huber_c is ignored and changes nothing."""
    pred, x0, noise, t, ac = make_inputs(seed=5)
    for backend in ("reference", cpu_triton):
        a = run(backend, pred, x0, noise, t, ac, num_prior=1)
        b = run(backend, pred, x0, noise, t, ac, num_prior=1, loss_type="l2", huber_c=row_c(3))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_custom_op_opcheck_and_compile_with_mask_and_rows():
    pred, x0, noise, t, ac = make_inputs((2, 4, 5, 3))
    mask = torch.rand(2, 1, 15)
    torch.library.opcheck(loss_op._loss_fwd_op, (pred, x0, noise, None, t, ac, 1, 1, 0.5, 5.0, 0, True,
                                                 mask, 1, 0.1, torch.rand(2) + 0.1))
    torch.library.opcheck(loss_op._loss_fwd_op, (pred, x0, noise, None, t, ac, 0, 0, 1.0, -1.0, 0, False,
                                                 None, 2, 0.3, None))
    m4, c = torch.rand(2, 1, 5, 3), torch.rand(2) + 0.1

    def step(p):
        return dbkernels.diffusion_loss(p, x0, noise, t, ac, num_prior=1, mask=m4, loss_type="huber", huber_c=c)

    p1, p2 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    l1 = torch.compile(step, backend="aot_eager", fullgraph=True)(p1)
    l1.backward()
    l2 = step(p2)
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(p1.grad, p2.grad)


# ------------------------------------------------------------------ bad input

def _call(**over):
    pred, x0, noise, t, ac = make_inputs((2, 4, 4, 4))
    kw = dict(over)
    return lambda: dbkernels.diffusion_loss(pred, x0, noise, t, ac, **kw)


@pytest.mark.parametrize("over, exc, match", [
    (dict(mask=torch.ones(2, 3, 4, 4)), ValueError, r"mask must broadcast to pred's shape \(2, 4, 4, 4\).*got \(2, 3, 4, 4\)"),
    (dict(mask=torch.ones(2, 1, 4, 5)), ValueError, r"mask must broadcast .*got \(2, 1, 4, 5\)"),
    (dict(mask=torch.ones(1, 2, 1, 4, 4)), ValueError, r"mask must broadcast"),
    (dict(mask=torch.ones(2, 1, 4, 4, dtype=torch.bool)), ValueError, r"mask must be a floating-point tensor.*torch.bool"),
    (dict(mask=torch.ones(2, 1, 4, 4, dtype=torch.int64)), ValueError, r"mask must be a floating-point"),
    (dict(mask=torch.ones(2, 1, 4, 4, device="meta")), ValueError, r"mask is on meta but pred is on cpu"),
    (dict(mask=torch.ones(2, 1, 4, 4, requires_grad=True)), ValueError, r"pred only, but mask requires grad"),
    (dict(mask=[1.0]), TypeError, r"mask must be a torch.Tensor"),
    (dict(loss_type="l1"), ValueError, r"loss_type must be one of \('l2', 'huber', 'smooth_l1'\), got 'l1'"),
    (dict(loss_type="huber", huber_c=0.0), ValueError, r"huber_c must be a positive finite float"),
    (dict(loss_type="huber", huber_c=-1), ValueError, r"huber_c must be a positive"),
    (dict(loss_type="huber", huber_c=float("nan")), ValueError, r"huber_c must be a positive"),
    (dict(loss_type="huber", huber_c="0.1"), TypeError, r"huber_c must be a float or a \(B,\) tensor"),
    (dict(loss_type="huber", huber_c=torch.ones(3)), ValueError, r"huber_c must be .* \(2,\) tensor.*got shape \(3,\)"),
    (dict(loss_type="huber", huber_c=torch.ones(2, dtype=torch.int64)), TypeError, r"huber_c must be .*floating"),
    (dict(loss_type="huber", huber_c=torch.tensor([0.1, -0.2])), ValueError, r"huber_c must be > 0 in every row"),
    (dict(loss_type="huber", huber_c=torch.ones(2, device="meta")), ValueError, r"huber_c is on meta"),
    (dict(loss_type="huber", huber_c=torch.ones(2, requires_grad=True)), ValueError, r"huber_c requires grad"),
])
def test_bad_mask_and_huber_c_name_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)()


def test_mask_under_no_grad_and_two_dim_pred():
    pred, x0, noise, t, ac = make_inputs((2, 4, 4, 4))
    with torch.no_grad():  # a mask that requires grad is fine where nothing is differentiated
        dbkernels.diffusion_loss(pred, x0, noise, t, ac, mask=torch.ones(2, 1, 4, 4, requires_grad=True))
    p2, x2, n2 = pred.reshape(2, 64), x0.reshape(2, 64), noise.reshape(2, 64)
    m = make_mask((2, 1))
    loss, grad = run("reference", p2, x2, n2, t, ac, mask=m, loss_type="huber")
    want_loss, want_grad = run("reference", pred, x0, noise, t, ac, mask=m.reshape(2, 1, 1, 1), loss_type="huber")
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad.reshape(pred.shape), want_grad)


# ------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_mask_and_robust_losses_match_reference(backend, dtype):
    for shape in ((2, 4, 64, 64), (3, 4, 37, 41)):
        pred, x0, noise, t, ac = make_inputs(shape, dtype, device="cuda")
        b, _, h, w = shape
        for loss_type in LOSS_TYPES:
            for mshape in ((b, 1, h, w), (1, 1, h, w), (b, 4, h, w), (b, 1, 1, 1)):
                for c in (0.1, row_c(b, device="cuda")):
                    for pt in PRED_TYPES:
                        assert_matches_reference(backend, pred, x0.float(), noise, t, ac, prediction_type=pt,
                                                 num_prior=1, snr_gamma=5.0, mask=make_mask(mshape, device="cuda"),
                                                 loss_type=loss_type, huber_c=c)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_ones_mask_is_bitwise_the_unmasked_loss(backend):
    pred, x0, noise, t, ac = make_inputs((4, 4, 64, 64), torch.bfloat16, device="cuda", seed=6)
    for loss_type in LOSS_TYPES:
        kw = dict(num_prior=2, snr_gamma=5.0, loss_type=loss_type, huber_c=row_c(4, device="cuda"))
        loss, grad = run(backend, pred, x0, noise, t, ac, **kw)
        for ones in ((4, 1, 64, 64), (1, 1, 1, 1), (4, 4, 64, 64)):
            lm, gm = run(backend, pred, x0, noise, t, ac, mask=torch.ones(ones, device="cuda"), **kw)
            assert torch.equal(lm, loss) and torch.equal(gm, grad), (loss_type, ones)
