// Dense bf16-weight GEMM for the cpu backend where oneDNN has no bf16 path (AVX2-only CPUs: Zen 3 and
// older): y[M, N] = x[M, K] @ W^T (+ bias), W bf16, x and y float32 or bf16, accumulation in float32.
//
// A bf16 value is the top half of a float32, so widening is a shift or a mask, no convert instruction.
// Packed layout (made at prepare time by backends/cpu/native_bf16_linear.py): output rows in blocks of
// BLOCK_N = 2 * LANES, and within a block the BLOCK_N weights of one input k side by side, ordered so that
// 32-bit word i holds output i in its low half and output LANES + i in its high half:
//   w  bf16 [ceil(N / BLOCK_N), K, BLOCK_N]   w[b, k, 2 i] = W[BLOCK_N b + i, k], w[b, k, 2 i + 1] = W[BLOCK_N b + LANES + i, k]
// One vector load of a k's words then gives both halves' floats: (word << 16) for outputs 0..LANES-1 and
// (word & 0xFFFF0000) for LANES..2 LANES-1, each one integer op.
// Each block is reused for every row of x, MAX_ROWS rows at a time held in registers, so a decode batch
// reads the weight once per step. The same loop serves prefills: MAX_ROWS x 16 outputs per FMA tile keeps
// the FMA units as busy as oneDNN's float32 AVX2 GEMM (one thread, 128 and 512 rows of [9728 x 896] and
// [896 x 4864]: 92-104 GFLOP/s against 84-94; widening 512-output tiles for torch's float32 GEMM: 50-73).
// Vectors are GCC vector extensions: -march picks AVX-512, AVX2 or the baseline's SSE2.
// Threads: torch's own pool (at::parallel_for) over blocks of output rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int LANES = 16;
constexpr int MAX_ROWS = 8;  // 16 accumulators + weights of 32 zmm
#elif defined(__AVX2__)
constexpr int LANES = 8;
constexpr int MAX_ROWS = 6;  // 12 accumulators + two halves of weights and a broadcast of 16 ymm
#else
constexpr int LANES = 4;
constexpr int MAX_ROWS = 4;
#endif
constexpr int64_t BLOCK_N = 2 * LANES;

typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef uint32_t vword __attribute__((vector_size(LANES * 4)));

inline vword load_words(const uint16_t* p) {
  vword v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vfloat low_outputs(vword v) { return (vfloat)(v << 16); }
inline vfloat high_outputs(vword v) { return (vfloat)(v & 0xFFFF0000u); }

// ROWS rows of x (float, row stride ldx) times one block's BLOCK_N outputs -> out [ROWS][BLOCK_N] (float).
// A single row has little to overlap: its k's go round-robin into CHAINS independent accumulators per half,
// since one chain would wait out the FMA latency (4 cycles) on every k.
template <int ROWS>
void block_rows(const float* x, int64_t ldx, const uint16_t* w, int64_t K, float* out) {
  constexpr int CHAINS = ROWS == 1 ? 4 : (ROWS == 2 ? 2 : 1);
  vfloat low[ROWS][CHAINS], high[ROWS][CHAINS];
  for (int m = 0; m < ROWS; ++m)
    for (int c = 0; c < CHAINS; ++c) low[m][c] = high[m][c] = vfloat{};
  int64_t k = 0;
  for (; k + CHAINS <= K; k += CHAINS) {
    for (int c = 0; c < CHAINS; ++c) {
      const vword v = load_words(w + (k + c) * BLOCK_N);
      const vfloat w_low = low_outputs(v), w_high = high_outputs(v);
      for (int m = 0; m < ROWS; ++m) {
        const float xv = x[m * ldx + k + c];
        low[m][c] += xv * w_low;
        high[m][c] += xv * w_high;
      }
    }
  }
  for (; k < K; ++k) {
    const vword v = load_words(w + k * BLOCK_N);
    const vfloat w_low = low_outputs(v), w_high = high_outputs(v);
    for (int m = 0; m < ROWS; ++m) {
      low[m][0] += x[m * ldx + k] * w_low;
      high[m][0] += x[m * ldx + k] * w_high;
    }
  }
  for (int m = 0; m < ROWS; ++m) {
    for (int c = 1; c < CHAINS; ++c) {
      low[m][0] += low[m][c];
      high[m][0] += high[m][c];
    }
    std::memcpy(out + m * BLOCK_N, &low[m][0], sizeof(vfloat));
    std::memcpy(out + m * BLOCK_N + LANES, &high[m][0], sizeof(vfloat));
  }
}

// One block's outputs for rows [m, m + rows) of x into out [rows][BLOCK_N]; rows <= MAX_ROWS.
void block_some_rows(const float* x, int64_t K, const uint16_t* w, int64_t rows, float* out) {
  switch (rows) {
    case 1: block_rows<1>(x, K, w, K, out); break;
    case 2: block_rows<2>(x, K, w, K, out); break;
    case 3: block_rows<3>(x, K, w, K, out); break;
    case 4: block_rows<4>(x, K, w, K, out); break;
#if defined(__AVX512F__) || defined(__AVX2__)
    case 5: block_rows<5>(x, K, w, K, out); break;
    case 6: block_rows<6>(x, K, w, K, out); break;
#endif
#if defined(__AVX512F__)
    case 7: block_rows<7>(x, K, w, K, out); break;
    case 8: block_rows<8>(x, K, w, K, out); break;
#endif
    default: TORCH_CHECK(false, "rows per call must be 1..", MAX_ROWS, ", got ", rows);
  }
}

// x [M, K] as float32 (a copy for bf16 rows; the tensor itself when it is float32 already).
const float* rows_as_float(const at::Tensor& x, std::vector<float>& scratch) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  const int64_t count = x.numel();
  scratch.resize(count);
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t word = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(&scratch[i], &word, 4);
  }
  return scratch.data();
}

// y [M, N] in T (float or bf16, rounded to nearest even): parallel over blocks of outputs.
template <typename T>
void packed_gemm(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t num_blocks, const float* bias,
                 T* y, int64_t N) {
  // Enough blocks per task that the pool's hand-off (a few microseconds) stays small against the work.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K));
  // Rows per pass over the weight: each block re-reads the pass's rows of x, so they must stay in cache
  // (at most ~4 MB of float: 1170 rows of a 896-input layer, 210 of a 4864-input one); a longer prefill
  // streams the weight once per pass instead. Decode batches are one pass.
  const int64_t rows_per_pass = std::max<int64_t>(MAX_ROWS, (int64_t{1} << 20) / std::max<int64_t>(1, K));
  for (int64_t pass = 0; pass < M; pass += rows_per_pass) {
    const int64_t pass_end = std::min(M, pass + rows_per_pass);
    at::parallel_for(0, num_blocks, grain, [&](int64_t begin, int64_t end) {
      float out[MAX_ROWS * BLOCK_N];
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = b * BLOCK_N;
        const int64_t num_valid = std::min(BLOCK_N, N - n);
        for (int64_t m = pass; m < pass_end; m += MAX_ROWS) {
          const int64_t rows = std::min<int64_t>(MAX_ROWS, pass_end - m);
          block_some_rows(x + m * K, K, w + b * K * BLOCK_N, rows, out);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t o = 0; o < num_valid; ++o)
              y[(m + r) * N + n + o] = static_cast<T>(out[r * BLOCK_N + o] + (bias ? bias[n + o] : 0.0f));
        }
      }
    });
  }
}

// y = x @ W^T (+ bias) in x's dtype. x: [M, K] float32 or bf16; w packed as above; bias float32 [N] or None.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be float32 or bf16 [M, K]");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.dim() == 3 && w.size(2) == BLOCK_N,
              "w must be contiguous bf16 [N / ", BLOCK_N, ", K, ", BLOCK_N, "] (this build's block)");
  const int64_t M = x.size(0), K = x.size(1), num_blocks = w.size(0);
  TORCH_CHECK(w.size(1) == K, "w has ", w.size(1), " inputs, x ", K);
  TORCH_CHECK(N <= num_blocks * BLOCK_N && N > (num_blocks - 1) * BLOCK_N, "N does not match w");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "bias must be contiguous float32 [N]");
  const auto xc = x.contiguous();
  auto y = at::empty({M, N}, x.options());
  std::vector<float> scratch;
  const float* x_data = rows_as_float(xc, scratch);
  const uint16_t* w_data = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const float* bias_data = bias ? bias->data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat)
    packed_gemm<float>(x_data, M, K, w_data, num_blocks, bias_data, y.data_ptr<float>(), N);
  else
    packed_gemm<at::BFloat16>(x_data, M, K, w_data, num_blocks, bias_data, y.data_ptr<at::BFloat16>(), N);
  return y;
}

int64_t bf16_block_size() { return BLOCK_N; }

}  // namespace

TORCH_LIBRARY(tgserve_cpu_bf16, m) {
  m.def("bf16_linear(Tensor x, Tensor w, Tensor? bias, int out_features) -> Tensor");
  m.def("bf16_block_size() -> int", &bf16_block_size);
}

TORCH_LIBRARY_IMPL(tgserve_cpu_bf16, CPU, m) { m.impl("bf16_linear", &bf16_linear); }
