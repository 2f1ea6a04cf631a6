"""The structured-output suite: fifty JSON schemas (tests/fixtures/grammar/json_schemas.py), each asked
for greedy and seeded-sampled, on the demo model and on the real SmolLM2-135M-Instruct; every output
must end (EOS, the grammar complete) and validate against its schema, formats included where
`jsonschema` checks them (date as RFC 3339 writes it). All requests of a model run as one batch through the real engine.

Oracle: `jsonschema`'s Draft 2020-12 validator, independent of llguidance.
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tgserve.core.grammar import GrammarSpec
from tgserve.core.request import ErrorEvent, GenerationRequest, SamplingParams, StoppingParams
from tests.fixtures.grammar.json_schemas import SCHEMAS

from ..engine_harness import run_all, running_engine

LIMITS = {"dtype": "float32", "max_batch_prefill_tokens": 1024, "max_batch_total_tokens": 65536,
          "max_total_tokens": 512, "max_batch_size": 100}
MAX_NEW_TOKENS = 256
PROMPT = "Answer with JSON only. Give one example value for this record."


def run_suite(engine) -> list[tuple[str, str, object]]:
    """(schema name, greedy/seeded, outcome) for every schema, sampled with seed = its index."""
    compiled = [engine.grammar_compiler.compile(GrammarSpec.json_schema(schema)) for _, schema in SCHEMAS]
    prompt = engine.tokenizer.encode(PROMPT)
    requests, labels = [], []
    for index, ((name, _schema), grammar) in enumerate(zip(SCHEMAS, compiled)):
        for mode, sampling in (("greedy", SamplingParams()), ("seeded", SamplingParams(do_sample=True, seed=index))):
            requests.append(GenerationRequest(list(prompt), sampling, StoppingParams(MAX_NEW_TOKENS), grammar=grammar))
            labels.append((name, mode))
    return [(name, mode, got) for (name, mode), got in zip(labels, run_all(engine, requests, timeout_s=1800))]


# RFC 3339's ABNF, which JSON Schema's date, time and date-time formats name: any 4-digit year (0000 too),
# second 60 (a leap second), any number of fractional digits, "t" / "z" in either case. jsonschema checks
# these with Python's datetime parsers, which refuse all four.
FULL_DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
FULL_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?([zZ]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
RFC3339 = {"date": FULL_DATE, "time": FULL_TIME, "date-time": f"{FULL_DATE}[tT]{FULL_TIME}"}
FORMATS = jsonschema.FormatChecker()
for _name, _pattern in RFC3339.items():
    FORMATS.checks(_name)(lambda value, pattern=_pattern: not isinstance(value, str)
                          or re.fullmatch(pattern, value) is not None)


def failures(results, eos_ids) -> list[str]:
    schemas = dict(SCHEMAS)
    found = []
    for name, mode, got in results:
        if isinstance(got.events[-1], ErrorEvent):
            found.append(f"{name} {mode}: error {got.events[-1]}")
            continue
        text = got.finish.text
        if got.finish.reason != "eos_token" or got.ids[-1] not in eos_ids:
            found.append(f"{name} {mode}: ended by {got.finish.reason}: {text[:80]!r}")
            continue
        try:
            validator = jsonschema.Draft202012Validator(schemas[name], format_checker=FORMATS)
            validator.validate(json.loads(text))
        except (ValueError, jsonschema.ValidationError) as error:
            found.append(f"{name} {mode}: {str(error).splitlines()[0]}: {text!r}")
    return found


@pytest.mark.parametrize("model", ["demo", "smollm2"])
def test_every_schema_is_followed_greedy_and_sampled(model, request):
    model_dir = request.getfixturevalue("demo_model_dir" if model == "demo" else "smollm2_dir")
    with running_engine(model_dir, **LIMITS) as engine:
        results = run_suite(engine)
        eos_ids = engine.tokenizer.eos_token_ids
    assert len(results) == 2 * len(SCHEMAS) == 100
    assert failures(results, eos_ids) == []
