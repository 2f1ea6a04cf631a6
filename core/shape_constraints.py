"""Static-shape limits a backend may impose on the scheduler (compiled graphs, Inferentia slots)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class ShapeConstraints:
    """Returned by `tgserve_get_shape_constraints`; every field None/empty means "no constraint"."""

    max_batch_size: int | None = None  # sequences per step, e.g. compiled batch size (slots)
    max_tokens_per_sequence: int | None = None  # compiled sequence length; caps max_total_tokens
    prefill_token_buckets: tuple[int, ...] = ()  # padded prefill sizes the backend has compiled
    decode_batch_buckets: tuple[int, ...] = ()  # padded decode batch sizes the backend has compiled
    is_slot_based: bool = False  # each request owns one fixed slot for its whole life (Inferentia)
    supports_chunked_prefill: bool = True  # False: a prompt is always prefilled in one step
