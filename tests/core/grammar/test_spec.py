"""GrammarSpec: the cache key keeps a schema's property order, and malformed requests are GrammarErrors."""
from __future__ import annotations

import json

import pytest

from tgserve.core.grammar import GrammarError, GrammarSpec


def test_a_parsed_schema_keeps_its_property_order():
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"z": {}, "a": {}}})
    assert list(json.loads(spec.text)["properties"]) == ["z", "a"]
    assert spec == GrammarSpec.json_schema({"type": "object", "properties": {"z": {}, "a": {}}})
    assert spec != GrammarSpec.json_schema({"type": "object", "properties": {"a": {}, "z": {}}})


def test_schema_text_is_kept_as_sent():
    text = '{"type": "array"}'
    assert GrammarSpec.json_schema(text).text == text


@pytest.mark.parametrize(("value", "named"), [
    ('{"type": ', "not valid JSON"),
    ("[1, 2]", "object or a boolean"),
    (3, "object or a boolean"),
])
def test_malformed_schemas_are_grammar_errors(value, named):
    with pytest.raises(GrammarError, match=named):
        GrammarSpec.json_schema(value)


def test_unknown_kinds_and_non_text_values_are_grammar_errors():
    with pytest.raises(GrammarError, match="json, regex"):
        GrammarSpec("lark", "start: 'a'")
    with pytest.raises(GrammarError, match="must be text"):
        GrammarSpec.regex(12)
