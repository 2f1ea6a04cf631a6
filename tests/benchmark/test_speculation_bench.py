"""`tgserve benchmark speculation` on the demo model with tiny settings: every cell is in the JSON and
the table, greedy ids of every speculating cell equal --speculate 0's (float32), and transformers'
rows (plain, prompt lookup, assisted with the demo model as its own draft) are batch 1 only."""
from __future__ import annotations

import json

import pytest

from tgserve.api.cli import main
from tgserve.benchmark.speculation_bench import SpeculationBenchConfig
from tgserve.benchmark.speculation_cli import format_speculation_report
from tgserve.benchmark.speculation_workloads import WORKLOADS, render


@pytest.fixture(scope="module")
def report(demo_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("speculation-bench") / "speculation.json"
    code = main(["benchmark", "speculation", "--model-id", str(demo_model_dir), "--dtype", "float32",
                 "--speculate", "0,2", "--batch-size", "1,4", "--workloads", "input-grounded",
                 "--max-new-tokens", "12", "--max-prompts", "2", "--assistant-model", str(demo_model_dir),
                 "--result-file", str(path)])
    assert code == 0
    return json.loads(path.read_text())


def test_every_tgserve_cell_with_the_same_ids(report):
    rows = [r for r in report["results"] if r["engine"] == "tgserve"]
    cells = [(r["batch_size"], r["speculate"], r["lengths"]) for r in rows]
    assert cells == [(1, 0, "-"), (1, 2, "adaptive"), (1, 2, "fixed"), (4, 0, "-"), (4, 2, "adaptive"), (4, 2, "fixed")]
    for row in rows:
        assert row["workload"] == "input-grounded" and row["same_ids_as_speculate_0"] is True
        assert row["num_requests"] == max(row["batch_size"], 2)
        assert row["output_tokens"] > 0 and row["tokens_per_s"] > 0 and row["elapsed_s"] > 0
        assert row["method"] == ("n-gram" if row["speculate"] else "none")
        assert row["mean_accepted_length"] >= 1.0 and row["decode_rows_per_token"] >= 1.0
        if row["speculate"] == 0:
            assert row["speedup"] == 1.0 and row["mean_accepted_length"] == 1.0
            assert row["decode_rows_per_token"] == 1.0
        else:
            assert row["speedup"] == pytest.approx(row["tokens_per_s"] / next(
                r["tokens_per_s"] for r in rows if r["speculate"] == 0 and r["batch_size"] == row["batch_size"]))
    assert report["meta"]["knee_rows"] > 0 and report["meta"]["dtype"] == "float32"


def test_transformers_rows_are_batch_1(report):
    rows = [r for r in report["results"] if r["engine"].startswith("transformers")]
    assert [(r["method"], r["speculate"]) for r in rows] == [("none", 0), ("prompt lookup", 2), ("assisted", 2)]
    assert all(r["batch_size"] == 1 and r["same_ids_as_speculate_0"] for r in rows)
    plain, _, assisted = rows
    assert plain["mean_accepted_length"] == 1.0  # one forward per token
    # The draft is the target itself: guesses are accepted, up to N + 1 = 3 tokens per forward.
    assert 1.5 < assisted["mean_accepted_length"] <= 3.0
    assert any("batch 1 only" in note for note in report["notes"])


def test_printed_table(report):
    text = format_speculation_report(report)
    assert text.count("| input-grounded") == len(report["results"])
    assert "note: transformers: batch 1 only" in text and "adaptive" in text


def test_bad_options_are_one_line_errors(capsys):
    assert main(["benchmark", "speculation", "--lengths", "sometimes", "--no-transformers"]) == 1
    assert "lengths must be among" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown workload"):
        from tgserve.benchmark.speculation_workloads import workload_ids
        workload_ids(None, ("poetry",))
    with pytest.raises(ValueError, match="--speculate values"):
        SpeculationBenchConfig(model_id=None, speculates=())


def test_workloads_render_as_one_user_turn():
    class Templated:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, add_generation_prompt):
            assert add_generation_prompt
            return f"<user>{messages[0]['content']}</user><assistant>"

    assert render(Templated(), "hi") == "<user>hi</user><assistant>"
    Templated.chat_template = None
    assert render(Templated(), "hi") == "User: hi\nAssistant:"
    assert set(WORKLOADS) == {"input-grounded", "open-ended"} and all(len(p) >= 4 for p in WORKLOADS.values())


def test_each_cell_runs_the_built_proposer_at_its_n():
    from tgserve.benchmark.speculation_bench import proposer_for
    from tgserve.core.speculation.acceptance import Proposer
    from tgserve.core.speculation.adaptive import AdaptiveProposer
    from tgserve.core.speculation.ngram import NgramProposer

    built = AdaptiveProposer(NgramProposer(4), knee_rows=10.0)
    adaptive = proposer_for(built, 2, "adaptive")
    assert isinstance(adaptive, AdaptiveProposer) and adaptive.knee_rows == 10.0
    assert isinstance(adaptive.inner, NgramProposer) and adaptive.num_tokens == adaptive.inner.num_tokens == 2
    fixed = proposer_for(built, 2, "fixed")
    assert isinstance(fixed, NgramProposer) and fixed.num_tokens == 2
    assert proposer_for(built, 0, "-") is None and proposer_for(None, 2, "adaptive") is None
    assert proposer_for(built, 2, "adaptive", knee_rows=3.0).knee_rows == 3.0

    class Heads(Proposer):  # a Medusa or draft proposer: its own N
        method, num_tokens = "medusa", 4

    heads = AdaptiveProposer(Heads(), knee_rows=10.0)
    assert proposer_for(heads, 2, "fixed") is None  # only adaptive lengths can cap its N
    assert isinstance(proposer_for(heads, 4, "fixed"), Heads)
    capped = proposer_for(heads, 2, "adaptive")
    assert isinstance(capped.inner, Heads) and capped.num_tokens == 2
