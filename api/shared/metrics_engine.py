"""The engine's step reports -> TGI's batch and queue metrics.

`EngineMetrics` is the `StepObserver` the app attaches to its engine. It runs on the engine thread
once per step (prometheus-client metrics are thread-safe), so it does a fixed handful of updates.

How an engine step maps onto TGI's words (TGI-CONTRACT section 4): a step that computes any prompt
tokens is a "prefill", a step of decode tokens only is a "decode". New requests joining a batch
that already runs is TGI's "concat"; the engine always plans them into the running batch's next
step, the way TGI v3 prefills new requests together with the cached batch, so the reason is always
"chunking". Durations: forward = the model runner (forward and sampling); decode =
turning sampled ids into token events; filter = removing finished and cancelled requests; concat
= planning the step that admitted them; inference = the whole step.
"""
from __future__ import annotations

from tgserve.api.shared.metrics import ServerMetrics
from tgserve.core.step_stats import StepStats


class EngineMetrics:
    """Records every engine step into `metrics` (implements `tgserve.core.step_stats.StepObserver`)."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def on_step(self, stats: StepStats) -> None:
        """Update the batch gauges, then count and time the step under its method."""
        metrics = self.metrics
        self._set_batch_gauges(stats.num_running, stats.max_batch_tokens, stats.num_waiting)
        method = "prefill" if stats.is_prefill else "decode"
        metrics.batch_inference_count.labels(method).inc()
        if not stats.is_ok:
            metrics.batch_inference_failure.labels(method).inc()
            return
        metrics.batch_inference_success.labels(method).inc()
        metrics.batch_inference_duration.labels(method).observe(stats.duration_s)
        metrics.batch_forward_duration.labels(method).observe(stats.forward_s)
        metrics.batch_decode_duration.labels(method).observe(stats.update_s)
        metrics.batch_filter_duration.labels(method).observe(stats.filter_s)
        if stats.num_collectives:
            metrics.batch_collective_duration.labels(method).observe(stats.collective_s)
            metrics.batch_collectives.labels(method).inc(stats.num_collectives)
        if stats.num_new_seqs:
            metrics.batch_next_size.observe(stats.num_new_seqs)
            if stats.num_new_seqs < stats.num_seqs:  # they joined sequences already running
                metrics.batch_concat.labels("chunking").inc()
                # TGI labels every concat duration "decode", whichever RPC did the concatenation.
                metrics.batch_concat_duration.labels("decode").observe(stats.schedule_s)

    def on_idle(self) -> None:
        """Nothing runs and nothing waits: the batch gauges drop to zero."""
        self._set_batch_gauges(0, 0, 0)

    def _set_batch_gauges(self, num_running: int, max_batch_tokens: int, num_waiting: int) -> None:
        self.metrics.batch_current_size.set(num_running)
        self.metrics.batch_current_max_tokens.set(max_batch_tokens)
        self.metrics.queue_size.set(num_waiting)
