"""`tgserve benchmark serve` end to end: the real CLI, as a subprocess, against a real `tgserve serve`
(the package's `server` fixture, tests/benchmark/conftest.py).

A sweep of two rates (inf, 4) over 8 short prompts of the demo model; checks the printed table,
the JSON result file (one result per rate, every metric) and the PNG plot.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.api.conftest import ServerProcess, tgserve_command, tgserve_env

NUM_PROMPTS = 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
THROUGHPUTS = ("request_throughput_rps", "request_goodput_rps", "output_throughput_tok_s",
               "total_token_throughput_tok_s")


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(tgserve_command("benchmark", "serve", *args), capture_output=True, text=True,
                          timeout=180, env=tgserve_env())


def test_rate_sweep_writes_json_and_png(server: ServerProcess, demo_model_dir: Path, tmp_path: Path):
    result_path, plot_path = tmp_path / "result.json", tmp_path / "sweep.png"
    completed = run_benchmark(
        "--backend", "tgi", "--base-url", server.url, "--tokenizer", str(demo_model_dir),
        "--num-prompts", str(NUM_PROMPTS), "--input-len", "24", "--output-len", "8", "--range-ratio", "0.25",
        "--request-rate", "inf,4", "--force-output-len", "--goodput", "ttft:60000", "tpot:60000",
        "--result-file", str(result_path), "--plot-file", str(plot_path), "--disable-tqdm")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("Serving Benchmark Result") == 2
    assert "Mean TTFT (ms):" in completed.stdout

    document = json.loads(result_path.read_text())
    assert document["config"]["request_rates"] == ["inf", "4"]
    assert [result["request_rate"] for result in document["results"]] == ["inf", 4.0]
    for result in document["results"]:
        assert (result["num_completed"], result["num_failed"]) == (NUM_PROMPTS, 0)
        assert result["duration_s"] > 0
        assert all(result[name] > 0 for name in THROUGHPUTS)
        assert result["request_goodput_rps"] == pytest.approx(result["request_throughput_rps"])  # loose SLOs
        for name in LATENCIES:
            stats = result[name]
            assert set(stats) == {"mean", "median", "std", "p90", "p99"}
            assert 0 < stats["median"] <= stats["p99"]
        requests = result["requests"]
        assert len(requests) == NUM_PROMPTS and all(request["is_success"] for request in requests)
        # Prompt counts come from the server (details.input_length); outputs are at most what was asked.
        assert all(6 <= request["num_requested_output_tokens"] <= 10 for request in requests)
        assert all(1 <= request["num_output_tokens"] <= request["num_requested_output_tokens"] for request in requests)
        assert result["total_input_tokens"] == sum(request["num_prompt_tokens"] for request in requests)
    assert plot_path.read_bytes()[:8] == PNG_MAGIC


def test_unreachable_server_fails_with_one_line(tmp_path: Path):
    completed = run_benchmark("--base-url", "http://127.0.0.1:9", "--num-prompts", "2", "--disable-tqdm")
    assert completed.returncode == 1
    assert "tgserve benchmark: error: the test request to http://127.0.0.1:9 failed" in completed.stderr


def test_bad_flags_are_rejected_before_any_request():
    completed = run_benchmark("--request-rate", "fast")
    assert completed.returncode == 1 and "request rate" in completed.stderr
    completed = run_benchmark("--goodput", "latency:5")
    assert completed.returncode == 1 and "goodput" in completed.stderr


def test_multiturn_conversations_grow_turn_by_turn_and_hit_the_prefix_cache(server: ServerProcess,
                                                                           demo_model_dir: Path, tmp_path: Path):
    """3 conversations x 3 turns on a shared 64-token system text: each turn's prompt is longer than the
    one before (it carries the previous prompt and answer), and the server served part of them from
    its prefix cache (its own counter, scraped before and after)."""
    from tests.api.metrics_scrape import scrape, value

    before = value(scrape(server.url)[0], "tgserve_request_cached_tokens")
    result_path = tmp_path / "multiturn.json"
    completed = run_benchmark(
        "--backend", "tgi", "--base-url", server.url, "--tokenizer", str(demo_model_dir), "--dataset", "multiturn",
        "--num-prompts", "3", "--num-turns", "3", "--prefix-len", "64", "--input-len", "12", "--output-len", "6",
        "--result-file", str(result_path), "--disable-tqdm")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "benchmark serve: 3 conversations" in completed.stdout
    (result,) = json.loads(result_path.read_text())["results"]
    requests = result["requests"]
    assert (result["num_completed"], len(requests)) == (9, 9)
    for conversation in range(3):
        lengths = [r["num_prompt_tokens"] for r in requests[3 * conversation:3 * conversation + 3]]
        assert 64 < lengths[0] < lengths[1] < lengths[2], lengths
    assert value(scrape(server.url)[0], "tgserve_request_cached_tokens") - before >= 3 * 64
