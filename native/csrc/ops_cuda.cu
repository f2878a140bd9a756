// CUDA kernels of the raylm ops; schemas live in ops.cpp.
//
// Same numerics as the CPU kernels: fp32 statistics, the normalised value rounded to the
// input dtype before the weight multiply (HF LlamaRMSNorm), silu rounded before the up multiply.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls cuSPARSE/cuBLAS headers that a bare
// nvcc toolkit lacks, and these kernels need nothing but the current stream.
#include <ATen/ATen.h>
#include "dispatch.h"
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace raylm {
namespace {

constexpr int kMaxThreads = 1024;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; every thread gets the result.
__device__ float block_sum(float v) {
  __shared__ float partial[32];
  __shared__ float total;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    float s = lane < warps ? partial[lane] : 0.f;
    s = warp_sum(s);
    if (lane == 0) total = s;
  }
  __syncthreads();
  return total;
}

template <typename T>
__global__ void rms_norm_kernel(T* __restrict__ out, const T* __restrict__ x,
                                const T* __restrict__ w, int64_t h, float eps) {
  const T* xr = x + blockIdx.x * h;
  T* orow = out + blockIdx.x * h;
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
    const float v = static_cast<float>(xr[i]);
    acc += v * v;
  }
  const float inv = rsqrtf(block_sum(acc) / static_cast<float>(h) + eps);
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
    const T n = static_cast<T>(static_cast<float>(xr[i]) * inv);
    orow[i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(n));
  }
}

template <typename T>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ x, T* __restrict__ residual,
                                          const T* __restrict__ w, int64_t h, float eps) {
  T* xr = x + blockIdx.x * h;
  T* rr = residual + blockIdx.x * h;
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
    const T s = static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
    rr[i] = s;
    const float v = static_cast<float>(s);
    acc += v * v;
  }
  const float inv = rsqrtf(block_sum(acc) / static_cast<float>(h) + eps);
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
    const T n = static_cast<T>(static_cast<float>(rr[i]) * inv);
    xr[i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(n));
  }
}

template <typename T>
__global__ void silu_mul_kernel(T* __restrict__ out, const T* __restrict__ gate,
                                const T* __restrict__ up, int64_t d, int64_t out_stride,
                                int64_t gate_stride, int64_t up_stride) {
  const int64_t r = blockIdx.y;
  for (int64_t c = blockIdx.x * blockDim.x + threadIdx.x; c < d;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = static_cast<float>(gate[r * gate_stride + c]);
    const T s = static_cast<T>(g / (1.f + expf(-g)));
    out[r * out_stride + c] =
        static_cast<T>(static_cast<float>(s) * static_cast<float>(up[r * up_stride + c]));
  }
}

template <typename T>
__global__ void clamped_relu_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t n,
                                    float lo, float hi) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = static_cast<float>(x[i]);
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    out[i] = static_cast<T>(v);
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1, "x must have a hidden dimension");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight must have shape [",
              x.size(-1), "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
              " must equal x dtype ", x.scalar_type());
}

int norm_threads(int64_t h) {
  const int64_t t = ((std::min<int64_t>(h, kMaxThreads) + 31) / 32) * 32;
  return static_cast<int>(std::max<int64_t>(t, 32));
}

void rms_norm_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_cuda(out, "out");
  check_cuda(x, "x");
  check_cuda(weight, "weight");
  check_norm_args(x, weight);
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
              "out must match x in shape and dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  at::Tensor dst = out.is_contiguous() ? out : at::empty_like(xc);
  const int64_t h = x.size(-1);
  const int64_t rows = h == 0 ? 0 : x.numel() / h;
  if (rows > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    RAYLM_DISPATCH(x.scalar_type(), "rms_norm_cuda", [&] {
      rms_norm_kernel<scalar_t><<<rows, norm_threads(h), 0, stream>>>(
          dst.mutable_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
          wc.const_data_ptr<scalar_t>(), h, static_cast<float>(eps));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!out.is_same(dst)) out.copy_(dst);
}

void fused_add_rms_norm_cuda(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                             double eps) {
  check_cuda(x, "x");
  check_cuda(residual, "residual");
  check_cuda(weight, "weight");
  check_norm_args(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "residual must match x in shape and dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  at::Tensor rc = residual.is_contiguous() ? residual : residual.contiguous();
  const at::Tensor wc = weight.contiguous();
  const int64_t h = x.size(-1);
  const int64_t rows = h == 0 ? 0 : x.numel() / h;
  if (rows > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    RAYLM_DISPATCH(
        x.scalar_type(), "fused_add_rms_norm_cuda", [&] {
          fused_add_rms_norm_kernel<scalar_t><<<rows, norm_threads(h), 0, stream>>>(
              xc.mutable_data_ptr<scalar_t>(), rc.mutable_data_ptr<scalar_t>(),
              wc.const_data_ptr<scalar_t>(), h, static_cast<float>(eps));
        });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!x.is_same(xc)) x.copy_(xc);
  if (!residual.is_same(rc)) residual.copy_(rc);
}

template <typename T>
void launch_silu_mul(T* out, const T* gate, const T* up, int64_t rows, int64_t d,
                     int64_t out_stride, int64_t gate_stride, int64_t up_stride) {
  TORCH_CHECK(rows <= 65535, "silu_mul on CUDA supports at most 65535 rows, got ", rows);
  const int threads = 256;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((d + threads - 1) / threads, 1024)),
                  static_cast<unsigned>(rows));
  silu_mul_kernel<T><<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out, gate, up, d, out_stride, gate_stride, up_stride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void silu_and_mul_cuda(at::Tensor& out, const at::Tensor& x) {
  check_cuda(out, "out");
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "x last dim must be even, got ", x.sizes());
  const int64_t d = x.size(-1) / 2;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = d;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape) && out.scalar_type() == x.scalar_type(),
              "out must have shape ", at::IntArrayRef(out_shape), " and x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor dst = out.is_contiguous() ? out : at::empty(out_shape, x.options());
  const int64_t rows = d == 0 ? 0 : out.numel() / d;
  if (rows > 0) {
    RAYLM_DISPATCH(x.scalar_type(), "silu_and_mul_cuda", [&] {
      const scalar_t* xp = xc.const_data_ptr<scalar_t>();
      launch_silu_mul(dst.mutable_data_ptr<scalar_t>(), xp, xp + d, rows, d, d, 2 * d, 2 * d);
    });
  }
  if (!out.is_same(dst)) out.copy_(dst);
}

void silu_mul_cuda(at::Tensor& out, const at::Tensor& gate, const at::Tensor& up) {
  check_cuda(out, "out");
  check_cuda(gate, "gate");
  check_cuda(up, "up");
  TORCH_CHECK(gate.dim() >= 1 && gate.sizes() == up.sizes() && gate.sizes() == out.sizes(),
              "out, gate and up must have one shape");
  TORCH_CHECK(gate.scalar_type() == up.scalar_type() && gate.scalar_type() == out.scalar_type(),
              "out, gate and up must have one dtype");
  const c10::cuda::CUDAGuard guard(gate.device());
  const at::Tensor gc = gate.contiguous();
  const at::Tensor uc = up.contiguous();
  at::Tensor dst = out.is_contiguous() ? out : at::empty_like(gc);
  const int64_t d = gate.size(-1);
  const int64_t rows = d == 0 ? 0 : gate.numel() / d;
  if (rows > 0) {
    RAYLM_DISPATCH(gate.scalar_type(), "silu_mul_cuda", [&] {
      launch_silu_mul(dst.mutable_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                      uc.const_data_ptr<scalar_t>(), rows, d, d, d, d);
    });
  }
  if (!out.is_same(dst)) out.copy_(dst);
}

at::Tensor clamped_relu_cuda(const at::Tensor& x, double lo, double hi) {
  check_cuda(x, "x");
  TORCH_CHECK(lo >= 0.0 && hi >= lo, "clamped_relu needs 0 <= lo <= hi, got lo=", lo, " hi=", hi);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n > 0) {
    const int threads = 256;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + threads - 1) / threads, 65535));
    RAYLM_DISPATCH(x.scalar_type(), "clamped_relu_cuda", [&] {
      clamped_relu_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          out.mutable_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), n,
          static_cast<float>(lo), static_cast<float>(hi));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(raylm, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cuda);
  m.impl("silu_and_mul", &silu_and_mul_cuda);
  m.impl("silu_mul", &silu_mul_cuda);
  m.impl("clamped_relu", &clamped_relu_cuda);
}

}  // namespace raylm
