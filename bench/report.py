"""Markdown tables and PNG plots from bench/results/*.jsonl.

    python -m bench report [--results DIR] [--include-cpu] [--no-plots]

Writes <results>/README.md: per op, one table per (device, git sha), newest first,
showing the newest row for each (provider, shape, dtype, mode, variant). With
matplotlib installed it also writes <results>/<op>.png (ms p50 bars with p20-p80
error bars, newest git sha per device). Rows measured on a CPU are smoke-test rows,
not performance data: they are left out unless --include-cpu, and then labelled.
The rows themselves are never modified.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

from . import common

MODE_ORDER = {"full": 0, "fwd": 1, "bwd": 2}
DTYPE_ORDER = {"bf16": 0, "fp16": 1, "fp32": 2}


def load_rows(results_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """All rows of every *.jsonl file, plus a list of 'file:line: problem' for bad lines."""
    rows, bad = [], []
    for path in sorted(results_dir.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    bad.append(f"{path.name}:{lineno}: {exc}")
                    continue
                if not isinstance(row, dict) or "op" not in row or "provider" not in row:
                    bad.append(f"{path.name}:{lineno}: not a result row")
                    continue
                rows.append(row)
    return rows, bad


def is_cpu_row(row: dict[str, Any]) -> bool:
    if row.get("device_type"):
        return row["device_type"] == "cpu"
    return str(row.get("device", "")).lower().startswith("cpu")


def _ts(row: dict[str, Any]) -> datetime.datetime:
    try:
        t = datetime.datetime.fromisoformat(str(row.get("timestamp")))
    except ValueError:
        return datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
    return t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


def row_key(row: dict[str, Any]) -> tuple:
    return (row.get("device"), row.get("provider"), tuple(row.get("shape") or ()), row.get("dtype"),
            row.get("mode"), row.get("variant", ""))


def newest_per_key(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        k = row_key(r)
        if k not in best or _ts(r) >= _ts(best[k]):
            best[k] = r
    return list(best.values())


def _provider_rank(p: str) -> tuple:
    return (0 if p == "eager" else 1 if p.startswith("eager") or p == "torch.compile" else 2, p)


def _sort_key(row: dict[str, Any]) -> tuple:
    shape = row.get("shape") or []
    return (MODE_ORDER.get(row.get("mode"), 9), DTYPE_ORDER.get(row.get("dtype"), 9), str(row.get("variant", "")),
            math.prod(shape) if shape else 0, list(shape), _provider_rank(str(row.get("provider"))))


def group_rows(rows: list[dict[str, Any]]) -> dict[str, list[tuple[tuple[str, str], list[dict[str, Any]]]]]:
    """{op: [((device, git_sha), newest rows), ...]} with the newest group first."""
    by_op: dict[str, dict[tuple[str, str], list[dict[str, Any]]]] = {}
    for r in rows:
        by_op.setdefault(r["op"], {}).setdefault((str(r.get("device")), str(r.get("git_sha"))), []).append(r)
    out = {}
    for op in sorted(by_op):
        groups = [(k, sorted(newest_per_key(v), key=_sort_key)) for k, v in by_op[op].items()]
        groups.sort(key=lambda kv: max(_ts(r) for r in kv[1]), reverse=True)
        out[op] = groups
    return out


def _ms_cell(r):
    p20, p50, p80 = (common.fmt(r.get(k), ".4f") for k in ("ms_p20", "ms_p50", "ms_p80"))
    return f"{p50} ({p20}-{p80})"


def _pct(v):
    return common.fmt(v * 100 if v is not None else None, ".1f")


COLUMNS = [
    ("provider", lambda r: str(r.get("provider"))),
    ("shape", lambda r: common.shape_str(r.get("shape") or [])),
    ("dtype", lambda r: str(r.get("dtype"))),
    ("mode", lambda r: str(r.get("mode"))),
    ("variant", lambda r: str(r.get("variant") or "")),
    ("ms p50 (p20-p80)", _ms_cell),
    ("GB/s", lambda r: common.fmt(r.get("gbps"), ".4g")),
    ("% peak BW", lambda r: _pct(r.get("frac_peak_bw"))),
    ("TFLOP/s", lambda r: common.fmt(r.get("tflops"), ".1f")),
    ("% peak FLOP/s", lambda r: _pct(r.get("frac_peak_flops"))),
    ("peak MiB", lambda r: common.fmt(r["peak_bytes"] / 2**20 if r.get("peak_bytes") is not None else None, ".1f")),
    ("launches", lambda r: common.fmt(r.get("launches"), "d")),
    ("vs eager", lambda r: (common.fmt((r.get("extras") or {}).get("speedup_vs_eager"), ".2f") + "x")
     if (r.get("extras") or {}).get("speedup_vs_eager") is not None else "-"),
]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cells = [[fn(r) for _, fn in COLUMNS] for r in rows]
    # drop columns that are empty for every row (e.g. TFLOP/s of a bandwidth-bound op)
    keep = [i for i, (name, _) in enumerate(COLUMNS)
            if name in ("provider", "shape", "dtype", "mode") or any(c[i] not in ("-", "") for c in cells)]
    head = [COLUMNS[i][0] for i in keep]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in keep) + "|"]
    for c in cells:
        lines.append("| " + " | ".join(c[i].replace("|", "\\|") for i in keep) + " |")
    return "\n".join(lines)


def _group_heading(device: str, sha: str, rows: list[dict[str, Any]]) -> list[str]:
    first = min(rows, key=_ts)
    last = max(rows, key=_ts)
    r0 = rows[0]
    if is_cpu_row(r0):
        title = f"### CPU smoke rows (not performance data) - {device} - git {sha}"
    else:
        title = f"### {device} - git {sha}"
    return [title, "",
            f"torch {r0.get('torch')}, triton {r0.get('triton')}, CUDA {r0.get('cuda')}; "
            f"measured {first.get('timestamp')} .. {last.get('timestamp')} (UTC); {len(rows)} rows.", ""]


def render_markdown(grouped, *, include_cpu: bool, excluded_cpu: int, bad: list[str],
                    plots: dict[str, str]) -> str:
    out = ["# Benchmark results", "",
           "Generated by `python -m bench report` from `*.jsonl` in this directory; do not edit by hand.",
           "Times are per step in milliseconds: median with the 20th-80th percentile range. GB/s and",
           "TFLOP/s come from each op's bytes/FLOP model at the median time; % peak is against the",
           "device's datasheet peak (bench/common.py). Each table shows the newest row per",
           "(provider, shape, dtype, mode, variant) for one device and git sha.", ""]
    if excluded_cpu:
        out += [f"{excluded_cpu} CPU smoke row(s) left out (use `--include-cpu` to show them).", ""]
    if include_cpu:
        out += ["CPU rows are smoke-test rows from `--device cpu`: they check the harness, they are not "
                "performance data.", ""]
    if not grouped:
        out += ["No results yet. Run e.g. `python -m bench loss` on a GPU.", ""]
    for op, groups in grouped.items():
        out += [f"## {op}", ""]
        if op in plots:
            out += [f"![{op}]({plots[op]})", ""]
        for (device, sha), rows in groups:
            out += _group_heading(device, sha, rows)
            out += [markdown_table(rows), ""]
    if bad:
        out += ["## Unreadable lines", ""] + [f"- `{b}`" for b in bad] + [""]
    return "\n".join(out)


def write_plots(grouped, results_dir: Path) -> dict[str, str]:
    """<op>.png per op (newest git sha per device); {} with a message if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        print(f"matplotlib not available ({type(exc).__name__}: {exc}); skipping plots")
        return {}
    written = {}
    for op, groups in grouped.items():
        seen_devices, panels = set(), []
        for (device, sha), rows in groups:  # newest group first
            if device in seen_devices:
                continue
            seen_devices.add(device)
            sub: dict[tuple, list[dict[str, Any]]] = {}
            for r in rows:
                sub.setdefault((r.get("dtype"), r.get("mode"), r.get("variant") or ""), []).append(r)
            for (dtype, mode, variant), rs in sub.items():
                cpu = " [CPU smoke]" if is_cpu_row(rs[0]) else ""
                panels.append((f"{device}{cpu}, git {sha}\n{dtype} {mode} {variant}".strip(), rs))
        if not panels:
            continue
        ncols = min(2, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 4 * nrows), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (title, rs) in zip(axes.flat, panels):
            shapes = sorted({tuple(r["shape"]) for r in rs}, key=lambda s: (math.prod(s), s))
            providers = sorted({r["provider"] for r in rs}, key=_provider_rank)
            width = 0.8 / max(1, len(providers))
            for j, prov in enumerate(providers):
                xs, ys, lo, hi = [], [], [], []
                for i, shape in enumerate(shapes):
                    r = next((r for r in rs if r["provider"] == prov and tuple(r["shape"]) == shape), None)
                    if r is None:
                        continue
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r["ms_p50"])
                    lo.append(max(0.0, r["ms_p50"] - r["ms_p20"]))
                    hi.append(max(0.0, r["ms_p80"] - r["ms_p50"]))
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=prov)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([common.shape_str(s) for s in shapes], fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("ms per step (p50, p20-p80)")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle(op)
        fig.tight_layout()
        name = f"{op}.png"
        fig.savefig(results_dir / name, dpi=110)
        plt.close(fig)
        written[op] = name
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench report", description=__doc__.strip().splitlines()[0])
    p.add_argument("--results", default=str(common.DEFAULT_RESULTS),
                   help="directory with *.jsonl (default bench/results)")
    p.add_argument("--include-cpu", action="store_true", help="also show CPU smoke rows (labelled as such)")
    p.add_argument("--no-plots", action="store_true", help="write README.md only")
    opts = p.parse_args(argv)
    results_dir = Path(opts.results)
    if not results_dir.is_dir():
        print(f"no results directory {results_dir}", file=sys.stderr)
        return 2
    rows, bad = load_rows(results_dir)
    cpu_rows = [r for r in rows if is_cpu_row(r)]
    shown = rows if opts.include_cpu else [r for r in rows if not is_cpu_row(r)]
    grouped = group_rows(shown)
    plots = {} if opts.no_plots else write_plots(grouped, results_dir)
    text = render_markdown(grouped, include_cpu=opts.include_cpu,
                           excluded_cpu=0 if opts.include_cpu else len(cpu_rows), bad=bad, plots=plots)
    out = results_dir / "README.md"
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(shown)} of {len(rows)} rows; {len(plots)} plot(s))")
    for b in bad:
        print(f"warning: unreadable line {b}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
