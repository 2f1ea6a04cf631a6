"""Static-shape limits a backend may impose on the scheduler (compiled graphs, Inferentia slots)."""
from __future__ import annotations

from dataclasses import dataclass

from tgserve.core.invariants import EngineInvariantError


@dataclass(slots=True, frozen=True)
class ShapeConstraints:
    """Returned by `tgserve_get_shape_constraints`; every field None/empty means "no constraint".

    Read by the scheduler (it never plans a step larger than the largest bucket, and hands out slots)
    and by the step inputs (`tgserve.core.step_inputs`: every step is padded to its bucket).
    """

    max_batch_size: int | None = None  # sequences per step, e.g. compiled batch size (slots)
    max_tokens_per_sequence: int | None = None  # compiled sequence length; caps max_total_tokens
    # Token rows a step with prefill rows is padded to (the smallest that fits); ascending.
    prefill_token_buckets: tuple[int, ...] = ()
    # Sequence rows every step is padded to (the smallest that fits); a step whose sequences all
    # compute one token has as many token rows as sequence rows. Ascending.
    decode_batch_buckets: tuple[int, ...] = ()
    is_slot_based: bool = False  # each request owns one of `max_batch_size` fixed slots for its whole life
    supports_chunked_prefill: bool = True  # False: a prompt is always prefilled in one step
    # False: a request never starts from cached blocks (e.g. the device keeps K/V per slot, not in blocks)
    supports_prefix_caching: bool = True


def bucket_for(size: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `size` rows; `size` itself when there are no buckets."""
    if not buckets:
        return size
    for bucket in sorted(buckets):
        if bucket >= size:
            return bucket
    raise EngineInvariantError(f"a step of {size} rows is larger than the largest bucket {max(buckets)}")
