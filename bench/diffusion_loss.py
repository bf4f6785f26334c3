"""Benchmark suite `loss` (op `diffusion_loss`): the DreamBooth noising + loss step.

One step = add_noise (x_t from x0, noise, t; the UNet input) + the loss of a
prediction `pred` (a leaf tensor standing in for the UNet output) + in "full" mode
loss.backward() w.r.t. pred. "fwd" mode is add_noise + loss forward, pred without
requires_grad.

Providers
  dbkernels-triton     dbkernels.add_noise / dbkernels.diffusion_loss, force_backend("triton")
  dbkernels-cuda       the same under force_backend("cuda")
  dbkernels-reference  the same under force_backend("reference") (default on CPU only)
  eager                the diffusers train_dreambooth.py recipe in plain PyTorch
  torch.compile        torch.compile(eager recipe), default mode (on CPU only if asked)
  eager-stock          the recipe exactly as upstream (prior half NOT min-SNR weighted),
                       only with --providers; checked against its own semantics

Every provider's loss, gradient and x_t are checked against the pure-PyTorch
reference (dbkernels/ops/diffusion_loss/reference.py) before it is timed; a provider
that disagrees is reported and skipped.

About the eager recipe and min-SNR with prior preservation: upstream diffusers
computes the prior-preservation term as a plain MSE before the min-SNR branch, so
with --snr_gamma the prior half is unweighted (and the weights were computed from
the timesteps of the whole batch, a shape bug later fixed by chunking them). Our
spec weights every row, the class rows with their own timesteps. The `eager`
provider therefore applies compute_snr-style weights to both halves (one extra
stack/min/div/mean on B/2 rows) so it computes the same function as the kernels;
`eager-stock` keeps the upstream semantics for comparison. Without snr_gamma both
are identical.

Loss variants (--losses): "l2" (the recipe), "mask" (a (B, 1, H, W) fp32 mask at latent
resolution, kohya's --masked_loss), "huber" / "smooth_l1" (kohya's and diffusers'
pseudo-Huber losses, c = 0.1) and their "mask+" forms. The eager providers write them
as kohya does: conditional_loss(reduction="none") * mask, a mean per row; the fused
kernel still does it in one launch.

Bytes model (identical for all providers, so GB/s compare): full = add_noise reads
x0, noise and writes x_t (3N) + the loss reads pred, x0, noise and writes the grad
(4N) = 7 N elt; fwd = 3N + 3N = 6 N elt; a mask adds one fp32 read of N / C elements.

This module holds the suite's options, the timing of each provider and the rows; the
recipe, the cases, the reference truth, the providers and the pre-timing check are in
bench/loss_providers.py.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch

from . import common
from .loss_providers import (LOSS_VARIANTS, Case, Inputs, Provider, Skip, Truth, _step, check_provider,
                             make_inputs, make_providers, reference_truth)

OP = "diffusion_loss"
ALIASES = ("loss", "diffusion_loss")

SHAPES = {
    "sd15": (2, 4, 64, 64),      # SD 1.5 latents at 512 px, batch 1 instance + 1 class
    "sdxl": (2, 4, 128, 128),    # SDXL latents at 1024 px
    "bw": (64, 4, 128, 128),     # big enough to be bandwidth-bound
}
QUICK_SHAPES = {"tiny": (2, 4, 8, 8)}
MODES = ("full", "fwd")
SNR_GAMMAS = (5.0, None)
LOSSES = ("l2", "mask", "huber", "mask+huber")

GPU_DEFAULT_PROVIDERS = ("eager", "torch.compile", "dbkernels-triton", "dbkernels-cuda")
CPU_DEFAULT_PROVIDERS = ("eager", "dbkernels-reference")
ALL_PROVIDERS = ("eager", "eager-stock", "torch.compile", "dbkernels-triton", "dbkernels-cuda",
                 "dbkernels-reference")


# ---------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Measurement:
    provider: str
    case: Case
    mode: str
    ms: tuple[float, float, float]
    peak_bytes: int | None
    launches: int | None
    check: dict[str, float]



def measure(provider: Provider, fn, case: Case, inp: Inputs, truth: Truth, mode: str,
            device: torch.device, budget: common.TimingBudget) -> Measurement:
    check = check_provider(fn, case, inp, truth, mode)
    step, grads = _step(fn, inp, mode)
    ms = common.time_ms(step, device, budget, grad_to_none=grads)
    peak = common.peak_bytes(step, device, grad_to_none=grads)
    launches = common.count_launches(step, device, grad_to_none=grads)
    inp.pred.grad = None
    return Measurement(provider.name, case, mode, ms, peak, launches, check)


# ---------------------------------------------------------------------------------
# Suite entry points
# ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=None,
                        help=f"comma list of names ({', '.join(SHAPES)}) or BxCxHxW; "
                             f"default all (--quick: {', '.join(QUICK_SHAPES)})")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of full,fwd (default both)")
    parser.add_argument("--snr-gamma", default="5,none",
                        help="comma list of min-SNR gammas, 'none' for no weighting (default 5,none)")
    parser.add_argument("--losses", default=",".join(LOSSES),
                        help=f"comma list of loss variants from {', '.join(LOSS_VARIANTS)} "
                             f"(default {','.join(LOSSES)})")


def _parse_shapes(text: str | None, quick: bool) -> dict[str, tuple[int, ...]]:
    if not text:
        return dict(QUICK_SHAPES if quick else SHAPES)
    out = {}
    known = {**SHAPES, **QUICK_SHAPES}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part in known:
            out[part] = known[part]
            continue
        try:
            dims = tuple(int(d) for d in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"--shapes: {part!r} is neither one of {sorted(known)} nor BxCxHxW") from None
        if len(dims) < 2 or min(dims) < 1:
            raise ValueError(f"--shapes: {part!r} needs at least two positive dims (batch first)")
        out[part] = dims
    return out


def _parse_losses(text: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in LOSS_VARIANTS]
    if bad or not out:
        raise ValueError(f"--losses: unknown {bad}; choose from {list(LOSS_VARIANTS)}")
    return out


def _parse_snr(text: str) -> list[float | None]:
    out: list[float | None] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if part:
            out.append(None if part in ("none", "off", "null") else float(part))
    return out


def default_providers(device: torch.device, quick: bool) -> tuple[str, ...]:
    if device.type == "cpu":
        return CPU_DEFAULT_PROVIDERS
    return GPU_DEFAULT_PROVIDERS + (("dbkernels-reference",) if quick else ())


def run(opts: argparse.Namespace, writer: common.ResultWriter) -> int:
    """Run the suite; rows go to writer. Returns the exit code (1 if a provider was wrong)."""
    device: torch.device = opts.device
    dtypes = opts.dtypes or [torch.bfloat16, torch.float32]
    names = list(opts.providers or default_providers(device, opts.quick))
    unknown = [n for n in names if n not in ALL_PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {list(ALL_PROVIDERS)}")
    if "eager" in names:  # eager first: the others' speedups are relative to it
        names.remove("eager")
        names.insert(0, "eager")
    modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"--modes: unknown {bad}; choose from {list(MODES)}")
    common.use_triton_interpreter_on_cpu(device, names)
    shapes = _parse_shapes(opts.shapes, opts.quick)
    gammas = _parse_snr(opts.snr_gamma)
    losses = _parse_losses(getattr(opts, "losses", "l2"))
    budget = common.QUICK_BUDGET if opts.quick else common.TimingBudget()
    env = common.environment(device)
    providers = make_providers()

    print(f"[bench {OP}] device={env['device']} torch={env['torch']} triton={env['triton']} "
          f"cuda={env['cuda']} git={env['git_sha']} providers={','.join(names)}")
    unavailable: dict[str, str] = {}
    failures: list[str] = []
    measurements: list[Measurement] = []

    for shape_name, shape in shapes.items():
        for dtype in dtypes:
            for gamma, loss in ((g, v) for v in losses for g in gammas):
                case = Case(shape_name, tuple(shape), dtype, gamma, loss=loss)
                inp = make_inputs(case, device)
                truths: dict[str, Truth] = {}
                case_results: dict[str, dict[str, Measurement]] = {m: {} for m in modes}
                for name in names:
                    if name in unavailable:
                        continue
                    prov = providers[name]
                    if prov.semantics not in truths:
                        truths[prov.semantics] = reference_truth(case, inp, prov.semantics)
                    label = f"{name} {common.shape_str(shape)} {common.dtype_name(dtype)} [{case.variant}]"
                    try:
                        with prov.context():
                            fn = prov.make(case, inp)
                            for mode in modes:
                                try:
                                    m = measure(prov, fn, case, inp, truths[prov.semantics], mode, device, budget)
                                except AssertionError as exc:
                                    msg = f"WRONG RESULT, skipped: {label} {mode}: {exc}"
                                    print(f"  {msg}")
                                    failures.append(msg)
                                    continue
                                case_results[mode][name] = m
                    except Skip as exc:
                        unavailable[name] = str(exc)
                        print(f"  skip {name}: {exc}")
                    except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the others
                        if common.is_backend_unavailable(exc):
                            unavailable[name] = str(exc)
                            print(f"  skip {name}: {exc}")
                        else:
                            msg = f"ERROR, skipped: {label}: {type(exc).__name__}: {exc}"
                            print(f"  {msg}")
                            failures.append(msg)
                    inp.pred.grad = None
                for mode in modes:
                    eager = case_results[mode].get("eager")
                    for m in case_results[mode].values():
                        row = _row(m, eager, env)
                        writer.write(row)
                        measurements.append(m)
                del inp, truths
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    print_summary([r for r in writer.written if r["op"] == OP and r["run_id"] == env["run_id"]])
    if unavailable:
        print("skipped providers: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    if failures:
        print(f"{len(failures)} provider/case combination(s) failed; their rows were not written")
        return 1
    return 0


def _row(m: Measurement, eager: Measurement | None, env: dict[str, Any]) -> dict[str, Any]:
    case = m.case
    speedup = eager.ms[1] / m.ms[1] if eager is not None and m.ms[1] > 0 else None
    launches_vs = (m.launches / eager.launches
                   if eager is not None and m.launches is not None and eager.launches else None)
    extras = {
        "shape_name": case.shape_name,
        "numel": case.numel,
        "bytes_model": case.bytes_model(m.mode),
        "prediction_type": case.prediction_type,
        "snr_gamma": case.snr_gamma,
        "loss_variant": case.loss,
        "masked": case.masked,
        "loss_type": case.loss_type,
        "num_prior": case.num_prior,
        "prior_weight": case.prior_weight,
        "speedup_vs_eager": speedup,
        "launches_vs_eager": launches_vs,
        "check": m.check,
    }
    return common.make_row(op=OP, provider=m.provider, shape=case.shape, dtype=case.dtype, mode=m.mode,
                           variant=case.variant, ms=m.ms, env=env, bytes_moved=case.bytes_model(m.mode),
                           peak_mem=m.peak_bytes, launches=m.launches, extras=extras)


def print_summary(rows: list[dict[str, Any]]) -> None:
    """One compact table: provider x shape per (mode, dtype, variant)."""
    if not rows:
        print("no rows written")
        return
    from .report import _sort_key

    headers = ["mode", "dtype", "variant", "shape", "provider", "ms p50", "GB/s", "%peak", "launches",
               "peak MiB", "vs eager"]
    table = []
    for r in sorted(rows, key=_sort_key):
        frac = r["frac_peak_bw"]
        speedup = r["extras"].get("speedup_vs_eager")
        table.append([
            r["mode"], r["dtype"], r["variant"], common.shape_str(r["shape"]), r["provider"],
            common.fmt(r["ms_p50"], ".4f"), common.fmt(r["gbps"], ".4g"),
            common.fmt(frac * 100 if frac is not None else None, ".1f"), common.fmt(r["launches"], "d"),
            common.fmt(r["peak_bytes"] / 2**20 if r["peak_bytes"] is not None else None, ".1f"),
            common.fmt(speedup, ".2f") + "x" if speedup is not None else "-",
        ])
    print(f"\n{OP} on {rows[0]['device']} (git {rows[0]['git_sha']})")
    print(common.render_table(headers, table))
