// Fused DreamBooth diffusion loss and add_noise (plain CUDA; the spec is
// dbkernels/diffusion_loss/reference.py).
//
// Both kernels use the same layout: grid = (blocks_x, rows_y). Block (bx, by) handles
// rows b = by, by + rows_y, ... and, inside a row, a grid-stride loop over 4-element
// vectors (16-byte loads for fp32, 8-byte loads for fp16/bf16). A row whose start is not
// 4-element aligned is split into a scalar head (< 4 elements), the vectors and a
// scalar tail (< 4 elements); if the tensors of one row are misaligned differently
// (never the case for fresh contiguous torch tensors) the whole row is done in scalars.
//
// The loss is produced in ONE launch: every block writes its partial sum to
// partials[block], fences, and bumps `counter`; the last block to arrive sums the
// partials in a fixed order (deterministic), writes *loss and resets *counter to 0.
//
// Arithmetic mirrors the reference op by op (__fmul_rn / __fadd_rn stop FMA contraction)
// so add_noise and the gradient match PyTorch's fp32 results to the last bit or so.
#include <algorithm>
#include <type_traits>
#include <utility>

#include "common.cuh"
#include "diffusion_loss.h"

namespace dbk {
namespace {

// Block size and grid caps. Overridable only so that the CPU emulation test can run the
// grid-stride, row and partial-sum loops with a handful of small blocks.
#ifndef DBK_THREADS
#define DBK_THREADS 256
#endif
#ifndef DBK_MAX_BLOCKS
#define DBK_MAX_BLOCKS 2048
#endif
#ifndef DBK_MAX_GRID_Y
#define DBK_MAX_GRID_Y 65535
#endif
constexpr int kThreads = DBK_THREADS;           // multiple of 32 (block_reduce_sum)
constexpr int kVec = 4;                         // elements per vector access (RowSplit, load4)
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "DBK_THREADS: a multiple of 32, <= 1024");
constexpr int64_t kMaxBlocks = DBK_MAX_BLOCKS;  // cap on blocks_x * rows_y (unless B > it)
constexpr int64_t kMaxGridY = DBK_MAX_GRID_Y;   // CUDA limit on gridDim.y

struct SeededNoise {};  // noise "dtype" meaning: generate Philox noise from the seed

template <typename TN>
constexpr bool kIsSeeded = std::is_same<TN, SeededNoise>::value;

struct Grid {
  dim3 grid;
  int64_t blocks;
};

Grid make_grid(int64_t B, int64_t M) {
  const int64_t rows_y = std::min<int64_t>(std::max<int64_t>(B, 1), kMaxGridY);
  const int64_t per_block = static_cast<int64_t>(kThreads) * kVec;
  const int64_t want_x = std::max<int64_t>((M + per_block - 1) / per_block, 1);
  const int64_t cap_x = std::max<int64_t>(kMaxBlocks / rows_y, 1);
  const int64_t blocks_x = std::min(want_x, cap_x);
  Grid g;
  g.grid = dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(rows_y), 1);
  g.blocks = blocks_x * rows_y;
  return g;
}

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// min(x, g) that propagates a NaN x (like torch.clamp(x, max=g)).
__device__ __forceinline__ float clamp_max(float x, float g) { return x > g ? g : x; }

// Per-row coefficients: abar, a = sqrt(abar), s = sqrt(1 - abar). An out-of-range
// timestep gives NaN for all three (the reference would raise IndexError).
struct RowCoef {
  float abar, a, s;
  bool bad;
};

__device__ __forceinline__ RowCoef row_coef(const int64_t* timesteps, const float* alphas_cumprod,
                                            int64_t num_timesteps, int64_t b) {
  RowCoef r;
  const int64_t t = timesteps[b];
  r.bad = !(t >= 0 && t < num_timesteps);
  r.abar = r.bad ? quiet_nan() : alphas_cumprod[t];
  r.a = sqrtf(r.abar);
  r.s = sqrtf(__fsub_rn(1.0f, r.abar));
  return r;
}

// Min-SNR weight (reference.snr_weights); gamma < 0 means "no weighting".
__device__ __forceinline__ float snr_weight(float abar, int pred_type, float gamma) {
  if (gamma < 0.0f) return 1.0f;
  const float snr = __fdiv_rn(abar, __fsub_rn(1.0f, abar));
  if (pred_type == kEpsilon) return clamp_max(__fdiv_rn(gamma, snr), 1.0f);
  if (pred_type == kVPrediction) return __fdiv_rn(clamp_max(snr, gamma), __fadd_rn(snr, 1.0f));
  return clamp_max(snr, gamma);
}

// Noise for 4 consecutive elements j..j+3 of a row (gidx = global index of element j).
template <typename TN>
__device__ __forceinline__ void eps4(const TN* nrow, int64_t j, uint64_t gidx, uint64_t seed,
                                     float e[4]) {
  if constexpr (kIsSeeded<TN>) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) e[k] = philox_normal(gidx + static_cast<uint64_t>(k), seed);
  } else {
    load4(nrow + j, e);
  }
}

template <typename TN>
__device__ __forceinline__ float eps1(const TN* nrow, int64_t j, uint64_t gidx, uint64_t seed) {
  if constexpr (kIsSeeded<TN>) {
    return philox_normal(gidx, seed);
  } else {
    return load1(nrow + j);
  }
}

// e[k] += offrow[(j + k) / S] for k = 0..3.
__device__ __forceinline__ void add_offset4(float e[4], const float* offrow, int64_t j, int64_t S) {
  int64_t ch[kVec];
  channels4(j, S, ch);
#pragma unroll
  for (int k = 0; k < kVec; ++k) e[k] = __fadd_rn(e[k], offrow[ch[k]]);
}

// The target and difference d = pred - target for one element.
__device__ __forceinline__ float loss_diff(int pred_type, float p, float x, float e, float a,
                                           float s) {
  float target;
  if (pred_type == kEpsilon) {
    target = e;
  } else if (pred_type == kVPrediction) {
    target = __fsub_rn(__fmul_rn(a, e), __fmul_rn(s, x));
  } else {
    target = x;
  }
  return __fsub_rn(p, target);
}

// ---------------------------------------------------------------------------------------
// Loss forward (+ gradient) kernel.
// ---------------------------------------------------------------------------------------
template <typename TP, typename TX, typename TN>
__global__ void __launch_bounds__(kThreads)
    diffusion_loss_fwd_kernel(const DiffusionLossArgs args) {
  const TP* __restrict__ pred = static_cast<const TP*>(args.pred);
  const TX* __restrict__ x0 = static_cast<const TX*>(args.x0);
  const TN* __restrict__ noise = static_cast<const TN*>(args.noise);  // unused if seeded
  TP* __restrict__ grad = static_cast<TP*>(args.grad);
  const float* __restrict__ noise_offset = args.noise_offset;
  const bool need_grad = grad != nullptr;
  const int pred_type = args.pred_type;
  const bool need_x = pred_type != kEpsilon;  // epsilon's target does not involve x0
  const bool need_e = pred_type != kSample;   // sample's target does not involve noise
  const int64_t M = args.M;
  const int64_t C = args.C > 0 ? args.C : 1;
  const int64_t S = max_s64(M / C, 1);
  const uint64_t seed = args.seed;

  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  float acc = 0.0f;
  for (int64_t b = blockIdx.y; b < args.B; b += gridDim.y) {
    const RowCoef rc = row_coef(args.timesteps, args.alphas_cumprod, args.num_timesteps, b);
    const float w = snr_weight(rc.abar, pred_type, args.snr_gamma);
    float c = __fmul_rn(b < args.n_inst ? args.inst_scale : args.prior_scale, w);
    if (rc.bad) c = quiet_nan();
    const float two_c = __fmul_rn(2.0f, c);

    const int64_t base = b * M;
    const TP* prow = pred + base;
    const TX* xrow = x0 + base;
    const TN* nrow = kIsSeeded<TN> ? nullptr : noise + base;
    TP* grow = need_grad ? grad + base : nullptr;
    const float* offrow = noise_offset != nullptr ? noise_offset + b * C : nullptr;

    const int mis = misalign4(prow);
    bool aligned = !need_x || misalign4(xrow) == mis;
    if constexpr (!kIsSeeded<TN>) aligned = aligned && (!need_e || misalign4(nrow) == mis);
    aligned = aligned && (!need_grad || misalign4(grow) == mis);
    const RowSplit rs = split_row(M, mis, aligned);

    float rowsum = 0.0f;
    for (int64_t v = tid; v < rs.nvec; v += stride) {
      const int64_t j = rs.head + kVec * v;
      float pv[kVec], xv[kVec] = {0.f, 0.f, 0.f, 0.f}, ev[kVec] = {0.f, 0.f, 0.f, 0.f};
      load4(prow + j, pv);
      if (need_x) load4(xrow + j, xv);
      if (need_e) {
        eps4(nrow, j, static_cast<uint64_t>(base + j), seed, ev);
        if (offrow != nullptr) add_offset4(ev, offrow, j, S);
      }
      float gv[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float d = loss_diff(pred_type, pv[k], xv[k], ev[k], rc.a, rc.s);
        rowsum = fmaf(d, d, rowsum);
        gv[k] = __fmul_rn(two_c, d);
      }
      if (need_grad) store4(grow + j, gv);
    }
    for (int64_t k = tid; k < rs.nscalar; k += stride) {
      const int64_t j = rs.scalar_j(k);
      const float pj = load1(prow + j);
      const float xj = need_x ? load1(xrow + j) : 0.0f;
      float ej = 0.0f;
      if (need_e) {
        ej = eps1(nrow, j, static_cast<uint64_t>(base + j), seed);
        if (offrow != nullptr) ej = __fadd_rn(ej, offrow[div_s64(j, S)]);
      }
      const float d = loss_diff(pred_type, pj, xj, ej, rc.a, rc.s);
      rowsum = fmaf(d, d, rowsum);
      if (need_grad) store1(grow + j, __fmul_rn(two_c, d));
    }
    acc = fmaf(c, rowsum, acc);
  }

  // ---- one-pass deterministic grid reduction (threadFenceReduction pattern) ----
  __shared__ float scratch[32];
  __shared__ bool is_last;
  const float block_total = block_reduce_sum(acc, scratch);
  const unsigned int nblocks = gridDim.x * gridDim.y;
  if (threadIdx.x == 0) {
    args.partials[blockIdx.y * gridDim.x + blockIdx.x] = block_total;
    __threadfence();  // publish the partial before announcing it
    const int old = atomicAdd(args.counter, 1);
    is_last = (old == static_cast<int>(nblocks) - 1);
    if (is_last) __threadfence();  // order the partial reads after the final arrival
  }
  __syncthreads();
  if (is_last) {
    float v = 0.0f;
    for (unsigned int i = threadIdx.x; i < nblocks; i += blockDim.x) {
      v += __ldcg(args.partials + i);  // L2 read: never a stale L1 line
    }
    v = block_reduce_sum(v, scratch);
    if (threadIdx.x == 0) {
      *args.loss = v;
      *args.counter = 0;  // ready for the next launch
    }
  }
}

// ---------------------------------------------------------------------------------------
// add_noise kernel: x_t = a * x0 + s * eps in x0's dtype.
// ---------------------------------------------------------------------------------------
template <typename TX, typename TN>
__global__ void __launch_bounds__(kThreads) add_noise_kernel(const AddNoiseArgs args) {
  const TX* __restrict__ x0 = static_cast<const TX*>(args.x0);
  const TN* __restrict__ noise = static_cast<const TN*>(args.noise);  // unused if seeded
  TX* __restrict__ out = static_cast<TX*>(args.out);
  const float* __restrict__ noise_offset = args.noise_offset;
  const int64_t M = args.M;
  const int64_t C = args.C > 0 ? args.C : 1;
  const int64_t S = max_s64(M / C, 1);
  const uint64_t seed = args.seed;

  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  for (int64_t b = blockIdx.y; b < args.B; b += gridDim.y) {
    const RowCoef rc = row_coef(args.timesteps, args.alphas_cumprod, args.num_timesteps, b);
    const int64_t base = b * M;
    const TX* xrow = x0 + base;
    const TN* nrow = kIsSeeded<TN> ? nullptr : noise + base;
    TX* orow = out + base;
    const float* offrow = noise_offset != nullptr ? noise_offset + b * C : nullptr;

    const int mis = misalign4(xrow);
    bool aligned = misalign4(orow) == mis;
    if constexpr (!kIsSeeded<TN>) aligned = aligned && misalign4(nrow) == mis;
    const RowSplit rs = split_row(M, mis, aligned);

    for (int64_t v = tid; v < rs.nvec; v += stride) {
      const int64_t j = rs.head + kVec * v;
      float xv[kVec], ev[kVec], ov[kVec];
      load4(xrow + j, xv);
      eps4(nrow, j, static_cast<uint64_t>(base + j), seed, ev);
      if (offrow != nullptr) add_offset4(ev, offrow, j, S);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        ov[k] = __fadd_rn(__fmul_rn(rc.a, xv[k]), __fmul_rn(rc.s, ev[k]));
      }
      store4(orow + j, ov);
    }
    for (int64_t k = tid; k < rs.nscalar; k += stride) {
      const int64_t j = rs.scalar_j(k);
      float ej = eps1(nrow, j, static_cast<uint64_t>(base + j), seed);
      if (offrow != nullptr) ej = __fadd_rn(ej, offrow[div_s64(j, S)]);
      const float xj = load1(xrow + j);
      store1(orow + j, __fadd_rn(__fmul_rn(rc.a, xj), __fmul_rn(rc.s, ej)));
    }
  }
}

// ---------------------------------------------------------------------------------------
// dtype dispatch
// ---------------------------------------------------------------------------------------
template <typename F>
cudaError_t dispatch_float(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(static_cast<float*>(nullptr));
    case DType::kFloat16: return f(static_cast<__half*>(nullptr));
    case DType::kBFloat16: return f(static_cast<__nv_bfloat16*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

// Noise dtype, or SeededNoise when there is no noise tensor.
template <typename F>
cudaError_t dispatch_noise(const void* noise, DType dt, F&& f) {
  if (noise == nullptr) return f(static_cast<SeededNoise*>(nullptr));
  return dispatch_float(dt, std::forward<F>(f));
}

bool valid_pred_type(int t) { return t == kEpsilon || t == kVPrediction || t == kSample; }

}  // namespace

int64_t diffusion_loss_num_partials(int64_t B, int64_t M) { return make_grid(B, M).blocks; }

cudaError_t diffusion_loss_fwd(const DiffusionLossArgs& args, cudaStream_t stream) {
  if (args.B < 0 || args.M < 0 || args.loss == nullptr || args.partials == nullptr ||
      args.counter == nullptr || !valid_pred_type(args.pred_type) ||
      (args.B > 0 && (args.timesteps == nullptr || args.alphas_cumprod == nullptr))) {
    return cudaErrorInvalidValue;
  }
  const Grid g = make_grid(args.B, args.M);
  return dispatch_float(args.pred_dtype, [&](auto* tp) {
    using TP = std::remove_pointer_t<decltype(tp)>;
    return dispatch_float(args.x0_dtype, [&](auto* tx) {
      using TX = std::remove_pointer_t<decltype(tx)>;
      return dispatch_noise(args.noise, args.noise_dtype, [&](auto* tn) {
        using TN = std::remove_pointer_t<decltype(tn)>;
        auto kernel = diffusion_loss_fwd_kernel<TP, TX, TN>;
        DBK_LAUNCH(kernel, g.grid, kThreads, 0, stream, args);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t add_noise(const AddNoiseArgs& args, cudaStream_t stream) {
  if (args.B < 0 || args.M < 0 || (args.B > 0 && args.M > 0 &&
      (args.out == nullptr || args.x0 == nullptr || args.timesteps == nullptr ||
       args.alphas_cumprod == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (args.B == 0 || args.M == 0) return cudaSuccess;  // nothing to write
  const Grid g = make_grid(args.B, args.M);
  return dispatch_float(args.x0_dtype, [&](auto* tx) {
    using TX = std::remove_pointer_t<decltype(tx)>;
    return dispatch_noise(args.noise, args.noise_dtype, [&](auto* tn) {
      using TN = std::remove_pointer_t<decltype(tn)>;
      auto kernel = add_noise_kernel<TX, TN>;
      DBK_LAUNCH(kernel, g.grid, kThreads, 0, stream, args);
      return cudaGetLastError();
    });
  });
}

}  // namespace dbk
