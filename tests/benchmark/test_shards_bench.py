"""`tgserve benchmark shards`: a real 2-shard server split per decode step into compute and communication."""
from __future__ import annotations

import json

import pytest

from tgserve.api.cli import main
from tgserve.benchmark.shards import ShardsConfig


def test_a_sharded_server_splits_its_decode_steps(demo_model_dir, tmp_path, capsys):
    """The demo model's 2 layers: a decode step runs 2 plan broadcasts, the embedding's all-reduce, 2
    all-reduces per layer and the logits gather; compute and communication add up to the forward; one
    resident size per rank."""
    layers = json.loads((demo_model_dir / "config.json").read_text())["num_hidden_layers"]
    result_file = tmp_path / "shards.json"
    code = main(["benchmark", "shards", "--model-id", str(demo_model_dir), "--num-shard", "2", "--batch-size", "2",
                 "--max-new-tokens", "8", "--rounds", "1", "--dtype", "float32", "--log-dir", str(tmp_path / "logs"),
                 "--result-file", str(result_file)])
    assert code == 0, capsys.readouterr()
    (row,) = json.loads(result_file.read_text())["results"]
    assert row["error"] is None and row["num_shard"] == 2 and row["batch_size"] == 2
    assert row["num_decode_steps"] >= 7 and row["collectives_per_step"] == 2 + 1 + 2 * layers + 1
    assert 0 < row["communication_ms"] < row["forward_ms"] <= row["step_ms"]
    assert row["compute_ms"] == pytest.approx(row["forward_ms"] - row["communication_ms"])
    assert len(row["rss_mib_per_rank"]) == 2 and min(row["rss_mib_per_rank"]) > 0
    assert "communication ms" in capsys.readouterr().out


@pytest.mark.parametrize("values, message", [(dict(num_shards=(0,)), "positive counts"),
                                             (dict(batch_sizes=()), "positive counts"),
                                             (dict(max_new_tokens=1), "at least 2")])
def test_bad_values_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        ShardsConfig(model_id="m", **values)
