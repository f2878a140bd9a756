// Dtype dispatch shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/Dispatch.h>

// float, bfloat16 and half only: the kernels compute in fp32, which would silently drop
// precision for float64 inputs, so those fail with ATen's "not implemented for 'Double'".
#define RAYLM_DISPATCH(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                             \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
