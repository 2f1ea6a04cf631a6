"""Per-request timings and TGI's `x-*` timing headers on /generate.

TGI splits a request's time into validation (until it is queued), queue (until its first batch
starts) and inference (from then on). The API measures validation and the total; the engine
reports queue and inference on the request's `Finish`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from tgserve.core.request import Finish


@dataclass(slots=True)
class RequestTimer:
    """Monotonic timestamps (seconds, `time.perf_counter`) of one request's milestones."""

    start_s: float = field(default_factory=time.perf_counter)  # handler entered
    queued_s: float | None = None  # validated and tokenized, handed to the engine
    end_s: float | None = None  # last token event received

    def mark_queued(self) -> None:
        """Validation is over; the request goes to the engine now."""
        self.queued_s = time.perf_counter()

    def mark_end(self) -> None:
        """The last token event arrived."""
        self.end_s = time.perf_counter()

    def split_s(self, finish: Finish) -> tuple[float, float, float, float]:
        """(total, validation, queue, inference) in seconds."""
        end_s = self.end_s if self.end_s is not None else time.perf_counter()
        queued_s = self.queued_s if self.queued_s is not None else self.start_s
        return end_s - self.start_s, queued_s - self.start_s, finish.queue_s, finish.inference_s

    def headers(self, finish: Finish, *, compute_type: str, num_characters: int,
                num_prompt_tokens: int) -> dict[str, str]:
        """TGI's /generate response headers (times in whole ms, x-compute-time in seconds)."""
        total_s, validation_s, queue_s, inference_s = self.split_s(finish)
        per_token_s = inference_s / max(finish.generated_tokens, 1)
        return {
            "x-compute-type": compute_type,
            "x-compute-time": repr(total_s),
            "x-compute-characters": str(num_characters),
            "x-total-time": str(int(total_s * 1000)),
            "x-validation-time": str(int(validation_s * 1000)),
            "x-queue-time": str(int(queue_s * 1000)),
            "x-inference-time": str(int(inference_s * 1000)),
            "x-time-per-token": str(int(per_token_s * 1000)),
            "x-prompt-tokens": str(num_prompt_tokens),
            "x-generated-tokens": str(finish.generated_tokens),
        }

    def log_fields(self, finish: Finish) -> str:
        """The timings TGI logs with each successful request, as `key=value` text."""
        total_s, validation_s, queue_s, inference_s = self.split_s(finish)
        per_token_s = inference_s / max(finish.generated_tokens, 1)
        return (f"total_time={total_s * 1000:.1f}ms validation_time={validation_s * 1000:.1f}ms "
                f"queue_time={queue_s * 1000:.1f}ms inference_time={inference_s * 1000:.1f}ms "
                f"time_per_token={per_token_s * 1000:.1f}ms seed={finish.seed}")
