"""The device-side batch of one model forward, built from a `StepPlan` by the model runner."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class ForwardBatch:
    """Device tensors for one model forward, built from a StepPlan by the model runner.

    T = token rows of the step (packed, sequence after sequence), S = sequence rows. Where the
    backend declares buckets, T and S are padded past the step's `num_tokens` / `num_seqs`: padding
    tokens (id 0, position 0) write their K/V into the reserved block 0 and are never sampled;
    padding sequences have query_len 0, context_len 0 and a block table of block 0. Every tensor is
    a view of a persistent buffer (`tgserve.core.step_inputs`): same address every step.
    """

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T], absolute position of each token in its sequence
    slot_mapping: torch.Tensor  # int64 [T], block_id * block_size + offset where each token's K/V goes
    block_tables: torch.Tensor  # int64 [S, max_blocks_per_seq], padded with block 0
    context_lens: torch.Tensor  # int64 [S], tokens in the KV cache after this step
    query_lens: torch.Tensor  # int64 [S], tokens computed this step
    cu_seqlens_q: torch.Tensor  # int64 [S + 1], prefix sums of query_lens
    # int64 [num_logits]: rows of the hidden states that get logits: for each sequence in plan order,
    # its last `num_sampled` rows (`ScheduledSequence.num_sampled`)
    logits_indices: torch.Tensor
    max_query_len: int  # host int, max(query_lens)
    max_context_len: int  # host int, max(context_lens)
    # Host ints that let attention treat decode rows apart from prefill rows in a mixed step: the
    # first `num_decode_seqs` sequences compute one token each (the scheduler orders them by query length).
    num_decode_seqs: int
    max_decode_context_len: int  # max(context_lens[:num_decode_seqs]), 0 when there are none
    max_prefill_context_len: int  # max(context_lens[num_decode_seqs:]), 0 when there are none
    num_tokens: int  # host int, the real tokens: rows [num_tokens, T) are padding
    num_seqs: int  # host int, the real sequences: rows [num_seqs, S) are padding
    # int64 [S]: the fixed batch slot each sequence holds (slot-based backends; -1 on padding rows),
    # None where the backend is not slot-based.
    batch_slots: torch.Tensor | None = None
    attention: object = None  # per-step metadata the attention backend prepared from the fields above
