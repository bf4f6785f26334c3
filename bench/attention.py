"""Benchmark suite `attention`: every attention call of one SD1.5 / SDXL UNet forward.

Shapes come from the UNet configs (UNET_CONFIGS, the values of the public SD1.5 and
SDXL unet/config.json): unet_attention_calls() walks the down / mid / up blocks and
counts each (B, H, Lq, Lk, D) the forward makes. SD1.5 at 512x512, batch 2: self
4096x4096 D=40, 1024 D=80, 256 and 64 D=160, cross with Lk=77 (16 + 16 calls);
SDXL at 1024x1024, batch 2: D=64 at 4096 and 1024 tokens (70 + 70 calls).

Modes: fwd (out = attn(q, k, v)) and full (forward + out.backward(dout)). q, k, v are
the (B, L, H, D) projections viewed as (B, H, L, D), as diffusers hands them over.

Providers
  dbkernels-triton     dbkernels.attention under force_backend("triton")
  dbkernels-reference  the same under force_backend("reference") (CPU smoke default)
  sdpa-flash / sdpa-efficient / sdpa-cudnn / sdpa-math
                       torch.nn.functional.scaled_dot_product_attention restricted to one
                       backend with torch.nn.attention.sdpa_kernel; a backend that rejects
                       a shape is skipped for it (noted, not a failure)
  flash-attn           flash_attn.flash_attn_func on the (B, L, H, D) tensors, if installed
  xformers             xformers.ops.memory_efficient_attention, if installed

Every provider's output (and in full mode dq, dk, dv) is checked against the fp32
reference (dbkernels/ops/attention/reference.py) before timing. FLOPs: fwd = 4 B H Lq
Lk D, full = 3.5x that. Each row's extras carry the number of calls of the shape in
one UNet forward and the ratio to the best baseline (fastest non-dbkernels provider)
for that shape. Per model and mode, one more row per provider (variant
"<model>-unet-total", shape [batch, res, res]) holds the time-weighted total
sum(calls * ms). The issue's targets (full mode, SD1.5): total <= 0.9x the best SDPA
backend's total, and no shape slower than 1.1x its best baseline; the summary says
whether they are met.

This module holds the UNet configs and the shapes derived from them, the suite's options,
the run over models, dtypes and shapes, and the rows, totals and summary; the providers,
inputs, reference truth, check and measurement are in bench/attention_providers.py.
"""
from __future__ import annotations

import argparse
import collections
from typing import Any, Callable

import torch

from . import common
from .attention_providers import (AttnShape, Measurement, Skip, _is_rejection, is_baseline, make_inputs,
                                  make_providers, measure, reference_truth)

OP = "attention"
MODES = ("full", "fwd")

# The parts of the public unet/config.json files that fix the attention shapes.
# attention_head_dim is diffusers' (historical) name for the number of heads there.
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(resolution=512, batch=2, text_len=77, vae_scale_factor=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 attention_head_dim=8, transformer_layers_per_block=1),
    "sdxl": dict(resolution=1024, batch=2, text_len=77, vae_scale_factor=8,
                 block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10)),
}
# CPU smoke: a tiny UNet-like config (D = 40 and 80, 64 and 16 tokens).
QUICK_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(resolution=64, batch=1, text_len=13, vae_scale_factor=8,
                 block_out_channels=(80, 160), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 attention_head_dim=2, transformer_layers_per_block=1),
}

GPU_DEFAULT_PROVIDERS = ("dbkernels-triton", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flash-attn",
                         "xformers")
CPU_DEFAULT_PROVIDERS = ("dbkernels-reference", "dbkernels-triton", "sdpa-math")
ALL_PROVIDERS = ("dbkernels-triton", "dbkernels-reference", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
                 "sdpa-math", "flash-attn", "xformers")
SDPA_PROVIDERS = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn")


# ---------------------------------------------------------------------------------
# Shapes from the UNet config
# ---------------------------------------------------------------------------------


def _per_level(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def unet_attention_calls(cfg: dict[str, Any]) -> "collections.Counter[AttnShape]":
    """How many times one UNet forward calls attention with each shape.

    Level i (block i of the down path) works at latent/2^i tokens per side with
    block_out_channels[i] channels split over attention_head_dim[i] heads. A
    CrossAttn down block has layers_per_block transformer stacks, an up block one
    more, the mid block one at the last level; each stack has
    transformer_layers_per_block[i] transformer blocks of one self- and one
    cross-attention.
    """
    chans = list(cfg["block_out_channels"])
    n = len(chans)
    heads = _per_level(cfg["attention_head_dim"], n)
    depth = _per_level(cfg["transformer_layers_per_block"], n)
    side = cfg["resolution"] // cfg["vae_scale_factor"]
    b, text = cfg["batch"], cfg["text_len"]
    calls: collections.Counter = collections.Counter()

    def add(level: int, stacks: int, transformer_depth: int):
        tokens = (side >> level) ** 2
        h = heads[level]
        d = chans[level] // h
        calls[AttnShape("self", b, h, tokens, tokens, d)] += stacks * transformer_depth
        calls[AttnShape("cross", b, h, tokens, text, d)] += stacks * transformer_depth

    for i, kind in enumerate(cfg["down_block_types"]):
        if "CrossAttn" in kind:
            add(i, cfg["layers_per_block"], depth[i])
    add(n - 1, 1, depth[-1])  # UNetMidBlock2DCrossAttn
    for j, kind in enumerate(cfg["up_block_types"]):
        level = n - 1 - j
        if "CrossAttn" in kind:
            add(level, cfg["layers_per_block"] + 1, depth[level])
    return calls


# ---------------------------------------------------------------------------------
# Suite entry points
# ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=None,
                        help=f"comma list of {', '.join(UNET_CONFIGS)} (default all; --quick: "
                             f"{', '.join(QUICK_CONFIGS)})")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of full,fwd (default both)")
    parser.add_argument("--kinds", default="self,cross", help="comma list of self,cross (default both)")


def default_providers(device: torch.device) -> tuple[str, ...]:
    return CPU_DEFAULT_PROVIDERS if device.type == "cpu" else GPU_DEFAULT_PROVIDERS


def _parse_list(text: str, allowed, what: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in allowed]
    if bad or not out:
        raise ValueError(f"{what}: unknown {bad or text!r}; choose from {list(allowed)}")
    return out


def run(opts: argparse.Namespace, writer: common.ResultWriter) -> int:
    """Run the suite; rows go to writer. Returns the exit code (1 if a provider was wrong)."""
    device: torch.device = opts.device
    # CPU smoke runs: fp32, because the Triton interpreter's bf16 tl.dot is wrong (a known quirk)
    dtypes = opts.dtypes or ([torch.bfloat16] if device.type == "cuda" else [torch.float32])
    names = list(opts.providers or default_providers(device))
    unknown = [n for n in names if n not in ALL_PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {list(ALL_PROVIDERS)}")
    modes = _parse_list(opts.modes, MODES, "--modes")
    kinds = _parse_list(opts.kinds, ("self", "cross"), "--kinds")
    configs = {**UNET_CONFIGS, **QUICK_CONFIGS}
    models = (_parse_list(opts.models, configs, "--models") if opts.models
              else list(QUICK_CONFIGS if opts.quick else UNET_CONFIGS))
    common.use_triton_interpreter_on_cpu(device, names)
    budget = common.QUICK_BUDGET if opts.quick else common.TimingBudget()
    env = common.environment(device)
    providers = make_providers()
    print(f"[bench {OP}] device={env['device']} torch={env['torch']} triton={env['triton']} "
          f"cuda={env['cuda']} git={env['git_sha']} providers={','.join(names)}")

    unavailable: dict[str, str] = {}
    rejected: list[str] = []
    failures: list[str] = []
    fns: dict[str, Callable] = {}
    results: list[Measurement] = []

    for model in models:
        cfg = configs[model]
        calls = unet_attention_calls(cfg)
        for dtype in dtypes:
            for shape, count in sorted(calls.items(), key=lambda kv: (-kv[0].lq, kv[0].kind)):
                if shape.kind not in kinds:
                    continue
                inp = make_inputs(shape, dtype, device)
                truth = reference_truth(inp)
                for name in names:
                    if name in unavailable:
                        continue
                    prov = providers[name]
                    label = f"{name} {model} {shape.kind} {common.shape_str(shape.dims)} {common.dtype_name(dtype)}"
                    try:
                        if name not in fns:
                            fns[name] = prov.make()
                        with prov.context():
                            for mode in modes:
                                try:
                                    results.append(measure(name, fns[name], model, shape, count, inp, truth, mode,
                                                           device, budget))
                                except AssertionError as exc:
                                    msg = f"WRONG RESULT, skipped: {label} {mode}: {exc}"
                                    print(f"  {msg}")
                                    failures.append(msg)
                    except Skip as exc:
                        unavailable[name] = str(exc)
                        print(f"  skip {name}: {exc}")
                    except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the others
                        if common.is_backend_unavailable(exc):
                            unavailable[name] = str(exc)
                            print(f"  skip {name}: {exc}")
                        elif is_baseline(name) and _is_rejection(exc):
                            rejected.append(f"{label}: {str(exc).splitlines()[0][:160]}")
                            print(f"  {name} does not take {label}: {str(exc).splitlines()[0][:160]}")
                        else:
                            msg = f"ERROR, skipped: {label}: {type(exc).__name__}: {exc}"
                            print(f"  {msg}")
                            failures.append(msg)
                    for t in inp.leaves:
                        t.grad = None
                del inp, truth
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    rows = write_rows(results, env, writer, configs)
    print_summary(rows)
    if unavailable:
        print("skipped providers: " + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    if rejected:
        print(f"{len(rejected)} baseline/shape combination(s) rejected by the baseline itself (no row)")
    if failures:
        print(f"{len(failures)} provider/case combination(s) failed; their rows were not written")
        return 1
    return 0


# ---------------------------------------------------------------------------------
# Rows, totals, summary
# ---------------------------------------------------------------------------------


def write_rows(results: list[Measurement], env: dict[str, Any], writer: common.ResultWriter,
               configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    by_case: dict[tuple, list[Measurement]] = collections.defaultdict(list)
    for m in results:
        by_case[(m.model, m.dtype, m.mode, m.shape)].append(m)
    best_per_case: dict[tuple, Measurement] = {}
    for key, ms in by_case.items():
        base = [m for m in ms if is_baseline(m.provider)]
        if base:
            best_per_case[key] = min(base, key=lambda m: m.ms[1])
        for m in ms:
            best = best_per_case.get(key)
            extras = {
                "model": m.model, "kind": m.shape.kind, "calls_per_unet_forward": m.count,
                "best_baseline": best.provider if best else None,
                "ratio_vs_best_baseline": m.ms[1] / best.ms[1] if best and best.ms[1] > 0 else None,
                "weighted_ms_p50": m.count * m.ms[1],
                "check": m.check,
            }
            row = common.make_row(op=OP, provider=m.provider, shape=m.shape.dims, dtype=m.dtype, mode=m.mode,
                                  variant=m.model, ms=m.ms, env=env, flops=m.shape.flops(m.mode),
                                  peak_mem=m.peak_bytes, launches=m.launches, extras=extras)
            writer.write(row)
            rows.append(row)

    # time-weighted totals over one UNet forward, per (model, dtype, mode, provider)
    groups: dict[tuple, list[Measurement]] = collections.defaultdict(list)
    for m in results:
        groups[(m.model, m.dtype, m.mode)].append(m)
    for (model, dtype, mode), ms in groups.items():
        shapes = {m.shape: m.count for m in ms}
        n_calls = sum(shapes.values())
        best_shape_total = sum(best_per_case[(model, dtype, mode, s)].ms[1] * c for s, c in shapes.items()
                               if (model, dtype, mode, s) in best_per_case)
        best_complete = all((model, dtype, mode, s) in best_per_case for s in shapes)
        totals = {}
        for prov in sorted({m.provider for m in ms}):
            mine = {m.shape: m for m in ms if m.provider == prov}
            complete = set(mine) == set(shapes)
            t = tuple(sum(m.ms[i] * m.count for m in mine.values()) for i in range(3))
            totals[prov] = (t, complete, mine)
        sdpa_complete = {p: v[0][1] for p, v in totals.items() if p in SDPA_PROVIDERS and v[1]}
        best_sdpa = min(sdpa_complete.items(), key=lambda kv: kv[1]) if sdpa_complete else None
        cfg = configs[model]
        for prov, (t, complete, mine) in totals.items():
            worst = None
            if not is_baseline(prov):
                ratios = [(m.ms[1] / best_per_case[(model, dtype, mode, s)].ms[1], s)
                          for s, m in mine.items() if (model, dtype, mode, s) in best_per_case]
                worst = max(ratios, key=lambda r: r[0]) if ratios else None
            extras = {
                "model": model, "total": True, "calls_per_unet_forward": n_calls,
                "shapes_measured": len(mine), "shapes_total": len(shapes), "complete": complete,
                "best_sdpa_backend": best_sdpa[0] if best_sdpa else None,
                "best_sdpa_total_ms_p50": best_sdpa[1] if best_sdpa else None,
                "ratio_vs_best_sdpa_total": t[1] / best_sdpa[1] if best_sdpa and complete else None,
                "best_baseline_per_shape_total_ms_p50": best_shape_total if best_complete else None,
                "ratio_vs_best_baseline_per_shape_total": (t[1] / best_shape_total
                                                           if best_complete and complete and best_shape_total
                                                           else None),
                "worst_shape_ratio": worst[0] if worst else None,
                "worst_shape": list(worst[1].dims) if worst else None,
            }
            flops = sum(m.shape.flops(mode) * m.count for m in mine.values())
            row = common.make_row(op=OP, provider=prov, shape=(cfg["batch"], cfg["resolution"], cfg["resolution"]),
                                  dtype=dtype, mode=mode, variant=f"{model}-unet-total", ms=t, env=env,
                                  flops=flops, extras=extras)
            writer.write(row)
            rows.append(row)
    return rows


def print_summary(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no rows written")
        return
    headers = ["model", "mode", "dtype", "kind", "shape BxHxLqxLkxD", "calls", "provider", "ms p50", "TFLOP/s",
               "%peak", "vs best base"]
    per_shape = [r for r in rows if not r["extras"].get("total")]
    per_shape.sort(key=lambda r: (r["variant"], r["mode"], r["dtype"], -r["shape"][2], r["extras"]["kind"],
                                  r["ms_p50"]))
    table = []
    for r in per_shape:
        frac = r["frac_peak_flops"]
        ratio = r["extras"].get("ratio_vs_best_baseline")
        table.append([r["variant"], r["mode"], r["dtype"], r["extras"]["kind"], common.shape_str(r["shape"]),
                      str(r["extras"]["calls_per_unet_forward"]), r["provider"], common.fmt(r["ms_p50"], ".4f"),
                      common.fmt(r["tflops"], ".4g"), common.fmt(frac * 100 if frac is not None else None, ".1f"),
                      common.fmt(ratio, ".2f") + ("x" if ratio is not None else "")])
    print(f"\n{OP} on {rows[0]['device']} (git {rows[0]['git_sha']})")
    print(common.render_table(headers, table))

    totals = [r for r in rows if r["extras"].get("total")]
    if totals:
        print("\ntime-weighted totals over one UNet forward's attention calls (sum calls x ms p50)")
        t_headers = ["model", "mode", "dtype", "provider", "total ms", "TFLOP/s", "complete", "vs best SDPA",
                     "vs best/shape", "worst shape"]
        t_table = []
        for r in sorted(totals, key=lambda r: (r["variant"], r["mode"], r["dtype"], r["ms_p50"])):
            e = r["extras"]
            t_table.append([e["model"], r["mode"], r["dtype"], r["provider"], common.fmt(r["ms_p50"], ".3f"),
                            common.fmt(r["tflops"], ".4g"), "yes" if e["complete"] else "no",
                            common.fmt(e["ratio_vs_best_sdpa_total"], ".3f"),
                            common.fmt(e["ratio_vs_best_baseline_per_shape_total"], ".3f"),
                            (common.fmt(e["worst_shape_ratio"], ".2f") + "x " + common.shape_str(e["worst_shape"]))
                            if e["worst_shape"] else "-"])
        print(common.render_table(t_headers, t_table))
        for r in totals:
            e = r["extras"]
            if r["provider"] == "dbkernels-triton" and r["mode"] == "full" and e["model"] == "sd15":
                tot, worst = e["ratio_vs_best_sdpa_total"], e["worst_shape_ratio"]
                ok_t = tot is not None and tot <= 0.9
                ok_w = worst is not None and worst <= 1.1
                print(f"target (sd15 full, {r['dtype']}): total {common.fmt(tot, '.3f')}x best SDPA (<= 0.9: "
                      f"{'met' if ok_t else 'NOT met'}); worst shape {common.fmt(worst, '.2f')}x best baseline "
                      f"(<= 1.1: {'met' if ok_w else 'NOT met'})")
