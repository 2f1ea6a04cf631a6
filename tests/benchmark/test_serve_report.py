"""The serving benchmark's report: the vLLM-style table, the JSON result file and the sweep plot."""
from __future__ import annotations

import json
import math

from tgserve.benchmark.metrics_serve import RequestOutput, compute_metrics
from tgserve.benchmark.plot import plot_sweep
from tgserve.benchmark.serve import RateResult
from tgserve.benchmark.serve_report import format_result_table, format_sweep_table, write_result_file


def rate_result(request_rate: float, slos_ms: dict[str, float] | None = None) -> RateResult:
    ok = RequestOutput(is_success=True, send_time_s=0.0, event_times_s=[0.1, 0.2], event_num_tokens=[1, 1],
                       end_time_s=0.2, num_prompt_tokens=5, num_requested_output_tokens=2)
    failed = RequestOutput(error="HTTP 503: overloaded", num_prompt_tokens=5, num_requested_output_tokens=2)
    return RateResult(request_rate, compute_metrics([ok, failed], 1.0, slos_ms), [ok, failed])


def test_table_reads_like_vllms():
    table = format_result_table(rate_result(math.inf), max_concurrency=4)
    lines = table.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    assert "Successful requests:                     1" in table
    assert "Median TTFT (ms):                        100.00" in table
    assert "goodput" not in table
    assert "Request goodput (req/s):" in format_result_table(rate_result(1.0, {"ttft": 50.0}))
    assert len(format_sweep_table([rate_result(1.0), rate_result(math.inf)]).splitlines()) == 3


def test_result_file_is_strict_json_with_one_entry_per_rate(tmp_path):
    path = tmp_path / "result.json"
    write_result_file(path, {"request_rates": ["2", "inf"]}, [rate_result(2.0), rate_result(math.inf)])
    document = json.loads(path.read_text(), parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    first, second = document["results"]
    assert (first["request_rate"], second["request_rate"]) == (2.0, "inf")
    assert first["ttft_ms"]["median"] == 100.0 and first["num_failed"] == 1
    assert first["requests"][0] == {"is_success": True, "num_prompt_tokens": 5, "num_requested_output_tokens": 2,
                                    "num_output_tokens": 2, "ttft_ms": 100.0, "e2el_ms": 200.0}
    assert first["requests"][1]["error"] == "HTTP 503: overloaded"


def test_plot_is_a_png(tmp_path):
    path = tmp_path / "sweep.png"
    plot_sweep([rate_result(1.0), rate_result(2.0), rate_result(math.inf)], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
