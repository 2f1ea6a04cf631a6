"""TGI's OpenAPI document as JSON Schema validators, for the contract and fuzz tests (test helper).

`data/tgi-openapi.json` is a copy of TGI's `docs/openapi.json` (3.3.6-dev0, Apache-2.0). It is
OpenAPI 3.0.3 as utoipa writes it, so before validating it is rewritten into JSON Schema 2020-12,
OpenAPI 3.1's dialect:

- `nullable: true` adds "null" to `type`. Beside `allOf` (utoipa's `Option<Struct>`, e.g.
  `GenerateResponse.details`) it means "that struct or null", which is what TGI sends; read
  literally, OpenAPI 3.0.3 would forbid null there since the referenced struct is not nullable.
- `example` and string `default`s ("null") are annotations and change nothing.

Formats are checked (int32, int64, float), since clients generated from the spec rely on them.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from openapi_schema_validator import OAS31Validator, oas31_format_checker

SPEC_PATH = Path(__file__).parent / "data" / "tgi-openapi.json"


@functools.cache
def spec() -> dict:
    """The document with its OpenAPI 3.0 `nullable`s rewritten (see the module docstring)."""
    return _without_nullable(json.loads(SPEC_PATH.read_text()))


def _without_nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_without_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    schema = {key: _without_nullable(value) for key, value in node.items()
              if not (key == "nullable" and isinstance(value, bool))}
    if node.get("nullable") is not True:
        return schema
    if "type" in schema:
        schema["type"] = [schema["type"], "null"]
        if "enum" in schema:
            schema["enum"] = [*schema["enum"], None]
        return schema
    return {"anyOf": [schema, {"type": "null"}]}


@functools.cache
def _validator(ref: str) -> OAS31Validator:
    root = {"$ref": ref, "paths": spec()["paths"], "components": spec()["components"]}
    return OAS31Validator(root, format_checker=oas31_format_checker)


def schema_errors(instance: Any, ref: str) -> list[str]:
    """Every way `instance` breaks the schema at `ref` (a JSON pointer into the document)."""
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
            for error in _validator(ref).iter_errors(instance)]


def check_component(instance: Any, name: str) -> None:
    """Assert that `instance` is a valid `components/schemas/<name>`."""
    errors = schema_errors(instance, f"#/components/schemas/{name}")
    assert not errors, f"{name}: {errors}\n{json.dumps(instance)[:2000]}"


def response_ref(path: str, method: str, status: int, media_type: str = "application/json") -> str:
    """JSON pointer of the schema the document gives for that response; KeyError if it gives none."""
    assert "schema" in spec()["paths"][path][method]["responses"][str(status)]["content"][media_type]
    return "#/" + "/".join(part.replace("~", "~0").replace("/", "~1") for part in (
        "paths", path, method, "responses", str(status), "content", media_type, "schema"))


def check_response(path: str, method: str, status: int, body: Any, media_type: str = "application/json") -> None:
    """Assert that `body` matches what the document says `path` answers with `status`."""
    errors = schema_errors(body, response_ref(path, method, status, media_type))
    assert not errors, f"{method} {path} {status}: {errors}\n{json.dumps(body)[:2000]}"


def sse_events(lines: list[str]) -> list[dict]:
    """The JSON of every `data:` line of a server-sent-events body."""
    return [json.loads(line[len("data:"):]) for line in lines if line.startswith("data:")]


def check_stream_events(path: str, events: list[dict]) -> None:
    """Token events must match the route's 200 event schema, error events `ErrorResponse`."""
    assert events, f"{path}: no events"
    for event in events:
        if "error" in event:
            check_component(event, "ErrorResponse")
        else:
            check_response(path, "post", 200, event, "text/event-stream")
