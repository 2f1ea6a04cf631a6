"""Shape buckets for Gaudi: HPU graphs are compiled per input shape, so every step is padded up to
one of a few sizes, each compiled once during warmup (as TGI's Gaudi server does)."""
from __future__ import annotations

DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_INPUT_TOKENS = 4096
SEQUENCE_BUCKET_TOKENS = 128  # prompt lengths are padded to a multiple of this


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below `max_batch_size`, then `max_batch_size` itself: 48 -> (1, 2, 4, ..., 32, 48)."""
    buckets = []
    size = 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return (*buckets, max_batch_size)


def sequence_buckets(max_tokens: int, step: int = SEQUENCE_BUCKET_TOKENS) -> tuple[int, ...]:
    """Multiples of `step` up to `max_tokens` rounded up to one: 300 -> (128, 256, 384)."""
    top = -(-max_tokens // step) * step
    return tuple(range(step, top + 1, step))
