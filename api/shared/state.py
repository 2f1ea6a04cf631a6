"""What the routes share: the engine and the server-wide objects built around it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from tgserve.api.shared.concurrency import ConcurrencyLimiter
from tgserve.api.shared.metrics import ServerMetrics
from tgserve.api.shared.validation import ValidationLimits

if TYPE_CHECKING:
    from tgserve.core.engine import Engine


@dataclass(slots=True)
class ServerState:
    """Built once by `create_app`; routes reach it through `get_state`."""

    engine: "Engine"
    limiter: ConcurrencyLimiter  # --max-concurrent-requests
    limits: ValidationLimits
    compute_type: str  # x-compute-type header, e.g. "cpu+optimized"
    default_return_full_text: bool  # POST / only: TGI's default from the model's pipeline tag
    metrics: ServerMetrics  # this app's Prometheus metrics (GET /metrics)

    @classmethod
    def from_engine(cls, engine: "Engine") -> "ServerState":
        """Derive the shared state from a built engine's config, limits and model info."""
        config, limits = engine.config, engine.limits
        metrics = ServerMetrics(limits, config.speculate or 0)
        metrics.watch_kv_cache(lambda: engine.num_used_kv_blocks, lambda: engine.num_cached_kv_blocks)
        return cls(
            engine=engine,
            limiter=ConcurrencyLimiter(config.max_concurrent_requests, metrics),
            limits=ValidationLimits(
                max_best_of=config.max_best_of, max_stop_sequences=config.max_stop_sequences,
                max_top_n_tokens=config.max_top_n_tokens, max_input_tokens=limits.max_input_tokens,
                max_total_tokens=limits.max_total_tokens),
            compute_type=f"{engine.model_info.model_device_type}+optimized",
            # TGI: true for a "text-generation" hub pipeline tag or none; ModelInfo has no tag yet.
            default_return_full_text=True,
            metrics=metrics,
        )


def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the app's `ServerState`."""
    return request.app.state.tgserve
