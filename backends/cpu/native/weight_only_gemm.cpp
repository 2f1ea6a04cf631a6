// Weight-only GEMM for the cpu backend: y[M, N] = x[M, K] @ W^T, W = (q - zero) * scale per group,
// with the integer codes q kept packed (int8: one byte per code; bits <= 4: two codes per byte).
//
// Packed layout (made at prepare time by backends/cpu/native_weight_only.py): output rows in blocks
// of BLOCK_N = 16, and within a block the 16 codes of one input k side by side, so one 16-byte load
// serves 16 outputs:
//   int8   codes   uint8 [N / 16, K, 16]            codes[b, k, r] = q[16 b + r, k]
//   int4   codes   uint8 [N / 16, ceil(K / 2), 16]  low nibble: q[16 b + r, 2 j], high: q[16 b + r, 2 j + 1]
//   scales, shifts float [N / 16, num_groups, 16]   W = q * scale + shift (shift = -zero * scale): one FMA
// Each 16-wide block of dequantized weights is reused for every row of x (up to MAX_ROWS at a time), so
// a decode batch reads the weight once per step, not once per sequence. Vectors are GCC vector
// extensions: -march picks AVX-512 (one zmm per block) or AVX2 (two ymm), a plain build stays scalar.
// Threads: torch's own pool (at::parallel_for) over blocks of output rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BLOCK_N = 16;
#if defined(__AVX512F__)
constexpr int MAX_ROWS = 8;  // 8 zmm accumulators + weights, scales, shifts: well within 32 registers
#else
constexpr int MAX_ROWS = 4;  // a 16-float vector is two ymm on AVX2: 8 accumulators of 16 registers
#endif

typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
typedef uint8_t vbyte __attribute__((vector_size(16)));

inline vfloat load_floats(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vbyte load_bytes(const uint8_t* p) {
  vbyte v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// 16 unsigned bytes -> 16 floats. Intrinsics where the ISA has them: GCC's own convertvector of
// uint8 -> int32 goes through scalar byte extracts (measured 5x slower than the nibble path).
inline vfloat to_floats(vbyte codes) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32((__m128i)codes));
#elif defined(__AVX2__)
  const __m256 low = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32((__m128i)codes));
  const __m256 high = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128((__m128i)codes, 8)));
  vfloat out;
  std::memcpy(&out, &low, sizeof(low));
  std::memcpy(reinterpret_cast<char*>(&out) + sizeof(low), &high, sizeof(high));
  return out;
#else
  return __builtin_convertvector(__builtin_convertvector(codes, vint), vfloat);
#endif
}

// ROWS rows of x (row stride ldx) times one block of 16 output features; y row stride ldy.
template <int BITS, int ROWS>
void block_rows(const float* x, int64_t ldx, const uint8_t* codes, const float* scales, const float* shifts,
                int64_t K, int64_t group_size, const float* bias, float* y, int64_t ldy, int64_t num_valid) {
  vfloat acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = vfloat{} ;
  const int64_t num_groups = (K + group_size - 1) / group_size;
  for (int64_t g = 0; g < num_groups; ++g) {
    const vfloat scale = load_floats(scales + g * BLOCK_N);
    const vfloat shift = load_floats(shifts + g * BLOCK_N);
    const int64_t k_begin = g * group_size;
    const int64_t k_end = std::min(k_begin + group_size, K);
    if constexpr (BITS == 8) {
      for (int64_t k = k_begin; k < k_end; ++k) {
        const vfloat w = to_floats(load_bytes(codes + k * BLOCK_N)) * scale + shift;
        for (int m = 0; m < ROWS; ++m) acc[m] += x[m * ldx + k] * w;
      }
    } else {
      // Groups start at even k (even group sizes, or one group per row), so pairs never straddle them.
      int64_t k = k_begin;
      for (; k + 1 < k_end; k += 2) {
        const vbyte packed = load_bytes(codes + (k / 2) * BLOCK_N);
        const vfloat w0 = to_floats(packed & 0x0F) * scale + shift;
        const vfloat w1 = to_floats(packed >> 4) * scale + shift;
        for (int m = 0; m < ROWS; ++m) acc[m] += x[m * ldx + k] * w0 + x[m * ldx + k + 1] * w1;
      }
      if (k < k_end) {  // an odd K: the last code's partner nibble is padding
        const vfloat w0 = to_floats(load_bytes(codes + (k / 2) * BLOCK_N) & 0x0F) * scale + shift;
        for (int m = 0; m < ROWS; ++m) acc[m] += x[m * ldx + k] * w0;
      }
    }
  }
  for (int m = 0; m < ROWS; ++m) {
    for (int64_t r = 0; r < num_valid; ++r) y[m * ldy + r] = acc[m][r] + (bias ? bias[r] : 0.0f);
  }
}

template <int BITS>
void block_all_rows(const float* x, int64_t M, int64_t K, const uint8_t* codes, const float* scales,
                    const float* shifts, int64_t group_size, const float* bias, float* y, int64_t N,
                    int64_t num_valid) {
  int64_t m = 0;
  for (; m + MAX_ROWS <= M; m += MAX_ROWS)
    block_rows<BITS, MAX_ROWS>(x + m * K, K, codes, scales, shifts, K, group_size, bias, y + m * N, N, num_valid);
  switch (M - m) {
#define TGSERVE_ROWS_CASE(R) \
  case R: block_rows<BITS, R>(x + m * K, K, codes, scales, shifts, K, group_size, bias, y + m * N, N, num_valid); break;
    TGSERVE_ROWS_CASE(1)
    TGSERVE_ROWS_CASE(2)
    TGSERVE_ROWS_CASE(3)
#if defined(__AVX512F__)
    TGSERVE_ROWS_CASE(4)
    TGSERVE_ROWS_CASE(5)
    TGSERVE_ROWS_CASE(6)
    TGSERVE_ROWS_CASE(7)
#endif
#undef TGSERVE_ROWS_CASE
    default: break;
  }
}

void check_packed(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& shifts, int64_t bits) {
  TORCH_CHECK(bits == 8 || (bits >= 1 && bits <= 4), "bits must be 8 or at most 4, got ", bits);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 3 &&
                  codes.size(2) == BLOCK_N, "codes must be contiguous uint8 [N / 16, K', 16]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && shifts.sizes() == scales.sizes() &&
                  shifts.is_contiguous() && scales.size(0) == codes.size(0), "scales / shifts: float [N / 16, G, 16]");
}

// y [M, N] (float) for x [M, K] (float), M small: the packed kernel, parallel over blocks of outputs.
at::Tensor packed_gemm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const at::Tensor& shifts, const c10::optional<at::Tensor>& bias, int64_t bits,
                       int64_t group_size, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t num_blocks = codes.size(0);
  const int64_t block_bytes = codes.size(1) * BLOCK_N;
  const int64_t num_groups = scales.size(1);
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* x_data = x.data_ptr<float>();
  const uint8_t* code_data = codes.data_ptr<uint8_t>();
  const float* scale_data = scales.data_ptr<float>();
  const float* shift_data = shifts.data_ptr<float>();
  const float* bias_data = bias ? bias->data_ptr<float>() : nullptr;
  float* y_data = y.data_ptr<float>();
  // Enough blocks per task that the pool's hand-off (a few microseconds) stays small against the work.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K));
  at::parallel_for(0, num_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b * BLOCK_N;
      const int64_t num_valid = std::min(BLOCK_N, N - n);
      const float* block_bias = bias_data ? bias_data + n : nullptr;
      const float* block_scales = scale_data + b * num_groups * BLOCK_N;
      const float* block_shifts = shift_data + b * num_groups * BLOCK_N;
      if (bits == 8)
        block_all_rows<8>(x_data, M, K, code_data + b * block_bytes, block_scales, block_shifts, group_size,
                          block_bias, y_data + n, N, num_valid);
      else
        block_all_rows<4>(x_data, M, K, code_data + b * block_bytes, block_scales, block_shifts, group_size,
                          block_bias, y_data + n, N, num_valid);
    }
  });
  return y;
}

// Dequantized rows [block_begin * 16, block_end * 16) of W as float [rows, K] (never the whole weight).
at::Tensor dequantize_blocks(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& shifts,
                             int64_t bits, int64_t group_size, int64_t K, int64_t block_begin, int64_t block_end) {
  const int64_t num_groups = scales.size(1);
  const int64_t block_bytes = codes.size(1) * BLOCK_N;
  auto w = at::empty({(block_end - block_begin) * BLOCK_N, K}, scales.options());
  float* w_data = w.data_ptr<float>();
  const uint8_t* code_data = codes.data_ptr<uint8_t>();
  const float* scale_data = scales.data_ptr<float>();
  const float* shift_data = shifts.data_ptr<float>();
  at::parallel_for(block_begin, block_end, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* block = code_data + b * block_bytes;
      float* out = w_data + (b - block_begin) * BLOCK_N * K;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = (k / group_size) * BLOCK_N + b * num_groups * BLOCK_N;
        for (int64_t r = 0; r < BLOCK_N; ++r) {
          const int code = bits == 8 ? block[k * BLOCK_N + r]
                                     : (block[(k / 2) * BLOCK_N + r] >> ((k & 1) * 4)) & 0x0F;
          out[r * K + k] = code * scale_data[g + r] + shift_data[g + r];
        }
      }
    }
  });
  return w;
}

constexpr int64_t TILE_BLOCKS = 32;  // 512 output rows dequantized per GEMM call (a prefill)

// y = x @ W^T (+ bias) in x's dtype. x: [M, K] float / bf16 / fp16 (already permuted); W packed as above.
// M <= max_packed_rows: the packed kernel; larger M: tiles of W dequantized to x's dtype and a GEMM each.
at::Tensor weight_only_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                              const at::Tensor& shifts, const c10::optional<at::Tensor>& bias, int64_t bits,
                              int64_t group_size, int64_t N, int64_t max_packed_rows) {
  check_packed(codes, scales, shifts, bits);
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  const int64_t K = x.size(1);
  TORCH_CHECK(codes.size(1) == (bits == 8 ? K : (K + 1) / 2), "codes do not match K = ", K);
  TORCH_CHECK(N <= codes.size(0) * BLOCK_N && N > (codes.size(0) - 1) * BLOCK_N, "N does not match the codes");
  if (x.size(0) <= max_packed_rows) {
    c10::optional<at::Tensor> bias_float;
    if (bias) bias_float = bias->to(at::kFloat).contiguous();
    auto y = packed_gemm(x.to(at::kFloat).contiguous(), codes, scales, shifts, bias_float, bits, group_size, N);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  auto y = at::empty({x.size(0), N}, x.options());
  const auto xc = x.contiguous();
  for (int64_t b = 0; b < codes.size(0); b += TILE_BLOCKS) {
    const int64_t b_end = std::min(b + TILE_BLOCKS, codes.size(0));
    const int64_t n = b * BLOCK_N, n_end = std::min(b_end * BLOCK_N, N);
    auto w = dequantize_blocks(codes, scales, shifts, bits, group_size, K, b, b_end)
                 .narrow(0, 0, n_end - n).to(x.scalar_type());
    c10::optional<at::Tensor> tile_bias;
    if (bias) tile_bias = bias->narrow(0, n, n_end - n).to(x.scalar_type());
    y.narrow(1, n, n_end - n).copy_(at::linear(xc, w, tile_bias));
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(tgserve_cpu, m) {
  m.def("weight_only_linear(Tensor x, Tensor codes, Tensor scales, Tensor shifts, Tensor? bias, int bits, "
        "int group_size, int out_features, int max_packed_rows) -> Tensor");
  m.def("dequantize_blocks(Tensor codes, Tensor scales, Tensor shifts, int bits, int group_size, int in_features, "
        "int block_begin, int block_end) -> Tensor");
}

TORCH_LIBRARY_IMPL(tgserve_cpu, CPU, m) {
  m.impl("weight_only_linear", &weight_only_linear);
  m.impl("dequantize_blocks", &dequantize_blocks);
}
