// Schemas of the raylm compiled ops and their CPU kernels.
//
// Every op is declared once here; CPU kernels are registered below and CUDA kernels in
// ops_cuda.cu. Vectorisation comes from the compiler (`#pragma omp simd` over plain float
// loops, built with -O3 -march=native by ops/native_build.py), threading from
// at::parallel_for so that torch.set_num_threads governs it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace raylm {
namespace {

// Rows smaller than this many elements are not worth a thread hand-off.
constexpr int64_t kGrainElements = 16384;
// Column block of silu_mul, so that a single decode row still spreads over threads.
constexpr int64_t kSiluBlock = 4096;

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

// exp(x) for float, written so that the compiler vectorises it (std::exp would be a scalar
// libm call without -ffast-math). Cephes range reduction and polynomial: ~1 ulp on
// [-87, 88], which keeps silu within 1e-6 relative of torch's Sleef exp.
inline float exp_vec(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// One row of HF LlamaRMSNorm: fp32 statistics, normalised value rounded to T, then
// multiplied by the weight in T (exactly `weight * x.to(input_dtype)`).
template <typename T>
inline void rms_norm_row(T* out, const T* x, const T* w, int64_t h, float eps) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < h; ++i) {
    const float v = static_cast<float>(x[i]);
    acc += v * v;
  }
  const float inv = 1.f / std::sqrt(acc / static_cast<float>(h) + eps);
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) {
    const T n = static_cast<T>(static_cast<float>(x[i]) * inv);
    out[i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(n));
  }
}

template <typename T>
void fused_add_rms_norm_rows(T* x, T* residual, const T* w, int64_t rows, int64_t h, float eps) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(h, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       T* xr = x + r * h;
                       T* rr = residual + r * h;
                       // The sum is rounded to T before the statistics, as HF's
                       // `residual + hidden_states` is.
#pragma omp simd
                       for (int64_t i = 0; i < h; ++i) {
                         rr[i] = static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
                       }
                       rms_norm_row(xr, rr, w, h, eps);
                     }
                   });
}

template <typename T>
void clamped_relu_kernel(T* out, const T* x, int64_t n, float lo, float hi) {
  at::parallel_for(0, n, kGrainElements * 4, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      // Comparisons (not std::min/max) so that NaN propagates as in torch.clamp.
      float v = static_cast<float>(x[i]);
      v = v < lo ? lo : v;
      v = v > hi ? hi : v;
      out[i] = static_cast<T>(v);
    }
  });
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1, "x must have a hidden dimension");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight must have shape [",
              x.size(-1), "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
              " must equal x dtype ", x.scalar_type());
}

void rms_norm_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_cpu(out, "out");
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  check_norm_args(x, weight);
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
              "out must match x in shape and dtype");
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  at::Tensor dst = out.is_contiguous() ? out : at::empty_like(xc);
  const int64_t h = x.size(-1);
  const int64_t rows = h == 0 ? 0 : x.numel() / h;
  const float epsf = static_cast<float>(eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_cpu", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    scalar_t* op = dst.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(h, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) {
                         rms_norm_row(op + r * h, xp + r * h, wp, h, epsf);
                       }
                     });
  });
  if (!out.is_same(dst)) out.copy_(dst);
}

void fused_add_rms_norm_cpu(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                            double eps) {
  check_cpu(x, "x");
  check_cpu(residual, "residual");
  check_cpu(weight, "weight");
  check_norm_args(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "residual must match x in shape and dtype");
  at::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  at::Tensor rc = residual.is_contiguous() ? residual : residual.contiguous();
  const at::Tensor wc = weight.contiguous();
  const int64_t h = x.size(-1);
  const int64_t rows = h == 0 ? 0 : x.numel() / h;
  const float epsf = static_cast<float>(eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "fused_add_rms_norm_cpu", [&] {
        fused_add_rms_norm_rows(xc.mutable_data_ptr<scalar_t>(), rc.mutable_data_ptr<scalar_t>(),
                                wc.const_data_ptr<scalar_t>(), rows, h, epsf);
      });
  if (!x.is_same(xc)) x.copy_(xc);
  if (!residual.is_same(rc)) residual.copy_(rc);
}

// out[r, c] = silu(gate[r, c]) * up[r, c], with silu rounded to T first as HF's
// `act_fn(gate) * up` does. Row strides let silu_and_mul read both halves of one tensor.
template <typename T>
void silu_mul_kernel(T* out, const T* gate, const T* up, int64_t rows, int64_t d,
                     int64_t out_stride, int64_t gate_stride, int64_t up_stride) {
  const int64_t blocks = (d + kSiluBlock - 1) / kSiluBlock;
  at::parallel_for(0, rows * blocks, std::max<int64_t>(1, kGrainElements / std::min(d, kSiluBlock)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t item = begin; item < end; ++item) {
                       const int64_t r = item / blocks;
                       const int64_t c0 = (item % blocks) * kSiluBlock;
                       const int64_t c1 = std::min(d, c0 + kSiluBlock);
                       const T* g = gate + r * gate_stride;
                       const T* u = up + r * up_stride;
                       T* o = out + r * out_stride;
#pragma omp simd
                       for (int64_t c = c0; c < c1; ++c) {
                         const float gv = static_cast<float>(g[c]);
                         const T s = static_cast<T>(gv / (1.f + exp_vec(-gv)));
                         o[c] = static_cast<T>(static_cast<float>(s) * static_cast<float>(u[c]));
                       }
                     }
                   });
}

void silu_and_mul_cpu(at::Tensor& out, const at::Tensor& x) {
  check_cpu(out, "out");
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "x last dim must be even, got ", x.sizes());
  const int64_t d = x.size(-1) / 2;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = d;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape) && out.scalar_type() == x.scalar_type(),
              "out must have shape ", at::IntArrayRef(out_shape), " and x's dtype");
  const at::Tensor xc = x.contiguous();
  at::Tensor dst = out.is_contiguous() ? out : at::empty(out_shape, x.options());
  const int64_t rows = d == 0 ? 0 : out.numel() / d;
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul_cpu", [&] {
      const scalar_t* xp = xc.const_data_ptr<scalar_t>();
      silu_mul_kernel(dst.mutable_data_ptr<scalar_t>(), xp, xp + d, rows, d, d, 2 * d, 2 * d);
    });
  }
  if (!out.is_same(dst)) out.copy_(dst);
}

void silu_mul_cpu(at::Tensor& out, const at::Tensor& gate, const at::Tensor& up) {
  check_cpu(out, "out");
  check_cpu(gate, "gate");
  check_cpu(up, "up");
  TORCH_CHECK(gate.dim() >= 1 && gate.sizes() == up.sizes() && gate.sizes() == out.sizes(),
              "out, gate and up must have one shape, got ", out.sizes(), ", ", gate.sizes(), ", ",
              up.sizes());
  TORCH_CHECK(gate.scalar_type() == up.scalar_type() && gate.scalar_type() == out.scalar_type(),
              "out, gate and up must have one dtype");
  const at::Tensor gc = gate.contiguous();
  const at::Tensor uc = up.contiguous();
  at::Tensor dst = out.is_contiguous() ? out : at::empty_like(gc);
  const int64_t d = gate.size(-1);
  const int64_t rows = d == 0 ? 0 : gate.numel() / d;
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "silu_mul_cpu", [&] {
      silu_mul_kernel(dst.mutable_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                      uc.const_data_ptr<scalar_t>(), rows, d, d, d, d);
    });
  }
  if (!out.is_same(dst)) out.copy_(dst);
}

at::Tensor clamped_relu_cpu(const at::Tensor& x, double lo, double hi) {
  check_cpu(x, "x");
  TORCH_CHECK(lo >= 0.0 && hi >= lo, "clamped_relu needs 0 <= lo <= hi, got lo=", lo, " hi=", hi);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "clamped_relu_cpu", [&] {
    clamped_relu_kernel(out.mutable_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), n,
                        static_cast<float>(lo), static_cast<float>(hi));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(raylm, m) {
  m.def("rms_norm(Tensor! out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor! x, Tensor! residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor! out, Tensor x) -> ()");
  m.def("silu_mul(Tensor! out, Tensor gate, Tensor up) -> ()");
  m.def("clamped_relu(Tensor x, float lo, float hi) -> Tensor");
}

TORCH_LIBRARY_IMPL(raylm, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cpu);
  m.impl("silu_and_mul", &silu_and_mul_cpu);
  m.impl("silu_mul", &silu_mul_cpu);
  m.impl("clamped_relu", &clamped_relu_cpu);
}

}  // namespace raylm
