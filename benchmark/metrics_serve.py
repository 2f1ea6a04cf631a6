"""The serving benchmark's metric arithmetic, as pure functions of request timelines.

Definitions (vLLM's benchmark_serving):
  TTFT  = arrival of the first token - send time.
  ITL   = gaps between successive token arrivals; an event carrying k tokens counts as k tokens
          arriving together: one gap, then k - 1 zeros (so a request has num_tokens - 1 ITLs).
  TPOT  = (e2e latency - TTFT) / (output tokens - 1), per request with more than one output token.
  E2EL  = end of the response stream - send time.
  Goodput = completed requests per second that meet every given SLO (in ms; a request with one
  output token has no TPOT and passes a TPOT SLO).
Latency statistics pool all completed requests (ITL: all gaps of all requests).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass(slots=True)
class RequestOutput:
    """What one request did; times are `time.perf_counter()` seconds. Filled by `serve_backends`."""

    is_success: bool = False
    error: str = ""  # why it failed; empty on success
    send_time_s: float = 0.0  # when the request was sent
    event_times_s: list[float] = field(default_factory=list)  # [num_events] arrival of each token event
    event_num_tokens: list[int] = field(default_factory=list)  # [num_events] tokens each event carried
    end_time_s: float = 0.0  # when the response stream ended
    num_prompt_tokens: int = 0  # the server's count when it reports one, else the dataset's
    num_reported_output_tokens: int | None = None  # the server's count of generated tokens, if reported
    num_requested_output_tokens: int = 0  # max_new_tokens / max_tokens asked for
    generated_text: str = ""  # the streamed text (a multi-turn conversation's next prompt includes it)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens: the server's count, else the tokens the stream's events carried."""
        if self.num_reported_output_tokens is not None:
            return self.num_reported_output_tokens
        return sum(self.event_num_tokens)


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Summary of one latency, in milliseconds; all 0.0 when there are no samples."""

    mean: float = 0.0
    median: float = 0.0
    std: float = 0.0
    p90: float = 0.0
    p99: float = 0.0


@dataclass(frozen=True, slots=True)
class ServeMetrics:
    """The result of one benchmark run (one request rate)."""

    num_completed: int
    num_failed: int
    duration_s: float
    total_input_tokens: int  # prompt tokens of the completed requests
    total_output_tokens: int  # generated tokens of the completed requests
    request_throughput_rps: float  # completed requests per second
    request_goodput_rps: float | None  # requests per second meeting every SLO; None without SLOs
    output_throughput_tok_s: float  # generated tokens per second
    total_token_throughput_tok_s: float  # (prompt + generated) tokens per second
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2el_ms: LatencyStats


def ttft_s(output: RequestOutput) -> float:
    """Time to first token."""
    return output.event_times_s[0] - output.send_time_s


def e2el_s(output: RequestOutput) -> float:
    """End-to-end latency."""
    return output.end_time_s - output.send_time_s


def itls_s(event_times_s: list[float], event_num_tokens: list[int]) -> list[float]:
    """Inter-token latencies, [total tokens - 1]: per event, the gap since the previous event (none
    for the first), then one 0.0 per extra token it carried. Events with no tokens are skipped."""
    itls: list[float] = []
    previous_s: float | None = None
    for time_s, num_tokens in zip(event_times_s, event_num_tokens):
        if num_tokens <= 0:
            continue
        if previous_s is not None:
            itls.append(time_s - previous_s)
        itls.extend([0.0] * (num_tokens - 1))
        previous_s = time_s
    return itls


def tpot_s(e2e_latency_s: float, ttft_latency_s: float, num_output_tokens: int) -> float | None:
    """Time per output token after the first; None for fewer than two output tokens."""
    if num_output_tokens < 2:
        return None
    return (e2e_latency_s - ttft_latency_s) / (num_output_tokens - 1)


def latency_stats_ms(values_s: list[float]) -> LatencyStats:
    """Mean, median, std, p90 and p99 of latencies given in seconds, reported in milliseconds."""
    if not values_s:
        return LatencyStats()
    values_ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    p90, p99 = np.percentile(values_ms, [90, 99])
    return LatencyStats(mean=float(values_ms.mean()), median=float(np.median(values_ms)),
                        std=float(values_ms.std()), p90=float(p90), p99=float(p99))


def parse_goodput(specs: list[str]) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> `{"ttft": 500.0, "tpot": 50.0}` (milliseconds, > 0)."""
    slos_ms: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"a goodput SLO is NAME:MS with NAME one of {', '.join(SLO_METRICS)}, got {spec!r}")
        try:
            slos_ms[name] = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {spec!r}: {value!r} is not a number of milliseconds") from None
        if not slos_ms[name] > 0:
            raise ValueError(f"goodput SLO {spec!r} must be > 0 ms")
    return slos_ms


def meets_slos(latencies_ms: dict[str, float | None], slos_ms: dict[str, float]) -> bool:
    """Whether every SLO holds (latency <= limit); a latency of None (no TPOT) meets its SLO."""
    return all(latencies_ms[name] is None or latencies_ms[name] <= limit_ms for name, limit_ms in slos_ms.items())


def compute_metrics(outputs: list[RequestOutput], duration_s: float,
                    slos_ms: dict[str, float] | None = None) -> ServeMetrics:
    """Aggregate one run's request outputs over its wall-clock `duration_s`."""
    completed = [output for output in outputs if output.is_success]
    ttfts, tpots, itls, e2els = [], [], [], []
    num_good = 0
    for output in completed:
        ttft, e2el = ttft_s(output), e2el_s(output)
        tpot = tpot_s(e2el, ttft, output.num_output_tokens)
        ttfts.append(ttft)
        e2els.append(e2el)
        if tpot is not None:
            tpots.append(tpot)
        itls.extend(itls_s(output.event_times_s, output.event_num_tokens))
        latencies_ms = {"ttft": ttft * 1000, "tpot": None if tpot is None else tpot * 1000, "e2el": e2el * 1000}
        num_good += bool(slos_ms) and meets_slos(latencies_ms, slos_ms)
    total_input = sum(output.num_prompt_tokens for output in completed)
    total_output = sum(output.num_output_tokens for output in completed)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    return ServeMetrics(
        num_completed=len(completed), num_failed=len(outputs) - len(completed), duration_s=duration_s,
        total_input_tokens=total_input, total_output_tokens=total_output,
        request_throughput_rps=len(completed) * per_s,
        request_goodput_rps=num_good * per_s if slos_ms else None,
        output_throughput_tok_s=total_output * per_s, total_token_throughput_tok_s=(total_input + total_output) * per_s,
        ttft_ms=latency_stats_ms(ttfts), tpot_ms=latency_stats_ms(tpots), itl_ms=latency_stats_ms(itls),
        e2el_ms=latency_stats_ms(e2els))
