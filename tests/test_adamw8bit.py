"""AdamW8bit: quantization maps, every backend against the reference (the spec), the
Optimizer contract, convergence parity with torch.optim.AdamW, stochastic rounding,
step_in_backward.

CPU: the reference, the Triton kernel under the interpreter (bit-exact: same fp32
operations), and the CUDA kernel of csrc/adamw8bit.cu compiled for the host by g++
against a small CUDA emulation (each CTA's 256 threads are std::threads, warp shuffles
are barrier exchanges), also bit-exact. GPU (marker gpu): the CUDA extension and compiled
Triton against the reference, allowing a few code flips per tensor (bitsandbytes style),
and the peak-memory drop of step_in_backward.
"""
from __future__ import annotations

import copy
import ctypes
import io
import shutil
import subprocess
from pathlib import Path

import pytest

from cuda_headers import cuda_include_dir
import torch

import dbkernels
from dbkernels.optim import AdamW8bit, quant, step_in_backward
from dbkernels.optim import reference as R

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def make_params(dtype, sizes=(3000, 5037, 100, 2048), seed=0, misaligned_last=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        if misaligned_last and i == len(sizes) - 1:
            out.append(torch.randn(n + 1, generator=g).to(dtype)[1:])  # storage offset 1: no vector path
        else:
            out.append(torch.randn(n, generator=g).to(dtype))
    return out


def make_grads(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g).to(p.dtype) for p in params] for _ in range(steps)]


def run_backend(backend, base, grads, device="cpu", **kw):
    params = [torch.nn.Parameter(b.detach().clone().to(device)) for b in base]
    opt = AdamW8bit(params, **{**HP, "min_8bit_size": 1000, **kw})
    with dbkernels.force_backend(backend):
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = None if g is None else g.to(device)
            opt.step()
    return params, opt


def assert_same_states(opt_a, params_a, opt_b, params_b, max_code_flips=0):
    for pa, pb in zip(params_a, params_b):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for k, va in sa.items():
            vb = sb[k]
            if not isinstance(va, torch.Tensor):
                assert va == vb, k
                continue
            va, vb = va.cpu(), vb.cpu()
            if va.dtype == torch.uint8 and max_code_flips:
                assert int((va != vb).sum()) <= max_code_flips, (k, int((va != vb).sum()))
            elif max_code_flips:
                torch.testing.assert_close(va, vb, rtol=1e-3, atol=1e-6)
            else:
                assert torch.equal(va, vb), (k, (va.float() - vb.float()).abs().max())


# ----------------------------------------------------------------------------- maps

def test_maps_are_sorted_exact_and_closed_form_is_nearest():
    um, sm = quant.unsigned_map(), quant.signed_map()
    used_u = um[: quant.UNSIGNED_MAX_CODE + 1]
    assert used_u[0] == 0 and used_u[-1] == 1.0 and bool((used_u[1:] > used_u[:-1]).all())
    mags = sm[: quant.SIGNED_MAX_MAG + 1]
    assert mags[-1] == 1.0 and bool((mags[1:] > mags[:-1]).all())
    assert torch.equal(sm[128:128 + quant.SIGNED_MAX_MAG + 1], -mags)
    assert um[1].item() == 2.0 ** -18 and mags[1].item() == 2.0 ** -10
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(20000, generator=g) ** p for p in (1, 4, 16)] +
                  [used_u, (used_u[1:] + used_u[:-1]) / 2, torch.tensor([0.0, 1.0])])
    x = x[(x == 0) | (x >= 2.0 ** -19)]  # below half the smallest code: the v guard (next lines)
    tiny = torch.tensor([2.0 ** -40, 2.0 ** -20, 1e-30])
    assert quant.quantize_unsigned_codes(tiny).tolist() == [1, 1, 1]  # positive v never becomes 0
    for table, enc, emax in ((used_u, quant.quantize_unsigned_codes, quant.UNSIGNED_MAX_CODE),
                             (mags, quant.quantize_signed_codes, quant.SIGNED_MAX_MAG)):
        c = enc(x).long()
        assert int(c.max()) <= emax
        err = (table[c] - x).abs()
        best = (table[None, :] - x[:, None]).abs().min(dim=1).values
        assert torch.equal(err, best), "closed-form code is not a nearest code"
    neg = quant.quantize_signed_codes(-x).long()
    assert torch.equal(sm[neg], -mags[quant.quantize_signed_codes(x).long()])


@pytest.mark.parametrize("block_size", [64, 256, 2048])
@pytest.mark.parametrize("numel", [1, 255, 5037])
def test_quantize_dequantize_roundtrip_error_bounds(block_size, numel):
    g = torch.Generator().manual_seed(numel)
    m = torch.randn(numel, generator=g) * torch.exp(2 * torch.randn(numel, generator=g))
    v = m * m
    for x, signed in ((m, True), (v, False)):
        codes, absmax = quant.quantize_blockwise(x, block_size, signed=signed)
        assert codes.dtype == torch.uint8 and codes.shape == (numel,)
        assert absmax.shape == (quant.num_blocks(numel, block_size),) and absmax.dtype == torch.float32
        y = quant.dequantize_blockwise(codes, absmax, block_size, signed=signed)
        a = absmax[torch.arange(numel) // block_size]
        emin = quant.SIGNED_EMIN if signed else quant.UNSIGNED_EMIN
        mb = quant.MBITS
        normal = x.abs() >= a * 2.0 ** emin
        rel = ((y - x).abs() / x.abs())[normal]
        assert rel.numel() == 0 or rel.max().item() <= 2.0 ** -(mb + 1) + 1e-7   # half a mantissa step
        sub = ~normal
        tiny = (y - x).abs()[sub] / a[sub]
        # half a subnormal step; unsigned: up to one step (positive values never round to 0)
        bound = 2.0 ** (emin - mb - (1 if signed else 0))
        assert tiny.numel() == 0 or tiny.max().item() <= bound * (1 + 1e-6)
        assert bool((torch.sign(y) == torch.sign(x))[y != 0].all())
        amax_pos = (x.abs() == a)  # the absmax element is exact
        assert torch.equal(y[amax_pos].abs(), x[amax_pos].abs())
    zero_codes, zero_absmax = quant.quantize_blockwise(torch.zeros(300), 256, signed=True)
    assert int(zero_codes.max()) == 0 and float(zero_absmax.max()) == 0.0


def test_state_bytes_per_parameter():
    # SD-like mix: big matrices and a few small vectors (fp32 state below min_8bit_size);
    # SD1.5's UNet: 0.04% of its parameters are in tensors below 4096 elements.
    shapes = [(640, 640)] * 6 + [(320, 320, 3, 3)] * 2 + [(1280,)] * 5 + [(320,)] * 5
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = AdamW8bit(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    per_param = opt.state_bytes() / sum(p.numel() for p in params)
    assert per_param <= 2.05, per_param
    big = opt.state[params[0]]
    assert big["state1"].dtype == torch.uint8 and big["absmax1"].dtype == torch.float32
    assert "exp_avg" in opt.state[params[-1]] and opt.state[params[-1]]["exp_avg"].dtype == torch.float32


# ----------------------------------------------------------------------------- backends on CPU

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_reference_bitwise(cpu_triton, dtype):
    base = make_params(dtype)
    grads = make_grads(base, 3)
    pr, orf = run_backend("reference", base, grads)
    pt, otr = run_backend("triton", base, grads)
    for a, b in zip(pr, pt):
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()
    assert_same_states(orf, pr, otr, pt)


def test_triton_block_sizes_and_no_sr(cpu_triton):
    base = make_params(torch.bfloat16, sizes=(4096 + 7, 300))
    grads = make_grads(base, 2)
    for bs in (32, 1024):
        pr, orf = run_backend("reference", base, grads, block_size=bs, stochastic_rounding=False)
        pt, otr = run_backend("triton", base, grads, block_size=bs, stochastic_rounding=False)
        assert all(torch.equal(a, b) for a, b in zip(pr, pt))
        assert_same_states(orf, pr, otr, pt)


# --- the CUDA kernel, compiled for the host against a CUDA emulation ---------------------

EMU_SHIM = r"""
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#undef __launch_bounds__
#define __launch_bounds__(...)
namespace emu {
inline thread_local uint3 tid, bid;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
inline float shfl[64][32];
inline long misaligned = 0;
}  // namespace emu
#define DBK_CHECK_ALIGN(ptr, bytes) \
  do { if (reinterpret_cast<uintptr_t>(ptr) % (bytes)) \
         __atomic_add_fetch(&::emu::misaligned, 1, __ATOMIC_RELAXED); } while (0)
#define threadIdx (::emu::tid)
#define blockIdx (::emu::bid)
#define blockDim (dim3(256, 1, 1))
inline void __syncthreads() {}
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline float __shfl_xor_sync(unsigned, float v, int off) {
  const unsigned lane = threadIdx.x & 31u, w = threadIdx.x >> 5;
  emu::shfl[w][lane] = v;
  emu::warp_bars[w]->arrive_and_wait();
  const float r = emu::shfl[w][lane ^ static_cast<unsigned>(off)];
  emu::warp_bars[w]->arrive_and_wait();
  return r;
}
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
namespace emu {
inline void launch(const std::function<void()>& body, dim3 grid, dim3 block) {
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    warp_bars.clear();
    for (unsigned w = 0; w < block.x / 32; ++w) warp_bars.emplace_back(new std::barrier<>(32));
    std::vector<std::thread> th;
    for (unsigned t = 0; t < block.x; ++t)
      th.emplace_back([&, t] { tid = make_uint3(t, 0, 0); bid = make_uint3(bx, 0, 0); body(); });
    for (auto& x : th) x.join();
  }
}
}  // namespace emu
#define DBK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  (::emu::launch([&] { kernel(__VA_ARGS__); }, (grid), (block)), (void)0)
"""

EMU_DRIVER = r"""
#include "adamw8bit.cu"
extern "C" int emu_step(const int64_t* meta, const int32_t* cta, int64_t num_ctas, int dtype, int block_size,
                        const float* sc, uint32_t step, int sr, long* misaligned) {
  dbk::AdamW8bitArgs a;
  a.meta = reinterpret_cast<const dbk::AdamWTensor*>(meta);
  a.cta_tensor = cta;
  a.num_ctas = num_ctas;
  a.dtype = static_cast<dbk::AdamDType>(dtype);
  a.block_size = block_size;
  a.b1 = sc[0]; a.omb1 = sc[1]; a.b2 = sc[2]; a.omb2 = sc[3]; a.eps = sc[4];
  a.step_size = sc[5]; a.inv_sqrt_bc2 = sc[6]; a.decay = sc[7];
  a.step = step;
  a.stochastic_rounding = sr != 0;
  emu::misaligned = 0;
  const int rc = static_cast<int>(dbk::adamw8bit_step(a, nullptr));
  *misaligned = emu::misaligned;
  return rc;
}
"""


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH: cannot build the CPU emulation of csrc/adamw8bit.cu")
    inc = cuda_include_dir()
    if inc is None:
        pytest.skip("CUDA headers not found: cannot build the CPU emulation of csrc/adamw8bit.cu")
    d = tmp_path_factory.mktemp("adamw_emu")
    (d / "shim.h").write_text(EMU_SHIM)
    (d / "driver.cpp").write_text(EMU_DRIVER)
    cmd = [gxx, "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread", "-Wno-attributes",
           f"-I{inc}", f"-I{CSRC}", "-include", str(d / "shim.h"), "-x", "c++", str(d / "driver.cpp"),
           "-o", str(d / "emu.so")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "<barrier>" in res.stderr:
        pytest.skip("g++ lacks C++20 <barrier>")
    assert res.returncode == 0, res.stderr[-4000:]
    return ctypes.CDLL(str(d / "emu.so"))


def _emu_step(lib, items, group, step, dtype):
    from dbkernels.optim import cuda as C

    rows, ctas, first = [], [], 0
    for p, g, s in items:
        rows.append(C._row(p, g, s, first))
        ctas.append(C.num_ctas(p.numel(), group["block_size"]))
        first += ctas[-1]
    meta = torch.tensor(rows, dtype=torch.int64)
    cta = torch.repeat_interleave(torch.arange(len(ctas), dtype=torch.int32), torch.tensor(ctas))
    sc = torch.tensor(C._hyper_args(group, step), dtype=torch.float32)
    mis = ctypes.c_long(0)
    P = ctypes.c_void_p
    rc = lib.emu_step(P(meta.data_ptr()), P(cta.data_ptr()), ctypes.c_int64(cta.numel()), C.DTYPE_CODE[dtype],
                      group["block_size"], P(sc.data_ptr()), ctypes.c_uint32(step),
                      int(group["stochastic_rounding"] and dtype == torch.bfloat16), ctypes.byref(mis))
    assert rc == 0, f"cudaError_t {rc}"
    assert mis.value == 0, "misaligned vector access (would fault on a GPU)"


@pytest.mark.parametrize("block_size", [128, 256, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_emulated_cuda_kernel_matches_reference_bitwise(emu_lib, dtype, block_size):
    base = make_params(dtype, sizes=(3000, 5037, 100, 2048))
    grads = make_grads(base, 3)
    ref_params, ref_opt = run_backend("reference", base, grads, block_size=block_size)
    # The same updates through the multi-tensor kernel: one launch over all four tensors.
    params = [torch.nn.Parameter(b.detach().clone()) for b in base]
    opt = AdamW8bit(params, **{**HP, "min_8bit_size": 1000, "block_size": block_size})
    group = opt.param_groups[0]
    states = [opt._init_state(p, group, i) for i, p in enumerate(params)]
    for t, gs in enumerate(grads, 1):
        for s in states:
            s["step"] = t
        _emu_step(emu_lib, [(p.data, g, s) for p, g, s in zip(params, gs, states)], group, t, dtype)
    for a, b in zip(ref_params, params):
        assert torch.equal(a, b), (a.float() - b.float()).abs().max()
    assert_same_states(ref_opt, ref_params, opt, params)


def test_multi_tensor_glue_with_emulated_kernel(emu_lib, monkeypatch):
    """dbkernels/optim/cuda.py (table build, cache, grad-pointer refresh, one launch per
    dtype group) driving the emulated kernel on CPU tensors, against the reference."""
    from dbkernels.optim import adamw8bit as A
    from dbkernels.optim import cuda as C

    launches = []

    class FakeOps:
        @staticmethod
        def cuda_adamw8bit_step(meta, cta_tensor, dtype, bs, b1, omb1, b2, omb2, eps, step_size, inv_sqrt_bc2,
                                decay, step, sr):
            launches.append((meta.shape[0], dtype))
            sc = torch.tensor([b1, omb1, b2, omb2, eps, step_size, inv_sqrt_bc2, decay], dtype=torch.float32)
            mis = ctypes.c_long(0)
            P = ctypes.c_void_p
            rc = emu_lib.emu_step(P(meta.data_ptr()), P(cta_tensor.data_ptr()), ctypes.c_int64(cta_tensor.numel()),
                                  dtype, bs, P(sc.data_ptr()), ctypes.c_uint32(step), int(sr), ctypes.byref(mis))
            assert rc == 0 and mis.value == 0

    base = make_params(torch.bfloat16, sizes=(3000, 100, 2048)) + make_params(torch.float32, sizes=(1500,), seed=4)
    grads = make_grads(base, 3)
    ref_params, ref_opt = run_backend("reference", base, grads)
    monkeypatch.setattr(C._ext, "load", lambda: FakeOps)
    monkeypatch.setattr(A, "_impl", lambda device, block_size: ("cuda", C))
    params = [torch.nn.Parameter(b.detach().clone()) for b in base]
    opt = AdamW8bit(params, **{**HP, "min_8bit_size": 1000})
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()  # new addresses every step: the cached table refreshes its grad column
        opt.step()
    assert launches == [(3, 2), (1, 0)] * 3  # one launch per dtype group per step
    assert len(opt._cuda_cache) == 2
    for a, b in zip(ref_params, params):
        assert torch.equal(a, b)
    assert_same_states(ref_opt, ref_params, opt, params)


# --- the vectorised CPU step (multi_tensor.py) against the per-tensor reference ----------

def run_per_tensor_reference(base, grads, **kw):
    """The spec as it is written: reference.update_ on one tensor at a time (the path of
    step_in_backward), with the optimizer's state initialisation."""
    from dbkernels.optim import adamw8bit as A

    params = [torch.nn.Parameter(b.detach().clone()) for b in base]
    opt = AdamW8bit(params, **{**HP, "min_8bit_size": 1000, **kw})
    group = opt.param_groups[0]
    for gs in grads:
        for i, (p, g) in enumerate(zip(params, gs)):
            if g is None:
                continue
            if not opt.state[p]:
                opt._init_state(p, group, i)
            st = opt.state[p]
            st["step"] += 1
            A._update_one(R, p.data, g, st, group, st["step"])
    return params, opt


def assert_bitwise(a, b):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x.detach().reshape(-1).view(torch.uint8), y.detach().reshape(-1).view(torch.uint8))
        sa, sb = oa.state[x], ob.state[y]
        assert sa.keys() == sb.keys()
        for k, v in sa.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v.view(torch.uint8), sb[k].view(torch.uint8)), k
            else:
                assert v == sb[k], k


def _mixed_case(dtype, steps=3, seed=0):
    """Small (fp32 state) and large (8-bit) tensors, sizes that are not multiples of any
    block size, tensors larger than a work chunk, zero blocks, values far below 2^EMIN of
    their block's absmax, large gradients (absmax > 2^8), a parameter without a gradient
    in one step."""
    g = torch.Generator().manual_seed(seed)
    sizes = [3000, 5037, 100, 2048, 30001, 1, 999, 8192 + 7, 4096, 257, 1000]
    base = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    grads = []
    for t in range(steps):
        gs = [(torch.randn(n, generator=g) * (1e-2, 1e4, 1.0)[t % 3]).to(dtype) for n in sizes]
        gs[2] = torch.zeros(sizes[2], dtype=dtype)
        gs[4][:5000] = 0                      # whole zero blocks
        gs[0][:10] = 1e-30                    # far below the block's absmax
        gs[1][::7] *= 1e-6
        if t == 1:
            gs[3] = None                      # no gradient this step
        grads.append(gs)
    return base, grads


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block_size", [32, 256, 4096])
@pytest.mark.parametrize("dtype,sr", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False),
                                      (torch.float16, True)])
def test_multi_tensor_cpu_step_matches_per_tensor_reference_bitwise(monkeypatch, dtype, sr, block_size, threads):
    from dbkernels.optim import multi_tensor as MT

    monkeypatch.setattr(MT, "CHUNK", 8192)    # several chunks, tensors cut across chunks
    calls = []
    monkeypatch.setattr(R, "update_", lambda *a, **k: calls.append(1))   # the vectorised path must not use it
    base, grads = _mixed_case(dtype)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = run_backend("reference", base, grads, block_size=block_size, stochastic_rounding=sr)
    finally:
        torch.set_num_threads(old_threads)
    assert not calls
    monkeypatch.undo()
    assert_bitwise(ours, run_per_tensor_reference(base, grads, block_size=block_size, stochastic_rounding=sr))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_tensor_non_finite_and_non_contiguous(monkeypatch, dtype, threads):
    from dbkernels.optim import multi_tensor as MT

    monkeypatch.setattr(MT, "CHUNK", 2048)
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(5000, generator=g), torch.randn(600, generator=g), torch.randn(80, 60, generator=g).t()]
    base = [b.to(dtype) for b in base]
    grads = [[torch.randn(b.shape, generator=g).to(dtype) for b in base] for _ in range(4)]
    grads[1][0][7] = float("nan")
    grads[2][0][4000] = float("inf")
    grads[1][1][3] = float("inf")
    grads[3][0][100:200] = 3e30               # v = g^2 overflows to inf (fp32)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = run_backend("reference", base, grads)
    finally:
        torch.set_num_threads(old_threads)
    assert not ours[0][2].is_contiguous()
    assert_bitwise(ours, run_per_tensor_reference(base, grads))


def test_multi_tensor_falls_back_when_subnormals_are_flushed():
    from dbkernels.optim import multi_tensor as MT

    assert MT.subnormals_work()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert not MT.subnormals_work()
        base, grads = _mixed_case(torch.float32, steps=2)
        ours = run_backend("reference", base, grads)
        ref = run_per_tensor_reference(base, grads)
    finally:
        torch.set_flush_denormal(False)
    assert_bitwise(ours, ref)


def test_sqrt_rn_is_correctly_rounded():
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.rand(200000, generator=g) * torch.exp(torch.randn(200000, generator=g) * 20),
                   torch.tensor([0.0, 1e-45, 1e-40, 2.0 ** -126, 1.0, 2.0, 3.4e38, float("inf")])]).float()
    assert torch.equal(R.sqrt_rn(v), torch.sqrt(v.double()).float())


# ----------------------------------------------------------------------------- optimizer contract

def test_fp32_state_path_matches_torch_adamw():
    base = make_params(torch.float32, sizes=(500, 700), misaligned_last=False)
    grads = make_grads(base, 10)
    ours, _ = run_backend("reference", base, grads)  # both below min_8bit_size: fp32 state
    ref = [torch.nn.Parameter(b.clone()) for b in base]
    opt = torch.optim.AdamW(ref, **HP)
    for gs in grads:
        for p, g in zip(ref, gs):
            p.grad = g.clone()
        opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_8bit_step_close_to_torch_adamw():
    base = make_params(torch.float32, sizes=(20000,), misaligned_last=False)
    grads = make_grads(base, 20)
    (ours,), _ = run_backend("reference", base, grads, lr=1e-3)
    ref = torch.nn.Parameter(base[0].clone())
    opt = torch.optim.AdamW([ref], **{**HP, "lr": 1e-3})
    for gs in grads:
        ref.grad = gs[0].clone()
        opt.step()
    moved = (ref - base[0]).abs().mean()
    assert (ours - ref).abs().mean() < 0.05 * moved


def test_param_groups_schedulers_skipped_params_zero_grad():
    a = torch.nn.Parameter(torch.randn(5000))
    b = torch.nn.Parameter(torch.randn(50))
    c = torch.nn.Parameter(torch.randn(50))  # never gets a gradient
    opt = AdamW8bit([{"params": [a]}, {"params": [b, c], "lr": 0.0, "weight_decay": 0.0}], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    b0, c0 = b.detach().clone(), c.detach().clone()
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    a0 = a.detach().clone()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5e-2
    assert torch.equal(b, b0) and torch.equal(c, c0) and c not in opt.state
    # first Adam step moves every element by ~lr (plus decay)
    torch.testing.assert_close((a0 * (1 - 1e-2 * 1e-2) - a).mean().item(), 1e-2, rtol=1e-3, atol=0)
    opt.zero_grad()
    assert a.grad is None and b.grad is None
    opt.step()  # no grads: nothing happens
    assert opt.state[a]["step"] == 1


def test_bad_inputs():
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match="lr must be >= 0"):
        AdamW8bit([p], lr=-1.0)
    for bs in (100, 0, 16, 8192, 256.0):
        with pytest.raises(ValueError, match="block_size must be a power of two"):
            AdamW8bit([p], block_size=bs)
    with pytest.raises(ValueError, match="betas"):
        AdamW8bit([p], betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="complex"):
        AdamW8bit([torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        AdamW8bit([torch.nn.Parameter(torch.randn(4, dtype=torch.float64))])
    with pytest.raises(ValueError, match="block_size"):
        AdamW8bit([p]).add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "block_size": 3})
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = AdamW8bit(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_non_contiguous_param():
    base = torch.randn(80, 60)
    p = torch.nn.Parameter(base.t())  # non-contiguous view
    q = torch.nn.Parameter(base.t().contiguous())
    g = torch.randn(60, 80)
    for x in (p, q):
        x.grad = g.clone()
        AdamW8bit([x], min_8bit_size=100).step()
    assert torch.equal(p, q)


def _train(params, opt, grads_fn, steps):
    for t in range(steps):
        for p, g in zip(params, grads_fn(t)):
            p.grad = g
        opt.step()


def test_state_dict_roundtrip_resumes_bitwise():
    dtype = torch.bfloat16
    base = make_params(dtype, sizes=(5000, 300, 2049), misaligned_last=False)
    grads = make_grads(base, 10)
    params = [torch.nn.Parameter(b.clone()) for b in base]
    opt = AdamW8bit(params, **HP, min_8bit_size=1000)
    _train(params, opt, lambda t: grads[t], 5)
    saved_params = [p.detach().clone() for p in params]
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    _train(params, opt, lambda t: grads[5 + t], 5)

    params2 = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = AdamW8bit(params2, lr=123.0, min_8bit_size=1000)  # hyperparameters come from the state dict
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.param_groups[0]["lr"] == HP["lr"]
    assert opt2.state[params2[0]]["absmax1"].dtype == torch.float32  # not cast to bf16
    _train(params2, opt2, lambda t: grads[5 + t], 5)
    for a, b in zip(params, params2):
        assert torch.equal(a, b)
    assert_same_states(opt, params, opt2, params2)
    with pytest.raises(ValueError, match="parameters"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3))]).load_state_dict(opt.state_dict())


# ----------------------------------------------------------------------------- stochastic rounding

def test_stochastic_rounding_is_unbiased_and_deterministic():
    # values strictly between bf16 neighbours, rounded with many keys
    g = torch.Generator().manual_seed(0)
    x = (1.0 + torch.rand(512, generator=g) * 2.0 ** -7).float()  # in [1, 1 + 1 ulp)
    x = torch.cat([x, -x, x * 1e-20])
    n_keys = 400
    acc = torch.zeros_like(x, dtype=torch.float64)
    for k in range(n_keys):
        y = R.stochastic_round_bf16(x, R.sr_key(12345, k + 1))
        assert bool(((y.float() - x).abs() <= x.abs() * 2.0 ** -7).all())
        acc += y.double()
    mean = acc / n_keys
    ulp = x.abs().double() * 2.0 ** -7
    # std of one rounding <= ulp / 2: the mean of n is within 5 sigma
    assert bool(((mean - x.double()).abs() <= 5 * 0.5 * ulp / n_keys ** 0.5).all())
    bias = ((mean - x.double()) / ulp).mean().item()
    assert abs(bias) < 0.01
    a = R.stochastic_round_bf16(x, 7)
    assert torch.equal(a, R.stochastic_round_bf16(x, 7))
    assert not torch.equal(a, R.stochastic_round_bf16(x, 8))
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    out = R.stochastic_round_bf16(special, 3)
    assert out[0] == float("inf") and out[1] == float("-inf") and out[2].isnan() and out[3] == 0


def test_pure_bf16_training_small_updates_need_sr():
    # lr * update << bf16 ulp at 1.0: round-to-nearest never moves, SR moves by the right mean
    base = [torch.ones(8192, dtype=torch.bfloat16)]
    steps = 50
    grads = [[torch.ones(8192, dtype=torch.bfloat16)] for _ in range(steps)]
    kw = dict(lr=1e-4, weight_decay=0.0)
    (rn,), _ = run_backend("reference", base, grads, stochastic_rounding=False, **kw)
    (sr,), _ = run_backend("reference", base, grads, stochastic_rounding=True, **kw)
    assert torch.equal(rn, base[0])
    # Adam with a constant gradient moves by lr per step
    torch.testing.assert_close(sr.float().mean().item(), 1.0 - steps * 1e-4, rtol=0, atol=steps * 1e-4 * 0.05)


# ----------------------------------------------------------------------------- convergence parity

def _linear_regression_loss(opt_factory, seed, steps=200):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(1024, 256, generator=g)
    w = torch.randn(256, 64, generator=g) / 16
    y = x @ w + 0.5 * torch.randn(1024, 64, generator=g)
    model = torch.nn.Linear(256, 64)  # 16384-element weight: 8-bit state
    opt = opt_factory(model.parameters())
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item()


def _mlp_regression_loss(opt_factory, seed, steps=200):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 16, generator=g)
    w = torch.randn(16, 4, generator=g) / 4
    y = torch.sin(2 * x @ w).sum(1, keepdim=True) + 0.3 * torch.randn(2048, 1, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 1))
    opt = opt_factory(model.parameters())
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item()


def test_convergence_parity_regression():
    for seed in range(2):
        ref = _linear_regression_loss(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2), seed)
        ours = _linear_regression_loss(lambda ps: AdamW8bit(ps, lr=1e-2, weight_decay=1e-2), seed)
        assert abs(ours - ref) <= 0.02 * ref, (seed, ours, ref)
    # Non-convex: the loss after 200 steps is chaotic in the trajectory (fp32 AdamW with a
    # 3% larger lr ends 7% lower), so compare the mean over three initialisations, and
    # one-sided: parity means the 8-bit states cost nothing, i.e. ours ends at most 2%
    # above torch AdamW. Ending lower is no loss of parity (measured: 2.04% lower, from the
    # quantization noise on this trajectory), but far lower would mean it optimizes a
    # different problem (a wrong effective lr, say), so the band below is the chaos' 10%.
    ref = [_mlp_regression_loss(lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=1e-2), s) for s in range(3)]
    ours = [_mlp_regression_loss(lambda ps: AdamW8bit(ps, lr=3e-3, weight_decay=1e-2, min_8bit_size=1024), s)
            for s in range(3)]
    assert 0.90 * sum(ref) <= sum(ours) <= 1.02 * sum(ref), (ours, ref)


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)


def _unet_loss(opt_factory, steps, seed=0):
    """Fresh noisy batches each step (like diffusion training); held-out batch loss at the end.
    target = a fixed channel mix of the input + a text-conditioning offset + noise (floor 0.25)."""
    torch.manual_seed(seed)
    model = _tiny_unet()
    g = torch.Generator().manual_seed(5)
    mix = torch.randn(4, 4, generator=g) / 2

    def batch(n):
        x = torch.randn(n, 4, 8, 8, generator=g)
        ctx = torch.randn(n, 3, 16, generator=g)
        t = torch.randint(0, 1000, (n,), generator=g)
        y = (torch.einsum("oc,nchw->nohw", mix, x) + ctx.mean((1, 2))[:, None, None, None]
             + 0.5 * torch.randn(n, 4, 8, 8, generator=g))
        return x, ctx, t, y

    held_out = batch(32)
    opt = opt_factory(model.parameters())
    for _ in range(steps):
        x, ctx, t, y = batch(8)
        loss = torch.nn.functional.mse_loss(model(x, t, encoder_hidden_states=ctx).sample, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x, ctx, t, y = held_out
        return torch.nn.functional.mse_loss(model(x, t, encoder_hidden_states=ctx).sample, y).item()


@pytest.mark.slow
def test_convergence_parity_tiny_unet():
    pytest.importorskip("diffusers")
    ref = _unet_loss(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-2), 200)
    # min_8bit_size=1024: most of this small UNet's tensors take the 8-bit path
    ours = _unet_loss(lambda ps: AdamW8bit(ps, lr=1e-3, weight_decay=1e-2, min_8bit_size=1024), 200)
    assert abs(ours - ref) <= 0.02 * ref, (ours, ref)


# ----------------------------------------------------------------------------- step_in_backward

def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 96), torch.nn.GELU(), torch.nn.Linear(96, 64),
                               torch.nn.GELU(), torch.nn.Linear(64, 4)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_in_backward_matches_ordinary_step(dtype):
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(32, 16, generator=g).to(dtype), torch.randn(32, 4, generator=g).to(dtype)) for _ in range(5)]
    m1, m2 = _mlp(dtype=dtype), _mlp(dtype=dtype)
    o1 = AdamW8bit(m1.parameters(), lr=1e-2, min_8bit_size=1000)
    o2 = AdamW8bit(m2.parameters(), lr=1e-2, min_8bit_size=1000)
    for x, y in data:
        torch.nn.functional.mse_loss(m1(x), y).backward()
        o1.step()
        o1.zero_grad()
    handle = step_in_backward(m2, o2)
    for x, y in data:
        torch.nn.functional.mse_loss(m2(x), y).backward()
        assert all(p.grad is None for p in m2.parameters())
    with pytest.raises(RuntimeError, match="step_in_backward is active"):
        o2.step()
    handle.remove()
    assert not handle.active
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert_same_states(o1, list(m1.parameters()), o2, list(m2.parameters()))
    o2.step()  # ordinary steps work again (no grads: no-op)


def test_step_in_backward_misuse_and_per_tensor_clipping():
    m = _mlp()
    opt = AdamW8bit(m.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="gradient accumulation"):
        step_in_backward(m, opt, gradient_accumulation_steps=4)
    with pytest.raises(TypeError, match="AdamW8bit"):
        step_in_backward(m, torch.optim.AdamW(m.parameters()))
    m(torch.randn(2, 16)).sum().backward()
    with pytest.raises(RuntimeError, match="already hold a gradient"):
        step_in_backward(m, opt)
    opt.zero_grad()
    with step_in_backward(m, opt, max_grad_norm_per_tensor=1e-3) as h:
        with pytest.raises(RuntimeError, match="already active"):
            step_in_backward(m, opt)
        (1e6 * m(torch.randn(8, 16)).sum()).backward()
    assert not h.active and opt._sib_handle is None
    assert all(opt.state[p]["step"] == 1 for p in m.parameters())


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


def _gpu_compare(backend, dtype, block_size=256):
    base = make_params(dtype, sizes=(3000, 5037, 100, 2048, 1 << 20))
    grads = make_grads(base, 3)
    pr, orf = run_backend("reference", base, grads, block_size=block_size)
    pg, og = run_backend(backend, base, grads, device="cuda", block_size=block_size)
    # a few code flips per tensor (division / sqrt on the device may round differently)
    assert_same_states(orf, pr, og, pg, max_code_flips=max(4, base[-1].numel() // 20000))
    for a, b in zip(pr, pg):
        tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
        torch.testing.assert_close(b.cpu().float(), a.float(), rtol=tol, atol=tol * 1e-2)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backend_matches_reference(backend, dtype):
    _gpu_compare(backend, dtype)


@gpu
@pytest.mark.parametrize("block_size", [128, 512, 1024])
def test_gpu_cuda_block_sizes(block_size):
    _gpu_compare("cuda", torch.bfloat16, block_size)


@gpu
def test_gpu_state_dict_across_devices():
    base = make_params(torch.bfloat16, sizes=(5000, 300), misaligned_last=False)
    grads = make_grads(base, 6)
    params = [torch.nn.Parameter(b.cuda()) for b in base]
    opt = AdamW8bit(params, min_8bit_size=1000)
    _train(params, opt, lambda t: [g.cuda() for g in grads[t]], 3)
    sd = copy.deepcopy(opt.state_dict())
    cpu_params = [torch.nn.Parameter(p.detach().cpu()) for p in params]
    cpu_opt = AdamW8bit(cpu_params, min_8bit_size=1000)
    cpu_opt.load_state_dict(sd)
    assert cpu_opt.state[cpu_params[0]]["state1"].device.type == "cpu"
    _train(cpu_params, cpu_opt, lambda t: grads[3 + t], 3)
    _train(params, opt, lambda t: [g.cuda() for g in grads[3 + t]], 3)
    for a, b in zip(cpu_params, params):
        torch.testing.assert_close(b.cpu().float(), a.float(), rtol=2 ** -7, atol=1e-3)


@gpu
def test_gpu_step_in_backward_saves_gradient_memory():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)]).cuda()
    x = torch.randn(16, 2048, device="cuda")
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def peak(use_sib):
        opt = AdamW8bit(model.parameters(), lr=1e-4)
        handle = step_in_backward(model, opt) if use_sib else None
        for _ in range(2):  # second step: states exist in both runs
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model(x).square().mean().backward()
            if not use_sib:
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            out = torch.cuda.max_memory_allocated() - base
        if handle:
            handle.remove()
        return out

    plain, sib = peak(False), peak(True)
    assert plain - sib >= 0.7 * grad_bytes, (plain, sib, grad_bytes)


# ----------------------------------------------------------------------------- benchmark suite

def test_sd15_state_bytes_per_parameter_from_shapes():
    pytest.importorskip("diffusers")
    import math

    from bench import optim as B

    shapes = B.sd15_shapes()
    numel = [math.prod(s) for s in shapes]
    assert len(shapes) == 686 and 859_000_000 < sum(numel) < 860_000_000
    state = sum(2 * n + 8 * quant.num_blocks(n, 256) if n >= 4096 else 8 * n for n in numel)
    assert state / sum(numel) <= 2.05


def test_bench_suite_cpu_smoke(tmp_path):
    import argparse

    from bench import common
    from bench import optim as B

    opts = argparse.Namespace(device=torch.device("cpu"), dtypes=[torch.float32], providers=["dbkernels-reference"],
                              quick=True, memory="off")
    writer = common.ResultWriter(tmp_path)
    assert B.run(opts, writer) == 0
    (row,) = writer.written
    assert row["op"] == "adamw8bit" and row["mode"] == "step" and row["extras"]["check"] == "ok"
    assert row["extras"]["state_bytes_per_param"] < 2.1
