// Paged attention for the cpu backend's short queries (backends/cpu/native_attention.py): one op per layer
// that writes the step's K/V into the cache and attends the rows of the step's leading sequences (decodes:
// one query each; speculative verifications: a few) over each sequence's cache blocks, read in place
// through the block table: no gather copy, no float32 copy of K/V.
//
//   q            [T, heads, d]        rows [0, cu_seqlens_q[num_seqs]) belong to the sequences attended here
//   k, v         [T, kv_heads, d]     every row's K/V goes to the cache at slot_mapping (padding rows: block 0)
//   k/v_cache    [num_blocks, block_size, kv_heads, d], same dtype as q (float32, bf16 or fp16)
//   block_tables int64 [S, max_blocks], context_lens int64 [S] (keys after this step's write),
//   cu_seqlens_q int64 [S + 1] (sequence s computes rows [cu[s], cu[s + 1]): its last positions, causal)
//   -> out       [T, heads * d]: the attended sequences' rows done, rows [num_tokens, T) zero (padding of a
//                bucketed step), rows in between (longer prefills) left for the caller to fill.
//
// Work item = (sequence, kv head): all of its query tokens times the `group` query heads sharing that KV head
// score each key together, so a key is read once per item. Query i of a sequence computing q tokens sees
// keys [0, context_len - q + 1 + i). Keys go in tiles of up to TILE_KEYS that stay inside one cache block;
// per tile and row: scores (fp32), an online-softmax update (running max m, sum l, rescaled accumulators), and
// the values added in. All arithmetic is fp32 whatever the cache dtype. Plain C++ with `omp simd`
// loops: -march (the host's, or haswell for the portable build) picks the vector ISA; nothing here
// needs AVX-512. Threads: torch's own pool (at::parallel_for) over the work items.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t TILE_KEYS = 16;  // keys scored before each softmax update (the cpu backend's block size)
constexpr int64_t MAX_ROWS = 256;  // query tokens x query heads per KV head in one work item (native_attention.py)

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return __builtin_bit_cast(float, uint32_t(x.x) << 16); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// exp(x) for x <= 0 (a score minus its running max), within ~2 ulp: 2^n * p(r), r = x - n ln 2 (Cephes expf).
// Written so `omp simd` loops vectorize it (glibc's expf would run one lane at a time). Below -87 the
// result (< 1.7e-38) is flushed to exp(-87): beside the max's weight 1 it adds nothing.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick: std::floor would keep GCC from vectorizing the loop.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
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

// One (sequence, kv head): the sequence's num_queries query tokens x the `group` query heads of kv_head,
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
  int64_t max_queries = 0;
  TORCH_CHECK(cu[0] == 0, "cu_seqlens_q[0] must be 0");
  for (int64_t seq = 0; seq < num_seqs; ++seq) {  // never read past a table, a row or outside the cache
    const int64_t num_queries = cu[seq + 1] - cu[seq];
    TORCH_CHECK(num_queries >= 0 && cu[seq + 1] <= num_tokens && num_queries <= lens[seq] &&
                    num_queries * group <= MAX_ROWS, "sequence ", seq, ": ", num_queries, " queries (rows ", cu[seq],
                " to ", cu[seq + 1], " of ", num_tokens, ", context ", lens[seq], ") do not fit; at most ",
                MAX_ROWS / group, " queries each");
    max_queries = std::max(max_queries, num_queries);
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
  const int64_t max_item_rows = max_queries * group;
  const int64_t work_floats = 2 * max_item_rows * d + 2 * max_item_rows * TILE_KEYS + 2 * TILE_KEYS * d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "paged_attention", [&] {
    write_cache<scalar_t>(k, v, k_cache, v_cache, slots);
    const scalar_t* q_data = q.data_ptr<scalar_t>();
    const scalar_t* k_data = k_cache.data_ptr<scalar_t>();
    const scalar_t* v_data = v_cache.data_ptr<scalar_t>();
    scalar_t* out_data = out.data_ptr<scalar_t>();
    auto attend = d == 64 ? &attend_one<scalar_t, 64> : d == 128 ? &attend_one<scalar_t, 128> : &attend_one<scalar_t, 0>;
    at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> work(work_floats);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t seq = item / num_kv_heads, kv_head = item % num_kv_heads, row = cu[seq];
        attend(shape, q_data + row * shape.q_row_stride, cu[seq + 1] - row, k_data, v_data,
               tables + seq * shape.tables_row_stride, lens[seq], kv_head, out_data + row * num_heads * d,
               work.data());
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(tgserve_cpu_attention, m) {
  m.def("paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
        "Tensor block_tables, Tensor context_lens, Tensor cu_seqlens_q, int num_seqs, int num_tokens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tgserve_cpu_attention, CPU, m) { m.impl("paged_attention", &paged_attention); }
