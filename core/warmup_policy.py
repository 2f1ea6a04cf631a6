"""How start-up proves that the limits fit on a backend: TGI's full-size step, or a measured probe."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class WarmupPolicy:
    """Returned by `tgserve_get_warmup_policy`; the core default is TGI's warmup (`WarmupPolicy()`).

    A device whose step activations share memory with the KV cache (a GPU) can only learn the peak
    by computing a full `max_batch_prefill_tokens` step. A device whose activations come from
    pageable host memory (a CPU) can check the analytic peak instead and run one small real step,
    which also measures how fast this machine prefills.
    """

    # None: run one full step of `max_batch_prefill_tokens` tokens (TGI). Else: tokens of the small
    # real step (the probe) that proves the model path and times it; memory is checked analytically.
    probe_tokens: int | None = None
    # With a probe and no --max-batch-prefill-tokens: the default is the tokens this many seconds of
    # the measured prefill speed compute, as TGI sizes it from a GPU's FLOPs (one second at peak).
    prefill_step_s: float = 1.0

    def __post_init__(self) -> None:
        if self.probe_tokens is not None and self.probe_tokens < 2:
            raise ValueError(f"probe_tokens must be >= 2, got {self.probe_tokens}")
        if self.prefill_step_s <= 0:
            raise ValueError(f"prefill_step_s must be > 0, got {self.prefill_step_s}")

    @property
    def is_full_step(self) -> bool:
        return self.probe_tokens is None
