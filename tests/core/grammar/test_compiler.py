"""The grammar compile cache on the demo tokenizer: one compile per text, errors that name the problem
(and are cached too), the time limit, and the schemas TGI refuses (top-level array, no `properties`)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tgserve.checkpoints.demo_tokenizer import IM_END, build_demo_tokenizer, special_token_ids
from tgserve.core.errors import RequestRejected
from tgserve.core.grammar import GrammarCompiler, GrammarError, GrammarSpec, compile_grammar, make_grammar_tokenizer

NUM_LOGITS = 2048  # the demo model's lm_head rows; its tokenizer has 2,003 tokens
# Valid, but slow to compile (1,000 alternatives of 10 required properties: 0.3-2 s on a shared 2-core
# machine), and the schema llguidance's own size limit refuses (3,000 of them).
SLOW_SCHEMA = {"anyOf": [{"type": "object", "properties": {f"p{i}_{j}": {"type": "integer"} for j in range(10)},
                          "required": [f"p{i}_{j}" for j in range(10)]} for i in range(1000)]}
TOO_LARGE_SCHEMA = {"anyOf": [{"type": "object", "properties": {f"p{i}_{j}": {"type": "integer"} for j in range(10)},
                               "required": [f"p{i}_{j}" for j in range(10)]} for i in range(3000)]}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def demo_tokenizer():
    return build_demo_tokenizer()


@pytest.fixture(scope="module")
def eos_id(demo_tokenizer) -> int:
    return special_token_ids(demo_tokenizer)[IM_END]


@pytest.fixture(scope="module")
def grammar_tokenizer(demo_tokenizer, eos_id):
    return make_grammar_tokenizer(demo_tokenizer.to_str(), NUM_LOGITS, [eos_id])


@pytest.fixture
def compiler(grammar_tokenizer):
    compiler = GrammarCompiler(grammar_tokenizer, max_compile_s=30.0)
    yield compiler
    compiler.close()


def allowed_ids(matcher) -> set[int]:
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    return set(np.flatnonzero(bits).tolist())


def walk(matcher, demo_tokenizer, text: str) -> bool:
    """Advance through `text`'s tokens, checking each is in the mask first; True when all were."""
    for token in demo_tokenizer.encode(text).ids:
        if token not in allowed_ids(matcher) or not matcher.consume_token(token):
            return False
    return True


def test_the_same_text_compiles_once_and_returns_the_same_object(compiler):
    first = compiler.compile(GrammarSpec.json_schema(PERSON))
    assert compiler.compile(GrammarSpec.json_schema(json.loads(json.dumps(PERSON)))) is first
    assert compiler.submit(GrammarSpec.json_schema(PERSON)).result() is first
    other = compiler.compile(GrammarSpec.json_schema({"type": "array", "items": PERSON}))
    assert other is not first and other.spec.text != first.spec.text
    assert first.new_matcher() is not first.new_matcher()  # each request gets its own matcher


@pytest.mark.parametrize(("spec", "named"), [
    (GrammarSpec.json_schema({"type": "objectx"}), "objectx"),
    (GrammarSpec.json_schema({"$ref": "#/$defs/missing"}), "missing"),
    (GrammarSpec.json_schema({"type": "string", "minLength": 5, "maxLength": 2}), "minLength"),
    (GrammarSpec.json_schema({"not": {"type": "string"}}), "not"),  # unsupported keyword: refused, not ignored
    (GrammarSpec.json_schema({"type": "string", "pattern": "(("}), "unclosed group"),
    (GrammarSpec.regex("(a"), "unclosed group"),
    (GrammarSpec.regex("(?=a)b"), "look"),
])
def test_invalid_grammars_raise_a_grammar_error_naming_the_problem(compiler, spec, named):
    with pytest.raises(GrammarError) as raised:
        compiler.compile(spec)
    message = str(raised.value)
    assert isinstance(raised.value, RequestRejected)  # the API answers it as a 422
    assert message.startswith("invalid JSON schema: " if spec.kind == "json" else "invalid regex: ")
    assert named in message and "\n" not in message


@pytest.mark.parametrize("regex", ["x{1000000}", "x{1000}{1000}"])
def test_a_regex_that_breaks_on_its_first_token_is_refused_at_compile(compiler, regex):
    """llguidance compiles these and computes their first mask, then its lexer gives up on the first
    character ("too many expressions constructed"): refused before any request runs it."""
    with pytest.raises(GrammarError, match="^regex too complex for the grammar engine: .*too many expressions"):
        compiler.compile(GrammarSpec.regex(regex))


def test_large_counted_repeats_the_lexer_can_follow_are_accepted(compiler, demo_tokenizer):
    for regex in ("x{5000}", "[a-z]{1000000}", "(a|b)*a(a|b){10000}"):
        compiled = compiler.compile(GrammarSpec.regex(regex))
        assert walk(compiled.new_matcher(), demo_tokenizer, "ab" if regex[0] != "x" else "xx")


def test_a_one_of_with_overlapping_branches_is_accepted_as_any_of(compiler, demo_tokenizer):
    """llguidance alone refuses a `oneOf` it cannot prove exclusive; tgserve enforces it as `anyOf`
    (as TGI's outlines does) rather than refusing a valid schema."""
    schema = {"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 5}]}
    compiled = compiler.compile(GrammarSpec.json_schema(schema))
    matcher = compiled.new_matcher()
    assert walk(matcher, demo_tokenizer, '"abc"') and matcher.is_accepting()


def test_a_failed_grammar_fails_again_from_the_cache(compiler):
    spec = GrammarSpec.json_schema({"type": "objectx"})
    first = compiler.submit(spec)
    with pytest.raises(GrammarError):
        first.result()
    assert compiler.submit(GrammarSpec.json_schema({"type": "objectx"})) is first


def test_a_schema_past_the_libraries_limits_is_refused_with_its_reason(compiler):
    with pytest.raises(GrammarError, match="too large"):
        compiler.compile(GrammarSpec.json_schema(TOO_LARGE_SCHEMA))


def test_a_compile_past_the_time_limit_fails_and_stays_failed(grammar_tokenizer):
    spec = GrammarSpec.json_schema(SLOW_SCHEMA)
    start = time.perf_counter()
    compile_grammar(grammar_tokenizer, spec)  # valid: it compiles when given the time
    full_s = time.perf_counter() - start
    compiler = GrammarCompiler(grammar_tokenizer, max_compile_s=0.05)
    try:
        start = time.perf_counter()
        future = compiler.submit(spec)
        assert not future.done()  # the compile runs on the compiler's thread, not the caller's
        with pytest.raises(GrammarError, match="longer than 0.05 s"):
            future.result()
        assert time.perf_counter() - start < full_s / 2
        assert compiler.submit(GrammarSpec.json_schema(SLOW_SCHEMA)) is future  # a retry fails at once
    finally:
        compiler.close()


def test_a_top_level_array_is_accepted_and_followed(compiler, demo_tokenizer):
    compiled = compiler.compile(GrammarSpec.json_schema({"type": "array", "items": PERSON, "minItems": 1}))
    matcher = compiled.new_matcher()
    assert walk(matcher, demo_tokenizer, '[{"name": "Ada", "age": 36}, {"name": "Alan", "age": 41}]')
    assert matcher.is_accepting()
    brace = demo_tokenizer.encode("{").ids
    assert len(brace) == 1 and brace[0] not in allowed_ids(compiled.new_matcher())  # an array, not an object


def test_an_object_without_properties_takes_any_object(compiler, demo_tokenizer, eos_id):
    compiled = compiler.compile(GrammarSpec.json_schema({"type": "object"}))
    matcher = compiled.new_matcher()
    assert eos_id not in allowed_ids(matcher)
    assert walk(matcher, demo_tokenizer, '{"anything": [1, 2.5, {"nested": true}], "x": null}')
    assert matcher.is_accepting() and eos_id in allowed_ids(matcher)
    assert not walk(compiled.new_matcher(), demo_tokenizer, "[1]")


def test_forty_optional_properties_compile_and_allow_any_subset(compiler, demo_tokenizer):
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(40)}}
    matcher = compiler.compile(GrammarSpec.json_schema(schema)).new_matcher()
    assert walk(matcher, demo_tokenizer, '{"field_3": "a", "field_17": "b", "field_39": "c"}')
    assert matcher.is_accepting()


def test_a_regex_must_match_the_whole_output(compiler, demo_tokenizer, eos_id):
    compiled = compiler.compile(GrammarSpec.regex("[0-9]{3}-[0-9]{4}"))
    matcher = compiled.new_matcher()
    assert walk(matcher, demo_tokenizer, "555-0199") and matcher.is_accepting()
    assert allowed_ids(matcher) == {eos_id}  # complete: only the end may follow
    partial = compiled.new_matcher()
    assert walk(partial, demo_tokenizer, "555-01") and not partial.is_accepting()


def test_ids_past_the_tokenizer_are_never_allowed(compiler):
    matcher = compiler.compile(GrammarSpec.json_schema({"type": "object"})).new_matcher()
    assert max(allowed_ids(matcher)) < 2003


def test_the_least_recently_used_grammar_leaves_a_full_cache(grammar_tokenizer):
    compiler = GrammarCompiler(grammar_tokenizer, max_cached=2)
    try:
        first = compiler.compile(GrammarSpec.regex("a+"))
        second = compiler.compile(GrammarSpec.regex("b+"))
        assert compiler.compile(GrammarSpec.regex("a+")) is first  # used again: now the most recent
        compiler.compile(GrammarSpec.regex("c+"))  # evicts "b+"
        assert compiler.compile(GrammarSpec.regex("a+")) is first
        assert compiler.compile(GrammarSpec.regex("b+")) is not second
    finally:
        compiler.close()
