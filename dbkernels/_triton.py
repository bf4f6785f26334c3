"""The one place every Triton kernel of dbkernels is launched from.

`launch(kernel, grid, device, *args, **meta)`:
  * runs the launch on the tensors' device (a device guard): Triton launches on the
    *current* CUDA device, so tensors on cuda:1 with cuda:0 current would otherwise
    launch on the wrong GPU;
  * counts the time of launches that had to compile or autotune first (a kernel the
    process had not specialised yet), so the trainer can say what the one-time cost
    was (`first_call_stats()`);
  * under `dbkernels.aot` (ahead-of-time compile for a GPU target, on any machine)
    compiles the kernel as the JIT would for these arguments, every autotune config it
    could pick, and launches nothing.

`device_caps(device)` answers "which GPU is this" for the tensors' device, or for the
target being compiled ahead of time.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch

# Opt-in shared memory per block (bytes) of the targets we compile for, and the
# conservative answer when nothing better is known.
SMEM_OPTIN = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
DEFAULT_SMEM = 99 * 1024


@dataclass(frozen=True)
class DeviceCaps:
    arch: int            # 86 for sm_86, 90 for sm_90, ...
    smem_optin: int      # bytes of shared memory one block may use

    @property
    def hopper_or_newer(self) -> bool:
        return self.arch >= 90


@dataclass
class AotState:
    """What an ahead-of-time compile run sets while it drives the host functions."""

    caps: DeviceCaps
    records: list = field(default_factory=list)   # (kernel name, config dict | None, CompiledKernel)
    config_filter: object = None                   # fn(kernel name, [Config]) -> [Config]
    selection: str = "jit"       # "jit": what the JIT may pick; "model": the smem model's prune; "all": every config
    max_tile: int | None = None  # with "all": only tiles of at most this many BLOCK_M x BLOCK_N elements


_local = threading.local()
_stats_lock = threading.Lock()
_stats = {"compile_tune_s": 0.0, "launches_compiled": 0}


def aot_state() -> AotState | None:
    return getattr(_local, "aot", None)


@contextlib.contextmanager
def aot_mode(state: AotState):
    prev = aot_state()
    _local.aot = state
    try:
        yield state
    finally:
        _local.aot = prev


def device_caps(device: torch.device | None) -> DeviceCaps:
    state = aot_state()
    if state is not None:
        return state.caps
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        arch = props.major * 10 + props.minor
        smem = getattr(props, "shared_memory_per_block_optin", None) or SMEM_OPTIN.get(arch, DEFAULT_SMEM)
        return DeviceCaps(arch, int(smem))
    return DeviceCaps(86, DEFAULT_SMEM)  # CPU (interpreter): tiles are fixed there anyway


def _is_autotuner(kernel) -> bool:
    from triton.runtime.autotuner import Autotuner

    return isinstance(kernel, Autotuner)


def _jit_fn(kernel):
    """The JITFunction under autotuners / heuristics (None under the interpreter)."""
    while not hasattr(kernel, "device_caches"):
        kernel = getattr(kernel, "fn", None)
        if kernel is None or not hasattr(kernel, "fn") and not hasattr(kernel, "device_caches"):
            return None
    return kernel


def _known_specialisations(kernel) -> int:
    jit = _jit_fn(kernel)
    if jit is None:  # interpreter: nothing is compiled
        return 0
    n = sum(len(c[0]) for c in jit.device_caches.values())
    if _is_autotuner(kernel):
        n += len(kernel.cache)
    return n


def launch(kernel, grid, device: torch.device, *args, **meta):
    """kernel[grid](*args, **meta) on `device`; see the module docstring."""
    state = aot_state()
    if state is not None:
        return _aot_compile(state, kernel, grid, args, meta)
    before = _known_specialisations(kernel)
    t0 = time.perf_counter()
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[grid](*args, **meta)
    if _known_specialisations(kernel) != before:  # compiled and/or tuned for these arguments
        with _stats_lock:
            _stats["compile_tune_s"] += time.perf_counter() - t0
            _stats["launches_compiled"] += 1


def first_call_stats() -> dict:
    """{compile_tune_s, launches_compiled}: time spent in launches that compiled or autotuned."""
    with _stats_lock:
        return dict(_stats)


def _aot_compile(state: AotState, kernel, grid, args, meta):
    name = _jit_fn(kernel).fn.__name__  # AOT runs with TRITON_INTERPRET=0: always a JITFunction
    if _is_autotuner(kernel):
        kernel.nargs = dict(zip(kernel.arg_names, args))
        try:
            configs = kernel.prune_configs(meta)
        finally:
            kernel.nargs = None
        if state.config_filter is not None:
            configs = state.config_filter(name, configs)
        fixed = {k: v for k, v in meta.items() if k.isupper()}  # the call's constexprs (HAS_BIAS, PREC, SM)
        for cfg in configs:
            compiled = kernel.fn.warmup(*args, grid=grid, **meta, **cfg.all_kwargs())
            state.records.append((name, dict(fixed, **cfg.all_kwargs()), compiled))
        return None
    if state.config_filter is not None and not state.config_filter(name, [None]):
        return None
    compiled = kernel.warmup(*args, grid=grid, **meta)
    keep = ("num_warps", "num_stages")
    state.records.append((name, {k: v for k, v in meta.items() if k.isupper() or k in keep}, compiled))
    return None
