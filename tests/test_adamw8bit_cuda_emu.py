"""AdamW8bit: the CUDA kernel of csrc/adamw8bit.cu compiled for the host by g++ against a
small CUDA emulation (each CTA's 256 threads are std::threads, warp shuffles are barrier
exchanges), bit-exact against the reference; and the multi-tensor glue of
dbkernels/optim/cuda.py driving that emulated kernel.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from cuda_headers import cuda_include_dir
import torch

from adamw8bit_helpers import HP, assert_same_states, make_grads, make_params, run_backend
from dbkernels.optim import AdamW8bit

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


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
                        const float* sc, uint32_t step, int sr, int state_bits, long* misaligned) {
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
  a.state_bits = state_bits;
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
                      int(group["stochastic_rounding"] and dtype == torch.bfloat16), 8, ctypes.byref(mis))
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
        # The schema of a build from before state_bits: the 8-bit glue must leave it out (default 8).
        @staticmethod
        def cuda_adamw8bit_step(meta, cta_tensor, dtype, bs, b1, omb1, b2, omb2, eps, step_size, inv_sqrt_bc2,
                                decay, step, sr):
            launches.append((meta.shape[0], dtype))
            sc = torch.tensor([b1, omb1, b2, omb2, eps, step_size, inv_sqrt_bc2, decay], dtype=torch.float32)
            mis = ctypes.c_long(0)
            P = ctypes.c_void_p
            rc = emu_lib.emu_step(P(meta.data_ptr()), P(cta_tensor.data_ptr()), ctypes.c_int64(cta_tensor.numel()),
                                  dtype, bs, P(sc.data_ptr()), ctypes.c_uint32(step), int(sr), 8,
                                  ctypes.byref(mis))
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
