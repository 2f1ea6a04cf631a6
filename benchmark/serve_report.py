"""The serving benchmark's report: vLLM-style result tables and the JSON result file."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from tgserve.benchmark.arrivals import format_rate
from tgserve.benchmark.metrics_serve import LatencyStats, RequestOutput, e2el_s, ttft_s
from tgserve.benchmark.serve import RateResult

WIDTH = 50
_LATENCY_SECTIONS = (  # (field of ServeMetrics, label, section title)
    ("ttft_ms", "TTFT", "Time to First Token"),
    ("tpot_ms", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl_ms", "ITL", "Inter-token Latency"),
    ("e2el_ms", "E2EL", "End-to-end Latency"),
)


def _row(label: str, value: object) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label:<40} {value:<10}"


def format_result_table(result: RateResult, max_concurrency: int | None = None) -> str:
    """The result of one rate as vLLM prints it ("==== Serving Benchmark Result ====")."""
    metrics = result.metrics
    lines = [f"{' Serving Benchmark Result ':=^{WIDTH}}",
             _row("Request rate (req/s):", format_rate(result.request_rate)),
             _row("Maximum request concurrency:", max_concurrency if max_concurrency else "none"),
             _row("Successful requests:", metrics.num_completed),
             _row("Failed requests:", metrics.num_failed),
             _row("Benchmark duration (s):", metrics.duration_s),
             _row("Total input tokens:", metrics.total_input_tokens),
             _row("Total generated tokens:", metrics.total_output_tokens),
             _row("Request throughput (req/s):", metrics.request_throughput_rps)]
    if metrics.request_goodput_rps is not None:
        lines.append(_row("Request goodput (req/s):", metrics.request_goodput_rps))
    lines += [_row("Output token throughput (tok/s):", metrics.output_throughput_tok_s),
              _row("Total Token throughput (tok/s):", metrics.total_token_throughput_tok_s)]
    for field_name, label, title in _LATENCY_SECTIONS:
        stats: LatencyStats = getattr(metrics, field_name)
        lines.append(f"{title:-^{WIDTH}}")
        lines += [_row(f"Mean {label} (ms):", stats.mean), _row(f"Median {label} (ms):", stats.median),
                  _row(f"P90 {label} (ms):", stats.p90), _row(f"P99 {label} (ms):", stats.p99)]
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def format_sweep_table(results: list[RateResult]) -> str:
    """One line per rate: throughput against median / p99 TTFT and TPOT."""
    header = f"{'rate':>6} {'ok':>5} {'req/s':>8} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} " \
             f"{'TPOT p50':>9} {'TPOT p99':>9}  (ms)"
    lines = [header]
    for result in results:
        m = result.metrics
        lines.append(f"{format_rate(result.request_rate):>6} {m.num_completed:>5} {m.request_throughput_rps:>8.2f} "
                     f"{m.output_throughput_tok_s:>10.1f} {m.ttft_ms.median:>9.1f} {m.ttft_ms.p99:>9.1f} "
                     f"{m.tpot_ms.median:>9.1f} {m.tpot_ms.p99:>9.1f}")
    return "\n".join(lines)


def request_record(output: RequestOutput) -> dict[str, Any]:
    """One request in the result file: lengths, latencies (ms) and the error if it failed."""
    record: dict[str, Any] = {"is_success": output.is_success, "num_prompt_tokens": output.num_prompt_tokens,
                              "num_requested_output_tokens": output.num_requested_output_tokens,
                              "num_output_tokens": output.num_output_tokens}
    if output.is_success:
        record.update(ttft_ms=ttft_s(output) * 1000, e2el_ms=e2el_s(output) * 1000)
    else:
        record["error"] = output.error
    return record


def rate_result_json(result: RateResult) -> dict[str, Any]:
    """One rate's result: the rate ("inf" for all at once), the metrics and every request."""
    rate = "inf" if math.isinf(result.request_rate) else result.request_rate
    return {"request_rate": rate, **dataclasses.asdict(result.metrics),
            "requests": [request_record(output) for output in result.outputs]}


def write_result_file(path: str | Path, config: dict[str, Any], results: list[RateResult]) -> None:
    """Write {"config": ..., "results": [one entry per rate]} as JSON."""
    document = {"config": config, "results": [rate_result_json(result) for result in results]}
    Path(path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
