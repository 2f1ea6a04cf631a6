"""TGI's validation rules and exact messages (pure functions, no server)."""
from __future__ import annotations

import re
import pytest

from tgserve.api.shared.schemas import GenerateParameters, GenerateRequest, default_parameters
from tgserve.api.shared.validation import (ValidationError, ValidationLimits, check_parameters, check_stream_parameters,
                                    fit_input_ids)

LIMITS = ValidationLimits(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=10,
                          max_total_tokens=20)


def check(inputs: str = "hello", **params):
    return check_parameters(inputs, GenerateParameters(**params), LIMITS, draw_seed=lambda: 1234)


@pytest.mark.parametrize("params, message", [
    (dict(temperature=0.0), "`temperature` must be strictly positive"),
    (dict(temperature=-1.0), "`temperature` must be strictly positive"),
    (dict(repetition_penalty=0.0), "`repetition_penalty` must be strictly positive"),
    (dict(frequency_penalty=2.5), "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    (dict(frequency_penalty=-2.01), "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    (dict(top_p=0.0), "`top_p` must be > 0.0 and <= 1.0"),
    (dict(top_p=1.01), "`top_p` must be > 0.0 and <= 1.0"),
    (dict(typical_p=1.0), "`typical_p` must be > 0.0 and < 1.0"),
    (dict(typical_p=0.0), "`typical_p` must be > 0.0 and < 1.0"),
    (dict(top_k=0), "`top_k` must be strictly positive"),
    (dict(top_k=-3), "`top_k` must be strictly positive"),
    (dict(max_new_tokens=0), "`max_new_tokens` must be strictly positive"),
    (dict(stop=["a", "b", "c", "d", "e"]), "`stop` supports up to 4 stop sequences. Given: 5"),
    (dict(top_n_tokens=6), "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    (dict(truncate=0), "`truncate` must be strictly positive and less than 10. Given: 0"),
    (dict(truncate=11), "`truncate` must be strictly positive and less than 10. Given: 11"),
    (dict(best_of=3, do_sample=True), "`best_of` must be > 0 and <= 2. Given: 3"),
    (dict(best_of=2), "you must use sampling when `best_of` is > 1"),
    (dict(best_of=2, do_sample=True, seed=1), "`seed` must not be set when `best_of` > 1"),
])
def test_tgi_messages(params, message):
    with pytest.raises(ValidationError) as error:
        check(**params)
    assert str(error.value) == message


def test_empty_inputs():
    with pytest.raises(ValidationError, match="^`inputs` cannot be empty$"):
        check(inputs="")


def test_best_of_disabled_when_max_is_one():
    limits = ValidationLimits(1, 4, 5, 10, 20)
    with pytest.raises(ValidationError, match="^`best_of` != 1 is not allowed for this endpoint$"):
        check_parameters("x", GenerateParameters(best_of=2, do_sample=True), limits)


def test_unsupported_features_are_refused_not_ignored():
    with pytest.raises(ValidationError, match="`adapter_id`.* is not supported by tgserve yet"):
        check(adapter_id="my-lora")


@pytest.mark.parametrize("grammar, kind, text", [
    ({"type": "regex", "value": "a+"}, "regex", "a+"),
    ({"type": "json", "value": {"type": "array", "items": {"type": "integer"}}}, "json",
     '{"type":"array","items":{"type":"integer"}}'),  # top-level array: TGI refuses it, we do not
    ({"type": "json_object", "value": '{"type": "object"}'}, "json", '{"type": "object"}'),  # text kept as sent
    ({"type": "json_schema", "value": {"name": "x", "schema": {"properties": {"a": {"type": "string"}}}}}, "json",
     '{"properties":{"a":{"type":"string"}}}'),
    ({"type": "json", "value": True}, "json", "true"),
])
def test_grammars_become_the_engines_spec(grammar, kind, text):
    spec = check(grammar=grammar).grammar
    assert (spec.kind, spec.text) == (kind, text)
    assert check().grammar is None


@pytest.mark.parametrize("grammar, message", [
    ({"type": "regex", "value": 5}, "a `regex` grammar's value must be a string, got int"),
    ({"type": "json", "value": "{not json"}, "the JSON schema is not valid JSON"),
    ({"type": "json", "value": [1, 2]}, "a JSON schema must be an object or a boolean, got list"),
    ({"type": "json_schema", "value": {"name": "x"}}, "a `json_schema` grammar's value must be"),
])
def test_malformed_grammars_are_validation_errors(grammar, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        check(grammar=grammar)


def test_best_of_and_watermark_are_carried_to_the_request():
    checked = check(best_of=2, top_k=5, watermark=True)
    assert checked.best_of == 2 and checked.sampling.watermark and checked.sampling.seed == 1234
    assert check().best_of == 1 and not check().sampling.watermark
    assert check(best_of=0).best_of == 1  # TGI treats 0 like 1 outside streaming


def test_stream_only_checks():
    with pytest.raises(ValidationError, match="^`best_of` != 1 is not supported when streaming tokens$"):
        check_stream_parameters(GenerateParameters(best_of=2))
    with pytest.raises(ValidationError, match="^`decoder_input_details` == true is not supported when streaming"):
        check_stream_parameters(GenerateParameters(decoder_input_details=True))
    check_stream_parameters(GenerateParameters(best_of=1))


def test_top_p_one_is_accepted_as_off():
    """tgserve does better than TGI #2222: OpenAI clients send top_p=1.0."""
    checked = check(top_p=1.0)
    assert checked.sampling.top_p == 1.0 and checked.sampling.is_greedy


def test_defaults_and_sampling_mapping():
    checked = check(temperature=0.5, top_k=10, top_p=0.9, repetition_penalty=1.2, frequency_penalty=0.3,
                    stop=["\n"], top_n_tokens=2, seed=7)
    sampling = checked.sampling
    assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.typical_p) == (0.5, 10, 0.9, 1.0)
    assert (sampling.repetition_penalty, sampling.frequency_penalty, sampling.seed) == (1.2, 0.3, 7)
    assert not sampling.is_greedy
    assert checked.stop_sequences == ("\n",) and checked.top_n_tokens == 2 and checked.max_new_tokens is None


def test_seed_is_drawn_when_unset():
    assert check(do_sample=True).sampling.seed == 1234
    seeds = {check_parameters("x", GenerateParameters(do_sample=True), LIMITS).sampling.seed for _ in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2**64 for s in seeds)


def test_absent_parameters_mean_sampling_as_in_tgi():
    assert GenerateRequest(inputs="x").parameters.do_sample is True
    assert default_parameters().details is False
    assert GenerateRequest.model_validate({"inputs": "x", "parameters": {}}).parameters.do_sample is False


def test_truncate_keeps_the_last_tokens():
    ids, max_new = fit_input_ids(list(range(8)), truncate=3, max_new_tokens=5, limits=LIMITS)
    assert ids == [5, 6, 7] and max_new == 5


def test_null_max_new_tokens_takes_what_is_left():
    ids, max_new = fit_input_ids([1, 2, 3], truncate=None, max_new_tokens=None, limits=LIMITS)
    assert max_new == 17


def test_budget_messages():
    with pytest.raises(ValidationError) as error:
        fit_input_ids([1] * 8, truncate=None, max_new_tokens=13, limits=LIMITS)
    assert str(error.value) == ("`inputs` tokens + `max_new_tokens` must be <= 20. "
                                "Given: 8 `inputs` tokens and 13 `max_new_tokens`")
    with pytest.raises(ValidationError) as error:
        fit_input_ids([1] * 11, truncate=None, max_new_tokens=2, limits=LIMITS)
    assert str(error.value) == "`inputs` must have less than 10 tokens. Given: 11"


def test_budget_counts_at_most_one_chunk_of_new_tokens_as_tgi():
    """TGI-CONTRACT.md 2.2: the check uses input + min(max_new_tokens, 1024); an oversized request
    is accepted and ends with `length` at max_total_tokens (its max_new_tokens is cut to the budget)."""
    limits = ValidationLimits(max_best_of=1, max_stop_sequences=4, max_top_n_tokens=5,
                              max_input_tokens=1024, max_total_tokens=4096)
    assert fit_input_ids([1] * 6, truncate=None, max_new_tokens=4096, limits=limits) == ([1] * 6, 4090)
    assert fit_input_ids([1] * 6, truncate=None, max_new_tokens=1000, limits=limits)[1] == 1000
    tight = ValidationLimits(max_best_of=1, max_stop_sequences=4, max_top_n_tokens=5,
                             max_input_tokens=1099, max_total_tokens=1100)
    with pytest.raises(ValidationError) as error:  # 100 + min(4096, 1024) > 1100
        fit_input_ids([1] * 100, truncate=None, max_new_tokens=4096, limits=tight)
    assert str(error.value) == ("`inputs` tokens + `max_new_tokens` must be <= 1100. "
                                "Given: 100 `inputs` tokens and 1024 `max_new_tokens`")
    assert fit_input_ids([1] * 76, truncate=None, max_new_tokens=4096, limits=tight)[1] == 1024
