"""Command line of the benchmark harness.

    python -m bench <suite> [--out DIR] [--device cuda|cpu] [--quick] [--dtype bf16,fp32]
                            [--providers a,b,...] [suite options]
    python -m bench report [--results DIR] [--include-cpu] [--no-plots]
    python -m bench memory [--arch sd15,sd21] [--only NAME,...]   (estimates on the CPU, no GPU)
    python -m bench methods|fabric|ablation|recipes|place|export|features ...   experiments on the built-in world (CPU)
    python -m bench list

Suites append JSON rows to <out>/<op>.jsonl (default bench/results/; CPU smoke rows
default to bench/results/cpu-smoke/, which git ignores). Benchmarks are
meant for a GPU: without one, and without --device cpu, the command exits with code 2.
Exit code 1 means some provider gave a wrong result (or crashed) and was skipped.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# suite name -> module under bench/ that defines OP, add_arguments(parser), run(opts, writer).
# Later suites (attention, optim, train) are added here.
SUITES: dict[str, str] = {
    "loss": "bench.diffusion_loss",
    "diffusion_loss": "bench.diffusion_loss",
    "attention": "bench.attention",
    "optim": "bench.optim",
    "adamw8bit": "bench.optim",
    "train": "bench.train",
}


# experiments with their own command lines: name -> module under bench/ with main(argv) (`--help` for each)
EXPERIMENTS: dict[str, str] = {
    "methods": "bench.methods",     # the paper's Table 1 in miniature: DreamBooth, LoRA, TI, pivotal tuning
    "fabric": "bench.fabric",       # FABRIC's simulated-user experiment and its cost
    "ablation": "bench.ablation",   # prior preservation on / off
    "recipes": "bench.recipes",     # the demo recipe search
    "place": "bench.place",         # the PLACE classifier's own accuracy
    "export": "bench.export",       # single-file export of SD1.5 / SD2.1-sized models
    "features": "bench.features",   # issue 30: masks, buckets, EMA, Huber loss, concepts
    "peers": "bench.peers",         # issue 29: against diffusers' own example scripts (needs a checkout)
}


def _usage() -> str:
    names = ", ".join(sorted(SUITES))
    return (f"usage: python -m bench <suite> [options]   suites: {names}\n"
            f"       python -m bench report [--results DIR] [--include-cpu]\n"
            f"       python -m bench memory [--arch sd15,sd21]   peak-memory estimates (CPU)\n"
            f"       python -m bench {'|'.join(EXPERIMENTS)} ...   experiments (CPU)\n"
            f"       python -m bench <suite> --help   for a suite's options")


def _suite_parser(name: str, module) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m bench {name}",
                                description=(module.__doc__ or "").strip().splitlines()[0])
    p.add_argument("--out", default=None, help="directory for <op>.jsonl rows (default bench/results; "
                                               "with --device cpu bench/results/cpu-smoke, not committed)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda (default; required unless --device cpu) or cpu (smoke runs)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few reps (CPU smoke runs)")
    p.add_argument("--dtype", default=None, help="comma list, e.g. bf16,fp32 (default bf16,fp32)")
    p.add_argument("--providers", default=None, help="comma list of providers (default: per device)")
    if hasattr(module, "add_arguments"):
        module.add_arguments(p)
    return p


def run_suite(name: str, argv: list[str]) -> int:
    from . import common

    module = importlib.import_module(SUITES[name])
    opts = _suite_parser(name, module).parse_args(argv)
    try:
        opts.device = common.resolve_device(opts.device)
    except common.NoGPU as exc:
        print(str(exc), file=sys.stderr)
        return 2
    try:
        opts.dtypes = common.parse_dtypes(opts.dtype) if opts.dtype else None
    except ValueError as exc:
        print(f"--dtype: {exc}", file=sys.stderr)
        return 2
    opts.providers = [p.strip() for p in opts.providers.split(",") if p.strip()] if opts.providers else None
    default_out = common.DEFAULT_CPU_RESULTS if opts.device.type == "cpu" else common.DEFAULT_RESULTS
    writer = common.ResultWriter(opts.out or default_out)
    try:
        code = module.run(opts, writer)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{len(writer.written)} row(s) appended under {writer.out_dir}")
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "report":
        from . import report

        return report.main(rest)
    if cmd == "memory":  # estimates on the CPU (dbtrain estimate): no device to resolve
        from . import memory

        return memory.main(rest)
    if cmd in EXPERIMENTS:
        return importlib.import_module(EXPERIMENTS[cmd]).main(rest)
    if cmd == "list":
        for name, mod in sorted({**SUITES, **EXPERIMENTS}.items()):
            print(f"{name:16s} {mod}")
        return 0
    if cmd not in SUITES:
        print(f"unknown suite {cmd!r}\n{_usage()}", file=sys.stderr)
        return 2
    return run_suite(cmd, rest)


if __name__ == "__main__":
    sys.exit(main())
