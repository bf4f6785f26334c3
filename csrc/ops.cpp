// Torch bindings of the dbkernels CUDA kernels (built only on machines with a CUDA
// torch and nvcc; see setup.py and dbkernels/_ext.py).
//
// The Python op modules do the user-facing validation (clear ValueError/TypeError); the
// checks here are cheap guards against memory errors when an op is called directly.
//
// The `dbkernels` namespace is shared with ops that Python registers through
// torch.library.custom_op (a FRAGMENT library), hence TORCH_LIBRARY_FRAGMENT, and the
// `cuda_` prefix keeps these low-level ops apart from the public `dbkernels::add_noise`
// and `dbkernels::diffusion_loss_fwd` custom ops.
#include <torch/extension.h>

// c10's stream header rather than ATen/cuda/CUDAContext.h: same current stream
// (at::cuda::getCurrentCUDAStream forwards to it) without the cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "diffusion_loss.h"

namespace {

dbk::DType float_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return dbk::DType::kFloat32;
    case at::kHalf: return dbk::DType::kFloat16;
    case at::kBFloat16: return dbk::DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return dbk::DType::kFloat32;  // unreachable
}

void check_cuda_tensor(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_cuda_ok(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

struct Layout {
  int64_t B, M, C;
};

Layout layout_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "expected a batched tensor (at least 1 dimension), got a scalar");
  Layout l;
  l.B = x.size(0);
  l.M = l.B > 0 ? x.numel() / l.B : 0;
  l.C = x.dim() >= 2 ? x.size(1) : 1;
  return l;
}

// Common checks of (x0-like) data, noise, noise_offset, timesteps, alphas_cumprod.
void check_common(const at::Tensor& x, const std::optional<at::Tensor>& noise,
                  const std::optional<at::Tensor>& noise_offset, const at::Tensor& timesteps,
                  const at::Tensor& alphas_cumprod, const Layout& l) {
  if (noise.has_value()) {
    check_cuda_tensor(*noise, x, "noise");
    TORCH_CHECK(noise->sizes() == x.sizes(), "noise must have shape ", x.sizes(), ", got ",
                noise->sizes());
    float_dtype(*noise, "noise");
  }
  if (noise_offset.has_value()) {
    check_cuda_tensor(*noise_offset, x, "noise_offset");
    TORCH_CHECK(noise_offset->scalar_type() == at::kFloat, "noise_offset must be float32");
    TORCH_CHECK(noise_offset->numel() == l.B * l.C, "noise_offset must have ", l.B * l.C,
                " elements (B, C), got ", noise_offset->numel());
  }
  check_cuda_tensor(timesteps, x, "timesteps");
  TORCH_CHECK(timesteps.scalar_type() == at::kLong, "timesteps must be int64");
  TORCH_CHECK(timesteps.numel() == l.B, "timesteps must have ", l.B, " elements, got ",
              timesteps.numel());
  check_cuda_tensor(alphas_cumprod, x, "alphas_cumprod");
  TORCH_CHECK(alphas_cumprod.scalar_type() == at::kFloat, "alphas_cumprod must be float32");
  TORCH_CHECK(l.C > 0 || l.M == 0, "the channel dimension must not be empty");
}

const void* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

// (loss: 0-dim fp32, grad: like pred, or an empty (0,) tensor when need_grad is false)
std::tuple<at::Tensor, at::Tensor> diffusion_loss_fwd_cuda(
    const at::Tensor& pred, const at::Tensor& x0, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& noise_offset, const at::Tensor& timesteps,
    const at::Tensor& alphas_cumprod, at::Tensor& counter, int64_t pred_type, int64_t n_inst,
    double inst_scale, double prior_scale, double snr_gamma, int64_t seed, bool need_grad,
    const std::optional<at::Tensor>& mask, int64_t loss_type, double huber_c,
    const std::optional<at::Tensor>& huber_c_rows) {
  check_cuda_tensor(pred, pred, "pred");
  check_cuda_tensor(x0, pred, "x0");
  TORCH_CHECK(x0.sizes() == pred.sizes(), "x0 must have shape ", pred.sizes(), ", got ",
              x0.sizes());
  const Layout l = layout_of(pred);
  check_common(pred, noise, noise_offset, timesteps, alphas_cumprod, l);
  check_cuda_tensor(counter, pred, "counter");
  TORCH_CHECK(counter.scalar_type() == at::kInt && counter.numel() == 1,
              "counter must be a 1-element int32 tensor");
  TORCH_CHECK(pred_type >= 0 && pred_type <= 2, "pred_type must be 0, 1 or 2, got ", pred_type);
  TORCH_CHECK(loss_type >= 0 && loss_type <= 2, "loss_type must be 0, 1 or 2, got ", loss_type);
  const int64_t S = l.C > 0 ? l.M / l.C : 0;
  if (mask.has_value()) {  // (Bm, Cm, S) fp32, Bm in {1, B}, Cm in {1, C}: the op module's layout
    check_cuda_tensor(*mask, pred, "mask");
    TORCH_CHECK(mask->scalar_type() == at::kFloat, "mask must be float32");
    TORCH_CHECK(mask->dim() == 3 && (mask->size(0) == 1 || mask->size(0) == l.B) &&
                    (mask->size(1) == 1 || mask->size(1) == l.C) && mask->size(2) == S,
                "mask must have shape (1 or ", l.B, ", 1 or ", l.C, ", ", S, "), got ",
                mask->sizes());
  }
  if (huber_c_rows.has_value()) {
    check_cuda_tensor(*huber_c_rows, pred, "huber_c_rows");
    TORCH_CHECK(huber_c_rows->scalar_type() == at::kFloat && huber_c_rows->numel() == l.B,
                "huber_c_rows must be float32 with ", l.B, " elements");
  }

  const c10::cuda::CUDAGuard guard(pred.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const auto f32 = pred.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, f32);
  at::Tensor grad = need_grad ? at::empty_like(pred) : at::empty({0}, pred.options());
  at::Tensor partials = at::empty({dbk::diffusion_loss_num_partials(l.B, l.M)}, f32);

  dbk::DiffusionLossArgs a;
  a.pred = pred.data_ptr();
  a.x0 = x0.data_ptr();
  a.noise = opt_ptr(noise);
  a.noise_offset = static_cast<const float*>(opt_ptr(noise_offset));
  a.timesteps = timesteps.data_ptr<int64_t>();
  a.alphas_cumprod = alphas_cumprod.data_ptr<float>();
  a.pred_dtype = float_dtype(pred, "pred");
  a.x0_dtype = float_dtype(x0, "x0");
  a.noise_dtype = noise.has_value() ? float_dtype(*noise, "noise") : dbk::DType::kFloat32;
  a.num_timesteps = alphas_cumprod.numel();
  a.B = l.B;
  a.M = l.M;
  a.C = l.C;
  a.pred_type = static_cast<int>(pred_type);
  a.n_inst = n_inst;
  a.inst_scale = static_cast<float>(inst_scale);
  a.prior_scale = static_cast<float>(prior_scale);
  a.snr_gamma = static_cast<float>(snr_gamma);
  a.seed = static_cast<uint64_t>(seed);  // two's complement bits = the reference's key words
  if (mask.has_value()) {
    a.mask = mask->data_ptr<float>();
    a.mask_row_stride = mask->size(0) == 1 ? 0 : mask->size(1) * S;
    a.mask_ch_stride = mask->size(1) == 1 ? 0 : S;
  }
  a.loss_type = static_cast<int>(loss_type);
  a.huber_c = static_cast<float>(huber_c);
  a.huber_c_rows = huber_c_rows.has_value() ? huber_c_rows->data_ptr<float>() : nullptr;
  a.loss = loss.data_ptr<float>();
  a.grad = need_grad ? grad.data_ptr() : nullptr;
  a.partials = partials.data_ptr<float>();
  a.counter = counter.data_ptr<int>();
  check_cuda_ok(dbk::diffusion_loss_fwd(a, stream), "dbkernels diffusion_loss_fwd launch");
  return {loss, grad};
}

at::Tensor add_noise_cuda(const at::Tensor& x0, const std::optional<at::Tensor>& noise,
                          const std::optional<at::Tensor>& noise_offset,
                          const at::Tensor& timesteps, const at::Tensor& alphas_cumprod,
                          int64_t seed) {
  check_cuda_tensor(x0, x0, "x0");
  const Layout l = layout_of(x0);
  check_common(x0, noise, noise_offset, timesteps, alphas_cumprod, l);

  const c10::cuda::CUDAGuard guard(x0.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty_like(x0);

  dbk::AddNoiseArgs a;
  a.x0 = x0.data_ptr();
  a.noise = opt_ptr(noise);
  a.noise_offset = static_cast<const float*>(opt_ptr(noise_offset));
  a.timesteps = timesteps.data_ptr<int64_t>();
  a.alphas_cumprod = alphas_cumprod.data_ptr<float>();
  a.x0_dtype = float_dtype(x0, "x0");
  a.noise_dtype = noise.has_value() ? float_dtype(*noise, "noise") : dbk::DType::kFloat32;
  a.num_timesteps = alphas_cumprod.numel();
  a.B = l.B;
  a.M = l.M;
  a.C = l.C;
  a.seed = static_cast<uint64_t>(seed);
  a.out = out.data_ptr();
  check_cuda_ok(dbk::add_noise(a, stream), "dbkernels add_noise launch");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dbkernels, m) {
  m.def(
      "cuda_diffusion_loss_fwd(Tensor pred, Tensor x0, Tensor? noise, Tensor? noise_offset, "
      "Tensor timesteps, Tensor alphas_cumprod, Tensor(a!) counter, int pred_type, int n_inst, "
      "float inst_scale, float prior_scale, float snr_gamma, int seed, bool need_grad, "
      "Tensor? mask=None, int loss_type=0, float huber_c=0.1, Tensor? huber_c_rows=None) "
      "-> (Tensor, Tensor)");
  m.def(
      "cuda_add_noise(Tensor x0, Tensor? noise, Tensor? noise_offset, Tensor timesteps, "
      "Tensor alphas_cumprod, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(dbkernels, CUDA, m) {
  m.impl("cuda_diffusion_loss_fwd", &diffusion_loss_fwd_cuda);
  m.impl("cuda_add_noise", &add_noise_cuda);
}

// Importing the built module (dbkernels._C, or dbkernels_C from the JIT build) runs the
// registrations above; the module itself has no Python attributes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
