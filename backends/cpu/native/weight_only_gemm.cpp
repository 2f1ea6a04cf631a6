// Weight-only GEMM for the cpu backend: y[M, N] = x[M, K] @ W^T, W = (q - zero) * scale per group,
// with the integer codes q kept packed (int8: one byte per code; bits <= 4: two codes per byte).
//
// Packed layout (made at prepare time by backends/cpu/native_weight_only.py): output rows in blocks
// of BLOCK_N = 16, and within a block the 16 codes of one input k side by side, so one 16-byte load
// serves 16 outputs:
//   int8   codes   uint8 [N / 16, K, 16]            codes[b, k, r] = q[16 b + r, k]
//   int4   codes   uint8 [N / 16, ceil(K / 2), 16]  low nibble: q[16 b + r, 2 j], high: q[16 b + r, 2 j + 1]
//   scales, shifts float [N / 16, num_groups, 16]   W = q * scale + shift (shift = -zero * scale)
// Each 16-wide block of dequantized weights is reused for every row of x (up to MAX_ROWS at a time), so
// a decode batch reads the weight once per step, not once per sequence. Vectors are GCC vector
// extensions: -march picks AVX-512 (one zmm per block) or AVX2 (two halves of one ymm), a plain build stays scalar.
// Threads: torch's own pool (at::parallel_for) over blocks of output rows.
// bf16 / fp16 rows on an AVX512-VNNI build: activations rounded to int8 and integer dot products
// (packed_gemm_int8 below); float32 always takes the exact float kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t BLOCK_N = 16;
// Outputs per vector: a block is one zmm on AVX-512; on AVX2 (and the plain build) two halves of 8 run one
// after the other (a 16-float vector on AVX2 would be a ymm pair, and spill).
#if defined(__AVX512F__)
constexpr int LANES = 16;
constexpr int MAX_ROWS = 8;  // 8 accumulators + 8 group partials + weights, scales, shifts: of 32 zmm
#else
constexpr int LANES = 8;
constexpr int MAX_ROWS = 4;  // of 16 ymm
#endif

typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef int32_t vint __attribute__((vector_size(LANES * 4)));
typedef uint8_t vbyte __attribute__((vector_size(LANES)));

inline vfloat load_floats(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// LANES codes (one byte each) at p -> floats; the low and high nibbles of LANES bytes -> two vectors.
// Intrinsics where the ISA has them: GCC's generic uint8 -> int32 convertvector goes through scalar
// byte extracts (measured 5x slower), and its nibble ops on an 8-byte vector through general registers.
#if defined(__AVX512F__)
inline vfloat widen(__m128i bytes) { return (vfloat)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)); }
inline __m128i load_lane_bytes(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
#elif defined(__AVX2__)
inline vfloat widen(__m128i bytes) { return (vfloat)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)); }
inline __m128i load_lane_bytes(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
#endif

inline vfloat load_codes(const uint8_t* p) {
#if defined(__AVX512F__) || defined(__AVX2__)
  return widen(load_lane_bytes(p));
#else
  vbyte v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(__builtin_convertvector(v, vint), vfloat);
#endif
}

inline void load_nibbles(const uint8_t* p, vfloat& low, vfloat& high) {
#if defined(__AVX512F__) || defined(__AVX2__)
  const __m128i bytes = load_lane_bytes(p);
  const __m128i mask = _mm_set1_epi8(0x0F);
  low = widen(_mm_and_si128(bytes, mask));
  high = widen(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask));
#else
  vbyte v;
  std::memcpy(&v, p, sizeof(v));
  low = __builtin_convertvector(__builtin_convertvector(v & 0x0F, vint), vfloat);
  high = __builtin_convertvector(__builtin_convertvector(v >> 4, vint), vfloat);
#endif
}

// ROWS rows of x (row stride ldx) times LANES output features of a block (codes, scales, shifts with
// the block's stride of 16); y row stride ldy.
// Per group: part = sum_k x[k] * q[k] over the codes as they are, then acc += part * scale + xsum * shift
// (sum_k x[k] * (q[k] * scale + shift) factored), so the inner loop is one convert and ROWS FMAs per k.
// A single row has little to overlap: its k's go round-robin into CHAINS independent accumulators,
// since one chain would wait out the FMA latency (4 cycles) on every k.
template <int BITS, int ROWS>
void block_rows(const float* x, int64_t ldx, const uint8_t* codes, const float* scales, const float* shifts,
                const float* xsums, int64_t num_groups, int64_t K, int64_t group_size, const float* bias, float* y,
                int64_t ldy, int64_t num_valid) {
  constexpr int CHAINS = ROWS == 1 ? 4 : (ROWS == 2 ? 2 : 1);
  vfloat acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = vfloat{};
  for (int64_t g = 0; g < num_groups; ++g) {
    vfloat part[ROWS][CHAINS];
    for (int m = 0; m < ROWS; ++m)
      for (int c = 0; c < CHAINS; ++c) part[m][c] = vfloat{};
    const int64_t k_begin = g * group_size;
    const int64_t k_end = std::min(k_begin + group_size, K);
    int64_t k = k_begin;
    if constexpr (BITS == 8) {
      for (; k + CHAINS <= k_end; k += CHAINS) {
        for (int c = 0; c < CHAINS; ++c) {
          const vfloat w = load_codes(codes + (k + c) * BLOCK_N);
          for (int m = 0; m < ROWS; ++m) part[m][c] += x[m * ldx + k + c] * w;
        }
      }
      for (; k < k_end; ++k) {
        const vfloat w = load_codes(codes + k * BLOCK_N);
        for (int m = 0; m < ROWS; ++m) part[m][0] += x[m * ldx + k] * w;
      }
    } else {
      // Groups start at even k (even group sizes, or one group per row), so pairs never straddle them.
      constexpr int PAIRS = CHAINS >= 2 ? CHAINS / 2 : 1;
      for (; k + 2 * PAIRS <= k_end; k += 2 * PAIRS) {
        for (int p = 0; p < PAIRS; ++p) {
          vfloat w0, w1;
          load_nibbles(codes + (k / 2 + p) * BLOCK_N, w0, w1);
          for (int m = 0; m < ROWS; ++m) {
            part[m][(2 * p) % CHAINS] += x[m * ldx + k + 2 * p] * w0;
            part[m][(2 * p + 1) % CHAINS] += x[m * ldx + k + 2 * p + 1] * w1;
          }
        }
      }
      for (; k + 1 < k_end; k += 2) {
        vfloat w0, w1;
        load_nibbles(codes + (k / 2) * BLOCK_N, w0, w1);
        for (int m = 0; m < ROWS; ++m) part[m][0] += x[m * ldx + k] * w0 + x[m * ldx + k + 1] * w1;
      }
      if (k < k_end) {  // an odd K: the last code's partner nibble is padding
        vfloat w0, unused;
        load_nibbles(codes + (k / 2) * BLOCK_N, w0, unused);
        for (int m = 0; m < ROWS; ++m) part[m][0] += x[m * ldx + k] * w0;
      }
    }
    const vfloat scale = load_floats(scales + g * BLOCK_N);
    const vfloat shift = load_floats(shifts + g * BLOCK_N);
    for (int m = 0; m < ROWS; ++m) {
      vfloat sum = part[m][0];
      for (int c = 1; c < CHAINS; ++c) sum += part[m][c];
      acc[m] += sum * scale + xsums[m * num_groups + g] * shift;
    }
  }
  for (int m = 0; m < ROWS; ++m) {
    for (int64_t r = 0; r < num_valid; ++r) y[m * ldy + r] = acc[m][r] + (bias ? bias[r] : 0.0f);
  }
}

template <int BITS>
void block_all_rows(const float* x, int64_t M, int64_t K, const uint8_t* codes, const float* scales,
                    const float* shifts, const float* xsums, int64_t num_groups, int64_t group_size,
                    const float* bias, float* y, int64_t N, int64_t num_valid) {
  int64_t m = 0;
#define TGSERVE_BLOCK_ROWS(R)                                                                                \
  block_rows<BITS, R>(x + m * K, K, codes, scales, shifts, xsums + m * num_groups, num_groups, K, group_size, \
                      bias, y + m * N, N, num_valid)
  for (; m + MAX_ROWS <= M; m += MAX_ROWS) TGSERVE_BLOCK_ROWS(MAX_ROWS);
  switch (M - m) {
    case 1: TGSERVE_BLOCK_ROWS(1); break;
    case 2: TGSERVE_BLOCK_ROWS(2); break;
    case 3: TGSERVE_BLOCK_ROWS(3); break;
#if defined(__AVX512F__)
    case 4: TGSERVE_BLOCK_ROWS(4); break;
    case 5: TGSERVE_BLOCK_ROWS(5); break;
    case 6: TGSERVE_BLOCK_ROWS(6); break;
    case 7: TGSERVE_BLOCK_ROWS(7); break;
#endif
    default: break;
  }
#undef TGSERVE_BLOCK_ROWS
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define TGSERVE_INT8_ACTIVATIONS 1
// bf16 / fp16 rows up to max_packed_rows (decode): each row of x quantized to int8 per ACT_BLOCK inputs
// (symmetric, scale = absmax / 127), then integer dot products with the codes as they are (u8 x s8 -> s32,
// _mm512_dpbusd_epi32: 4 inputs per lane per instruction, against 1 per FMA above), as llama.cpp does
// with its Q8 activations. W = q * scale + shift still factors per group: acc += sum_b(isum_b * xscale_b)
// * scale + xsum * shift, xsum the group's sum of the dequantized (rounded) activations, so the result is
// exactly x' @ W^T for x' = x rounded to 8 bits per block (the fp32 kernel above stays exact; float32
// runs never come here).
// Layout: the 64 bytes of 4 code rows (int8: inputs k..k+3; int4: byte rows j..j+3, inputs 2j..2j+7) hold
// [row][output]; one vpermb turns them into [output][row], the 4 bytes dpbusd sums per output lane.
// For int4 the low nibbles then hold inputs 2j, 2j+2, 2j+4, 2j+6 and the high ones the odd inputs, so the
// quantized activations are stored in that order per 8 inputs (evens, then odds).
constexpr int64_t ACT_BLOCK = 32;  // inputs per activation scale (llama.cpp's Q8_0 block)

struct Int8Activations {
  std::vector<int8_t> q;        // [M, num_groups * padded_group]: per group, zero-padded to ACT_BLOCK
  std::vector<float> scales;    // [M, num_groups * blocks_per_group]
  std::vector<float> sums;      // [M, num_groups]: sum of the dequantized activations of each group
  int64_t padded_group, blocks_per_group, num_groups;
};

// Position of input t of a group (t from the group's start) in the quantized row: int4 reorders each
// 8 inputs to evens then odds (see above); int8 keeps them in order.
template <int BITS>
inline int64_t act_position(int64_t t) {
  if constexpr (BITS == 8) return t;
  return (t & ~int64_t{7}) + ((t & 1) ? 4 : 0) + ((t & 7) >> 1);
}

template <int BITS>
Int8Activations quantize_activations(const float* x, int64_t M, int64_t K, int64_t group_size, int64_t num_groups) {
  Int8Activations a;
  a.num_groups = num_groups;
  a.padded_group = (group_size + ACT_BLOCK - 1) / ACT_BLOCK * ACT_BLOCK;
  a.blocks_per_group = a.padded_group / ACT_BLOCK;
  a.q.assign(M * num_groups * a.padded_group, 0);
  a.scales.assign(M * num_groups * a.blocks_per_group, 0.0f);
  a.sums.assign(M * num_groups, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < num_groups; ++g) {
      const int64_t k_begin = g * group_size, k_end = std::min(k_begin + group_size, K);
      int8_t* q = a.q.data() + (m * num_groups + g) * a.padded_group;
      float group_sum = 0.0f;
      for (int64_t b = 0; b < a.blocks_per_group; ++b) {
        const int64_t t_begin = b * ACT_BLOCK, t_end = std::min(t_begin + ACT_BLOCK, k_end - k_begin);
        if (t_end - t_begin == ACT_BLOCK) {  // a whole block in vectors (a batch's rows were 10% of a layer)
          const float* xb = x + m * K + k_begin + t_begin;
          const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
          const float absmax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
          const __m512 inverse = _mm512_set1_ps(absmax > 0.0f ? 127.0f / absmax : 0.0f);
          // cvtps rounds to nearest even, as nearbyint below does.
          const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inverse));
          const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inverse));
          __m256i bytes = _mm256_set_m128i(_mm512_cvtsepi32_epi8(q1), _mm512_cvtsepi32_epi8(q0));
          if constexpr (BITS != 8) {  // evens then odds within each 8 inputs (act_position)
            const __m256i order = _mm256_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15,
                                                   0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
            bytes = _mm256_shuffle_epi8(bytes, order);
          }
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + t_begin), bytes);
          const float scale = absmax / 127.0f;
          a.scales[(m * num_groups + g) * a.blocks_per_group + b] = scale;
          group_sum += static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1))) * scale;
          continue;
        }
        float absmax = 0.0f;
        for (int64_t t = t_begin; t < t_end; ++t) absmax = std::max(absmax, std::abs(x[m * K + k_begin + t]));
        const float scale = absmax / 127.0f;
        const float inverse = absmax > 0.0f ? 127.0f / absmax : 0.0f;
        int32_t block_sum = 0;
        for (int64_t t = t_begin; t < t_end; ++t) {
          const int32_t v = static_cast<int32_t>(std::nearbyint(x[m * K + k_begin + t] * inverse));
          q[act_position<BITS>(t)] = static_cast<int8_t>(v);
          block_sum += v;
        }
        a.scales[(m * num_groups + g) * a.blocks_per_group + b] = scale;
        group_sum += static_cast<float>(block_sum) * scale;
      }
      a.sums[m * num_groups + g] = group_sum;
    }
  }
  return a;
}

inline __m512i code_rows_to_lanes() {  // vpermb index: byte 4 r + i <- byte 16 i + r
  alignas(64) uint8_t index[64];
  for (int o = 0; o < 64; ++o) index[o] = static_cast<uint8_t>((o % 4) * 16 + o / 4);
  return _mm512_load_si512(index);
}

// One 64-byte load of codes (4 code rows) into ROWS int32 accumulators; xt: the rows' quantized inputs there.
template <int BITS, int ROWS>
inline void dot_step(__m512i raw, const int8_t* xt, int64_t row_stride, __m512i permute, __m512i* isum) {
  const __m512i lanes = _mm512_permutexvar_epi8(permute, raw);
  if constexpr (BITS == 8) {
    for (int m = 0; m < ROWS; ++m) {
      int32_t xv;
      std::memcpy(&xv, xt + m * row_stride, 4);
      isum[m] = _mm512_dpbusd_epi32(isum[m], lanes, _mm512_set1_epi32(xv));
    }
  } else {
    const __m512i low_mask = _mm512_set1_epi8(0x0F);
    const __m512i low = _mm512_and_si512(lanes, low_mask);
    const __m512i high = _mm512_and_si512(_mm512_srli_epi16(lanes, 4), low_mask);
    for (int m = 0; m < ROWS; ++m) {
      int32_t even, odd;
      std::memcpy(&even, xt + m * row_stride, 4);
      std::memcpy(&odd, xt + m * row_stride + 4, 4);
      isum[m] = _mm512_dpbusd_epi32(isum[m], low, _mm512_set1_epi32(even));
      isum[m] = _mm512_dpbusd_epi32(isum[m], high, _mm512_set1_epi32(odd));
    }
  }
}

// ROWS rows of quantized x (from row m0) times the 16 outputs of one block; y row stride ldy.
template <int BITS, int ROWS>
void block_rows_int8(const Int8Activations& a, int64_t m0, const uint8_t* codes, const float* scales,
                     const float* shifts, int64_t K, int64_t group_size, const float* bias, float* y, int64_t ldy,
                     int64_t num_valid) {
  constexpr int64_t STEP = BITS == 8 ? 4 : 8;  // inputs per 64-byte load of codes
  const __m512i permute = code_rows_to_lanes();
  // Locals, not a's fields: int8_t stores may alias anything, so the compiler would reload them per step.
  const int64_t num_groups = a.num_groups, padded_group = a.padded_group, blocks_per_group = a.blocks_per_group;
  const int64_t row_stride = num_groups * padded_group;
  const int8_t* xq = a.q.data() + m0 * row_stride;
  const float* x_scales = a.scales.data() + m0 * num_groups * blocks_per_group;
  const float* x_sums = a.sums.data() + m0 * num_groups;
  __m512 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t k_begin = g * group_size, group_end = std::min(k_begin + group_size, K) - k_begin;
    __m512 part[ROWS];
    for (int m = 0; m < ROWS; ++m) part[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks_per_group && b * ACT_BLOCK < group_end; ++b) {
      const int64_t t_end = std::min((b + 1) * ACT_BLOCK, group_end);
      __m512i isum[ROWS];
      for (int m = 0; m < ROWS; ++m) isum[m] = _mm512_setzero_si512();
      const uint8_t* p = codes + (BITS == 8 ? k_begin : k_begin / 2) * BLOCK_N;
      const int8_t* xt = xq + g * padded_group;
      int64_t t = b * ACT_BLOCK;
      for (; t + STEP <= t_end; t += STEP)
        dot_step<BITS, ROWS>(_mm512_loadu_si512(p + (BITS == 8 ? t : t / 2) * BLOCK_N), xt + t, row_stride,
                             permute, isum);
      if (t < t_end) {  // the group's last inputs: load only their bytes (the activations past them are 0)
        const int64_t bytes = (BITS == 8 ? t_end - t : (t_end - t + 1) / 2) * BLOCK_N;  // 16 to 64
        const __mmask64 mask = bytes >= 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
        dot_step<BITS, ROWS>(_mm512_maskz_loadu_epi8(mask, p + (BITS == 8 ? t : t / 2) * BLOCK_N), xt + t,
                             row_stride, permute, isum);
      }
      for (int m = 0; m < ROWS; ++m) {
        const __m512 xs = _mm512_set1_ps(x_scales[(m * num_groups + g) * blocks_per_group + b]);
        part[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[m]), xs, part[m]);
      }
    }
    const __m512 scale = _mm512_loadu_ps(scales + g * BLOCK_N);
    const __m512 shift = _mm512_loadu_ps(shifts + g * BLOCK_N);
    for (int m = 0; m < ROWS; ++m) {
      acc[m] = _mm512_fmadd_ps(part[m], scale, acc[m]);
      acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x_sums[m * num_groups + g]), shift, acc[m]);
    }
  }
  for (int m = 0; m < ROWS; ++m) {
    alignas(64) float out[BLOCK_N];
    _mm512_store_ps(out, acc[m]);
    for (int64_t r = 0; r < num_valid; ++r) y[m * ldy + r] = out[r] + (bias ? bias[r] : 0.0f);
  }
}

template <int BITS>
void block_all_rows_int8(const Int8Activations& a, int64_t M, int64_t K, const uint8_t* codes, const float* scales,
                         const float* shifts, int64_t group_size, const float* bias, float* y, int64_t N,
                         int64_t num_valid) {
  int64_t m = 0;
#define TGSERVE_BLOCK_ROWS_INT8(R) \
  block_rows_int8<BITS, R>(a, m, codes, scales, shifts, K, group_size, bias, y + m * N, N, num_valid)
  for (; m + MAX_ROWS <= M; m += MAX_ROWS) TGSERVE_BLOCK_ROWS_INT8(MAX_ROWS);
  switch (M - m) {
    case 1: TGSERVE_BLOCK_ROWS_INT8(1); break;
    case 2: TGSERVE_BLOCK_ROWS_INT8(2); break;
    case 3: TGSERVE_BLOCK_ROWS_INT8(3); break;
    case 4: TGSERVE_BLOCK_ROWS_INT8(4); break;
    case 5: TGSERVE_BLOCK_ROWS_INT8(5); break;
    case 6: TGSERVE_BLOCK_ROWS_INT8(6); break;
    case 7: TGSERVE_BLOCK_ROWS_INT8(7); break;
    default: break;
  }
#undef TGSERVE_BLOCK_ROWS_INT8
}

// y [M, N] (float) for x [M, K] (float, from bf16 / fp16): activations to int8, then the VNNI kernel.
at::Tensor packed_gemm_int8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                            const at::Tensor& shifts, const c10::optional<at::Tensor>& bias, int64_t bits,
                            int64_t group_size, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t num_blocks = codes.size(0);
  const int64_t block_bytes = codes.size(1) * BLOCK_N;
  const int64_t num_groups = scales.size(1);
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const Int8Activations a = bits == 8 ? quantize_activations<8>(x.data_ptr<float>(), M, K, group_size, num_groups)
                                      : quantize_activations<4>(x.data_ptr<float>(), M, K, group_size, num_groups);
  const uint8_t* code_data = codes.data_ptr<uint8_t>();
  const float* scale_data = scales.data_ptr<float>();
  const float* shift_data = shifts.data_ptr<float>();
  const float* bias_data = bias ? bias->data_ptr<float>() : nullptr;
  float* y_data = y.data_ptr<float>();
  // As packed_gemm's grain, but every thread gets blocks of a small layer ([896 -> 128]: 8 blocks ran on one).
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(16384 / std::max<int64_t>(1, K),
                                                               num_blocks / std::max(1, at::get_num_threads())));
  at::parallel_for(0, num_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b * BLOCK_N;
      const int64_t num_valid = std::min(BLOCK_N, N - n);
      const float* block_bias = bias_data ? bias_data + n : nullptr;
      const float* block_scales = scale_data + b * num_groups * BLOCK_N;
      const float* block_shifts = shift_data + b * num_groups * BLOCK_N;
      if (bits == 8)
        block_all_rows_int8<8>(a, M, K, code_data + b * block_bytes, block_scales, block_shifts, group_size,
                               block_bias, y_data + n, N, num_valid);
      else
        block_all_rows_int8<4>(a, M, K, code_data + b * block_bytes, block_scales, block_shifts, group_size,
                               block_bias, y_data + n, N, num_valid);
    }
  });
  return y;
}
#endif  // VNNI

// Whether this build has the int8-activation path (an AVX512-VNNI + VBMI -march).
bool has_int8_activations() {
#if defined(TGSERVE_INT8_ACTIVATIONS)
  return true;
#else
  return false;
#endif
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
  // Per row and group, the sum of x over the group's inputs: the shift's (zero point's) share.
  std::vector<float> xsums(M * num_groups, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsums[m * num_groups + k / group_size] += x_data[m * K + k];
  const float* xsum_data = xsums.data();
  // Enough blocks per task that the pool's hand-off (a few microseconds) stays small against the work.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K));
  at::parallel_for(0, num_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b * BLOCK_N;
      const int64_t num_valid = std::min(BLOCK_N, N - n);
      const float* block_bias = bias_data ? bias_data + n : nullptr;
      const float* block_scales = scale_data + b * num_groups * BLOCK_N;
      const float* block_shifts = shift_data + b * num_groups * BLOCK_N;
      for (int64_t h = 0; h * LANES < num_valid; ++h) {
        const int64_t lanes = std::min<int64_t>(LANES, num_valid - h * LANES);
        const uint8_t* lane_codes = code_data + b * block_bytes + h * LANES;
        const float* lane_bias = block_bias ? block_bias + h * LANES : nullptr;
        if (bits == 8)
          block_all_rows<8>(x_data, M, K, lane_codes, block_scales + h * LANES, block_shifts + h * LANES,
                            xsum_data, num_groups, group_size, lane_bias, y_data + n + h * LANES, N, lanes);
        else
          block_all_rows<4>(x_data, M, K, lane_codes, block_scales + h * LANES, block_shifts + h * LANES,
                            xsum_data, num_groups, group_size, lane_bias, y_data + n + h * LANES, N, lanes);
      }
    }
  });
  return y;
}

// W^T for output rows [block_begin * 16, block_end * 16) as float [K, rows] (a tile, never the whole weight):
// row k holds input k's weights of those outputs, LANES at a time in vector stores, for x @ W^T as one GEMM.
at::Tensor dequantize_transposed(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& shifts,
                                 int64_t bits, int64_t group_size, int64_t K, int64_t block_begin, int64_t block_end) {
  const int64_t num_groups = scales.size(1);
  const int64_t block_bytes = codes.size(1) * BLOCK_N;
  const int64_t rows = (block_end - block_begin) * BLOCK_N;
  auto wt = at::empty({K, rows}, scales.options());
  float* wt_data = wt.data_ptr<float>();
  const uint8_t* code_data = codes.data_ptr<uint8_t>();
  const float* scale_data = scales.data_ptr<float>();
  const float* shift_data = shifts.data_ptr<float>();
  at::parallel_for(block_begin, block_end, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t h = 0; h < BLOCK_N / LANES; ++h) {
        const uint8_t* block = code_data + b * block_bytes + h * LANES;
        float* out = wt_data + (b - block_begin) * BLOCK_N + h * LANES;
        for (int64_t g = 0; g < num_groups; ++g) {
          const vfloat scale = load_floats(scale_data + (b * num_groups + g) * BLOCK_N + h * LANES);
          const vfloat shift = load_floats(shift_data + (b * num_groups + g) * BLOCK_N + h * LANES);
          for (int64_t k = g * group_size; k < std::min((g + 1) * group_size, K); ++k) {
            vfloat w;
            if (bits == 8) {
              w = load_codes(block + k * BLOCK_N);
            } else {
              vfloat low, high;
              load_nibbles(block + (k / 2) * BLOCK_N, low, high);
              w = (k & 1) ? high : low;
            }
            w = w * scale + shift;
            std::memcpy(out + k * rows, &w, sizeof(w));
          }
        }
      }
    }
  });
  return wt;
}

constexpr int64_t TILE_BLOCKS = 32;  // 512 output rows dequantized per GEMM call (a prefill)

// y = x @ W^T (+ bias) in x's dtype. x: [M, K] float / bf16 / fp16 (already permuted); W packed as above.
// M <= max_packed_rows: the packed kernel (with int8 activations for bf16 / fp16 rows where
// int8_activations asks and the build has them); larger M: tiles of W dequantized to x's dtype and a GEMM each.
at::Tensor weight_only_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                              const at::Tensor& shifts, const c10::optional<at::Tensor>& bias, int64_t bits,
                              int64_t group_size, int64_t N, int64_t max_packed_rows, bool int8_activations) {
  check_packed(codes, scales, shifts, bits);
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  const int64_t K = x.size(1);
  TORCH_CHECK(codes.size(1) == (bits == 8 ? K : (K + 1) / 2), "codes do not match K = ", K);
  TORCH_CHECK(N <= codes.size(0) * BLOCK_N && N > (codes.size(0) - 1) * BLOCK_N, "N does not match the codes");
  if (x.size(0) <= max_packed_rows) {
    c10::optional<at::Tensor> bias_float;
    if (bias) bias_float = bias->to(at::kFloat).contiguous();
#if defined(TGSERVE_INT8_ACTIVATIONS)
    // Groups must hold whole 64-byte code loads: a multiple of 8 inputs, or one group per row.
    if (int8_activations && x.scalar_type() != at::kFloat && x.size(0) >= 1 &&
        (group_size % 8 == 0 || group_size >= K)) {
      auto y = packed_gemm_int8(x.to(at::kFloat).contiguous(), codes, scales, shifts, bias_float, bits, group_size, N);
      return y.to(x.scalar_type());
    }
#endif
    auto y = packed_gemm(x.to(at::kFloat).contiguous(), codes, scales, shifts, bias_float, bits, group_size, N);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  auto y = at::empty({x.size(0), N}, x.options());
  const auto xc = x.contiguous();
  for (int64_t b = 0; b < codes.size(0); b += TILE_BLOCKS) {
    const int64_t b_end = std::min(b + TILE_BLOCKS, codes.size(0));
    const int64_t n = b * BLOCK_N, n_end = std::min(b_end * BLOCK_N, N);
    auto wt = dequantize_transposed(codes, scales, shifts, bits, group_size, K, b, b_end)
                  .narrow(1, 0, n_end - n).to(x.scalar_type());
    y.narrow(1, n, n_end - n).copy_(bias ? at::addmm(bias->narrow(0, n, n_end - n).to(x.scalar_type()), xc, wt)
                                         : at::mm(xc, wt));
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(tgserve_cpu, m) {
  m.def("weight_only_linear(Tensor x, Tensor codes, Tensor scales, Tensor shifts, Tensor? bias, int bits, "
        "int group_size, int out_features, int max_packed_rows, bool int8_activations=False) -> Tensor");
  m.def("has_int8_activations() -> bool", &has_int8_activations);
  m.def("dequantize_transposed(Tensor codes, Tensor scales, Tensor shifts, int bits, int group_size, "
        "int in_features, int block_begin, int block_end) -> Tensor");
}

TORCH_LIBRARY_IMPL(tgserve_cpu, CPU, m) {
  m.impl("weight_only_linear", &weight_only_linear);
  m.impl("dequantize_transposed", &dequantize_transposed);
}
