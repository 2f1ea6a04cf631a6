// The decoder layer's elementwise work between its GEMMs for the cpu backend (backends/cpu/native_fused.py):
// RMSNorm with the residual add fused in, and the MLP's SiLU-and-multiply, each one pass over its rows
// instead of the ~6 and 3 torch ops (and their temporaries) of the reference (core/layers/fused_ops.py).
//
//   rms_norm(x [T, h], weight [h], eps)                 -> x / rms(x) * weight                 [T, h]
//   add_rms_norm(x [T, h], residual [T, h], weight, eps) -> (rms_norm(residual + x), residual + x)
//   silu_and_mul(gate_up [T, 2 I])                      -> silu(gate) * up                     [T, I]
//   rotary(x [T, H, d], cos [T, d], signed_sin [T, d])   -> x * cos + swap_halves(x) * signed_sin [T, H, d]
//
// Same roundings as the reference, so float32 agrees to summation order and bf16 / fp16 to one rounding:
// the residual sum is rounded to the model dtype before its statistics; the mean of squares is float32;
// x * rsqrt(mean + eps) is rounded to the model dtype, then multiplied by the weight and rounded again;
// silu(gate) is rounded before the product; rotary rounds each product, then their sum (float32: no FMA,
// so bit for bit the reference's, which is HF's `x * cos + rotate_half(x) * sin`). Rows go to torch's own pool (at::parallel_for); the inner
// loops are `omp simd` over the row, vectorized for -march (the host's, or haswell for the AVX2 build).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "exp_poly.h"

// float32, bf16 and fp16 (native_fused.py sends nothing else): the model dtypes the cpu backend runs.
#define DISPATCH_MODEL_DTYPES(TYPE, NAME, ...)                                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                      \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)               \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace {

// Elements per parallel_for chunk: below this a row set runs on the calling thread (a batch-1 row of
// 896 or 4864 elements takes well under a microsecond; waking the pool costs more).
constexpr int64_t GRAIN_ELEMENTS = 32768;

// bf16 is handled as its raw bits (uint16_t) so the conversions are integer shifts GCC vectorizes; the
// c10::BFloat16 type's own conversions kept the loops scalar (bf16 ran 1.7x slower than float32).
inline float to_float(float x) { return x; }
inline float to_float(uint16_t bf16_bits) { return __builtin_bit_cast(float, uint32_t(bf16_bits) << 16); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// Round to the model dtype: the value the reference holds after each of its ops.
template <typename T> inline T from_float(float x) { return static_cast<T>(x); }
template <> inline uint16_t from_float<uint16_t>(float x) {
  // to nearest even, as torch rounds; a NaN stays a (quiet) NaN instead of rounding into inf
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? ((bits >> 16) | 0x40u) : rounded);
}
template <typename T> inline float round_to(float x) { return to_float(from_float<T>(x)); }

// exp(x), clamped into [-87, 88] first (silu of a huge gate is the gate, of a hugely negative one 0).
inline float exp_clamped(float x) { return exp_in_range(x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x)); }

// The element type the loops run on: bf16 as its bits (above), float32 and fp16 as themselves.
template <typename scalar_t>
using storage_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, uint16_t, scalar_t>;

template <typename scalar_t> storage_t<scalar_t>* data_of(const at::Tensor& t) {
  return reinterpret_cast<storage_t<scalar_t>*>(t.data_ptr<scalar_t>());
}

int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, GRAIN_ELEMENTS / std::max<int64_t>(1, width)); }

void check_rows(const at::Tensor& x, const at::Tensor& weight, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, what, ": x must be [T, hidden] with contiguous rows");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(), what,
              ": weight must be contiguous [hidden]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), what, ": weight and x must share a dtype");
}

// One row: out = round(round(s * r) * w), r = 1 / sqrt(mean(s^2) + eps), s already in the model dtype.
template <typename T>
inline void normalize_row(const T* __restrict__ s, const T* __restrict__ w, T* __restrict__ out, int64_t h,
                          float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < h; ++i) {
    const float v = to_float(s[i]);
    sum += v * v;
  }
  const float r = 1.0f / std::sqrt(sum / static_cast<float>(h) + eps);
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) out[i] = from_float<T>(round_to<T>(to_float(s[i]) * r) * to_float(w[i]));
}

// One row of the residual add: sum = round(residual + x), then normalized into out.
template <typename T>
inline void add_normalize_row(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ w,
                              T* __restrict__ sum, T* __restrict__ out, int64_t h, float eps) {
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) sum[i] = from_float<T>(to_float(residual[i]) + to_float(x[i]));
  normalize_row<T>(sum, w, out, h, eps);
}

// One row of the MLP: out = round(round(silu(gate)) * up), silu(g) = g / (1 + exp(-g)).
template <typename T>
inline void silu_and_mul_row(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out,
                             int64_t width) {
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const float g = to_float(gate[i]);
    out[i] = from_float<T>(round_to<T>(g / (1.0f + exp_clamped(-g))) * to_float(up[i]));
  }
}

// One token's heads: out[h] = round(round(x[h] * cos) + round(swap_halves(x[h]) * signed_sin)). Contraction
// into an FMA is off here: it would skip the products' rounding and break bit equality with the reference.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename T>
inline void rotary_row(const T* __restrict__ x, int64_t head_stride, const T* __restrict__ cos,
                       const T* __restrict__ signed_sin, T* __restrict__ out, int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const T* __restrict__ xh = x + h * head_stride;
    T* __restrict__ oh = out + h * d;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i)
      oh[i] = from_float<T>(round_to<T>(to_float(xh[i]) * to_float(cos[i])) +
                            round_to<T>(to_float(xh[i + half]) * to_float(signed_sin[i])));
#pragma omp simd
    for (int64_t i = half; i < d; ++i)
      oh[i] = from_float<T>(round_to<T>(to_float(xh[i]) * to_float(cos[i])) +
                            round_to<T>(to_float(xh[i - half]) * to_float(signed_sin[i])));
  }
}
#pragma GCC pop_options

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "rms_norm");
  const int64_t rows = x.size(0), h = x.size(1);
  at::Tensor out = at::empty({rows, h}, x.options());
  DISPATCH_MODEL_DTYPES(x.scalar_type(), "rms_norm", [&] {
    const auto* x_data = data_of<scalar_t>(x);
    const auto* w_data = data_of<scalar_t>(weight);
    auto* out_data = data_of<scalar_t>(out);
    const int64_t x_stride = x.stride(0);
    at::parallel_for(0, rows, grain_rows(h), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        normalize_row(x_data + row * x_stride, w_data, out_data + row * h, h, static_cast<float>(eps));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, weight, "add_rms_norm");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.stride(1) == 1 && residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: residual must match x's shape and dtype, rows contiguous");
  const int64_t rows = x.size(0), h = x.size(1);
  at::Tensor out = at::empty({rows, h}, x.options());
  at::Tensor sum = at::empty({rows, h}, x.options());
  DISPATCH_MODEL_DTYPES(x.scalar_type(), "add_rms_norm", [&] {
    const auto* x_data = data_of<scalar_t>(x);
    const auto* r_data = data_of<scalar_t>(residual);
    const auto* w_data = data_of<scalar_t>(weight);
    auto* out_data = data_of<scalar_t>(out);
    auto* sum_data = data_of<scalar_t>(sum);
    const int64_t x_stride = x.stride(0), r_stride = residual.stride(0);
    at::parallel_for(0, rows, grain_rows(h), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        add_normalize_row(x_data + row * x_stride, r_data + row * r_stride, w_data, sum_data + row * h,
                                    out_data + row * h, h, static_cast<float>(eps));
    });
  });
  return {out, sum};
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "silu_and_mul: gate_up must be [T, 2 * I] with contiguous rows");
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, width}, gate_up.options());
  DISPATCH_MODEL_DTYPES(gate_up.scalar_type(), "silu_and_mul", [&] {
    const auto* in = data_of<scalar_t>(gate_up);
    auto* out_data = data_of<scalar_t>(out);
    const int64_t in_stride = gate_up.stride(0);
    at::parallel_for(0, rows, grain_rows(2 * width), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        silu_and_mul_row(in + row * in_stride, in + row * in_stride + width, out_data + row * width, width);
    });
  });
  return out;
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) && x.size(2) % 2 == 0,
              "rotary: x must be [T, heads, d] with each token's heads contiguous and d even");
  const int64_t rows = x.size(0), heads = x.size(1), d = x.size(2);
  for (const at::Tensor* table : {&cos, &signed_sin})
    TORCH_CHECK(table->dim() == 2 && table->size(0) == rows && table->size(1) == d && table->is_contiguous() &&
                    table->scalar_type() == x.scalar_type(), "rotary: cos and signed_sin must be contiguous [T, d] "
                "in x's dtype");
  at::Tensor out = at::empty({rows, heads, d}, x.options());
  DISPATCH_MODEL_DTYPES(x.scalar_type(), "rotary", [&] {
    const auto* x_data = data_of<scalar_t>(x);
    const auto* cos_data = data_of<scalar_t>(cos);
    const auto* sin_data = data_of<scalar_t>(signed_sin);
    auto* out_data = data_of<scalar_t>(out);
    const int64_t x_stride = x.stride(0);
    at::parallel_for(0, rows, grain_rows(heads * d), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        rotary_row(x_data + row * x_stride, d, cos_data + row * d, sin_data + row * d, out_data + row * heads * d,
                   heads, d);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(tgserve_cpu_fused, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor signed_sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(tgserve_cpu_fused, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary", &rotary);
}
