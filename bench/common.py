"""Shared benchmark machinery: timing, peak memory, launch counts, environment, rows.

Every suite (bench/<op>.py) builds its measurements from these pieces so that the
numbers of different ops and providers mean the same thing:

* time_ms(fn)        p20/p50/p80 milliseconds per call. CUDA: triton.testing.do_bench
                     (L2 flushed before every rep, grads reset), CUDA events if Triton
                     is missing. CPU: a time.perf_counter loop (smoke runs only).
* peak_bytes(fn)     torch.cuda.max_memory_allocated during one call, minus what was
                     allocated before it (None on CPU).
* count_launches(fn) GPU kernels + memsets + memcpys of one call after warmup, from
                     torch.profiler with CUDA activity (None on CPU).
* environment(dev)   gpu name, torch/triton/cuda versions, git sha, device peaks.
* make_row / ResultWriter
                     one JSON object per line, appended to <out>/<op>.jsonl; rows are
                     never edited after they are written.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO_ROOT / "bench" / "results"
# CPU smoke rows are not performance data and must not land in the committed
# results: without --out they go here (ignored by git via bench/.gitignore, and not
# read by `python -m bench report`, which looks at DEFAULT_RESULTS/*.jsonl only).
DEFAULT_CPU_RESULTS = DEFAULT_RESULTS / "cpu-smoke"
QUANTILES = (0.2, 0.5, 0.8)

NO_GPU_MESSAGE = "no CUDA device: benchmarks are meant for a GPU; use --device cpu --quick for a smoke run"

# Every row carries these top-level fields (bench/report.py and tests rely on them).
ROW_FIELDS = (
    "op", "provider", "shape", "dtype", "mode", "variant",
    "ms_p20", "ms_p50", "ms_p80", "gbps", "frac_peak_bw", "tflops", "frac_peak_flops",
    "peak_bytes", "launches",
    "device", "device_type", "torch", "triton", "cuda", "git_sha", "timestamp", "run_id",
    "extras",
)

# ---------------------------------------------------------------------------------
# Device peaks ("fraction of peak" columns)
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    name: str
    gbps: float             # memory bandwidth, GB/s (1e9 bytes/s)
    bf16_tflops: float      # dense bf16 tensor-core TFLOP/s
    requires: tuple[tuple[str, ...], ...]  # any of these token sets, all tokens present
    forbids: tuple[str, ...] = ()


# Most specific first. torch.cuda.get_device_name() spells them e.g.
# "NVIDIA GeForce RTX 3090", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe",
# "NVIDIA H100 80GB HBM3" (the SXM part), "NVIDIA H100 PCIe", "NVIDIA H200".
DEVICE_PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("RTX 3090", 936.0, 71.0, (("rtx", "3090"),), forbids=("ti",)),
    DevicePeak("A100 80GB", 2039.0, 312.0, (("a100", "80gb"),)),
    DevicePeak("H100 PCIe", 2000.0, 756.0, (("h100", "pcie"),)),
    DevicePeak("H100 SXM", 3350.0, 989.0, (("h100", "sxm"), ("h100", "sxm5"), ("h100", "hbm3"))),
    DevicePeak("H200", 4800.0, 989.0, (("h200",),), forbids=("nvl",)),
)


def _name_tokens(name: str) -> set[str]:
    return set(t for t in re.split(r"[^a-z0-9]+", name.lower()) if t)


def device_peak(device_name: str | None) -> DevicePeak | None:
    """The peak-table entry whose name matches `device_name`, or None if unknown."""
    if not device_name:
        return None
    tokens = _name_tokens(device_name)
    for peak in DEVICE_PEAKS:
        if any(t in tokens for t in peak.forbids):
            continue
        if any(all(t in tokens for t in req) for req in peak.requires):
            return peak
    return None


# ---------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------


def resolve_device(requested: str | None) -> torch.device:
    """cuda if requested (or by default) and present; raises NoGPU otherwise."""
    if requested in (None, "cuda"):
        if not torch.cuda.is_available():
            raise NoGPU(NO_GPU_MESSAGE)
        return torch.device("cuda", torch.cuda.current_device())
    if requested == "cpu":
        return torch.device("cpu")
    raise ValueError(f"--device must be cuda or cpu, got {requested!r}")


class NoGPU(RuntimeError):
    pass


def use_triton_interpreter_on_cpu(device: torch.device, providers) -> None:
    """A CPU run of dbkernels-triton needs Triton's interpreter, switched on before dbkernels
    defines its @triton.jit functions (the suites import dbkernels only after this)."""
    if device.type == "cpu" and "dbkernels-triton" in providers and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        os.environ["TRITON_INTERPRET"] = "1"
        print("note: set TRITON_INTERPRET=1 so dbkernels-triton runs on CPU (interpreter: timings meaningless)")


def is_backend_unavailable(exc: BaseException) -> bool:
    """True for dbkernels.BackendUnavailable: a provider that cannot run here (a skip, not a failure)."""
    try:
        import dbkernels
    except Exception:  # noqa: BLE001 - the bench must report, not crash, if dbkernels is broken
        return False
    return isinstance(exc, dbkernels.BackendUnavailable)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else "unknown"


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        return None
    return getattr(triton, "__version__", None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine() or "unknown"
    return f"CPU ({proc})"


def environment(device: torch.device) -> dict[str, Any]:
    """Fields shared by every row of one run on `device`."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "git_sha": git_sha(),
        "run_id": uuid.uuid4().hex[:12],
    }


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------


def quantiles(samples: Sequence[float], qs: Iterable[float] = QUANTILES) -> list[float]:
    """Linearly interpolated quantiles (same rule as torch.quantile / numpy 'linear')."""
    xs = sorted(float(s) for s in samples)
    if not xs:
        raise ValueError("quantiles of an empty sample")
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


@dataclasses.dataclass(frozen=True)
class TimingBudget:
    """How long to measure. On CUDA warmup_ms/rep_ms go to do_bench; on CPU the loop
    runs cpu_warmup + cpu_reps calls."""
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_warmup: int = 3
    cpu_reps: int = 20


QUICK_BUDGET = TimingBudget(warmup_ms=5.0, rep_ms=20.0, cpu_warmup=1, cpu_reps=5)


def _reset_grads(grad_to_none: Sequence[torch.Tensor] | None) -> None:
    for t in grad_to_none or ():
        t.grad = None


def _as_three(result) -> tuple[float, float, float]:
    """do_bench returns a list with quantiles (one float in old versions / other modes)."""
    if isinstance(result, (int, float)):
        return float(result), float(result), float(result)
    vals = [float(v) for v in result]
    if len(vals) == 1:
        return vals[0], vals[0], vals[0]
    if len(vals) != 3:
        raise RuntimeError(f"unexpected do_bench result {result!r}")
    return vals[0], vals[1], vals[2]


def _cuda_event_bench(fn, budget: TimingBudget, grad_to_none) -> tuple[float, float, float]:
    """CUDA-event timing with an L2 flush before each rep (fallback when Triton is absent)."""
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warmup = max(1, int(budget.warmup_ms / estimate))
    n_rep = max(5, int(budget.rep_ms / estimate))
    for _ in range(n_warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        _reset_grads(grad_to_none)
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    p20, p50, p80 = quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])
    return p20, p50, p80


def _cpu_bench(fn, budget: TimingBudget, grad_to_none) -> tuple[float, float, float]:
    for _ in range(max(1, budget.cpu_warmup)):
        _reset_grads(grad_to_none)
        fn()
    samples = []
    for _ in range(max(1, budget.cpu_reps)):
        _reset_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    p20, p50, p80 = quantiles(samples)
    return p20, p50, p80


def time_ms(fn: Callable[[], Any], device: torch.device, budget: TimingBudget = TimingBudget(),
            grad_to_none: Sequence[torch.Tensor] | None = None) -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds of one call of `fn` on `device`.

    `grad_to_none` tensors get .grad = None before every rep (outside the timed
    region), so a step containing backward() does not accumulate into old grads.
    """
    if device.type != "cuda":
        return _cpu_bench(fn, budget, grad_to_none)
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001 - no usable triton: time with CUDA events ourselves
        return _cuda_event_bench(fn, budget, grad_to_none)
    kwargs = dict(warmup=budget.warmup_ms, rep=budget.rep_ms, quantiles=list(QUANTILES))
    if grad_to_none:
        kwargs["grad_to_none"] = list(grad_to_none)
    try:
        result = do_bench(fn, return_mode="median", **kwargs)
    except TypeError:  # a Triton without return_mode
        result = do_bench(fn, **kwargs)
    return _as_three(result)


# ---------------------------------------------------------------------------------
# Memory and launches
# ---------------------------------------------------------------------------------


def peak_bytes(fn: Callable[[], Any], device: torch.device,
               grad_to_none: Sequence[torch.Tensor] | None = None) -> int | None:
    """Peak bytes allocated by one call of `fn` beyond what was held before it."""
    if device.type != "cuda":
        return None
    _reset_grads(grad_to_none)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    _reset_grads(grad_to_none)
    return int(peak)


# Kineto activity types of device work: kernels, memcpys, memsets. Not counted: GPU-side
# user annotations (record_function ranges, e.g. torch.compile's), sync events, overhead.
_DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def _is_device_work(evt) -> bool:
    if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
        return False
    kind = getattr(evt, "activity_type", None)
    if isinstance(kind, str) and kind:
        return kind in _DEVICE_WORK
    name = str(getattr(evt, "name", ""))  # older torch: no activity type, go by name
    return "sync" not in name.lower() and not name.startswith("##")


def count_launches(fn: Callable[[], Any], device: torch.device, warmup: int = 2,
                   grad_to_none: Sequence[torch.Tensor] | None = None) -> int | None:
    """GPU kernels + memsets + memcpys of one call of `fn` (after `warmup` calls).

    Counted from torch.profiler's device-side events (CUDA activity). None on CPU, or
    when the profiler recorded no device work at all (CUPTI unavailable).
    """
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    for _ in range(max(0, warmup)):
        _reset_grads(grad_to_none)
        fn()
    _reset_grads(grad_to_none)
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    _reset_grads(grad_to_none)
    n = sum(1 for evt in prof.events() if _is_device_work(evt))
    return n if n > 0 else None


# ---------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
_DTYPE_ALIASES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "f16": torch.float16, "half": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "f32": torch.float32, "float": torch.float32, "float32": torch.float32,
    "fp64": torch.float64, "float64": torch.float64,
}


def parse_dtypes(text: str) -> list[torch.dtype]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part not in _DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {part!r}; expected one of bf16, fp16, fp32")
        out.append(_DTYPE_ALIASES[part])
    if not out:
        raise ValueError("--dtype named no dtype")
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def make_row(*, op: str, provider: str, shape: Sequence[int], dtype: torch.dtype | str, mode: str,
             ms: tuple[float, float, float], env: dict[str, Any], variant: str = "",
             bytes_moved: float | None = None, flops: float | None = None,
             peak_mem: int | None = None, launches: int | None = None,
             extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """One result row. GB/s and TFLOP/s are derived from the p50 time."""
    p20, p50, p80 = (float(v) for v in ms)
    secs = p50 * 1e-3
    gbps = bytes_moved / secs / 1e9 if bytes_moved is not None and secs > 0 else None
    tflops = flops / secs / 1e12 if flops is not None and secs > 0 else None
    peak = device_peak(env.get("device")) if env.get("device_type") == "cuda" else None
    return {
        "op": op,
        "provider": provider,
        "shape": [int(s) for s in shape],
        "dtype": dtype if isinstance(dtype, str) else dtype_name(dtype),
        "mode": mode,
        "variant": variant,
        "ms_p20": p20,
        "ms_p50": p50,
        "ms_p80": p80,
        "gbps": gbps,
        "frac_peak_bw": gbps / peak.gbps if gbps is not None and peak is not None else None,
        "tflops": tflops,
        "frac_peak_flops": tflops / peak.bf16_tflops if tflops is not None and peak is not None else None,
        "peak_bytes": peak_mem,
        "launches": launches,
        "device": env.get("device"),
        "device_type": env.get("device_type"),
        "torch": env.get("torch"),
        "triton": env.get("triton"),
        "cuda": env.get("cuda"),
        "git_sha": env.get("git_sha"),
        "timestamp": utc_now(),
        "run_id": env.get("run_id"),
        "extras": dict(extras or {}),
    }


class ResultWriter:
    """Appends rows to <out>/<op>.jsonl, one JSON object per line, flushed per row."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.written: list[dict[str, Any]] = []

    def path_for(self, op: str) -> Path:
        return self.out_dir / f"{op}.jsonl"

    def write(self, row: dict[str, Any]) -> None:
        missing = [f for f in ROW_FIELDS if f not in row]
        if missing:
            raise ValueError(f"row is missing fields {missing}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row, sort_keys=False, allow_nan=False, default=_json_default)
        with open(self.path_for(row["op"]), "a", encoding="utf-8") as f:
            f.write(line + "\n")
        self.written.append(row)


def _json_default(obj):
    if isinstance(obj, torch.dtype):
        return dtype_name(obj)
    if isinstance(obj, torch.Size):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------


def fmt(value, spec: str = ".3g", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float) and not math.isfinite(value):
        return none
    return format(value, spec)


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width table for terminal output."""
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
