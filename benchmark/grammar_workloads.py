"""The grammars `tgserve benchmark grammar` compiles, and the answers it walks token by token.

Issue 15 asks for any valid JSON schema (a top-level array, an object without `properties`, many
optional properties: the inputs TGI's outlines refuses or compiles slowly), regexes, and a clear
422 for invalid or pathological input. Each case says which of those it is, so the report can show,
per library, what it accepts, what it rejects (with the library's own message) and what runs away.
"""
from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class GrammarCase:
    name: str  # short id used in tables and JSON, e.g. "json/top-level-array"
    kind: str  # "json" (text is a JSON schema) or "regex" (text is a regular expression)
    text: str  # the grammar exactly as a request would carry it
    expect: str  # "valid", "invalid" (a 422 naming the problem) or "pathological" (must be time-limited)
    answer: str | None = None  # a string the grammar accepts, walked token by token for per-step mask time


def _json(name: str, schema: dict, expect: str = "valid", answer: object = None) -> GrammarCase:
    return GrammarCase(name, "json", json.dumps(schema), expect, None if answer is None else json.dumps(answer))


def _regex(name: str, regex: str, expect: str = "valid", answer: str | None = None) -> GrammarCase:
    return GrammarCase(name, "regex", regex, expect, answer)


_PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
           "required": ["name", "age"]}
_NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "owner": _PERSON,
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
        "items": {"type": "array", "items": {
            "type": "object",
            "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1},
                           "price": {"type": "number"}},
            "required": ["sku", "quantity", "price"]}},
    },
    "required": ["id", "owner", "tags", "items"],
}
_NESTED_ANSWER = {"id": 7, "owner": {"name": "Ada Lovelace", "age": 36}, "tags": ["math", "engines"],
                  "items": [{"sku": "AE-1", "quantity": 2, "price": 19.5}, {"sku": "DE-2", "quantity": 1, "price": 7.25}]}
# 40 optional string properties: outlines' regex for this enumerates orderings and grows combinatorially.
_OPTIONAL_40 = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(40)}}
_OPTIONAL_40_ANSWER = {f"field_{i}": f"value {i}" for i in range(0, 40, 5)}
_ENUM_WORDS = [f"category-{i:04d}" for i in range(1000)]
_REFS = {
    "$defs": {"address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                          "required": ["street", "city"]},
              "node": {"type": "object", "properties": {"value": {"type": "integer"},
                                                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                       "required": ["value", "children"]}},
    "type": "object",
    "properties": {"home": {"$ref": "#/$defs/address"}, "work": {"$ref": "#/$defs/address"}, "tree": {"$ref": "#/$defs/node"}},
    "required": ["home", "tree"],
}
_REFS_ANSWER = {"home": {"street": "1 Main St", "city": "Springfield"},
                "tree": {"value": 1, "children": [{"value": 2, "children": []}, {"value": 3, "children": []}]}}
# A schema too large to compile quickly anywhere (~1 MB: 3,000 alternatives of 10 required integers),
# and one 300 objects deep: what a client (or an attacker) can send in one request body.
_ANY_OF_3000 = {"anyOf": [{"type": "object", "properties": {f"p{i}_{j}": {"type": "integer"} for j in range(10)},
                           "required": [f"p{i}_{j}" for j in range(10)]} for i in range(3000)]}
_NESTED_300: dict = {"type": "integer"}
for _ in range(300):
    _NESTED_300 = {"type": "object", "properties": {"a": _NESTED_300}}

CASES: tuple[GrammarCase, ...] = (
    _json("json/simple-object", _PERSON, answer={"name": "Grace Hopper", "age": 85}),
    _json("json/nested", _NESTED, answer=_NESTED_ANSWER),
    _json("json/top-level-array", {"type": "array", "items": _PERSON, "minItems": 1},
          answer=[{"name": "Alan", "age": 41}, {"name": "Barbara", "age": 52}]),
    _json("json/object-no-properties", {"type": "object"}, answer={"anything": [1, 2, {"nested": True}], "x": None}),
    _json("json/40-optional", _OPTIONAL_40, answer=_OPTIONAL_40_ANSWER),
    _json("json/enum-1000", {"type": "object", "properties": {"category": {"enum": _ENUM_WORDS}}, "required": ["category"]},
          answer={"category": "category-0421"}),
    _json("json/refs-recursive", _REFS, answer=_REFS_ANSWER),
    _json("json/string-pattern", {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}},
                                  "required": ["code"]}, answer={"code": "ABC-1234"}),
    _json("json/invalid-type", {"type": "objectx"}, expect="invalid"),
    _json("json/invalid-pattern", {"type": "string", "pattern": "(("}, expect="invalid"),
    _json("json/missing-ref", {"$ref": "#/$defs/missing"}, expect="invalid"),
    _json("json/min-over-max", {"type": "string", "minLength": 5, "maxLength": 2}, expect="invalid"),
    _json("json/pattern-blowup", {"type": "string", "pattern": "(a|b)*a(a|b){24}"}, expect="pathological"),
    _json("json/anyof-3000", _ANY_OF_3000, expect="pathological"),
    _json("json/nested-300", _NESTED_300, expect="pathological"),
    _regex("regex/simple", "[0-9]{3}-[0-9]{4}", answer="555-0199"),
    _regex("regex/email", r"[a-zA-Z0-9._%+-]{1,64}@[a-zA-Z0-9-]{1,63}(\.[a-zA-Z0-9-]{1,63}){1,4}",
           answer="grace.hopper@navy.example.org"),
    _regex("regex/(a|aa)*b", "(a|aa)*b", answer="aaaaaaaab"),
    _regex("regex/invalid-unclosed", "(a", expect="invalid"),
    _regex("regex/invalid-lookahead", "(?=a)b", expect="invalid"),
    _regex("regex/repeat-100000", "[a-z]{100000}", expect="pathological"),
    _regex("regex/dfa-blowup", "(a|b)*a(a|b){24}", expect="pathological"),
)
