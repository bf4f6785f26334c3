"""CUDA backend of AdamW8bit and AdamW4bit: glue to `torch.ops.dbkernels.cuda_adamw8bit_step`
(one launch for a whole table of tensors) and `cuda_adamw8bit_step_one` (csrc/adamw8bit.cu).
The module functions are AdamW8bit's; `FourBit` is AdamW4bit's (the same op with state_bits=4:
the kernel built for packed 4-bit states of dbkernels/optim/quant4.py; its quantized rows are
also flagged FLAG_4BIT, and the kernel skips a row whose flag disagrees with the launch).

The table (int64 (T, 9) rows of csrc/adamw8bit.h::AdamWTensor: addresses of param,
grad, states, numel, first CTA, seed | flags) and the CTA -> tensor map are built once
per (param group, device, dtype, step-bucket) and cached on the optimizer; only the
gradient column is re-uploaded when a gradient was reallocated at another address.
The optimizer clears the cache when it creates or loads states; a changed parameter set
or a parameter whose storage moved rebuilds the table.
"""
from __future__ import annotations

import torch

from dbkernels import _ext

from .reference import hyperparams

META_WORDS = 9
WARPS_PER_CTA = 8
FLAG_QUANT = 1
FLAG_ALIGNED = 2
FLAG_4BIT = 4      # with FLAG_QUANT: 4-bit states (csrc/adamw8bit.h::kAdamW4bit)
STATE_BITS = {8: 0, 4: FLAG_4BIT}  # state bit width (a launch's state_bits) -> the flag of its quantized rows
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_G_COL = 1


def unavailable_reason(bits: int = 8) -> str | None:
    """None if the loaded extension has the AdamW step for `bits`-bit states (8: AdamW8bit,
    4: AdamW4bit; csrc/adamw8bit_ops.cpp built in, and for 4 bits a build that knows the format)."""
    if bits not in STATE_BITS:
        raise ValueError(f"bits must be one of {sorted(STATE_BITS)}, got {bits!r}")
    why = _ext.unavailable_reason()
    if why is not None:
        return why
    ops = _ext.load()
    try:
        ops.cuda_adamw8bit_step  # noqa: B018 - attribute lookup resolves the op or raises
    except (AttributeError, RuntimeError):
        return ("the dbkernels CUDA extension was built without csrc/adamw8bit_ops.cpp "
                "(torch.ops.dbkernels.cuda_adamw8bit_step is missing); rebuild it")
    if bits != 8:
        # An older build has the step op without its state_bits argument: this op, added with
        # the 4-bit format, says so before a launch would fail on the schema.
        try:
            formats = int(ops.cuda_adamw_state_formats())
        except (AttributeError, RuntimeError):
            formats = 8
        if not formats & bits:
            return (f"the dbkernels CUDA extension predates the {bits}-bit AdamW states "
                    f"(torch.ops.dbkernels.cuda_adamw_state_formats is missing or lacks {bits}); "
                    f"{_ext._REBUILD_HINT}")
    return None


def num_ctas(numel: int, block_size: int) -> int:
    per = block_size * WARPS_PER_CTA
    return (numel + per - 1) // per


def _aligned(t: torch.Tensor, nbytes: int) -> bool:
    return t.data_ptr() % nbytes == 0


def _row(p, g, state, first_cta: int, state_bits: int = 8) -> list[int]:
    """One AdamWTensor row for a launch of `state_bits` (8 or 4) quantized states."""
    quant = "state1" in state
    four = quant and state_bits == 4
    s1 = state["state1"] if quant else state["exp_avg"]
    s2 = state["state2"] if quant else state["exp_avg_sq"]
    # The kernel trusts the sizes: a state of another format would be written out of bounds.
    n = p.numel()
    want = (n + 1) // 2 if four else n
    if s1.numel() != want or s2.numel() != want:
        raise ValueError(f"the {'4' if four else '8' if quant else '32'}-bit optimizer state of a parameter of "
                         f"{n} elements must have {want} elements per moment, got {s1.numel()}, {s2.numel()}")
    a1 = state["absmax1"].data_ptr() if quant else 0
    a2 = state["absmax2"].data_ptr() if quant else 0
    vec = 4 * p.element_size()
    svec = (2 if four else 4) if quant else 16  # bytes of 4 codes / 4 floats per lane access
    aligned = _aligned(p, vec) and _aligned(g, vec) and _aligned(s1, svec) and _aligned(s2, svec)
    flags = (FLAG_QUANT | STATE_BITS[state_bits] if quant else 0) | (FLAG_ALIGNED if aligned else 0)
    seed_flags = (state["seed"] & 0xFFFFFFFF) | (flags << 32)
    return [p.data_ptr(), g.data_ptr(), s1.data_ptr(), a1, s2.data_ptr(), a2, p.numel(), first_cta, seed_flags]


def _hyper_args(group, step: int) -> list:
    h = hyperparams(group["lr"], group["betas"][0], group["betas"][1], group["eps"], group["weight_decay"], step)
    return [h["b1"], h["omb1"], h["b2"], h["omb2"], h["eps"], h["step_size"], h["inv_sqrt_bc2"], h["decay"]]


class _Table:
    def __init__(self, rows: list[list[int]], ctas: list[int], device: torch.device, signature):
        self.signature = signature
        self.rows = rows
        self.meta = torch.tensor(rows, dtype=torch.int64).to(device)
        counts = torch.tensor(ctas, dtype=torch.int64)
        self.cta_tensor = torch.repeat_interleave(torch.arange(len(ctas), dtype=torch.int32), counts).to(device)
        self.grad_ptrs = [r[_G_COL] for r in rows]
        self.grad_aligned = [bool(r[8] >> 32 & FLAG_ALIGNED) for r in rows]


def multi_tensor_step(cache: dict, key, items, group, step: int, state_bits: int = 8) -> None:
    """Update every (p, g, state) of `items` (one device, one dtype, one step) in one launch.
    state_bits: 4 for AdamW4bit's quantized states (FourBit), else 8."""
    ops = _ext.load()
    bs = group["block_size"]
    prepared = []
    for p, g, state in items:
        if not p.is_contiguous():
            raise ValueError(f"the CUDA AdamW step needs contiguous parameters, got shape {tuple(p.shape)} "
                             f"with strides {p.stride()}")
        if g.dtype != p.dtype:
            g = g.to(p.dtype)
        prepared.append((p, g.contiguous(), state))
    # The optimizer clears the cache whenever it creates or loads state tensors, so the
    # parameters' identity and storage (p.data may be swapped) are all that can go stale.
    signature = (bs, state_bits) + tuple((id(p), p.data_ptr()) for p, _, _ in prepared)
    table = cache.get(key)
    if table is None or table.signature != signature:
        rows, ctas, first = [], [], 0
        for p, g, s in prepared:
            rows.append(_row(p, g, s, first, state_bits))
            c = num_ctas(p.numel(), bs)
            ctas.append(c)
            first += c
        table = _Table(rows, ctas, p.device, signature)
        cache[key] = table
    else:
        gptrs = [g.data_ptr() for _, g, _ in prepared]
        if gptrs != table.grad_ptrs:
            vec = 4 * prepared[0][0].element_size()
            if any(_aligned(g, vec) != al for (_, g, _), al in zip(prepared, table.grad_aligned)):
                # alignment changed: rebuild the rows (rare: a grad view at an odd offset)
                cache.pop(key)
                return multi_tensor_step(cache, key, items, group, step, state_bits)
            table.meta[:, _G_COL].copy_(torch.tensor(gptrs, dtype=torch.int64))
            table.grad_ptrs = gptrs
    if table.cta_tensor.numel() == 0:
        return
    dtype = prepared[0][0].dtype
    _launch(ops, table.meta, table.cta_tensor, dtype, bs, group, step, group["stochastic_rounding"], state_bits)
    # Freed grads / converted temporaries are safe: the caching allocator reuses their
    # memory only for work queued after this launch on the same stream.


def _launch(ops, meta, cta_tensor, dtype, block_size: int, group, step: int, stochastic_rounding,
            state_bits: int) -> None:
    # state_bits=8 is the op's default: left out, the 8-bit call also runs on an extension built
    # before the argument existed (unavailable_reason(bits=4) refuses such a build for 4 bits).
    extra = {} if state_bits == 8 else {"state_bits": state_bits}
    ops.cuda_adamw8bit_step(meta, cta_tensor, DTYPE_CODE[dtype], block_size, *_hyper_args(group, step), step,
                            bool(stochastic_rounding) and dtype == torch.bfloat16, **extra)


def update_(p, g, state, *, lr, betas, eps, weight_decay, step, block_size, stochastic_rounding):
    """One parameter (contiguous p, g of p's dtype): same contract as reference.update_."""
    ops = _ext.load()
    group = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    quant = "state1" in state
    s1 = state["state1"] if quant else state["exp_avg"]
    s2 = state["state2"] if quant else state["exp_avg_sq"]
    a1 = state["absmax1"] if quant else s1.new_empty(0)
    a2 = state["absmax2"] if quant else s1.new_empty(0)
    ops.cuda_adamw8bit_step_one(p, g, s1, a1, s2, a2, state["seed"] & 0xFFFFFFFF, block_size,
                                *_hyper_args(group, step), step,
                                bool(stochastic_rounding) and p.dtype == torch.bfloat16)


class FourBit:
    """AdamW4bit's CUDA glue (AdamW4bit's backend module): the table launch above with
    state_bits=4. update_ (one parameter, step_in_backward) launches a one-row table: the
    single-tensor op reads 8-bit states only."""

    IS_REFERENCE = False

    @staticmethod
    def multi_tensor_step(cache: dict, key, items, group, step: int) -> None:
        multi_tensor_step(cache, key, items, group, step, state_bits=4)

    @staticmethod
    def update_(p, g, state, *, lr, betas, eps, weight_decay, step, block_size, stochastic_rounding):
        """One parameter (contiguous p, g of p's dtype): same contract as reference4.update_."""
        if "state1" not in state:  # fp32 moments (a small tensor): the same as AdamW8bit's
            update_(p, g, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, step=step,
                    block_size=block_size, stochastic_rounding=stochastic_rounding)
            return
        ops = _ext.load()
        c = num_ctas(p.numel(), block_size)
        if c == 0:
            return
        meta = torch.tensor([_row(p, g, state, 0, state_bits=4)], dtype=torch.int64).to(p.device)
        cta_tensor = torch.zeros(c, dtype=torch.int32, device=p.device)
        group = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        _launch(ops, meta, cta_tensor, p.dtype, block_size, group, step, stochastic_rounding, state_bits=4)
