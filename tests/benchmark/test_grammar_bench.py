"""`tgserve benchmark grammar` on the demo tokenizer with llguidance and three cases: the JSON has each
compile's outcome with the library's reason, the answer walk passes every mask check, and the table
prints; plus the offline Qwen2-sized tokenizer and the token-bytes map outlines-core is given."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tgserve.api.cli import main
from tgserve.benchmark.grammar_cli import format_grammar_report
from tgserve.benchmark.grammar_tokenizers import token_bytes, write_grown_tokenizer


@pytest.fixture(scope="module")
def report(demo_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("grammar-bench") / "grammar.json"
    code = main(["benchmark", "grammar", "--engines", "llguidance", "--tokenizers", "demo", "--walks", "1",
                 "--cases", "json/simple-object,json/nested,regex/invalid-unclosed,json/anyof-3000",
                 "--result-file", str(path)])
    assert code == 0
    return json.loads(path.read_text())


def test_each_compile_has_its_outcome_and_the_libraries_reason(report):
    (result,) = report["results"]
    assert (result["engine"], result["tokenizer"], result["num_tokens"], result["num_logits"]) == (
        "llguidance", "demo", 2003, 2048)
    compiles = result["compiles"]
    assert [case["name"] for case in report["cases"]] == list(compiles)
    assert compiles["json/simple-object"]["status"] == "ok" and compiles["json/nested"]["status"] == "ok"
    assert compiles["regex/invalid-unclosed"]["status"] == "rejected"
    assert "unclosed group" in compiles["regex/invalid-unclosed"]["error"]
    assert compiles["json/anyof-3000"] == {**compiles["json/anyof-3000"], "status": "rejected", "error": "schema too large"}
    assert result["tokenizer_build_s"] > 0


def test_answers_walk_through_the_masks(report):
    (result,) = report["results"]
    walk, batch = result["walk"], result["batch"]
    assert walk["num_failures"] == 0 and walk["num_steps"] > 20
    assert walk["fill_us"]["median"] > 0 and walk["fill_us"]["p99"] >= walk["fill_us"]["median"]
    assert batch["rows"] == 16 and batch["num_failures"] == 0 and batch["loop_fill_us"]["count"] == batch["num_steps"]
    assert result["gil"]["case"] in ("json/simple-object", "json/nested")


def test_the_table_names_the_library_and_the_rejections(report):
    table = format_grammar_report(report)
    assert "llguidance 1." in table and "schema too large" in table and "unclosed group" in table


def test_a_grown_tokenizer_has_the_size_asked_and_still_encodes(demo_model_dir, tmp_path):
    folder = write_grown_tokenizer(demo_model_dir, tmp_path / "grown", num_tokens=3000)
    grown, base = AutoTokenizer.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(demo_model_dir))
    assert len(grown) == 3000 and len(set(grown.get_vocab())) == 3000
    text = '{"name": "Ada", "tags": ["math", "engines"]}'
    assert grown.decode(grown.encode(text, add_special_tokens=False)) == text
    assert grown.eos_token_id == base.eos_token_id


def test_token_bytes_decode_to_the_text(demo_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(demo_model_dir))
    mapping, special_ids = token_bytes(tokenizer)
    by_id = {index: raw for raw, ids in mapping.items() for index in ids}
    text = "Grace said: “structured” output, 42 times!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(by_id[i] for i in ids).decode() == text
    assert tokenizer.eos_token_id in special_ids and tokenizer.eos_token_id not in by_id
