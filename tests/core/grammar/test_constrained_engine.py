"""Constrained decoding through the real engine on the demo model (no HTTP): outputs follow their grammar
greedy and seeded-sampled, with and without speculation, beside unconstrained requests that stay
exactly as they are alone; a complete grammar ends at EOS; a grammar with no next token fails its
request with an error event and never emits a token it refused.

Oracles: `jsonschema` validation and `json.loads`, `re.fullmatch`, the engine's own unconstrained and
non-speculative runs (the demo model's prose corpus holds no JSON, so its greedy text unconstrained
is nothing like these outputs).
"""
from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import llguidance
import pytest

from tgserve.core.errors import RequestRejected
from tgserve.core.grammar import GrammarSpec, compile_grammar, grammar_tokenizer_for
from tgserve.core.grammar.state import NO_NEXT_TOKEN
from tgserve.core.request import ErrorEvent, GenerationRequest, SamplingParams, StoppingParams

from ..engine_harness import run_all, running_engine
from ..test_multi_token_steps import FixedProposer, proposing

LIMITS = {"dtype": "float32", "max_batch_prefill_tokens": 64, "max_batch_total_tokens": 4096, "max_total_tokens": 512}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pet"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pet": {"enum": ["cat", "dog", "fish"]}}}
SENTENCE = r"[a-z]+ (is|was) [0-9]{1,3}"
MAX_NEW_TOKENS = 60  # the demo model's JSON above takes ~40 tokens
SAMPLED = {"do_sample": True, "temperature": 1.0}


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    with running_engine(demo_model_dir, **LIMITS) as engine:
        yield engine


@pytest.fixture(scope="module")
def speculating(demo_model_dir):
    with running_engine(demo_model_dir, speculate=2, **LIMITS) as engine:
        yield engine


@pytest.fixture(scope="module")
def person(engine):
    return engine.grammar_compiler.compile(GrammarSpec.json_schema(PERSON))


@pytest.fixture(scope="module")
def sentence(engine):
    return engine.grammar_compiler.compile(GrammarSpec.regex(SENTENCE))


def _request(engine, grammar, prompt="The river ran", max_new_tokens=MAX_NEW_TOKENS, ignore_eos=False,
             stop=(), **sampling) -> GenerationRequest:
    return GenerationRequest(engine.tokenizer.encode(prompt), SamplingParams(**sampling),
                             StoppingParams(max_new_tokens, tuple(stop), ignore_eos), grammar=grammar)


def _valid_person(engine, got) -> dict:
    """The output's JSON, checked against PERSON; the request ended at EOS (its last token)."""
    assert got.finish.reason == "eos_token", got.finish
    assert got.ids[-1] in engine.tokenizer.eos_token_ids
    value = json.loads(got.finish.text)
    jsonschema.validate(value, PERSON)
    return value


def test_json_schema_output_validates_greedy_and_sampled(engine, person):
    greedy, *sampled = run_all(engine, [_request(engine, person)] +
                               [_request(engine, person, seed=seed, **SAMPLED) for seed in (1, 2, 3)])
    _valid_person(engine, greedy)
    values = [_valid_person(engine, got) for got in sampled]
    assert len({json.dumps(v) for v in values}) > 1  # the seeds drew different objects
    (again,) = run_all(engine, [_request(engine, person, seed=2, **SAMPLED)])
    assert again.ids == sampled[1].ids  # seeded and constrained is still reproducible


def test_regex_output_full_matches(engine, sentence):
    outputs = run_all(engine, [_request(engine, sentence), _request(engine, sentence, prompt="Once upon a time"),
                               _request(engine, sentence, seed=5, **SAMPLED)])
    for got in outputs:
        assert got.finish.reason == "eos_token"
        assert re.fullmatch(SENTENCE, got.finish.text), got.finish.text


def test_unconstrained_requests_are_unchanged_beside_constrained_ones(engine, person, sentence):
    plain = [_request(engine, None, prompt="Once upon a time"), _request(engine, None, seed=9, **SAMPLED)]
    alone = run_all(engine, plain)
    (person_alone,) = run_all(engine, [_request(engine, person)])
    mixed = run_all(engine, [_request(engine, person), plain[0], _request(engine, sentence), plain[1]])
    assert [mixed[1].ids, mixed[3].ids] == [a.ids for a in alone]
    assert mixed[0].ids == person_alone.ids
    assert alone[0].finish.text != mixed[0].finish.text  # the mask did change the constrained one
    assert re.fullmatch(SENTENCE, mixed[2].finish.text)


def test_ngram_speculation_gives_the_same_valid_output(engine, speculating, person):
    # JSON in the prompt, so the n-gram proposer finds guesses to verify in the constrained output
    prompt = '{ "name" :" is one", "age" :8, "pet" : "dog" } { "name" :" is one", "age" :'
    compiled = speculating.grammar_compiler.compile(GrammarSpec.json_schema(PERSON))
    (reference,) = run_all(engine, [_request(engine, person, prompt=prompt)])
    (verified,) = run_all(speculating, [_request(speculating, compiled, prompt=prompt)])
    _valid_person(speculating, verified)
    assert verified.ids == reference.ids
    assert any(event.num_step_tokens > 1 for event in verified.events)  # some steps kept verified guesses


def test_verified_guesses_the_grammar_refuses_change_nothing(engine, person):
    """A fixed proposer guesses the constrained continuation with one wrong id per step (often one the
    grammar refuses there): rows after each guess are masked from the matcher advanced through the
    guesses and rolled back, so the output is the unverified one."""
    prompt = "The river ran"
    (reference,) = run_all(engine, [_request(engine, person, prompt=prompt)])
    proposer = FixedProposer({tuple(engine.tokenizer.encode(prompt)): reference.ids}, engine.runner.vocab_size)
    with proposing(engine, proposer):
        (verified,) = run_all(engine, [_request(engine, person, prompt=prompt)])
    assert not isinstance(verified.events[-1], ErrorEvent), verified.events[-1]
    assert verified.ids == reference.ids
    assert any(event.num_step_tokens > 1 for event in verified.events)


def test_best_of_candidates_each_follow_the_grammar(engine, person):
    """Candidates share one compiled grammar and one batch; each has its own matcher."""
    candidates = run_all(engine, [_request(engine, person, seed=seed, **SAMPLED) for seed in (11, 12, 13)])
    values = [_valid_person(engine, got) for got in candidates]
    assert len({json.dumps(v) for v in values}) > 1


def test_a_complete_grammar_ends_with_eos_even_when_eos_is_ignored(engine):
    forced = engine.grammar_compiler.compile(GrammarSpec.regex("yes"))
    for ignore_eos in (False, True):
        (got,) = run_all(engine, [_request(engine, forced, ignore_eos=ignore_eos)])
        assert got.finish.reason == "eos_token" and got.finish.text == "yes"
        assert got.ids[-1] in engine.tokenizer.eos_token_ids
        # logprobs are the masked distribution's (as TGI reports them): the forced EOS is certain
        assert got.events[-1].logprob == 0.0


def test_stop_sequence_and_max_new_tokens_still_end_a_constrained_request(engine, person):
    (full,) = run_all(engine, [_request(engine, person)])
    (short,) = run_all(engine, [_request(engine, person, max_new_tokens=5)])
    assert short.finish.reason == "length" and short.ids == full.ids[:5]
    (stopped,) = run_all(engine, [_request(engine, person, stop=['"age"'])])
    assert stopped.finish.reason == "stop_sequence" and '"age"' in stopped.finish.text
    assert stopped.ids == full.ids[:len(stopped.ids)] and len(stopped.ids) < len(full.ids)


def test_a_grammar_with_no_next_token_fails_its_request_only(engine):
    """A lexer limit (50 states) that this regex outgrows after a few tokens: the matcher errs while
    computing a mask, and the request ends with an error event, not with the EOS its error mask allows."""
    grammar_tokenizer = grammar_tokenizer_for(engine.tokenizer.hf, engine.runner.vocab_size,
                                              engine.tokenizer.eos_token_ids)
    tight = compile_grammar(grammar_tokenizer, GrammarSpec.regex(r"[a-z ]*(x[a-z ]{20}|y[a-z ]{25}|q[a-z ]{30})[a-z ]*"),
                            llguidance.LLParserLimits(max_lexer_states=50))
    failing, plain = run_all(engine, [_request(engine, tight, ignore_eos=True), _request(engine, None)])
    error = failing.events[-1]
    assert isinstance(error, ErrorEvent) and error.message.startswith(NO_NEXT_TOKEN), error
    assert "too many states" in error.message
    emitted = [event.id for event in failing.events[:-1]]
    assert not set(emitted) & set(engine.tokenizer.eos_token_ids)
    assert re.fullmatch(r"[a-z ]*", engine.tokenizer.decode(emitted))
    (alone,) = run_all(engine, [_request(engine, None)])
    assert plain.ids == alone.ids


def test_a_matcher_already_in_error_emits_nothing(engine, sentence):
    broken = sentence.new_matcher()
    assert not broken.consume_token(engine.tokenizer.encode("7")[0])  # a digit cannot start SENTENCE
    (got,) = run_all(engine, [_request(engine, dataclasses.replace(sentence, template=broken))])
    assert len(got.events) == 1 and isinstance(got.events[0], ErrorEvent)
    assert got.events[0].message.startswith(f"{NO_NEXT_TOKEN} after 0 generated tokens")


def test_requests_with_a_grammar_are_refused_without_grammar_support(demo_model_dir, person):
    with running_engine(demo_model_dir, disable_grammar_support=True, **LIMITS) as engine:
        assert engine.grammar_compiler is None
        with pytest.raises(RequestRejected, match="grammar support is disabled"):
            engine.submit(_request(engine, person), lambda event: None)
