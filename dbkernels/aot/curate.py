"""Pick the curated autotune sets (dbkernels/ops/attention/curated_configs.json) from a full sweep.

For each (target, kernel, head dim, element size) of the SD / SDXL attention calls:

1. eligible: the config compiled for *every* swept call of that group (cross and
   self + key bias, bf16 for element size 2) within the target's shared memory per block and
   without register spills (ptxas: 0 bytes spill stores); where every config spills, the
   least-spilling ones (listed as "spilling_sets" in the JSON);
2. ranked by a static throughput proxy: the resident tile (BLOCK_M queries for the
   forward and dQ kernels, BLOCK_N keys for dK/dV) times the streamed tile, which sets
   how often each loaded byte is reused, scaled down when the estimated occupancy falls
   under 8 warps per SM (registers x threads and shared memory against one SM's);
3. chosen greedily, at most 2 configs per tile shape, at least 2 per head-dim layout
   where a layout has eligible configs (split vs padded tiles: only a GPU can tell which
   is faster), and the best 64x64 tile kept as a safe choice; at most MAX_PER_SET.

This is a static choice from compiled figures; the autotuner on the user's GPU measures
the survivors and takes the fastest. Rerun `python -m dbkernels compile --full --curate`
after changing a kernel.
"""
from __future__ import annotations

import datetime
import json
import math
from collections import defaultdict

from ..ops.attention import curated_configs

CURATED_HEAD_DIMS = (40, 64, 80, 160)
KERNELS = {"_fwd_kernel": "fwd", "_bwd_dkdv_kernel": "dkdv", "_bwd_dq_kernel": "dq"}
SM_SHARED = {86: 100 * 1024, 90: 228 * 1024}   # shared memory of one SM
SM_REGS = 65536
MAX_PER_TILE = 2
MIN_PER_LAYOUT = 2


def _esize(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def _head_dim(row) -> int:
    return int(row["shape"].split(" D")[-1].split()[0])


def _vetoed(checked) -> dict:
    """{group: config keys} that spilled, went over shared memory or failed in any checked call."""
    bad = defaultdict(set)
    for r in checked:
        if r["kernel"] not in KERNELS or r["op"] != "attention" or _head_dim(r) not in CURATED_HEAD_DIMS:
            continue
        if r["error"] or r["over_limit"] or r["spill_bytes"]:
            bad[(r["arch"], KERNELS[r["kernel"]], _head_dim(r), _esize(r["dtype"]))].add(
                curated_configs.config_key(r["cfg"]))
    return bad


def eligible(rows, checked=()) -> tuple[dict, set]:
    """({(arch, kernel, D, esize): {config key: (max shared, max registers, cfg)}}, groups that spill).

    A config is eligible when it compiled for every call of its group within shared memory and
    without spills; in a group where every such config spills (fp32 FMA dots at D=160), the
    least-spilling ones (at most twice the smallest spill, or 32 bytes) are eligible instead.
    `checked`: rows of the default run over every real call (the curated sets only); a config
    that spilled there in any call (the sweep has one call per head dim and kind) is dropped."""
    vetoed = _vetoed(checked)
    calls = defaultdict(set)      # the calls of each group
    seen = defaultdict(lambda: defaultdict(set))
    worst = defaultdict(dict)
    spill = defaultdict(lambda: defaultdict(int))
    over = defaultdict(set)
    for r in rows:
        if r["error"] or r["kernel"] not in KERNELS or r["op"] != "attention":
            continue
        d = _head_dim(r)
        if d not in CURATED_HEAD_DIMS:
            continue
        group = (r["arch"], KERNELS[r["kernel"]], d, _esize(r["dtype"]))
        key = curated_configs.config_key(r["cfg"])
        for call in r.get("calls") or [r["call"]]:
            calls[group].add(call)
            seen[group][key].add(call)
        if r["over_limit"]:
            over[group].add(key)
        spill[group][key] = max(spill[group][key], r["spill_bytes"] or 0)
        shared, regs, _ = worst[group].get(key, (0, 0, None))
        worst[group][key] = (max(shared, r["shared"]), max(regs, r["registers"] or 0), r["cfg"])
    out, spilling = {}, set()
    for group, by_key in seen.items():
        fits = [k for k, cs in by_key.items() if cs == calls[group] and k not in over[group]]
        # a veto only narrows a group that has spill-free configs left (where all spill somewhere,
        # the sweep's least-spilling ones stay: chasing untested ones would never settle)
        clean = [k for k in fits if spill[group][k] == 0 and k not in vetoed[group]]
        if not clean and fits:
            least = min(spill[group][k] for k in fits)
            clean = [k for k in fits if spill[group][k] <= max(32, 2 * least)]
            spilling.add(group)
        out[group] = {k: worst[group][k] for k in clean}
    return out, spilling


def _score(kernel: str, arch: int, shared: int, regs: int, cfg: dict) -> float:
    warps = cfg["num_warps"]
    regs_per_cta = max(8, math.ceil(regs / 8) * 8) * 32 * warps
    ctas = min(SM_REGS // regs_per_cta, SM_SHARED.get(arch, SM_SHARED[86]) // max(shared, 1), 16)
    if ctas < 1:
        return 0.0
    resident, streamed = ((cfg["BLOCK_N"], cfg["BLOCK_M"]) if kernel == "dkdv" else (cfg["BLOCK_M"], cfg["BLOCK_N"]))
    occupancy = min(1.0, ctas * warps / 8)
    return resident * streamed * occupancy + 0.01 * cfg["num_stages"]


def choose(kernel: str, arch: int, candidates: dict) -> dict[str, int]:
    """{config key: shared bytes} of at most MAX_PER_SET configs (see the module docstring)."""
    ranked = sorted(candidates.items(), key=lambda kv: -_score(kernel, arch, kv[1][0], kv[1][1], kv[1][2]))
    ranked = [(k, v) for k, v in ranked if _score(kernel, arch, v[0], v[1], v[2]) > 0]
    layout = lambda cfg: (cfg["BLOCK_D0"], cfg["BLOCK_D1"], cfg["HAS_HI"])  # noqa: E731
    tile = lambda cfg: (cfg["BLOCK_M"], cfg["BLOCK_N"])  # noqa: E731
    chosen: list[tuple[str, tuple]] = []

    def take(pred, limit):
        for k, v in ranked:
            if len(chosen) >= limit:
                return
            if any(k == c for c, _ in chosen) or not pred(v[2]):
                continue
            if sum(1 for _, cv in chosen if tile(cv[2]) == tile(v[2])) >= MAX_PER_TILE:
                continue
            chosen.append((k, v))

    layouts = sorted({layout(v[2]) for _, v in ranked})
    per_layout = min(MIN_PER_LAYOUT, curated_configs.MAX_PER_SET // max(1, len(layouts)))
    for lay in layouts:
        take(lambda cfg, lay=lay: layout(cfg) == lay, len(chosen) + per_layout)
    if not any(tile(v[2]) == (64, 64) for _, v in chosen):
        take(lambda cfg: tile(cfg) == (64, 64), len(chosen) + 1)
    take(lambda cfg: True, curated_configs.MAX_PER_SET)
    return {k: int(v[0]) for k, v in chosen[: curated_configs.MAX_PER_SET]}


def build(rows, checked=()) -> tuple[dict, list]:
    sets: dict = {}
    groups, spilling = eligible(rows, checked)
    for (arch, kernel, d, esize), candidates in sorted(groups.items()):
        picked = choose(kernel, arch, candidates)
        if picked:
            sets.setdefault(str(arch), {}).setdefault(kernel, {}).setdefault(str(d), {})[str(esize)] = picked
    return sets, sorted(f"sm_{a} {k} D{d} {8 * e}-bit" for a, k, d, e in spilling)


def write(rows, checked=(), generated_by="python -m dbkernels compile --full --curate") -> str:
    sets, spilling = build(rows, checked)
    doc = {"generated_by": generated_by,
           "date": datetime.date.today().isoformat(),
           "note": "static choice from compiled figures (dbkernels/aot/curate.py); the GPU autotuner picks among them",
           "spilling_sets": spilling,
           "sets": sets}
    curated_configs.PATH.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    curated_configs._table.cache_clear()
    return str(curated_configs.PATH)


def _read(paths) -> list[dict]:
    rows = []
    for path in paths:
        for line in open(path):
            if line.strip():
                r = json.loads(line)
                r.setdefault("cfg", r.get("constexprs"))
                rows.append(r)
    return rows


def main(argv=None) -> int:
    """python -m dbkernels.aot.curate SWEEP.jsonl ... [--checked RUN.jsonl ...]: the curated sets
    from committed sweep rows, minus configs that spilled in a default run over every call."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m dbkernels.aot.curate", description=main.__doc__)
    p.add_argument("sweep", nargs="+", help="aot-compile.jsonl rows of `python -m dbkernels compile --full`")
    p.add_argument("--checked", nargs="*", default=[],
                   help="aot-compile.jsonl rows of `python -m dbkernels compile --op attention` (every call)")
    a = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    print(f"wrote {write(_read(a.sweep), _read(a.checked), 'python -m dbkernels.aot.curate ' + ' '.join(argv))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
