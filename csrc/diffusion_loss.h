// Host API of the fused DreamBooth loss / add_noise kernels (csrc/diffusion_loss.cu).
//
// Plain C++ (no torch, no device code): ops.cpp includes this with the host compiler.
// The spec of every quantity is dbkernels/diffusion_loss/reference.py.
//
// Layout: every per-sample tensor (pred, x0, noise, x_t, grad) is contiguous and viewed
// as B rows of M = numel / B elements; C = channels (shape[1], or 1 for 1-D tensors),
// S = M / C spatial elements per channel. Element j of row b belongs to channel j / S.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace dbk {

// Runtime dtype of a float tensor.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Prediction types, in reference.PREDICTION_TYPES order.
enum PredType : int { kEpsilon = 0, kVPrediction = 1, kSample = 2 };

// Elementwise losses, in reference.LOSS_TYPES order: e^2, 2c(sqrt(e^2+c^2)-c), 2(sqrt(e^2+c^2)-c).
enum LossType : int { kL2 = 0, kHuber = 1, kSmoothL1 = 2 };

struct DiffusionLossArgs {
  const void* pred = nullptr;          // (B, M), pred_dtype
  const void* x0 = nullptr;            // (B, M), x0_dtype
  const void* noise = nullptr;         // (B, M), noise_dtype; nullptr: Philox noise from seed
  const float* noise_offset = nullptr; // (B, C) fp32 or nullptr
  const int64_t* timesteps = nullptr;  // (B,) int64; out of [0, num_timesteps) -> row is NaN
  const float* alphas_cumprod = nullptr;  // (num_timesteps,) fp32
  DType pred_dtype = DType::kFloat32;
  DType x0_dtype = DType::kFloat32;
  DType noise_dtype = DType::kFloat32;  // ignored when noise == nullptr
  int64_t num_timesteps = 0;
  int64_t B = 0, M = 0, C = 1;
  int pred_type = kEpsilon;
  int64_t n_inst = 0;          // rows [0, n_inst) use inst_scale, the rest prior_scale
  float inst_scale = 0.f;      // already includes 1/M (and 1/n_inst)
  float prior_scale = 0.f;     // already includes 1/M, prior_weight/num_prior
  float snr_gamma = -1.f;      // < 0: no min-SNR weighting
  uint64_t seed = 0;           // Philox key (only used when noise == nullptr)
  // Per-element loss weight: fp32 (Bm, Cm, S), element j of row b at
  // mask[b * mask_row_stride + (j / S) * mask_ch_stride + j % S]; a stride of 0 broadcasts.
  const float* mask = nullptr;     // nullptr: no mask (not the same as ones: no load at all)
  int64_t mask_row_stride = 0;     // Cm * S, or 0 when Bm == 1
  int64_t mask_ch_stride = 0;      // S, or 0 when Cm == 1
  int loss_type = kL2;
  float huber_c = 0.1f;            // c of every row, unless huber_c_rows is given
  const float* huber_c_rows = nullptr;  // (B,) fp32 c per row, or nullptr
  // Outputs / workspace.
  float* loss = nullptr;       // 1 float, written by the last block (no init needed)
  void* grad = nullptr;        // (B, M) pred_dtype, or nullptr (no gradient)
  float* partials = nullptr;   // diffusion_loss_num_partials(B, M) floats, no init needed
  int* counter = nullptr;      // 1 int, must be 0 on entry; the kernel leaves it 0 again
};

// Number of floats the `partials` workspace needs (= number of thread blocks launched).
int64_t diffusion_loss_num_partials(int64_t B, int64_t M);

// One kernel launch: loss (and optionally d loss / d pred) on `stream`.
cudaError_t diffusion_loss_fwd(const DiffusionLossArgs& args, cudaStream_t stream);

struct AddNoiseArgs {
  const void* x0 = nullptr;            // (B, M), x0_dtype
  const void* noise = nullptr;         // (B, M), noise_dtype; nullptr: Philox noise from seed
  const float* noise_offset = nullptr; // (B, C) fp32 or nullptr
  const int64_t* timesteps = nullptr;  // (B,) int64; out of range -> row is NaN
  const float* alphas_cumprod = nullptr;
  DType x0_dtype = DType::kFloat32;
  DType noise_dtype = DType::kFloat32;
  int64_t num_timesteps = 0;
  int64_t B = 0, M = 0, C = 1;
  uint64_t seed = 0;
  void* out = nullptr;                 // (B, M), x0_dtype
};

// x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps, stored in x0's dtype.
cudaError_t add_noise(const AddNoiseArgs& args, cudaStream_t stream);

}  // namespace dbk
