// Int4 weights x bfloat16 activations with AVX512-BF16 dot products, for the few rows of a decode step
// or a short prefill (below GEMM_MIN_ROWS; rows in blocks of 8), and int8 weights the same way for
// the tied head (int8_bf16_linear_cpu).
//
// torch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`) dequantizes each weight to float32 and
// multiplies it with one fused multiply-add per row: at 8 rows its cost per weight is the dequant
// plus 8 FMAs of 16 lanes, and it dequantizes the weights again for every block of 4 rows. Here a
// weight is expanded once per call into bfloat16 registers and every row takes it with
// `vdpbf16ps` (32 multiply-adds per instruction, twice an FMA's), so 8 rows cost less than
// torch's step. The asymmetric Q4_1 form w = d q + m needs no dequant in the inner loop:
//   sum_k w_k x_k = d sum_k q_k x_k + m sum_k x_k     per group of 32 inputs,
// and q is made a bfloat16 by setting its exponent bits (bf16(128 + q) = 0x4300 | q, exact), so the
// dot product gives sum (128 + q) x, and 128 d sum x is taken off with the m term. d and m stay
// fp16 (GGUF Q4_1 stores them so: the weights are exactly the file's).
//
// Layout (built by ops.quantization.int4_dot_operands): tile t of 16 output columns, group b of 32
// inputs: 256 bytes, 8 chunks of 32; byte (c, j, e) of a chunk holds q[k = 4c + e] of column j in its
// low nibble and q[k = 4c + 2 + e] in its high nibble. A chunk widened to 16-bit lanes is then the
// (column, input pair) operand of two `vdpbf16ps`: lane j = column j, inputs (4c, 4c + 1) from the
// low nibbles and (4c + 2, 4c + 3) from the high ones.
#include "bf16_dot.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define RAYLM_BF16_DOT 1
#endif

namespace raylm {

bool bf16_dot_supported() {
#ifdef RAYLM_BF16_DOT
  return true;
#else
  return false;
#endif
}

#ifdef RAYLM_BF16_DOT
namespace {

constexpr int64_t kTile = 16, kGroup = 32, kGroupBytes = 256;

// Rows m0..m0+MM-1 of x (as bf16 bits, xb (M, K)) against column tile t; sumx (M, K / 32) the group
// sums of the bf16 rows.
template <int MM>
void tile_rows(const uint16_t* xb, const float* sumx, const uint8_t* w, const uint16_t* sm, float* out, int64_t t,
               int64_t m0, int64_t k, int64_t n) {
  const int64_t groups = k / kGroup;
  const __m512i mask = _mm512_set1_epi16(0x000F), exponent = _mm512_set1_epi16(0x4300);
  const __m512 minus128 = _mm512_set1_ps(-128.f);
  __m512 total[MM];
  for (int r = 0; r < MM; ++r) total[r] = _mm512_setzero_ps();
  const uint8_t* wt = w + t * groups * kGroupBytes;
  const uint16_t* st = sm + t * groups * 2 * kTile;
  for (int64_t b = 0; b < groups; ++b) {
    __m512 acc[MM];
    for (int r = 0; r < MM; ++r) acc[r] = _mm512_setzero_ps();
    const uint8_t* wb = wt + b * kGroupBytes;
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 32)));
      const __m512i lo = _mm512_or_si512(_mm512_and_si512(words, mask), exponent);
      const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(words, 4), exponent);
      for (int r = 0; r < MM; ++r) {
        const uint16_t* xr = xb + (m0 + r) * k + b * kGroup + 4 * c;
        int32_t pair_lo, pair_hi;
        std::memcpy(&pair_lo, xr, 4);
        std::memcpy(&pair_hi, xr + 2, 4);
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)lo, (__m512bh)_mm512_set1_epi32(pair_lo));
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)hi, (__m512bh)_mm512_set1_epi32(pair_hi));
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(st + b * 2 * kTile)));
    const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(st + b * 2 * kTile + kTile)));
    const __m512 m_eff = _mm512_fmadd_ps(minus128, d, mn);  // m - 128 d: the 128 of every q taken off
    for (int r = 0; r < MM; ++r) {
      total[r] = _mm512_fmadd_ps(d, acc[r], total[r]);
      total[r] = _mm512_fmadd_ps(m_eff, _mm512_set1_ps(sumx[(m0 + r) * groups + b]), total[r]);
    }
  }
  for (int r = 0; r < MM; ++r) _mm512_storeu_ps(out + (m0 + r) * n + t * kTile, total[r]);
}

// Int8 weights, tile t of 16 columns: per input pair p, 32 bytes (column j, input 2p + e at 2j + e),
// widened to float32 and narrowed to bfloat16 (exact: |q| <= 127), then one `vdpbf16ps` per row.
template <int MM>
void int8_tile_rows(const uint16_t* xb, const int8_t* w, const float* scales, float* out, int64_t t, int64_t m0,
                    int64_t k, int64_t n) {
  const int64_t pairs = k / 2;
  __m512 acc[MM];
  for (int r = 0; r < MM; ++r) acc[r] = _mm512_setzero_ps();
  const int8_t* wt = w + t * pairs * 32;
  for (int64_t p = 0; p < pairs; ++p) {
    const __m128i* src = reinterpret_cast<const __m128i*>(wt + p * 32);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src + 1)));
    const __m512bh wb = _mm512_cvtne2ps_pbh(hi, lo);  // lo -> lanes 0..15, hi -> 16..31
    for (int r = 0; r < MM; ++r) {
      int32_t pair;
      std::memcpy(&pair, xb + (m0 + r) * k + 2 * p, 4);
      acc[r] = _mm512_dpbf16_ps(acc[r], wb, (__m512bh)_mm512_set1_epi32(pair));
    }
  }
  const __m512 s = _mm512_loadu_ps(scales + t * kTile);
  for (int r = 0; r < MM; ++r) _mm512_storeu_ps(out + (m0 + r) * n + t * kTile, _mm512_mul_ps(acc[r], s));
}

// Calls fn(std::integral_constant<int, MM>) with MM = min(rows, 8): the row count as a template
// argument, so that a kernel's accumulators are a fixed set of registers.
template <typename Fn>
void with_rows(int64_t rows, Fn&& fn) {
  switch (std::min<int64_t>(rows, 8)) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    case 6: return fn(std::integral_constant<int, 6>{});
    case 7: return fn(std::integral_constant<int, 7>{});
    default: return fn(std::integral_constant<int, 8>{});
  }
}

// kernel(mm, t, m0) for every column tile t and block of up to 8 rows from m0 (mm: the block's row
// count as a type): one parallel region over the tiles, each thread a contiguous range of them.
template <typename Kernel>
void over_tiles(int64_t rows, int64_t tiles, Kernel&& kernel) {
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < rows; m0 += 8) {
      with_rows(rows - m0, [&](auto mm) {
        for (int64_t t = begin; t < end; ++t) kernel(mm, t, m0);
      });
    }
  });
}

void check_rows(const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && scales.device().is_cpu(), op, ": CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, op, ": x is (M, K) float32");
}

// x (M, K) float32 rounded to bfloat16 bits (round to nearest even, as x.to(bfloat16)); with `sums`,
// also each row's sums over groups of 32 inputs of the rounded values. A few thousand values,
// converted here rather than by more ATen dispatches per call.
std::vector<uint16_t> rows_to_bf16(const at::Tensor& x, std::vector<float>* sums) {
  const at::Tensor xc = x.contiguous();
  const float* xf = xc.const_data_ptr<float>();
  const int64_t count = xc.numel();
  std::vector<uint16_t> bits16(count);
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, xf + i, 4);
    bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    bits16[i] = static_cast<uint16_t>(bits);
    if (sums != nullptr) {
      const uint32_t back = bits << 16;
      float v;
      std::memcpy(&v, &back, 4);
      (*sums)[i / 32] += v;
    }
  }
  return bits16;
}

}  // namespace
#endif

at::Tensor int4_bf16_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_min) {
#ifndef RAYLM_BF16_DOT
  TORCH_CHECK(false, "int4_bf16_linear: this build has no AVX512-BF16 kernel (check bf16_dot_supported())");
#else
  check_rows("int4_bf16_linear", x, packed, scale_min);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == kGroupBytes &&
                  packed.is_contiguous(),
              "int4_bf16_linear: packed is (N / 16, K / 32, 256) uint8");
  TORCH_CHECK(scale_min.scalar_type() == at::kHalf && scale_min.dim() == 4 && scale_min.size(0) == packed.size(0) &&
                  scale_min.size(1) == packed.size(1) && scale_min.size(2) == 2 && scale_min.size(3) == kTile &&
                  scale_min.is_contiguous(),
              "int4_bf16_linear: scale_min is (N / 16, K / 32, 2, 16) float16");
  const int64_t rows = x.size(0), k = x.size(1), tiles = packed.size(0), groups = packed.size(1), n = tiles * kTile;
  TORCH_CHECK(k == groups * kGroup, "int4_bf16_linear: x has ", k, " inputs, the weights ", groups * kGroup);
  at::Tensor out = at::empty({rows, n}, x.options());
  if (rows == 0) return out;
  std::vector<float> sums(rows * groups);
  const std::vector<uint16_t> xbits = rows_to_bf16(x, &sums);
  const uint16_t* xp = xbits.data();
  const float* sp = sums.data();
  const uint8_t* wp = packed.const_data_ptr<uint8_t>();
  const uint16_t* smp = reinterpret_cast<const uint16_t*>(scale_min.const_data_ptr<at::Half>());
  float* op = out.mutable_data_ptr<float>();
  over_tiles(rows, tiles, [&](auto mm, int64_t t, int64_t m0) {
    tile_rows<decltype(mm)::value>(xp, sp, wp, smp, op, t, m0, k, n);
  });
  return out;
#endif
}

at::Tensor int8_bf16_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
#ifndef RAYLM_BF16_DOT
  TORCH_CHECK(false, "int8_bf16_linear: this build has no AVX512-BF16 kernel (check bf16_dot_supported())");
#else
  check_rows("int8_bf16_linear", x, packed, scales);
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 3 && packed.size(2) == 32 && packed.is_contiguous(),
              "int8_bf16_linear: packed is (N / 16, K / 2, 32) int8");
  const int64_t rows = x.size(0), k = x.size(1), tiles = packed.size(0), n = tiles * kTile;
  TORCH_CHECK(k == 2 * packed.size(1), "int8_bf16_linear: x has ", k, " inputs, the weights ", 2 * packed.size(1));
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == n && scales.is_contiguous(),
              "int8_bf16_linear: scales is (N,) float32");
  at::Tensor out = at::empty({rows, n}, x.options());
  if (rows == 0) return out;
  const std::vector<uint16_t> xbits = rows_to_bf16(x, nullptr);
  const uint16_t* xp = xbits.data();
  const int8_t* wp = packed.const_data_ptr<int8_t>();
  const float* sp = scales.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  over_tiles(rows, tiles, [&](auto mm, int64_t t, int64_t m0) {
    int8_tile_rows<decltype(mm)::value>(xp, wp, sp, op, t, m0, k, n);
  });
  return out;
#endif
}

}  // namespace raylm
