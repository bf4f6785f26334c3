// Host API of the AdamW8bit multi-tensor step (csrc/adamw8bit.cu).
//
// Plain C++ (no torch, no device code): adamw8bit_ops.cpp includes this with the host
// compiler. The spec of every quantity is dbkernels/optim/reference.py (the update) and
// dbkernels/optim/quant.py (the 8-bit maps).
//
// One launch updates every tensor of a table. Work unit: one warp per quantization block
// of block_size elements; a CTA has kAdamWWarps warps, and a CTA never spans two tensors
// (each tensor owns adamw8bit_num_ctas(numel, block_size) consecutive CTAs), so a CTA
// finds its tensor with one load of `cta_tensor`.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace dbk {

enum class AdamDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kAdamWWarps = 8;  // warps (quantization blocks) per CTA; 256 threads

// Flags of AdamWTensor::flags.
constexpr int64_t kAdamWQuant = 1;    // 8-bit state (else fp32 exp_avg / exp_avg_sq)
constexpr int64_t kAdamWAligned = 2;  // every pointer allows 4-element vector accesses

// One tensor of the table: 9 int64 words (the layout of the int64 meta tensor rows).
struct AdamWTensor {
  int64_t p;          // param address (dtype of the launch), contiguous, numel elements
  int64_t g;          // grad address, same dtype as p
  int64_t s1;         // 8-bit: uint8 codes of m; fp32 state: float exp_avg
  int64_t a1;         // 8-bit: float absmax of m per block; fp32 state: unused
  int64_t s2;         // 8-bit: uint8 codes of v; fp32 state: float exp_avg_sq
  int64_t a2;         // 8-bit: float absmax of v per block
  int64_t numel;
  int64_t first_cta;  // first CTA of this tensor in the launch
  int64_t seed_flags; // low 32 bits: stochastic-rounding seed; bits 32..: kAdamW* flags
};
constexpr int kAdamWMetaWords = 9;
static_assert(sizeof(AdamWTensor) == kAdamWMetaWords * sizeof(int64_t), "AdamWTensor layout");

struct AdamW8bitArgs {
  // Table mode: meta (device, num_tensors AdamWTensor rows) and cta_tensor (device,
  // num_ctas int32: the tensor of each CTA). Single mode: meta == nullptr, `single` is
  // passed by value and must have first_cta == 0.
  const AdamWTensor* meta = nullptr;
  const int32_t* cta_tensor = nullptr;
  AdamWTensor single{};
  int64_t num_ctas = 0;
  AdamDType dtype = AdamDType::kFloat32;
  int block_size = 256;  // 128, 256, 512 or 1024
  // fp32 scalars exactly as reference.hyperparams computes them.
  float b1 = 0.9f, omb1 = 0.1f, b2 = 0.999f, omb2 = 0.001f, eps = 1e-8f;
  float step_size = 0.f, inv_sqrt_bc2 = 1.f, decay = 1.f;
  uint32_t step = 1;               // 1-based step (the stochastic-rounding key)
  bool stochastic_rounding = true; // only used for bf16
};

// CTAs one tensor needs (0 for an empty tensor).
inline int64_t adamw8bit_num_ctas(int64_t numel, int block_size) {
  const int64_t per_cta = static_cast<int64_t>(block_size) * kAdamWWarps;
  return (numel + per_cta - 1) / per_cta;
}

inline bool adamw8bit_block_size_supported(int block_size) {
  return block_size == 128 || block_size == 256 || block_size == 512 || block_size == 1024;
}

// One kernel launch on `stream` (nothing launched when num_ctas == 0).
cudaError_t adamw8bit_step(const AdamW8bitArgs& args, cudaStream_t stream);

}  // namespace dbk
