"""Token and batch limits found at start-up, from the flags, the model and the memory."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class RuntimeLimits:
    """The limits the server actually runs with; set once, before serving. All counts in tokens."""

    max_input_tokens: int  # longest prompt accepted (after truncation)
    max_total_tokens: int  # prompt + generated tokens of one request
    max_batch_prefill_tokens: int  # tokens computed in one step (prefill chunks + decodes)
    max_batch_total_tokens: int  # KV-cache capacity: num_blocks * block_size
    max_batch_size: int | None  # sequences in one step; None = bounded by the tokens only
    num_blocks: int  # KV-cache blocks allocated
    block_size: int  # tokens per KV-cache block
