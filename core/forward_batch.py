"""The device-side batch of one model forward, built from a `StepPlan` by the model runner."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class ForwardBatch:
    """Device tensors for one model forward, built from a StepPlan by the model runner.

    T = tokens in the step (packed, sequence after sequence), S = sequences in the step.
    """

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T], absolute position of each token in its sequence
    slot_mapping: torch.Tensor  # int64 [T], block_id * block_size + offset where each token's K/V goes
    block_tables: torch.Tensor  # int64 [S, max_blocks_per_seq], padded with block 0
    context_lens: torch.Tensor  # int64 [S], tokens in the KV cache after this step
    query_lens: torch.Tensor  # int64 [S], tokens computed this step
    cu_seqlens_q: torch.Tensor  # int64 [S + 1], prefix sums of query_lens
    logits_indices: torch.Tensor  # int64 [num_logits], rows of the hidden states that need logits
    max_query_len: int  # host int, max(query_lens)
    max_context_len: int  # host int, max(context_lens)
    # Host ints that let attention treat decode rows apart from prefill rows in a mixed step: the
    # first `num_decode_seqs` sequences compute one token each (the runner puts them first).
    num_decode_seqs: int
    max_decode_context_len: int  # max(context_lens[:num_decode_seqs]), 0 when there are none
    max_prefill_context_len: int  # max(context_lens[num_decode_seqs:]), 0 when there are none
    attention: object = None  # per-step metadata the attention backend prepared from the fields above
