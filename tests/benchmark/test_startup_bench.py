"""`tgserve benchmark startup`: parsing of server logs and flags, the table, and real starts."""
from __future__ import annotations

import argparse
import json

import pytest

from tgserve.api.cli import build_parser, main
from tgserve.benchmark.startup import StartupConfig, format_startup_report, parse_server_log
from tgserve.benchmark.startup_cli import _cpu_list, startup_config

PROBE_LOG = """\
2026-11-30 13:24:16,998 INFO  tgserve.api.server: Backend: cpu (cpu (2 threads, amx_bf16))
2026-11-30 13:24:17,044 INFO  tgserve.core.engine_builder: Loading /m (qwen2) on cpu as bfloat16
2026-11-30 13:24:39,118 INFO  tgserve.core.engine_builder: KV-cache blocks: 21845, size: 16 (4095 MiB)
2026-11-30 13:24:39,140 INFO  tgserve.core.engine_builder: Warmup: probe of 64 prefill tokens in 0.52s (123 tokens/s \
on this cpu), 0.81s in all; max_batch_prefill_tokens=112 (1s of the measured prefill speed per step, as TGI sizes it \
from GPU FLOPs); memory checked without a full step: 316 MiB peak per step + 4095 MiB KV cache <= 8568 MiB allowed
"""


def test_parses_the_probe_line_and_the_kv_size():
    assert parse_server_log(PROBE_LOG) == {"warmup_s": 0.81, "max_batch_prefill_tokens": 112,
                                           "probe_tokens_per_s": 123.0, "kv_cache_mib": 4095.0,
                                           "backend": "cpu (cpu (2 threads, amx_bf16))"}


def test_parses_json_output_lines():
    lines = [json.dumps({"timestamp": "t", "level": "INFO", "message": line.split(": ", 1)[1], "target": "x"})
             for line in PROBE_LOG.splitlines()]
    assert parse_server_log("\n".join(lines)) == parse_server_log(PROBE_LOG)


@pytest.mark.parametrize("line, warmup_s, prefill", [
    ("Warmup: 4096 prefill tokens in 32.16s; max_batch_prefill_tokens=4096 (one full step, as TGI)", 32.16, 4096),
    ("Warmup: 1000 prefill tokens in 3.50s; max_batch_prefill_tokens=1024 (one full step, as TGI)", 3.5, 1024),
    ("Warmup: 4096 prefill tokens in 50.01s", 50.01, 4096),  # servers from before the probe
])
def test_parses_a_full_warmup_step(line, warmup_s, prefill):
    found = parse_server_log(f"2026-11-30 13:24:39,140 INFO  tgserve.core.warmup: {line}\n")
    assert (found["warmup_s"], found["max_batch_prefill_tokens"], found["probe_tokens_per_s"]) == (warmup_s, prefill,
                                                                                                   None)


def test_a_log_without_warmup_leaves_the_values_unknown():
    found = parse_server_log("tgserve: error: Not enough memory\n{not json\n")
    assert set(found.values()) == {None}


@pytest.mark.parametrize("text, ids", [("0,1", (0, 1)), ("0-3", (0, 1, 2, 3)), ("4, 0-1,1", (0, 1, 4))])
def test_cpu_lists(text, ids):
    assert _cpu_list(text) == ids


@pytest.mark.parametrize("text", ["", "a", "1-x", "-1"])
def test_bad_cpu_lists(text):
    with pytest.raises(argparse.ArgumentTypeError):
        _cpu_list(text)


def test_flags_become_the_config():
    args = build_parser().parse_args(["benchmark", "startup", "--dtypes", "float32, default", "--cpus", "0-1",
                                      "--serve-args", "--max-batch-size 4 --kv-cache-gib '2'", "--runs", "3"])
    config = startup_config(args, "/m")
    assert (config.model_id, config.dtypes, config.cpus, config.runs) == ("/m", ("float32", "default"), (0, 1), 3)
    assert config.serve_args == ("--max-batch-size", "4", "--kv-cache-gib", "2")


@pytest.mark.parametrize("values, message", [(dict(dtypes=("int8",)), "unknown dtype 'int8'"),
                                             (dict(dtypes=()), "at least one dtype"),
                                             (dict(runs=0), "--runs must be >= 1")])
def test_bad_values_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        StartupConfig(**{"python": "python", "model_id": None, "dtypes": ("float32",), **values})


def test_table_has_a_row_per_start_and_the_errors_below():
    meta = {"cpu_model": "AMD EPYC 7B13", "torch": "2.13.0", "torch_cpu_capability": "AVX2", "cpus": 2,
            "load_avg_1m_before": 0.1}
    ok = dict(dtype="float32", run=1, served_dtype="float32", healthy_s=14.25, warmup_s=0.9,
              max_batch_prefill_tokens=112, probe_tokens_per_s=123.4, kv_cache_mib=4095.0, peak_rss_mib=2900.5,
              settled_rss_mib=2100.0, backend="cpu (cpu (2 threads, avx2))", error=None)
    failed = {**ok, "dtype": "bfloat16", "healthy_s": None, "error": "the server exited with 1 before it was healthy"}
    text = format_startup_report({"meta": meta, "results": [ok, failed]})
    assert "AMD EPYC 7B13" in text and "CPU capability AVX2" in text and "WARNING" not in text
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    assert rows[0][:4] == ["dtype", "run", "served", "healthy s"] and len(rows) == 4  # header, rule, two starts
    assert rows[2] == ["float32", "1", "float32", "14.2", "0.90", "112", "123.4", "4095.0", "2900.5", "2100.0"]
    assert rows[3][:4] == ["bfloat16", "1", "float32", "-"]
    assert "bfloat16 run 1 failed: the server exited with 1" in text
    assert "WARNING" in format_startup_report({"meta": {**meta, "load_avg_1m_before": 4.0}, "results": [ok]})


def test_real_starts_are_measured_and_a_failed_start_is_a_row(demo_model_dir, tmp_path, capsys):
    model_dir = demo_model_dir
    result_file = tmp_path / "startup.json"
    code = main(["benchmark", "startup", "--model-id", str(model_dir), "--dtypes", "float32", "--settle-s", "0",
                 "--log-dir", str(tmp_path / "logs"), "--result-file", str(result_file)])
    assert code == 0, capsys.readouterr()
    report = json.loads(result_file.read_text())
    row = report["results"][0]
    assert row["error"] is None and row["served_dtype"] == "float32"
    assert row["healthy_s"] > row["warmup_s"] > 0
    assert row["max_batch_prefill_tokens"] >= 64 and row["probe_tokens_per_s"] > 0 and row["kv_cache_mib"] > 0
    assert row["peak_rss_mib"] > 0 and row["settled_rss_mib"] > 0
    assert report["meta"]["torch_cpu_capability"] and report["meta"]["cpus"] >= 1
    assert "float32" in capsys.readouterr().out

    code = main(["benchmark", "startup", "--model-id", str(model_dir), "--dtypes", "float32",
                 "--serve-args", "--max-batch-prefill-tokens 100000000", "--log-dir", str(tmp_path / "logs2")])
    assert code == 1
    out = capsys.readouterr().out
    assert "float32 run 1 failed: the server exited with 1" in out and "100000000 prefill tokens" in out
