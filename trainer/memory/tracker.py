"""Peak bytes of live tensor storages, by phase and by category (trainer.memory.estimate).

A TorchDispatchMode sees every op's outputs; each new storage is counted until the
Python storage object dies (weakref callback: torch keeps one Python object per storage
while it lives). The same tracker runs on fake tensors (the estimate) and on real CPU
tensors (tests compare the two), so both sides are counted the same way.

Sizes are the storages' own byte counts, without the CUDA caching allocator's rounding
(trainer.memory.estimate adds that as part of its allowance).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

PHASES = ("forward", "backward", "optimizer")
CATEGORIES = ("weights", "gradients", "optimizer_state", "activations", "temporaries")


class _Live:
    """What one phase's peak looked like."""

    def __init__(self):
        self.peak = 0
        self.at_peak: dict[int, int] | None = None   # storage key -> bytes, when the peak was reached


class StorageTracker(TorchDispatchMode):
    """Counts live storages; `phase` is set by the caller (or by track_backward)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}        # storage key -> bytes
        self.born: dict[int, str] = {}        # storage key -> phase it was created in
        self._refs: dict[int, weakref.ref] = {}
        self._serial_of: dict[int, int] = {}  # storage address -> serial of the live storage there
        self._next = 0
        self.current = 0
        self.phase = "setup"
        self.peaks: dict[str, _Live] = {}
        self.grad_keys: set[int] = set()      # storages that were some parameter's .grad
        self._dirty: _Live | None = None      # a phase whose new peak is not snapshotted yet
        self._saved: dict[int, dict] = {}     # snapshots' keys -> (bytes, phase born), kept for classify()

    # ------------------------------------------------------------------ counting
    def key(self, t: torch.Tensor) -> int | None:
        """The serial number of t's storage while it lives (addresses are reused, serials are not)."""
        return self._serial_of.get(t.untyped_storage()._cdata)

    def add(self, t: torch.Tensor) -> None:
        """Count a tensor's storage if it is new (also weights made before the tracker started)."""
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        addr = st._cdata
        if addr in self._serial_of:
            return
        self._next += 1
        k = self._next
        self._serial_of[addr] = k
        n = st.nbytes()
        self.live[k] = n
        self.born[k] = self.phase
        self._refs[k] = weakref.ref(st, lambda _r, k=k, addr=addr: self._free(k, addr))
        self.current += n
        self._note_peak()

    def _free(self, k: int, addr: int) -> None:
        n = self.live.pop(k, None)
        if n is None:
            return
        if self._serial_of.get(addr) == k:
            del self._serial_of[addr]
        self._snapshot()   # the peak is a maximum just before something is freed
        self.current -= n
        self._refs.pop(k, None)

    def _note_peak(self) -> None:
        p = self.peaks.setdefault(self.phase, _Live())
        if self.current > p.peak:
            p.peak = self.current
            self._dirty = p

    def _snapshot(self) -> None:
        if self._dirty is not None:
            self._dirty.at_peak = dict(self.live)
            for k in self.live:
                self._saved[k] = (self.live[k], self.born.get(k, "setup"))
            self._dirty = None

    def set_phase(self, phase: str) -> None:
        self._snapshot()
        self.phase = phase
        self._note_peak()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out

    # ------------------------------------------------------------------ results
    def finish(self) -> None:
        self._snapshot()

    def note_grads(self, params) -> None:
        for p in params:
            if p.grad is not None and self.key(p.grad) is not None:
                self.grad_keys.add(self.key(p.grad))

    def classify(self, snapshot: dict[int, int], weight_keys: set[int], state_keys: set[int]) -> dict[str, int]:
        """Bytes per category of one snapshot. Weights, gradients and optimizer state by identity; the
        rest is an activation when the forward made it (saved for backward), else a temporary."""
        out = dict.fromkeys(CATEGORIES, 0)
        for k, n in snapshot.items():
            if k in weight_keys:
                cat = "weights"
            elif k in self.grad_keys:
                cat = "gradients"
            elif k in state_keys:
                cat = "optimizer_state"
            elif self._saved.get(k, (0, "setup"))[1] in ("setup", "forward"):
                cat = "activations"
            else:
                cat = "temporaries"
            out[cat] += n
        return out


class track_backward:
    """Within this context every Tensor.backward() call sets the tracker's phase to backward, and to
    optimizer once it returns; the parameters' gradients are noted as they are accumulated."""

    def __init__(self, tracker: StorageTracker, params, optimizer=None):
        self.tracker, self.params, self.optimizer = tracker, list(params), optimizer
        self._orig = None
        self._hooks = []

    def __enter__(self):
        tr = self.tracker
        orig = self._orig = torch.Tensor.backward

        def backward(t, *a, **kw):
            tr.set_phase("backward")
            try:
                return orig(t, *a, **kw)
            finally:
                tr.note_grads(self.params)
                tr.set_phase("optimizer")

        torch.Tensor.backward = backward
        for p in self.params:
            self._hooks.append(p.register_post_accumulate_grad_hook(lambda p: tr.note_grads([p])))
        opt = self.optimizer
        if opt is not None and hasattr(opt, "_step_param"):  # step_in_backward frees each grad in its own hook
            inner = opt._step_param

            def step_param(p, group):
                tr.note_grads([p])
                return inner(p, group)

            opt._step_param = step_param
        return self

    def __exit__(self, *exc):
        torch.Tensor.backward = self._orig
        for h in self._hooks:
            h.remove()
        opt = self.optimizer
        if opt is not None and "_step_param" in vars(opt):
            del opt._step_param
        return False
