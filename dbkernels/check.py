"""`python -m dbkernels check [--quick]`: is every kernel right on *this* device?

Every usable backend of every op (cuda, triton, reference; on a CPU the Triton kernels
run under the interpreter at small shapes) against the spec, at SD 1.5 and SDXL
shapes on a GPU: attention forward and backward (fp16, bf16, fp32, with and without a
key bias), the fused loss and add_noise (every prediction type, min-SNR, a noise tensor
and seeded noise, offset noise, a mask, huber / smooth_l1), and AdamW8bit / AdamW4bit (a few steps and a
state_dict round trip). Each line says the error and the tolerance:

* fp32: max |got - truth| <= rtol * max |truth| (+ a tiny atol), truth computed in fp32.
* fp16 / bf16: FlashAttention's rule: our max error against the fp32 truth is at most
  twice the error of PyTorch's own computation in that precision, plus one rounding
  unit of the largest value.
* AdamW8bit, AdamW4bit: the state codes may differ from the reference in a few places per tensor
  (divisions and square roots round differently on a GPU; none on a CPU), the
  parameters within the precision of their dtype; a state_dict round trip continues
  bitwise.

Then a short timing of each backend against the PyTorch it replaces (SDPA, the eager
loss of diffusers' recipe, torch's fused AdamW). Exit status 1 on any mismatch.
This is what to run first on a new card, and what a GPU verification run starts with.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import _backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP32_RTOL = 2e-5


@dataclass
class Result:
    op: str
    case: str
    backend: str
    dtype: str
    passed: bool
    error: float | None = None
    tolerance: float | None = None
    ms: float | None = None
    baseline: str | None = None
    baseline_ms: float | None = None
    note: str = ""


# ---------------------------------------------------------------------------- helpers

def _rand(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _max_err(got, truth) -> float:
    return float((got.float() - truth.float()).abs().max())


def _tolerance(truth, lowp, dtype, rtol=FP32_RTOL) -> float:
    """The allowed max error for a result of `dtype` against the fp32 `truth`; `lowp` is PyTorch's
    own computation in `dtype` (ignored for fp32)."""
    scale = float(truth.float().abs().max())
    if dtype == torch.float32:
        return rtol * scale + 1e-6
    return 2 * _max_err(lowp, truth) + torch.finfo(dtype).eps * scale


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, reps=None) -> float:
    """Median milliseconds of fn() (CUDA: triton's do_bench with a short budget)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=5, rep=25, return_mode="median"))
        except ImportError:
            pass
    times = []
    for _ in range(reps or (10 if device.type == "cuda" else 3)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def usable_backends(op: str, device: torch.device) -> list[str]:
    return [b for b in _backend.GPU_PREFERENCE[op] if _backend.unavailable_reason(b, device.type) is None]


def _guard(op, case, backend, dtype, fn) -> Result:
    """fn() -> Result; an exception (a compile error, out of memory, ...) is a failed line."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - report every failure as a line, keep checking the rest
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return Result(op, case, backend, dtype, False, note=msg)


# ---------------------------------------------------------------------------- attention

def _attention_cases(device, quick):
    # (name, B, H, Lq, Lk, D, key bias)
    if device.type != "cuda":
        return [("small self D40 bias", 1, 2, 48, 48, 40, True), ("small cross D64", 1, 1, 33, 77, 64, False)]
    cases = [("sd15 self 64x64 D40", 2, 8, 4096, 4096, 40, False), ("sd15 cross D40", 2, 8, 4096, 77, 40, False),
             ("sdxl self 64x64 D64 bias", 2, 10, 4096, 4096, 64, True)]
    if not quick:
        cases += [("sd15 self 32x32 D80", 2, 8, 1024, 1024, 80, False), ("sd15 cross D160", 2, 8, 256, 77, 160, False),
                  ("sdxl cross 32x32 D64", 2, 20, 1024, 77, 64, False),
                  ("fabric self D80 bias", 2, 8, 1024, 2048, 80, True)]
    return cases


def _diffusers_view(x, h):
    """(B, L, H*D) -> the (B, H, L, D) view a diffusers attention layer passes."""
    b, n, hd = x.shape
    return x.view(b, n, h, hd // h).transpose(1, 2)


def check_attention(device, quick) -> list[Result]:
    from .ops.attention import attention
    from .ops.attention import reference as R

    out = []
    dtypes = ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "fp16"]
    for name, b, h, lq, lk, d, bias in _attention_cases(device, quick):
        for dt in dtypes:
            dtype = DTYPES[dt]
            gen = torch.Generator().manual_seed(lq + d)
            q = _diffusers_view(_rand((b, lq, h * d), dtype, device, gen), h)
            k = _diffusers_view(_rand((b, lk, h * d), dtype, device, gen), h)
            v = _diffusers_view(_rand((b, lk, h * d), dtype, device, gen), h)
            kb = _rand((b, lk), torch.float32, device, gen) if bias else None
            dout = _rand((b, lq, h, d), dtype, device, gen).transpose(1, 2)

            def grads(fn, qq, kk, vv, doutt):
                qq, kk, vv = (x.detach().requires_grad_() for x in (qq, kk, vv))
                o = fn(qq, kk, vv)
                o.backward(doutt)
                return [o.detach(), qq.grad, kk.grad, vv.grad]

            def textbook(qq, kk, vv):
                return R.math_attention(qq, kk, vv, key_bias=kb)

            truth = grads(textbook, q.float(), k.float(), v.float(), dout.float())
            lowp = truth if dtype == torch.float32 else grads(textbook, q, k, v, dout)
            sdpa_mask = None if kb is None else kb[:, None, None, :].to(dtype)
            for backend in usable_backends("attention", device):
                def one(backend=backend):
                    from . import force_backend

                    with force_backend(backend):
                        got = grads(lambda qq, kk, vv: attention(qq, kk, vv, key_bias=kb), q, k, v, dout)
                    errs = [(_max_err(g, t), _tolerance(t, lp, dtype)) for g, t, lp in zip(got, truth, lowp)]
                    worst = max(errs, key=lambda e: e[0] / e[1])
                    ok = all(_finite(g) for g in got) and all(e <= tol for e, tol in errs)
                    res = Result("attention", f"{name} fwd+bwd", backend, dt, ok, worst[0], worst[1])
                    if device.type == "cuda":
                        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))

                        def ours():
                            with force_backend(backend):
                                attention(qq, kk, vv, key_bias=kb).backward(dout)

                        def sdpa():
                            F.scaled_dot_product_attention(qq, kk, vv, attn_mask=sdpa_mask).backward(dout)

                        res.ms, res.baseline, res.baseline_ms = time_ms(ours, device), "SDPA", time_ms(sdpa, device)
                    return res
                out.append(_guard("attention", f"{name} fwd+bwd", backend, dt, one))
    return out


def _finite(x) -> bool:
    return bool(torch.isfinite(x.float()).all())


# ---------------------------------------------------------------------------- loss / add_noise

def _eager_loss(pred, x0, noise, t, ac, num_prior):
    """diffusers' train_dreambooth.py recipe (add_noise, chunk, two mse terms): the baseline's time."""
    a = ac[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
    _ = a * x0 + s * noise
    n = pred.shape[0] - num_prior
    loss = F.mse_loss(pred[:n].float(), noise[:n].float()) + F.mse_loss(pred[n:].float(), noise[n:].float())
    loss.backward()


def _loss_variants(shape, device, gen):
    """(case label, seeded noise + offset, mask / robust-loss arguments) of each loss check."""
    b, _, h, w = shape
    rows_c = (0.05 + torch.rand(b, generator=gen)).to(device)
    return [("", False, {}), (" seeded+offset", True, {}),
            (" mask(B,1,H,W)+huber(c per row)", False,
             dict(mask=torch.rand(b, 1, h, w, generator=gen).to(device), loss_type="huber", huber_c=rows_c)),
            (" mask(1,1,H,W)+smooth_l1", True,
             dict(mask=torch.rand(1, 1, h, w, generator=gen).to(device), loss_type="smooth_l1", huber_c=0.3))]


def check_loss(device, quick) -> list[Result]:
    import dbkernels
    from .ops.diffusion_loss import reference as R

    shapes = ([("sd15 latents 2x4x64x64", (2, 4, 64, 64)), ("sdxl latents 2x4x128x128", (2, 4, 128, 128))]
              if device.type == "cuda" else [("small latents 2x4x8x12", (2, 4, 8, 12))])
    if quick and device.type == "cuda":
        shapes = shapes[:1]
    out = []
    ac = torch.linspace(0.9999, 0.005, 1000).to(device)
    for name, shape in shapes:
        gen = torch.Generator().manual_seed(sum(shape))
        x0 = _rand(shape, torch.float32, device, gen)
        noise = _rand(shape, torch.float32, device, gen)
        t = torch.tensor([3, 977] * (shape[0] // 2), device=device)
        offset = 0.1 * _rand(shape[:2], torch.float32, device, gen)
        for dt in ("fp32", "bf16", "fp16"):
            pred = _rand(shape, DTYPES[dt], device, gen)
            for pt in ("epsilon", "v_prediction", "sample"):
                for label, seeded, robust in _loss_variants(shape, device, gen):
                    kw = dict(prediction_type=pt, num_prior=shape[0] // 2, snr_gamma=5.0,
                              noise_offset=offset if seeded else None, **robust)
                    nz = None if seeded else noise
                    seed = 1234 if seeded else None
                    eff_noise = dbkernels.seeded_noise(shape, 1234, device=device) if seeded else noise
                    r_loss, r_grad = R.loss_and_grad(pred.float(), x0, eff_noise, t, ac, **kw)
                    case = f"{name} {pt}{label}"
                    for backend in usable_backends("diffusion_loss", device):
                        def one(backend=backend):
                            with dbkernels.force_backend(backend):
                                p = pred.detach().requires_grad_()
                                loss = dbkernels.diffusion_loss(p, x0, nz, t, ac, seed=seed, **kw)
                                loss.backward()
                            lowp = r_grad.to(pred.dtype)
                            tol_g = _tolerance(r_grad, lowp, pred.dtype)
                            err_g = _max_err(p.grad, r_grad)
                            err_l = abs(float(loss.detach()) - float(r_loss))
                            tol_l = 1e-5 * abs(float(r_loss)) + 1e-7
                            ok = err_g <= tol_g and err_l <= tol_l and math.isfinite(float(loss.detach()))
                            res = Result("diffusion_loss", case, backend, dt, ok, max(err_g / tol_g, err_l / tol_l),
                                         1.0, note="error / tolerance (loss and gradient)")
                            if device.type == "cuda" and pt == "epsilon" and not label:
                                pp = pred.detach().requires_grad_()

                                def ours():
                                    with dbkernels.force_backend(backend):
                                        xt = dbkernels.add_noise(x0, noise, t, ac, validate=False)
                                        dbkernels.diffusion_loss(pp, xt, noise, t, ac, num_prior=kw["num_prior"],
                                                                 validate=False).backward()

                                res.ms, res.baseline = time_ms(ours, device), "eager loss"
                                res.baseline_ms = time_ms(lambda: _eager_loss(pp, x0, noise, t, ac, kw["num_prior"]),
                                                          device)
                            return res
                        out.append(_guard("diffusion_loss", case, backend, dt, one))
        # add_noise: tensor and seeded noise, with offset
        for seeded in (False, True):
            case = f"{name} add_noise{' seeded+offset' if seeded else ''}"
            eff = dbkernels.seeded_noise(shape, 99, device=device) if seeded else noise
            truth = R.add_noise(x0, eff, t, ac, noise_offset=offset if seeded else None)
            for backend in usable_backends("add_noise", device):
                def one(backend=backend):
                    with dbkernels.force_backend(backend):
                        got = dbkernels.add_noise(x0, None if seeded else noise, t, ac, seed=99 if seeded else None,
                                                  noise_offset=offset if seeded else None)
                    err = _max_err(got, truth)
                    tol = 1e-5 * float(truth.abs().max()) + 1e-6
                    return Result("add_noise", case, backend, "fp32", err <= tol, err, tol)
                out.append(_guard("add_noise", case, backend, "fp32", one))
    return out


# ---------------------------------------------------------------------------- AdamW8bit

def check_adamw8bit(device, quick) -> list[Result]:
    from .optim import AdamW8bit

    return _check_adamw("adamw8bit", AdamW8bit, "min_8bit_size", device)


def check_adamw4bit(device, quick) -> list[Result]:
    from .optim import AdamW4bit

    return _check_adamw("adamw4bit", AdamW4bit, "min_4bit_size", device)


def _check_adamw(op, optimizer, min_size_key, device) -> list[Result]:
    """Every usable backend of `op` (an AdamW8bit-like optimizer) against the reference, 3 steps of
    a few tensors (quantized and fp32 states), then a state_dict round trip that must continue bitwise."""
    sizes = (320 * 320 + 7, 1280 * 1280, 320, 4099) if device.type == "cuda" else (5000, 300, 4099)
    steps = 3
    out = []
    for dt in ("fp32", "bf16", "fp16"):
        dtype = DTYPES[dt]
        gen = torch.Generator().manual_seed(5)
        base = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
        grads = [[torch.randn(n, generator=gen).to(dtype) for n in sizes] for _ in range(2 * steps)]

        def run(backend, dev, n_steps, params=None, opt=None, first=0):
            if params is None:
                params = [torch.nn.Parameter(b.clone().to(dev)) for b in base]
                opt = optimizer(params, lr=1e-2, weight_decay=1e-2, **{min_size_key: 1000})
            from . import force_backend

            with force_backend(backend):
                for s in range(first, first + n_steps):
                    for p, g in zip(params, grads[s]):
                        p.grad = g.to(dev)
                    opt.step()
            return params, opt

        ref_params, ref_opt = run("reference", torch.device("cpu"), steps)
        for backend in usable_backends(op, device):
            def one(backend=backend):
                params, opt = run(backend, device, steps)
                flips, worst = 0, 0.0
                for pr, pg in zip(ref_params, params):
                    sr, sg = ref_opt.state[pr], opt.state[pg]
                    for key in ("state1", "state2"):
                        if key in sr:
                            flips = max(flips, int((sr[key] != sg[key].cpu()).sum()))
                    tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
                    worst = max(worst, _max_err(pg.detach().cpu(), pr.detach()) / (tol * float(pr.detach().abs().max()) + 1e-6))
                allowed = 0 if device.type == "cpu" else max(4, max(sizes) // 20000)
                # state_dict round trip: a copy loaded from the saved state continues bitwise
                sd = opt.state_dict()
                twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
                twin_opt = optimizer(twin, lr=1e-2, weight_decay=1e-2, **{min_size_key: 1000})
                twin_opt.load_state_dict(sd)
                run(backend, device, steps, params, opt, first=steps)
                run(backend, device, steps, twin, twin_opt, first=steps)
                same = all(torch.equal(a, b) for a, b in zip(params, twin))
                ok = flips <= allowed and worst <= 1.0 and same
                res = Result(op, f"{steps} steps, {len(sizes)} tensors + state_dict round trip", backend, dt,
                             ok, worst, 1.0, note=f"{flips} code flips (<= {allowed}); round trip "
                                                  f"{'bitwise' if same else 'DIFFERS'}")
                if device.type == "cuda" and dt == "fp32":
                    ps = [torch.nn.Parameter(b.clone().to(device)) for b in base]
                    for p, g in zip(ps, grads[0]):
                        p.grad = g.to(device)
                    mine = optimizer(ps, lr=1e-2)
                    theirs = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in ps], lr=1e-2,
                                               fused=True)
                    for p, q in zip(ps, theirs.param_groups[0]["params"]):
                        q.grad = p.grad.clone()
                    from . import force_backend

                    def ours():
                        with force_backend(backend):
                            mine.step()

                    res.ms, res.baseline, res.baseline_ms = time_ms(ours, device), "torch fused AdamW", time_ms(
                        theirs.step, device)
                return res
            out.append(_guard(op, "steps", backend, dt, one))
    return out


# ---------------------------------------------------------------------------- CLI

def _print(results):
    print(f"{'op':<15}{'case':<48}{'backend':<11}{'dtype':<6}{'error':>11}{'tolerance':>11}  "
          f"{'result':<6}{'ms':>9}{'baseline':>22}")
    for r in results:
        err = f"{r.error:.3g}" if r.error is not None else "-"
        tol = f"{r.tolerance:.3g}" if r.tolerance is not None else "-"
        ms = f"{r.ms:.3f}" if r.ms is not None else "-"
        base = f"{r.baseline} {r.baseline_ms:.3f}" if r.baseline_ms is not None else "-"
        print(f"{r.op:<15}{r.case[:47]:<48}{r.backend:<11}{r.dtype:<6}{err:>11}{tol:>11}  "
              f"{'PASS' if r.passed else 'FAIL':<6}{ms:>9}{base:>22}{'  ' + r.note if r.note else ''}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dbkernels check", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes (on a CPU the shapes are small anyway)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--op", action="append", choices=["attention", "diffusion_loss", "adamw8bit", "adamw4bit"],
                   help="only these ops (default: all)")
    p.add_argument("--json", default=None, help="also write the results as JSON lines to this file")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("dbkernels check: --device cuda but no CUDA device is visible", file=sys.stderr)
            return 2
        if device.index is not None:
            torch.cuda.set_device(device)
        name = torch.cuda.get_device_name(device)
    else:
        name = "CPU" + (" (Triton kernels under the interpreter)" if _backend.triton_interpreting() else "")
    ops = ("attention", "diffusion_loss", "adamw8bit", "adamw4bit")
    print(f"dbkernels check on {device} ({name}); backends: " + ", ".join(
        f"{op}: {'/'.join(usable_backends(op, device))}" for op in ops), flush=True)
    t0 = time.perf_counter()
    results = []
    checks = {"attention": check_attention, "diffusion_loss": check_loss, "adamw8bit": check_adamw8bit,
              "adamw4bit": check_adamw4bit}
    for op, fn in checks.items():
        if a.op and op not in a.op:
            continue
        t_op = time.perf_counter()
        part = fn(device, a.quick)
        results += part
        print(f"  {op}: {sum(r.passed for r in part)}/{len(part)} passed in {time.perf_counter() - t_op:.0f} s",
              flush=True)
    _print(results)
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)}/{len(results)} passed on {name} in {time.perf_counter() - t0:.0f} s"
          + (f"; {len(failed)} FAILED" if failed else ""))
    if a.json:
        with open(a.json, "a") as f:
            for r in results:
                f.write(json.dumps(dict(asdict(r), device=name)) + "\n")
    return 1 if failed else 0
