"""TorchPagedAttention against plain per-sequence causal attention, for decode, prefill and mixed steps."""
from __future__ import annotations

import pytest
import torch

from tgserve.core.forward_batch import ForwardBatch
from tgserve.core.layers.attention import TorchPagedAttention

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 8, 4, 64


def _run_step(seqs: list[tuple[int, int]], dtype: torch.dtype):
    """seqs: (tokens already cached, tokens computed this step) per sequence, decode rows first.

    Returns our output [T, heads * d] and the reference computed sequence by sequence."""
    generator = torch.Generator().manual_seed(len(seqs))
    attention = TorchPagedAttention(HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE)
    k_cache = torch.zeros(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    free_blocks = iter(torch.randperm(NUM_BLOCKS, generator=generator).tolist())  # scattered on purpose
    tables, slots, positions, qs, ks, vs, expected = [], [], [], [], [], [], []
    for cached, new in seqs:
        total = cached + new
        table = [next(free_blocks) for _ in range(-(-total // BLOCK_SIZE))]
        keys = torch.randn(total, KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
        values = torch.randn(total, KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
        query = torch.randn(new, HEADS, HEAD_DIM, generator=generator).to(dtype)
        seq_slots = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(total)]
        k_cache.view(-1, KV_HEADS, HEAD_DIM)[seq_slots[:cached]] = keys[:cached]
        v_cache.view(-1, KV_HEADS, HEAD_DIM)[seq_slots[:cached]] = values[:cached]
        tables.append(table)
        slots += seq_slots[cached:]
        positions += list(range(cached, total))
        qs.append(query), ks.append(keys[cached:]), vs.append(values[cached:])
        expected.append(_reference(query, keys, values, cached))
    width = max(len(t) for t in tables)
    query_lens = torch.tensor([n for _, n in seqs])
    context_lens = torch.tensor([c + n for c, n in seqs])
    num_decode = next((i for i, (_, n) in enumerate(seqs) if n != 1), len(seqs))
    batch = ForwardBatch(
        input_ids=torch.zeros(len(positions), dtype=torch.int64), positions=torch.tensor(positions),
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        context_lens=context_lens, query_lens=query_lens,
        cu_seqlens_q=torch.nn.functional.pad(query_lens.cumsum(0), (1, 0)), logits_indices=torch.zeros(0),
        max_query_len=int(query_lens.max()), max_context_len=int(context_lens.max()), num_decode_seqs=num_decode,
        max_decode_context_len=int(context_lens[:num_decode].max()) if num_decode else 0,
        max_prefill_context_len=int(context_lens[num_decode:].max()) if num_decode < len(seqs) else 0,
        num_tokens=len(positions), num_seqs=len(seqs))
    batch.attention = attention.prepare(batch)
    out = attention.forward(torch.cat(qs), torch.cat(ks), torch.cat(vs), (k_cache, v_cache), batch)
    return out, torch.cat(expected)


def _reference(query, keys, values, cached):
    """Causal attention of one sequence in float32: query i sits at position cached + i."""
    q, k, v = query.float(), keys.float(), values.float()
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * HEAD_DIM ** -0.5
    query_pos = torch.arange(cached, cached + q.shape[0]).view(-1, 1)
    scores = scores.masked_fill(torch.arange(k.shape[0]).view(1, -1) > query_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(q.shape[0], -1)


STEPS = {
    "decode only, ragged contexts": [(0, 1), (6, 1), (13, 1)],
    "fresh prefills, ragged": [(0, 5), (0, 9)],
    "chunked prefill after cached tokens": [(8, 6)],
    "mixed: decodes then prefills": [(3, 1), (17, 1), (0, 7), (5, 4), (0, 2)],
    "mixed: long decode beside short prefill": [(30, 1), (0, 3)],
}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_per_sequence_attention(step, dtype):
    out, expected = _run_step(STEPS[step], dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)

