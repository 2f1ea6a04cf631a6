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


def response_format_grammar(response_format: object) -> GrammarType | None:
    """OpenAI's `response_format` as TGI's `grammar` (None: plain text); raises GrammarError for one it
    does not know.

    OpenAI's: {"type": "text"}, {"type": "json_object"} (some JSON object), {"type": "json_schema",
    "json_schema": {"name", "schema", "strict", "description"}}. TGI's own OpenAI routes take the
    `GrammarType` form ({"type": ..., "value": ...}); a body in that form is read as one.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise GrammarError('`response_format` must be an object with a `type`, such as {"type": "json_object"}')
    kind = response_format["type"]
    if "value" in response_format:
        if kind not in ("json", "json_object", "json_schema", "regex"):
            raise GrammarError(f"unknown `response_format` type '{kind}'")
        return GrammarType(type=kind, value=response_format["value"])
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarType(type="json", value=ANY_JSON_OBJECT)
    if kind == "json_schema":
        schema = response_format.get("json_schema")
        if not isinstance(schema, dict) or "schema" not in schema:
            raise GrammarError('`response_format` {"type": "json_schema"} needs `json_schema`: '
                               '{"name": ..., "schema": <JSON schema>}')
        return GrammarType(type="json_schema", value=schema)
    raise GrammarError(f"unknown `response_format` type '{kind}': use text, json_object or json_schema")
