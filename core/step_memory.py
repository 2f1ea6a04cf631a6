"""The analytic peak memory of one engine step, beyond the weights and the KV cache.

Start-up keeps this much out of the KV cache and, where the backend warms up without a full-size
step (`WarmupPolicy.probe_tokens`), it is the proof that `max_batch_prefill_tokens` fits. The terms
count the tensors the reference code path holds at once; the allocator's peak resident memory runs
above that (freed blocks are not always reused at once), hence ALLOCATOR_FACTOR. Measured as peak
RSS growth over one prefill step on CPU: Qwen2-0.5B shape, 1024 tokens: 110 MiB float32 (live
tensors counted here: 117 MiB), 66 MiB bfloat16 (68 MiB); the 2-layer shape of
tests/core/test_step_memory.py, 2048 tokens float32: 97-156 MiB from run to run (128 MiB).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tgserve.core.model_config import ModelConfig

# Bytes per element of the sampler's work on a row of logits: float32 logits, sort values and int64
# indices, softmax, cumulative sums and masks of the logits processors.
SAMPLING_BYTES_PER_LOGIT = 32
# Peak resident memory over the live tensors counted below (measured up to 1.22x, see above).
ALLOCATOR_FACTOR = 1.5
# Bytes per (query, key) pair of the prefill attention mask: the bool mask and its temporaries
# (the causal and length comparisons), plus the float copy scaled_dot_product_attention makes.
MASK_BYTES_PER_PAIR = 8


@dataclass(slots=True, frozen=True)
class StepMemory:
    """One step's peak, in bytes, by cause (host integers, for the start-up log)."""

    layer_bytes: int  # per-token activations of one decoder layer, for every token of the step
    attention_bytes: int  # the prefill mask: step tokens x longest context
    sampling_bytes: int  # logits and sampler work of the rows that sample

    @property
    def total_bytes(self) -> int:
        """What the step may take resident: the live tensors, times ALLOCATOR_FACTOR."""
        return int(ALLOCATOR_FACTOR * (self.layer_bytes + self.attention_bytes + self.sampling_bytes))


def step_memory(model: ModelConfig, dtype: torch.dtype, num_tokens: int, max_context_tokens: int,
                num_sampling_rows: int) -> StepMemory:
    """Peak extra memory of a step computing `num_tokens` tokens.

    max_context_tokens: the longest context a prefill chunk of the step attends over (its keys).
    num_sampling_rows: sequences that sample a token in the step (at most one per sequence).
    """
    item = torch.empty((), dtype=dtype).element_size()
    h, i = model.hidden_size, model.intermediate_size
    # Live at the MLP: residual, normed input, gate/up [2i], activation and product [2i]; the
    # attention's q/k/v/output rows fit in the same 6h; RMSNorm computes in float32 (2h).
    per_token = (6 * h + 4 * i) * item + 2 * h * 4
    return StepMemory(layer_bytes=num_tokens * per_token,
                      attention_bytes=num_tokens * max_context_tokens * MASK_BYTES_PER_PAIR,
                      sampling_bytes=num_sampling_rows * model.vocab_size * SAMPLING_BYTES_PER_LOGIT)
