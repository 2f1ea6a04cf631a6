"""`tgserve benchmark engine` on the demo model with tiny settings: the JSON has every field, the table prints."""
from __future__ import annotations

import json

import pytest

from tgserve.api.cli import main
from tgserve.benchmark.engine_bench import EngineBenchConfig, server_config
from tgserve.benchmark.engine_report import LATENCY_KEYS, busy_warning, format_engine_report, latency_stats, throughput


@pytest.fixture(scope="module")
def report(demo_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("engine-bench") / "engine.json"
    code = main(["benchmark", "engine", "--model-id", str(demo_model_dir), "--dtype", "float32", "--batch-size", "1,2",
                 "--sequence-length", "8", "--decode-length", "4", "--runs", "2", "--warmups", "1",
                 "--bandwidth-probe-mb", "8", "--result-file", str(path)])
    assert code == 0
    return json.loads(path.read_text())


def test_meta_and_config(report, demo_model_dir):
    meta = report["meta"]
    assert meta["dtype"] == "float32" and meta["backend"] == "cpu" and meta["device"] == "cpu"
    assert meta["model_dir"] == str(demo_model_dir)
    assert (meta["sequence_length"], meta["decode_length"], meta["runs"], meta["warmups"]) == (8, 4, 2, 1)
    assert meta["torch_threads"] >= 1 and meta["cpus"] >= 1 and meta["load_avg_1m_before"] >= 0
    assert meta["cpu_model"] and meta["device_name"] and meta["tgserve"]


def test_every_row_has_every_field(report):
    assert [row["batch_size"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert (row["sequence_length"], row["decode_length"]) == (8, 4)
        for kind, num_samples in (("prefill", 2), ("decode", 2 * 3), ("decode_total", 2)):
            stats = row[kind]
            assert stats["num_samples"] == num_samples
            assert all(stats[key] > 0 for key in LATENCY_KEYS)
            assert stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
        batch = row["batch_size"]
        assert row["prefill"]["tokens_per_s"]["avg"] == pytest.approx(batch * 8 / row["prefill"]["avg_ms"] * 1000)
        assert row["decode"]["tokens_per_s"]["avg"] == pytest.approx(batch / row["decode"]["avg_ms"] * 1000)
        assert set(row["output_tokens_per_s"]) == {"avg", "min", "max"}
        assert row["decode"]["floor_ms"] > 0
        assert row["decode"]["fraction_of_floor"] == pytest.approx(row["decode"]["floor_ms"] / row["decode"]["avg_ms"])


def test_roofline_block(report):
    line = report["roofline"]
    # The demo checkpoint (untied, float32): the step reads all but the embedding table.
    assert not line["is_tied"]
    assert line["decode_weight_bytes"] == line["checkpoint_bytes"] - line["embedding_bytes"]
    assert line["read_bytes_per_s"] > 0 and line["bandwidth_probe"]["num_bytes"] == 8 << 20
    assert line["batch1_context_tokens"] == 8 + 4 / 2
    assert line["batch1_floor_ms"] == pytest.approx(line["batch1_decode_bytes"] / line["read_bytes_per_s"] * 1000)


def test_printed_tables(report):
    text = format_engine_report(report)
    for needle in ("| Step ", "Decode (token)", "Decode (total)", "tokens/s", "Floor / measured", "read bandwidth"):
        assert needle in text


def test_server_config_fits_the_largest_batch_exactly():
    config = EngineBenchConfig(model_id="x", dtype=None, batch_sizes=(1, 4), sequence_length=100, decode_length=30,
                               runs=1, warmups=0)
    server = server_config(config)
    assert server.max_batch_size == 4 and server.max_batch_prefill_tokens == 400
    assert server.max_input_tokens == 100 and server.max_total_tokens == 130
    assert server.max_batch_total_tokens == 4 * 256


@pytest.mark.parametrize("bad", [dict(batch_sizes=()), dict(batch_sizes=(0,)), dict(decode_length=1),
                                 dict(sequence_length=0), dict(runs=0), dict(warmups=-1)])
def test_config_rejects_bad_values(bad):
    values = dict(model_id=None, dtype=None, batch_sizes=(1,), sequence_length=8, decode_length=4, runs=1, warmups=0)
    with pytest.raises(ValueError):
        EngineBenchConfig(**{**values, **bad})


def test_stats_arithmetic():
    stats = latency_stats([0.001, 0.002, 0.003, 0.004])
    assert stats["avg_ms"] == pytest.approx(2.5) and stats["min_ms"] == pytest.approx(1.0)
    assert stats["max_ms"] == pytest.approx(4.0) and stats["p50_ms"] == pytest.approx(2.5)
    assert stats["p90_ms"] == pytest.approx(3.7) and stats["num_samples"] == 4
    tps = throughput(10, [0.5, 1.0, 1.5])
    assert tps == pytest.approx({"avg": 10.0, "min": 10 / 1.5, "max": 20.0})


def test_bad_batch_size_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "engine", "--batch-size", "1,x"])
    assert exit_info.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_a_busy_machine_is_flagged():
    assert busy_warning({"load_avg_1m_before": 0.3, "cpus": 2}) == ""
    assert "not comparable" in busy_warning({"load_avg_1m_before": 2.5, "cpus": 2})
