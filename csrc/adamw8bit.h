// Host API of the AdamW8bit / AdamW4bit multi-tensor step (csrc/adamw8bit.cu).
//
// Plain C++ (no torch, no device code): adamw8bit_ops.cpp includes this with the host
// compiler. The spec of every quantity is dbkernels/optim/reference.py (the update) and
// dbkernels/optim/quant.py (the 8-bit maps); for 4-bit states reference4.py and quant4.py.
//
// One launch updates every tensor of a table. Work unit: one warp per quantization block
// of block_size elements; a CTA has kAdamWWarps warps, and a CTA never spans two tensors
// (each tensor owns adamw8bit_num_ctas(numel, block_size) consecutive CTAs), so a CTA
// finds its tensor with one load of `cta_tensor`. The quantized states of one launch share
// one format (state_bits: a kernel per format, so the 8-bit one pays nothing for the 4-bit
// code); fp32-state rows go in a launch of either format.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace dbk {

enum class AdamDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kAdamWWarps = 8;  // warps (quantization blocks) per CTA; 256 threads

// Flags of AdamWTensor::flags.
constexpr int64_t kAdamWQuant = 1;    // quantized state (else fp32 exp_avg / exp_avg_sq)
constexpr int64_t kAdamWAligned = 2;  // every pointer allows 4-element vector accesses
// With kAdamWQuant: 4-bit states (dbkernels/optim/quant4.py; AdamW4bit), two codes per byte,
// element 2j in the low nibble of byte j (ceil(numel / 2) bytes); else 8-bit (quant.py).
// kAdamWAligned then asks of s1 / s2 only 2-byte alignment (4 codes per lane access).
// The launch's state_bits chooses the format; this flag only confirms it per row: a quantized
// row whose flag disagrees with state_bits is skipped (left unchanged), never misread.
constexpr int64_t kAdamW4bit = 4;

// The state formats this build's kernel reads (bit widths as a mask; the Python glue asks the
// op cuda_adamw_state_formats so that an extension built before the 4-bit format is refused).
constexpr int64_t kAdamWStateFormats = 8 | 4;

// One tensor of the table: 9 int64 words (the layout of the int64 meta tensor rows).
struct AdamWTensor {
  int64_t p;          // param address (dtype of the launch), contiguous, numel elements
  int64_t g;          // grad address, same dtype as p
  int64_t s1;         // quantized: uint8 codes of m (4-bit: packed); fp32 state: float exp_avg
  int64_t a1;         // quantized: float absmax of m per block; fp32 state: unused
  int64_t s2;         // quantized: uint8 codes of v (4-bit: packed); fp32 state: float exp_avg_sq
  int64_t a2;         // quantized: float absmax of v per block
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
  int state_bits = 8;    // 8 (AdamW8bit) or 4 (AdamW4bit): the format of the launch's quantized rows
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

inline bool adamw_state_bits_supported(int state_bits) { return state_bits == 8 || state_bits == 4; }

// One kernel launch on `stream` (nothing launched when num_ctas == 0).
cudaError_t adamw8bit_step(const AdamW8bitArgs& args, cudaStream_t stream);

}  // namespace dbk
