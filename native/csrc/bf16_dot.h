// Int4 / int8 weights x bfloat16 rows for the few rows of a decode step (see bf16_dot.cpp).
#pragma once

#include <ATen/ATen.h>

namespace raylm {

// Whether this build has the kernel (the CPU it was built for has AVX512-BF16).
bool bf16_dot_supported();

// (M, K) float32 rows times the int4 weights `packed` (N / 16, K / 32, 256) uint8 with their fp16
// scales and mins `scale_min` (N / 16, K / 32, 2, 16), as `ops.quantization.int4_dot_operands`
// lays them out: (M, N) float32. The rows are rounded to bfloat16, like torch's int4 CPU kernel.
at::Tensor int4_bf16_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_min);

// (M, K) float32 rows times per-channel int8 weights `packed` (N / 16, K / 2, 32) int8, as
// `ops.quantization.int8_dot_operands` lays them out, and their float32 `scales` (N,): (M, N) float32.
at::Tensor int8_bf16_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales);

}  // namespace raylm
