// Schemas of the raylm compiled ops and their CPU kernels.
//
// Every op is declared once here; CPU kernels are registered below and CUDA kernels in
// ops_cuda.cu. Vectorisation comes from the compiler (`#pragma omp simd` over plain float
// loops, built with -O3 -march=native by ops/native_build.py), threading from
// at::parallel_for so that torch.set_num_threads governs it.
#include <ATen/ATen.h>
#include "dispatch.h"
#include "bf16_dot.h"
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace raylm {
namespace {

// Rows smaller than this many elements are not worth a thread hand-off.
constexpr int64_t kGrainElements = 16384;
// Column block of silu_mul, so that a single decode row still spreads over threads.
constexpr int64_t kSiluBlock = 4096;

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

// exp(x) for x <= 0, written so that the compiler vectorises it (std::exp would be a scalar
// libm call without -ffast-math). Cephes range reduction and polynomial: ~1 ulp on [-87, 0],
// which keeps silu within 1e-6 relative of torch's Sleef exp. Below -87 it returns exp(-87),
// whose effect on silu is under 1e-36.
inline float exp_vec(float x) {
  x = x < -87.0f ? -87.0f : x;
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

// Kernels work on storage types: float, c10::Half, and bf16 as raw uint16_t bits, so that
// the bf16 <-> float conversions below are plain integer code the compiler vectorises
// (c10::BFloat16's own conversion has a NaN branch that blocks it).
template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<c10::BFloat16> {
  using type = uint16_t;
};
template <typename T>
using storage_t = typename Storage<T>::type;

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
inline float load(const uint16_t* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  return f != f ? static_cast<uint16_t>(0x7fc0) : static_cast<uint16_t>(rounded);
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(c10::Half* p, int64_t i, float v) { p[i] = static_cast<c10::Half>(v); }
inline void store(uint16_t* p, int64_t i, float v) { p[i] = bf16_bits(v); }

// v rounded to the storage precision and widened back: where HF materialises a T tensor.
inline float round_to(const float*, float v) { return v; }
inline float round_to(const c10::Half*, float v) { return static_cast<float>(static_cast<c10::Half>(v)); }
inline float round_to(const uint16_t*, float v) {
  const uint32_t bits = static_cast<uint32_t>(bf16_bits(v)) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// One row of HF LlamaRMSNorm: fp32 statistics, normalised value rounded to T, then
// multiplied by the weight in T (exactly `weight * x.to(input_dtype)`).
template <typename S>
void rms_norm_row(S* __restrict__ out, const S* __restrict__ x, const S* __restrict__ w,
                  int64_t h, float eps) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < h; ++i) {
    const float v = load(x, i);
    acc += v * v;
  }
  const float inv = 1.f / std::sqrt(acc / static_cast<float>(h) + eps);
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) {
    store(out, i, load(w, i) * round_to(x, load(x, i) * inv));
  }
}

// residual <- x + residual, rounded to T before the statistics as HF's `residual + x` is.
template <typename S>
void add_row(S* __restrict__ residual, const S* __restrict__ x, int64_t h) {
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) store(residual, i, load(x, i) + load(residual, i));
}

template <typename S>
void rms_norm_rows(S* out, const S* x, const S* w, int64_t rows, int64_t h, float eps) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(h, 1)),
                   [=](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) rms_norm_row(out + r * h, x + r * h, w, h, eps);
                   });
}

template <typename S>
void fused_add_rms_norm_rows(S* x, S* residual, const S* w, int64_t rows, int64_t h, float eps) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(h, 1)),
                   [=](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       add_row(residual + r * h, x + r * h, h);
                       rms_norm_row(x + r * h, residual + r * h, w, h, eps);
                     }
                   });
}

// out[c] = silu(gate[c]) * up[c] for c in [0, n), silu rounded to T first as HF's
// `act_fn(gate) * up` does.
template <typename S>
void silu_mul_span(S* __restrict__ out, const S* __restrict__ gate, const S* __restrict__ up,
                   int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const float g = load(gate, c);
    // sigmoid from exp(-|g|), which never overflows: no clamp branch for the compiler to split
    // into a second division, and one divide per element.
    const float e = exp_vec(-std::fabs(g));
    const float sig = (g >= 0.f ? 1.f : e) / (1.f + e);
    store(out, c, round_to(gate, g * sig) * load(up, c));
  }
}

// Row strides let silu_and_mul read both halves of one tensor; column blocks let a single
// decode row spread over threads.
template <typename S>
void silu_mul_rows(S* out, const S* gate, const S* up, int64_t rows, int64_t d,
                   int64_t out_stride, int64_t gate_stride, int64_t up_stride) {
  const int64_t blocks = (d + kSiluBlock - 1) / kSiluBlock;
  at::parallel_for(0, rows * blocks, std::max<int64_t>(1, kGrainElements / std::min(d, kSiluBlock)),
                   [=](int64_t begin, int64_t end) {
                     for (int64_t item = begin; item < end; ++item) {
                       const int64_t r = item / blocks;
                       const int64_t c0 = (item % blocks) * kSiluBlock;
                       silu_mul_span(out + r * out_stride + c0, gate + r * gate_stride + c0,
                                     up + r * up_stride + c0, std::min(d, c0 + kSiluBlock) - c0);
                     }
                   });
}

template <typename S>
void clamp_span(S* __restrict__ out, const S* __restrict__ x, int64_t n, float lo, float hi) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    // Comparisons (not std::min/max) so that NaN propagates as in torch.clamp.
    float v = load(x, i);
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    store(out, i, v);
  }
}

template <typename S>
void clamped_relu_kernel(S* out, const S* x, int64_t n, float lo, float hi) {
  at::parallel_for(0, n, kGrainElements * 4, [=](int64_t begin, int64_t end) {
    clamp_span(out + begin, x + begin, end - begin, lo, hi);
  });
}

template <typename T>
storage_t<T>* ptr(at::Tensor& t) {
  return reinterpret_cast<storage_t<T>*>(t.mutable_data_ptr<T>());
}
template <typename T>
const storage_t<T>* cptr(const at::Tensor& t) {
  return reinterpret_cast<const storage_t<T>*>(t.const_data_ptr<T>());
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
  RAYLM_DISPATCH(x.scalar_type(), "rms_norm_cpu", [&] {
    rms_norm_rows(ptr<scalar_t>(dst), cptr<scalar_t>(xc), cptr<scalar_t>(wc), rows, h, epsf);
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
  RAYLM_DISPATCH(
      x.scalar_type(), "fused_add_rms_norm_cpu", [&] {
        fused_add_rms_norm_rows(ptr<scalar_t>(xc), ptr<scalar_t>(rc), cptr<scalar_t>(wc), rows, h, epsf);
      });
  if (!x.is_same(xc)) x.copy_(xc);
  if (!residual.is_same(rc)) residual.copy_(rc);
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
    RAYLM_DISPATCH(x.scalar_type(), "silu_and_mul_cpu", [&] {
      const auto* xp = cptr<scalar_t>(xc);
      silu_mul_rows(ptr<scalar_t>(dst), xp, xp + d, rows, d, d, 2 * d, 2 * d);
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
    RAYLM_DISPATCH(gate.scalar_type(), "silu_mul_cpu", [&] {
      silu_mul_rows(ptr<scalar_t>(dst), cptr<scalar_t>(gc), cptr<scalar_t>(uc), rows, d, d, d, d);
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
  RAYLM_DISPATCH(x.scalar_type(), "clamped_relu_cpu", [&] {
    clamped_relu_kernel(ptr<scalar_t>(out), cptr<scalar_t>(xc), n, static_cast<float>(lo),
                        static_cast<float>(hi));
  });
  return out;
}

// Rows of a decode batch grouped by adapter slot (slot 0, no adapter, left out): rows of group g are
// rows[start[g]..start[g + 1]).
struct SlotGroups {
  std::vector<int64_t> slots, rows, start;
  SlotGroups(const int64_t* sp, int64_t n) {
    for (int64_t b = 0; b < n; ++b) {
      if (sp[b] != 0 && std::find(slots.begin(), slots.end(), sp[b]) == slots.end()) slots.push_back(sp[b]);
    }
    for (const int64_t s : slots) {
      start.push_back(static_cast<int64_t>(rows.size()));
      for (int64_t b = 0; b < n; ++b) {
        if (sp[b] == s) rows.push_back(b);
      }
    }
    start.push_back(static_cast<int64_t>(rows.size()));
  }
};

// The update of output columns [begin, end) for every row with an adapter; W is the slots' storage
// type (float, or bf16 as raw bits); sums in float32.
template <typename W>
void bgmv_columns(int64_t begin, int64_t end, float* op, const float* xp, const W* ap,
                  const std::vector<const W*>& b_ptrs, const std::vector<int64_t>& offsets, const float* scp,
                  const SlotGroups& groups, int64_t k, int64_t j_total, int64_t rank, int64_t width) {
  std::vector<float> h(groups.rows.size() * rank);  // shrunk x of each active row, in group order
  for (size_t p = 0; p + 1 < offsets.size(); ++p) {
    const int64_t lo = std::max(begin, offsets[p]) - offsets[p], hi = std::min(end, offsets[p + 1]) - offsets[p];
    if (lo >= hi) continue;
    const int64_t n = offsets[p + 1] - offsets[p];
    for (size_t g = 0; g < groups.slots.size(); ++g) {
      const int64_t s = groups.slots[g], first = groups.start[g], last = groups.start[g + 1];
      for (int64_t r = 0; r < rank; ++r) {
        const W* __restrict__ arow = ap + (s * j_total + static_cast<int64_t>(p) * rank + r) * k;
        for (int64_t m = first; m < last; ++m) {
          const float* __restrict__ xr = xp + groups.rows[m] * k;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < k; ++i) acc += load(arow, i) * xr[i];
          h[m * rank + r] = acc * scp[s];
        }
      }
      const W* __restrict__ bt = b_ptrs[p] + s * rank * n;  // (R, N_p) of slot s
      for (int64_t r = 0; r < rank; ++r) {
        const W* __restrict__ brow = bt + r * n;
        for (int64_t m = first; m < last; ++m) {
          const float hr = h[m * rank + r];
          float* __restrict__ dst = op + groups.rows[m] * width + offsets[p];
#pragma omp simd
          for (int64_t c = lo; c < hi; ++c) dst[c] += hr * load(brow, c);
        }
      }
    }
  }
}

template <typename W>
void lora_bgmv_run(at::Tensor& out, const at::Tensor& xc, const at::Tensor& ac, const std::vector<at::Tensor>& b_t,
                   const std::vector<int64_t>& offsets, const int64_t* sp, const float* scp, int64_t rank) {
  using S = storage_t<W>;
  const int64_t rows = xc.size(0), k = xc.size(1), j_total = ac.size(1), width = out.size(1);
  std::vector<const S*> b_ptrs;
  for (const at::Tensor& bc : b_t) b_ptrs.push_back(cptr<W>(bc));
  const SlotGroups groups(sp, rows);
  const int64_t active = static_cast<int64_t>(groups.rows.size());
  if (active == 0) return;
  float* op = out.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  const S* ap = cptr<W>(ac);
  // One parallel region over the output columns (at::parallel_for gives each thread one contiguous
  // range). A range shrinks x only by the A rows of the projections its columns belong to, so threads
  // split the A reads as well as the B reads, and a projection cut by the range boundary is shrunk
  // twice at most; a region for the shrink and one per projection would cost more thread hand-offs
  // than a decode step's update takes.
  at::parallel_for(0, width, std::max<int64_t>(1, kGrainElements / (rank * active)), [&](int64_t begin, int64_t end) {
    bgmv_columns<S>(begin, end, op, xp, ap, b_ptrs, offsets, scp, groups, k, j_total, rank, width);
  });
}

// LoRA of many adapters in one decode batch (Punica's BGMV, for the CPU): for each row b with
// slot s = slots[b] > 0,
//   xa[b, j] = scale[s] * sum_k A[s, j, k] * x[b, k]              (shrink: all P projections' A)
//   out[b, off_p + n] += sum_r Bs[p][s, n, r] * xa[b, p * R + r]   (expand: projection p's B,
//                                                                    stored (S, R, N_p) and read as such)
// added to out (rows of slot 0 are left as they are), so the base projection's output takes its
// update in place. Each adapter's weights are read in place, once for all of its rows: no gathered
// copy per row and no (rows x P*R x K) product temporary, which is what the same update costs as
// torch ops in eager mode. Activations and sums in float32; A and B in float32 or bfloat16.
void lora_bgmv_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& a, at::TensorList bs,
                   const at::Tensor& slots, const at::Tensor& scale, int64_t rank) {
  check_cpu(out, "out");
  check_cpu(x, "x");
  check_cpu(a, "A");
  check_cpu(slots, "slots");
  check_cpu(scale, "scale");
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat &&
                  slots.scalar_type() == at::kLong,
              "lora_bgmv: float32 x, out and scale, int64 slots");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16,
              "lora_bgmv: A and B are float32 or bfloat16");
  TORCH_CHECK(x.dim() == 2 && a.dim() == 3 && out.dim() == 2 && out.is_contiguous(), "lora_bgmv: bad shapes");
  const int64_t rows = x.size(0), k = x.size(1), j_total = a.size(1), num_slots = a.size(0);
  TORCH_CHECK(a.size(2) == k && slots.numel() == rows && out.size(0) == rows && scale.numel() == num_slots &&
                  j_total == rank * static_cast<int64_t>(bs.size()),
              "lora_bgmv: A is (S, P*R, K) for x (B, K), one B per projection");
  TORCH_CHECK(rank <= 256, "lora_bgmv: rank up to 256");
  const at::Tensor xc = x.contiguous(), ac = a.contiguous(), sc = slots.contiguous(), scl = scale.contiguous();
  const int64_t* sp = sc.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b) TORCH_CHECK(sp[b] >= 0 && sp[b] < num_slots, "lora_bgmv: slot out of range");
  std::vector<at::Tensor> b_t;
  std::vector<int64_t> offsets{0};  // projection p owns out columns offsets[p]..offsets[p + 1] - 1
  for (const at::Tensor& bt : bs) {
    TORCH_CHECK(bt.scalar_type() == a.scalar_type() && bt.dim() == 3 && bt.size(0) == num_slots && bt.size(2) == rank,
                "lora_bgmv: each B is (S, N_p, R) in A's dtype");
    // (S, N_p, R) seen as the transpose of an (S, R, N_p) block per slot (how MultiLora stores B), so
    // that the expand is contiguous vector FMAs over the outputs; anything else is laid out so here.
    b_t.push_back(bt.transpose(1, 2).contiguous());
    offsets.push_back(offsets.back() + bt.size(1));
  }
  TORCH_CHECK(offsets.back() == out.size(1), "lora_bgmv: out's width is not the sum of the projections' outputs");
  if (a.scalar_type() == at::kBFloat16) {
    lora_bgmv_run<c10::BFloat16>(out, xc, ac, b_t, offsets, sp, scl.data_ptr<float>(), rank);
  } else {
    lora_bgmv_run<float>(out, xc, ac, b_t, offsets, sp, scl.data_ptr<float>(), rank);
  }
}

// Llama's rotate-half RoPE of one head: dst = x * cos + rotate_half(x) * sin, where
// rotate_half(x) = cat(-x[half:], x[:half]).
inline void rope_head(float* __restrict__ dst, const float* __restrict__ x, const float* __restrict__ c,
                      const float* __restrict__ s, int64_t hs) {
  const int64_t half = hs / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) dst[i] = x[i] * c[i] - x[i + half] * s[i];
#pragma omp simd
  for (int64_t i = half; i < hs; ++i) dst[i] = x[i] * c[i] + x[i - half] * s[i];
}

// The attention of one decode step, for rows 0..B-1 of a static KV cache, each row at its own
// position p_b: rotates the step's q and k heads (RoPE with the rows' cos/sin), writes k and v
// into the cache at p_b, and attends every query head over cache positions 0..p_b of its row
// (grouped-query: query head h reads kv head h / (n_head / n_kv)). It replaces ~20 small ops per
// layer in eager decode (views, RoPE, two cache writes, SDPA and its reshapes), whose dispatch
// cost more than their arithmetic at one token per row; no mask is built, since each row stops at
// its own position.
//   qkv (B, (n_head + 2 n_kv) hs): q, k, v projections of the step; cos, sin (B, hs);
//   k_cache, v_cache (B_max, n_kv, T_max, hs); positions (B,); out (B, n_head hs).
void decode_attention_cpu(at::Tensor& out, const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                          at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& positions, int64_t n_head,
                          double scale) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&out, &qkv, &cos, &sin, &k_cache, &v_cache,
                                                                      &positions}) {
    check_cpu(*t, "decode_attention: every tensor");
  }
  TORCH_CHECK(out.scalar_type() == at::kFloat && qkv.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat && positions.scalar_type() == at::kLong,
              "decode_attention: float32 tensors and int64 positions");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "decode_attention: contiguous k_cache and v_cache of one shape (B_max, n_kv, T_max, hs)");
  const int64_t rows = qkv.size(0), n_kv = k_cache.size(1), t_max = k_cache.size(2), hs = k_cache.size(3);
  TORCH_CHECK(n_head > 0 && n_head % n_kv == 0 && hs % 2 == 0 && hs <= 512,
              "decode_attention: n_head a multiple of n_kv, an even head size up to 512");
  const int64_t width = (n_head + 2 * n_kv) * hs;
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == width && rows <= k_cache.size(0) && positions.numel() == rows &&
                  cos.dim() == 2 && cos.size(0) == rows && cos.size(1) == hs && sin.sizes() == cos.sizes() &&
                  out.dim() == 2 && out.size(0) == rows && out.size(1) == n_head * hs && out.is_contiguous(),
              "decode_attention: qkv (B, (n_head + 2 n_kv) hs), cos and sin (B, hs), out (B, n_head hs)");
  const at::Tensor qc = qkv.contiguous(), cc = cos.contiguous(), sc = sin.contiguous(), pc = positions.contiguous();
  const float* qp = qc.data_ptr<float>();
  const float* cp = cc.data_ptr<float>();
  const float* snp = sc.data_ptr<float>();
  const int64_t* pp = pc.data_ptr<int64_t>();
  float* kp = k_cache.data_ptr<float>();
  float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < rows; ++b) {
    TORCH_CHECK(pp[b] >= 0 && pp[b] < t_max, "decode_attention: position ", pp[b], " outside the cache (", t_max, ")");
    for (int64_t h = 0; h < n_kv; ++h) {  // B * n_kv heads of hs values: not worth threads
      const int64_t at_pos = ((b * n_kv + h) * t_max + pp[b]) * hs;
      rope_head(kp + at_pos, qp + b * width + (n_head + h) * hs, cp + b * hs, snp + b * hs, hs);
      std::memcpy(vp + at_pos, qp + b * width + (n_head + n_kv + h) * hs, hs * sizeof(float));
    }
  }
  const int64_t rep = n_head / n_kv;
  const float scl = static_cast<float>(scale);
  at::parallel_for(0, rows * n_head, 1, [=](int64_t begin, int64_t end) {
    std::vector<float> p(t_max);
    float q[512], acc[512];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_head, h = item % n_head, n = pp[b] + 1;
      rope_head(q, qp + b * width + h * hs, cp + b * hs, snp + b * hs, hs);
      const float* __restrict__ keys = kp + (b * n_kv + h / rep) * t_max * hs;
      const float* __restrict__ values = vp + (b * n_kv + h / rep) * t_max * hs;
      float m = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < hs; ++d) dot += q[d] * keys[t * hs + d];
        p[t] = dot * scl;
        m = std::max(m, p[t]);
      }
      float sum = 0.f;
      float* __restrict__ pr = p.data();
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < n; ++t) {
        pr[t] = exp_vec(pr[t] - m);
        sum += pr[t];
      }
      std::fill(acc, acc + hs, 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const float w = pr[t];
#pragma omp simd
        for (int64_t d = 0; d < hs; ++d) acc[d] += w * values[t * hs + d];
      }
      const float inv = 1.f / sum;
      float* __restrict__ dst = op + b * n_head * hs + h * hs;
#pragma omp simd
      for (int64_t d = 0; d < hs; ++d) dst[d] = acc[d] * inv;
    }
  });
}

// Int4WeightOnlyLinear's CPU forward for a decode step in one call: x rounded to the kernel's
// compute dtype, ATen's int4 matmul, the result back in x's dtype. The same three ATen ops as the
// module's forward, dispatched from here: from Python they cost more than the matmul of one row.
at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t group_size,
                           const at::Tensor& scales_and_zeros) {
  check_cpu(x, "x");
  const at::Tensor xc = x.to(scales_and_zeros.scalar_type());
  return at::_weight_int4pack_mm_for_cpu(xc, packed, group_size, scales_and_zeros).to(x.scalar_type());
}

// The decoder layers of one eager decode step, run from one call: per layer the qkv matmul,
// `decode_attention`, the o matmul, a fused add + norm, the fused gate/up matmul, `silu_and_mul`,
// the down matmul and a fused add + norm, each projection followed by its `lora_bgmv` update when
// adapter slots are set. The same kernels `LlamaRunner._decode_native` calls one by one from
// Python; there, the ~12 dispatches per layer and the interpreter between them cost more than
// the arithmetic of a one-token row. Built once per runner (`add_layer` per layer, `set_lora` per
// adapted group); the tensors are held by reference, so cache writes and adapter loads show through.
class DecodeLayers : public torch::CustomClassHolder {
 public:
  explicit DecodeLayers(int64_t n_head) : n_head_(n_head) {}

  // kinds[j] of projection j (qkv, o, gate_up, down): 0 a float matmul (tensors[2j] the weight,
  // tensors[2j + 1] the bias or an empty tensor), 1 an int4 CPU layer on torch's kernel (the packed
  // weight and scales_and_zeros, group_sizes[j]), 2 int4 on `int4_bf16_linear` (packed, scale_min).
  void add_layer(at::Tensor k_cache, at::Tensor v_cache, std::vector<int64_t> kinds, std::vector<at::Tensor> tensors,
                 std::vector<int64_t> group_sizes, at::Tensor post_norm, double post_eps, at::Tensor next_norm,
                 double next_eps, double scale) {
    TORCH_CHECK(kinds.size() == 4 && tensors.size() == 8 && group_sizes.size() == 4,
                "DecodeLayers.add_layer: four projections (qkv, o, gate_up, down), two tensors each");
    Layer layer{std::move(k_cache), std::move(v_cache), {}, {}, std::move(post_norm), post_eps,
                std::move(next_norm), next_eps, scale};
    for (size_t j = 0; j < 4; ++j) {
      TORCH_CHECK(kinds[j] >= 0 && kinds[j] <= 2, "DecodeLayers.add_layer: kind 0 (float), 1 (int4) or 2 (int4 bf16)");
      layer.proj[j] = Proj{kinds[j], tensors[2 * j], tensors[2 * j + 1], group_sizes[j]};
    }
    layers_.push_back(std::move(layer));
  }

  // Adapter slots of projection group j (0 qkv, 1 o, 2 gate_up, 3 down) of layer i: lora_bgmv's A and Bs.
  void set_lora(int64_t i, int64_t j, at::Tensor a, std::vector<at::Tensor> bs) {
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(layers_.size()) && j >= 0 && j < 4, "DecodeLayers.set_lora: bad index");
    layers_[i].lora[j] = Lora{std::move(a), std::move(bs)};
  }

  // x (B, C) the residual stream, updated in place; h (B, C) the first layer's normed input. With
  // `slots` (B,) (0: no adapter) the adapted groups take their updates (scale (S,), rank R).
  // Returns the last layer's output after the final norm (its `next_norm`).
  at::Tensor run(at::Tensor x, at::Tensor h, at::Tensor cos, at::Tensor sin, at::Tensor positions,
                 std::optional<at::Tensor> slots, std::optional<at::Tensor> scale, int64_t rank) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() && h.sizes() == x.sizes(),
                "DecodeLayers.run: float32 contiguous x and h of one shape (B, C)");
    TORCH_CHECK(!slots.has_value() || scale.has_value(), "DecodeLayers.run: slots need their scales");
    const int64_t rows = x.size(0);
    for (Layer& layer : layers_) {
      at::Tensor qkv = project(layer, 0, h, slots, scale, rank);
      at::Tensor y = at::empty({rows, n_head_ * layer.k_cache.size(3)}, x.options());
      decode_attention_cpu(y, qkv, cos, sin, layer.k_cache, layer.v_cache, positions, n_head_, layer.scale);
      h = project(layer, 1, y, slots, scale, rank);
      fused_add_rms_norm_cpu(h, x, layer.post_norm, layer.post_eps);
      at::Tensor gu = project(layer, 2, h, slots, scale, rank);
      at::Tensor a = at::empty({rows, gu.size(1) / 2}, x.options());
      silu_and_mul_cpu(a, gu);
      h = project(layer, 3, a, slots, scale, rank);
      fused_add_rms_norm_cpu(h, x, layer.next_norm, layer.next_eps);
    }
    return h;
  }

 private:
  struct Proj {
    int64_t kind;
    at::Tensor weight, aux;
    int64_t group_size;
  };
  struct Lora {
    at::Tensor a;
    std::vector<at::Tensor> bs;
  };
  struct Layer {
    at::Tensor k_cache, v_cache;
    Proj proj[4];
    Lora lora[4];
    at::Tensor post_norm;
    double post_eps;
    at::Tensor next_norm;
    double next_eps, scale;
  };

  static at::Tensor project(Layer& layer, int j, const at::Tensor& in, const std::optional<at::Tensor>& slots,
                            const std::optional<at::Tensor>& scale, int64_t rank) {
    const Proj& p = layer.proj[j];
    at::Tensor out = p.kind == 2   ? int4_bf16_linear_cpu(in, p.weight, p.aux)
                     : p.kind == 1 ? int4_linear_cpu(in, p.weight, p.group_size, p.aux)
                                   : at::linear(in, p.weight, p.aux.defined() && p.aux.numel() ? p.aux : at::Tensor());
    const Lora& lora = layer.lora[j];
    if (slots.has_value() && lora.a.defined()) lora_bgmv_cpu(out, in, lora.a, lora.bs, *slots, *scale, rank);
    return out;
  }

  int64_t n_head_;
  std::vector<Layer> layers_;
};

}  // namespace

TORCH_LIBRARY(raylm, m) {
  m.def("rms_norm(Tensor! out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor! x, Tensor! residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor! out, Tensor x) -> ()");
  m.def("silu_mul(Tensor! out, Tensor gate, Tensor up) -> ()");
  m.def("clamped_relu(Tensor x, float lo, float hi) -> Tensor");
  m.def("lora_bgmv(Tensor! out, Tensor x, Tensor A, Tensor[] Bs, Tensor slots, Tensor scale, int rank) -> ()");
  m.def("decode_attention(Tensor! out, Tensor qkv, Tensor cos, Tensor sin, Tensor! k_cache, Tensor! v_cache, "
        "Tensor positions, int n_head, float scale) -> ()");
  m.def("int4_linear(Tensor x, Tensor packed, int group_size, Tensor scales_and_zeros) -> Tensor");
  m.def("int4_bf16_linear(Tensor x, Tensor packed, Tensor scale_min) -> Tensor");
  m.def("int8_bf16_linear(Tensor x, Tensor packed, Tensor scales) -> Tensor");
  m.def("bf16_dot_supported() -> bool", &bf16_dot_supported);
  m.class_<DecodeLayers>("DecodeLayers")
      .def(torch::init<int64_t>())
      .def("add_layer", &DecodeLayers::add_layer)
      .def("set_lora", &DecodeLayers::set_lora)
      .def("run", &DecodeLayers::run);
}

TORCH_LIBRARY_IMPL(raylm, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cpu);
  m.impl("silu_and_mul", &silu_and_mul_cpu);
  m.impl("silu_mul", &silu_mul_cpu);
  m.impl("clamped_relu", &clamped_relu_cpu);
  m.impl("lora_bgmv", &lora_bgmv_cpu);
  m.impl("decode_attention", &decode_attention_cpu);
  m.impl("int4_linear", &int4_linear_cpu);
  m.impl("int4_bf16_linear", &int4_bf16_linear_cpu);
  m.impl("int8_bf16_linear", &int8_bf16_linear_cpu);
}

}  // namespace raylm
