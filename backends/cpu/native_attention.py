"""The cpu backend's native paged attention: decode rows through native/paged_attention.cpp, the rest as the core's.

The core's reference decode (core/layers/attention.py) gathers every decode sequence's K/V blocks,
copies them to float32, and runs baddbmm / softmax / bmm: ~176 us per layer at 48 keys for a
Qwen2-0.5B shape (14 heads, 2 KV heads, head_dim 64), 4.2 ms of a 24-layer step, almost all op
overhead and copies. The native op writes the step's K/V and attends each decode row straight from
its cache blocks in one call. Prefill and chunked-prefill rows (and any row that computes more than
one token) keep the reference's SDPA path: their K/V is already written by the op, and their output
rows are copied into the op's result.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tgserve.core.forward_batch import ForwardBatch
from tgserve.core.layers.attention import TorchPagedAttention

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_GROUP = 256  # query heads per KV head the op takes (native/paged_attention.cpp)


@dataclass(slots=True)
class NativeAttentionMetadata:
    num_decode_seqs: int  # host int, the leading sequences that compute one token each
    # The reference's prefill layout (TorchAttentionMetadata's fields of the same names); None: no prefill rows.
    unpad_index: torch.Tensor | None  # int64 [T - num_decode_seqs]
    prefill_mask: torch.Tensor | None  # bool [S_prefill, 1, max_q, max_prefill_ctx]


class NativePagedAttention(TorchPagedAttention):
    """TorchPagedAttention with the cache write and the decode rows in one native op per layer."""

    name = "cpu-native-paged-attention"

    def __init__(self, ops, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int):
        super().__init__(num_heads, num_kv_heads, head_dim, block_size)
        self.ops = ops  # torch.ops.tgserve_cpu_attention of the loaded library

    def prepare(self, batch: ForwardBatch) -> NativeAttentionMetadata:
        """Decode rows need nothing beyond the batch's tables and lengths; prefill rows the reference's layout."""
        num_decode = batch.num_decode_seqs
        unpad_index = prefill_mask = None
        if num_decode < batch.num_seqs:
            unpad_index, prefill_mask = self._prefill_layout(batch, num_decode)
        return NativeAttentionMetadata(num_decode, unpad_index, prefill_mask)

    def forward(self, q, k, v, layer_cache, batch):
        meta: NativeAttentionMetadata = batch.attention
        k_cache, v_cache = layer_cache
        # [T, heads * d]: decode rows done, padding rows zero, prefill rows filled below.
        out = self.ops.paged_attention(q, k, v, k_cache, v_cache, batch.slot_mapping, batch.block_tables,
                                       batch.context_lens, meta.num_decode_seqs, batch.num_tokens, self.scale)
        if meta.prefill_mask is not None:
            num_decode = meta.num_decode_seqs
            tables, ctx = batch.block_tables[num_decode:batch.num_seqs], batch.max_prefill_context_len
            out[num_decode:batch.num_tokens] = self._prefill(
                q[num_decode:batch.num_tokens], self._gather(k_cache, tables, ctx), self._gather(v_cache, tables, ctx),
                meta)
        return out


def make_native_attention(ops, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                          dtype: torch.dtype) -> NativePagedAttention | None:
    """The native attention where it takes this model and dtype and passes the start-up probe, else None."""
    if ops is None or dtype not in DTYPES or num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_GROUP:
        return None
    if not is_usable(ops, dtype):
        return None
    return NativePagedAttention(ops, num_heads, num_kv_heads, head_dim, block_size)


# The probe's bound, of the reference output's largest magnitude: float32 differs only in summation order
# and the softmax's exp (~1e-6); bf16 / fp16 outputs by one rounding of the result.
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@functools.cache
def is_usable(ops, dtype: torch.dtype) -> bool:
    """Start-up probe, once per library and dtype: a GQA decode step (contexts 1, 6 and 21 in blocks of 4,
    tables scattered, a padding row) against the reference, each on its own copy of one random cache."""
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, block_size = 4, 2, 16, 4
    context_lens = torch.tensor([1, 6, 21, 0])  # the last: a padding sequence
    tables = torch.randperm(24, generator=generator)[:18].view(3, 6) + 1  # block 0: the padding rows'
    tables = torch.cat([tables, torch.zeros(1, 6, dtype=torch.int64)])
    last = (context_lens[:3] - 1).clamp(min=0)
    slots = torch.cat([tables[torch.arange(3), last // block_size] * block_size + last % block_size, torch.tensor([0])])
    batch = ForwardBatch(
        input_ids=torch.zeros(4, dtype=torch.int64), positions=torch.cat([last, torch.tensor([0])]),
        slot_mapping=slots, block_tables=tables, context_lens=context_lens, query_lens=torch.tensor([1, 1, 1, 0]),
        cu_seqlens_q=torch.tensor([0, 1, 2, 3, 3]), logits_indices=torch.arange(3), max_query_len=1,
        max_context_len=21, num_decode_seqs=3, max_decode_context_len=21, max_prefill_context_len=0,
        num_tokens=3, num_seqs=3)
    q, k, v = (torch.randn(4, n, head_dim, generator=generator).to(dtype) for n in (heads, kv_heads, kv_heads))
    cache = torch.randn(2, 25, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    outputs = []
    for attention in (NativePagedAttention(ops, heads, kv_heads, head_dim, block_size),
                      TorchPagedAttention(heads, kv_heads, head_dim, block_size)):
        batch.attention = attention.prepare(batch)
        layer_cache = cache.clone()
        try:
            outputs.append(attention.forward(q, k, v, (layer_cache[0], layer_cache[1]), batch).float())
        except RuntimeError:  # the library refused its own inputs: a bug, but not a reason to stop serving
            return False
    native, reference = outputs
    return bool((native - reference).abs().max() <= PROBE_TOLERANCE[dtype] * reference.abs().max())
