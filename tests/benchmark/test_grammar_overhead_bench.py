"""`python -m tgserve.benchmark.grammar_overhead` on the demo model, tiny: every workload at every batch
size has measured decode steps, every valid grammar of the library benchmark's set has its cold and
cached compile time, and the JSON holds what the table prints."""
from __future__ import annotations

import json

from tgserve.benchmark.grammar_overhead import main
from tgserve.benchmark.grammar_workloads import CASES


def test_a_small_run_measures_every_workload_and_every_compile(demo_model_dir, tmp_path, capsys):
    path = tmp_path / "overhead.json"
    assert main(["--model-id", str(demo_model_dir), "--batch-sizes", "1,2", "--new-tokens", "6", "--rounds", "1",
                 "--result-file", str(path)]) == 0
    report = json.loads(path.read_text())
    rows = {(row["batch_size"], row["workload"]): row for row in report["rows"]}
    assert set(rows) == {(b, w) for b in (1, 2) for w in ("none", "json", "regex", "regex-count")}
    for (batch_size, workload), row in rows.items():
        assert row["num_steps"] >= 4, row  # 6 tokens: the first comes from prefill, then decode steps
        assert row["step_ms"] > 0 and abs(row["ms_per_token"] * batch_size - row["step_ms"]) < 1e-9
        assert (row["overhead_pct"] == 0.0) == (workload == "none")
    assert [c["case"] for c in report["compiles"]] == [c.name for c in CASES if c.expect == "valid"]
    assert all(c["cold_ms"] > 0 and c["cached_ms"] > 0 for c in report["compiles"])
    printed = capsys.readouterr().out
    assert "regex-count" in printed and "cached ms" in printed and "json/40-optional" in printed
