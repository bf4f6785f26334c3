// AdamW8bit / AdamW4bit multi-tensor step: dequantize, update, requantize in registers, one launch.
//
// Spec: dbkernels/optim/reference.py (update, stochastic rounding) and
// dbkernels/optim/quant.py (the two dynamic 8-bit maps, closed-form nearest code); a launch
// with state_bits 4 has the 4-bit states of quant4.py (reference4.py: the same update, the
// same random bits, only the maps and the packing differ). The format is a template
// parameter of the kernel, chosen per launch: the 8-bit kernel carries no 4-bit code (and
// no extra registers).
// The state codes are rounded stochastically (unbiased) with bits of a per-element hash.
// Every fp32 operation is the explicitly rounded intrinsic (__fmul_rn, __fadd_rn,
// __fdiv_rn, __fsqrt_rn) so nvcc cannot contract them into FMAs: the kernel computes the
// reference's operations bit for bit.
//
// Work decomposition (see adamw8bit.h): one warp per quantization block of BS = 128 * K
// elements; lane l owns the 4-element chunks at block offsets k * 128 + 4 * l (k < K),
// so every warp-wide load/store is contiguous (vector width 16 B for fp32 data, 8 B for
// 16-bit data, 4 B for 8-bit codes, 2 B for 4-bit codes). The block absmax is a warp
// shuffle reduction: no shared memory, no __syncthreads. Partial last blocks and tensors
// whose pointers are not vector-aligned take the scalar path with bounds checks.
#include "adamw8bit.h"

#include <type_traits>

#include "common.cuh"

namespace dbk {
namespace {

constexpr uint32_t kGoldenStep = 0x9E3779B9u;
constexpr uint32_t kGoldenIndex = 0x9E3779B1u;
constexpr uint32_t kStateSalt = 0x68E31DA4u;  // reference.STATE_SALT
constexpr int kMBits = 4;     // quant.MBITS
constexpr int kUEmin = -14;   // quant.UNSIGNED_EMIN
constexpr int kUMax = 240;    // quant.UNSIGNED_MAX_CODE
constexpr int kSEmin = -6;    // quant.SIGNED_EMIN
constexpr int kSMax = 112;    // quant.SIGNED_MAX_MAG
constexpr int kM4MBits = 0;   // quant4.M_MBITS: m magnitudes are powers of two
constexpr int kM4Emin = -6;   // quant4.M_EMIN
constexpr int kM4Max = 7;     // quant4.M_MAX (1.0)
constexpr uint32_t kM4Sign = 8u;  // quant4.M_SIGN
constexpr int kV4MBits = 1;   // quant4.V_MBITS
constexpr int kV4Emin = -7;   // quant4.V_EMIN
constexpr int kV4Max = 16;    // quant4.V_MAX (1.0); stored nibble = code - 1 (no zero)

struct Scalars {
  float b1, omb1, b2, omb2, eps, step_size, inv_sqrt_bc2, decay;
  uint32_t step;
  bool sr;
};

__device__ __forceinline__ uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// Small-float code with MB mantissa bits -> map value (quant.decode_magnitude,
// quant4._decode); exact.
template <int MB>
__device__ __forceinline__ float decode_mag(int c, int emin) {
  const int hi = c >> MB;
  const int lo = c & ((1 << MB) - 1);
  const int e = max(hi - 1, 0) + emin - MB;
  const int mant = hi > 0 ? lo + (1 << MB) : lo;
  return __fmul_rn(static_cast<float>(mant), __int_as_float((e + 127) << 23));
}

// x in [0, 1], u uniform in [0, 1) -> stochastically rounded code with MB mantissa bits
// (quant.encode_magnitude, quant4._encode; u = 0.5 would be the nearest code).
template <int MB>
__device__ __forceinline__ int encode_mag(float x, float u, int emin, int maxc) {
  const int bits = __float_as_int(x);
  const int e = max(((bits >> 23) & 0xFF) - 127, emin);
  const float y = __fmul_rn(x, __int_as_float((127 + MB - e) << 23));
  const int q = static_cast<int>(floorf(__fadd_rn(y, u)));
  return min(max((e - emin) * (1 << MB) + q, 0), maxc);
}

__device__ __forceinline__ float decode_signed(uint32_t c) {
  const float mag = decode_mag<kMBits>(static_cast<int>(c & 127u), kSEmin);
  return (c & 128u) ? -mag : mag;
}

__device__ __forceinline__ uint32_t encode_signed(float x, float u) {
  const uint32_t mag = static_cast<uint32_t>(encode_mag<kMBits>(fabsf(x), u, kSEmin, kSMax));
  return x < 0.f ? mag + 128u : mag;
}

// quant.encode_unsigned: a positive x gets at least code 1.
__device__ __forceinline__ uint32_t encode_unsigned(float x, float u) {
  const int c = encode_mag<kMBits>(x, u, kUEmin, kUMax);
  return static_cast<uint32_t>(x > 0.f ? max(c, 1) : c);
}

// The 4-bit maps (quant4.decode_m / encode_m / decode_v / encode_v) on one nibble.
__device__ __forceinline__ float decode_m4(uint32_t c) {
  const float mag = decode_mag<kM4MBits>(static_cast<int>(c & 7u), kM4Emin);
  return (c & kM4Sign) ? -mag : mag;
}

__device__ __forceinline__ uint32_t encode_m4(float x, float u) {
  const uint32_t mag = static_cast<uint32_t>(encode_mag<kM4MBits>(fabsf(x), u, kM4Emin, kM4Max));
  return x < 0.f ? mag + kM4Sign : mag;
}

__device__ __forceinline__ float decode_v4(uint32_t c) {
  return decode_mag<kV4MBits>(static_cast<int>(c) + 1, kV4Emin);
}

// Every x (0 included) gets at least code 1, stored as nibble code - 1: the map has no zero.
__device__ __forceinline__ uint32_t encode_v4(float x, float u) {
  return static_cast<uint32_t>(max(encode_mag<kV4MBits>(x, u, kV4Emin, kV4Max), 1) - 1);
}

// 4-bit state access: the codes of element e are nibble e & 1 of byte e / 2 (quant4.pack).
__device__ __forceinline__ uint32_t nibble_at(const uint8_t* c, int64_t e) {
  return (static_cast<uint32_t>(c[e >> 1]) >> (4 * (e & 1))) & 15u;
}

// The 4 nibbles of the elements e0 .. e0 + 3 (e0 a multiple of 4) as one uint16 load.
__device__ __forceinline__ uint32_t load_nibbles4(const uint8_t* c, int64_t e0) {
  DBK_CHECK_ALIGN(c + (e0 >> 1), 2);
  return *reinterpret_cast<const uint16_t*>(c + (e0 >> 1));
}

__device__ __forceinline__ void store_nibbles4(uint8_t* c, int64_t e0, const uint32_t q[4]) {
  DBK_CHECK_ALIGN(c + (e0 >> 1), 2);
  *reinterpret_cast<uint16_t*>(c + (e0 >> 1)) =
      static_cast<uint16_t>(q[0] | (q[1] << 4) | (q[2] << 8) | (q[3] << 12));
}

// Scalar path: the nibbles of the elements e0 .. e0 + 3 that are < n. A byte whose high element
// is past n gets high nibble 0 (quant4.pack's padding); bytes are never shared between lanes or
// blocks (e0 and block starts are even).
__device__ __forceinline__ void store_nibbles_tail(uint8_t* c, int64_t e0, int64_t n, const uint32_t q[4]) {
#pragma unroll
  for (int j = 0; j < 4; j += 2) {
    const int64_t e = e0 + j;
    if (e < n) c[e >> 1] = static_cast<uint8_t>(q[j] | (e + 1 < n ? q[j + 1] << 4 : 0u));
  }
}

__device__ __forceinline__ uint32_t element_hash(uint32_t idx, uint32_t key) {
  return fmix32((idx * kGoldenIndex) ^ key);
}

// Stochastic rounding of fp32 x to bf16 precision (the result is exactly a bf16 value).
__device__ __forceinline__ float stochastic_bf16(float x, uint32_t h) {
  const uint32_t r = h & 0xFFFFu;
  const float y = __uint_as_float((__float_as_uint(x) + r) & 0xFFFF0000u);
  return x != x ? x : y;
}

// One AdamW element update (reference.adam_math); x is the parameter in fp32.
__device__ __forceinline__ void adam_elem(float& x, float g, float& m, float& v, const Scalars& s) {
  m = __fadd_rn(__fmul_rn(m, s.b1), __fmul_rn(g, s.omb1));
  v = __fadd_rn(__fmul_rn(v, s.b2), __fmul_rn(__fmul_rn(g, g), s.omb2));
  const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), s.inv_sqrt_bc2), s.eps);
  x = __fmul_rn(x, s.decay);
  x = __fsub_rn(x, __fmul_rn(__fdiv_rn(m, denom), s.step_size));
}

// One warp per quantization block. FOUR: the launch's quantized rows have 4-bit states; every
// format difference is an `if constexpr`, so the 8-bit kernel is the code it was before the
// 4-bit format (same registers). fp32-state rows are the same in both kernels.
template <typename T, int K, bool FOUR>
__global__ void __launch_bounds__(kAdamWWarps * 32)
adamw8bit_kernel(const AdamWTensor* __restrict__ meta, const int32_t* __restrict__ cta_tensor,
                 AdamWTensor single, Scalars s) {
  constexpr int BS = 128 * K;
  const int64_t cta = blockIdx.x;
  const AdamWTensor t = meta != nullptr ? meta[cta_tensor[cta]] : single;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t blk = (cta - t.first_cta) * kAdamWWarps + warp;
  const int64_t base = blk * BS;
  const int64_t n = t.numel;
  if (base >= n) return;  // whole warp leaves together (no block-wide sync below)

  const int64_t flags = t.seed_flags >> 32;
  const bool quant = (flags & kAdamWQuant) != 0;
  // A quantized row of the other format (a caller's bug) is left as it is: read in this
  // launch's format its codes would be misread, and an 8-bit write would run past a 4-bit state.
  if (quant && ((flags & kAdamW4bit) != 0) != FOUR) return;
  const bool full = (flags & kAdamWAligned) != 0 && base + BS <= n;
  const uint32_t key = fmix32(static_cast<uint32_t>(t.seed_flags) + s.step * kGoldenStep);
  const bool sr = s.sr && std::is_same<T, __nv_bfloat16>::value;

  T* p = reinterpret_cast<T*>(t.p);
  const T* g = reinterpret_cast<const T*>(t.g);
  uint8_t* c1 = reinterpret_cast<uint8_t*>(t.s1);
  uint8_t* c2 = reinterpret_cast<uint8_t*>(t.s2);
  float* f1 = reinterpret_cast<float*>(t.s1);
  float* f2 = reinterpret_cast<float*>(t.s2);
  float* am1p = reinterpret_cast<float*>(t.a1);
  float* am2p = reinterpret_cast<float*>(t.a2);

  float am1 = 0.f, am2 = 0.f;
  if (quant) {
    am1 = am1p[blk];
    am2 = am2p[blk];
  }

  float m[K][4], v[K][4];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t e0 = base + k * 128 + lane * 4;
    float gv[4], xv[4];
    if (full) {
      load4(g + e0, gv);
      load4(p + e0, xv);
      if (quant) {
        if constexpr (FOUR) {
          const uint32_t q1 = load_nibbles4(c1, e0);
          const uint32_t q2 = load_nibbles4(c2, e0);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            m[k][i] = __fmul_rn(decode_m4((q1 >> (4 * i)) & 15u), am1);
            v[k][i] = __fmul_rn(decode_v4((q2 >> (4 * i)) & 15u), am2);
          }
        } else {
          DBK_CHECK_ALIGN(c1 + e0, 4);
          DBK_CHECK_ALIGN(c2 + e0, 4);
          const uint32_t q1 = *reinterpret_cast<const uint32_t*>(c1 + e0);
          const uint32_t q2 = *reinterpret_cast<const uint32_t*>(c2 + e0);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            m[k][i] = __fmul_rn(decode_signed((q1 >> (8 * i)) & 0xFFu), am1);
            v[k][i] = __fmul_rn(decode_mag<kMBits>(static_cast<int>((q2 >> (8 * i)) & 0xFFu), kUEmin), am2);
          }
        }
      } else {
        load4(f1 + e0, m[k]);
        load4(f2 + e0, v[k]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t e = e0 + i;
        if (e < n) {
          gv[i] = load1(g + e);
          xv[i] = load1(p + e);
          if (quant) {
            if constexpr (FOUR) {
              m[k][i] = __fmul_rn(decode_m4(nibble_at(c1, e)), am1);
              v[k][i] = __fmul_rn(decode_v4(nibble_at(c2, e)), am2);
            } else {
              m[k][i] = __fmul_rn(decode_signed(c1[e]), am1);
              v[k][i] = __fmul_rn(decode_mag<kMBits>(static_cast<int>(c2[e]), kUEmin), am2);
            }
          } else {
            m[k][i] = f1[e];
            v[k][i] = f2[e];
          }
        } else {
          gv[i] = xv[i] = m[k][i] = v[k][i] = 0.f;  // stays 0 through the update
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      adam_elem(xv[i], gv[i], m[k][i], v[k][i], s);
      if (sr) xv[i] = stochastic_bf16(xv[i], element_hash(static_cast<uint32_t>(e0 + i), key));
    }
    if (full) {
      store4(p + e0, xv);
      if (!quant) {
        store4(f1 + e0, m[k]);
        store4(f2 + e0, v[k]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t e = e0 + i;
        if (e < n) {
          store1(p + e, xv[i]);
          if (!quant) {
            f1[e] = m[k][i];
            f2[e] = v[k][i];
          }
        }
      }
    }
  }
  if (!quant) return;

  // New absmax of the block (elements past n are 0 and do not change it).
  float mx1 = 0.f, mx2 = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      mx1 = fmaxf(mx1, fabsf(m[k][i]));
      mx2 = fmaxf(mx2, v[k][i]);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    mx2 = fmaxf(mx2, __shfl_xor_sync(0xffffffffu, mx2, off));
  }
  const float d1 = mx1 > 0.f ? mx1 : 1.f;
  const float d2 = mx2 > 0.f ? mx2 : 1.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t e0 = base + k * 128 + lane * 4;
    uint32_t q1[4], q2[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // the state codes' uniforms: reference.state_uniforms (recomputing the element hash
      // here is cheaper than keeping 4 * K hashes live across the absmax reduction)
      const uint32_t r2 = fmix32(element_hash(static_cast<uint32_t>(e0 + i), key) ^ kStateSalt);
      const float u_m = __fmul_rn(static_cast<float>(r2 & 0xFFFFu), 1.0f / 65536.0f);
      const float u_v = __fmul_rn(static_cast<float>(r2 >> 16), 1.0f / 65536.0f);
      if constexpr (FOUR) {
        q1[i] = encode_m4(__fdiv_rn(m[k][i], d1), u_m);
        q2[i] = encode_v4(__fdiv_rn(v[k][i], d2), u_v);
      } else {
        q1[i] = encode_signed(__fdiv_rn(m[k][i], d1), u_m);
        q2[i] = encode_unsigned(__fdiv_rn(v[k][i], d2), u_v);
      }
    }
    if constexpr (FOUR) {
      if (full) {
        store_nibbles4(c1, e0, q1);
        store_nibbles4(c2, e0, q2);
      } else {
        store_nibbles_tail(c1, e0, n, q1);
        store_nibbles_tail(c2, e0, n, q2);
      }
    } else if (full) {
      DBK_CHECK_ALIGN(c1 + e0, 4);
      DBK_CHECK_ALIGN(c2 + e0, 4);
      *reinterpret_cast<uint32_t*>(c1 + e0) = q1[0] | (q1[1] << 8) | (q1[2] << 16) | (q1[3] << 24);
      *reinterpret_cast<uint32_t*>(c2 + e0) = q2[0] | (q2[1] << 8) | (q2[2] << 16) | (q2[3] << 24);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (e0 + i < n) {
          c1[e0 + i] = static_cast<uint8_t>(q1[i]);
          c2[e0 + i] = static_cast<uint8_t>(q2[i]);
        }
      }
    }
  }
  if (lane == 0) {
    am1p[blk] = mx1;
    am2p[blk] = mx2;
  }
}

template <typename T, int K, bool FOUR>
cudaError_t launch(const AdamW8bitArgs& a, const Scalars& s, cudaStream_t stream) {
  DBK_LAUNCH((adamw8bit_kernel<T, K, FOUR>), dim3(static_cast<unsigned>(a.num_ctas)), dim3(kAdamWWarps * 32), 0,
             stream, a.meta, a.cta_tensor, a.single, s);
  return cudaGetLastError();
}

template <typename T, bool FOUR>
cudaError_t launch_dtype(const AdamW8bitArgs& a, const Scalars& s, cudaStream_t stream) {
  switch (a.block_size) {
    case 128: return launch<T, 1, FOUR>(a, s, stream);
    case 256: return launch<T, 2, FOUR>(a, s, stream);
    case 512: return launch<T, 4, FOUR>(a, s, stream);
    case 1024: return launch<T, 8, FOUR>(a, s, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <bool FOUR>
cudaError_t launch_format(const AdamW8bitArgs& a, const Scalars& s, cudaStream_t stream) {
  switch (a.dtype) {
    case AdamDType::kFloat32: return launch_dtype<float, FOUR>(a, s, stream);
    case AdamDType::kFloat16: return launch_dtype<__half, FOUR>(a, s, stream);
    case AdamDType::kBFloat16: return launch_dtype<__nv_bfloat16, FOUR>(a, s, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t adamw8bit_step(const AdamW8bitArgs& a, cudaStream_t stream) {
  if (a.num_ctas == 0) return cudaSuccess;
  if (a.num_ctas < 0 || a.num_ctas > 0x7FFFFFFFLL) return cudaErrorInvalidValue;
  if (!adamw8bit_block_size_supported(a.block_size)) return cudaErrorInvalidValue;
  if (!adamw_state_bits_supported(a.state_bits)) return cudaErrorInvalidValue;
  if (a.meta == nullptr && a.single.first_cta != 0) return cudaErrorInvalidValue;
  if (a.meta != nullptr && a.cta_tensor == nullptr) return cudaErrorInvalidValue;
  Scalars s{a.b1, a.omb1, a.b2, a.omb2, a.eps, a.step_size, a.inv_sqrt_bc2, a.decay, a.step,
            a.stochastic_rounding};
  return a.state_bits == 4 ? launch_format<true>(a, s, stream) : launch_format<false>(a, s, stream);
}

}  // namespace dbk
