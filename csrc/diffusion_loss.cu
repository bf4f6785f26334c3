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
// The elementwise loss is l2, huber or smooth_l1 (a uniform runtime branch), optionally times
// an fp32 mask read with broadcast (stride-0) rows / channels.
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

// Loss of one element as two factors la * lb, and its gradient g (reference.elementwise_loss /
// elementwise_grad times coef). Two factors so a mask multiplies la alone: with a mask of ones
// (1 * la) * lb is la * lb bit for bit, and the row sum's fmaf sees the same operands.
struct ElemLoss {
  float la, lb, g;
};

__device__ __forceinline__ ElemLoss elem_loss(int loss_type, float d, float hc, float coef,
                                              float two_coef) {
  ElemLoss r;
  if (loss_type == kL2) {
    r.la = d;
    r.lb = d;
    r.g = __fmul_rn(two_coef, d);
    return r;
  }
  const float dd = __fmul_rn(d, d);
  const float root = sqrtf(__fadd_rn(dd, __fmul_rn(hc, hc)));
  const float k = loss_type == kHuber ? __fmul_rn(2.0f, hc) : 2.0f;
  r.la = k;
  r.lb = __fdiv_rn(dd, __fadd_rn(root, hc));  // sqrt(d^2 + c^2) - c without the cancellation
  r.g = __fmul_rn(coef, __fmul_rn(k, __fdiv_rn(d, root)));
  return r;
}

// mask weight of element j of a row (mrow = mask + b * mask_row_stride).
__device__ __forceinline__ float mask_at(const float* mrow, int64_t j, int64_t ch, int64_t S,
                                         int64_t ch_stride) {
  return mrow[ch * ch_stride + (j - ch * S)];
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
// kRobust: a mask or a loss other than l2. The plain l2 instantiation keeps the lean
// register budget of the common case (the robust one needs ~2x the registers).
template <typename TP, typename TX, typename TN, bool kRobust>
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
  const int loss_type = kRobust ? args.loss_type : static_cast<int>(kL2);
  const float* __restrict__ mask = kRobust ? args.mask : nullptr;

  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  float acc = 0.0f;
  for (int64_t b = blockIdx.y; b < args.B; b += gridDim.y) {
    const RowCoef rc = row_coef(args.timesteps, args.alphas_cumprod, args.num_timesteps, b);
    const float w = snr_weight(rc.abar, pred_type, args.snr_gamma);
    float c = __fmul_rn(b < args.n_inst ? args.inst_scale : args.prior_scale, w);
    if (rc.bad) c = quiet_nan();
    const float two_c = __fmul_rn(2.0f, c);
    float hc = 0.0f;
    if constexpr (kRobust) hc = args.huber_c_rows != nullptr ? args.huber_c_rows[b] : args.huber_c;
    const float* mrow = mask != nullptr ? mask + b * args.mask_row_stride : nullptr;

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
      float gv[kVec], mv[kVec];
      if (mrow != nullptr) {
        int64_t ch[kVec];
        channels4(j, S, ch);
#pragma unroll
        for (int k = 0; k < kVec; ++k) mv[k] = mask_at(mrow, j + k, ch[k], S, args.mask_ch_stride);
      }
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float d = loss_diff(pred_type, pv[k], xv[k], ev[k], rc.a, rc.s);
        ElemLoss el = elem_loss(loss_type, d, hc, c, two_c);
        if (mrow != nullptr) {
          el.la = __fmul_rn(mv[k], el.la);
          el.g = __fmul_rn(el.g, mv[k]);
        }
        rowsum = fmaf(el.la, el.lb, rowsum);
        gv[k] = el.g;
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
      ElemLoss el = elem_loss(loss_type, d, hc, c, two_c);
      if (mrow != nullptr) {
        const float mj = mask_at(mrow, j, div_s64(j, S), S, args.mask_ch_stride);
        el.la = __fmul_rn(mj, el.la);
        el.g = __fmul_rn(el.g, mj);
      }
      rowsum = fmaf(el.la, el.lb, rowsum);
      if (need_grad) store1(grow + j, el.g);
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
bool valid_loss_type(int t) { return t == kL2 || t == kHuber || t == kSmoothL1; }

}  // namespace

int64_t diffusion_loss_num_partials(int64_t B, int64_t M) { return make_grid(B, M).blocks; }

cudaError_t diffusion_loss_fwd(const DiffusionLossArgs& args, cudaStream_t stream) {
  if (args.B < 0 || args.M < 0 || args.loss == nullptr || args.partials == nullptr ||
      args.counter == nullptr || !valid_pred_type(args.pred_type) || !valid_loss_type(args.loss_type) ||
      args.mask_row_stride < 0 || args.mask_ch_stride < 0 ||
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
        auto launch = [&](auto robust) {
          auto kernel = diffusion_loss_fwd_kernel<TP, TX, TN, decltype(robust)::value>;
          DBK_LAUNCH(kernel, g.grid, kThreads, 0, stream, args);
          return cudaGetLastError();
        };
        if (args.mask != nullptr || args.loss_type != kL2) return launch(std::true_type{});
        return launch(std::false_type{});
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
