"""Triton EMA update over many tensors in one launch (spec: reference.py).

One launch per (average dtype, weight dtype) group: a pointer table (the int64 address of
every average and every weight), each tensor's numel and rounding seed, and a block table
(per program: which tensor, and the first element of its block). A program casts its
tensor's addresses to pointers of the group's element types (the two type-carrier
arguments `avg0` / `w0` are the group's first tensors), updates BLOCK elements in fp32 and
writes the average back (bf16: stochastically rounded); a whole block is unmasked, so with
16-byte aligned tensors its loads and stores are vectorised, the tensor's last block is
masked. The tables depend only on the
tensors, so they are built once and cached; a step passes only the lerp coefficient and the
step's hash offset. Launched with enable_fp_fusion=False so it computes exactly the reference's
fp32 operations.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ... import _triton
from ...optim.reference import GOLDEN_INDEX as _GI
from ...optim.triton_kernels import _fmix32  # (AdamW8bit's stochastic rounding hashes the same way)
from . import reference

# Globals used inside @triton.jit must be tl.constexpr (a plain module int is a NameError for the GPU compiler).
GOLDEN_INDEX = tl.constexpr(_GI)
BLOCK = 4096          # elements per program
ALIGN = 16            # bytes: every tensor starting on this boundary lets the loads be vectorised
_CACHE_SIZE = 8       # tables kept (the trainer uses one or two groups)


@triton.jit
def _ema_block(a_ptr, w_ptr, offs, mask, seed, coeff, from_w, mix, SR: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:  # a whole block: unmasked, so the loads and stores can be vectorised
        a = tl.load(a_ptr + offs).to(tl.float32)
        w = tl.load(w_ptr + offs).to(tl.float32)
    x = tl.where(from_w != 0, w, a) + (w - a) * coeff   # torch.lerp's two sides
    if SR:
        key = _fmix32((seed.to(tl.uint32) + mix.to(tl.uint32)).to(tl.uint32))
        r = _fmix32((offs.to(tl.uint32) * GOLDEN_INDEX).to(tl.uint32) ^ key)
        bits = x.to(tl.uint32, bitcast=True)
        y = ((bits + (r & 0xFFFF)).to(tl.uint32) >> 16) << 16
        y = y.to(tl.uint32).to(tl.float32, bitcast=True)
        x = tl.where(x != x, x, y)   # (the low 16 bits are zero: the cast below is exact)
    if MASKED:
        tl.store(a_ptr + offs, x.to(a_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(a_ptr + offs, x.to(a_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["from_w", "mix"])  # new values every step: one compile
def _ema_kernel(avg_tab, w_tab, numel_tab, seed_tab, blk_tensor, blk_start, avg0, w0, coeff, from_w, mix,
                SR: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    start = tl.load(blk_start + pid)
    n = tl.load(numel_tab + t)
    seed = tl.load(seed_tab + t)
    a_ptr = tl.load(avg_tab + t).to(avg0.dtype)   # int64 address -> pointer of the group's element type
    w_ptr = tl.load(w_tab + t).to(w0.dtype)
    if ALIGNED:  # (the host checked every address; blocks start at multiples of BLOCK)
        a_ptr = tl.multiple_of(a_ptr, 16)
        w_ptr = tl.multiple_of(w_ptr, 16)
        start = tl.multiple_of(start, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _ema_block(a_ptr, w_ptr, offs, offs < n, seed, coeff, from_w, mix, SR, False)
    else:  # the tensor's last, partial block
        _ema_block(a_ptr, w_ptr, offs, offs < n, seed, coeff, from_w, mix, SR, True)


class _Tables:
    """The device tables of one group of tensors (see the module docstring)."""

    def __init__(self, averages, weights, seeds, device):
        numels = [a.numel() for a in averages]
        tensors, starts = [], []
        for k, n in enumerate(numels):
            nb = triton.cdiv(n, BLOCK)
            tensors += [k] * nb
            starts += range(0, nb * BLOCK, BLOCK)
        self.blocks = len(tensors)
        self.aligned = all(t.data_ptr() % ALIGN == 0 for t in (*averages, *weights))
        host = (
            [a.data_ptr() for a in averages], [w.data_ptr() for w in weights], numels, seeds, starts,
        )
        self.avg, self.w, self.numel, self.seed, self.blk_start = (
            torch.tensor(v, dtype=torch.int64).to(device) for v in host)
        self.blk_tensor = torch.tensor(tensors, dtype=torch.int32).to(device)


_tables: OrderedDict = OrderedDict()


def _tables_for(averages, weights, indices, seed, device) -> _Tables:
    """The cached tables of these tensors (the same addresses and sizes: the same tables)."""
    key = (str(device), seed, tuple(indices),
           tuple((a.data_ptr(), w.data_ptr(), a.numel()) for a, w in zip(averages, weights)))
    tab = _tables.get(key)
    if tab is None:
        tab = _tables[key] = _Tables(averages, weights, [reference.pair_seed(seed, i) for i in indices], device)
        while len(_tables) > _CACHE_SIZE:
            _tables.popitem(last=False)
    else:
        _tables.move_to_end(key)
    return tab


def update_(averages, weights, indices, decay: float, *, step: int, seed: int) -> None:
    """One group: contiguous averages of one dtype, contiguous weights of one dtype, on one device; indices =
    each pair's position in the caller's lists (its rounding seed)."""
    device = averages[0].device
    tab = _tables_for(averages, weights, indices, seed, device)
    coeff, from_w = reference.lerp_coefficients(decay)
    mix = reference.step_mix(step)
    mix = mix - (1 << 32) if mix >= (1 << 31) else mix  # the same bits as an int32 (Triton types it i32)
    _triton.launch(_ema_kernel, (tab.blocks,), device,
                   tab.avg, tab.w, tab.numel, tab.seed, tab.blk_tensor, tab.blk_start, averages[0], weights[0],
                   coeff, int(from_w), mix,
                   SR=averages[0].dtype == torch.bfloat16, ALIGNED=tab.aligned, BLOCK=BLOCK,
                   num_warps=8, enable_fp_fusion=False)
