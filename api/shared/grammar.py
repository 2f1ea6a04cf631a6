"""TGI's `grammar` parameter (and OpenAI's `response_format`, mapped onto it) -> the engine's `GrammarSpec`.

TGI's tagged `GrammarType` (router/src/lib.rs):
  {"type": "json" | "json_object", "value": <JSON schema, as an object or as its text>}
  {"type": "json_schema", "value": {"name": <optional>, "schema": <JSON schema>}}
  {"type": "regex", "value": "<pattern the whole output matches>"}
Unlike TGI, any valid JSON schema is accepted: a top-level array, a schema without `properties`,
`true` (any JSON value). Whether the engine can compile it is the compiler's to say
(`core.grammar`), with a 422 naming the problem.
"""
from __future__ import annotations

from tgserve.api.shared.schemas import GrammarType
from tgserve.core.grammar.spec import GrammarError, GrammarSpec

ANY_JSON_OBJECT = {"type": "object"}  # OpenAI's response_format {"type": "json_object"}: some JSON object


def grammar_spec(grammar: GrammarType) -> GrammarSpec:
    """The engine's grammar for TGI's `grammar` value; raises GrammarError naming what is wrong."""
    value = grammar.value
    if grammar.type in ("json", "json_object"):
        return GrammarSpec.json_schema(value)
    if grammar.type == "json_schema":
        if not isinstance(value, dict) or "schema" not in value:
            raise GrammarError('a `json_schema` grammar\'s value must be {"name": ..., "schema": <JSON schema>}')
        return GrammarSpec.json_schema(value["schema"])
    if not isinstance(value, str):
        raise GrammarError(f"a `regex` grammar's value must be a string, got {type(value).__name__}")
    return GrammarSpec.regex(value)
