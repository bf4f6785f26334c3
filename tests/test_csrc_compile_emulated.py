"""The kernels of csrc/diffusion_loss.cu, compiled for the host by g++ against a small CUDA
emulation (each block's threads are std::threads; __syncthreads and warp shuffles are
barriers), match the PyTorch reference: index math, vector/scalar tails, dtype
conversions, Philox noise and the one-pass last-block reduction all run for real.
"""
from __future__ import annotations

import ctypes
import importlib.util
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from cuda_headers import cuda_include_dir
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
GXX = shutil.which("g++")


# --------------------------------------------------------------------------------------
# CPU emulation of the diffusion_loss kernels
# --------------------------------------------------------------------------------------
SHIM = r"""
// CPU emulation of the CUDA features the dbkernels kernels use. Blocks run one after
// another; the threads of a block are std::threads (so __shared__ can be `static`).
#pragma once
#if !__has_include(<barrier>)
#error DBK_NO_BARRIER
#endif
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace dbk_emu {
inline thread_local uint3 tl_thread_idx;
inline thread_local uint3 tl_block_idx;
inline dim3 g_grid_dim, g_block_dim;
inline std::barrier<>* g_block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp_barriers;
inline float g_shfl[32][32];
inline std::atomic<long> g_misaligned{0};
inline void check_align(const void* p, unsigned bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) ++g_misaligned;
}
}  // namespace dbk_emu
#define DBK_CHECK_ALIGN(ptr, bytes) ::dbk_emu::check_align((ptr), (bytes))

#define threadIdx (::dbk_emu::tl_thread_idx)
#define blockIdx (::dbk_emu::tl_block_idx)
#define gridDim (::dbk_emu::g_grid_dim)
#define blockDim (::dbk_emu::g_block_dim)

inline void __syncthreads() { dbk_emu::g_block_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int off) {
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  auto& bar = *dbk_emu::g_warp_barriers[warp];
  dbk_emu::g_shfl[warp][lane] = v;
  bar.arrive_and_wait();
  const float r = dbk_emu::g_shfl[warp][lane ^ static_cast<unsigned>(off)];
  bar.arrive_and_wait();
  return r;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline float __ldcg(const float* p) { return std::atomic_ref<const float>(*p).load(); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

namespace dbk_emu {
template <typename Kernel, typename Args>
void launch(Kernel kernel, dim3 grid, unsigned block, const Args& args) {
  g_grid_dim = grid;
  g_block_dim = dim3(block, 1, 1);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::barrier<> bar(block);
      g_block_barrier = &bar;
      g_warp_barriers.clear();
      for (unsigned w = 0; w < block / 32; ++w) g_warp_barriers.emplace_back(new std::barrier<>(32));
      std::vector<std::thread> threads;
      threads.reserve(block);
      for (unsigned t = 0; t < block; ++t) {
        threads.emplace_back([&, t] {
          tl_thread_idx = make_uint3(t, 0, 0);
          tl_block_idx = make_uint3(bx, by, 0);
          kernel(args);
        });
      }
      for (auto& th : threads) th.join();
    }
  }
}
}  // namespace dbk_emu

#define DBK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::dbk_emu::launch((kernel), (grid), (block), __VA_ARGS__)
"""

DRIVER = r"""
#include "diffusion_loss.cu"
extern "C" {
int64_t emu_num_partials(int64_t B, int64_t M) { return dbk::diffusion_loss_num_partials(B, M); }
// -1: a vector access was misaligned (a GPU would fault); else the cudaError_t.
int emu_loss(const dbk::DiffusionLossArgs* a) {
  dbk_emu::g_misaligned = 0;
  const int rc = static_cast<int>(dbk::diffusion_loss_fwd(*a, nullptr));
  return dbk_emu::g_misaligned ? -1 : rc;
}
int emu_add_noise(const dbk::AddNoiseArgs* a) {
  dbk_emu::g_misaligned = 0;
  const int rc = static_cast<int>(dbk::add_noise(*a, nullptr));
  return dbk_emu::g_misaligned ? -1 : rc;
}
void emu_philox_uniforms(const uint64_t* idx, int64_t n, uint64_t seed, float* u1, float* u2) {
  for (int64_t i = 0; i < n; ++i) dbk::philox_uniforms(idx[i], seed, u1 + i, u2 + i);
}
void emu_philox_normal(const uint64_t* idx, int64_t n, uint64_t seed, float* z) {
  for (int64_t i = 0; i < n; ++i) z[i] = dbk::philox_normal(idx[i], seed);
}
}
"""

# (name, extra defines): the real launch configuration, and a tiny one whose grids force
# every loop (rows per block, grid-stride, > blockDim partials) to iterate.
EMU_VARIANTS = {
    "real": [],
    "tiny": ["-DDBK_THREADS=64", "-DDBK_MAX_BLOCKS=70", "-DDBK_MAX_GRID_Y=2"],
}

_P = ctypes.c_void_p


class _LossArgs(ctypes.Structure):  # mirrors dbk::DiffusionLossArgs
    _fields_ = [("pred", _P), ("x0", _P), ("noise", _P), ("noise_offset", _P), ("timesteps", _P),
                ("alphas_cumprod", _P), ("pred_dtype", ctypes.c_int), ("x0_dtype", ctypes.c_int),
                ("noise_dtype", ctypes.c_int), ("num_timesteps", ctypes.c_int64), ("B", ctypes.c_int64),
                ("M", ctypes.c_int64), ("C", ctypes.c_int64), ("pred_type", ctypes.c_int),
                ("n_inst", ctypes.c_int64), ("inst_scale", ctypes.c_float), ("prior_scale", ctypes.c_float),
                ("snr_gamma", ctypes.c_float), ("seed", ctypes.c_uint64), ("mask", _P),
                ("mask_row_stride", ctypes.c_int64), ("mask_ch_stride", ctypes.c_int64), ("loss_type", ctypes.c_int),
                ("huber_c", ctypes.c_float), ("huber_c_rows", _P), ("loss", _P), ("grad", _P),
                ("partials", _P), ("counter", _P)]


class _NoiseArgs(ctypes.Structure):  # mirrors dbk::AddNoiseArgs
    _fields_ = [("x0", _P), ("noise", _P), ("noise_offset", _P), ("timesteps", _P), ("alphas_cumprod", _P),
                ("x0_dtype", ctypes.c_int), ("noise_dtype", ctypes.c_int), ("num_timesteps", ctypes.c_int64),
                ("B", ctypes.c_int64), ("M", ctypes.c_int64), ("C", ctypes.c_int64), ("seed", ctypes.c_uint64),
                ("out", _P)]


_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_PRED_TYPES = ("epsilon", "v_prediction", "sample")
_LOSS_TYPES = ("l2", "huber", "smooth_l1")


def _ptr(t):
    return None if t is None else t.data_ptr()


def _load_reference():
    path = ROOT / "dbkernels/ops/diffusion_loss/reference.py"
    spec = importlib.util.spec_from_file_location("_dbk_reference_for_emu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Emu:
    def __init__(self, so: Path):
        self.lib = ctypes.CDLL(str(so))
        self.lib.emu_num_partials.restype = ctypes.c_int64
        self.lib.emu_num_partials.argtypes = [ctypes.c_int64, ctypes.c_int64]

    def loss(self, pred, x0, noise, off, ts, ac, *, pred_type, num_prior, prior_weight, gamma, seed, need_grad,
             mask=None, loss_type=0, huber_c=0.1, huber_c_rows=None):
        """mask: None or fp32 contiguous (Bm, Cm, S), as the op module hands it to the kernels."""
        B = pred.shape[0]
        M = pred[0].numel()
        C = pred.shape[1] if pred.dim() > 1 else 1
        S = M // C
        n_inst = B - num_prior
        counter = torch.zeros(1, dtype=torch.int32)
        loss = torch.full((), float("nan"))
        partials = torch.full((self.lib.emu_num_partials(B, M),), 1.0e30)  # garbage: must not matter
        grad = torch.full_like(pred, float("nan")) if need_grad else None
        a = _LossArgs(_ptr(pred), _ptr(x0), _ptr(noise), _ptr(off), _ptr(ts), _ptr(ac), _DT[pred.dtype],
                      _DT[x0.dtype], _DT[noise.dtype] if noise is not None else 0, ac.numel(), B, M, C,
                      pred_type, n_inst, 1.0 / (n_inst * M) if n_inst else 0.0,
                      prior_weight / (num_prior * M) if num_prior else 0.0, -1.0 if gamma is None else gamma,
                      seed % (1 << 64), _ptr(mask),
                      0 if mask is None or mask.shape[0] == 1 else mask.shape[1] * S,
                      0 if mask is None or mask.shape[1] == 1 else S, loss_type, huber_c, _ptr(huber_c_rows),
                      _ptr(loss), _ptr(grad), _ptr(partials), _ptr(counter))
        rc = self.lib.emu_loss(ctypes.byref(a))
        assert rc != -1, "misaligned vector access (would fault on a GPU)"
        assert rc == 0, f"cudaError_t {rc}"
        assert counter.item() == 0, "the last block did not reset the counter"
        return loss, grad

    def add_noise(self, x0, noise, off, ts, ac, *, seed):
        B = x0.shape[0]
        out = torch.full_like(x0, float("nan"))
        a = _NoiseArgs(_ptr(x0), _ptr(noise), _ptr(off), _ptr(ts), _ptr(ac), _DT[x0.dtype],
                       _DT[noise.dtype] if noise is not None else 0, ac.numel(), B, x0[0].numel(),
                       x0.shape[1] if x0.dim() > 1 else 1, seed % (1 << 64), _ptr(out))
        rc = self.lib.emu_add_noise(ctypes.byref(a))
        assert rc != -1, "misaligned vector access (would fault on a GPU)"
        assert rc == 0, f"cudaError_t {rc}"
        return out


@pytest.fixture(scope="module")
def emu_libs(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not on PATH: cannot build the CPU emulation of the kernels")
    inc = cuda_include_dir()
    if inc is None:
        pytest.skip("CUDA headers (cuda_runtime.h) not found: cannot build the CPU emulation")
    d = tmp_path_factory.mktemp("emu")
    (d / "shim.h").write_text(SHIM)
    (d / "driver.cpp").write_text(DRIVER)
    procs = {}
    for name, defs in EMU_VARIANTS.items():  # build both variants in parallel
        cmd = [GXX, "-std=c++20", "-O0", "-ffp-contract=off", "-fPIC", "-shared", "-pthread",
               "-Wno-attributes", f"-I{inc}", f"-I{CSRC}", "-include", str(d / "shim.h"), *defs,
               "-x", "c++", str(d / "driver.cpp"), "-o", str(d / f"emu_{name}.so")]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    libs = {}
    for name, p in procs.items():
        out, _ = p.communicate(timeout=300)
        if p.returncode != 0 and "DBK_NO_BARRIER" in out:
            pytest.skip("g++ lacks C++20 <barrier>: cannot build the CPU emulation")
        assert p.returncode == 0, f"emulation build ({name}) failed:\n{out[-6000:]}"
        libs[name] = _Emu(d / f"emu_{name}.so")
    return libs


@pytest.fixture(scope="module")
def ref():
    return _load_reference()


def _alphas_cumprod():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, 0).float()
    ac[0], ac[1] = 1.0, 0.0  # SNR = inf and SNR = 0 on purpose
    return ac


def _make(shape, dtype, view_offset, gen):
    n = math.prod(shape)
    base = torch.randn(n + view_offset, generator=gen).to(dtype)
    return base[view_offset:].view(shape)  # view_offset % 4 != 0: misaligned rows


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# shape, pred/x0/noise dtypes (noise None = seeded), pred_type, num_prior, snr_gamma, offset,
# need_grad, seed, timesteps (None = random), view offset of pred/x0/noise
EMU_CASES = {
    "eps-f32-prior": ((3, 4, 37, 41), F32, F32, F32, 0, 1, None, False, True, 0, None, 0),
    "v-seeded-offset-snr": ((3, 4, 37, 41), F32, F32, None, 1, 1, 5.0, True, True, 1234, [0, 1, 500], 0),
    "sample-seeded-snr": ((3, 4, 37, 41), F32, F32, None, 2, 0, 5.0, True, True, 99, [0, 1, 999], 0),
    "eps-snr-edges": ((3, 4, 37, 41), F32, F32, F32, 0, 2, 5.0, True, True, 0, [0, 1, 999], 0),
    "batch1-mixed-misaligned": ((1, 4, 37, 41), BF16, F16, F32, 1, 0, None, True, True, 0, None, 1),
    "half-bf16-nograd-head2": ((2, 3, 5, 7), F16, BF16, BF16, 1, 1, 1.0, True, False, 0, None, 2),
    "seeded-negative-seed": ((2, 3, 5, 7), F16, F32, None, 0, 1, None, True, True, -5, None, 0),
    "bf16-tiny-channels": ((5, 2, 3), BF16, BF16, F16, 1, 2, 5.0, True, True, 0, None, 0),
    "1d-rows-seeded": ((4, 1), F32, F32, None, 0, 0, None, True, True, 3, None, 0),
    "s1-seed-hi-word": ((2, 3, 1, 1), F32, F16, None, 1, 1, None, True, True, 2 ** 40 + 7, None, 0),
    "many-blocks": ((2, 4, 96, 97), F16, F16, None, 1, 1, 5.0, True, True, 11, None, 0),
}


# Masked / robust cases: the base case's inputs plus (mask shape broadcast to pred, or None;
# loss type; huber_c: a float, or "rows" for one random c per row).
EMU_LOSS_CASES = {
    "mask-b1hw-huber": ("eps-f32-prior", (3, 1, 37, 41), 1, 0.1),
    "mask-11hw-smoothl1-rows": ("v-seeded-offset-snr", (1, 1, 37, 41), 2, "rows"),
    "mask-bchw-l2-misaligned": ("batch1-mixed-misaligned", (1, 4, 37, 41), 0, 0.1),
    "mask-b111-huber-rows": ("bf16-tiny-channels", (5, 1, 1), 1, "rows"),
    "mask-1c11-huber-fp16": ("half-bf16-nograd-head2", (1, 3, 1, 1), 1, 0.5),
    "huber-nomask-many-blocks": ("many-blocks", None, 1, 0.3),
    "smoothl1-1d-rows": ("1d-rows-seeded", (4, 1), 2, "rows"),
}
for _name, (_base, *_) in EMU_LOSS_CASES.items():
    EMU_CASES[_name] = EMU_CASES[_base]

# The real launch configuration on a few cases (all its loops run once); the tiny one on all.
REAL_VARIANT_CASES = ("eps-f32-prior", "batch1-mixed-misaligned", "half-bf16-nograd-head2", "seeded-negative-seed",
                      "mask-b1hw-huber", "mask-bchw-l2-misaligned")


def _mask_and_c(case, shape, gen):
    """(mask for the reference, the kernels' (Bm, Cm, S) fp32 mask, loss type, c float, c rows)."""
    _, mshape, loss_type, c = EMU_LOSS_CASES.get(case, (None, None, 0, 0.1))
    rows = 0.05 + torch.rand(shape[0], generator=gen) if c == "rows" else None
    if mshape is None:
        return None, None, loss_type, 0.1 if rows is not None else c, rows
    mask = torch.rand(mshape, generator=gen)
    s = math.prod(shape[2:])
    kernel_mask = mask.expand(mshape[0], mshape[1], *shape[2:]).contiguous().reshape(mshape[0], mshape[1], s)
    return mask, kernel_mask, loss_type, 0.1 if rows is not None else c, rows


@pytest.mark.parametrize("case,variant", [
    pytest.param(c, v, id=f"{c}-{v}") for c in EMU_CASES for v in EMU_VARIANTS
    if v == "tiny" or c in REAL_VARIANT_CASES
])
def test_emulated_kernels_match_reference(emu_libs, ref, case, variant):
    emu = emu_libs[variant]
    shape, pdt, xdt, ndt, ptype, num_prior, gamma, use_off, need_grad, seed, ts, voff = EMU_CASES[case]
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    ac = _alphas_cumprod()
    B = shape[0]
    pred, x0 = _make(shape, pdt, voff, gen), _make(shape, xdt, voff, gen)
    noise = None if ndt is None else _make(shape, ndt, voff, gen)
    off = 0.1 * torch.randn(B, shape[1], generator=gen) if use_off else None
    ts = torch.randint(0, 1000, (B,), generator=gen) if ts is None else torch.tensor(ts)
    ref_seed = seed if noise is None else None
    pw = 0.7
    mask, kmask, ltype, c, c_rows = _mask_and_c(case, shape, gen)
    extra = dict(mask=kmask, loss_type=ltype, huber_c=c, huber_c_rows=c_rows)

    loss, grad = emu.loss(pred, x0, noise, off, ts, ac, pred_type=ptype, num_prior=num_prior, prior_weight=pw,
                          gamma=gamma, seed=seed, need_grad=need_grad, **extra)
    p = pred.detach().clone().requires_grad_(True)
    want = ref.diffusion_loss(p, x0, noise, ts, ac, prediction_type=_PRED_TYPES[ptype], num_prior=num_prior,
                              prior_weight=pw, snr_gamma=gamma, noise_offset=off, seed=ref_seed, mask=mask,
                              loss_type=_LOSS_TYPES[ltype], huber_c=c if c_rows is None else c_rows)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=2e-5, atol=1e-7)
    if need_grad:
        want_grad = p.grad.to(pdt)
        # One rounding of the stored dtype apart at most (fp32: a few ulp of fp32).
        eps = {F32: 1e-6, F16: 2 ** -10, BF16: 2 ** -7}[pdt]
        torch.testing.assert_close(grad.float(), want_grad.float(), rtol=eps, atol=eps * want_grad.abs().max().item())

    # Deterministic: a second run gives the same bits.
    loss2, _ = emu.loss(pred, x0, noise, off, ts, ac, pred_type=ptype, num_prior=num_prior, prior_weight=pw,
                        gamma=gamma, seed=seed, need_grad=False, **extra)
    if case in EMU_LOSS_CASES:
        return  # add_noise has no mask / loss type: the base case checks it
    assert loss2.item() == loss.item() or (math.isnan(loss2.item()) and math.isnan(loss.item()))

    xt = emu.add_noise(x0, noise, off, ts, ac, seed=seed)
    want_xt = ref.add_noise(x0, noise, ts, ac, noise_offset=off, seed=ref_seed)
    assert xt.dtype == x0.dtype
    if noise is not None:  # identical fp32 operations: bit-exact
        assert torch.equal(xt, want_xt)
    else:  # host libm vs torch log/cos: ~1 ulp on the noise
        eps = {F32: 0.0, F16: 2 ** -10, BF16: 2 ** -7}[xdt]
        torch.testing.assert_close(xt.float(), want_xt.float(), rtol=eps, atol=2e-6 + eps)


@pytest.mark.parametrize("loss_type", [0, 1, 2])
def test_emulated_ones_mask_is_bitwise_unmasked(emu_libs, loss_type):
    emu = emu_libs["tiny"]
    gen = torch.Generator().manual_seed(loss_type)
    ac = _alphas_cumprod()
    pred, x0, noise = (_make((3, 4, 9, 7), F32, 1, gen) for _ in range(3))  # misaligned: the scalar path too
    ts = torch.tensor([5, 400, 999])
    kw = dict(pred_type=1, num_prior=1, prior_weight=0.7, gamma=5.0, seed=0, need_grad=True, loss_type=loss_type,
              huber_c=0.2)
    loss, grad = emu.loss(pred, x0, noise, None, ts, ac, **kw)
    for ones in (torch.ones(1, 1, 63), torch.ones(3, 4, 63), torch.ones(3, 1, 63)):
        lm, gm = emu.loss(pred, x0, noise, None, ts, ac, mask=ones, **kw)
        assert torch.equal(lm, loss) and torch.equal(gm, grad)
    half = torch.full((1, 1, 63), 0.5)  # and the mask is really read
    lh, gh = emu.loss(pred, x0, noise, None, ts, ac, mask=half, **kw)
    torch.testing.assert_close(lh, 0.5 * loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(gh, 0.5 * grad, rtol=1e-6, atol=0)


def test_emulated_bad_timestep_gives_nan(emu_libs):
    emu = emu_libs["tiny"]
    ac = _alphas_cumprod()
    x = torch.randn(2, 4, 5, 5)
    ts = torch.tensor([3, 1000])  # second row out of range
    loss, grad = emu.loss(x, x, torch.randn_like(x), None, ts, ac, pred_type=0, num_prior=0, prior_weight=1.0,
                          gamma=None, seed=0, need_grad=True)
    assert math.isnan(loss.item())
    assert grad[1].isnan().all() and not grad[0].isnan().any()
    xt = emu.add_noise(x, None, None, ts, ac, seed=1)
    assert xt[1].isnan().all() and not xt[0].isnan().any()


def test_philox_matches_reference(emu_libs, ref):
    lib = emu_libs["tiny"].lib
    idx = torch.tensor([0, 1, 2, 3, 4095, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 5,
                        3 * 2 ** 40 + 17, 2 ** 62 + 3], dtype=torch.int64)
    idx = torch.cat([idx, torch.randint(0, 2 ** 62, (500,), generator=torch.Generator().manual_seed(0))])
    n = idx.numel()
    for seed in (0, 1, 2 ** 32 + 3, 2 ** 63 + 11, -7):
        key = seed % (1 << 64)
        u1, u2, z = torch.empty(n), torch.empty(n), torch.empty(n)
        lib.emu_philox_uniforms(_P(idx.data_ptr()), ctypes.c_int64(n), ctypes.c_uint64(key), _P(u1.data_ptr()),
                                _P(u2.data_ptr()))
        lib.emu_philox_normal(_P(idx.data_ptr()), ctypes.c_int64(n), ctypes.c_uint64(key), _P(z.data_ptr()))
        want = ref.philox_normal(idx, seed)
        # The integer part: the reference's own float math on our uniforms gives its bits exactly.
        mine = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
        assert torch.equal(mine, want), f"Philox words differ from the reference (seed {seed})"
        torch.testing.assert_close(z, want, rtol=1e-6, atol=2e-6)
