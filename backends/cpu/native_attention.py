"""The cpu backend's native paged attention: short queries through native/paged_attention.cpp, long ones too
where the library has a fast path for them, else as the core's.

The core's reference decode (core/layers/attention.py) gathers every decode sequence's K/V blocks,
copies them to float32, and runs baddbmm / softmax / bmm: ~176 us per layer at 48 keys for a
Qwen2-0.5B shape (14 heads, 2 KV heads, head_dim 64), 4.2 ms of a 24-layer step, almost all op
overhead and copies. The native op writes the step's K/V and attends each short query straight from
its cache blocks in one call: decode rows, and speculative verifications (the last token plus up to
MAX_QUERIES - 1 guesses). Those the reference would send to its prefill path, which gathers the whole
context per layer and runs a padded, masked SDPA: on SmolLM2-135M bf16 at batch 16 (Zen 5), a step with
one verifying sequence among 15 decodes cost 43 ms against 32 ms for 16 decodes, almost all of it that
path. Longer queries (prompts and their chunks) go to the op as well where its long-query path is
"bf16-pairs" (a bf16 cache on a CPU with AVX512-BF16: two bf16 products per float32 lane and
instruction): 8 conversation turns of 114 new tokens over 1,424 cached keys took 18-21 ms per layer
there against SDPA's 32-38 ms (SmolLM2-135M shape, Zen 5, 2 threads). Elsewhere its float32 path was no
faster than SDPA (AVX2 build: 60 against 54 ms), so long queries keep the reference's SDPA: their K/V is
already written by the op, and their output rows are copied into the op's result. The scheduler orders a
step's sequences by query length, so the short ones lead.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tgserve.core.forward_batch import ForwardBatch
from tgserve.core.layers.attention import TorchPagedAttention

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_GROUP = 256  # query heads per KV head the op takes (its MAX_ROWS: one query token's rows fill a work item)
MAX_QUERIES = 16  # the longest query the op attends where its long-query path is not fast: a verification of 15 guesses
FAST_LONG_QUERY_PATHS = ("bf16-pairs",)  # the op's long-query paths that beat the reference's SDPA


@dataclass(slots=True)
class NativeAttentionMetadata:
    num_short_seqs: int  # host int, the leading sequences the op attends (query_len <= max_queries)
    first_prefill_token: int  # host int, the first row of the later sequences (cu_seqlens_q[num_short_seqs])
    # The reference's prefill layout (TorchAttentionMetadata's fields of the same names); None: no prefill rows.
    unpad_index: torch.Tensor | None  # int64 [T - first_prefill_token]
    prefill_mask: torch.Tensor | None  # bool [S_prefill, 1, max_q, max_prefill_ctx]


class NativePagedAttention(TorchPagedAttention):
    """TorchPagedAttention with the cache write and the short queries in one native op per layer."""

    name = "cpu-native-paged-attention"

    def __init__(self, ops, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 max_queries: int | None = MAX_QUERIES):
        super().__init__(num_heads, num_kv_heads, head_dim, block_size)
        self.ops = ops  # torch.ops.tgserve_cpu_attention of the loaded library
        self.max_queries = max_queries  # None: the op attends every query, however long

    def prepare(self, batch: ForwardBatch) -> NativeAttentionMetadata:
        """The leading run of short queries for the op (host ints from the batch's host-side tensors: this
        backend's "device" is the host); the rest in the reference's prefill layout."""
        num_short, first_token = batch.num_seqs, batch.num_tokens
        if self.max_queries is not None and batch.max_query_len > self.max_queries:
            is_long = batch.query_lens[:batch.num_seqs] > self.max_queries
            num_short = int(is_long.int().argmax())  # the first long query (there is one)
            first_token = int(batch.cu_seqlens_q[num_short])
        unpad_index = prefill_mask = None
        if num_short < batch.num_seqs:
            unpad_index, prefill_mask = self._prefill_layout(batch, num_short, first_token)
        return NativeAttentionMetadata(num_short, first_token, unpad_index, prefill_mask)

    def forward(self, q, k, v, layer_cache, batch):
        meta: NativeAttentionMetadata = batch.attention
        k_cache, v_cache = layer_cache
        # [T, heads * d]: short queries done, padding rows zero, prefill rows filled below.
        out = self.ops.paged_attention(q, k, v, k_cache, v_cache, batch.slot_mapping, batch.block_tables,
                                       batch.context_lens, batch.cu_seqlens_q, meta.num_short_seqs, batch.num_tokens,
                                       self.scale)
        if meta.prefill_mask is not None:
            first_seq, first_token = meta.num_short_seqs, meta.first_prefill_token
            tables, ctx = batch.block_tables[first_seq:batch.num_seqs], batch.max_prefill_context_len
            out[first_token:batch.num_tokens] = self._prefill(
                q[first_token:batch.num_tokens], self._gather(k_cache, tables, ctx),
                self._gather(v_cache, tables, ctx), meta)
        return out


def make_native_attention(ops, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                          dtype: torch.dtype) -> NativePagedAttention | None:
    """The native attention where it takes this model and dtype and passes the start-up probe, else None."""
    if ops is None or dtype not in DTYPES or num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_GROUP:
        return None
    if not is_usable(ops, dtype, head_dim):
        return None
    is_long_fast = ops.long_query_path(dtype, head_dim) in FAST_LONG_QUERY_PATHS
    return NativePagedAttention(ops, num_heads, num_kv_heads, head_dim, block_size,
                                max_queries=None if is_long_fast else MAX_QUERIES)


# The probe's bound, of the reference output's largest magnitude: float32 differs only in summation order
# and the softmax's exp (~1e-6); bf16 / fp16 outputs by one rounding of the result.
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@functools.cache
def is_usable(ops, dtype: torch.dtype, head_dim: int = 64) -> bool:
    """Start-up probe, once per library and dtype: a GQA step (two decodes of contexts 1 and 6, a 3-token
    verification ending at 21 keys, a 140-token prompt chunk after 10 cached tokens: two work items per KV
    head, on the op's many-rows path; blocks of 4, tables scattered, a padding row), every query through the
    op, against the reference, each on its own copy of one random cache; the model's head_dim, which picks
    the op's many-rows path."""
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, block_size = 4, 2, 4
    context_lens = torch.tensor([1, 6, 21, 150, 0])  # the last: a padding sequence
    query_lens = torch.tensor([1, 1, 3, 140, 0])
    max_blocks, num_tokens = 38, int(query_lens.sum())
    tables = torch.randperm(160, generator=generator)[:4 * max_blocks].view(4, max_blocks) + 1  # block 0: padding
    tables = torch.cat([tables, torch.zeros(1, max_blocks, dtype=torch.int64)])
    seq_of_token = torch.repeat_interleave(torch.arange(5), query_lens)
    cu_seqlens_q = torch.cat([torch.zeros(1, dtype=torch.int64), query_lens.cumsum(0)])
    positions = context_lens[seq_of_token] - query_lens[seq_of_token] + torch.arange(num_tokens) - cu_seqlens_q[seq_of_token]
    slots = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    batch = ForwardBatch(
        input_ids=torch.zeros(num_tokens + 1, dtype=torch.int64), positions=torch.cat([positions, torch.tensor([0])]),
        slot_mapping=torch.cat([slots, torch.tensor([0])]), block_tables=tables, context_lens=context_lens,
        query_lens=query_lens, cu_seqlens_q=cu_seqlens_q, logits_indices=cu_seqlens_q[1:4] - 1,
        max_query_len=140, max_context_len=150, num_decode_seqs=2, max_decode_context_len=6,
        max_prefill_context_len=150, num_tokens=num_tokens, num_seqs=4)
    q, k, v = (torch.randn(num_tokens + 1, n, head_dim, generator=generator).to(dtype)
               for n in (heads, kv_heads, kv_heads))
    cache = torch.randn(2, 161, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    outputs = []
    for attention in (NativePagedAttention(ops, heads, kv_heads, head_dim, block_size, max_queries=None),
                      TorchPagedAttention(heads, kv_heads, head_dim, block_size)):
        batch.attention = attention.prepare(batch)
        layer_cache = cache.clone()
        try:
            outputs.append(attention.forward(q, k, v, (layer_cache[0], layer_cache[1]), batch).float())
        except RuntimeError:  # the library refused its own inputs: a bug, but not a reason to stop serving
            return False
    native, reference = outputs
    return bool((native - reference).abs().max() <= PROBE_TOLERANCE[dtype] * reference.abs().max())
