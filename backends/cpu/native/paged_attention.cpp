// Paged attention for the cpu backend (backends/cpu/native_attention.py): one op per layer that writes the
// step's K/V into the cache and attends every query row of the step (decodes: one query each; speculative
// verifications: a few; prompts and their chunks after cached tokens: many) over each sequence's cache
// blocks, read in place through the block table: no gather copy, no float32 copy of K/V.
//
//   q            [T, heads, d]        rows [0, cu_seqlens_q[num_seqs]) belong to the sequences attended here
//   k, v         [T, kv_heads, d]     every row's K/V goes to the cache at slot_mapping (padding rows: block 0)
//   k/v_cache    [num_blocks, block_size, kv_heads, d], same dtype as q (float32, bf16 or fp16)
//   block_tables int64 [S, max_blocks], context_lens int64 [S] (keys after this step's write),
//   cu_seqlens_q int64 [S + 1] (sequence s computes rows [cu[s], cu[s + 1]): its last positions, causal)
//   -> out       [T, heads * d]: rows of the first num_seqs sequences attended, rows [num_tokens, T) zero (padding
//                of a bucketed step), any rows in between (sequences past num_seqs) left for the caller to fill.
//
// Work item = (chunk, kv head), a chunk being up to MAX_ROWS / group consecutive query tokens of one sequence
// (equal chunks): its query tokens times the `group` query heads sharing that KV head score each key together,
// so a key is read once per item. Query i of a sequence computing q tokens sees keys [0, context_len - q + 1 + i).
// Two paths, both with an online softmax (running max m, sum l, rescaled accumulators) and float32 sums:
//  - few rows (decodes, short verifications; attend_one): keys in tiles of up to TILE_KEYS inside one cache
//    block, a dot product per row and key, the cache rows read in place (float32) or converted per tile;
//  - many rows (WIDE_MIN_ROWS and up; attend_wide): tiles of WIDE_KEYS keys across blocks, gathered once per
//    item, rows in register blocks scoring a whole tile with no horizontal sums. Its products are float32
//    FMAs on transposed keys (Float32Tile, any ISA) or, for a bf16 cache on an AVX512-BF16 build, vdpbf16ps
//    pairs (Bf16PairTile); `long_query_path` names which a dtype gets.
// Plain C++ with `omp simd` loops and GCC vector extensions: -march (the host's, or haswell for the portable
// build) picks the vector ISA; only the bf16-pair tile needs AVX512-BF16. Threads: torch's own pool
// (at::parallel_for), each thread taking the next item from a shared counter, so a long causal prompt's
// heavier later chunks are shared.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "exp_poly.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t TILE_KEYS = 16;  // keys scored before each softmax update (the cpu backend's block size)
constexpr int64_t MAX_ROWS = 256;  // query tokens x query heads per KV head in one work item
constexpr int64_t WIDE_KEYS = 64;  // keys per tile of the many-rows path (attend_wide)
// Items with at least this many rows take attend_wide; below it (a decode's few query heads) gathering and
// transposing each tile would cost more than the dot products' horizontal sums it saves.
constexpr int64_t WIDE_MIN_ROWS = 8;

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return __builtin_bit_cast(float, uint32_t(x.x) << 16); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// exp(x) for x <= 0 (a score minus its running max). Below -87 the result (< 1.7e-38) is flushed to
// exp(-87): beside the max's weight 1 it adds nothing.
inline float exp_nonpositive(float x) { return exp_in_range(x < -87.0f ? -87.0f : x); }

// A vector register of floats as a value of GCC's vector extension: 16 lanes with AVX-512, 8 with AVX2 (a
// wider type would be split by the compiler, through memory). Locals of this type stay in registers across
// a loop where a float array would go through memory (a store-to-load round trip per step of a `+=` chain).
#if defined(__AVX512F__)
constexpr int64_t LANES = 16;
#else
constexpr int64_t LANES = 8;
#endif
typedef float lanes_t __attribute__((vector_size(LANES * sizeof(float))));
inline lanes_t load_lanes(const float* p) {
  lanes_t x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

// q . k over d floats. A fixed d that fills whole vectors sums in vector registers and reduces once with
// a shuffle tree; GCC's `omp simd` reduction ended each dot with a chain of 15 scalar adds (measured the
// hottest code of the op). The plain loop serves any other d or ISA.
template <int HEAD_DIM>
inline float dot_product(const float* __restrict__ q, const float* __restrict__ k, int64_t d) {
#if defined(__AVX512F__)
  if constexpr (HEAD_DIM > 0 && HEAD_DIM % 16 == 0) {
    __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
    for (int i = 16; i < HEAD_DIM; i += 16) sum = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(k + i), sum);
    return _mm512_reduce_add_ps(sum);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if constexpr (HEAD_DIM > 0 && HEAD_DIM % 16 == 0) {
    __m256 even = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
    __m256 odd = _mm256_mul_ps(_mm256_loadu_ps(q + 8), _mm256_loadu_ps(k + 8));
    for (int i = 16; i < HEAD_DIM; i += 16) {
      even = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), even);
      odd = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(k + i + 8), odd);
    }
    const __m256 sum = _mm256_add_ps(even, odd);
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
  }
#endif
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < d; ++i) dot += q[i] * k[i];
  return dot;
}

// Rows of one tile as float32: the cache rows themselves for a float32 cache, else converted into `buffer`.
// Returns the first row; `stride` is set to the distance between rows.
template <typename scalar_t>
inline const float* tile_rows(const scalar_t* rows, int64_t row_stride, int64_t num_rows, int64_t head_dim,
                              float* buffer, int64_t& stride) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    stride = row_stride;
    return rows;
  } else {
    for (int64_t j = 0; j < num_rows; ++j) {
      const scalar_t* row = rows + j * row_stride;
      float* out = buffer + j * head_dim;
#pragma omp simd
      for (int64_t i = 0; i < head_dim; ++i) out[i] = to_float(row[i]);
    }
    stride = head_dim;
    return buffer;
  }
}

struct Shape {
  int64_t num_heads, num_kv_heads, head_dim, group, block_size;
  int64_t q_row_stride, q_head_stride;  // elements
  int64_t tables_row_stride;
  float scale;
};

// One work item of a few rows (decodes, short verifications): its num_queries query tokens x the `group` query heads of kv_head,
// rows r = i * group + g. `work` holds rows * d (scaled queries) + rows * d (accumulators)
// + 2 * rows * TILE_KEYS (scores, weights) + 2 * TILE_KEYS * d (a converted K and V tile) floats.
// HEAD_DIM > 0: head_dim fixed at compile time (64, 128: the d-loops unroll into a few full vectors; with
// a run-time trip count each 64-float loop paid its peel and remainder, ~3x the time per tile); 0: any.
template <typename scalar_t, int HEAD_DIM>
void attend_one(const Shape& s, const scalar_t* q_rows, int64_t num_queries, const scalar_t* k_cache,
                const scalar_t* v_cache, const int64_t* table, int64_t context_len, int64_t kv_head,
                scalar_t* out_rows, float* work) {
  const int64_t d = HEAD_DIM > 0 ? HEAD_DIM : s.head_dim, group = s.group, cache_row = s.num_kv_heads * d;
  const int64_t num_rows = num_queries * group, first_limit = context_len - num_queries + 1;
  float* __restrict__ queries = work;
  float* __restrict__ acc = queries + num_rows * d;
  float* __restrict__ scores = acc + num_rows * d;
  float* __restrict__ weights = scores + num_rows * TILE_KEYS;
  float* k_tile = weights + num_rows * TILE_KEYS;
  float* v_tile = k_tile + TILE_KEYS * d;
  float running_max[MAX_ROWS], running_sum[MAX_ROWS];  // num_rows <= MAX_ROWS (checked by the op)
  int64_t visible[MAX_ROWS];  // keys of the current tile row r sees (causal: later queries see more)
  for (int64_t r = 0; r < num_rows; ++r) {
    const scalar_t* head = q_rows + (r / group) * s.q_row_stride + (kv_head * group + r % group) * s.q_head_stride;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) queries[r * d + i] = to_float(head[i]) * s.scale;
    std::fill(acc + r * d, acc + (r + 1) * d, 0.0f);
    running_max[r] = -std::numeric_limits<float>::infinity();
    running_sum[r] = 0.0f;
  }
  for (int64_t pos = 0; pos < context_len;) {
    const int64_t block = table[pos / s.block_size], offset = pos % s.block_size;
    const int64_t n = std::min({TILE_KEYS, s.block_size - offset, context_len - pos});
    const int64_t first = ((block * s.block_size + offset) * s.num_kv_heads + kv_head) * d;
    int64_t k_stride, v_stride;
    const float* keys = tile_rows(k_cache + first, cache_row, n, d, k_tile, k_stride);
    const float* values = tile_rows(v_cache + first, cache_row, n, d, v_tile, v_stride);
    for (int64_t r = 0; r < num_rows; ++r) {
      // Every row sees key 0 (first_limit >= 1), so its first tile is pos == 0; a tile it sees none of is skipped.
      const int64_t seen = std::min(n, first_limit + r / group - pos);
      visible[r] = seen > 0 ? seen : 0;
      if (seen <= 0) continue;
      const float* query = queries + r * d;
      float tile_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < seen; ++j) {
        const float dot = dot_product<HEAD_DIM>(query, keys + j * k_stride, d);
        scores[r * TILE_KEYS + j] = dot;
        tile_max = std::max(tile_max, dot);
      }
      std::fill(scores + r * TILE_KEYS + seen, scores + (r + 1) * TILE_KEYS, tile_max);  // finite, never weighed
      const float new_max = std::max(running_max[r], tile_max);
      // exp(-inf) on the first tile: the empty accumulators are scaled by 0.
      const float correction = pos == 0 ? 0.0f : exp_nonpositive(running_max[r] - new_max);
      float tile_sum = 0.0f;
      float* __restrict__ w = weights + r * TILE_KEYS;
      const float* __restrict__ sc = scores + r * TILE_KEYS;
      // All TILE_KEYS lanes (a fixed-count loop vectorizes; a masked one did not): the scores past `seen` hold
      // tile_max (finite, set above), and their weights are zeroed before the sum.
#pragma omp simd
      for (int64_t j = 0; j < TILE_KEYS; ++j) w[j] = exp_nonpositive(sc[j] - new_max);
      std::fill(w + seen, w + TILE_KEYS, 0.0f);
#pragma omp simd reduction(+ : tile_sum)
      for (int64_t j = 0; j < TILE_KEYS; ++j) tile_sum += w[j];
      running_sum[r] = running_sum[r] * correction + tile_sum;
      running_max[r] = new_max;
      if (correction != 1.0f) {
        float* a = acc + r * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) a[i] *= correction;
      }
    }
    for (int64_t r = 0; r < num_rows; ++r) {
      float* __restrict__ a = acc + r * d;
      const float* __restrict__ w = weights + r * TILE_KEYS;
      for (int64_t j = 0; j < visible[r]; ++j) {
        const float* __restrict__ value = values + j * v_stride;
        const float weight = w[j];
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) a[i] += weight * value[i];
      }
    }
    pos += n;
  }
  for (int64_t r = 0; r < num_rows; ++r) {
    const float inverse = context_len > 0 ? 1.0f / running_sum[r] : 0.0f;
    scalar_t* out = out_rows + (r / group) * s.num_heads * d + (kv_head * group + r % group) * d;
    const float* a = acc + r * d;
    for (int64_t i = 0; i < d; ++i) out[i] = static_cast<scalar_t>(a[i] * inverse);
  }
}

// One row's online-softmax update over a tile of WIDE_KEYS scores, of which the first `seen` count:
// weights[j] = exp(score - new max) (0 from `seen` on), the running max and sum updated; returns the factor
// that rescales the row's accumulators (0 on its first tile: exp(-inf)).
inline float softmax_tile(const float* __restrict__ scores, int64_t seen, bool is_first, float& running_max,
                          float& running_sum, float* __restrict__ weights) {
  float tile_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : tile_max)
  for (int64_t j = 0; j < WIDE_KEYS; ++j)
    tile_max = std::max(tile_max, j < seen ? scores[j] : -std::numeric_limits<float>::infinity());
  const float new_max = std::max(running_max, tile_max);
  const float correction = is_first ? 0.0f : exp_nonpositive(running_max - new_max);
  float tile_sum = 0.0f;
#pragma omp simd reduction(+ : tile_sum)
  for (int64_t j = 0; j < WIDE_KEYS; ++j) {
    weights[j] = j < seen ? exp_nonpositive(scores[j] - new_max) : 0.0f;
    tile_sum += weights[j];
  }
  running_sum = running_sum * correction + tile_sum;
  running_max = new_max;
  return correction;
}

// acc[b][v] += scalars[b] * panel[v * LANES .. v * LANES + LANES): one step of a register-blocked outer
// product, each loaded panel vector serving every row of the block (scores: query elements x a transposed
// key row; values: softmax weights x a value row).
template <int64_t ROWS, int64_t VECTORS>
inline void outer_product_step(lanes_t (&acc)[ROWS][VECTORS], const float (&scalars)[ROWS], const float* panel) {
  lanes_t vectors[VECTORS];
#pragma GCC unroll 8
  for (int64_t v = 0; v < VECTORS; ++v) vectors[v] = load_lanes(panel + v * LANES);
#pragma GCC unroll 8
  for (int64_t b = 0; b < ROWS; ++b) {
    const lanes_t scalar = lanes_t{} + scalars[b];
#pragma GCC unroll 8
    for (int64_t v = 0; v < VECTORS; ++v) acc[b][v] += scalar * vectors[v];
  }
}

// Rows per block of the many-rows path: their accumulators (ROW_BLOCK x d floats) fill about half the vector
// registers (32 x 16 floats with AVX-512, 16 x 8 with AVX2).
template <int HEAD_DIM>
constexpr int64_t row_block() {
#if defined(__AVX512F__)
  return std::max(1, 256 / HEAD_DIM);
#else
  return std::max(1, 64 / HEAD_DIM);
#endif
}

// The many-rows path's view of a tile in float32, any cache dtype, any x86-64 vector ISA: the tile's keys
// transposed [d][WIDE_KEYS] and its values as rows [WIDE_KEYS][d]; queries pre-scaled. A row's scores come
// from one vector FMA per element of d and per 16 keys, with no horizontal sums.
template <typename scalar_t, int HEAD_DIM>
struct Float32Tile {
  static constexpr int64_t d = HEAD_DIM, ROW_BLOCK = row_block<HEAD_DIM>();
  float* __restrict__ queries;  // [rows][d], scaled
  float* __restrict__ keys_t;   // [d][WIDE_KEYS]
  float* __restrict__ values;   // [WIDE_KEYS][d]

  Float32Tile(float* work, int64_t num_rows)
      : queries(work), keys_t(work + num_rows * d), values(keys_t + WIDE_KEYS * d) {}

  void load_query(int64_t r, const scalar_t* head, float scale) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) queries[r * d + i] = to_float(head[i]) * scale;
  }

  // keys[j], values[j]: key pos + j of the item's KV head, j < n; lanes past n score 0 and are never weighed.
  void gather(const scalar_t* const* keys, const scalar_t* const* vals, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t i = 0; i < d; ++i) keys_t[i * WIDE_KEYS + j] = to_float(keys[j][i]);
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) values[j * d + i] = to_float(vals[j][i]);
    }
    for (int64_t j = n; j < WIDE_KEYS; ++j)
      for (int64_t i = 0; i < d; ++i) keys_t[i * WIDE_KEYS + j] = 0.0f;
  }

  void score(const int64_t* rows, lanes_t (&lanes)[ROW_BLOCK][WIDE_KEYS / LANES]) const {
    for (int64_t i = 0; i < d; ++i) {
      float query_elements[ROW_BLOCK];
      for (int64_t b = 0; b < ROW_BLOCK; ++b) query_elements[b] = queries[rows[b] * d + i];
      outer_product_step(lanes, query_elements, keys_t + i * WIDE_KEYS);
    }
  }

  void add_values(const float (&weights)[ROW_BLOCK][WIDE_KEYS], int64_t num_keys,
                  lanes_t (&sums)[ROW_BLOCK][d / LANES]) const {
    for (int64_t j = 0; j < num_keys; ++j) {
      float key_weights[ROW_BLOCK];
      for (int64_t b = 0; b < ROW_BLOCK; ++b) key_weights[b] = weights[b][j];
      outer_product_step(sums, key_weights, values + j * d);
    }
  }
};

#if defined(__AVX512BF16__)
// The many-rows path's view of a tile for a bf16 cache on a CPU with AVX512-BF16: one vdpbf16ps multiplies
// 16 pairs of bf16 and adds both products into 16 float32 lanes, twice the work of a float32 FMA, so pairs
// are laid out as it wants them: keys as (d 2p, 2p + 1) pairs [d / 2][WIDE_KEYS], values as (key 2q, 2q + 1)
// pairs [WIDE_KEYS / 2][d], queries as their own bf16 pairs (the scale goes onto the float32 scores). The
// softmax weights are rounded to bf16 for the values' products (as flash attention kernels do); their sum,
// the max and every accumulator stay float32.
template <int HEAD_DIM>
struct Bf16PairTile {
  static constexpr int64_t d = HEAD_DIM, ROW_BLOCK = row_block<HEAD_DIM>();
  static_assert(HEAD_DIM % 32 == 0 && LANES == 16, "a bf16 pair tile holds d as whole 32-element vectors");
  uint32_t* __restrict__ queries;  // [rows][d / 2] bf16 pairs
  uint32_t* __restrict__ keys_p;   // [d / 2][WIDE_KEYS] pairs of one key
  uint32_t* __restrict__ values_p; // [WIDE_KEYS / 2][d] pairs of two keys
  float scale;

  Bf16PairTile(float* work, int64_t num_rows)
      : queries(reinterpret_cast<uint32_t*>(work)), keys_p(queries + num_rows * d / 2),
        values_p(keys_p + WIDE_KEYS * d / 2), scale(1.0f) {}

  void load_query(int64_t r, const c10::BFloat16* head, float query_scale) {
    std::memcpy(queries + r * d / 2, head, d * sizeof(c10::BFloat16));
    scale = query_scale;
  }

  void gather(const c10::BFloat16* const* keys, const c10::BFloat16* const* vals, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t* key = reinterpret_cast<const uint32_t*>(keys[j]);
      for (int64_t p = 0; p < d / 2; ++p) keys_p[p * WIDE_KEYS + j] = key[p];
    }
    for (int64_t j = n; j < WIDE_KEYS; ++j)
      for (int64_t p = 0; p < d / 2; ++p) keys_p[p * WIDE_KEYS + j] = 0;
    for (int64_t q = 0; q < WIDE_KEYS / 2; ++q) {
      const uint16_t* even = 2 * q < n ? reinterpret_cast<const uint16_t*>(vals[2 * q]) : nullptr;
      const uint16_t* odd = 2 * q + 1 < n ? reinterpret_cast<const uint16_t*>(vals[2 * q + 1]) : nullptr;
      for (int64_t i = 0; i < d; ++i)
        values_p[q * d + i] = (even ? even[i] : 0u) | (odd ? uint32_t(odd[i]) << 16 : 0u);
    }
  }

  void score(const int64_t* rows, lanes_t (&lanes)[ROW_BLOCK][WIDE_KEYS / LANES]) const {
    __m512 acc[ROW_BLOCK][WIDE_KEYS / LANES];
#pragma GCC unroll 8
    for (int64_t b = 0; b < ROW_BLOCK; ++b)
#pragma GCC unroll 8
      for (int64_t v = 0; v < WIDE_KEYS / LANES; ++v) acc[b][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < d / 2; ++p) {
      __m512bh keys[WIDE_KEYS / LANES];
#pragma GCC unroll 8
      for (int64_t v = 0; v < WIDE_KEYS / LANES; ++v)
        keys[v] = (__m512bh)_mm512_loadu_si512(keys_p + p * WIDE_KEYS + v * LANES);
#pragma GCC unroll 8
      for (int64_t b = 0; b < ROW_BLOCK; ++b) {
        const __m512bh pair = (__m512bh)_mm512_set1_epi32(static_cast<int>(queries[rows[b] * d / 2 + p]));
#pragma GCC unroll 8
        for (int64_t v = 0; v < WIDE_KEYS / LANES; ++v) acc[b][v] = _mm512_dpbf16_ps(acc[b][v], pair, keys[v]);
      }
    }
#pragma GCC unroll 8
    for (int64_t b = 0; b < ROW_BLOCK; ++b)
#pragma GCC unroll 8
      for (int64_t v = 0; v < WIDE_KEYS / LANES; ++v) lanes[b][v] = (lanes_t)_mm512_mul_ps(acc[b][v], _mm512_set1_ps(scale));
  }

  void add_values(const float (&weights)[ROW_BLOCK][WIDE_KEYS], int64_t num_keys,
                  lanes_t (&sums)[ROW_BLOCK][d / LANES]) const {
    uint32_t pairs[ROW_BLOCK][WIDE_KEYS / 2];  // each row's weights as bf16 pairs (round to nearest even)
    for (int64_t b = 0; b < ROW_BLOCK; ++b)
#pragma GCC unroll 4
      for (int64_t v = 0; v < WIDE_KEYS / LANES; ++v)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pairs[b] + v * 8),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(weights[b] + v * LANES)));
    __m512 acc[ROW_BLOCK][d / LANES];
#pragma GCC unroll 8
    for (int64_t b = 0; b < ROW_BLOCK; ++b)
#pragma GCC unroll 8
      for (int64_t v = 0; v < d / LANES; ++v) acc[b][v] = (__m512)sums[b][v];
    for (int64_t q = 0; q < (num_keys + 1) / 2; ++q) {
      __m512bh value[d / LANES];
#pragma GCC unroll 8
      for (int64_t v = 0; v < d / LANES; ++v) value[v] = (__m512bh)_mm512_loadu_si512(values_p + q * d + v * LANES);
#pragma GCC unroll 8
      for (int64_t b = 0; b < ROW_BLOCK; ++b) {
        const __m512bh pair = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[b][q]));
#pragma GCC unroll 8
        for (int64_t v = 0; v < d / LANES; ++v) acc[b][v] = _mm512_dpbf16_ps(acc[b][v], pair, value[v]);
      }
    }
#pragma GCC unroll 8
    for (int64_t b = 0; b < ROW_BLOCK; ++b)
#pragma GCC unroll 8
      for (int64_t v = 0; v < d / LANES; ++v) sums[b][v] = (lanes_t)acc[b][v];
  }
};
#endif

// One work item of many rows (prompt chunks, verifications of many guesses; head_dim fixed at compile time),
// through a Tile (Float32Tile, or Bf16PairTile where the CPU has AVX512-BF16). Keys go in tiles of
// WIDE_KEYS across cache blocks, gathered once per item and tile; then the rows, ROW_BLOCK at a time so
// each loaded key or value vector serves every row of the block, score the whole tile into registers,
// update their online softmax once per tile, and add the values into accumulators held in registers. A row
// skips the tiles its causal limit hides. `work` holds rows * d (queries) + rows * d (accumulators)
// + 2 * WIDE_KEYS * d (the tile) floats.
template <typename Tile, typename scalar_t>
void attend_wide(const Shape& s, const scalar_t* q_rows, int64_t num_queries, const scalar_t* k_cache,
                 const scalar_t* v_cache, const int64_t* table, int64_t context_len, int64_t kv_head,
                 scalar_t* out_rows, float* work) {
  constexpr int64_t d = Tile::d, ROW_BLOCK = Tile::ROW_BLOCK;
  const int64_t group = s.group, num_rows = num_queries * group, first_limit = context_len - num_queries + 1;
  float* __restrict__ acc = work;
  Tile tile(work + num_rows * d, num_rows);
  float running_max[MAX_ROWS], running_sum[MAX_ROWS];  // num_rows <= MAX_ROWS (chunks)
  for (int64_t r = 0; r < num_rows; ++r) {
    tile.load_query(r, q_rows + (r / group) * s.q_row_stride + (kv_head * group + r % group) * s.q_head_stride,
                    s.scale);
    std::fill(acc + r * d, acc + (r + 1) * d, 0.0f);
    running_max[r] = -std::numeric_limits<float>::infinity();
    running_sum[r] = 0.0f;
  }
  const scalar_t* keys[WIDE_KEYS];
  const scalar_t* vals[WIDE_KEYS];
  for (int64_t pos = 0; pos < context_len; pos += WIDE_KEYS) {
    const int64_t n = std::min(WIDE_KEYS, context_len - pos);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t p = pos + j, slot = table[p / s.block_size] * s.block_size + p % s.block_size;
      keys[j] = k_cache + (slot * s.num_kv_heads + kv_head) * d;
      vals[j] = v_cache + (slot * s.num_kv_heads + kv_head) * d;
    }
    tile.gather(keys, vals, n);
    // Row r sees keys of this tile when first_limit + r / group > pos: the rows from that one on. A last,
    // short block computes its missing rows as copies of its last row and keeps nothing of them.
    for (int64_t first = std::max<int64_t>(0, (pos - first_limit + 1) * group); first < num_rows; first += ROW_BLOCK) {
      const int64_t block_rows = std::min(ROW_BLOCK, num_rows - first);
      int64_t rows[ROW_BLOCK], seen[ROW_BLOCK];
      for (int64_t b = 0; b < ROW_BLOCK; ++b) {
        rows[b] = first + std::min(b, block_rows - 1);
        seen[b] = std::min(n, first_limit + rows[b] / group - pos);
      }
      lanes_t lanes[ROW_BLOCK][WIDE_KEYS / LANES] = {};
      tile.score(rows, lanes);
      float weights[ROW_BLOCK][WIDE_KEYS], correction[ROW_BLOCK];
      int64_t max_seen = 0;
      for (int64_t b = 0; b < ROW_BLOCK; ++b) {
        if (b < block_rows) {
          float scores[WIDE_KEYS];
          std::memcpy(scores, lanes[b], sizeof(scores));
          correction[b] = softmax_tile(scores, seen[b], pos == 0, running_max[rows[b]], running_sum[rows[b]],
                                       weights[b]);
          max_seen = std::max(max_seen, seen[b]);
        } else {  // a copy: weighed like its row, kept nowhere
          std::memcpy(weights[b], weights[block_rows - 1], sizeof(weights[b]));
          correction[b] = correction[block_rows - 1];
        }
      }
      // The rows' accumulators (weights past a row's `seen` are 0, so every row may take max_seen keys).
      lanes_t sums[ROW_BLOCK][d / LANES];
#pragma GCC unroll 8
      for (int64_t b = 0; b < ROW_BLOCK; ++b)
#pragma GCC unroll 8
        for (int64_t v = 0; v < d / LANES; ++v) sums[b][v] = load_lanes(acc + rows[b] * d + v * LANES) * correction[b];
      tile.add_values(weights, max_seen, sums);
      for (int64_t b = 0; b < block_rows; ++b) std::memcpy(acc + rows[b] * d, sums[b], sizeof(sums[b]));
    }
  }
  for (int64_t r = 0; r < num_rows; ++r) {
    const float inverse = context_len > 0 ? 1.0f / running_sum[r] : 0.0f;
    scalar_t* out = out_rows + (r / group) * s.num_heads * d + (kv_head * group + r % group) * d;
    const float* a = acc + r * d;
    for (int64_t i = 0; i < d; ++i) out[i] = static_cast<scalar_t>(a[i] * inverse);
  }
}

// The many-rows path for this dtype and head_dim, or nullptr (then the few-rows path takes every item).
template <typename scalar_t>
auto wide_path(int64_t head_dim) -> decltype(&attend_wide<Float32Tile<scalar_t, 64>, scalar_t>) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (head_dim == 64) return &attend_wide<Bf16PairTile<64>, scalar_t>;
    if (head_dim == 128) return &attend_wide<Bf16PairTile<128>, scalar_t>;
  }
#endif
  if (head_dim == 64) return &attend_wide<Float32Tile<scalar_t, 64>, scalar_t>;
  if (head_dim == 128) return &attend_wide<Float32Tile<scalar_t, 128>, scalar_t>;
  return nullptr;
}

// Consecutive query tokens of one sequence attended as one work item per KV head.
struct Chunk {
  int64_t seq, first_query, num_queries;
};

// Every row's K/V to its slot (the reference's two index_copy_, in one pass).
template <typename scalar_t>
void write_cache(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& slot_mapping) {
  const int64_t num_rows = k.size(0), num_kv_heads = k.size(1), d = k.size(2);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const scalar_t* k_data = k.data_ptr<scalar_t>();
  const scalar_t* v_data = v.data_ptr<scalar_t>();
  scalar_t* k_out = k_cache.data_ptr<scalar_t>();
  scalar_t* v_out = v_cache.data_ptr<scalar_t>();
  for (int64_t t = 0; t < num_rows; ++t) {
    const int64_t slot = slots[t];
    TORCH_CHECK(slot >= 0 && slot < num_slots, "slot_mapping[", t, "] = ", slot, " is outside the cache's ",
                num_slots, " slots");
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      std::memcpy(k_out + (slot * num_kv_heads + h) * d, k_data + t * k.stride(0) + h * k.stride(1), d * sizeof(scalar_t));
      std::memcpy(v_out + (slot * num_kv_heads + h) * d, v_data + t * v.stride(0) + h * v.stride(1), d * sizeof(scalar_t));
    }
  }
}

// Strided rows are fine; each head's d elements must be contiguous.
at::Tensor rows_of_heads(const at::Tensor& x) { return x.stride(2) == 1 ? x : x.contiguous(); }

at::Tensor paged_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, at::Tensor k_cache,
                           at::Tensor v_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables_in,
                           const at::Tensor& context_lens_in, const at::Tensor& cu_seqlens_q_in, int64_t num_seqs,
                           int64_t num_tokens, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3 && v_in.dim() == 3, "q, k, v must be [T, heads, head_dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes(), "caches must be contiguous [blocks, block_size, kv_heads, head_dim]");
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(k_in.scalar_type() == dtype && v_in.scalar_type() == dtype && k_cache.scalar_type() == dtype &&
                  v_cache.scalar_type() == dtype, "q, k, v and the caches must share one dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && block_tables_in.scalar_type() == at::kLong &&
                  context_lens_in.scalar_type() == at::kLong && cu_seqlens_q_in.scalar_type() == at::kLong,
              "slot_mapping, block_tables, context_lens, cu_seqlens_q must be int64");
  const at::Tensor q = rows_of_heads(q_in), k = rows_of_heads(k_in), v = rows_of_heads(v_in);
  const at::Tensor slots = slot_mapping.contiguous(), context_lens = context_lens_in.contiguous();
  const at::Tensor cu_seqlens_q = cu_seqlens_q_in.contiguous();
  const at::Tensor block_tables = block_tables_in.stride(1) == 1 ? block_tables_in : block_tables_in.contiguous();
  const int64_t num_rows = q.size(0), num_heads = q.size(1), d = q.size(2), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k.size(0) == num_rows && v.size(0) == num_rows && slots.size(0) == num_rows,
              "q, k, v and slot_mapping need one row per token");
  TORCH_CHECK(k.size(1) == num_kv_heads && v.size(1) == num_kv_heads && k.size(2) == d && v.size(2) == d &&
                  k_cache.size(3) == d, "k, v and the caches disagree on kv_heads or head_dim");
  TORCH_CHECK(num_heads % num_kv_heads == 0 && num_heads / num_kv_heads <= MAX_ROWS, "heads must be a multiple "
              "(at most ", MAX_ROWS, "x) of kv_heads");
  const int64_t group = num_heads / num_kv_heads;
  TORCH_CHECK(0 <= num_seqs && num_tokens <= num_rows && num_seqs <= block_tables.size(0) &&
                  num_seqs <= context_lens.size(0) && num_seqs < cu_seqlens_q.size(0),
              "need num_tokens <= rows, and a table, a length and a cu_seqlens_q entry per attended sequence");
  const int64_t block_size = k_cache.size(1), max_blocks = block_tables.size(1), num_blocks = k_cache.size(0);
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* cu = cu_seqlens_q.data_ptr<int64_t>();
  const int64_t max_chunk_queries = MAX_ROWS / group;  // >= 1: group <= MAX_ROWS, checked above
  std::vector<Chunk> chunks;
  TORCH_CHECK(cu[0] == 0, "cu_seqlens_q[0] must be 0");
  for (int64_t seq = 0; seq < num_seqs; ++seq) {  // never read past a table, a row or outside the cache
    const int64_t num_queries = cu[seq + 1] - cu[seq];
    TORCH_CHECK(num_queries >= 0 && cu[seq + 1] <= num_tokens && num_queries <= lens[seq], "sequence ", seq, ": ",
                num_queries, " queries (rows ", cu[seq], " to ", cu[seq + 1], " of ", num_tokens, ", context ",
                lens[seq], ") do not fit");
    // Equal chunks (114 queries of 3 heads: 57 + 57, not 85 + 29), so items weigh alike.
    const int64_t num_chunks = (num_queries + max_chunk_queries - 1) / max_chunk_queries;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t first = num_queries * c / num_chunks;
      chunks.push_back({seq, first, num_queries * (c + 1) / num_chunks - first});
    }
    TORCH_CHECK(lens[seq] >= 0 && lens[seq] <= max_blocks * block_size, "context_lens[", seq, "] = ", lens[seq],
                " does not fit its block table");
    for (int64_t b = 0; b < (lens[seq] + block_size - 1) / block_size; ++b) {
      const int64_t block = tables[seq * block_tables.stride(0) + b];
      TORCH_CHECK(block >= 0 && block < num_blocks, "block_tables[", seq, ", ", b, "] = ", block, " is not a block");
    }
  }

  at::Tensor out = at::empty({num_rows, num_heads * d}, q.options());
  if (num_tokens < num_rows) out.narrow(0, num_tokens, num_rows - num_tokens).zero_();
  const Shape shape{num_heads, num_kv_heads, d, group, block_size,
                    q.stride(0), q.stride(1), block_tables.stride(0), static_cast<float>(scale)};
  int64_t max_item_queries = 0;
  for (const Chunk& chunk : chunks) max_item_queries = std::max(max_item_queries, chunk.num_queries);
  const int64_t max_item_rows = max_item_queries * group;
  const int64_t work_floats = 2 * max_item_rows * d + 2 * max_item_rows * TILE_KEYS + 2 * std::max(TILE_KEYS, WIDE_KEYS) * d;
  const int64_t num_items = static_cast<int64_t>(chunks.size()) * num_kv_heads;
  const int64_t num_lanes = std::min<int64_t>(std::max<int64_t>(num_items, 1), at::get_num_threads());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "paged_attention", [&] {
    write_cache<scalar_t>(k, v, k_cache, v_cache, slots);
    const scalar_t* q_data = q.data_ptr<scalar_t>();
    const scalar_t* k_data = k_cache.data_ptr<scalar_t>();
    const scalar_t* v_data = v_cache.data_ptr<scalar_t>();
    scalar_t* out_data = out.data_ptr<scalar_t>();
    auto attend = d == 64 ? &attend_one<scalar_t, 64> : d == 128 ? &attend_one<scalar_t, 128> : &attend_one<scalar_t, 0>;
    auto wide = wide_path<scalar_t>(d);
    auto attend_many = wide ? wide : attend;
    // Each lane (a thread of torch's pool) takes the next item until none is left: items differ in weight
    // (a causal prompt's later chunks see more keys), so a fixed split would leave one thread the heavy end.
    std::atomic<int64_t> next_item{0};
    at::parallel_for(0, num_lanes, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> work(work_floats);
      for (int64_t lane = begin; lane < end; ++lane) {
        for (int64_t item = next_item++; item < num_items; item = next_item++) {
          const Chunk& chunk = chunks[item / num_kv_heads];
          const int64_t kv_head = item % num_kv_heads, row = cu[chunk.seq] + chunk.first_query;
          const int64_t num_queries = cu[chunk.seq + 1] - cu[chunk.seq];
          // The chunk's last query sees this many keys (the sequence's last query sees them all).
          const int64_t visible = lens[chunk.seq] - num_queries + chunk.first_query + chunk.num_queries;
          (chunk.num_queries * group >= WIDE_MIN_ROWS ? attend_many : attend)(
                 shape, q_data + row * shape.q_row_stride, chunk.num_queries, k_data, v_data,
                 tables + chunk.seq * shape.tables_row_stride, visible, kv_head, out_data + row * num_heads * d,
                 work.data());
        }
      }
    });
  });
  return out;
}

// Which many-rows path this build runs for `dtype`: "bf16-pairs" (vdpbf16ps, AVX512-BF16 builds, bf16 caches,
// head_dim 64 / 128), "float32" (any other) or "none" (other head dims: every item takes the few-rows path).
std::string long_query_path(at::ScalarType dtype, int64_t head_dim) {
  std::string path = "none";
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "long_query_path", [&] {
    auto wide = wide_path<scalar_t>(head_dim);
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (wide == &attend_wide<Bf16PairTile<64>, scalar_t> || wide == &attend_wide<Bf16PairTile<128>, scalar_t>) {
        path = "bf16-pairs";
        return;
      }
    }
#endif
    if (wide) path = "float32";
  });
  return path;
}

}  // namespace

TORCH_LIBRARY(tgserve_cpu_attention, m) {
  m.def("long_query_path(ScalarType dtype, int head_dim) -> str", &long_query_path);
  m.def("paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
        "Tensor block_tables, Tensor context_lens, Tensor cu_seqlens_q, int num_seqs, int num_tokens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tgserve_cpu_attention, CPU, m) { m.impl("paged_attention", &paged_attention); }
