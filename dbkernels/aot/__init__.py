"""`python -m dbkernels compile`: every Triton kernel of dbkernels compiled ahead of time for GPU
targets, on any machine (no GPU needed), specialised exactly as the JIT specialises the real
calls of SD 1.5, SD 2.x and SDXL training (dbkernels/aot/calls.py).

    python -m dbkernels compile                      # sm_86 and sm_90, every call, the configs the JIT may pick
    python -m dbkernels compile --quick              # the CI subset: each kernel and constexpr branch once
    python -m dbkernels compile --full --curate      # every config: the sweep, rows + table, the curated sets

Exit status 1 if any kernel fails to compile, or a config the JIT may pick needs more shared
memory than the target has. On a GPU machine the compiled binaries land in Triton's cache,
where the JIT finds them (the first training step then only autotunes).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
STATIC_RESULTS = ROOT / "bench" / "results" / "static"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dbkernels compile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", type=int, action="append",
                   help="GPU architecture(s) to compile for, as 10 x major + minor (86: RTX 30xx, 89: RTX 40xx, "
                        "90: H100/H200); default 86 and 90")
    p.add_argument("--model", action="append", choices=["sd15", "sd21", "sdxl"],
                   help="only the calls of these models (default: all three)")
    p.add_argument("--op", action="append", choices=["attention", "diffusion_loss", "add_noise", "adamw8bit",
                                                      "adamw4bit", "ema_update"],
                   help="only these ops (default: all)")
    p.add_argument("--calls", default=None, metavar="REGEX",
                   help="only the calls whose id matches (e.g. 'attention/sd15/.*/(self|cross)/bf16')")
    p.add_argument("--quick", action="store_true", help="the CI subset: each kernel and constexpr branch once")
    p.add_argument("--configs", choices=["jit", "model", "all"], default=None,
                   help="attention autotune configs: jit = what the JIT may pick now (the curated sets, else the "
                        "shared-memory model's prune), model = the model's prune only (before curation), all = "
                        "every config (default: all with --full, else jit)")
    p.add_argument("--full", action="store_true",
                   help="the sweep: every autotune config of every head-dim layout (not only those the JIT may "
                        "pick), for one attention call per head dim, cross / self+bias and bf16 / fp32; writes "
                        "rows and a table to --out")
    p.add_argument("--max-tile", type=int, default=None, metavar="N",
                   help="with --full: only attention tiles of at most N = BLOCK_M x BLOCK_N elements (fp32's FMA "
                        "dots spill beyond 64 x 64 and take minutes each to compile)")
    p.add_argument("--curate", action="store_true",
                   help="with --full: write dbkernels/ops/attention/curated_configs.json from the sweep")
    p.add_argument("--out", default=None, help=f"folder for the rows and table (default with --full: {STATIC_RESULTS})")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--fresh-cache", action="store_true",
                   help="compile into an empty Triton cache (to time a first run); default: Triton's cache")
    p.add_argument("--verbose", action="store_true", help="print every compiled kernel, not a summary")
    return p


def _run_pool(items, jobs, cache_dir):
    """Rows of every item, compiled in `jobs` fresh processes (TRITON_INTERPRET=0 before triton loads)."""
    from . import driver

    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    os.environ["TRITON_INTERPRET"] = "0"
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    rows = []
    try:
        ctx = mp.get_context("spawn")
        with ctx.Pool(max(1, min(jobs, len(items)))) as pool:
            done = 0
            for part in pool.imap_unordered(driver.run_items, [[it] for it in items], chunksize=1):
                rows.extend(part)
                done += 1
                if done % 10 == 0 or done == len(items):
                    print(f"  compiled {done}/{len(items)} calls", file=sys.stderr, flush=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rows


def _dedupe(rows):
    """One row per (arch, compiled binary), listing every call that uses it; errors kept as they are."""
    out, index = [], {}
    for r in sorted(rows, key=lambda r: (r["arch"], r["op"], r["call"], r["kernel"], r["config"])):
        if r["binary"] is None:
            out.append(dict(r, calls=[r["call"]]))
            continue
        key = (r["arch"], r["binary"])
        if key in index:
            index[key]["calls"].append(r["call"])
            continue
        index[key] = dict(r, calls=[r["call"]])
        out.append(index[key])
    return out


def _fmt_table(rows) -> list[str]:
    lines = [f"{'arch':<6}{'kernel':<24}{'shape':<40}{'dtype':<6}{'config':<66}{'regs':>5}{'spill':>6}"
             f"{'smem KB':>9}{'limit':>7}  status"]
    for r in rows:
        status = "FAIL " + r["error"] if r["error"] else ("OVER LIMIT" if r["over_limit"] else
                                                          ("spills" if r["spill_bytes"] else "ok"))
        smem = f"{r['shared'] / 1024:.1f}" if r["shared"] is not None else "-"
        lines.append(f"sm_{r['arch']:<3}{r['kernel']:<24}{r['shape'][:39]:<40}{r['dtype']:<6}{r['config'][:65]:<66}"
                     f"{r['registers'] if r['registers'] is not None else '-':>5}"
                     f"{r['spill_bytes'] if r['spill_bytes'] is not None else '-':>6}{smem:>9}"
                     f"{r['shared_limit'] // 1024:>7}  {status}")
    return lines


def _summary(rows) -> list[str]:
    groups = defaultdict(list)
    for r in rows:
        if r["error"] is None:
            groups[(r["arch"], r["op"], r["kernel"])].append(r)
    lines = [f"{'arch':<6}{'op':<16}{'kernel':<24}{'binaries':>9}{'max regs':>9}{'spilling':>9}{'max smem KB':>12}"
             f"{'over limit':>11}"]
    for (arch, op, kernel), rs in sorted(groups.items()):
        lines.append(f"sm_{arch:<3}{op:<16}{kernel:<24}{len(rs):>9}{max(r['registers'] or 0 for r in rs):>9}"
                     f"{sum(1 for r in rs if r['spill_bytes']):>9}{max(r['shared'] for r in rs) / 1024:>12.1f}"
                     f"{sum(1 for r in rs if r['over_limit']):>11}")
    return lines


def main(argv=None) -> int:
    from . import calls as calls_mod

    a = parser().parse_args(argv)
    if a.curate and not a.full:
        print("dbkernels compile: --curate needs --full (the curated sets are picked from the full sweep)",
              file=sys.stderr)
        return 2
    if a.jobs < 1:
        print("dbkernels compile: --jobs must be >= 1", file=sys.stderr)
        return 2
    archs = sorted(set(a.arch or [86, 90]))
    if any(x < 75 for x in archs):
        print("dbkernels compile: --arch must be 75 or newer (e.g. 86, 90)", file=sys.stderr)
        return 2
    calls = calls_mod.select(models=a.model, quick=a.quick, ops=a.op, sweep=a.full)
    if a.calls:
        import re

        calls = [c for c in calls if re.search(a.calls, c.id)]
    if not calls:
        print("dbkernels compile: no call matches the filters", file=sys.stderr)
        return 2
    selection = a.configs or ("all" if a.full else "jit")
    items = [(arch, c.id, selection, a.quick, a.max_tile) for arch in archs for c in calls]
    cache_dir = tempfile.mkdtemp(prefix="dbkernels-aot-cache-") if a.fresh_cache else None
    print(f"dbkernels compile: {len(calls)} call(s) x {len(archs)} arch(s) "
          f"(configs: {selection}{', first per layout' if a.quick else ''}), "
          f"{a.jobs} process(es){', fresh cache ' + cache_dir if cache_dir else ''}", flush=True)
    t0 = time.perf_counter()
    rows = _run_pool(items, a.jobs, cache_dir)
    wall = time.perf_counter() - t0
    table = _dedupe(rows)
    failures = [r for r in table if r["error"]]
    over = [r for r in table if r["over_limit"] and selection != "all"]
    print("\n".join(_fmt_table(table) if (a.verbose or len(table) <= 120) else _summary(table)))
    spilling = sum(1 for r in table if r["spill_bytes"])
    print(f"\n{len(table) - len(failures)} kernel binaries compiled for {', '.join(f'sm_{x}' for x in archs)} "
          f"in {wall:.0f} s wall ({a.jobs} process(es)); {spilling} spill registers; "
          f"{len(over)} over the shared-memory limit; {len(failures)} failed")
    if a.full or a.out:
        from . import results

        out = Path(a.out) if a.out else STATIC_RESULTS
        paths = results.write(out, table, wall=wall, argv=sys.argv[1:] if argv is None else argv,
                              jobs=a.jobs, fresh_cache=a.fresh_cache)
        print("wrote " + ", ".join(str(p) for p in paths))
        if a.curate:
            from . import curate

            print(f"wrote {curate.write(table)}")
    for r in failures:
        print(f"FAILED sm_{r['arch']} {r['call']}: {r['error']}", file=sys.stderr)
    for r in over:
        print(f"OVER LIMIT sm_{r['arch']} {r['kernel']} {r['config']}: {r['shared']} > {r['shared_limit']} bytes "
              f"of shared memory", file=sys.stderr)
    return 1 if failures or over else 0
