// Torch bindings of the AdamW8bit / AdamW4bit step (csrc/adamw8bit.cu); built only on CUDA machines.
//
// Low-level ops in the shared `dbkernels` namespace (a FRAGMENT: ops.cpp owns the
// module init, Python registers the public custom ops):
//
//   cuda_adamw8bit_step(meta, cta_tensor, dtype, block_size, b1, omb1, b2, omb2, eps,
//                       step_size, inv_sqrt_bc2, decay, step, stochastic_rounding,
//                       state_bits=8) -> ()
//     table mode: meta is an int64 CUDA tensor (T, 9) of AdamWTensor rows (raw addresses
//     of params, grads, states), cta_tensor an int32 CUDA tensor (num_ctas,). Updates
//     every tensor of the table in one launch. The addresses are not tensors to torch:
//     the Python caller (dbkernels/optim/cuda.py) keeps them alive and consistent.
//     state_bits: the format of every quantized row, 8 or 4 (packed nibbles, AdamW4bit; those
//     rows are flagged kAdamW4bit, and a row that disagrees is skipped). Last and defaulted so
//     that the 8-bit call is the same for a build from before the 4-bit format.
//
//   cuda_adamw8bit_step_one(p, g, state1, absmax1, state2, absmax2, seed, block_size, ...)
//     one parameter given as tensors (step_in_backward); state1/state2 uint8 codes with
//     fp32 absmax1/absmax2, or fp32 exp_avg/exp_avg_sq (absmax tensors then ignored).
//     8-bit states only: it has no format flag (AdamW4bit's glue launches a one-row table).
//
//   cuda_adamw_state_formats() -> int
//     the state bit widths the kernel reads as a mask (8 | 4): an extension built before the
//     4-bit format lacks the op, and the Python glue then asks for a rebuild.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "adamw8bit.h"

namespace {

dbk::AdamDType adam_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return dbk::AdamDType::kFloat32;
    case at::kHalf: return dbk::AdamDType::kFloat16;
    case at::kBFloat16: return dbk::AdamDType::kBFloat16;
    default: TORCH_CHECK(false, "AdamW8bit parameters must be float32, float16 or bfloat16, got ", t);
  }
  return dbk::AdamDType::kFloat32;  // unreachable
}

void fill_scalars(dbk::AdamW8bitArgs& a, int64_t block_size, double b1, double omb1, double b2, double omb2,
                  double eps, double step_size, double inv_sqrt_bc2, double decay, int64_t step, bool sr) {
  TORCH_CHECK(dbk::adamw8bit_block_size_supported(static_cast<int>(block_size)),
              "cuda_adamw8bit: block_size must be 128, 256, 512 or 1024, got ", block_size);
  TORCH_CHECK(step >= 1, "cuda_adamw8bit: step must be >= 1, got ", step);
  a.block_size = static_cast<int>(block_size);
  // The Python side passes values that are already fp32-representable: exact.
  a.b1 = static_cast<float>(b1);
  a.omb1 = static_cast<float>(omb1);
  a.b2 = static_cast<float>(b2);
  a.omb2 = static_cast<float>(omb2);
  a.eps = static_cast<float>(eps);
  a.step_size = static_cast<float>(step_size);
  a.inv_sqrt_bc2 = static_cast<float>(inv_sqrt_bc2);
  a.decay = static_cast<float>(decay);
  a.step = static_cast<uint32_t>(step);
  a.stochastic_rounding = sr;
}

void check_ok(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "cuda_adamw8bit launch failed: ", cudaGetErrorString(err));
}

void adamw8bit_step_cuda(const at::Tensor& meta, const at::Tensor& cta_tensor, int64_t dtype, int64_t block_size,
                         double b1, double omb1, double b2, double omb2, double eps, double step_size,
                         double inv_sqrt_bc2, double decay, int64_t step, bool stochastic_rounding,
                         int64_t state_bits) {
  TORCH_CHECK(dbk::adamw_state_bits_supported(static_cast<int>(state_bits)),
              "cuda_adamw8bit_step: state_bits must be 8 or 4, got ", state_bits);
  TORCH_CHECK(meta.is_cuda() && meta.scalar_type() == at::kLong && meta.is_contiguous() && meta.dim() == 2 &&
                  meta.size(1) == dbk::kAdamWMetaWords,
              "meta must be a contiguous int64 CUDA tensor of shape (T, ", dbk::kAdamWMetaWords, ")");
  TORCH_CHECK(cta_tensor.is_cuda() && cta_tensor.scalar_type() == at::kInt && cta_tensor.is_contiguous() &&
                  cta_tensor.dim() == 1 && cta_tensor.device() == meta.device(),
              "cta_tensor must be a contiguous int32 CUDA tensor on the device of meta");
  TORCH_CHECK(dtype >= 0 && dtype <= 2, "dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got ", dtype);
  const c10::cuda::CUDAGuard guard(meta.device());
  dbk::AdamW8bitArgs a;
  a.meta = reinterpret_cast<const dbk::AdamWTensor*>(meta.data_ptr<int64_t>());
  a.cta_tensor = cta_tensor.data_ptr<int32_t>();
  a.num_ctas = cta_tensor.numel();
  a.dtype = static_cast<dbk::AdamDType>(dtype);
  a.state_bits = static_cast<int>(state_bits);
  fill_scalars(a, block_size, b1, omb1, b2, omb2, eps, step_size, inv_sqrt_bc2, decay, step, stochastic_rounding);
  check_ok(dbk::adamw8bit_step(a, c10::cuda::getCurrentCUDAStream(meta.device().index()).stream()));
}

bool aligned(const void* ptr, int64_t bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes)) == 0;
}

void adamw8bit_step_one_cuda(const at::Tensor& p, const at::Tensor& g, const at::Tensor& state1,
                             const at::Tensor& absmax1, const at::Tensor& state2, const at::Tensor& absmax2,
                             int64_t seed, int64_t block_size, double b1, double omb1, double b2, double omb2,
                             double eps, double step_size, double inv_sqrt_bc2, double decay, int64_t step,
                             bool stochastic_rounding) {
  const auto dt = adam_dtype(p.scalar_type());
  const int64_t n = p.numel();
  auto check = [&](const at::Tensor& t, const char* name, int64_t numel) {
    TORCH_CHECK(t.is_cuda() && t.device() == p.device(), name, " must be on ", p.device(), ", got ", t.device());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.numel() == numel, name, " must have ", numel, " elements, got ", t.numel());
  };
  check(p, "p", n);
  check(g, "g", n);
  TORCH_CHECK(g.scalar_type() == p.scalar_type(), "g must have the dtype of p (", p.scalar_type(), "), got ",
              g.scalar_type());
  const bool quant = state1.scalar_type() == at::kByte;
  check(state1, "state1", n);
  check(state2, "state2", n);
  TORCH_CHECK(state2.scalar_type() == state1.scalar_type(), "state1 and state2 must have one dtype");
  TORCH_CHECK(quant || state1.scalar_type() == at::kFloat, "state1 must be uint8 (8-bit) or float32");
  if (quant) {
    const int64_t nb = (n + block_size - 1) / std::max<int64_t>(block_size, 1);
    check(absmax1, "absmax1", nb);
    check(absmax2, "absmax2", nb);
    TORCH_CHECK(absmax1.scalar_type() == at::kFloat && absmax2.scalar_type() == at::kFloat,
                "absmax1/absmax2 must be float32");
  }
  const c10::cuda::CUDAGuard guard(p.device());
  dbk::AdamW8bitArgs a;
  fill_scalars(a, block_size, b1, omb1, b2, omb2, eps, step_size, inv_sqrt_bc2, decay, step, stochastic_rounding);
  a.dtype = dt;
  dbk::AdamWTensor& t = a.single;
  t.p = reinterpret_cast<int64_t>(p.data_ptr());
  t.g = reinterpret_cast<int64_t>(g.data_ptr());
  t.s1 = reinterpret_cast<int64_t>(state1.data_ptr());
  t.s2 = reinterpret_cast<int64_t>(state2.data_ptr());
  t.a1 = quant ? reinterpret_cast<int64_t>(absmax1.data_ptr()) : 0;
  t.a2 = quant ? reinterpret_cast<int64_t>(absmax2.data_ptr()) : 0;
  t.numel = n;
  t.first_cta = 0;
  const int64_t vec = 4 * static_cast<int64_t>(p.element_size());
  const int64_t svec = quant ? 4 : 16;
  const bool al = aligned(p.data_ptr(), vec) && aligned(g.data_ptr(), vec) && aligned(state1.data_ptr(), svec) &&
                  aligned(state2.data_ptr(), svec);
  const int64_t flags = (quant ? dbk::kAdamWQuant : 0) | (al ? dbk::kAdamWAligned : 0);
  t.seed_flags = (seed & 0xFFFFFFFFLL) | (flags << 32);
  a.num_ctas = dbk::adamw8bit_num_ctas(n, static_cast<int>(block_size));
  check_ok(dbk::adamw8bit_step(a, c10::cuda::getCurrentCUDAStream(p.device().index()).stream()));
}

int64_t adamw_state_formats() { return dbk::kAdamWStateFormats; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(dbkernels, m) {
  // No tensor argument, so no dispatch key: a catch-all kernel registered with the schema.
  m.def("cuda_adamw_state_formats() -> int", &adamw_state_formats);
  m.def(
      "cuda_adamw8bit_step(Tensor meta, Tensor cta_tensor, int dtype, int block_size, float b1, float omb1, "
      "float b2, float omb2, float eps, float step_size, float inv_sqrt_bc2, float decay, int step, "
      "bool stochastic_rounding, int state_bits=8) -> ()");
  m.def(
      "cuda_adamw8bit_step_one(Tensor(a!) p, Tensor g, Tensor(b!) state1, Tensor(c!) absmax1, "
      "Tensor(d!) state2, Tensor(e!) absmax2, int seed, int block_size, float b1, float omb1, float b2, "
      "float omb2, float eps, float step_size, float inv_sqrt_bc2, float decay, int step, "
      "bool stochastic_rounding) -> ()");
}

TORCH_LIBRARY_IMPL(dbkernels, CUDA, m) {
  m.impl("cuda_adamw8bit_step", &adamw8bit_step_cuda);
  m.impl("cuda_adamw8bit_step_one", &adamw8bit_step_one_cuda);
}
