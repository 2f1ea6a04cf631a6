"""benchmark/fused_elementwise.py: it times the native and the reference layer work at each batch size, prints
its table and writes the rows it printed as JSON; where the library is unavailable it says so and fails."""
from __future__ import annotations

import json
import shutil

import pytest

from tgserve.backends.cpu import plugin
from tgserve.benchmark import fused_elementwise


def run_with(argv, monkeypatch) -> int:
    monkeypatch.setattr("sys.argv", ["fused_elementwise", *argv])
    return fused_elementwise.main()


def test_rows_for_each_batch_size_with_both_implementations(tmp_path, monkeypatch, capsys):
    if shutil.which("c++") is None:
        pytest.skip("the native fused ops need a C++ compiler")
    path = tmp_path / "fused.json"
    assert run_with(["--dtype", "float32", "--batch-sizes", "1,3", "--hidden", "37", "--intermediate", "50",
                     "--runs", "2", "--warmups", "1", "--rounds", "2", "--result-file", str(path)], monkeypatch) == 0
    report = json.loads(path.read_text())
    assert [row["batch_size"] for row in report["rows"]] == [1, 3]
    assert report["hidden"] == 37 and report["intermediate"] == 50 and report["cpu_capability"]
    for row in report["rows"]:
        assert row["native_us"] > 0 and row["reference_us"] > 0
        assert row["native_over_reference"] == pytest.approx(row["native_us"] / row["reference_us"])
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # header and one line per batch size


def test_unavailable_library_is_a_failure_with_a_reason(monkeypatch, capsys):
    monkeypatch.setattr(plugin, "native_fused_ops", lambda: None)
    assert run_with(["--batch-sizes", "1", "--runs", "1", "--rounds", "1"], monkeypatch) == 1
    assert "unavailable" in capsys.readouterr().out
