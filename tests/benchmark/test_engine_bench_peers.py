"""Peer results: the runner protocol, running a runner, merging into one table.

The transformers peer runs for real on the demo checkpoint (it needs only torch and transformers, which
the test venv has). The fake runner scripts stay only for what a real runner cannot be made to do on
demand: print logs around its result line, and crash with a given stderr."""
from __future__ import annotations

import json
import math
import re
import sys
import textwrap
from pathlib import Path

import pytest

from tgserve.api.cli import main
from tgserve.benchmark import compare
from tgserve.benchmark.peers import peer_protocol, registry

FAKE_RESULT = {"engine": "llama.cpp", "version": "0.3.36", "is_available": True,
               "metrics": {"decode_ms_per_token": 20.0, "ttft_ms": 150.0, "output_tokens_per_s": {"8": 200.0, "16": 300.0}},
               "settings": {"threads": 2}, "notes": ["converted with pre-tokenizer 'default'"]}


def _fake_runner(tmp_path, body: str) -> registry.PeerSpec:
    (tmp_path / "fake_runner.py").write_text(textwrap.dedent(body))
    return registry.PeerSpec("fake", "fake-engine", "fake_runner.py", needs_venv=False, is_cpu_only=False)


def test_parse_result_takes_the_last_marked_line():
    stdout = "engine log line\n{\"not\": \"this\"}\n" + peer_protocol.RESULT_MARK + json.dumps({"a": 1}) + "\n" \
             + peer_protocol.RESULT_MARK + json.dumps(FAKE_RESULT) + "\nshutdown log\n"
    assert peer_protocol.parse_result(stdout) == FAKE_RESULT
    assert peer_protocol.parse_result("only logs\n") is None


def test_measure_turns_call_times_into_the_metrics():
    calls = []

    def generate(prompts, num_new_tokens):
        calls.append((len(prompts), num_new_tokens, len(prompts[0])))
        return 0.100 + 0.020 * (num_new_tokens - 1) * (1 + 0.5 * (len(prompts) - 1))  # fake seconds

    args = peer_protocol.parse_args("x", ["--model-dir", "m", "--sequence-length", "5", "--decode-length", "11",
                                          "--batch-sizes", "2,4", "--runs", "3", "--warmups", "1"])
    metrics = peer_protocol.measure(generate, vocab_size=50, args=args)
    assert metrics["ttft_ms"] == pytest.approx(100.0)
    assert metrics["decode_ms_per_token"] == pytest.approx(20.0)
    assert metrics["output_tokens_per_s"] == pytest.approx({"2": 2 * 11 / (0.1 + 0.2 * 1.5), "4": 4 * 11 / (0.1 + 0.2 * 2.5)})
    assert calls[:3] == [(1, 2, 5), (2, 2, 5), (4, 2, 5)]  # warm-up of each batch size first
    assert len(calls) == 3 + 3 + 3 + 3 * 2


def test_prompts_are_fresh_and_reproducible():
    a, b = peer_protocol.Prompts(100, 4, seed=1), peer_protocol.Prompts(100, 4, seed=1)
    first, second = a.batch(2), a.batch(2)
    assert first != second and first == b.batch(2)
    assert all(0 <= t < 100 for p in first for t in p) and [len(p) for p in first] == [4, 4]


def test_run_peer_reads_a_runner_that_prints_logs_around_its_result(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "RUNNERS_DIR", tmp_path)
    spec = _fake_runner(tmp_path, f"""
        import json, sys
        print("INFO loading engine")
        assert "--decode-length" in sys.argv
        print({peer_protocol.RESULT_MARK!r} + json.dumps({FAKE_RESULT!r}))
        print("INFO shutdown", file=sys.stderr)
    """)
    result = registry.run_peer(spec, tmp_path, ["--decode-length", "4"], timeout_s=60)
    assert result["metrics"] == FAKE_RESULT["metrics"] and result["engine"] == "fake-engine"
    assert result["wall_s"] > 0


def test_a_crashing_runner_is_unavailable_with_its_stderr(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "RUNNERS_DIR", tmp_path)
    spec = _fake_runner(tmp_path, "raise SystemExit('libfoo.so: cannot open shared object file')")
    result = registry.run_peer(spec, tmp_path, [], timeout_s=60)
    assert not result["is_available"] and "libfoo.so" in result["reason"] and "exited with 1" in result["reason"]


def test_a_peer_without_its_venv_says_how_to_set_it_up(tmp_path):
    result = registry.run_peer(registry.PEERS["vllm"], tmp_path / "nowhere", [], timeout_s=60)
    assert not result["is_available"]
    assert "tgserve benchmark peers setup" in result["reason"] and "--peers vllm" in result["reason"]


def test_peer_names():
    assert registry.parse_peer_names("transformers, llamacpp") == ["transformers", "llamacpp"]
    with pytest.raises(ValueError, match="unknown peer"):
        registry.parse_peer_names("transformers,tensorrt")


def _fake_report():
    def row(batch, decode_ms, prefill_ms, output_tps):
        return {"batch_size": batch, "decode": {"avg_ms": decode_ms}, "prefill": {"p50_ms": prefill_ms},
                "output_tokens_per_s": {"avg": output_tps}}
    return {"meta": {"torch_threads": 2, "backend": "cpu"},
            "results": [row(1, 25.0, 120.0, 38.0), row(8, 40.0, 800.0, 180.0), row(16, 50.0, 1500.0, 280.0)]}


def test_merged_table_has_a_column_per_engine_and_the_reasons():
    results = [compare.tgserve_result(_fake_report()), dict(FAKE_RESULT),
               {"engine": "vLLM-CPU", "is_available": False, "reason": "not set up: run `tgserve benchmark peers setup`"}]
    compare.add_fractions(results, floor_ms=20.0)
    assert results[0]["metrics"]["fraction_of_floor"] == pytest.approx(0.8)
    assert results[1]["metrics"]["fraction_of_floor"] == pytest.approx(1.0)
    roofline = {"batch1_floor_ms": 20.0, "batch1_decode_bytes": 988e6, "read_bytes_per_s": 49.4e9}
    table = compare.format_compare_table(results, roofline, sequence_length=128, batch_sizes=[8, 16])
    lines = table.splitlines()
    assert lines[0] == "| metric | tgserve | llama.cpp | vLLM-CPU |"
    assert "| decode ms/token, batch 1 | 25.0 | 20.0 | n/a |" in lines
    assert "| TTFT ms, 128-token prompt | 120.0 | 150.0 | n/a |" in lines
    assert "| output tok/s, batch 8 | 180.0 | 200.0 | n/a |" in lines
    assert "| output tok/s, batch 16 | 280.0 | 300.0 | n/a |" in lines
    assert "| floor / decode, batch 1 | 0.80 | 1.00 | n/a |" in lines
    assert "batch-1 decode floor: 20.00 ms = 988.0 MB read per step / 49.4 GB/s measured in this run" in table
    assert "vLLM-CPU: not measured: not set up" in table and "llama.cpp: converted with" in table


def test_compare_command_runs_the_real_transformers_peer(demo_model_dir, tmp_path, capsys):
    """`tgserve benchmark compare --peers transformers` for real: the transformers runner runs in a child
    process with this interpreter (the test venv has torch and transformers; no peer venv) on the checkpoint
    tgserve measured, and its column carries every metric. One round (each runner start imports
    transformers: ~10 CPU-s); merging rounds is tested on fixed results below. No timed thresholds: the
    checks are the workload it was given, the fields, and bounds that hold by construction (a measured
    call cannot take longer than the whole runner's wall time)."""
    import transformers

    out = tmp_path / "compare.json"
    code = main(["benchmark", "compare", "--model-id", str(demo_model_dir), "--dtype", "float32",
                 "--peers", "transformers", "--batch-size", "2", "--sequence-length", "8", "--decode-length", "3",
                 "--runs", "1", "--warmups", "0", "--rounds", "1", "--bandwidth-probe-mb", "8",
                 "--peers-dir", str(tmp_path / "no-venvs"), "--result-file", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    saved = json.loads(out.read_text())
    assert [r["engine"] for r in saved["results"]] == ["tgserve", "transformers"]
    peer = saved["results"][1]
    assert peer["is_available"], peer.get("reason")
    assert peer["version"] == transformers.__version__ and peer["num_rounds"] == 1
    assert peer["settings"]["dtype"] == "float32" and peer["settings"]["threads"] >= 1

    # Same checkpoint, same interpreter, same workload as tgserve's column.
    runner = str(registry.RUNNERS_DIR / "transformers_runner.py")
    commands = [line for line in printed.err.splitlines() if line.startswith("running transformers: ")]
    assert len(commands) == 1
    argv = commands[0].removeprefix("running transformers: ").split()
    assert argv[:2] == [sys.executable, runner]
    assert Path(argv[argv.index("--model-dir") + 1]).resolve() == Path(demo_model_dir).resolve()
    assert saved["tgserve_report"]["meta"]["model_dir"] == argv[argv.index("--model-dir") + 1]
    for flag, value in (("--dtype", "float32"), ("--sequence-length", "8"), ("--decode-length", "3"),
                        ("--batch-sizes", "2"), ("--runs", "1")):
        assert argv[argv.index(flag) + 1] == value

    metrics = peer["metrics"]
    assert set(metrics) == {"decode_ms_per_token", "ttft_ms", "output_tokens_per_s", "fraction_of_floor"}
    assert all(math.isfinite(metrics[name]) for name in ("decode_ms_per_token", "ttft_ms", "fraction_of_floor"))
    assert set(metrics["output_tokens_per_s"]) == {"2"}
    for result in saved["rounds"]:
        round_peer = result[1]
        assert round_peer["is_available"]
        # ttft_ms is one timed call inside the runner's lifetime; 2 x 3 tokens took at most that lifetime.
        assert 0 < round_peer["metrics"]["ttft_ms"] < round_peer["wall_s"] * 1000
        assert round_peer["metrics"]["output_tokens_per_s"]["2"] > 2 * 3 / round_peer["wall_s"]
    assert metrics["fraction_of_floor"] == pytest.approx(saved["roofline"]["batch1_floor_ms"]
                                                         / metrics["decode_ms_per_token"])
    assert "| metric | tgserve | transformers |" in printed.out
    assert re.search(r"^\| output tok/s, batch 2 \| [0-9.]+ \| [0-9.]+ \|$", printed.out, re.MULTILINE)


def test_peers_setup_rejects_unknown_peers(capsys):
    assert main(["benchmark", "peers", "setup", "--peers", "tensorrt"]) == 1
    assert "unknown peer" in capsys.readouterr().err


def test_a_decode_faster_than_the_floor_is_flagged():
    results = [dict(FAKE_RESULT, notes=[])]
    compare.add_fractions(results, floor_ms=30.0)
    assert results[0]["metrics"]["fraction_of_floor"] == pytest.approx(1.5)
    assert "faster than the memory floor" in results[0]["notes"][0]


def test_rounds_merge_to_per_metric_medians_per_engine():
    def result(decode_ms, ttft_ms, tps8):
        return dict(FAKE_RESULT, metrics={"decode_ms_per_token": decode_ms, "ttft_ms": ttft_ms,
                                          "output_tokens_per_s": {"8": tps8}})
    unavailable = {"engine": "vLLM-CPU", "is_available": False, "reason": "not set up"}
    rounds = [[result(30.0, 100.0, 90.0), unavailable], [result(20.0, 300.0, 110.0), unavailable],
              [result(25.0, 200.0, 70.0), unavailable]]
    merged = compare.merge_rounds(rounds)
    assert merged[0]["metrics"] == {"decode_ms_per_token": 25.0, "ttft_ms": 200.0, "output_tokens_per_s": {"8": 90.0}}
    assert merged[0]["num_rounds"] == 3 and merged[0]["notes"] == FAKE_RESULT["notes"]
    assert merged[1] == unavailable


def test_an_engine_that_failed_in_some_rounds_is_the_median_of_the_others():
    ok = dict(FAKE_RESULT, metrics={"decode_ms_per_token": 22.0, "ttft_ms": 150.0, "output_tokens_per_s": {}})
    failed = {"engine": "llama.cpp", "is_available": False, "reason": "crashed"}
    merged = compare.merge_rounds([[failed], [ok]])
    assert merged[0]["is_available"] and merged[0]["metrics"]["decode_ms_per_token"] == 22.0
    assert merged[0]["num_rounds"] == 1


def test_rounds_must_be_positive(capsys):
    assert main(["benchmark", "compare", "--rounds", "0", "--peers", "transformers"]) == 1
    assert "--rounds must be >= 1" in capsys.readouterr().err
