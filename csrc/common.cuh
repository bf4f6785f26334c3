// Shared device helpers for the dbkernels CUDA sources (plain CUDA, no torch headers).
//
//   * dtype <-> float conversion for float / __half / __nv_bfloat16, scalar and 4-wide
//   * DBK_CUDA_TRY: return the cudaError_t of a failed runtime call from a host function
//   * philox_normal: Philox4x32-10 + Box-Muller, bit-compatible (integer part) with
//     dbkernels/diffusion_loss/reference.py::philox_normal
//   * warp / block sum reductions with a fixed (deterministic) order
//   * row / channel index helpers (host + device, unit-tested on the CPU)
//   * DBK_LAUNCH / DBK_CHECK_ALIGN hooks that the CPU emulation test redefines
//
// Build note: these sources must NOT be compiled with --use_fast_math: the noise and the
// coefficients use the accurate sqrtf / logf / cosf so they match torch to ~1 ulp.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Evaluate a CUDA runtime call; on failure return its error from the enclosing
// function (which must return cudaError_t).
#define DBK_CUDA_TRY(expr)                        \
  do {                                            \
    cudaError_t dbk_err_ = (expr);                \
    if (dbk_err_ != cudaSuccess) return dbk_err_; \
  } while (0)

// Kernel launch. A macro only so that the CPU emulation in tests/test_csrc_compile_emulated.py can
// run the kernels on host threads; CUDA builds always use the <<<>>> form.
#ifndef DBK_LAUNCH
#define DBK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  (kernel)<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

// Alignment assertion of the vector accesses: free in CUDA builds; the CPU emulation test
// defines it to count misaligned accesses (which would fault on a GPU).
#ifndef DBK_CHECK_ALIGN
#define DBK_CHECK_ALIGN(ptr, bytes) ((void)0)
#endif

namespace dbk {

// ---------------------------------------------------------------------------------------
// dtype conversion
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ float load1(const T* p) { return to_float(*p); }
template <typename T>
__device__ __forceinline__ void store1(T* p, float v) { *p = from_float<T>(v); }

// 16-bit types <-> raw bits (for the packed vector loads below).
__device__ __forceinline__ float bits_to_float(unsigned short b, __half*) {
  return __half2float(__ushort_as_half(b));
}
__device__ __forceinline__ float bits_to_float(unsigned short b, __nv_bfloat16*) {
  return __bfloat162float(__ushort_as_bfloat16(b));
}
__device__ __forceinline__ unsigned short float_to_bits(float v, __half*) {
  return __half_as_ushort(__float2half_rn(v));
}
__device__ __forceinline__ unsigned short float_to_bits(float v, __nv_bfloat16*) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// Four consecutive elements. The pointer must be aligned to 4 * sizeof(T)
// (16 bytes for float, 8 bytes for the 16-bit types).
__device__ __forceinline__ void load4(const float* p, float v[4]) {
  DBK_CHECK_ALIGN(p, 16);
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}
template <typename T>
__device__ __forceinline__ void load4(const T* p, float v[4]) {  // __half / __nv_bfloat16
  static_assert(sizeof(T) == 2, "load4: 16-bit type expected");
  DBK_CHECK_ALIGN(p, 8);
  const uint2 t = *reinterpret_cast<const uint2*>(p);
  v[0] = bits_to_float(static_cast<unsigned short>(t.x & 0xffffu), static_cast<T*>(nullptr));
  v[1] = bits_to_float(static_cast<unsigned short>(t.x >> 16), static_cast<T*>(nullptr));
  v[2] = bits_to_float(static_cast<unsigned short>(t.y & 0xffffu), static_cast<T*>(nullptr));
  v[3] = bits_to_float(static_cast<unsigned short>(t.y >> 16), static_cast<T*>(nullptr));
}

__device__ __forceinline__ void store4(float* p, const float v[4]) {
  DBK_CHECK_ALIGN(p, 16);
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
template <typename T>
__device__ __forceinline__ void store4(T* p, const float v[4]) {  // __half / __nv_bfloat16
  static_assert(sizeof(T) == 2, "store4: 16-bit type expected");
  DBK_CHECK_ALIGN(p, 8);
  uint2 t;
  t.x = static_cast<unsigned int>(float_to_bits(v[0], static_cast<T*>(nullptr))) |
        (static_cast<unsigned int>(float_to_bits(v[1], static_cast<T*>(nullptr))) << 16);
  t.y = static_cast<unsigned int>(float_to_bits(v[2], static_cast<T*>(nullptr))) |
        (static_cast<unsigned int>(float_to_bits(v[3], static_cast<T*>(nullptr))) << 16);
  *reinterpret_cast<uint2*>(p) = t;
}

// Element offset of p modulo 4 (p must be aligned to sizeof(T), which torch guarantees).
template <typename T>
__host__ __device__ __forceinline__ int misalign4(const T* p) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) & 3u);
}

// ---------------------------------------------------------------------------------------
// Philox4x32-10 + Box-Muller: one standard normal per 64-bit element index.
// counter = (idx_lo, idx_hi, 0, 0), key = (seed_lo, seed_hi).
// u1 = ((r0 >> 8) + 1) * 2^-24 in (0, 1], u2 = (r1 >> 8) * 2^-24 in [0, 1),
// z = sqrt(-2 ln u1) * cos(2 pi u2), all in fp32 with the accurate libdevice functions.
// ---------------------------------------------------------------------------------------
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

__host__ __device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

__host__ __device__ __forceinline__ void philox4x32_10(uint64_t idx, uint64_t seed, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(idx);
  uint32_t c1 = static_cast<uint32_t>(idx >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c0);
    const uint32_t lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c2);
    const uint32_t lo1 = kPhiloxM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;  // the bump after the last round is unused (dead code)
    k1 += kPhiloxW1;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

// The two uniforms of reference.philox_normal: u1 in (0, 1], u2 in [0, 1).
// (r0 >> 8) + 1 <= 2^24 and r1 >> 8 < 2^24 both convert to fp32 exactly.
__host__ __device__ __forceinline__ void philox_uniforms(uint64_t idx, uint64_t seed, float* u1,
                                                         float* u2) {
  uint32_t r[4];
  philox4x32_10(idx, seed, r);
  *u1 = static_cast<float>((r[0] >> 8) + 1u) * (1.0f / 16777216.0f);
  *u2 = static_cast<float>(r[1] >> 8) * (1.0f / 16777216.0f);
}

__device__ __forceinline__ float philox_normal(uint64_t idx, uint64_t seed) {
  float u1, u2;
  philox_uniforms(idx, seed, &u1, &u2);
  // __fmul_rn: keep each product rounded on its own (no FMA contraction), as torch does.
  const float radius = sqrtf(__fmul_rn(-2.0f, logf(u1)));
  const float theta = __fmul_rn(6.2831853071795864769f, u2);  // float(2*pi) * u2
  return __fmul_rn(radius, cosf(theta));
}

// ---------------------------------------------------------------------------------------
// Index helpers (host + device so tests can check them on the CPU).
// ---------------------------------------------------------------------------------------
__host__ __device__ __forceinline__ int64_t min_s64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max_s64(int64_t a, int64_t b) { return a > b ? a : b; }

// q = j / S for j >= 0, S > 0, using 32-bit division when both operands fit.
__host__ __device__ __forceinline__ int64_t div_s64(int64_t j, int64_t S) {
  if (((static_cast<uint64_t>(j) | static_cast<uint64_t>(S)) >> 32) == 0) {
    return static_cast<int64_t>(static_cast<uint32_t>(j) / static_cast<uint32_t>(S));
  }
  return j / S;
}

// Channel of each of the 4 consecutive elements j..j+3 of a row with S elements per
// channel (they may straddle one or more channel boundaries when S < 4 or near one).
__host__ __device__ __forceinline__ void channels4(int64_t j, int64_t S, int64_t ch[4]) {
  int64_t c = div_s64(j, S);
  int64_t r = j - c * S;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    ch[k] = c;
    if (++r == S) {
      r = 0;
      ++c;
    }
  }
}

// Split of one row of M elements, whose first element sits `mis` (0..3) elements past a
// 4-element boundary, into [0, head) scalars, [head, vend) 4-element vectors starting on
// a 4-element boundary, and [vend, M) scalars. aligned == false: everything is scalar.
struct RowSplit {
  int64_t head, nvec, vend, nscalar;
  // Row index of the k-th scalar element (k < nscalar).
  __host__ __device__ __forceinline__ int64_t scalar_j(int64_t k) const {
    return k < head ? k : vend + (k - head);
  }
};

__host__ __device__ __forceinline__ RowSplit split_row(int64_t M, int mis, bool aligned) {
  RowSplit r;
  if (aligned) {
    r.head = min_s64((4 - mis) & 3, M);
    r.nvec = (M - r.head) / 4;
  } else {
    r.head = M;
    r.nvec = 0;
  }
  r.vend = r.head + 4 * r.nvec;
  r.nscalar = r.head + (M - r.vend);
  return r;
}

// ---------------------------------------------------------------------------------------
// Reductions (fixed order: the result does not depend on scheduling).
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block; the total is returned to threadIdx.x == 0 (other threads get a
// partial). blockDim.x must be a multiple of 32 and <= 1024. `scratch` is __shared__
// float[32]. Safe to call repeatedly with the same scratch (syncs on entry).
__device__ __forceinline__ float block_reduce_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_reduce_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? scratch[lane] : 0.0f;
    v = warp_reduce_sum(v);
  }
  return v;
}

}  // namespace dbk
