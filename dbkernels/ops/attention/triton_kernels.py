"""Triton kernels for fused attention (spec: reference.py), FlashAttention-2 style.

Forward: one program per (BLOCK_M queries, batch*head); online softmax over key
blocks in the log2 domain (exp2), fp32 accumulators, saves lse (natural log, fp32).
Backward, deterministic (no atomics), three launches:
  _bwd_preprocess   delta = rowsum(dout * out)                       (B, H, Lq) fp32
  _bwd_dkdv_kernel  one program per BLOCK_N keys, loops over query blocks
  _bwd_dq_kernel    one program per BLOCK_M queries, loops over key blocks
The probabilities are recomputed from q, k and lse; no Lq x Lk matrix is stored.

Head dims. A dot needs power-of-two tiles, so the head dim is covered either by one
padded tile, BLOCK_D0 = next_pow2(D) (40 -> 64, 80 -> 128, 160 -> 256), or split
into two tiles BLOCK_D0 + BLOCK_D1 with less padding (40 -> 32 + 16, 80 -> 64 + 16,
96 -> 64 + 32, 160 -> 128 + 32: exact for 80, 96 and 160): every dot over D becomes
two dots, every (., D) accumulator two accumulators (HAS_HI). Both layouts are
autotune configs on the GPU, so the measured faster one is used per shape; masked
loads make the padding columns zero.

Any strides are accepted for q, k, v, out, dout (the (B, L, H, D) -> (B, H, L, D)
transposed views of diffusers run without copies). When every batch / head / row
stride is a multiple of 8 elements (always for D % 8 == 0 layouts), they are passed
divided by 8 and multiplied back in the kernel (constexpr SM = 8): Triton's JIT only
marks integer arguments divisible by 16, so the head stride 40 of a (B, L, H, 40)
view would otherwise hide the 16-byte alignment and leave the loads scalar and
unpipelined (checked on the compiled TTGIR for sm_86). key_bias arrives as fp32
contiguous (B, H, Lk) and is added to the scores (times log2(e) in the exp2 domain).

Tiles: on a GPU the kernels are autotuned per (Lq, Lk, D, bias, precision) over
configs whose shared-memory estimate fits the device (the 3090's ~100 KB per SM as
well as the H100's 228 KB); under TRITON_INTERPRET=1 one small fixed config is used
(split layout where there is one; INTERPRET_SPLIT = False forces the padded one).
fp32 inputs use input_precision="ieee" (no tf32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _backend, _triton
from . import curated_configs

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------- tile helpers

@triton.jit
def _load_rows(base, rows, s_row, cols, s_col, mask_rows, D):
    """(len(rows), len(cols)) tile, zero outside rows / D."""
    return tl.load(base + rows[:, None] * s_row + cols[None, :] * s_col,
                   mask=mask_rows[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def _load_cols(base, rows, s_row, cols, s_col, mask_rows, D):
    """The transposed tile (len(cols), len(rows)), zero outside rows / D."""
    return tl.load(base + rows[None, :] * s_row + cols[:, None] * s_col,
                   mask=mask_rows[None, :] & (cols < D)[:, None], other=0.0)


@triton.jit
def _store_rows(base, rows, s_row, cols, s_col, mask_rows, D, x):
    tl.store(base + rows[:, None] * s_row + cols[None, :] * s_col, x.to(base.dtype.element_ty),
             mask=mask_rows[:, None] & (cols < D)[None, :])


# ---------------------------------------------------------------------------- kernels

@triton.jit
def _fwd_kernel(Q, K, V, Bias, O, LSE, qk_scale,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                H, Lq, Lk, D: tl.constexpr,
                HAS_BIAS: tl.constexpr, PREC: tl.constexpr, SM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, HAS_HI: tl.constexpr):
    # strides of the batch / head / row dims arrive divided by SM (8 when all are multiples of 8),
    # so the compiler knows their 16-byte alignment (e.g. the head stride 40 of a (B, L, H, 40) view)
    sqb, sqh, sqm = sqb * SM, sqh * SM, sqm * SM
    skb, skh, skn = skb * SM, skh * SM, skn * SM
    svb, svh, svn = svb * SM, svh * SM, svn * SM
    sob, soh, som = sob * SM, soh * SM, som * SM
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, BLOCK_D0)
    d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    mask_m = offs_m < Lq
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    bias_base = Bias + pid_bh.to(tl.int64) * Lk

    q0 = _load_rows(q_base, offs_m, sqm, d0, sqd, mask_m, D)
    if HAS_HI:
        q1 = _load_rows(q_base, offs_m, sqm, d1, sqd, mask_m, D)
    # A finite start keeps exp2(m_i - m_new) and exp2(s - m_new) NaN-free when a whole key block
    # is -inf (key_bias = log 0 for zero-weight keys); masked columns stay exactly 0.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_M, BLOCK_D0), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_D1), dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < Lk
        s = tl.dot(q0, _load_cols(k_base, cols, skn, d0, skd, mask_n, D), input_precision=PREC)
        if HAS_HI:
            s += tl.dot(q1, _load_cols(k_base, cols, skn, d1, skd, mask_n, D), input_precision=PREC)
        s = s * qk_scale
        if HAS_BIAS:
            s += tl.load(bias_base + cols, mask=mask_n, other=0.0)[None, :] * 1.4426950408889634
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = _load_rows(v_base, cols, svn, d0, svd, mask_n, D)
        p = p.to(v0.dtype)
        acc0 = acc0 * alpha[:, None] + tl.dot(p, v0, input_precision=PREC)
        if HAS_HI:
            v1 = _load_rows(v_base, cols, svn, d1, svd, mask_n, D)
            acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=PREC)
        m_i = m_new

    o_base = O + b * sob + h * soh
    _store_rows(o_base, offs_m, som, d0, sod, mask_m, D, acc0 / l_i[:, None])
    if HAS_HI:
        _store_rows(o_base, offs_m, som, d1, sod, mask_m, D, acc1 / l_i[:, None])
    # lse in natural log: (m + log2 l) * ln 2
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453,
             mask=mask_m)


@triton.jit
def _bwd_preprocess(O, DO, Delta, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, Lq, D: tl.constexpr,
                    SM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # strides of the batch / head / row dims arrive divided by SM (8 when all are multiples of 8),
    # so the compiler knows their 16-byte alignment (e.g. the head stride 40 of a (B, L, H, 40) view)
    sob, soh, som = sob * SM, soh * SM, som * SM
    sdb, sdh, sdm = sdb * SM, sdh * SM, sdm * SM
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Lq
    o = _load_rows(O + b * sob + h * soh, offs_m, som, offs_d, sod, mask_m, D)
    do = _load_rows(DO + b * sdb + h * sdh, offs_m, sdm, offs_d, sdd, mask_m, D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=mask_m)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, Bias, DO, LSE, Delta, DK, DV, qk_scale, sm_scale,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     sdb, sdh, sdm, sdd, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                     H, Lq, Lk, D: tl.constexpr,
                     HAS_BIAS: tl.constexpr, PREC: tl.constexpr, SM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, HAS_HI: tl.constexpr):
    # strides of the batch / head / row dims arrive divided by SM (8 when all are multiples of 8),
    # so the compiler knows their 16-byte alignment (e.g. the head stride 40 of a (B, L, H, 40) view)
    sqb, sqh, sqm = sqb * SM, sqh * SM, sqm * SM
    skb, skh, skn = skb * SM, skh * SM, skn * SM
    svb, svh, svn = svb * SM, svh * SM, svn * SM
    sdb, sdh, sdm = sdb * SM, sdh * SM, sdm * SM
    sdkb, sdkh, sdkn = sdkb * SM, sdkh * SM, sdkn * SM
    sdvb, sdvh, sdvn = sdvb * SM, sdvh * SM, sdvn * SM
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    d0 = tl.arange(0, BLOCK_D0)
    d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    mask_n = offs_n < Lk
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    row_base = pid_bh.to(tl.int64) * Lq

    k0 = _load_rows(K + b * skb + h * skh, offs_n, skn, d0, skd, mask_n, D)
    v0 = _load_rows(V + b * svb + h * svh, offs_n, svn, d0, svd, mask_n, D)
    if HAS_HI:
        k1 = _load_rows(K + b * skb + h * skh, offs_n, skn, d1, skd, mask_n, D)
        v1 = _load_rows(V + b * svb + h * svh, offs_n, svn, d1, svd, mask_n, D)
    if HAS_BIAS:
        kb = tl.load(Bias + pid_bh.to(tl.int64) * Lk + offs_n, mask=mask_n, other=0.0) * 1.4426950408889634

    dk0 = tl.zeros((BLOCK_N, BLOCK_D0), dtype=tl.float32)
    dv0 = tl.zeros((BLOCK_N, BLOCK_D0), dtype=tl.float32)
    dk1 = tl.zeros((BLOCK_N, BLOCK_D1), dtype=tl.float32)
    dv1 = tl.zeros((BLOCK_N, BLOCK_D1), dtype=tl.float32)
    for start_m in range(0, Lq, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < Lq
        qt0 = _load_cols(q_base, rows, sqm, d0, sqd, mask_m, D)                    # (D0, M)
        st = tl.dot(k0, qt0, input_precision=PREC)                                 # (N, M)
        if HAS_HI:
            qt1 = _load_cols(q_base, rows, sqm, d1, sqd, mask_m, D)
            st += tl.dot(k1, qt1, input_precision=PREC)
        st = st * qk_scale
        if HAS_BIAS:
            st += kb[:, None]
        lse = tl.load(LSE + row_base + rows, mask=mask_m, other=0.0) * 1.4426950408889634
        pt = tl.math.exp2(st - lse[None, :])
        pt = tl.where(mask_n[:, None] & mask_m[None, :], pt, 0.0)
        do0 = _load_rows(do_base, rows, sdm, d0, sdd, mask_m, D)                   # (M, D0)
        dv0 += tl.dot(pt.to(do0.dtype), do0, input_precision=PREC)
        dpt = tl.dot(v0, tl.trans(do0), input_precision=PREC)                      # (N, M)
        if HAS_HI:
            do1 = _load_rows(do_base, rows, sdm, d1, sdd, mask_m, D)
            dv1 += tl.dot(pt.to(do1.dtype), do1, input_precision=PREC)
            dpt += tl.dot(v1, tl.trans(do1), input_precision=PREC)
        delta = tl.load(Delta + row_base + rows, mask=mask_m, other=0.0)
        dst = (pt * (dpt - delta[None, :])).to(qt0.dtype)
        dk0 += tl.dot(dst, tl.trans(qt0), input_precision=PREC)
        if HAS_HI:
            dk1 += tl.dot(dst, tl.trans(qt1), input_precision=PREC)

    dk_base = DK + b * sdkb + h * sdkh
    dv_base = DV + b * sdvb + h * sdvh
    _store_rows(dk_base, offs_n, sdkn, d0, sdkd, mask_n, D, dk0 * sm_scale)
    _store_rows(dv_base, offs_n, sdvn, d0, sdvd, mask_n, D, dv0)
    if HAS_HI:
        _store_rows(dk_base, offs_n, sdkn, d1, sdkd, mask_n, D, dk1 * sm_scale)
        _store_rows(dv_base, offs_n, sdvn, d1, sdvd, mask_n, D, dv1)


@triton.jit
def _bwd_dq_kernel(Q, K, V, Bias, DO, LSE, Delta, DQ, qk_scale, sm_scale,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   sdb, sdh, sdm, sdd, sdqb, sdqh, sdqm, sdqd,
                   H, Lq, Lk, D: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PREC: tl.constexpr, SM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, HAS_HI: tl.constexpr):
    # strides of the batch / head / row dims arrive divided by SM (8 when all are multiples of 8),
    # so the compiler knows their 16-byte alignment (e.g. the head stride 40 of a (B, L, H, 40) view)
    sqb, sqh, sqm = sqb * SM, sqh * SM, sqm * SM
    skb, skh, skn = skb * SM, skh * SM, skn * SM
    svb, svh, svn = svb * SM, svh * SM, svn * SM
    sdb, sdh, sdm = sdb * SM, sdh * SM, sdm * SM
    sdqb, sdqh, sdqm = sdqb * SM, sdqh * SM, sdqm * SM
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, BLOCK_D0)
    d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    mask_m = offs_m < Lq
    row_base = pid_bh.to(tl.int64) * Lq
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    bias_base = Bias + pid_bh.to(tl.int64) * Lk

    q0 = _load_rows(q_base, offs_m, sqm, d0, sqd, mask_m, D)
    do0 = _load_rows(do_base, offs_m, sdm, d0, sdd, mask_m, D)
    if HAS_HI:
        q1 = _load_rows(q_base, offs_m, sqm, d1, sqd, mask_m, D)
        do1 = _load_rows(do_base, offs_m, sdm, d1, sdd, mask_m, D)
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + row_base + offs_m, mask=mask_m, other=0.0)

    dq0 = tl.zeros((BLOCK_M, BLOCK_D0), dtype=tl.float32)
    dq1 = tl.zeros((BLOCK_M, BLOCK_D1), dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < Lk
        k0 = _load_rows(k_base, cols, skn, d0, skd, mask_n, D)                     # (N, D0)
        s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
        dp = tl.dot(do0, _load_cols(v_base, cols, svn, d0, svd, mask_n, D), input_precision=PREC)
        if HAS_HI:
            k1 = _load_rows(k_base, cols, skn, d1, skd, mask_n, D)
            s += tl.dot(q1, tl.trans(k1), input_precision=PREC)
            dp += tl.dot(do1, _load_cols(v_base, cols, svn, d1, svd, mask_n, D), input_precision=PREC)
        s = s * qk_scale
        if HAS_BIAS:
            s += tl.load(bias_base + cols, mask=mask_n, other=0.0)[None, :] * 1.4426950408889634
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k0.dtype)
        dq0 += tl.dot(ds, k0, input_precision=PREC)
        if HAS_HI:
            dq1 += tl.dot(ds, k1, input_precision=PREC)

    dq_base = DQ + b * sdqb + h * sdqh
    _store_rows(dq_base, offs_m, sdqm, d0, sdqd, mask_m, D, dq0 * sm_scale)
    if HAS_HI:
        _store_rows(dq_base, offs_m, sdqm, d1, sdqd, mask_m, D, dq1 * sm_scale)


# ---------------------------------------------------------------------------- head-dim layouts

MIN_TILE = 16  # smallest dot dimension


def block_d(d: int) -> int:
    """The single padded tile covering head dim d."""
    return max(MIN_TILE, triton.next_power_of_2(d))


def head_layouts(d: int) -> list[tuple[int, int, bool]]:
    """(BLOCK_D0, BLOCK_D1, HAS_HI) layouts covering d: the padded one, plus a two-tile
    split when it pads less (40: 32+16, 80: 64+16, 96: 64+32, 160: 128+32)."""
    padded = block_d(d)
    out = [(padded, MIN_TILE, False)]
    lo = triton.next_power_of_2(d) // 2
    if lo >= MIN_TILE and d > lo:
        hi = max(MIN_TILE, triton.next_power_of_2(d - lo))
        if lo + hi < padded:
            out.append((lo, hi, True))
    return out


# Every layout any supported head dim (8..256, multiple of 8) can use.
_ALL_LAYOUTS = sorted({lay for d in range(8, 257, 8) for lay in head_layouts(d)})

# Under the interpreter: one small config (autotuning would run every config in Python).
_INTERP_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32)
INTERPRET_SPLIT = True  # tests flip it to cover the padded layout too


def _width(kw) -> int:
    return kw["BLOCK_D0"] + (kw["BLOCK_D1"] if kw["HAS_HI"] else 0)


# Shared-memory models, fitted to what Triton 3.6 allocates (kernels compiled without a GPU for
# sm_86 and sm_90, see tests/test_attention.py::test_triton_kernels_compile_for_sm86_and_sm90):
# the streamed tiles (and the bias / lse / delta vectors) take max(stages - 1, 1) buffers on
# sm_80-89 and `stages` buffers on sm_90 (wgmma); the resident tiles one; fp32 (no tensor-core
# operand path) also stages the (BLOCK_M x BLOCK_N) probability tile.

def _fwd_smem(bm, bn, bd, stages, esize=2, hopper=False):
    bufs = stages if hopper else max(stages - 1, 1)
    return bufs * (2 * bn * bd * esize + 4 * bn) + bm * bd * esize + (bm * bn * esize if esize == 4 else 0)


def _bwd_smem_model(streamed, resident, bm, bn, bd, stages, esize, hopper):
    bufs = stages if hopper else max(stages - 1, 1)
    return (bufs * (2 * streamed * bd * esize + 8 * streamed) + 2 * resident * bd * esize
            + (bm * bn * esize if esize == 4 else 0))


def _dkdv_smem(bm, bn, bd, stages, esize=2, hopper=False):  # k, v resident; q, dout streamed
    return _bwd_smem_model(bm, bn, bm, bn, bd, stages, esize, hopper)


def _dq_smem(bm, bn, bd, stages, esize=2, hopper=False):  # q, dout resident; k, v streamed
    return _bwd_smem_model(bn, bm, bm, bn, bd, stages, esize, hopper)


def _prune(kernel: str, estimate):
    def prune(configs, named_args, **kwargs):
        d = int(named_args.get("D", kwargs.get("D")))
        layouts = set(head_layouts(d))
        esize = 4 if str(kwargs.get("PREC", named_args.get("PREC"))) == "ieee" else 2
        caps = _triton.device_caps(named_args["Q"].device)  # the tensors' device, or the AOT target
        mine = [c for c in configs
                if (c.kwargs["BLOCK_D0"], c.kwargs["BLOCK_D1"], c.kwargs["HAS_HI"]) in layouts]
        aot = _triton.aot_state()
        if aot is not None and aot.selection == "all":  # the sweep of `python -m dbkernels compile --full`
            return [c for c in mine if not aot.max_tile or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= aot.max_tile]
        curated = None if (aot is not None and aot.selection == "model") else curated_configs.lookup(
            kernel, caps, d, esize)
        if curated is not None:
            keep = [c for c in mine if curated.get(curated_configs.config_key(c), caps.smem_optin + 1)
                    <= caps.smem_optin]
            if keep:
                return keep

        def need(c):
            return estimate(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], _width(c.kwargs), c.num_stages, esize,
                            caps.hopper_or_newer)

        keep = [c for c in mine if need(c) * 1.1 <= caps.smem_optin]  # the models are within ~8% (see above)
        # nothing fits the estimate: the smallest one (the autotuner skips it too if it really does not fit)
        return keep or [min(mine, key=need)]
    return prune


def _fwd_configs():
    # 12 tiles per head layout (stages 1 = no pipelining: never better here); the prune step
    # keeps those of this D that fit the device
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D0": d0, "BLOCK_D1": d1, "HAS_HI": hi},
                          num_stages=stages, num_warps=4 if bm == 64 else 8)
            for d0, d1, hi in _ALL_LAYOUTS for bm in (64, 128) for bn in (32, 64, 128) for stages in (2, 3)]


def _bwd_configs():
    # 12 tiles per head layout, shared by the dK/dV kernel (BLOCK_N resident) and the dQ kernel. The
    # small tiles also come with 8 warps: at D=160 dK/dV every 4-warp tile spills registers (the
    # dK, dV accumulators and the resident K, V tiles of 160 columns; python -m dbkernels compile --full).
    tiles = ((32, 32, 2, 4), (32, 64, 2, 4), (64, 32, 2, 4), (64, 64, 2, 4), (64, 64, 3, 4), (64, 128, 2, 8),
             (128, 64, 2, 8), (128, 64, 3, 8), (128, 32, 2, 4), (32, 32, 2, 8), (32, 64, 2, 8), (64, 32, 2, 8))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D0": d0, "BLOCK_D1": d1, "HAS_HI": hi},
                          num_stages=stages, num_warps=warps)
            for d0, d1, hi in _ALL_LAYOUTS for bm, bn, stages, warps in tiles]


_KEY = ["Lq", "Lk", "D", "HAS_BIAS", "PREC", "SM"]

# cache_results: the chosen config per key is kept in Triton's on-disk cache, so only the first
# run on a machine pays for the tuning (roughly a minute per head dim, dtype and bias setting).
def _tuned(name, kernel, configs, model):
    return triton.autotune(configs, key=_KEY, prune_configs_by={"early_config_prune": _prune(name, model)},
                           cache_results=True)(kernel)


_fwd_tuned = _tuned("fwd", _fwd_kernel, _fwd_configs(), _fwd_smem)
_dkdv_tuned = _tuned("dkdv", _bwd_dkdv_kernel, _bwd_configs(), _dkdv_smem)
_dq_tuned = _tuned("dq", _bwd_dq_kernel, _bwd_configs(), _dq_smem)


def _launch(tuned, raw, grid_axis_len, bh, d, args, meta, block_name):
    device = args[0].device
    if _backend.triton_interpreting():
        layouts = head_layouts(d)
        d0, d1, hi = layouts[-1] if INTERPRET_SPLIT else layouts[0]
        blocks = dict(_INTERP_BLOCKS, BLOCK_D0=d0, BLOCK_D1=d1, HAS_HI=hi)
        _triton.launch(raw, (triton.cdiv(grid_axis_len, blocks[block_name]), bh), device, *args, **meta,
                       **blocks, num_warps=4)
    else:
        _triton.launch(tuned, lambda cfg: (triton.cdiv(grid_axis_len, cfg[block_name]), bh), device, *args,
                       **meta)


def _stride_mult(*tensors) -> int:
    """8 if every batch / head / row stride is a multiple of 8 elements (then passed divided by 8)."""
    return 8 if all(st % 8 == 0 for t in tensors for st in t.stride()[:3]) else 1


def _strides(x, sm):
    st = x.stride()
    return (st[0] // sm, st[1] // sm, st[2] // sm, st[3])


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------- host

def attention_fwd(q, k, v, key_bias, scale):
    """(out like q, lse fp32 (B, H, Lq)); key_bias None or fp32 contiguous (B, H, Lk)."""
    bsz, h, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((bsz, h, lq), device=q.device, dtype=torch.float32)
    sm = _stride_mult(q, k, v, out)
    args = (q, k, v, q if key_bias is None else key_bias, out, lse, scale * LOG2E,
            *_strides(q, sm), *_strides(k, sm), *_strides(v, sm), *_strides(out, sm), h, lq, lk, d)
    meta = dict(HAS_BIAS=key_bias is not None, PREC=_prec(q.dtype), SM=sm)
    _launch(_fwd_tuned, _fwd_kernel, lq, bsz * h, d, args, meta, "BLOCK_M")
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, key_bias, scale):
    """(dq like q, dk like k, dv like v)."""
    bsz, h, lq, d = q.shape
    lk = k.shape[2]
    bd = block_d(d)
    delta = torch.empty_like(lse)
    pre_bm = 64 if bd <= 128 else 32
    sm_pre = _stride_mult(out, dout)
    _triton.launch(
        _bwd_preprocess, (triton.cdiv(lq, pre_bm), bsz * h), q.device,
        out, dout, delta, *_strides(out, sm_pre), *_strides(dout, sm_pre), h, lq, d, SM=sm_pre,
        BLOCK_M=pre_bm, BLOCK_D=bd)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    sm = _stride_mult(q, k, v, dout, dq, dk, dv)
    bias = q if key_bias is None else key_bias
    meta = dict(HAS_BIAS=key_bias is not None, PREC=_prec(q.dtype), SM=sm)
    common = (*_strides(q, sm), *_strides(k, sm), *_strides(v, sm), *_strides(dout, sm))
    _launch(_dkdv_tuned, _bwd_dkdv_kernel, lk, bsz * h, d,
            (q, k, v, bias, dout, lse, delta, dk, dv, scale * LOG2E, scale, *common,
             *_strides(dk, sm), *_strides(dv, sm), h, lq, lk, d), meta, "BLOCK_N")
    _launch(_dq_tuned, _bwd_dq_kernel, lq, bsz * h, d,
            (q, k, v, bias, dout, lse, delta, dq, scale * LOG2E, scale, *common,
             *_strides(dq, sm), h, lq, lk, d), meta, "BLOCK_M")
    return dq, dk, dv


__all__ = ["INTERPRET_SPLIT", "attention_fwd", "attention_bwd", "block_d", "head_layouts"]
