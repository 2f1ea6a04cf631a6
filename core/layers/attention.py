"""Paged attention: write this step's K/V into cache blocks, then attend over each sequence's blocks.

`PagedAttention` is the interface a backend implements (`tgserve_make_attention`); the class here
is the core's reference on plain torch, used by every backend without a faster kernel. One path
serves prefill, chunked prefill and decode: queries are padded to [S, max_query_len], keys gathered
to [S, max_context_len] through the block tables, and a mask keeps each query causal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tgserve.core.batch import ForwardBatch


class PagedAttention:
    """Interface: `prepare` once per step, `forward` once per layer."""

    def prepare(self, batch: ForwardBatch) -> object:
        """Build per-step metadata shared by all layers; stored in `batch.attention`."""
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                layer_cache: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> [T, heads * head_dim]."""
        raise NotImplementedError


@dataclass(slots=True)
class TorchAttentionMetadata:
    unpad_index: torch.Tensor | None  # int64 [T], row of each packed token in the [S * max_q] padded layout
    mask: torch.Tensor  # bool [S, 1, max_q, max_ctx], True where a query may attend to a key
    is_masked_out: torch.Tensor | None  # decode only: ~mask, computed once per step rather than per layer
    is_decode: bool  # every sequence computes one token: T == S, no padding needed


class TorchPagedAttention(PagedAttention):
    """Reference implementation with `scaled_dot_product_attention`; no Python loop over the batch."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.scale = head_dim ** -0.5

    def prepare(self, batch: ForwardBatch) -> TorchAttentionMetadata:
        device = batch.input_ids.device
        num_seqs, num_tokens = batch.query_lens.shape[0], batch.input_ids.shape[0]
        max_q, max_ctx = batch.max_query_len, batch.max_context_len
        if max_q == 1:
            mask = torch.arange(max_ctx, device=device).view(1, max_ctx) < batch.context_lens.view(num_seqs, 1)
            mask = mask.view(num_seqs, 1, 1, max_ctx)
            return TorchAttentionMetadata(unpad_index=None, mask=mask, is_masked_out=~mask, is_decode=True)
        seq_of_token = torch.repeat_interleave(
            torch.arange(num_seqs, device=device), batch.query_lens, output_size=num_tokens)
        offset = torch.arange(num_tokens, device=device) - batch.cu_seqlens_q[seq_of_token]
        unpad_index = seq_of_token * max_q + offset
        # Position of each padded query row; padding rows get -1 and are fixed up below.
        q_pos = torch.full((num_seqs * max_q,), -1, dtype=torch.int64, device=device)
        q_pos = q_pos.index_copy(0, unpad_index, batch.positions).view(num_seqs, max_q, 1)
        k_pos = torch.arange(max_ctx, device=device).view(1, 1, max_ctx)
        mask = (k_pos <= q_pos) & (k_pos < batch.context_lens.view(num_seqs, 1, 1))
        mask = mask | ((q_pos < 0) & (k_pos == 0))  # padding rows see one key, so no row is all -inf
        return TorchAttentionMetadata(unpad_index=unpad_index, mask=mask.unsqueeze(1), is_masked_out=None,
                                      is_decode=False)

    def forward(self, q, k, v, layer_cache, batch):
        meta: TorchAttentionMetadata = batch.attention
        k_cache, v_cache = layer_cache
        k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, k)
        v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, v)
        num_seqs, max_q, max_ctx = batch.query_lens.shape[0], batch.max_query_len, batch.max_context_len
        keys = self._gather(k_cache, batch.block_tables, max_ctx)
        values = self._gather(v_cache, batch.block_tables, max_ctx)
        if meta.is_decode:
            return self._decode(q, keys, values, meta.is_masked_out)
        q_pad = q.new_zeros(num_seqs * max_q, self.num_heads, self.head_dim).index_copy_(0, meta.unpad_index, q)
        q_pad = q_pad.view(num_seqs, max_q, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q_pad, keys, values, attn_mask=meta.mask, scale=self.scale,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        out = out.transpose(1, 2).reshape(num_seqs * max_q, self.num_heads * self.head_dim)
        return out.index_select(0, meta.unpad_index)

    def _decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                is_masked_out: torch.Tensor) -> torch.Tensor:
        """One query per sequence: two batched matmuls beat SDPA's masked CPU kernel ~8x here.

        q [S, heads, d]; keys/values [S, kv_heads, ctx, d]; is_masked_out [S, 1, 1, ctx] -> [S, heads * d].
        Query heads sharing a KV head are stacked as rows, so no K/V is repeated. The matmuls run
        in float32 whatever the cache dtype: these are tiny GEMMs, where torch's bf16 kernels cost
        3x the float32 ones on CPU (18-26 us against 7 us at 14 heads x 160 keys, measured on Zen5),
        more than converting the gathered K/V; a no-op for float32 models.
        """
        num_seqs = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        q = q.view(num_seqs, self.num_kv_heads, group, self.head_dim).float() * self.scale
        scores = torch.matmul(q, keys.float().transpose(-1, -2))  # [S, kv_heads, group, ctx]
        probs = scores.masked_fill_(is_masked_out, float("-inf")).softmax(dim=-1)
        out = torch.matmul(probs, values.float()).to(values.dtype)
        return out.reshape(num_seqs, self.num_heads * self.head_dim)

    def _gather(self, cache: torch.Tensor, block_tables: torch.Tensor, max_ctx: int) -> torch.Tensor:
        """cache [blocks, block_size, kv_heads, d] -> [S, kv_heads, max_ctx, d] for each sequence."""
        num_seqs = block_tables.shape[0]
        gathered = cache[block_tables].view(num_seqs, -1, self.num_kv_heads, self.head_dim)
        return gathered[:, :max_ctx].transpose(1, 2)
